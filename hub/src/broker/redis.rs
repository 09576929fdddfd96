//! The Redis broker: fan-out across nodes through Redis pub/sub, history in Redis Streams.
//!
//! It loads the `hub` function library, subscribes the channels the node asks for, turns
//! pub/sub messages into deliveries to the node's [`Sink`], watches its own subscription with a
//! self-ping, and answers bounded history reads. When it may have lost messages (a reconnection,
//! a burst it could not keep up with) it tells the sink that every reader fell behind, so that
//! readers check their positions against history; it never reads history itself for them, so
//! the receive loop (and the self-ping it carries) never waits on a read.

use crate::broker::{BrokerError, Page, Sink};
use crate::message::Message;
use crate::metrics::{DropReason, Metrics, Source};
use fred::clients::SubscriberClient;
use fred::interfaces::{
    ClientLike, ClusterInterface, EventInterface, FunctionInterface, KeysInterface,
    PubsubInterface, SetsInterface, SortedSetsInterface,
};
use fred::prelude::{Builder, Client, ReconnectPolicy};
use fred::types::Value;
use protocol::{ChannelName, Envelope, EnvelopeError, StreamId};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast::error::RecvError;

/// The function library, with `__PLACEHOLDERS__` for the configuration.
const LIBRARY: &str = include_str!("hub.lua");
/// This build's library version. A node never replaces a loaded library of a higher version;
/// every version keeps the functions and arguments of the ones before it.
pub const LIBRARY_VERSION: i64 = 5;
/// Prefix of live channels (`hub:ch:<channel>`, or `hub:ch:{<channel>}` in cluster mode):
/// ephemeral publishes.
pub const LIVE_PREFIX: &str = "hub:ch:";
/// Prefix of the channels only `hub_publish` publishes on: durable notifications.
pub const DURABLE_PREFIX: &str = "hub:dur:";
/// Prefix of presence channels (`hub:pres:<channel>`): `join`/`leave` from `hub_presence`.
pub const PRESENCE_PREFIX: &str = "hub:pres:";
/// The sorted set of presence leases (node -> expiry by Redis's clock).
const PRESENCE_NODES: &str = "hub:presence:nodes";

/// Which of a hub channel's pub/sub channels a message came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carries {
    Live,
    Durable,
    Presence,
}

/// The channels a node has presence counts on (a set; what a survivor clears when it dies).
fn presence_channels_key(node: &str) -> String {
    format!("hub:presence:chans:{{{node}}}")
}
/// A durable id further ahead of this node's clock than this cannot have come from history
/// (Redis's clock makes the ids): it is dropped and counted.
const FUTURE_SLACK_MS: u64 = 3_600_000;
/// How often the loaded library is checked again (a node of version 1 replaces any library).
const LIBRARY_CHECK_EVERY: Duration = Duration::from_secs(30);
/// How often the node pings itself through its subscription.
const PING_EVERY: Duration = Duration::from_secs(1);
/// A subscription that delivered no ping for this long is considered dead and reconnected.
const PING_DEADLINE: Duration = Duration::from_secs(5);
/// Longest wait for a Redis command before the caller gets a 503.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Pub/sub messages buffered between the connection and the fan-out task (4 s at 2,000
/// messages/s). A burst beyond it is noticed (`Lagged`) and readers catch up from history.
/// fred preallocates every slot of each of a client's broadcast channels (about 700 bytes per
/// slot in all): 65,536 held 47 MB per client on an idle node; 8,192 hold about 6 MB.
const MESSAGE_BUFFER: usize = 8_192;
/// The command client's broadcast channels carry only its reconnections and errors.
const COMMAND_CLIENT_BUFFER: usize = 64;
/// Channels per SUBSCRIBE command when resubscribing many.
const SUBSCRIBE_BATCH: usize = 500;
/// Cluster mode: shard subscriptions are re-issued this often, since Redis drops them when a
/// slot migrates and the client does not move them (fred discards the server's SUNSUBSCRIBE).
const SHARD_RESUBSCRIBE_EVERY: Duration = Duration::from_secs(30);
/// Cluster mode: the slot map is read this often (one `CLUSTER SLOTS`); a change re-issues the
/// shard subscriptions at once instead of at the next period.
const SLOT_CHECK_EVERY: Duration = Duration::from_secs(2);
/// While not ready, how often that is logged.
const WAITING_LOG_EVERY: Duration = Duration::from_secs(10);
/// Pause between attempts to resubscribe after a reconnection.
const RESUBSCRIBE_RETRY: Duration = Duration::from_millis(200);

