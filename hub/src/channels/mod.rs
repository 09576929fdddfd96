//! The node's local registry: which streams are open and which channels each one reads.
//! `admission` holds the limits, `fanout` offers a message to a channel's readers,
//! `tick` keeps the coarse clock and finds what is due, `presence` keeps each channel's
//! users and log of joins and leaves ([`presence_log`]) under the channel's lock.
//!
//! It admits streams against the node and per-user limits, fans a message out to the local
//! readers of its channel, closes streams exactly once (keeping every count exact), counts each
//! channel's streams per user and keeps its log of joins and leaves for its observers
//! (presence), and finds the streams whose heartbeat, token or silence is due. It does no I/O
//! of its own (a session may write its socket through its transport's sink when offered a
//! message) and never talks to a broker or a transport: it reports which channels gained their first or
//! lost their last local reader, and which need their users read, and the node acts on that.

mod admission;
pub mod conflate;
mod fanout;
mod lanes;
mod presence;
pub mod presence_log;
mod tick;

pub use presence::PresenceCount;
pub use tick::{CoarseClock, Due};

use crate::broker::Sink;
use crate::channels::presence_log::PresenceLog;
use crate::domain::{CloseReason, Transport};
use crate::message::Message;
use crate::metrics::{DropReason, Metrics};
use crate::revocations::TokenId;
use crate::stream::{PresenceEvent, Session};
use parking_lot::Mutex;
use presence::{PresenceKey, Seed};
use protocol::ChannelName;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Lock shards: enough that two cores rarely meet on one, few enough to sweep cheaply.
const SHARDS: usize = 64;

/// A channel with local readers.
#[derive(Default)]
struct Channel {
    /// Its readers, by session sequence number: a message reaches them in the order they
    /// connected (oldest first), and each part of a split fan-out is a run of neighbours.
    readers: BTreeMap<u64, Arc<Session>>,
    /// The broker confirmed it delivers this channel (see [`Registry::confirm_subscribed`]);
    /// until then every new reader makes sure of it, after that none needs to wait.
    subscribed: bool,
    /// Its readers' streams per user (`sub`), and its readers without a token.
    users: HashMap<Arc<str>, u32>,
    anonymous: u32,
    /// Its readers that asked for presence (a join or leave touches only them).
    observers: HashMap<u64, Arc<Session>>,
    /// Joins and leaves heard since it has local readers, read by its observers by cursor.
    log: PresenceLog,
    /// Whether `log` holds every node's users (see [`Registry::presence_claim_seed`]).
    seed: Seed,
    /// Its conflation slot (only on conflated channels that got a message).
    conflate: Option<Box<conflate::Slot>>,
}
type ChannelShard = Mutex<HashMap<Arc<str>, Channel>>;
type TokenShard = Mutex<HashMap<u64, Arc<TokenId>>>;
type SessionShard = Mutex<HashMap<u64, Arc<Session>>>;

/// Counts taken from the registry itself (the truth the gauges are reconciled with).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Counts {
    pub sse: usize,
    pub ws: usize,
    pub channels: usize,
}

/// Shared by `Arc` between the node, the transports and the broker (as its [`Sink`]).
pub struct Registry {
    channels: Box<[ChannelShard]>,
    sessions: Box<[SessionShard]>,
    /// The `jti` and `iat` of streams whose token has either, by sequence number, sharded as
    /// `sessions` (kept beside the stream, not in it: most streams have none, and a stream's
    /// size is bounded).
    tokens: Box<[TokenShard]>,
    /// Streams admitted (open or being opened); the node limit applies to it.
    admitted: AtomicUsize,
    /// Streams admitted per token `sub`.
    users: Mutex<HashMap<Arc<str>, usize>>,
    open: [AtomicUsize; 2],
    channel_count: AtomicUsize,
    next_seq: AtomicU64,
    /// Signalled whenever a place is released (admission waits on it at the limits).
    released: tokio::sync::Notify,
    pub metrics: Arc<Metrics>,
    pub clock: CoarseClock,
    /// Presence counts changed since the last report, with the coarse second of the last
    /// change (a user's 0 is reported only a grace period after it, see `take_presence`) and
    /// a change number (a change after a report was read is never taken for reported).
    presence_dirty: Mutex<HashMap<PresenceKey, (u64, u64)>>,
    presence_changes: AtomicU64,
    /// Set when a namespace conflates (see [`Registry::conflate`]).
    conflation: std::sync::OnceLock<conflate::Conflation>,
    /// The fan-out lanes, once started (see [`Registry::start_lanes`]); until then a message
    /// is offered by whoever delivers it.
    lanes: std::sync::OnceLock<lanes::Lanes>,
}

fn shard_of(key: &str) -> usize {
    // FNV-1a: stable and cheap for short names.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key.as_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    (h % SHARDS as u64) as usize
}

