//! The node's local registry: which streams are open and which channels each one reads.
//!
//! It admits streams against the node and per-user limits, fans a message out to the local
//! readers of its channel, closes streams exactly once (keeping every count exact), counts each
//! channel's streams per user and keeps its log of joins and leaves for its observers
//! (presence), and finds the streams whose heartbeat, token or silence is due. It does no I/O
//! of its own (a session may write its socket through its transport's sink when offered a
//! message) and never talks to a broker or a transport: it reports which channels gained their first or
//! lost their last local reader, and which need their users read, and the node acts on that.

use crate::broker::Sink;
use crate::domain::{CloseReason, RejectReason, Transport};
use crate::message::Message;
use crate::metrics::{DropReason, Metrics};
use crate::presence_log::{PresenceLog, Recorded, MAX_KEPT};
use crate::stream::{Offer, PresenceEvent, Session};
use parking_lot::Mutex;
use protocol::ChannelName;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Lock shards: enough that two cores rarely meet on one, few enough to sweep cheaply.
const SHARDS: usize = 64;
/// A stream that fell behind and whose transport took nothing for this long (seconds) gives
/// back its queued durable messages (see `Session::trim_if_idle`): a reader that sleeps costs
/// no queued messages.
const TRIM_AFTER_SECS: u64 = 3;
/// Readers of one channel from which a message's fan-out is split over the cores: a reader
/// whose socket the fan-out writes itself (see `stream::DirectSink`) costs a `write`, and one
/// thread writing 10,000 sockets in turn would make the last wait for all the others.
const SPLIT_AT: usize = 1024;
/// Most threads one fan-out uses (the caller's included).
const SPLIT_MAX: usize = 4;
/// Stack of a fan-out helper thread: it only offers a message to sessions.
const SPLIT_STACK: usize = 64 * 1024;

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
}

/// How far a channel's presence log knows who is there.
#[derive(Default)]
enum Seed {
    /// Only from the changes heard since the channel got its first local reader.
    #[default]
    Partial,
    /// The users over every node are being read; changes heard meanwhile wait here and are
    /// applied after them (bounded: past [`crate::presence_log::MAX_KEPT`] the read is not
    /// waited for).
    Reading(Vec<Arc<PresenceEvent>>),
    /// From that read on.
    Whole,
}

/// A (channel, user) whose count on this node changed (`None`: the anonymous count).
type PresenceKey = (Arc<str>, Option<Arc<str>>);

/// One presence count to report: the node's streams on `channel` for `sub` (or anonymous).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceCount {
    pub channel: Arc<str>,
    pub sub: Option<Arc<str>>,
    pub streams: u32,
}
type ChannelShard = Mutex<HashMap<Arc<str>, Channel>>;
type SessionShard = Mutex<HashMap<u64, Arc<Session>>>;

/// A clock in whole seconds since start, advanced by the node's tick; reading it costs a load.
pub struct CoarseClock {
    start: Instant,
    secs: AtomicU64,
}

impl CoarseClock {
    fn new() -> Self {
        CoarseClock {
            start: Instant::now(),
            secs: AtomicU64::new(0),
        }
    }
    pub fn now(&self) -> u64 {
        self.secs.load(Ordering::Relaxed)
    }
    /// Advances to the real elapsed time; returns it.
    pub fn tick(&self) -> u64 {
        let s = self.start.elapsed().as_secs();
        self.secs.store(s, Ordering::Relaxed);
        s
    }
}

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
    /// Threads a large channel's fan-out is split over (see [`SPLIT_AT`]).
    cores: usize,
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

/// What one fan-out did: messages queued, written to sockets, lost to readers behind.
#[derive(Default)]
struct Offered {
    queued: usize,
    written: u64,
    lagged: u64,
}

impl std::ops::AddAssign for Offered {
    fn add_assign(&mut self, o: Offered) {
        self.queued += o.queued;
        self.written += o.written;
        self.lagged += o.lagged;
    }
}

/// Offers `msg` to `readers`.
fn offer_all<'a>(readers: impl Iterator<Item = &'a Arc<Session>>, msg: &Arc<Message>) -> Offered {
    let mut out = Offered::default();
    for s in readers {
        match s.offer(msg) {
            Offer::Queued => out.queued += 1,
            Offer::Written => out.written += 1,
            Offer::Lagged => out.lagged += 1,
            Offer::Skipped | Offer::Behind => {}
        }
    }
    out
}

/// Streams the tick found due for closing, with the reason.
pub type Due = Vec<(Arc<Session>, CloseReason)>;

