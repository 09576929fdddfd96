//! The Redis broker: fan-out across nodes through Redis pub/sub, history in Redis Streams.
//!
//! It loads the `hub` function library, subscribes each channel while it has local streams,
//! turns pub/sub messages into fan-outs, watches its own subscription with a self-ping, and
//! after every reconnection resubscribes and backfills from history so streams miss no durable
//! message. It never writes to streams directly; the registry does.

use crate::broker::BrokerError;
use crate::history::Recovery;
use crate::message::Message;
use crate::metrics::{DropReason, Metrics, Source};
use crate::registry::Registry;
use fred::clients::SubscriberClient;
use fred::interfaces::{ClientLike, EventInterface, FunctionInterface, PubsubInterface};
use fred::prelude::{Builder, Client, Config as FredConfig, ReconnectPolicy};
use fred::types::Value;
use protocol::{ChannelName, Envelope, EnvelopeError, StreamId};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, Mutex};

/// The function library, with `__PLACEHOLDERS__` for the configuration.
const LIBRARY: &str = include_str!("hub.lua");
/// Prefix of live channels (`hub:ch:<channel>`, or `hub:ch:{<channel>}` in cluster mode).
pub const LIVE_PREFIX: &str = "hub:ch:";
/// How often the node pings itself through its subscription.
const PING_EVERY: Duration = Duration::from_secs(1);
/// A subscription that delivered no ping for this long is considered dead and reconnected.
const PING_DEADLINE: Duration = Duration::from_secs(5);
/// Longest wait for a Redis command before the caller gets a 503.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Pub/sub messages buffered between the connection and the fan-out task. A burst beyond it
/// is noticed (`Lagged`) and repaired from history.
const MESSAGE_BUFFER: usize = 65_536;
/// Channels per SUBSCRIBE command when resubscribing many.
const SUBSCRIBE_BATCH: usize = 500;
/// Cluster mode: shard subscriptions are re-issued this often, since Redis drops them when a
/// slot migrates and the client does not move them.
const SHARD_RESUBSCRIBE_EVERY: Duration = Duration::from_secs(30);

