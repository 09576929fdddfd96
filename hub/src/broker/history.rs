//! In-memory channel history for the embedded broker: the last `HUB_HISTORY_LEN` durable
//! messages per channel, none older than `HUB_HISTORY_TTL_SECS` (or its namespace's
//! `history_len` and `history_ttl_secs`).
//!
//! Assigns positions and answers "what follows position P (at most N of it), and from where on
//! is history whole?". It knows nothing of readers; the caller delivers inside `append`'s lock
//! to keep per-channel order, and a read takes the same lock, so a read and a delivery never
//! interleave.

use crate::broker::Page;
use crate::message::Message;
use parking_lot::Mutex;
use protocol::{ChannelName, StreamId};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

const SHARDS: usize = 64;

type Shard = Mutex<HashMap<Arc<str>, Log>>;

struct Log {
    /// Every message after `floor` that was ever published here is still in `entries`.
    floor: StreamId,
    last: StreamId,
    entries: VecDeque<Arc<Message>>,
    /// The channel's limits (its namespace's, set when the log is made).
    max_len: usize,
    ttl_ms: u64,
}

/// Shared by the embedded broker; positions are `<ms>-<seq>` like Redis stream ids.
pub struct MemoryHistory {
    shards: Box<[Shard]>,
    /// The defaults (`HUB_HISTORY_LEN`, `HUB_HISTORY_TTL_SECS`) and the namespaces that
    /// override them per channel prefix.
    max_len: usize,
    ttl_ms: u64,
    namespaces: crate::namespaces::Namespaces,
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
        MemoryHistory::with_namespaces(max_len, ttl_secs, now_ms, Default::default())
    }

    /// [`MemoryHistory::new`], with namespaces whose `history_len` and `history_ttl_secs`
    /// override the defaults for their channels.
    pub fn with_namespaces(
        max_len: usize,
        ttl_secs: u64,
        now_ms: u64,
        namespaces: crate::namespaces::Namespaces,
    ) -> MemoryHistory {
        MemoryHistory {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            max_len,
            ttl_ms: ttl_secs * 1000,
            namespaces,
            start_ms: now_ms,
        }
    }

    /// A channel's length and TTL (ms).
    fn limits(&self, channel: &str) -> (usize, u64) {
        let ns = self.namespaces.of(channel);
        (
            ns.history_len.map_or(self.max_len, |l| l as usize),
            ns.history_ttl_secs.map_or(self.ttl_ms, |t| t * 1000),
        )
    }

    /// The oldest position a channel without a log can still vouch for: nothing from before
    /// start-up or older than the TTL could still be held.
    fn base(&self, ttl_ms: u64, now_ms: u64) -> StreamId {
        StreamId::new(self.start_ms.max(now_ms.saturating_sub(ttl_ms)), 0)
    }

    fn trim_expired(log: &mut Log, now_ms: u64) {
        let horizon = now_ms.saturating_sub(log.ttl_ms);
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
        let (max_len, ttl_ms) = self.limits(channel);
        let floor = self.base(ttl_ms, now_ms);
        // `last` starts at `now-0`, the tail handed out for a channel without a log, so the
        // first message is strictly after every position a stream could hold for it.
        let log = shard
            .entry(channel.as_arc().clone())
            .or_insert_with(|| Log {
                floor,
                last: StreamId::new(now_ms, 0),
                entries: VecDeque::new(),
                max_len,
                ttl_ms,
            });
        Self::trim_expired(log, now_ms);
        let id = log.last.next(now_ms);
        let msg = build(id);
        log.last = id;
        log.entries.push_back(msg.clone());
        while log.entries.len() > log.max_len {
            if let Some(m) = log.entries.pop_front() {
                log.floor = m.position.unwrap_or(log.floor);
            }
        }
        let r = then(&msg);
        (id, r)
    }

    /// The channel's latest position: where a fresh reader starts.
    pub fn tail(&self, channel: &ChannelName, now_ms: u64) -> StreamId {
        self.read(channel, StreamId::ZERO, 0, now_ms).tail
    }

    /// At most `count` messages after `after`, with the channel's tail and floor. A channel
    /// without a log vouches for positions from `base` to now (nothing was published there
    /// since, or a log would exist).
    pub fn read(&self, channel: &ChannelName, after: StreamId, count: usize, now_ms: u64) -> Page {
        let mut shard = self.shards[shard_of(channel)].lock();
        let Some(log) = shard.get_mut(channel.as_str()) else {
            return Page {
                entries: Vec::new(),
                tail: StreamId::new(now_ms, 0),
                floor: self.base(self.limits(channel).1, now_ms),
                more: false,
                last: None,
            };
        };
        Self::trim_expired(log, now_ms);
        let start = log
            .entries
            .partition_point(|m| m.position.is_some_and(|q| q <= after));
        let end = (start + count).min(log.entries.len());
        let entries: Vec<Arc<Message>> = log.entries.range(start..end).cloned().collect();
        Page {
            last: entries.last().and_then(|m| m.position),
            entries,
            tail: log.last,
            floor: log.floor,
            more: end < log.entries.len(),
        }
    }

    /// Where a stream that wants the last `n` messages of the channel starts: the position of
    /// the message before them, or the floor when history holds fewer (a resume from there
    /// replays all of it and is never a reset).
    pub fn rewind_point(&self, channel: &ChannelName, n: usize, now_ms: u64) -> StreamId {
        let mut shard = self.shards[shard_of(channel)].lock();
        let Some(log) = shard.get_mut(channel.as_str()) else {
            return StreamId::new(now_ms, 0);
        };
        Self::trim_expired(log, now_ms);
        let len = log.entries.len();
        if n == 0 {
            return log.last;
        }
        if len > n {
            log.entries[len - n - 1].position.unwrap_or(log.floor)
        } else {
            log.floor
        }
    }

    /// Drops expired messages and forgets channels whose every message has expired.
    pub fn expire(&self, now_ms: u64) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            shard.retain(|_, log| {
                Self::trim_expired(log, now_ms);
                !(log.entries.is_empty() && log.last.ms.saturating_add(log.ttl_ms) < now_ms)
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

    fn ids(p: &Page) -> Vec<StreamId> {
        p.entries.iter().filter_map(|m| m.position).collect()
    }

    /// Whether a reader at `pos` lost something (the rule readers apply to a page).
    fn lost(p: &Page, pos: StreamId) -> bool {
        pos < p.floor || pos > p.tail
    }

    #[test]
    fn pages_follow_the_position_and_the_floor_marks_what_fell_out() {
        let h = MemoryHistory::new(3, 3600, 1_000);
        let fresh = h.tail(&ch(), 1_000);
        assert_eq!(fresh, StreamId::new(1_000, 0));
        let a = add(&h, 1_000);
        let b = add(&h, 1_000);
        assert_eq!((a, b), (StreamId::new(1_000, 1), StreamId::new(1_000, 2)));
        // A quiet channel: a position handed out earlier stays good while within the TTL.
        let quiet = ChannelName::new("quiet").unwrap();
        let p = h.tail(&quiet, 1_500);
        assert!(!lost(&h.read(&quiet, p, 10, 3_000), p));
        // A reader that started before anything was published gets everything, in pages.
        let page = h.read(&ch(), fresh, 1, 1_001);
        assert_eq!((ids(&page), page.more), (vec![a], true));
        let page = h.read(&ch(), a, 10, 1_001);
        assert_eq!((ids(&page), page.more), (vec![b], false));
        assert!(ids(&h.read(&ch(), b, 10, 1_001)).is_empty());
        let c = add(&h, 2_000);
        let d = add(&h, 2_000);
        // Only 3 kept: b, c, d. From a, b is still there: fine. From the start, a is gone.
        let page = h.read(&ch(), a, 10, 2_001);
        assert_eq!(ids(&page), [b, c, d]);
        assert!(!lost(&page, a) && lost(&page, fresh));
        assert_eq!(page.tail, d);
        // A position from the future (another process, junk) is not ours.
        let future = StreamId::new(9_999, 0);
        assert!(lost(&h.read(&ch(), future, 10, 2_001), future));
    }

    #[test]
    fn a_rewind_point_is_followed_by_exactly_the_last_n_and_is_never_lost() {
        let h = MemoryHistory::new(4, 3600, 1_000);
        assert_eq!(h.rewind_point(&ch(), 3, 1_000), h.tail(&ch(), 1_000));
        let all: Vec<StreamId> = (0..6).map(|_| add(&h, 1_000)).collect();
        // History holds the last 4 (all[2..]).
        for n in 0..=6 {
            let at = h.rewind_point(&ch(), n, 1_000);
            let page = h.read(&ch(), at, 100, 1_000);
            assert!(!lost(&page, at), "rewind {n} from {at} would reset");
            assert_eq!(ids(&page), all[6 - n.min(4)..].to_vec(), "rewind {n}");
        }
    }

    #[test]
    fn ttl_expires_messages_and_channels() {
        let h = MemoryHistory::new(100, 10, 1_000);
        let a = add(&h, 1_000);
        let b = add(&h, 5_000);
        // At 12_000 the first is older than 10 s: a reader from before it lost it.
        let before = StreamId::new(1_000, 0);
        assert!(lost(&h.read(&ch(), before, 10, 12_000), before));
        assert_eq!(ids(&h.read(&ch(), a, 10, 12_000)), [b]);
        h.expire(16_000);
        assert_eq!(h.channels(), 0);
        // Positions from before the expiry are lost now, not a silent gap.
        assert!(lost(&h.read(&ch(), b, 10, 16_000), b));
    }

    #[test]
    fn a_restarted_process_does_not_vouch_for_old_positions() {
        let h = MemoryHistory::new(100, 3600, 50_000);
        let old = StreamId::new(40_000, 3);
        assert!(lost(&h.read(&ch(), old, 10, 50_001), old));
    }
}