impl Registry {
    pub fn new(metrics: Arc<Metrics>) -> Registry {
        Registry {
            channels: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            sessions: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
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
            cores: std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(SPLIT_MAX),
        }
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Reserves a place for a new stream of `user`: refused with `Capacity` when `max` streams
    /// are admitted, with `UserLimit` when `user` already has `per_user`. Released by `close`
    /// (the session carries the user).
    pub fn try_admit(
        &self,
        max: usize,
        user: Option<&Arc<str>>,
        per_user: usize,
    ) -> Result<(), RejectReason> {
        let mut users = user.map(|_| self.users.lock());
        if let (Some(users), Some(u)) = (users.as_mut(), user) {
            if users.get(u).copied().unwrap_or(0) >= per_user {
                return Err(RejectReason::UserLimit);
            }
        }
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| RejectReason::Capacity)?;
        if let (Some(users), Some(u)) = (users.as_mut(), user) {
            *users.entry(u.clone()).or_insert(0) += 1;
        }
        Ok(())
    }

    pub(crate) fn release(&self, user: Option<&Arc<str>>) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
        if let Some(u) = user {
            let mut users = self.users.lock();
            if let Some(n) = users.get_mut(u) {
                *n -= 1;
                if *n == 0 {
                    users.remove(u);
                }
            }
        }
        // Every waiter looks (at most `ADMIT_WAITERS`): the first in line may be a user still
        // at its own limit, for whom this place is no use, while another waits for it.
        self.released.notify_waiters();
    }

    /// Notified (every waiter) whenever a place is released.
    pub fn releases(&self) -> &tokio::sync::Notify {
        &self.released
    }

    /// Streams admitted for `user`.
    pub fn user_streams(&self, user: &str) -> usize {
        self.users.lock().get(user).copied().unwrap_or(0)
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

    /// Makes `session` a reader of `channels`. Returns those whose subscription at the broker
    /// is not confirmed yet (a channel that had no local reader before, or whose first reader
    /// is still subscribing it): the caller makes sure of them. Nothing is added to a closed
    /// session.
    pub fn add_channels(
        &self,
        session: &Arc<Session>,
        channels: &[ChannelName],
    ) -> Vec<ChannelName> {
        let mut created = 0;
        let mut unconfirmed = Vec::new();
        let mut changed = Vec::with_capacity(channels.len());
        for ch in channels {
            let mut shard = self.channels[shard_of(ch)].lock();
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
        unconfirmed
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
        if !session.mark_closed(reason) {
            return None;
        }
        let registered = self.sessions[session_shard(session.seq)]
            .lock()
            .remove(&session.seq)
            .is_some();
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
        // gets nothing more; the others get what is queued, then their last item.
        let discard = matches!(
            reason,
            CloseReason::Slow | CloseReason::Stale | CloseReason::Error
        );
        let dropped = session.finish(reason, discard);
        if dropped > 0 {
            self.metrics
                .dropped(DropReason::Slow)
                .increment(dropped as u64);
        }
        Some(emptied)
    }

    /// Offers `msg` to every local reader of its channel. Returns how many took it. A
    /// channel with `SPLIT_AT` readers or more is offered by one thread per core at once
    /// (scoped threads, joined before returning, so messages stay in order).
    pub fn fanout(&self, msg: &Arc<Message>) -> usize {
        let offered = {
            let shard = self.channels[shard_of(&msg.channel)].lock();
            match shard.get(msg.channel.as_str()) {
                None => Offered::default(),
                Some(c) if c.readers.len() < SPLIT_AT || self.cores < 2 => {
                    offer_all(c.readers.values(), msg)
                }
                Some(c) => {
                    let per = c.readers.len().div_ceil(self.cores);
                    std::thread::scope(|scope| {
                        let part =
                            |k: usize| offer_all(c.readers.values().skip(k * per).take(per), msg);
                        let helpers: Vec<_> = (1..self.cores)
                            .map(|k| {
                                let spawned = std::thread::Builder::new()
                                    .stack_size(SPLIT_STACK)
                                    .spawn_scoped(scope, move || part(k));
                                // No thread (resource limit): this one does that part too.
                                spawned.map_err(|_| part(k))
                            })
                            .collect();
                        let mut total = part(0);
                        for h in helpers {
                            total += match h {
                                Ok(h) => h.join().unwrap_or_else(|_| {
                                    // A bug, not input: the node stays up, and says so.
                                    tracing::error!(channel = %msg.channel, "a fan-out thread panicked; its part of the readers missed this message");
                                    Offered::default()
                                }),
                                Err(done) => done,
                            };
                        }
                        total
                    })
                }
            }
        };
        if offered.lagged > 0 {
            self.metrics
                .dropped(DropReason::Lagged)
                .increment(offered.lagged);
        }
        // Counted here, once per fan-out: queued ones are counted when the transport takes them.
        if offered.written > 0 {
            self.metrics.delivered.increment(offered.written);
        }
        offered.queued + offered.written as usize
    }

    /// One tick of the node's clock: gives back the queued durable messages of streams that
    /// fell behind and took nothing for `TRIM_AFTER_SECS`, queues a heartbeat to the idle streams whose turn it is
    /// (each gets one every `every` ticks, spread by its sequence number) and returns the
    /// streams to close: tokens expired by `now_unix`, streams whose client `vanished` (asked
    /// at their heartbeat turn), and streams that took nothing for `stale_after` seconds (SSE: no item written; WebSocket: no frame from the client,
    /// pongs included).
    pub fn tick(
        &self,
        tick: u64,
        every: u64,
        now_unix: u64,
        stale_after: u64,
        vanished: impl Fn(&Session) -> bool,
    ) -> Due {
        let mut due = Vec::new();
        let now = self.clock.now();
        let mut sent = 0;
        let mut lagged = 0;
        let turn = tick % every;
        let idle_since = now.saturating_sub(TRIM_AFTER_SECS);
        for shard in self.sessions.iter() {
            let shard = shard.lock();
            for s in shard.values() {
                lagged += s.trim_if_idle(idle_since);
                if s.multiplexed {
                    s.poke();
                }
                if s.is_presence_lost() {
                    due.push((s.clone(), CloseReason::Slow));
                } else if s.expires_at().is_some_and(|e| e <= now_unix) {
                    due.push((s.clone(), CloseReason::TokenExpired));
                } else if now.saturating_sub(s.last_write()) >= stale_after {
                    due.push((s.clone(), CloseReason::Stale));
                } else if s.seq % every == turn {
                    // At its heartbeat turn: a client that vanished (no FIN, no RST) left the
                    // last heartbeat unacknowledged; the next one is not written.
                    if vanished(s) {
                        due.push((s.clone(), CloseReason::Stale));
                    } else if s.push_heartbeat() {
                        sent += 1;
                    }
                }
            }
        }
        self.metrics.heartbeats.increment(sent);
        self.metrics
            .dropped(DropReason::Lagged)
            .increment(lagged as u64);
        due
    }

    /// Streams that took nothing for `stale_after` seconds (the periodic sweep's check).
    pub fn stale(&self, stale_after: u64) -> Due {
        let now = self.clock.now();
        self.snapshot()
            .into_iter()
            .filter(|s| now.saturating_sub(s.last_write()) >= stale_after)
            .map(|s| (s, CloseReason::Stale))
            .collect()
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

    pub fn admitted(&self) -> usize {
        self.admitted.load(Ordering::Acquire)
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

    /// Notes presence counts that changed (outside the channel locks: `take_presence` takes
    /// this lock first and the channel locks after).
    fn presence_changed(&self, keys: Vec<PresenceKey>) {
        if keys.is_empty() {
            return;
        }
        let now = self.clock.now();
        let mut dirty = self.presence_dirty.lock();
        for k in keys {
            let n = self.presence_changes.fetch_add(1, Ordering::Relaxed);
            dirty.insert(k, (now, n));
        }
    }

    /// The node's streams on `channel` for `sub` (anonymous with `None`).
    fn presence_count(&self, channel: &str, sub: Option<&Arc<str>>) -> u32 {
        let shard = self.channels[shard_of(channel)].lock();
        shard.get(channel).map_or(0, |c| match sub {
            Some(u) => c.users.get(u).copied().unwrap_or(0),
            None => c.anonymous,
        })
    }

    /// The presence counts to report now (coalesced since the last call): each changed
    /// (channel, user) with its current count, except a user whose count fell to 0 less than
    /// `grace` seconds ago: it is kept for later, so that a client that reconnects within it
    /// (to this node or another) makes no `leave` and no `join`.
    pub fn take_presence(&self, grace: u64) -> Vec<PresenceCount> {
        let now = self.clock.now();
        let keys: Vec<(PresenceKey, (u64, u64))> = self
            .presence_dirty
            .lock()
            .iter()
            .map(|(k, t)| (k.clone(), *t))
            .collect();
        let mut out = Vec::new();
        let mut done = Vec::new();
        for ((channel, sub), (since, n)) in keys {
            let streams = self.presence_count(&channel, sub.as_ref());
            if streams == 0 && sub.is_some() && now < since + grace {
                continue;
            }
            done.push(((channel.clone(), sub.clone()), n));
            out.push(PresenceCount {
                channel,
                sub,
                streams,
            });
        }
        let mut dirty = self.presence_dirty.lock();
        for (k, n) in done {
            // Changed again meanwhile: reported again next time.
            if dirty.get(&k).is_some_and(|(_, m)| *m == n) {
                dirty.remove(&k);
            }
        }
        out
    }

    /// Marks every (channel, user) with local streams, and every channel's anonymous count,
    /// to be reported (a node that cleared what it had reported before reports it all again).
    pub fn presence_mark_all(&self) {
        let mut keys = Vec::new();
        for shard in self.channels.iter() {
            for (name, c) in shard.lock().iter() {
                keys.extend(c.users.keys().map(|u| (name.clone(), Some(u.clone()))));
                keys.push((name.clone(), None));
            }
        }
        self.presence_changed(keys);
    }

    /// Counts whose report failed: reported again next time (at once, even a 0).
    pub fn presence_retry(&self, counts: impl Iterator<Item = PresenceCount>) {
        let mut dirty = self.presence_dirty.lock();
        for c in counts {
            let n = self.presence_changes.fetch_add(1, Ordering::Relaxed);
            dirty.entry((c.channel, c.sub)).or_insert((0, n));
        }
    }

    /// Records a `join`/`leave` in its channel's presence log and hands it to the local
    /// readers that asked for them (the ones behind read it from the log later).
    pub fn presence_event(&self, ev: &Arc<PresenceEvent>) {
        let lost = {
            let mut shard = self.channels[shard_of(&ev.channel)].lock();
            let Some(c) = shard.get_mut(ev.channel.as_str()) else {
                return;
            };
            match &mut c.seed {
                Seed::Reading(held) if held.len() < MAX_KEPT => {
                    held.push(ev.clone());
                    0
                }
                Seed::Reading(_) => {
                    tracing::warn!(channel = %ev.channel, "presence: too many changes while reading the channel's users; not waiting for the read");
                    Self::end_seed(c, &ev.channel, None) + Self::record_presence(c, ev)
                }
                _ => Self::record_presence(c, ev),
            }
        };
        if lost > 0 {
            self.metrics.dropped(DropReason::Lagged).increment(lost);
        }
    }

    /// Records one change and offers it to the channel's observers. When the log is due for
    /// pruning, it forgets what every observer has read; an observer so slow that the log's
    /// bound forgot changes it had not read is marked to be closed as slow (returns how many).
    fn record_presence(c: &mut Channel, ev: &Arc<PresenceEvent>) -> u64 {
        let (seq, full) = match c.log.record(&ev.sub, ev.join) {
            Recorded::Nothing => return 0,
            Recorded::At(seq) => (seq, false),
            Recorded::Full(seq) => (seq, true),
        };
        for s in c.observers.values() {
            s.offer_presence(ev, seq);
        }
        if !full {
            if c.observers.is_empty() {
                // Nobody to read it: only who is present is kept.
                c.log.prune(seq);
            }
            return 0;
        }
        let slowest = c
            .observers
            .values()
            .filter_map(|s| s.presence_cursor(ev.channel.as_str()))
            .min()
            .unwrap_or(seq);
        let floor = c.log.prune(slowest);
        let mut lost = 0;
        if floor > slowest {
            for s in c.observers.values() {
                if s.presence_cursor(ev.channel.as_str())
                    .is_some_and(|at| at < floor)
                {
                    tracing::warn!(connection_id = %s.id, channel = %ev.channel, "an observer fell too far behind the channel's presence changes: closing it as slow");
                    s.presence_lost();
                    lost += 1;
                }
            }
        }
        lost
    }

    /// Ends a channel's seed read: the changes that make its log match `users` (the users over
    /// every node when they were read; `None` if the read failed: the log stays partial), then
    /// the changes heard meanwhile; its observers waiting for their first list are fed.
    fn end_seed(
        c: &mut Channel,
        channel: &ChannelName,
        users: Option<&std::collections::HashSet<Arc<str>>>,
    ) -> u64 {
        // A failed read leaves the log partial: the next observer has it read again.
        let next = if users.is_some() {
            Seed::Whole
        } else {
            Seed::Partial
        };
        let held = match std::mem::replace(&mut c.seed, next) {
            Seed::Reading(held) => held,
            other => {
                c.seed = other;
                return 0;
            }
        };
        let mut lost = 0;
        if let Some(users) = users {
            for (sub, join) in c.log.reconcile(users) {
                let ev = Arc::new(PresenceEvent {
                    channel: channel.clone(),
                    sub,
                    join,
                });
                lost += Self::record_presence(c, &ev);
            }
        }
        for ev in &held {
            lost += Self::record_presence(c, ev);
        }
        lost
    }

    /// Claims `channel`'s seed read: `true` if its log is not known whole (the channel's
    /// first observer, or the first after a reconnection to the broker) and nobody reads it;
    /// the caller then reads every node's users and hands them to [`Registry::presence_seed`].
    pub fn presence_claim_seed(&self, channel: &str) -> bool {
        let mut shard = self.channels[shard_of(channel)].lock();
        match shard.get_mut(channel) {
            Some(c) if matches!(c.seed, Seed::Partial) => {
                c.seed = Seed::Reading(Vec::new());
                true
            }
            _ => false,
        }
    }

    /// The users over every node (`None`: they could not be read) for a claimed seed read.
    pub fn presence_seed(&self, channel: &ChannelName, users: Option<Vec<Arc<str>>>) {
        let users: Option<std::collections::HashSet<Arc<str>>> =
            users.map(|u| u.into_iter().collect());
        let (lost, observers) = {
            let mut shard = self.channels[shard_of(channel)].lock();
            let Some(c) = shard.get_mut(channel.as_str()) else {
                return;
            };
            let lost = Self::end_seed(c, channel, users.as_ref());
            (lost, c.observers.values().cloned().collect::<Vec<_>>())
        };
        for s in observers {
            s.presence_poke(channel.as_str());
        }
        if lost > 0 {
            self.metrics.dropped(DropReason::Lagged).increment(lost);
        }
    }

    /// Every channel's log may have missed changes (the broker reconnected): each is read
    /// again. Returns the channels with observers, for the caller to claim and read.
    pub fn presence_unseed_all(&self) -> Vec<ChannelName> {
        let mut out = Vec::new();
        for shard in self.channels.iter() {
            for (name, c) in shard.lock().iter_mut() {
                if matches!(c.seed, Seed::Whole) {
                    c.seed = Seed::Partial;
                }
                if !c.observers.is_empty() {
                    out.extend(ChannelName::new(name).ok());
                }
            }
        }
        out
    }

    /// Feeds `session` what it is owed of its channels' presence, as far as its queue takes
    /// it (the catch-up calls it when the stream has room): first the users present (once
    /// the channel's seed read is done), then changes from its cursor on.
    pub fn pump_presence(&self, session: &Session) {
        for ch in session.presence_due() {
            loop {
                let mut shard = self.channels[shard_of(&ch)].lock();
                let Some(c) = shard.get_mut(ch.as_str()) else {
                    break;
                };
                let Some((from, room, fresh)) = session.presence_room(ch.as_str()) else {
                    break;
                };
                let head = c.log.head();
                if fresh {
                    if matches!(c.seed, Seed::Reading(_)) {
                        break; // fed when the read lands (presence_poke)
                    }
                    let users = c.log.snapshot();
                    session.presence_fed(ch.as_str(), from, Some(users), Vec::new(), head, head);
                    break;
                }
                if from < c.log.floor() {
                    session.presence_lost();
                    break;
                }
                let (changes, to) = c.log.read(from, room);
                let events = changes
                    .into_iter()
                    .map(|(sub, join)| {
                        Arc::new(PresenceEvent {
                            channel: ch.clone(),
                            sub,
                            join,
                        })
                    })
                    .collect();
                session.presence_fed(ch.as_str(), from, None, events, to, head);
                if to == head || to == from {
                    break;
                }
            }
        }
    }

    /// Distinct users with a stream on this node, and streams without a token.
    pub fn presence_gauges(&self) -> (usize, usize) {
        let users = self.users.lock();
        let with_user: usize = users.values().sum();
        (
            users.len(),
            self.admitted
                .load(Ordering::Relaxed)
                .saturating_sub(with_user),
        )
    }

    /// Whether a channel has local readers.
    pub fn has_readers(&self, channel: &str) -> bool {
        self.channels[shard_of(channel)]
            .lock()
            .contains_key(channel)
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
    fn deliver(&self, msg: &Arc<Message>) -> usize {
        self.fanout(msg)
    }

    fn presence(&self, ev: &Arc<PresenceEvent>) {
        self.presence_event(ev);
    }

    fn fall_behind(&self) {
        for s in self.snapshot() {
            s.fall_behind();
        }
    }

    fn channels(&self) -> Vec<ChannelName> {
        self.channel_names()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{Item, SessionInit, StartAt};
    use protocol::{Envelope, StreamId};
    use std::task::{Context, Poll, Waker};

    fn reg() -> Registry {
        Registry::new(Arc::new(Metrics::new()))
    }

    fn open(r: &Registry, chans: &[&str], cap: usize) -> (Arc<Session>, Vec<ChannelName>) {
        open_as(r, chans, cap, None)
    }

    fn open_as(
        r: &Registry,
        chans: &[&str],
        cap: usize,
        user: Option<&str>,
    ) -> (Arc<Session>, Vec<ChannelName>) {
        open_with(r, chans, cap, user, false)
    }

    /// A started stream on `chans`, asking for their presence with `presence`; with the
    /// channels whose subscription was not confirmed.
    fn open_with(
        r: &Registry,
        chans: &[&str],
        cap: usize,
        user: Option<&str>,
        presence: bool,
    ) -> (Arc<Session>, Vec<ChannelName>) {
        let user: Option<Arc<str>> = user.map(Arc::from);
        assert!(r.try_admit(10_000, user.as_ref(), 10).is_ok());
        let chans: Vec<ChannelName> = chans.iter().map(|c| ChannelName::new(c).unwrap()).collect();
        let s = Arc::new(Session::new(
            SessionInit {
                seq: r.next_seq(),
                transport: Transport::Sse,
                envelope: false,
                user,
                expires_at: None,
                capacity: cap,
                now: 0,
                refill: None,
                socket: None,
                multiplexed: false,
            },
            chans.clone(),
        ));
        if presence {
            s.want_presence(None);
        }
        r.register(&s);
        let first = r.add_channels(&s, &chans);
        let starts: Vec<_> = chans
            .iter()
            .map(|c| (c.clone(), StartAt::Live(StreamId::ZERO)))
            .collect();
        s.start(&starts, |_| Vec::new());
        (s, first)
    }

    fn msg(c: &str, pos: Option<u64>) -> Arc<Message> {
        let env = Envelope {
            event: None,
            data: "x".into(),
        };
        Arc::new(Message::new(
            ChannelName::new(c).unwrap(),
            pos.map(|i| StreamId::new(i, 0)),
            &env,
            Instant::now(),
        ))
    }

    #[test]
    fn a_large_channel_is_offered_by_several_threads_each_reader_once_in_order() {
        let mut r = reg();
        r.cores = 3;
        let readers: Vec<_> = (0..SPLIT_AT * 2 + 7)
            .map(|_| open(&r, &["big"], 8).0)
            .collect();
        for i in 1..=3 {
            assert_eq!(r.fanout(&msg("big", Some(i))), readers.len());
        }
        let mut cx = Context::from_waker(Waker::noop());
        for s in &readers {
            let mut got = vec![];
            while let Poll::Ready(Some(Item::Message(m))) = s.poll_item(&mut cx) {
                got.push(m.position.map(|p| p.ms));
            }
            assert_eq!(got, [Some(1), Some(2), Some(3)]);
        }
    }

    fn names(v: &[ChannelName]) -> Vec<&str> {
        v.iter().map(|c| c.as_str()).collect()
    }

    fn reported(r: &Registry, grace: u64) -> Vec<(String, Option<String>, u32)> {
        let mut v: Vec<_> = r
            .take_presence(grace)
            .into_iter()
            .map(|c| {
                (
                    c.channel.to_string(),
                    c.sub.map(|s| s.to_string()),
                    c.streams,
                )
            })
            .collect();
        v.sort();
        v
    }

    /// A stream on `channel` that asked for its presence.
    fn observer(r: &Registry, channel: &str, cap: usize) -> Arc<Session> {
        open_with(r, &[channel], cap, None, true).0
    }

    fn change(channel: &str, sub: &str, join: bool) -> Arc<PresenceEvent> {
        Arc::new(PresenceEvent {
            channel: ChannelName::new(channel).unwrap(),
            sub: Arc::from(sub),
            join,
        })
    }

    /// Takes what `s` has queued as the catch-up and a transport would (pump, then drain,
    /// until nothing comes), applying joins and leaves to `view`; every one must be a change.
    fn read_presence(r: &Registry, s: &Session, view: &mut std::collections::BTreeSet<String>) {
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            r.pump_presence(s);
            let mut got = 0;
            while let Poll::Ready(Some(item)) = s.poll_item(&mut cx) {
                match item {
                    Item::Presence(p) => {
                        if p.join {
                            assert!(view.insert(p.sub.to_string()), "join of {}", p.sub);
                        } else {
                            assert!(view.remove(&*p.sub), "leave of {}", p.sub);
                        }
                    }
                    Item::Present(p) => {
                        *view = p.users.iter().map(|u| u.to_string()).collect();
                    }
                    _ => continue,
                }
                got += 1;
            }
            if got == 0 {
                return;
            }
        }
    }

    #[test]
    fn an_observer_with_a_small_queue_gets_every_join_and_leave_of_a_storm() {
        let r = reg();
        let obs = observer(&r, "c", 4);
        let (plain, _) = open(&r, &["c"], 4);
        let mut view = std::collections::BTreeSet::new();
        for i in 0..1000 {
            r.presence_event(&change("c", &format!("u{i}"), true));
            if i % 97 == 0 {
                read_presence(&r, &obs, &mut view);
            }
        }
        read_presence(&r, &obs, &mut view);
        assert_eq!(view.len(), 1000, "every join, with a queue of 4");
        let late = observer(&r, "c", 4);
        let mut late_view = std::collections::BTreeSet::new();
        for i in 0..1000 {
            r.presence_event(&change("c", &format!("u{i}"), false));
            if i % 89 == 0 {
                read_presence(&r, &obs, &mut view);
            }
        }
        // A repeated join is no change; a user who joins and leaves unread cancels out.
        r.presence_event(&change("c", "x", true));
        r.presence_event(&change("c", "x", true));
        read_presence(&r, &obs, &mut view);
        assert_eq!(
            view.into_iter().collect::<Vec<_>>(),
            ["x"],
            "every leave, x's join"
        );
        let mut view = std::collections::BTreeSet::from(["x".to_string()]);
        r.presence_event(&change("c", "x", false));
        read_presence(&r, &obs, &mut view);
        assert!(view.is_empty());
        // The late observer started after the joins and read nothing since: it starts from
        // who is there now (nobody), with nothing to undo.
        let mut cx = Context::from_waker(Waker::noop());
        r.pump_presence(&late);
        let mut got = Vec::new();
        while let Poll::Ready(Some(item)) = late.poll_item(&mut cx) {
            got.push(item);
        }
        assert!(
            matches!(&got[..], [Item::Present(p)] if p.users.is_empty()),
            "{got:?}"
        );
        // One that starts now gets the users present, then only what changes.
        r.presence_event(&change("c", "y", true));
        let third = observer(&r, "c", 4);
        r.presence_event(&change("c", "z", true));
        read_presence(&r, &third, &mut late_view);
        assert_eq!(late_view.iter().collect::<Vec<_>>(), ["y", "z"]);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(
            !matches!(
                plain.poll_item(&mut cx),
                Poll::Ready(Some(Item::Presence(_)))
            ),
            "a stream that did not ask gets none"
        );
    }

    #[test]
    fn an_observer_that_never_reads_holds_a_bounded_log_and_is_closed_as_slow() {
        let r = reg();
        let stuck = observer(&r, "c", 4);
        let reader = observer(&r, "c", 4);
        let mut view = std::collections::BTreeSet::new();
        let n = crate::presence_log::MAX_KEPT + 10;
        for i in 0..n {
            r.presence_event(&change("c", &format!("u{}", i / 2), i % 2 == 0));
            if i % 1000 == 0 {
                read_presence(&r, &reader, &mut view);
            }
        }
        read_presence(&r, &reader, &mut view);
        assert!(view.is_empty(), "the reader kept up: {}", view.len());
        assert!(stuck.is_presence_lost() && !reader.is_presence_lost());
        let due = r.tick(1, 30, 0, 90, |_| false);
        assert!(due
            .iter()
            .any(|(s, why)| Arc::ptr_eq(s, &stuck) && *why == CloseReason::Slow));
        assert!(!due.iter().any(|(s, _)| Arc::ptr_eq(s, &reader)));
        let shard = r.channels[shard_of("c")].lock();
        let log = &shard.get("c").unwrap().log;
        assert!(log.head() - log.floor() < crate::presence_log::MAX_KEPT as u64);
    }

    #[test]
    fn presence_counts_are_coalesced_and_a_users_zero_waits_for_the_grace() {
        let r = reg();
        let (a, _) = open_as(&r, &["c"], 8, Some("u"));
        let (b, _) = open_as(&r, &["c"], 8, Some("u"));
        let (anon, _) = open_as(&r, &["c"], 8, None);
        assert_eq!(
            reported(&r, 5),
            [("c".into(), None, 1), ("c".into(), Some("u".into()), 2)]
        );
        assert!(reported(&r, 5).is_empty(), "reported once");
        r.close(&a, CloseReason::Client);
        r.close(&b, CloseReason::Client);
        r.close(&anon, CloseReason::Client);
        // The anonymous 0 goes at once; the user's waits for the grace.
        assert_eq!(reported(&r, 5), [("c".into(), None, 0)]);
        assert!(reported(&r, 5).is_empty());
        // Back within the grace: reported as the count it is (1), never as 0.
        let (c, _) = open_as(&r, &["c"], 8, Some("u"));
        assert_eq!(reported(&r, 5), [("c".into(), Some("u".into()), 1)]);
        r.close(&c, CloseReason::Client);
        // A grace of 0: the 0 goes at once.
        assert_eq!(reported(&r, 0), [("c".into(), Some("u".into()), 0)]);
        assert_eq!(r.presence_gauges(), (0, 0));
    }

    #[test]
    fn unconfirmed_subscriptions_and_last_readers_are_reported() {
        let r = reg();
        let (a, unconfirmed) = open(&r, &["c1", "c2"], 8);
        assert_eq!(names(&unconfirmed), ["c1", "c2"]);
        let (b, unconfirmed) = open(&r, &["c1"], 8);
        assert_eq!(
            names(&unconfirmed),
            ["c1"],
            "its first reader is still subscribing it"
        );
        r.confirm_subscribed("c1");
        assert!(r.is_subscribed("c1") && !r.is_subscribed("c2"));
        let (c, unconfirmed) = open(&r, &["c1"], 8);
        assert!(unconfirmed.is_empty(), "later readers need not wait");
        assert_eq!(
            r.counts(),
            Counts {
                sse: 3,
                ws: 0,
                channels: 2
            }
        );
        assert_eq!(names(&r.close(&a, CloseReason::Client).unwrap()), ["c2"]);
        assert!(
            r.close(&a, CloseReason::Client).is_none(),
            "second close is a no-op"
        );
        assert!(r.close(&b, CloseReason::Client).unwrap().is_empty());
        assert_eq!(names(&r.close(&c, CloseReason::Client).unwrap()), ["c1"]);
        assert!(
            !r.is_subscribed("c1"),
            "an emptied channel starts unconfirmed again"
        );
        assert_eq!(r.counts(), Counts::default());
        assert_eq!(r.admitted(), 0);
        assert_eq!(r.reconcile(), Counts::default());
    }

    #[test]
    fn a_slow_reader_falls_behind_without_costing_the_fast_one_anything() {
        let r = reg();
        let (fast, _) = open(&r, &["c"], 4);
        let (slow, _) = open(&r, &["c"], 4);
        let mut cx = Context::from_waker(Waker::noop());
        let mut got = 0;
        for i in 1..=10 {
            r.fanout(&msg("c", Some(i)));
            r.fanout(&msg("c", None));
            while let Poll::Ready(Some(Item::Message(_))) = fast.poll_item(&mut cx) {
                got += 1;
            }
        }
        assert_eq!(got, 20);
        assert_eq!(slow.close_reason(), None, "never closed for being slow");
        assert_eq!(slow.queued(), 4, "its queue stays at its capacity");
        assert!(
            r.metrics
                .render()
                .contains(r#"hub_messages_dropped_total{reason="lagged"} 8"#),
            "the ephemeral messages it fell behind on are counted"
        );
    }

    #[test]
    fn per_user_admission_is_exact() {
        let r = reg();
        let alice: Arc<str> = Arc::from("alice");
        assert!(r.try_admit(10, Some(&alice), 2).is_ok());
        assert!(r.try_admit(10, Some(&alice), 2).is_ok());
        assert_eq!(
            r.try_admit(10, Some(&alice), 2),
            Err(RejectReason::UserLimit)
        );
        assert_eq!(r.user_streams("alice"), 2);
        assert_eq!(r.admitted(), 2);
        r.release(Some(&alice));
        assert_eq!(r.user_streams("alice"), 1);
        assert_eq!(r.try_admit(1, Some(&alice), 5), Err(RejectReason::Capacity));
        assert_eq!(
            r.user_streams("alice"),
            1,
            "a refusal for capacity takes nothing"
        );
    }

    #[test]
    fn the_tick_finds_streams_without_writes() {
        let r = reg();
        let (s, _) = open(&r, &["c"], 4);
        r.clock.secs.store(100, Ordering::Relaxed);
        let due = r.tick(100, 30, 0, 90, |_| false);
        assert_eq!(due.len(), 1);
        assert!(Arc::ptr_eq(&due[0].0, &s) && due[0].1 == CloseReason::Stale);
        assert_eq!(r.stale(90).len(), 1);
    }
}
