//! In-memory channel history for the embedded broker: the last `HUB_HISTORY_LEN` durable
//! messages per channel, none older than `HUB_HISTORY_TTL_SECS`.
//!
//! Assigns positions and answers "what follows position P, or was something lost?". It knows
//! nothing of subscribers; the caller delivers inside `append`'s lock to keep per-channel order.

use crate::message::Message;
use parking_lot::Mutex;
use protocol::{ChannelName, StreamId};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

const SHARDS: usize = 64;

type Shard = Mutex<HashMap<Arc<str>, Log>>;

/// The answer to a resume or a fresh subscribe.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The channel's latest position (where a fresh or reset stream starts).
    pub tail: StreamId,
    /// Messages after the asked position, in order.
    pub replay: Vec<Arc<Message>>,
    /// The asked position is older than what history still holds, or unreadable: the client
    /// must be told (`hub.reset`) and starts from `tail`.
    pub reset: bool,
}

struct Log {
    /// Every message after `floor` that was ever published here is still in `entries`.
    floor: StreamId,
    last: StreamId,
    entries: VecDeque<Arc<Message>>,
}

/// Shared by the embedded broker; positions are `<ms>-<seq>` like Redis stream ids.
pub struct MemoryHistory {
    shards: Box<[Shard]>,
    max_len: usize,
    ttl_ms: u64,
    /// Nothing from before this process can be in memory.
    start_ms: u64,
}

fn shard_of(key: &str) -> usize {
    key.bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
        % SHARDS
}

impl MemoryHistory {
    pub fn new(max_len: usize, ttl_secs: u64, now_ms: u64) -> MemoryHistory {
        MemoryHistory {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            max_len,
            ttl_ms: ttl_secs * 1000,
            start_ms: now_ms,
        }
    }

    /// The oldest position a channel without a log can still vouch for: nothing from before
    /// start-up or older than the TTL could still be held.
    fn base(&self, now_ms: u64) -> StreamId {
        StreamId::new(self.start_ms.max(now_ms.saturating_sub(self.ttl_ms)), 0)
    }

    fn trim_expired(&self, log: &mut Log, now_ms: u64) {
        let horizon = now_ms.saturating_sub(self.ttl_ms);
        while log
            .entries
            .front()
            .is_some_and(|m| m.position.is_some_and(|p| p.ms < horizon))
        {
            if let Some(m) = log.entries.pop_front() {
                log.floor = m.position.unwrap_or(log.floor);
            }
        }
    }

    /// Assigns the next position, stores the message built for it, and runs `then` on it while
    /// the channel is still locked, so that deliveries leave in position order.
    pub fn append<R>(
        &self,
        channel: &ChannelName,
        now_ms: u64,
        build: impl FnOnce(StreamId) -> Arc<Message>,
        then: impl FnOnce(&Arc<Message>) -> R,
    ) -> (StreamId, R) {
        let mut shard = self.shards[shard_of(channel)].lock();
        let floor = self.base(now_ms);
        // `last` starts at `now-0`, the tail handed out for a channel without a log, so the
        // first message is strictly after every position a stream could hold for it.
        let log = shard
            .entry(channel.as_arc().clone())
            .or_insert_with(|| Log {
                floor,
                last: StreamId::new(now_ms, 0),
                entries: VecDeque::new(),
            });
        self.trim_expired(log, now_ms);
        let id = log.last.next(now_ms);
        let msg = build(id);
        log.last = id;
        log.entries.push_back(msg.clone());
        while log.entries.len() > self.max_len {
            if let Some(m) = log.entries.pop_front() {
                log.floor = m.position.unwrap_or(log.floor);
            }
        }
        let r = then(&msg);
        (id, r)
    }