pub struct RedisBroker {
    client: Client,
    sub: SubscriberClient,
    cluster: bool,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// Channels subscribed at Redis. The lock also orders SUBSCRIBE and UNSUBSCRIBE of a
    /// channel, so an unsubscribe decided just before a new stream arrives cannot win.
    subscribed: Mutex<HashSet<ChannelName>>,
    library: String,
    max_bytes: usize,
    ping_channel: String,
    started: Instant,
    /// Milliseconds since `started` when the last self-ping arrived.
    last_ping: AtomicU64,
    up: AtomicBool,
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
    /// Connects both clients, loads the function library and starts the pub/sub self-ping.
    pub async fn connect(
        url: &str,
        node: &str,
        registry: Arc<Registry>,
        history_len: u64,
        history_ttl_secs: u64,
        max_bytes: u64,
    ) -> anyhow::Result<Arc<RedisBroker>> {
        let config =
            FredConfig::from_url(url).map_err(|e| anyhow::anyhow!("HUB_REDIS_URL: {e}"))?;
        let cluster = config.server.is_clustered();
        let mut builder = Builder::from_config(config);
        builder
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .with_performance_config(|p| {
                p.broadcast_channel_capacity = MESSAGE_BUFFER;
                p.default_command_timeout = COMMAND_TIMEOUT;
            })
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(5);
                c.internal_command_timeout = COMMAND_TIMEOUT;
            });
        let client = builder.build()?;
        let sub = builder.build_subscriber_client()?;
        for (what, c) in [
            ("commands", client.clone()),
            ("subscriber", sub.to_client()),
        ] {
            match tokio::time::timeout(Duration::from_secs(10), c.init()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => anyhow::bail!("HUB_REDIS_URL: cannot connect the {what} client: {e}"),
                Err(_) => anyhow::bail!(
                    "HUB_REDIS_URL: no connection to Redis within 10 s ({what} client)"
                ),
            }
        }
        let library = LIBRARY
            .replace("__MAXLEN__", &history_len.to_string())
            .replace("__TTL_MS__", &(history_ttl_secs * 1000).to_string())
            .replace("__MAX_BYTES__", &max_bytes.to_string())
            .replace("__CLUSTER__", if cluster { "true" } else { "false" });
        let metrics = registry.metrics.clone();
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let broker = Arc::new(RedisBroker {
            client,
            sub,
            cluster,
            registry,
            metrics,
            subscribed: Mutex::new(HashSet::new()),
            library,
            max_bytes: max_bytes as usize,
            ping_channel: if cluster {
                format!("hub:node:{{{node}.{tag}}}")
            } else {
                format!("hub:node:{node}.{tag}")
            },
            started: Instant::now(),
            last_ping: AtomicU64::new(0),
            up: AtomicBool::new(false),
        });
        broker.load_functions().await.map_err(|e| {
            anyhow::anyhow!("HUB_REDIS_URL: cannot load the hub functions: {}", e.0)
        })?;
        broker
            .subscribe_raw(std::slice::from_ref(&broker.ping_channel))
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.0))?;
        Ok(broker)
    }

    /// Starts the background tasks: fan-out of pub/sub messages (with resubscribe and
    /// backfill after reconnects), the self-ping, unsubscribing emptied channels, and
    /// reloading functions when the command connection comes back.
    pub fn spawn(self: &Arc<Self>, emptied: mpsc::UnboundedReceiver<ChannelName>) {
        tokio::spawn(self.clone().receive_loop());
        tokio::spawn(self.clone().ping_loop());
        tokio::spawn(self.clone().unsubscribe_loop(emptied));
        tokio::spawn(self.clone().reload_loop());
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn count_received(&self, source: Source) {
        self.metrics.received(source).increment(1);
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
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

    async fn load_functions(&self) -> Result<(), BrokerError> {
        if self.cluster {
            within(
                "FUNCTION LOAD",
                self.client
                    .function_load_cluster::<(), _>(true, self.library.clone()),
            )
            .await
        } else {
            within(
                "FUNCTION LOAD",
                self.client
                    .function_load::<Value, _>(true, self.library.clone()),
            )
            .await
            .map(|_| ())
        }
    }

    fn live_name(&self, channel: &str) -> String {
        if self.cluster {
            format!("{LIVE_PREFIX}{{{channel}}}")
        } else {
            format!("{LIVE_PREFIX}{channel}")
        }
    }

    /// The hub channel a live pub/sub channel carries.
    fn channel_of(&self, live: &str) -> Option<ChannelName> {
        let rest = live.strip_prefix(LIVE_PREFIX)?;
        let name = if self.cluster {
            rest.strip_prefix('{')?.strip_suffix('}')?
        } else {
            rest
        };
        ChannelName::new(name).ok()
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

    /// Makes sure every channel is subscribed at Redis before returning, so that a stream's
    /// history read that follows misses nothing published later.
    pub async fn subscribe(&self, channels: &[ChannelName]) -> Result<(), BrokerError> {
        let mut subscribed = self.subscribed.lock().await;
        let missing: Vec<ChannelName> = channels
            .iter()
            .filter(|c| !subscribed.contains(*c))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = missing.iter().map(|c| self.live_name(c)).collect();
        self.subscribe_raw(&names).await?;
        subscribed.extend(missing);
        Ok(())
    }

    async fn unsubscribe_loop(self: Arc<Self>, mut emptied: mpsc::UnboundedReceiver<ChannelName>) {
        while let Some(ch) = emptied.recv().await {
            let mut subscribed = self.subscribed.lock().await;
            if self.registry.has_subscribers(&ch) || !subscribed.remove(&ch) {
                continue;
            }
            let name = self.live_name(&ch);
            let res = if self.cluster {
                within("SUNSUBSCRIBE", self.sub.sunsubscribe(name)).await
            } else {
                within("UNSUBSCRIBE", self.sub.unsubscribe(name)).await
            };
            if let Err(e) = res {
                // Not tracked any more, so a reconnection will not bring it back.
                tracing::debug!(channel = %ch, error = %e.0, "unsubscribe failed");
            }
        }
    }

    /// Publishes: durable through `FCALL hub_publish`, ephemeral with (S)PUBLISH.
    pub async fn publish(
        &self,
        channel: ChannelName,
        env: &Envelope,
        durable: bool,
    ) -> Result<String, BrokerError> {
        let bytes = env.to_bytes();
        if durable {
            let id: String = within(
                "FCALL hub_publish",
                self.client
                    .fcall("hub_publish", vec![channel.to_string()], vec![bytes]),
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

    /// Reads what a stream at `since` (or fresh) must be sent, through `FCALL_RO hub_recover`.
    pub async fn recover(
        &self,
        channel: &ChannelName,
        since: Option<StreamId>,
    ) -> Result<Recovery, BrokerError> {
        let arg = since.map(|s| s.to_string()).unwrap_or_default();
        let reply: Vec<Value> = within(
            "FCALL_RO hub_recover",
            self.client
                .fcall_ro("hub_recover", vec![channel.to_string()], vec![arg]),
        )
        .await?;
        let bad = || BrokerError("hub_recover answered something unexpected".into());
        let tail: StreamId = reply
            .first()
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        let reset = reply.get(1).and_then(Value::as_i64).ok_or_else(bad)? == 1;
        let mut replay = Vec::new();
        let now = Instant::now();
        for pair in reply[2..].chunks(2) {
            let [id, env] = pair else { return Err(bad()) };
            let id: StreamId = id.as_str().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
            let bytes = env.as_bytes().ok_or_else(bad)?;
            match Envelope::parse(bytes, self.max_bytes) {
                Ok(e) => replay.push(Arc::new(Message::new(channel.clone(), Some(id), &e, now))),
                Err(e) => self.drop_malformed(channel, &e),
            }
        }
        Ok(Recovery {
            tail,
            replay,
            reset,
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
        let Some(channel) = self.channel_of(live) else {
            self.metrics.dropped(DropReason::Malformed).increment(1);
            tracing::warn!(
                live,
                "dropped a message on a channel that is not a hub channel"
            );
            return;
        };
        self.metrics.received(Source::Redis).increment(1);
        // Durable: "<ms>-<seq> <envelope>"; ephemeral: the envelope (a JSON object).
        let (position, body) = match payload.first() {
            Some(b) if b.is_ascii_digit() => {
                let parsed = payload.iter().position(|&b| b == b' ').and_then(|sp| {
                    std::str::from_utf8(&payload[..sp])
                        .ok()
                        .and_then(|s| s.parse::<StreamId>().ok())
                        .map(|id| (id, &payload[sp + 1..]))
                });
                match parsed {
                    Some((id, body)) => (Some(id), body),
                    None => {
                        self.drop_malformed(
                            &channel,
                            &EnvelopeError::Malformed(
                                "a durable message without a valid id".into(),
                            ),
                        );
                        return;
                    }
                }
            }
            _ => (None, payload),
        };
        match Envelope::parse(body, self.max_bytes) {
            Ok(env) => {
                let msg = Arc::new(Message::new(channel, position, &env, Instant::now()));
                self.registry.fanout(&msg);
            }
            Err(e) => self.drop_malformed(&channel, &e),
        }
    }

    /// Fans pub/sub messages out, and after a reconnection (or a lost burst) resubscribes and
    /// backfills before handling further messages, so that live ones never overtake history.
    async fn receive_loop(self: Arc<Self>) {
        let mut messages = self.sub.message_rx();
        let mut reconnects = self.sub.reconnect_rx();
        let mut shard_tick = tokio::time::interval(SHARD_RESUBSCRIBE_EVERY);
        shard_tick.tick().await;
        loop {
            tokio::select! {
                biased;
                r = reconnects.recv() => {
                    match r {
                        Ok(server) => tracing::info!(%server, "subscriber reconnected; resubscribing and backfilling"),
                        Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => return,
                    }
                    self.metrics.redis_reconnects.increment(1);
                    self.set_up(false);
                    self.repair(true).await;
                }
                m = messages.recv() => match m {
                    Ok(m) => {
                        if let Some(bytes) = m.value.as_bytes() {
                            self.on_message(&m.channel, bytes);
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, "pub/sub messages were lost in a burst; backfilling from history");
                        self.repair(false).await;
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = shard_tick.tick(), if self.cluster => {
                    let names: Vec<String> = self.subscribed.lock().await.iter().map(|c| self.live_name(c)).collect();
                    if let Err(e) = self.subscribe_raw(&names).await {
                        tracing::warn!(error = %e.0, "re-issuing shard subscriptions failed");
                    }
                }
            }
        }
    }

    /// Resubscribes (after a reconnection) and backfills every subscribed channel from the
    /// oldest position its local streams hold; streams skip what they already have.
    async fn repair(&self, resubscribe: bool) {
        loop {
            let mut names: Vec<String> = self
                .subscribed
                .lock()
                .await
                .iter()
                .map(|c| self.live_name(c))
                .collect();
            if resubscribe {
                names.push(self.ping_channel.clone());
                if let Err(e) = self.subscribe_raw(&names).await {
                    tracing::warn!(error = %e.0, "resubscribe failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
            break;
        }
        let channels: Vec<ChannelName> = self.subscribed.lock().await.iter().cloned().collect();
        let mut replayed = 0u64;
        for ch in channels {
            let Some(from) = self.registry.min_position(&ch) else {
                continue;
            };
            let rec = loop {
                match self.recover(&ch, Some(from)).await {
                    Ok(r) => break r,
                    Err(e) => {
                        tracing::warn!(channel = %ch, error = %e.0, "backfill failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            };
            if rec.reset {
                tracing::warn!(channel = %ch, "history no longer reaches back to what streams hold; resetting them");
                self.registry.reset_channel(&ch, rec.tail);
                continue;
            }
            for msg in &rec.replay {
                replayed += self.registry.fanout(msg) as u64;
            }
        }
        self.metrics.history_replayed.increment(replayed);
        if replayed > 0 {
            tracing::info!(replayed, "backfilled streams from history");
        }
    }

    /// Publishes a ping to itself every second; declares the subscription down (and forces a
    /// reconnection) when none came back for `PING_DEADLINE`.
    async fn ping_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(PING_EVERY);
        let mut forced_at: Option<Instant> = None;
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
    async fn reload_loop(self: Arc<Self>) {
        let mut reconnects = self.client.reconnect_rx();
        loop {
            match reconnects.recv().await {
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            }
            while let Err(e) = self.load_functions().await {
                tracing::warn!(error = %e.0, "reloading the hub functions failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            tracing::info!("hub functions reloaded");
        }
    }
}
