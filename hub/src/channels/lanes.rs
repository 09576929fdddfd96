//! The fan-out lanes: one thread per core that offers messages to local readers, so that a
//! publisher (the HTTP handler, the Redis subscriber, the embedded broker) only queues a
//! message and goes on. Each lane serves the readers whose sequence number falls to it and
//! takes each channel's messages in the order queued (a stream's messages of a channel keep
//! their order); a large channel's fan-out is shared by every lane, done in parts, and other
//! channels' messages go out between its parts.
//!
//! Bounded: a lane holds at most [`LANE_MESSAGES`] messages and [`LANE_BYTES`] of data; a
//! message that does not fit is not queued there, and its channel's readers on that lane fall
//! behind (a durable message comes back from history; an ephemeral one is counted lost). Does
//! no I/O of its own: a session may write its socket when offered a message.

use super::fanout::Offered;
use super::{shard_of, Registry};
use crate::message::Message;
use crate::metrics::DropReason;
use crate::stream::{Session, OFFER_BATCH};
use parking_lot::{Condvar, Mutex};
use protocol::ChannelName;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

/// Messages one lane holds at most: a burst of this many is taken without loss while the lane
/// works (about 8 bytes each here; the messages are shared with history and the publisher).
pub(super) const LANE_MESSAGES: usize = 16_384;
/// Bytes of message data one lane holds at most (a burst of large messages is bounded by
/// memory, not by count).
pub(super) const LANE_BYTES: usize = 64 << 20;
/// Stack of a lane thread: it offers messages to sessions, which may write a socket and
/// compress a frame (a deflate call needs far more than an offer; 256 KB overflowed). Only
/// the pages touched are memory.
const LANE_STACK: usize = 2 << 20;

#[derive(Default)]
struct Queue {
    msgs: VecDeque<Arc<Message>>,
    /// Taken by the lane's thread and not offered yet (still within the bound).
    taken: usize,
    /// Data of the messages queued or taken and not offered yet.
    bytes: usize,
    closed: bool,
}

#[derive(Default)]
struct Lane {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// The lanes of one registry. Dropping them stops their threads (after the batch in hand).
pub(super) struct Lanes {
    lanes: Box<[Arc<Lane>]>,
    /// The coarse second of the last "lane full" warning (one a second at most).
    warned: AtomicU64,
}

impl Drop for Lanes {
    fn drop(&mut self) {
        for lane in self.lanes.iter() {
            lane.queue.lock().closed = true;
            lane.ready.notify_one();
        }
    }
}

/// A message's size as a lane counts it.
fn size_of(msg: &Message) -> usize {
    msg.data_json.len() + msg.channel.as_str().len() + 64
}

impl Lanes {
    /// `n` lanes without threads: what is queued stays (tests of the bounds use them so).
    pub(super) fn idle(n: usize) -> Lanes {
        Lanes {
            lanes: (0..n).map(|_| Arc::new(Lane::default())).collect(),
            warned: AtomicU64::new(u64::MAX),
        }
    }

    /// Starts `n` lanes (at least one) for `registry`. A lane that cannot get a thread (a
    /// resource limit) is an error: the node does not start half able to deliver.
    pub(super) fn start(registry: &Arc<Registry>, n: usize) -> std::io::Result<Lanes> {
        let n = n.max(1);
        let lanes = Lanes::idle(n);
        for (k, lane) in lanes.lanes.iter().enumerate() {
            let (lane, registry) = (lane.clone(), Arc::downgrade(registry));
            std::thread::Builder::new()
                .name(format!("hub-fanout-{k}"))
                .stack_size(LANE_STACK)
                .spawn(move || run(&lane, &registry, k, n))?;
        }
        Ok(lanes)
    }

    pub(super) fn len(&self) -> usize {
        self.lanes.len()
    }