/// Logs connection errors (a refused connection, a TLS handshake whose certificate does not
/// verify, a wrong password): the first at once, then at most one per `WAITING_LOG_EVERY`.
async fn log_errors(
    mut errors: tokio::sync::broadcast::Receiver<(
        fred::error::Error,
        Option<fred::types::config::Server>,
    )>,
) {
    let mut last: Option<Instant> = None;
    loop {
        match errors.recv().await {
            Ok((e, server)) => {
                if last.is_none_or(|t| t.elapsed() >= WAITING_LOG_EVERY) {
                    last = Some(Instant::now());
                    let server = server.map(|s| s.to_string()).unwrap_or_default();
                    tracing::warn!(%server, error = %e, "Redis connection error");
                }
            }
            Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return,
        }
    }
}

/// A library found loaded in Redis.
struct LoadedLibrary {
    version: i64,
    /// History length, TTL (ms), largest envelope (zeros for version 1, which cannot tell).
    settings: [i64; 3],
}

/// A durable notification, `"<id> <envelope>"`: the id (which must be one history could
/// have made: not far ahead of `now_ms`) and the envelope's bytes.
fn parse_durable(payload: &[u8], now_ms: u64) -> Result<(Option<StreamId>, &[u8]), String> {
    let sp = payload
        .iter()
        .position(|&b| b == b' ')
        .ok_or("a durable notification without an id")?;
    let id: StreamId = std::str::from_utf8(&payload[..sp])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("a durable notification without a valid id")?;
    if id.ms > now_ms.saturating_add(FUTURE_SLACK_MS) {
        return Err(format!("a durable id from the future ({id})"));
    }
    Ok((Some(id), &payload[sp + 1..]))
}

pub struct RedisBroker {
    client: Client,
    sub: SubscriberClient,
    cluster: bool,
    sink: Arc<dyn Sink>,
    metrics: Arc<Metrics>,
    /// Serializes resubscribing with the node's own subscribe calls.
    resubscribing: tokio::sync::Mutex<()>,
    library: String,
    /// What this node's library would keep: history length, TTL (ms), largest envelope.
    settings: [i64; 3],
    /// Logged once: a newer library is loaded / the loaded one has other settings.
    newer_noted: AtomicBool,
    mismatch_noted: AtomicBool,
    /// The function library is loaded on the current command connection.
    library_loaded: AtomicBool,
    /// A subscriber connection came up at least once (the first is not a reconnection).
    connected_once: AtomicBool,
    max_bytes: usize,
    ping_channel: String,
    started: Instant,
    /// Milliseconds since `started` when the last self-ping arrived.
    last_ping: AtomicU64,
    up: AtomicBool,
    /// Bumped whenever messages may have been lost (see [`RedisBroker::live_epoch`]).
    epoch: AtomicU64,
    /// The subscriptions of the current epoch are all in place.
    whole: AtomicBool,
    /// Notified when `whole` turns true (the catch-up waits on it).
    whole_again: tokio::sync::Notify,
    tasks: crate::tasks::Tasks,
}

fn timeout_err(what: &str) -> BrokerError {
    BrokerError(format!(
        "Redis did not answer {what} within {COMMAND_TIMEOUT:?}"
    ))
}

async fn within<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, fred::error::Error>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(BrokerError(format!("{what}: {e}"))),
        Err(_) => Err(timeout_err(what)),
    }
}