    /// What a stream starting at `since` (or fresh, with `None`) must be sent.
    pub fn recover(&self, channel: &ChannelName, since: Option<StreamId>, now_ms: u64) -> Recovery {
        let mut shard = self.shards[shard_of(channel)].lock();
        let Some(log) = shard.get_mut(channel.as_str()) else {
            // No log: nothing was published since `base` (a log would exist), so a position
            // at or after it misses nothing; an older one may have missed expired messages,
            // and one from the future is not ours.
            let tail = StreamId::new(now_ms, 0);
            let reset = since.is_some_and(|p| p < self.base(now_ms) || p.ms > now_ms);
            return Recovery {
                tail,
                replay: Vec::new(),
                reset,
            };
        };
        self.trim_expired(log, now_ms);
        let tail = log.last;
        match since {
            None => Recovery {
                tail,
                replay: Vec::new(),
                reset: false,
            },
            Some(p) if p < log.floor || p > log.last => Recovery {
                tail,
                replay: Vec::new(),
                reset: true,
            },
            Some(p) => {
                let start = log
                    .entries
                    .partition_point(|m| m.position.is_some_and(|q| q <= p));
                Recovery {
                    tail,
                    replay: log.entries.range(start..).cloned().collect(),
                    reset: false,
                }
            }
        }
    }

    /// Drops expired messages and forgets channels whose every message has expired.
    pub fn expire(&self, now_ms: u64) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            shard.retain(|_, log| {
                self.trim_expired(log, now_ms);
                !(log.entries.is_empty() && log.last.ms.saturating_add(self.ttl_ms) < now_ms)
            });
        }
    }

    /// Channels with a log (for stats).
    pub fn channels(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Envelope;
    use std::time::Instant;

    fn ch() -> ChannelName {
        ChannelName::new("c").unwrap()
    }

    fn add(h: &MemoryHistory, now: u64) -> StreamId {
        let env = Envelope {
            event: None,
            data: "x".into(),
        };
        h.append(
            &ch(),
            now,
            |id| Arc::new(Message::new(ch(), Some(id), &env, Instant::now())),
            |_| (),
        )
        .0
    }

    fn ids(r: &Recovery) -> Vec<StreamId> {
        r.replay.iter().filter_map(|m| m.position).collect()
    }

    #[test]
    fn replays_what_follows_and_resets_what_fell_out() {
        let h = MemoryHistory::new(3, 3600, 1_000);
        let fresh = h.recover(&ch(), None, 1_000);
        assert_eq!(fresh.tail, StreamId::new(1_000, 0));
        let a = add(&h, 1_000);
        let b = add(&h, 1_000);
        assert_eq!((a, b), (StreamId::new(1_000, 1), StreamId::new(1_000, 2)));
        // A quiet channel: a position handed out earlier stays good while within the TTL.
        let quiet = ChannelName::new("quiet").unwrap();
        let p = h.recover(&quiet, None, 1_500).tail;
        assert!(!h.recover(&quiet, Some(p), 3_000).reset);
        // A stream that started before anything was published gets everything.
        assert_eq!(ids(&h.recover(&ch(), Some(fresh.tail), 1_001)), [a, b]);
        assert_eq!(ids(&h.recover(&ch(), Some(a), 1_001)), [b]);
        assert!(ids(&h.recover(&ch(), Some(b), 1_001)).is_empty());
        let c = add(&h, 2_000);
        let d = add(&h, 2_000);
        // Only 3 kept: b, c, d. From a, b is still there: fine. From the start, a is gone: reset.
        assert_eq!(ids(&h.recover(&ch(), Some(a), 2_001)), [b, c, d]);
        let r = h.recover(&ch(), Some(fresh.tail), 2_001);
        assert!(r.reset && r.replay.is_empty() && r.tail == d);
        // A position from the future (another process, junk) is unreadable: reset.
        assert!(h.recover(&ch(), Some(StreamId::new(9_999, 0)), 2_001).reset);
    }

    #[test]
    fn ttl_expires_messages_and_channels() {
        let h = MemoryHistory::new(100, 10, 1_000);
        let a = add(&h, 1_000);
        let b = add(&h, 5_000);
        // At 12_000 the first is older than 10 s: resuming from before it is a reset.
        let r = h.recover(&ch(), Some(StreamId::new(1_000, 0)), 12_000);
        assert!(r.reset);
        assert_eq!(ids(&h.recover(&ch(), Some(a), 12_000)), [b]);
        h.expire(16_000);
        assert_eq!(h.channels(), 0);
        // Positions from before the expiry are now a reset, not a silent gap.
        assert!(h.recover(&ch(), Some(b), 16_000).reset);
    }

    #[test]
    fn a_restarted_process_resets_old_positions() {
        let h = MemoryHistory::new(100, 3600, 50_000);
        assert!(
            h.recover(&ch(), Some(StreamId::new(40_000, 3)), 50_001)
                .reset
        );
    }
}