    /// Queues `msg` on every lane. Returns the lanes it did not fit on (their readers of its
    /// channel must fall behind).
    pub(super) fn queue(&self, msg: &Arc<Message>) -> Vec<usize> {
        let size = size_of(msg);
        let mut full = Vec::new();
        for (k, lane) in self.lanes.iter().enumerate() {
            let mut q = lane.queue.lock();
            if q.msgs.len() + q.taken >= LANE_MESSAGES || q.bytes + size > LANE_BYTES {
                full.push(k);
                continue;
            }
            let was_empty = q.msgs.is_empty();
            q.msgs.push_back(msg.clone());
            q.bytes += size;
            drop(q);
            if was_empty {
                lane.ready.notify_one();
            }
        }
        full
    }
}

/// Readers a lane offers a large channel's messages to before it looks at what else waits: a
/// large fan-out is done in parts of this many, so another channel's message waits for one
/// part (a few milliseconds of writes), not for the whole fan-out.
const PART: usize = 256;

/// A large channel's run of messages being offered a part at a time.
struct Large {
    msgs: Vec<Arc<Message>>,
    readers: Vec<Arc<Session>>,
    at: usize,
    offered: Offered,
}

/// A lane's thread, until the lanes are dropped: takes what is queued, offers one part of the
/// large fan-out under way (if one is), then every waiting run of messages whose channel is
/// free: a small channel's at once, a large one's as the next fan-out in parts. A channel with
/// a run still waiting or under way keeps its later messages waiting (order per channel).
fn run(lane: &Lane, registry: &Weak<Registry>, k: usize, n: usize) {
    let mut pending: VecDeque<Arc<Message>> = VecDeque::new();
    let mut large: Option<Large> = None;
    let mut readers: Vec<Arc<Session>> = Vec::new();
    // Offered since the last look at the queue: given back to its bound then.
    let (mut done, mut done_bytes) = (0usize, 0usize);
    loop {
        {
            let mut q = lane.queue.lock();
            q.taken -= done;
            q.bytes -= done_bytes;
            (done, done_bytes) = (0, 0);
            while q.msgs.is_empty() && pending.is_empty() && large.is_none() && !q.closed {
                lane.ready.wait(&mut q);
            }
            if q.closed {
                return;
            }
            q.taken += q.msgs.len();
            pending.extend(q.msgs.drain(..));
        }
        let Some(registry) = registry.upgrade() else {
            return;
        };
        if let Some(l) = &mut large {
            let end = (l.at + PART).min(l.readers.len());
            offer_to(&l.readers[l.at..end], &l.msgs, &mut l.offered);
            l.at = end;
            if end == l.readers.len() {
                registry.count_offered(&l.offered);
                done += l.msgs.len();
                done_bytes += sizes(&l.msgs);
                large = None;
            }
        }
        let mut blocked: Vec<ChannelName> =
            large.iter().map(|l| l.msgs[0].channel.clone()).collect();
        let mut kept = VecDeque::new();
        while let Some(first) = pending.front() {
            let channel = first.channel.clone();
            // Runs of one channel's messages go to each reader together (up to OFFER_BATCH):
            // what queued while the lane worked costs each socket one write.
            let len = pending
                .iter()
                .take(OFFER_BATCH)
                .take_while(|m| m.channel == channel)
                .count();
            let msgs: Vec<Arc<Message>> = pending.drain(..len).collect();
            if blocked.contains(&channel) {
                kept.extend(msgs);
                continue;
            }
            registry.lane_readers(&channel, k, n, &mut readers);
            if readers.len() <= PART {
                let mut offered = Offered::default();
                offer_to(&readers, &msgs, &mut offered);
                registry.count_offered(&offered);
                readers.clear();
                done += msgs.len();
                done_bytes += sizes(&msgs);
            } else if large.is_none() {
                large = Some(Large {
                    msgs,
                    readers: std::mem::take(&mut readers),
                    at: 0,
                    offered: Offered::default(),
                });
                blocked.push(channel);
            } else {
                readers.clear();
                kept.extend(msgs);
                blocked.push(channel);
            }
        }
        pending = kept;
    }
}

/// Offers `msgs` (one channel's, in order) to each of `readers`, counting the outcomes.
fn offer_to(readers: &[Arc<Session>], msgs: &[Arc<Message>], offered: &mut Offered) {
    for s in readers {
        s.offer_many(msgs, |o| offered.count(o));
    }
}

/// The size of `msgs` as a lane's bound counts it.
fn sizes(msgs: &[Arc<Message>]) -> usize {
    msgs.iter().map(|m| size_of(m)).sum()
}

impl Registry {
    /// The readers of `channel` that lane `k` of `n` serves, into `readers`: a snapshot taken
    /// under the channel's lock, offered after it (a stream that joins or leaves meanwhile is
    /// not held up by the fan-out).
    fn lane_readers(
        &self,
        channel: &ChannelName,
        k: usize,
        n: usize,
        readers: &mut Vec<Arc<Session>>,
    ) {
        let shard = self.channels[shard_of(channel)].lock();
        if let Some(c) = shard.get(channel.as_str()) {
            readers.extend(
                c.readers
                    .iter()
                    .filter(|(seq, _)| lane_of(**seq, n) == k)
                    .map(|(_, s)| s.clone()),
            );
        }
    }

    /// `msg` did not fit on lane `k` of `n`: that lane's readers of its channel fall behind
    /// (history carries a durable message to them; an ephemeral one is lost to each, counted).
    pub(super) fn lane_full(&self, lanes: &Lanes, msg: &Message, k: usize) {
        let mut readers = Vec::new();
        self.lane_readers(&msg.channel, k, lanes.len(), &mut readers);
        if msg.position.is_none() && !readers.is_empty() {
            self.metrics
                .dropped(DropReason::Lagged)
                .increment(readers.len() as u64);
        }
        for s in &readers {
            s.fall_behind_on(msg.channel.as_str());
        }
        let now = self.clock.now();
        if lanes.warned.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(
                channel = %msg.channel,
                lane = k,
                readers = readers.len(),
                "a fan-out lane is full: its readers of this channel fall behind (one warning a second at most)"
            );
        }
    }
}

/// The lane that serves the stream with sequence number `seq` (of `n`).
pub(super) fn lane_of(seq: u64, n: usize) -> usize {
    (seq % n as u64) as usize
}
