//! The embedded broker: single-node publish straight into the sink, with in-memory history and
//! the idempotency keys of recent durable publishes.
//!
//! Durable messages get their position and are delivered under the channel's history lock, so
//! every stream sees a channel in position order, and a history read never interleaves with a
//! delivery. It keeps nothing per stream.

use super::history::MemoryHistory;
use crate::broker::{Page, Sink};
use crate::message::Message;
use crate::metrics::{Metrics, Source};
use parking_lot::Mutex;
use protocol::{ChannelName, Envelope, StreamId};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Idempotency keys remembered at most (about 200 bytes each: 20 MB). Beyond it the oldest are
/// forgotten before their time (logged): a node that takes more than this many keyed publishes
/// within `HUB_IDEMPOTENCY_SECS` should use Redis, where keys cost Redis memory instead.
const MAX_KEYS: usize = 100_000;

/// Keys of recent durable publishes: (channel, key) -> the first id, with expiry order.
#[derive(Default)]
struct Keys {
    ids: HashMap<(Arc<str>, Box<str>), String>,
    /// (expiry ms, channel, key), oldest first: expiries only grow (one window for all).
    order: VecDeque<(u64, Arc<str>, Box<str>)>,
}

pub struct LocalBroker {
    history: MemoryHistory,
    keys: Mutex<Keys>,
    key_ms: u64,
    sink: Arc<dyn Sink>,
    metrics: Arc<Metrics>,
}

impl LocalBroker {
    pub fn new(
        sink: Arc<dyn Sink>,
        metrics: Arc<Metrics>,
        history_len: usize,
        history_ttl_secs: u64,
        idempotency_secs: u64,
    ) -> LocalBroker {
        LocalBroker::with_namespaces(
            sink,
            metrics,
            history_len,
            history_ttl_secs,
            idempotency_secs,
            Default::default(),
        )
    }

    /// [`LocalBroker::new`] whose history follows the namespaces' `history_len` and
    /// `history_ttl_secs`.
    pub fn with_namespaces(
        sink: Arc<dyn Sink>,
        metrics: Arc<Metrics>,
        history_len: usize,
        history_ttl_secs: u64,
        idempotency_secs: u64,
        namespaces: crate::namespaces::Namespaces,
    ) -> LocalBroker {
        LocalBroker {
            history: MemoryHistory::with_namespaces(
                history_len,
                history_ttl_secs,
                now_ms(),
                namespaces,
            ),
            keys: Mutex::new(Keys::default()),
            key_ms: idempotency_secs * 1000,
            sink,
            metrics,
        }
    }

    /// Publishes; a durable message with an idempotency `key` (checked by the caller) already
    /// used on the channel within the window returns the first id and publishes nothing. The
    /// key check and the append happen under one lock, so two publishes with one key cannot
    /// both pass.
    pub fn publish(
        &self,
        channel: ChannelName,
        env: &Envelope,
        durable: bool,
        source: Source,
        key: Option<&str>,
    ) -> String {
        let received = Instant::now();
        self.metrics.received(source).increment(1);
        if !durable {
            let msg = Arc::new(Message::new(channel, None, env, received));
            self.sink.deliver(&msg);
            return msg.id.to_string();
        }
        let now = now_ms();
        let mut keys = key.map(|_| self.keys.lock());
        if let (Some(keys), Some(k)) = (keys.as_mut(), key) {
            keys.expire(now);
            if let Some(first) = keys.ids.get(&(channel.as_arc().clone(), Box::from(k))) {
                return first.clone();
            }
        }
        let (id, _) = self.history.append(
            &channel,
            now,
            |id| Arc::new(Message::new(channel.clone(), Some(id), env, received)),
            |msg| self.sink.deliver(msg),
        );
        let id = id.to_string();
        if let (Some(keys), Some(k)) = (keys.as_mut(), key) {
            keys.remember(channel.as_arc().clone(), k, id.clone(), now + self.key_ms);
        }
        id
    }

    pub fn sweep_keys(&self) {
        self.keys.lock().expire(now_ms());
    }

    pub fn tail(&self, channel: &ChannelName) -> StreamId {
        self.history.tail(channel, now_ms())
    }

    pub fn rewind_point(&self, channel: &ChannelName, n: usize) -> StreamId {
        self.history.rewind_point(channel, n, now_ms())
    }

    pub fn read(&self, channel: &ChannelName, after: StreamId, count: usize) -> Page {
        self.history.read(channel, after, count, now_ms())
    }

    pub fn sweep(&self) {
        self.history.expire(now_ms());
    }
}

impl Keys {
    fn expire(&mut self, now: u64) {
        while self.order.front().is_some_and(|(at, _, _)| *at <= now) {
            if let Some((_, ch, k)) = self.order.pop_front() {
                self.ids.remove(&(ch, k));
            }
        }
    }

    fn remember(&mut self, channel: Arc<str>, key: &str, id: String, expires: u64) {
        if self.order.len() >= MAX_KEYS {
            if let Some((_, ch, k)) = self.order.pop_front() {
                self.ids.remove(&(ch, k));
                tracing::warn!(
                    max = MAX_KEYS,
                    "too many idempotency keys within HUB_IDEMPOTENCY_SECS: the oldest is forgotten early"
                );
            }
        }
        let key: Box<str> = Box::from(key);
        self.ids.insert((channel.clone(), key.clone()), id);
        self.order.push_back((expires, channel, key));
    }
}