impl RedisBroker {
    /// Creates both clients and starts the background tasks, then starts connecting without
    /// waiting: a Redis that is away at start-up (or later) is retried forever, and every time a
    /// connection comes up the library is loaded and every channel (with the self-ping)
    /// subscribed again. The node is ready only once its self-ping comes back with the library
    /// loaded. Only a malformed URL is an error. `url` is `HUB_REDIS_URL`; the CA file and the
    /// history settings come from `settings`.
    pub fn start(
        url: &str,
        settings: &crate::config::Config,
        node: &str,
        sink: Arc<dyn Sink>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<RedisBroker>> {
        let (history_len, history_ttl_secs, max_bytes) = (
            settings.history_len,
            settings.history_ttl_secs,
            settings.max_message_bytes,
        );
        let config = crate::redis_url::config(url, settings.redis_ca_file.as_deref())
            .map_err(anyhow::Error::msg)?;
        let cluster = config.server.is_clustered();
        let mut builder = Builder::from_config(config);
        builder
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .with_performance_config(|p| {
                p.broadcast_channel_capacity = COMMAND_CLIENT_BUFFER;
                p.default_command_timeout = COMMAND_TIMEOUT;
            })
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(5);
                c.internal_command_timeout = COMMAND_TIMEOUT;
            });
        let client = builder.build()?;
        builder.with_performance_config(|p| p.broadcast_channel_capacity = MESSAGE_BUFFER);
        let sub = builder.build_subscriber_client()?;
        let library = LIBRARY
            .replace("__VERSION__", &LIBRARY_VERSION.to_string())
            .replace("__MAXLEN__", &history_len.to_string())
            .replace("__TTL_MS__", &(history_ttl_secs * 1000).to_string())
            .replace("__MAX_BYTES__", &max_bytes.to_string())
            .replace(
                "__IDEM_MS__",
                &(settings.idempotency_secs * 1000).to_string(),
            )
            .replace("__CLUSTER__", if cluster { "true" } else { "false" });
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let broker = Arc::new(RedisBroker {
            client,
            sub,
            cluster,
            sink,
            metrics,
            resubscribing: tokio::sync::Mutex::new(()),
            library,
            settings: [
                history_len as i64,
                (history_ttl_secs * 1000) as i64,
                max_bytes as i64,
            ],
            newer_noted: AtomicBool::new(false),
            mismatch_noted: AtomicBool::new(false),
            library_loaded: AtomicBool::new(false),
            connected_once: AtomicBool::new(false),
            max_bytes: max_bytes as usize,
            ping_channel: if cluster {
                format!("hub:node:{{{node}.{tag}}}")
            } else {
                format!("hub:node:{node}.{tag}")
            },
            started: Instant::now(),
            last_ping: AtomicU64::new(0),
            up: AtomicBool::new(false),
            epoch: AtomicU64::new(1),
            whole: AtomicBool::new(false),
            whole_again: tokio::sync::Notify::new(),
            tasks: crate::tasks::Tasks::new(),
        });
        // The receivers are taken before connecting, so the first connection is seen too.
        let messages = broker.sub.message_rx();
        let sub_connected = broker.sub.reconnect_rx();
        let cmd_connected = broker.client.reconnect_rx();
        let errors = broker.client.error_rx();
        let tasks = &broker.tasks;
        tasks.spawn(log_errors(errors));
        tasks.spawn(broker.clone().receive_loop(messages, sub_connected));
        tasks.spawn(broker.clone().ping_loop());
        tasks.spawn(broker.clone().reload_loop(cmd_connected));
        if cluster {
            tasks.spawn(broker.clone().shard_loop());
        }
        tasks.keep(broker.client.connect().abort_handle());
        tasks.keep(broker.sub.connect().abort_handle());
        Ok(broker)
    }

    /// Stops the background tasks (the node is stopping).
    pub fn shutdown(&self) {
        self.tasks.stop();
    }

    /// See [`crate::broker::Broker::live_epoch`].
    pub fn live_epoch(&self) -> Option<u64> {
        let epoch = self.epoch.load(Ordering::Acquire);
        self.whole.load(Ordering::Acquire).then_some(epoch)
    }

    pub fn count_received(&self, source: Source) {
        self.metrics.received(source).increment(1);
    }

    /// The subscription is proven by a self-ping and the library is loaded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire) && self.library_loaded.load(Ordering::Acquire)
    }

    fn set_up(&self, up: bool) {
        if self.up.swap(up, Ordering::AcqRel) != up {
            self.metrics.redis_up.set(if up { 1.0 } else { 0.0 });
            if up {
                tracing::info!("Redis subscription is up");
            } else {
                tracing::warn!("Redis subscription is down");
            }
        }
    }

    async fn load_library(&self, replace: bool) -> Result<(), BrokerError> {
        if self.cluster {
            within(
                "FUNCTION LOAD",
                self.client
                    .function_load_cluster::<(), _>(replace, self.library.clone()),
            )
            .await
        } else {
            within(
                "FUNCTION LOAD",
                self.client
                    .function_load::<Value, _>(replace, self.library.clone()),
            )
            .await
            .map(|_| ())
        }
    }

    /// The loaded library: `None` if there is none; version 1 had no `hub_version`.
    async fn loaded_library(&self) -> Result<Option<LoadedLibrary>, BrokerError> {
        let answer: Result<Vec<i64>, BrokerError> = within(
            "FCALL_RO hub_version",
            self.client
                .fcall_ro("hub_version", Vec::<String>::new(), Vec::<String>::new()),
        )
        .await;
        match answer {
            Ok(v) => match v[..] {
                [version, max_len, ttl_ms, max_bytes, ..] => Ok(Some(LoadedLibrary {
                    version,
                    settings: [max_len, ttl_ms, max_bytes],
                })),
                _ => Err(BrokerError(
                    "hub_version answered something unexpected".into(),
                )),
            },
            Err(e) if e.0.to_ascii_lowercase().contains("function not found") => {
                let list: Value = within(
                    "FUNCTION LIST",
                    self.client.function_list(Some("hub"), false),
                )
                .await?;
                let exists = matches!(&list, Value::Array(a) if !a.is_empty());
                Ok(exists.then_some(LoadedLibrary {
                    version: 1,
                    settings: [0; 3],
                }))
            }
            Err(e) => Err(e),
        }
    }

    /// Makes sure a library of this version or a newer one is loaded: loads it when there is
    /// none, replaces an older one, keeps a newer one, and logs when the loaded one of the same
    /// version has other settings (they apply to every node; this one does not overwrite them).
    async fn ensure_library(&self) -> Result<(), BrokerError> {
        let ours = [self.settings[0], self.settings[1], self.settings[2]];
        for _ in 0..3 {
            match self.loaded_library().await? {
                None => match self.load_library(false).await {
                    Ok(()) => {
                        tracing::info!(version = LIBRARY_VERSION, "hub library loaded");
                        return Ok(());
                    }
                    // Another node loaded one meanwhile: look again.
                    Err(e) if e.0.contains("already exists") => continue,
                    Err(e) => return Err(e),
                },
                Some(l) if l.version < LIBRARY_VERSION => {
                    self.load_library(true).await?;
                    tracing::info!(
                        from = l.version,
                        to = LIBRARY_VERSION,
                        "hub library upgraded"
                    );
                    return Ok(());
                }
                Some(l) if l.version > LIBRARY_VERSION => {
                    if !self.newer_noted.swap(true, Ordering::AcqRel) {
                        tracing::info!(
                            loaded = l.version,
                            ours = LIBRARY_VERSION,
                            "a newer hub library is loaded; this node uses it"
                        );
                    }
                    return Ok(());
                }
                Some(l) => {
                    if l.settings != ours && !self.mismatch_noted.swap(true, Ordering::AcqRel) {
                        tracing::warn!(
                            loaded_history_len = l.settings[0],
                            loaded_ttl_ms = l.settings[1],
                            loaded_max_bytes = l.settings[2],
                            this_history_len = ours[0],
                            this_ttl_ms = ours[1],
                            this_max_bytes = ours[2],
                            "the hub library loaded in Redis has other settings than this node                              (HUB_HISTORY_LEN, HUB_HISTORY_TTL_SECS, HUB_MAX_MESSAGE_BYTES): the                              loaded ones apply to every node; to change them, run FUNCTION DELETE                              hub once every node has the new settings"
                        );
                    }
                    return Ok(());
                }
            }
        }
        Err(BrokerError(
            "the hub library kept changing while it was being loaded".into(),
        ))
    }

    fn live_name(&self, channel: &str) -> String {
        if self.cluster {
            format!("{LIVE_PREFIX}{{{channel}}}")
        } else {
            format!("{LIVE_PREFIX}{channel}")
        }
    }

    fn durable_name(&self, channel: &str) -> String {
        if self.cluster {
            format!("{DURABLE_PREFIX}{{{channel}}}")
        } else {
            format!("{DURABLE_PREFIX}{channel}")
        }
    }

    fn presence_name(&self, channel: &str) -> String {
        if self.cluster {
            format!("{PRESENCE_PREFIX}{{{channel}}}")
        } else {
            format!("{PRESENCE_PREFIX}{channel}")
        }
    }

    /// The pub/sub channels of each hub channel (live, durable, presence).
    fn names(&self, channels: &[ChannelName]) -> Vec<String> {
        channels
            .iter()
            .flat_map(|c| {
                [
                    self.live_name(c),
                    self.durable_name(c),
                    self.presence_name(c),
                ]
            })
            .collect()
    }

    /// The hub channel a pub/sub channel carries, and which of its pub/sub channels it is.
    fn channel_of(&self, pubsub: &str) -> Option<(ChannelName, Carries)> {
        let (rest, carries) = if let Some(rest) = pubsub.strip_prefix(DURABLE_PREFIX) {
            (rest, Carries::Durable)
        } else if let Some(rest) = pubsub.strip_prefix(PRESENCE_PREFIX) {
            (rest, Carries::Presence)
        } else {
            (pubsub.strip_prefix(LIVE_PREFIX)?, Carries::Live)
        };
        let name = if self.cluster {
            rest.strip_prefix('{')?.strip_suffix('}')?
        } else {
            rest
        };
        ChannelName::new(name).ok().map(|c| (c, carries))
    }

    async fn subscribe_raw(&self, names: &[String]) -> Result<(), BrokerError> {
        if names.is_empty() {
            return Ok(());
        }
        if self.cluster {
            // Shard channels of different slots cannot share one SSUBSCRIBE.
            for n in names {
                within("SSUBSCRIBE", self.sub.ssubscribe(n.clone())).await?;
            }
            Ok(())
        } else {
            for batch in names.chunks(SUBSCRIBE_BATCH) {
                within("SUBSCRIBE", self.sub.subscribe(batch.to_vec())).await?;
            }
            Ok(())
        }
    }

    /// Subscribes channels at Redis; returns once Redis confirmed, so that a history read that
    /// follows misses nothing published later.
    pub async fn subscribe(&self, channels: &[ChannelName]) -> Result<(), BrokerError> {
        self.subscribe_raw(&self.names(channels)).await
    }

    /// Unsubscribes a channel that lost its last local reader.
    pub async fn unsubscribe(&self, channel: &ChannelName) {
        let names = self.names(std::slice::from_ref(channel));
        let res = if self.cluster {
            within("SUNSUBSCRIBE", self.sub.sunsubscribe(names)).await
        } else {
            within("UNSUBSCRIBE", self.sub.unsubscribe(names)).await
        };
        if let Err(e) = res {
            // A reconnection subscribes only the channels that have readers, so nothing stays.
            tracing::debug!(channel = %channel, error = %e.0, "unsubscribe failed");
        }
    }

    /// Publishes: durable through `FCALL hub_publish` (with the idempotency `key`, checked by
    /// the caller), ephemeral with (S)PUBLISH.
    pub async fn publish(
        &self,
        channel: ChannelName,
        env: &Envelope,
        durable: bool,
        key: Option<&str>,
    ) -> Result<String, BrokerError> {
        let bytes = env.to_bytes();
        if durable {
            let mut args = vec![bytes];
            if let Some(k) = key {
                args.push(k.as_bytes().to_vec());
            }
            let id: String = within(
                "FCALL hub_publish",
                self.client
                    .fcall("hub_publish", vec![channel.to_string()], args),
            )
            .await?;
            Ok(id)
        } else {
            let name = self.live_name(&channel);
            if self.cluster {
                within("SPUBLISH", self.client.spublish::<i64, _, _>(name, bytes)).await?;
            } else {
                within("PUBLISH", self.client.publish::<i64, _, _>(name, bytes)).await?;
            }
            Ok(uuid::Uuid::now_v7().to_string())
        }
    }

    /// Where a stream that wants the last `n` messages starts, through `FCALL_RO hub_rewind`.
    pub async fn rewind_point(
        &self,
        channel: &ChannelName,
        n: usize,
    ) -> Result<StreamId, BrokerError> {
        let reply: String = within(
            "FCALL_RO hub_rewind",
            self.client
                .fcall_ro("hub_rewind", vec![channel.to_string()], vec![n.to_string()]),
        )
        .await?;
        reply
            .parse()
            .map_err(|_| BrokerError("hub_rewind answered something unexpected".into()))
    }

    /// At most `count` messages after `after` (`None`: only the tail and floor), through
    /// `FCALL_RO hub_read`.
    pub async fn read(
        &self,
        channel: &ChannelName,
        after: Option<StreamId>,
        count: usize,
    ) -> Result<Page, BrokerError> {
        let after = after.map(|s| s.to_string()).unwrap_or_default();
        let reply: Vec<Value> = within(
            "FCALL_RO hub_read",
            self.client.fcall_ro(
                "hub_read",
                vec![channel.to_string()],
                vec![after, count.to_string()],
            ),
        )
        .await?;
        let bad = || BrokerError("hub_read answered something unexpected".into());
        let id_at = |i: usize| -> Result<StreamId, BrokerError> {
            reply
                .get(i)
                .and_then(|v| v.as_str())
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)
        };
        let tail = id_at(0)?;
        let floor = id_at(1)?;
        let mut entries = Vec::with_capacity(reply.len().saturating_sub(2) / 2);
        let mut last = None;
        let now = Instant::now();
        for pair in reply[2..].chunks(2) {
            let [id, env] = pair else { return Err(bad()) };
            let id: StreamId = id.as_str().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
            last = Some(id);
            let bytes = env.as_bytes().ok_or_else(bad)?;
            match Envelope::parse(bytes, self.max_bytes) {
                Ok(e) => entries.push(Arc::new(Message::new(channel.clone(), Some(id), &e, now))),
                Err(e) => self.drop_malformed(channel, &e),
            }
        }
        Ok(Page {
            entries,
            tail,
            floor,
            more: count > 0 && reply.len() - 2 >= 2 * count && last.is_some_and(|l| l < tail),
            last,
        })
    }

    fn drop_malformed(&self, channel: &str, e: &EnvelopeError) {
        let reason = match e {
            EnvelopeError::TooLarge { .. } => DropReason::TooLarge,
            EnvelopeError::Malformed(_) => DropReason::Malformed,
        };
        self.metrics.dropped(reason).increment(1);
        tracing::warn!(channel, error = %e, "dropped a message from Redis");
    }

    /// One pub/sub message in, one fan-out out.
    fn on_message(&self, live: &str, payload: &[u8]) {
        if live == self.ping_channel {
            self.last_ping
                .store(self.started.elapsed().as_millis() as u64, Ordering::Release);
            // A ping that came back proves the subscription now, not only at the next tick
            // (a starting node is ready as soon as its first ping returns).
            self.set_up(self.sub.is_connected());
            return;
        }
        let Some((channel, carries)) = self.channel_of(live) else {
            self.metrics.dropped(DropReason::Malformed).increment(1);
            tracing::warn!(
                live,
                "dropped a message on a channel that is not a hub channel"
            );
            return;
        };
        if carries == Carries::Presence {
            return self.on_presence(channel, payload);
        }
        let durable = carries == Carries::Durable;
        if !durable && parse_durable(payload, u64::MAX).is_ok() {
            // The form "<id> <envelope>" that the library also sends on the live channel for
            // nodes of version 1; the durable channel carries it for this node. Whoever else
            // sends this form there cannot move a stream's position.
            return;
        }
        self.metrics.received(Source::Redis).increment(1);
        let (position, body) = if durable {
            match parse_durable(payload, crate::broker::local::now_ms()) {
                Ok(p) => p,
                Err(why) => return self.drop_malformed(&channel, &EnvelopeError::Malformed(why)),
            }
        } else {
            (None, payload)
        };
        match Envelope::parse(body, self.max_bytes) {
            Ok(env) => {
                let msg = Arc::new(Message::new(channel, position, &env, Instant::now()));
                self.sink.deliver(&msg);
            }
            Err(e) => self.drop_malformed(&channel, &e),
        }
    }

    /// `{"type":"join"|"leave","sub":"..."}` from `hub_presence`, to the readers that asked.
    fn on_presence(&self, channel: ChannelName, payload: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Ev {
            #[serde(rename = "type")]
            kind: String,
            sub: String,
        }
        match serde_json::from_slice::<Ev>(payload) {
            Ok(ev) if ev.kind == "join" || ev.kind == "leave" => {
                self.sink.presence(&Arc::new(crate::stream::PresenceEvent {
                    channel,
                    sub: Arc::from(ev.sub),
                    join: ev.kind == "join",
                }))
            }
            _ => {
                self.metrics.dropped(DropReason::Malformed).increment(1);
                tracing::warn!(channel = %channel, "dropped a presence event that is not one");
            }
        }
    }

    /// Sets this node's presence counts of one channel (`anonymous`: `None` if unchanged),
    /// through `FCALL hub_presence`; `join`/`leave` go out from the function.
    pub async fn presence_set(
        &self,
        channel: &str,
        node: &str,
        anonymous: Option<u32>,
        users: &[(Arc<str>, u32)],
    ) -> Result<(), BrokerError> {
        let mut args = Vec::with_capacity(2 + 2 * users.len());
        args.push(node.to_string());
        args.push(anonymous.map_or_else(|| "-".to_string(), |n| n.to_string()));
        for (u, n) in users {
            args.push(u.to_string());
            args.push(n.to_string());
        }
        let _: i64 = within(
            "FCALL hub_presence",
            self.client
                .fcall("hub_presence", vec![channel.to_string()], args),
        )
        .await?;
        within(
            "SADD",
            self.client
                .sadd::<i64, _, _>(presence_channels_key(node), channel.to_string()),
        )
        .await?;
        Ok(())
    }

    /// Renews this node's presence lease (`lease_ms`) and removes the counts of nodes whose
    /// lease ran out (their `leave`s go out from the function). Returns the nodes removed.
    pub async fn presence_lease(
        &self,
        node: &str,
        lease_ms: u64,
    ) -> Result<Vec<String>, BrokerError> {
        let dead: Vec<String> = within(
            "FCALL hub_presence_lease",
            self.client.fcall(
                "hub_presence_lease",
                vec![PRESENCE_NODES.to_string()],
                vec![node.to_string(), lease_ms.to_string()],
            ),
        )
        .await?;
        for d in &dead {
            self.presence_forget(d).await?;
        }
        Ok(dead)
    }

    /// Removes every count a node left (a dead node, or this one's from before a restart).
    pub async fn presence_forget(&self, node: &str) -> Result<(), BrokerError> {
        let key = presence_channels_key(node);
        let channels: Vec<String> = within("SMEMBERS", self.client.smembers(key.clone())).await?;
        for ch in channels {
            let _: i64 = within(
                "FCALL hub_presence_drop",
                self.client
                    .fcall("hub_presence_drop", vec![ch], vec![node.to_string()]),
            )
            .await?;
        }
        within("DEL", self.client.del::<i64, _>(key)).await?;
        within(
            "ZREM",
            self.client
                .zrem::<i64, _, _>(PRESENCE_NODES, node.to_string()),
        )
        .await?;
        Ok(())
    }

    /// A channel's users (streams per `sub`) and anonymous streams over every node.
    pub async fn presence_read(
        &self,
        channel: &str,
    ) -> Result<(Vec<(String, u64)>, u64), BrokerError> {
        let flat: Vec<String> = within(
            "FCALL_RO hub_presence_read",
            self.client.fcall_ro(
                "hub_presence_read",
                vec![channel.to_string()],
                Vec::<String>::new(),
            ),
        )
        .await?;
        let mut users = Vec::new();
        let mut anonymous = 0;
        for pair in flat.chunks(2) {
            let [field, n] = pair else { break };
            let n: u64 = n.parse().unwrap_or(0);
            match field.strip_prefix('=') {
                Some(sub) => users.push((sub.to_string(), n)),
                None => anonymous += n,
            }
        }
        Ok((users, anonymous))
    }

    /// Messages may have been lost: readers must check history before taking live messages
    /// again, and reads in flight cannot vouch for live delivery.
    fn lost_messages(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.sink.fall_behind();
    }

    /// Delivers pub/sub messages in the order they arrive. After a reconnection every reader
    /// falls behind before any message of the new connection is delivered (so none can jump a
    /// gap), and the channels are subscribed again beside this loop.
    async fn receive_loop(
        self: Arc<Self>,
        mut messages: tokio::sync::broadcast::Receiver<fred::types::Message>,
        mut reconnects: tokio::sync::broadcast::Receiver<fred::types::config::Server>,
    ) {
        loop {
            tokio::select! {
                biased;
                r = reconnects.recv() => {
                    match r {
                        Ok(server) => tracing::info!(%server, "subscriber connected; subscribing"),
                        Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => return,
                    }
                    if self.connected_once.swap(true, Ordering::AcqRel) {
                        self.metrics.redis_reconnects.increment(1);
                    }
                    self.set_up(false);
                    self.whole.store(false, Ordering::Release);
                    self.lost_messages();
                    let me = self.clone();
                    // Kept until it finishes: a later reconnection prunes it.
                    self.tasks.spawn(async move { me.resubscribe().await });
                }
                m = messages.recv() => match m {
                    Ok(m) => {
                        if let Some(bytes) = m.value.as_bytes() {
                            self.on_message(&m.channel, bytes);
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, "pub/sub messages were lost in a burst; readers catch up from history");
                        self.lost_messages();
                    }
                    Err(RecvError::Closed) => return,
                },
            }
        }
    }

    /// Subscribes every channel with local readers (and the self-ping) again after a
    /// reconnection, retrying until it succeeds or another reconnection takes over; then the
    /// subscriptions are whole again and readers that fell behind catch up.
    async fn resubscribe(&self) {
        let epoch = self.epoch.load(Ordering::Acquire);
        loop {
            let _one = self.resubscribing.lock().await;
            if self.epoch.load(Ordering::Acquire) != epoch {
                return; // a newer reconnection resubscribes
            }
            let mut names = self.names(&self.sink.channels());
            names.push(self.ping_channel.clone());
            match self.subscribe_raw(&names).await {
                Ok(()) => {
                    if self.epoch.load(Ordering::Acquire) == epoch {
                        self.set_whole();
                        // Readers that asked for history meanwhile were left behind: ask again.
                        self.sink.fall_behind();
                        tracing::info!(channels = (names.len() - 1) / 2, "resubscribed");
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e.0, "resubscribe failed; retrying");
                }
            }
            drop(_one);
            tokio::time::sleep(RESUBSCRIBE_RETRY).await;
        }
    }

    /// Cluster mode: re-issues shard subscriptions (a slot migration drops them silently)
    /// when the slot map changes (read every [`SLOT_CHECK_EVERY`]), and every
    /// [`SHARD_RESUBSCRIBE_EVERY`] in any case.
    ///
    /// Whatever was published to a dropped one is lost to this node, so every reader first
    /// starts checking its position against history (buffering live messages, so none jumps
    /// the gap), the subscriptions are re-issued, and once they are in place the catch-up reads
    /// what each reader may have missed: one shared read per channel.
    async fn shard_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SLOT_CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        // The slot map as of the last check (the subscriber's routing table when it connected,
        // before the first): fred may refresh its table by itself (a MOVED answer to a new
        // subscription) without moving the subscriptions made before.
        let mut seen: Option<String> = None;
        loop {
            tick.tick().await;
            if !self.is_up() {
                continue; // a reconnection resubscribes and checks everything anyway
            }
            let before = format!("{:?}", self.sub.cached_cluster_state());
            let reference = seen.take().unwrap_or(before);
            let moved = match self.sub.sync_cluster().await {
                Ok(()) => {
                    let now = format!("{:?}", self.sub.cached_cluster_state());
                    let moved = now != reference;
                    seen = Some(now);
                    moved
                }
                Err(e) => {
                    tracing::debug!(error = %e, "reading the cluster's slot map failed");
                    seen = Some(reference);
                    false
                }
            };
            if !moved && last.elapsed() < SHARD_RESUBSCRIBE_EVERY {
                continue;
            }
            if moved {
                tracing::info!("the cluster's slot map changed: re-issuing shard subscriptions");
            }
            last = Instant::now();
            let _one = self.resubscribing.lock().await;
            self.whole.store(false, Ordering::Release);
            self.lost_messages();
            let names = self.names(&self.sink.channels());
            if let Err(e) = self.subscribe_raw(&names).await {
                tracing::warn!(error = %e.0, "re-issuing shard subscriptions failed");
            }
            self.set_whole();
        }
    }

    /// The subscriptions of the current epoch are in place again.
    fn set_whole(&self) {
        self.whole.store(true, Ordering::Release);
        self.whole_again.notify_waiters();
    }

    /// Resolves once the subscriptions are whole (at once if they are), or after `limit`.
    pub async fn wait_whole(&self, limit: Duration) {
        let again = self.whole_again.notified();
        tokio::pin!(again);
        again.as_mut().enable();
        if self.whole.load(Ordering::Acquire) {
            return;
        }
        let _ = tokio::time::timeout(limit, again).await;
    }

    /// Publishes a ping to itself every second; declares the subscription down (and forces a
    /// reconnection) when none came back for `PING_DEADLINE`.
    async fn ping_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(PING_EVERY);
        let mut forced_at: Option<Instant> = None;
        let mut waiting_since = Instant::now();
        loop {
            tick.tick().await;
            let ping = if self.cluster {
                self.client
                    .spublish::<i64, _, _>(self.ping_channel.clone(), "ping")
                    .await
            } else {
                self.client
                    .publish::<i64, _, _>(self.ping_channel.clone(), "ping")
                    .await
            };
            if let Err(e) = ping {
                tracing::debug!(error = %e, "ping publish failed");
            }
            let now = self.started.elapsed().as_millis() as u64;
            // Before the first ping arrives, the age counts from start-up.
            let last = self.last_ping.load(Ordering::Acquire);
            let age = Duration::from_millis(now.saturating_sub(last));
            let fresh = age < PING_DEADLINE;
            self.set_up(fresh && last > 0 && self.sub.is_connected());
            if !self.is_up() && waiting_since.elapsed() >= WAITING_LOG_EVERY {
                waiting_since = Instant::now();
                tracing::warn!("Redis does not answer (or the hub functions are not loaded): this node is not ready");
            }
            if self.is_up() {
                waiting_since = Instant::now();
            }
            if !fresh
                && self.sub.is_connected()
                && forced_at.is_none_or(|t| t.elapsed() > PING_DEADLINE)
            {
                tracing::warn!(silent_for = ?age, "the subscription delivers nothing; reconnecting it");
                forced_at = Some(Instant::now());
                if let Err(e) = self.sub.force_reconnection().await {
                    tracing::warn!(error = %e, "forced reconnection failed");
                }
            }
        }
    }

    /// Reloads the function library whenever the command connection comes back (a restarted
    /// or failed-over Redis may have lost it).
    async fn reload_loop(
        self: Arc<Self>,
        mut connected: tokio::sync::broadcast::Receiver<fred::types::config::Server>,
    ) {
        let mut check = tokio::time::interval(LIBRARY_CHECK_EVERY);
        loop {
            tokio::select! {
                r = connected.recv() => match r {
                    Ok(_) | Err(RecvError::Lagged(_)) => {
                        // A new connection: a restarted or failed-over Redis may have lost it.
                        self.library_loaded.store(false, Ordering::Release);
                        while let Err(e) = self.ensure_library().await {
                            tracing::warn!(error = %e.0, "loading the hub functions failed; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        self.library_loaded.store(true, Ordering::Release);
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = check.tick(), if self.library_loaded.load(Ordering::Acquire) => {
                    // A node of version 1 replaces whatever is loaded when it starts.
                    if let Err(e) = self.ensure_library().await {
                        tracing::debug!(error = %e.0, "checking the hub library failed");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_notifications_need_a_plausible_id() {
        let now = 1_800_000_000_000;
        let (id, body) = parse_durable(b"1799999999999-3 {\"data\":1}", now).unwrap();
        assert_eq!(
            (id, body),
            (
                Some(StreamId::new(1_799_999_999_999, 3)),
                &b"{\"data\":1}"[..]
            )
        );
        assert!(
            parse_durable(b"99999999999999-0 {\"data\":1}", now).is_err(),
            "far future"
        );
        assert!(parse_durable(b"{\"data\":1}", now).is_err());
        assert!(parse_durable(b"12x-0 {}", now).is_err());
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(10_000))]

            /// Any payload on a durable channel is a notification or a counted drop, never a
            /// panic; an accepted id is never far ahead of now, and the body is what followed.
            #[test]
            fn any_payload_is_a_notification_or_a_drop(
                payload in proptest::collection::vec(any::<u8>(), 0..64),
                now in 0u64..4_000_000_000_000,
            ) {
                if let Ok((Some(id), body)) = parse_durable(&payload, now) {
                    prop_assert!(id.ms <= now + FUTURE_SLACK_MS);
                    prop_assert!(payload.ends_with(body));
                }
            }

            #[test]
            fn plausible_ids_are_kept(
                ms in 0u64..1_800_000_000_000,
                seq in any::<u64>(),
                body in "\\PC{0,40}",
            ) {
                let payload = format!("{ms}-{seq} {body}");
                let (id, rest) = parse_durable(payload.as_bytes(), 1_800_000_000_000).unwrap();
                prop_assert_eq!(id, Some(StreamId::new(ms, seq)));
                prop_assert_eq!(rest, body.as_bytes());
            }
        }
    }
}