fn session_shard(seq: u64) -> usize {
    (seq % SHARDS as u64) as usize
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>) -> Registry {
        Registry {
            channels: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            sessions: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            tokens: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            admitted: AtomicUsize::new(0),
            users: Mutex::new(HashMap::new()),
            open: [AtomicUsize::new(0), AtomicUsize::new(0)],
            channel_count: AtomicUsize::new(0),
            next_seq: AtomicU64::new(1),
            released: tokio::sync::Notify::new(),
            metrics,
            clock: CoarseClock::new(),
            presence_dirty: Mutex::new(HashMap::new()),
            presence_changes: AtomicU64::new(0),
            conflation: std::sync::OnceLock::new(),
            lanes: std::sync::OnceLock::new(),
        }
    }

    /// Starts the fan-out lanes (one per core): from now on a delivered message is queued
    /// for them and the deliverer goes on (see [`lanes`]).
    pub fn start_lanes(self: &Arc<Self>) -> std::io::Result<()> {
        self.start_lanes_n(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    fn start_lanes_n(self: &Arc<Self>, n: usize) -> std::io::Result<()> {
        let lanes = lanes::Lanes::start(self, n)?;
        let _ = self.lanes.set(lanes);
        Ok(())
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers an admitted session (it counts as open from now on; its channels are added
    /// with [`Registry::add_channels`]).
    pub fn register(&self, session: &Arc<Session>) {
        self.sessions[session_shard(session.seq)]
            .lock()
            .insert(session.seq, session.clone());
        let t = session.transport;
        self.open[t as usize].fetch_add(1, Ordering::Relaxed);
        self.metrics.connections[t as usize].increment(1.0);
        self.metrics.opened[t as usize].increment(1);
    }

    /// Records (or, for a refreshed token, replaces) the id of an open stream's token; only a
    /// stream of a user (`sub`) has one.
    pub fn set_token(&self, session: &Session, token: Option<Arc<TokenId>>) {
        let mut map = self.tokens[session_shard(session.seq)].lock();
        match token {
            Some(t) if session.close_reason().is_none() => {
                map.insert(session.seq, t);
            }
            _ => {
                map.remove(&session.seq);
            }
        }
    }

    /// The id of a stream's token, if it has a token with a `jti` or an `iat`.
    pub fn token_of(&self, session: &Session) -> Option<Arc<TokenId>> {
        self.tokens[session_shard(session.seq)]
            .lock()
            .get(&session.seq)
            .cloned()
    }

    /// The open streams `pick` chooses (a disconnect's or a revocation's targets).
    pub fn streams_where(&self, pick: impl Fn(&Session) -> bool) -> Vec<Arc<Session>> {
        let mut out = Vec::new();
        for shard in self.sessions.iter() {
            out.extend(shard.lock().values().filter(|s| pick(s)).cloned());
        }
        out
    }

    /// The local readers of a channel.
    pub fn readers_of(&self, channel: &str) -> Vec<Arc<Session>> {
        self.channels[shard_of(channel)]
            .lock()
            .get(channel)
            .map(|c| c.readers.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Makes `session` a reader of `channels`. Returns those whose subscription at the broker
    /// is not confirmed yet (a channel that had no local reader before, or whose first reader
    /// is still subscribing it): the caller makes sure of them. Nothing is added to a closed
    /// session.
    /// `max_readers` says each channel's limit of readers on this node (0: none): a channel at
    /// its limit is `Err` with its name, and the stream is a reader of none of `channels`.
    pub fn add_channels(
        &self,
        session: &Arc<Session>,
        channels: &[ChannelName],
        max_readers: impl Fn(&str) -> u64,
    ) -> Result<Vec<ChannelName>, ChannelName> {
        let mut created = 0;
        let mut unconfirmed = Vec::new();
        let mut changed = Vec::with_capacity(channels.len());
        for (i, ch) in channels.iter().enumerate() {
            let mut shard = self.channels[shard_of(ch)].lock();
            let max = max_readers(ch);
            let full = max > 0
                && shard.get(ch.as_str()).is_some_and(|c| {
                    c.readers.len() as u64 >= max && !c.readers.contains_key(&session.seq)
                });
            if full {
                drop(shard);
                // Checked under the channel's lock, so the limit is never passed; the channels
                // added before it are taken off again.
                self.presence_changed(changed);
                if created > 0 {
                    self.channel_count.fetch_add(created, Ordering::Relaxed);
                    self.metrics.channels.increment(created as f64);
                }
                for added in &channels[..i] {
                    self.unlink(session, added);
                }
                return Err(ch.clone());
            }
            let entry = shard.entry(ch.as_arc().clone()).or_insert_with(|| {
                created += 1;
                Channel::default()
            });
            if entry.readers.insert(session.seq, session.clone()).is_none() {
                if session.presence_start(ch, entry.log.head()) {
                    entry.observers.insert(session.seq, session.clone());
                }
                match &session.user {
                    Some(u) => *entry.users.entry(u.clone()).or_insert(0) += 1,
                    None => entry.anonymous += 1,
                }
                changed.push((ch.as_arc().clone(), session.user.clone()));
            }
            if !entry.subscribed {
                unconfirmed.push(ch.clone());
            }
        }
        self.presence_changed(changed);
        if created > 0 {
            self.channel_count.fetch_add(created, Ordering::Relaxed);
            self.metrics.channels.increment(created as f64);
        }
        if session.close_reason().is_some() {
            // Closed meanwhile: its close may have unlinked before these were added.
            for ch in channels {
                self.unlink(session, ch);
            }
        }
        Ok(unconfirmed)
    }

    /// How many local readers a channel has.
    pub fn reader_count(&self, channel: &str) -> usize {
        self.channels[shard_of(channel)]
            .lock()
            .get(channel)
            .map_or(0, |c| c.readers.len())
    }

    /// Whether the broker confirmed it delivers `channel` (since its current first reader).
    pub fn is_subscribed(&self, channel: &str) -> bool {
        self.channels[shard_of(channel)]
            .lock()
            .get(channel)
            .is_some_and(|c| c.subscribed)
    }

    /// The broker delivers `channel` now: later readers need not wait for it. A channel that
    /// lost all its readers meanwhile is left alone (its entry is gone; the next first reader
    /// subscribes again).
    pub fn confirm_subscribed(&self, channel: &str) {
        if let Some(c) = self.channels[shard_of(channel)].lock().get_mut(channel) {
            c.subscribed = true;
        }
    }

    /// Takes `session` off `channel`'s readers (WebSocket unsubscribe, or a failed start).
    /// Returns whether the channel lost its last local reader.
    pub fn remove_channel(&self, session: &Session, channel: &ChannelName) -> bool {
        session.remove_channel(channel);
        self.unlink(session, channel)
    }

    /// Removes one reader; returns whether the channel was left without readers.
    fn unlink(&self, session: &Session, channel: &ChannelName) -> bool {
        let mut removed = false;
        let emptied = {
            let mut shard = self.channels[shard_of(channel)].lock();
            match shard.get_mut(channel.as_str()) {
                Some(c) => {
                    removed = c.readers.remove(&session.seq).is_some();
                    c.observers.remove(&session.seq);
                    if removed {
                        match &session.user {
                            Some(u) => {
                                if let Some(n) = c.users.get_mut(u) {
                                    *n -= 1;
                                    if *n == 0 {
                                        c.users.remove(u);
                                    }
                                }
                            }
                            None => c.anonymous = c.anonymous.saturating_sub(1),
                        }
                    }
                    removed && c.readers.is_empty() && shard.remove(channel.as_str()).is_some()
                }
                None => false,
            }
        };
        if removed {
            self.presence_changed(vec![(channel.as_arc().clone(), session.user.clone())]);
        }
        if emptied {
            self.channel_count.fetch_sub(1, Ordering::Relaxed);
            self.metrics.channels.decrement(1.0);
        }
        emptied
    }

    /// Closes a session once: unregisters it, releases its place, counts it, ends its queue.
    /// Returns the channels left without local readers, or `None` if it was already closed.
    pub fn close(&self, session: &Arc<Session>, reason: CloseReason) -> Option<Vec<ChannelName>> {
        self.close_saying(session, reason, None)
    }

    /// [`Registry::close`], with the backend's reason for a disconnect or a revocation, which
    /// the stream gets as its last event.
    pub fn close_saying(
        &self,
        session: &Arc<Session>,
        reason: CloseReason,
        note: Option<Arc<str>>,
    ) -> Option<Vec<ChannelName>> {
        if !session.mark_closed(reason) {
            return None;
        }
        let registered = self.sessions[session_shard(session.seq)]
            .lock()
            .remove(&session.seq)
            .is_some();
        if session.user.is_some() {
            // Only streams of a user hold a token id (see `set_token`).
            self.tokens[session_shard(session.seq)]
                .lock()
                .remove(&session.seq);
        }
        let emptied: Vec<ChannelName> = session
            .channels()
            .into_iter()
            .filter(|ch| self.unlink(session, ch))
            .collect();
        let t = session.transport;
        if registered {
            self.open[t as usize].fetch_sub(1, Ordering::Relaxed);
            self.metrics.connections[t as usize].decrement(1.0);
        }
        self.release(session.user.as_ref());
        self.metrics.closed(t, reason).increment(1);
        if reason == CloseReason::Stale {
            self.metrics.stale_closed.increment(1);
        }
        // A stream that cannot be written (stale, error) or is dropped for misbehaving (slow)
        // gets nothing more; the others get what is queued, then their last item. One the
        // backend ended (disconnected, revoked) gets nothing more either: it ends within a
        // second whatever it had queued, and a revoked token must not be served further. Those
        // messages are not counted as dropped: the client is not losing them by reading slowly.
        let lost = matches!(
            reason,
            CloseReason::Slow | CloseReason::Stale | CloseReason::Error
        );
        let ended = matches!(reason, CloseReason::Disconnected | CloseReason::Revoked);
        let dropped = session.finish(reason, lost || ended, note);
        if dropped > 0 && lost {
            self.metrics
                .dropped(DropReason::Slow)
                .increment(dropped as u64);
        }
        Some(emptied)
    }

    /// Recounts streams and channels and sets the gauges to the truth.
    pub fn reconcile(&self) -> Counts {
        let mut counts = Counts::default();
        for shard in self.sessions.iter() {
            for s in shard.lock().values() {
                match s.transport {
                    Transport::Sse => counts.sse += 1,
                    Transport::Ws => counts.ws += 1,
                }
            }
        }
        counts.channels = self.channels.iter().map(|s| s.lock().len()).sum();
        let before = self.counts();
        if before != counts {
            tracing::warn!(?before, after = ?counts, "gauges drifted from the registry; reconciled");
        }
        self.open[0].store(counts.sse, Ordering::Relaxed);
        self.open[1].store(counts.ws, Ordering::Relaxed);
        self.channel_count.store(counts.channels, Ordering::Relaxed);
        self.metrics.connections[0].set(counts.sse as f64);
        self.metrics.connections[1].set(counts.ws as f64);
        self.metrics.channels.set(counts.channels as f64);
        counts
    }

    /// Counts as maintained incrementally.
    pub fn counts(&self) -> Counts {
        Counts {
            sse: self.open[0].load(Ordering::Relaxed),
            ws: self.open[1].load(Ordering::Relaxed),
            channels: self.channel_count.load(Ordering::Relaxed),
        }
    }

    /// Every open session (for drains; allocation proportional to streams).
    pub fn snapshot(&self) -> Vec<Arc<Session>> {
        let c = self.counts();
        let mut all = Vec::with_capacity(c.sse + c.ws);
        for shard in self.sessions.iter() {
            all.extend(shard.lock().values().cloned());
        }
        all
    }

    /// An open session by its sequence number.
    pub fn get(&self, seq: u64) -> Option<Arc<Session>> {
        self.sessions[session_shard(seq)].lock().get(&seq).cloned()
    }

    /// Whether a channel has local readers.
    pub fn has_readers(&self, channel: &str) -> bool {
        self.channels[shard_of(channel)]
            .lock()
            .contains_key(channel)
    }

    /// The `n` channels with the most local readers, most first (ties by name).
    pub fn top_channels(&self, n: usize) -> Vec<(String, usize)> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        // The n largest so far, smallest on top: one pass, n entries held.
        let mut heap: BinaryHeap<Reverse<(usize, Reverse<Arc<str>>)>> = BinaryHeap::new();
        for shard in self.channels.iter() {
            for (name, ch) in shard.lock().iter() {
                heap.push(Reverse((ch.readers.len(), Reverse(name.clone()))));
                if heap.len() > n {
                    heap.pop();
                }
            }
        }
        let mut top: Vec<(usize, Reverse<Arc<str>>)> = heap.into_iter().map(|r| r.0).collect();
        top.sort_by(|a, b| b.cmp(a));
        top.into_iter()
            .map(|(readers, Reverse(name))| (name.to_string(), readers))
            .collect()
    }

    /// Streams with a channel that fell behind (one look at each stream, outside the shard
    /// locks).
    pub fn lagging(&self) -> usize {
        self.snapshot().iter().filter(|s| s.is_behind()).count()
    }

    /// Every channel with a local reader.
    pub fn channel_names(&self) -> Vec<ChannelName> {
        let mut out = Vec::new();
        for shard in self.channels.iter() {
            out.extend(shard.lock().keys().filter_map(|k| ChannelName::new(k).ok()));
        }
        out
    }
}

impl Sink for Registry {
    fn deliver(&self, msg: &Arc<Message>) {
        self.fanout_later(msg);
    }

    fn presence(&self, ev: &Arc<PresenceEvent>) {
        self.presence_event(ev);
    }

    fn fall_behind(&self) {
        for s in self.snapshot() {
            s.fall_behind();
        }
    }

    fn fall_behind_on(&self, channels: &[ChannelName]) {
        for c in channels {
            for s in self.readers_of(c.as_str()) {
                s.fall_behind_on(c.as_str());
            }
        }
    }

    fn channels(&self) -> Vec<ChannelName> {
        self.channel_names()
    }
}

#[cfg(test)]
mod tests;
