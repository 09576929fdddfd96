//! The node's local registry: which streams are open and which channels each one reads.
//!
//! It admits streams against the node limit, fans a message out to the local subscribers of its
//! channel, closes streams exactly once (keeping every count exact), and sweeps. It does no I/O
//! and never talks to a broker: it reports which channels gained or lost their last subscriber.

use crate::message::Message;
use crate::metrics::{CloseReason, DropReason, Metrics, RejectReason, Transport};
use crate::session::{Offer, Session};
use crate::transport;
use parking_lot::Mutex;
use protocol::{ChannelName, StreamId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Lock shards: enough that two cores rarely meet on one, few enough to sweep cheaply.
const SHARDS: usize = 64;

/// A channel's local subscribers, by session sequence number.
type Subscribers = HashMap<u64, Arc<Session>>;
type ChannelShard = Mutex<HashMap<Arc<str>, Subscribers>>;
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

/// Shared by `Arc` between the node, the transports' bodies and the background tasks.
pub struct Registry {
    channels: Box<[ChannelShard]>,
    sessions: Box<[SessionShard]>,
    /// Streams admitted (open or being set up); the limit applies to it.
    admitted: AtomicUsize,
    /// Streams admitted per token `sub`.
    users: Mutex<HashMap<Arc<str>, usize>>,
    open: [AtomicUsize; 2],
    channel_count: AtomicUsize,
    next_seq: AtomicU64,
    pub metrics: Arc<Metrics>,
    pub clock: CoarseClock,
    retry_ms: u64,
    /// Where channels that lost their last local subscriber are announced (the Redis broker
    /// unsubscribes them, after checking they are still empty). `None`: nobody needs to know.
    emptied_tx: Option<tokio::sync::mpsc::UnboundedSender<ChannelName>>,
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

impl Registry {
    pub fn new(
        metrics: Arc<Metrics>,
        retry_ms: u64,
        emptied_tx: Option<tokio::sync::mpsc::UnboundedSender<ChannelName>>,
    ) -> Registry {
        Registry {
            channels: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            sessions: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            admitted: AtomicUsize::new(0),
            users: Mutex::new(HashMap::new()),
            open: [AtomicUsize::new(0), AtomicUsize::new(0)],
            channel_count: AtomicUsize::new(0),
            next_seq: AtomicU64::new(1),
            metrics,
            clock: CoarseClock::new(),
            retry_ms,
            emptied_tx,
        }
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Reserves a place for a new stream of `user`: refused with `Capacity` when `max` streams
    /// are admitted, with `UserLimit` when `user` already has `per_user`. Released by `close`.
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

    fn release(&self, user: Option<&Arc<str>>) {
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
    }

    /// Streams admitted for `user`.
    pub fn user_streams(&self, user: &str) -> usize {
        self.users.lock().get(user).copied().unwrap_or(0)
    }

    /// Registers an admitted session under each of its channels. Returns the channels that had
    /// no local subscriber before (the broker must start receiving them).
    pub fn register(&self, session: &Arc<Session>) -> Vec<ChannelName> {
        self.sessions[(session.seq % SHARDS as u64) as usize]
            .lock()
            .insert(session.seq, session.clone());
        let mut first = Vec::new();
        for ch in session.channels().iter() {
            let mut shard = self.channels[shard_of(ch)].lock();
            let subs = shard.entry(ch.as_arc().clone()).or_insert_with(|| {
                first.push(ch.clone());
                HashMap::new()
            });
            subs.insert(session.seq, session.clone());
        }
        if !first.is_empty() {
            self.channel_count.fetch_add(first.len(), Ordering::Relaxed);
            self.metrics.channels.increment(first.len() as f64);
        }
        let t = session.transport;
        self.open[t as usize].fetch_add(1, Ordering::Relaxed);
        self.metrics.connections[t as usize].increment(1.0);
        self.metrics.opened[t as usize].increment(1);
        first
    }

    /// Closes a session once: unregisters it, counts it, ends its outbox with the reason's last
    /// frame, announces channels left without subscribers. `false` if it was already closed.
    pub fn close(&self, session: &Arc<Session>, reason: CloseReason) -> bool {
        if !session.mark_closed(reason) {
            return false;
        }
        let registered = self.sessions[(session.seq % SHARDS as u64) as usize]
            .lock()
            .remove(&session.seq)
            .is_some();
        for ch in session.channels() {
            self.unlink(session, &ch);
        }
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
        let last = transport::last_frame(session, reason, self.retry_ms);
        let discard = matches!(
            reason,
            CloseReason::Slow | CloseReason::Stale | CloseReason::Error
        );
        let dropped = session.finish(last, discard);
        if dropped > 0 {
            self.metrics
                .dropped(DropReason::Slow)
                .increment(dropped as u64);
        }
        true
    }

    /// Takes `session` off `channel`'s subscribers; announces the channel if it is left empty.
    fn unlink(&self, session: &Session, channel: &ChannelName) {
        let emptied = {
            let mut shard = self.channels[shard_of(channel)].lock();
            match shard.get_mut(channel.as_str()) {
                Some(subs) => {
                    subs.remove(&session.seq);
                    subs.is_empty() && shard.remove(channel.as_str()).is_some()
                }
                None => false,
            }
        };
        if emptied {
            self.channel_count.fetch_sub(1, Ordering::Relaxed);
            self.metrics.channels.decrement(1.0);
            if let Some(tx) = &self.emptied_tx {
                let _ = tx.send(channel.clone());
            }
        }
    }

    /// Subscribes an open stream to one more channel (WebSocket). The session must already
    /// hold the channel (pending). `false` if the stream was closed meanwhile.
    pub fn add_channel(&self, session: &Arc<Session>, channel: &ChannelName) -> bool {
        let created = {
            let mut shard = self.channels[shard_of(channel)].lock();
            let mut created = false;
            let subs = shard.entry(channel.as_arc().clone()).or_insert_with(|| {
                created = true;
                HashMap::new()
            });
            subs.insert(session.seq, session.clone());
            created
        };
        if created {
            self.channel_count.fetch_add(1, Ordering::Relaxed);
            self.metrics.channels.increment(1.0);
        }
        if session.close_reason().is_some() {
            // Closed between the session taking the channel and this: undo.
            self.unlink(session, channel);
            return false;
        }
        true
    }

    /// Unsubscribes a stream from one channel (WebSocket).
    pub fn remove_channel(&self, session: &Arc<Session>, channel: &ChannelName) {
        if session.remove_channel(channel) {
            self.unlink(session, channel);
        }
    }

    /// Offers `msg` to every local subscriber of its channel; closes those that are too slow.
    /// Returns how many streams it was queued for.
    pub fn fanout(&self, msg: &Arc<Message>) -> usize {
        let mut queued = 0;
        let mut slow = Vec::new();
        {
            let shard = self.channels[shard_of(&msg.channel)].lock();
            if let Some(subs) = shard.get(msg.channel.as_str()) {
                for s in subs.values() {
                    match s.offer(msg) {
                        Offer::Queued => queued += 1,
                        Offer::Full => slow.push(s.clone()),
                        Offer::Skipped => {}
                    }
                }
            }
        }
        for s in slow {
            tracing::info!(connection_id = %s.id, channel = %msg.channel, "closing slow stream: outbox full");
            self.metrics.dropped(DropReason::Slow).increment(1);
            self.close(&s, CloseReason::Slow);
        }
        queued
    }

    /// Queues a heartbeat to the streams whose turn it is at `tick` (each stream gets one every
    /// `every` ticks, spread by its sequence number), closes streams whose token expired by
    /// `now_unix`, and WebSockets that answered no ping for `stale_after` seconds.
    pub fn heartbeat(&self, tick: u64, every: u64, now_unix: u64, stale_after: u64) {
        let mut slow = Vec::new();
        let mut expired = Vec::new();
        let mut stale = Vec::new();
        let now = self.clock.now();
        let mut sent = 0;
        let turn = tick % every;
        for shard in self.sessions.iter() {
            let shard = shard.lock();
            for s in shard.values() {
                if s.expires_at.is_some_and(|e| e <= now_unix) {
                    expired.push(s.clone());
                } else if s.transport == Transport::Ws
                    && now.saturating_sub(s.last_write()) >= stale_after
                {
                    stale.push(s.clone());
                } else if s.seq % every == turn {
                    match s.push_heartbeat() {
                        Offer::Queued => sent += 1,
                        Offer::Full => slow.push(s.clone()),
                        Offer::Skipped => {}
                    }
                }
            }
        }
        self.metrics.heartbeats.increment(sent);
        for s in &expired {
            tracing::info!(connection_id = %s.id, "closing stream: its token expired");
            self.close(s, CloseReason::TokenExpired);
        }
        for s in &stale {
            tracing::info!(connection_id = %s.id, "closing WebSocket: no answer to pings");
            self.close(s, CloseReason::Stale);
        }
        for s in &slow {
            tracing::info!(connection_id = %s.id, "closing slow stream: no room for a heartbeat");
            self.close(s, CloseReason::Slow);
        }
    }

    /// Closes streams that accepted no write for `stale_after` seconds, then sets every gauge
    /// from the registry's own contents. Returns how many were closed.
    pub fn sweep(&self, stale_after: u64) -> usize {
        let now = self.clock.now();
        let stale: Vec<Arc<Session>> = self
            .snapshot()
            .into_iter()
            .filter(|s| now.saturating_sub(s.last_write()) >= stale_after)
            .collect();
        for s in &stale {
            tracing::info!(connection_id = %s.id, idle_secs = now - s.last_write(), "closing stale stream");
            self.close(s, CloseReason::Stale);
        }
        self.reconcile();
        stale.len()
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

    /// Every open session (for sweeps and drains; allocation proportional to streams).
    pub fn snapshot(&self) -> Vec<Arc<Session>> {
        let mut all = Vec::with_capacity(self.counts().sse + self.counts().ws);
        for shard in self.sessions.iter() {
            all.extend(shard.lock().values().cloned());
        }
        all
    }

    /// The oldest position any open stream holds for `channel` (where a backfill starts).
    pub fn min_position(&self, channel: &str) -> Option<StreamId> {
        let shard = self.channels[shard_of(channel)].lock();
        shard
            .get(channel)?
            .values()
            .filter_map(|s| s.position_of(channel))
            .min()
    }

    /// Tells every stream of `channel` that history lost what it needed (`hub.reset`), and
    /// moves it to `tail`.
    pub fn reset_channel(&self, channel: &ChannelName, tail: StreamId) {
        let mut slow = Vec::new();
        {
            let shard = self.channels[shard_of(channel)].lock();
            if let Some(subs) = shard.get(channel.as_str()) {
                for s in subs.values() {
                    let offer = s.reset_to(channel, tail, |positions| {
                        transport::reset_frame(s, positions, std::slice::from_ref(channel))
                    });
                    if offer == Offer::Full {
                        slow.push(s.clone());
                    }
                }
            }
        }
        for s in &slow {
            self.close(s, CloseReason::Slow);
        }
    }

    /// Whether a channel has local subscribers.
    pub fn has_subscribers(&self, channel: &str) -> bool {
        self.channels[shard_of(channel)]
            .lock()
            .contains_key(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Start;
    use protocol::Envelope;
    use std::task::{Context, Poll, Waker};

    fn reg() -> Registry {
        Registry::new(Arc::new(Metrics::new()), 1000, None)
    }

    type Opened = (Arc<Session>, Vec<ChannelName>);

    fn open(r: &Registry, chans: &[&str], cap: usize) -> Opened {
        assert!(r.try_admit(100, None, 1).is_ok());
        let chans: Vec<ChannelName> = chans.iter().map(|c| ChannelName::new(c).unwrap()).collect();
        let n = chans.len();
        let s = Arc::new(Session::new(
            r.next_seq(),
            Transport::Sse,
            chans,
            false,
            None,
            cap,
            0,
        ));
        let first = r.register(&s);
        s.start(Start {
            head: vec![],
            positions: vec![StreamId::ZERO; n],
            replay: vec![],
        })
        .unwrap();
        (s, first)
    }

    fn msg(c: &str, i: u64) -> Arc<Message> {
        let env = Envelope {
            event: None,
            data: "x".into(),
        };
        Arc::new(Message::new(
            ChannelName::new(c).unwrap(),
            Some(StreamId::new(i, 0)),
            &env,
            Instant::now(),
        ))
    }

    #[test]
    fn first_and_last_subscriber_are_reported() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let r = Registry::new(Arc::new(Metrics::new()), 1000, Some(tx));
        let (a, first) = open(&r, &["c1", "c2"], 8);
        assert_eq!(first.len(), 2);
        let (b, first) = open(&r, &["c1"], 8);
        assert!(first.is_empty());
        assert_eq!(
            r.counts(),
            Counts {
                sse: 2,
                ws: 0,
                channels: 2
            }
        );
        assert!(r.close(&a, CloseReason::Client));
        assert_eq!(rx.try_recv().map(|c| c.to_string()), Ok("c2".to_string()));
        assert!(rx.try_recv().is_err());
        assert!(!r.close(&a, CloseReason::Client), "second close is a no-op");
        assert!(r.close(&b, CloseReason::Client));
        assert_eq!(rx.try_recv().map(|c| c.to_string()), Ok("c1".to_string()));
        assert_eq!(r.counts(), Counts::default());
        assert_eq!(r.admitted(), 0);
        assert_eq!(r.reconcile(), Counts::default());
    }

    #[test]
    fn slow_subscriber_is_closed_and_fast_one_keeps_everything() {
        let r = reg();
        let (fast, _) = open(&r, &["c"], 4);
        let (slow, _) = open(&r, &["c"], 4);
        let mut cx = Context::from_waker(Waker::noop());
        let mut got = 0;
        for i in 1..=10 {
            r.fanout(&msg("c", i));
            while let Poll::Ready(Some(_)) = fast.poll_chunk(&mut cx) {
                got += 1;
            }
        }
        assert_eq!(got, 10);
        assert_eq!(slow.close_reason(), Some(CloseReason::Slow));
        assert_eq!(r.counts().sse, 1);
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
    fn sweep_closes_streams_without_writes() {
        let r = reg();
        let (s, _) = open(&r, &["c"], 4);
        r.clock.secs.store(100, Ordering::Relaxed);
        r.sweep(90);
        assert_eq!(s.close_reason(), Some(CloseReason::Stale));
        assert_eq!(r.counts(), Counts::default());
    }
}
