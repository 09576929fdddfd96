//! The Redis broker: fan-out across nodes through Redis pub/sub, history in Redis Streams.
//!
//! It loads the `hub` function library, subscribes the channels the node asks for, turns
//! pub/sub messages into deliveries to the node's [`Sink`], watches its own subscription with a
//! self-ping, and answers bounded history reads. When it may have lost messages (a reconnection,
//! a burst it could not keep up with) it tells the sink that every reader fell behind, so that
//! readers check their positions against history; it never reads history itself for them, so
//! the receive loop (and the self-ping it carries) never waits on a read.
//!
//! Here: connecting, names, subscribing, publishing, reading. `library`: the function
//! library's loading; `presence`: counts, leases and users over Redis; `watch`: the receive
//! loop, resubscribing and the self-ping; `webhooks`: the webhook events' stream.

mod control;
mod library;
mod presence;
mod status;
mod watch;
mod webhooks;

pub use control::{ControlHandler, Heard, CONTROL_CHANNEL, REVOKED_KEY};
pub use webhooks::WEBHOOK_STREAM;

use library::{LIBRARY, LIBRARY_VERSION};

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

/// Prefix of live channels (`hub:ch:<channel>`, or `hub:ch:{<channel>}` in cluster mode):
/// ephemeral publishes.
pub const LIVE_PREFIX: &str = "hub:ch:";
/// Prefix of the channels only `hub_publish` publishes on: durable notifications.
pub const DURABLE_PREFIX: &str = "hub:dur:";
/// Prefix of presence channels (`hub:pres:<channel>`): `join`/`leave` from `hub_presence`.
pub const PRESENCE_PREFIX: &str = "hub:pres:";

/// Which of a hub channel's pub/sub channels a message came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carries {
    Live,
    Durable,
    Presence,
}

/// A durable id further ahead of this node's clock than this cannot have come from history
/// (Redis's clock makes the ids): it is dropped and counted.
const FUTURE_SLACK_MS: u64 = 3_600_000;
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
    /// What this node's library would keep: history length, TTL (ms), largest envelope, and
    /// the hash of its namespaces.
    settings: [i64; 4],
    /// The library loaded in Redis has other namespaces than this node's (logged once).
    namespaces_differ: AtomicBool,
    ns_mismatch_noted: AtomicBool,
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
    /// Who handles control messages and revocation reads (the node, set once it is built).
    control: std::sync::OnceLock<std::sync::Weak<dyn ControlHandler>>,
    /// The revocations were read since the last (re)connection: until then the node admits
    /// nobody (a token revoked while it was away must not pass).
    revocations_read: AtomicBool,
    /// `HUB_WEBHOOK_URL` is set: the webhook stream is created at every (re)connection.
    webhooks: bool,
}

fn timeout_err(what: &str) -> BrokerError {
    BrokerError::Timeout {
        what: what.to_string(),
        after: COMMAND_TIMEOUT,
    }
}

/// Sorts a client error: an error reply from Redis (its first word an error code in capitals,
/// `ERR`, `WRONGTYPE`, `NOSCRIPT`...: fred keeps only the text for most of them) is `Refused`;
/// anything else (connection, I/O, the client's own limits) is `Failed`.
fn client_err(what: &str, e: &fred::error::Error) -> BrokerError {
    use fred::error::ErrorKind;
    let reply = e.details();
    let code = reply.split_whitespace().next().unwrap_or("");
    let is_reply = matches!(
        e.kind(),
        ErrorKind::Unknown | ErrorKind::InvalidArgument | ErrorKind::InvalidCommand
    ) && code.len() >= 3
        && code.bytes().all(|b| b.is_ascii_uppercase());
    if is_reply {
        BrokerError::Refused {
            what: what.to_string(),
            reply: reply.to_string(),
        }
    } else {
        BrokerError::Failed {
            what: what.to_string(),
            error: e.to_string(),
        }
    }
}

async fn within<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, fred::error::Error>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(client_err(what, &e)),
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
        let (ns_table, ns_hash) = settings.namespaces.lua_table(history_len, history_ttl_secs);
        let library = library
            .replace("__NAMESPACES__", &ns_table)
            .replace("__NS_HASH__", &ns_hash.to_string())
            .replace("__WH_MAX__", &settings.webhook_max_pending.to_string());
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
                i64::from(ns_hash),
            ],
            namespaces_differ: AtomicBool::new(false),
            ns_mismatch_noted: AtomicBool::new(false),
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
            control: std::sync::OnceLock::new(),
            revocations_read: AtomicBool::new(false),
            webhooks: settings.webhook_url.is_some(),
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

    /// Whether the library loaded in Redis has other namespaces than this node's.
    pub fn namespaces_differ(&self) -> bool {
        self.namespaces_differ.load(Ordering::Acquire)
    }

    /// The subscription is proven by a self-ping, the library is loaded and the revocations
    /// were read since the subscription came up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
            && self.library_loaded.load(Ordering::Acquire)
            && self.revocations_read.load(Ordering::Acquire)
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
            tracing::debug!(channel = %channel, error = %e, "unsubscribe failed");
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
            .map_err(|_| BrokerError::Unexpected("hub_rewind answered something unexpected".into()))
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
        let bad = || BrokerError::Unexpected("hub_read answered something unexpected".into());
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
        if live == CONTROL_CHANNEL {
            return self.on_control(payload);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_replies_are_refusals_and_the_rest_failures() {
        use fred::error::{Error, ErrorKind};
        let e = client_err(
            "FCALL_RO hub_version",
            &Error::new(ErrorKind::Unknown, "ERR Function not found"),
        );
        assert!(e.answered() && e.says("function NOT found"), "{e:?}");
        let e = client_err(
            "XRANGE",
            &Error::new(
                ErrorKind::InvalidArgument,
                "WRONGTYPE Operation against a key holding the wrong kind of value",
            ),
        );
        assert!(e.answered() && !e.says("function not found"), "{e:?}");
        for (kind, text) in [
            (ErrorKind::IO, "Connection reset by peer"),
            (ErrorKind::Canceled, "Canceled."),
            (ErrorKind::Unknown, "Connection closed"),
        ] {
            let e = client_err("PUBLISH", &Error::new(kind, text));
            assert!(!e.answered() && !e.says("connection"), "{e:?}");
        }
        assert!(!timeout_err("PING").answered());
    }

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
