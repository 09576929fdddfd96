//! The node's coarse clock and what its one-second tick finds due: heartbeats spread over the
//! interval, expired tokens, silent and vanished streams, sleepers whose queue is given back.
//! It decides nothing about timing (the ticker does) and closes nothing (the node does).

use super::Registry;
use crate::domain::CloseReason;
use crate::metrics::DropReason;
use crate::stream::Session;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// A stream that fell behind and whose transport took nothing for this long (seconds) gives
/// back its queued durable messages (see `Session::trim_if_idle`): a reader that sleeps costs
/// no queued messages.
const TRIM_AFTER_SECS: u64 = 3;

/// A clock in whole seconds since start, advanced by the node's tick; reading it costs a load.
pub struct CoarseClock {
    start: Instant,
    pub(super) secs: AtomicU64,
}

impl CoarseClock {
    pub(super) fn new() -> Self {
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

/// Streams the tick found due for closing, with the reason.
pub type Due = Vec<(Arc<Session>, CloseReason)>;

impl Registry {
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
                if s.is_multiplexed() {
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
}
