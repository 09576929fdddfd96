//! One stream's state: its channels, its resume positions and its bounded outbox.
//!
//! Fan-out pushes shared frames into the outbox without waiting; a full outbox is reported to the
//! caller, which closes the stream as slow. The transport's body pulls from it. Owned by the
//! registry and the transport body through `Arc`; this module never touches sockets or metrics.

use crate::message::Message;
use crate::metrics::{CloseReason, Transport};
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use protocol::{ChannelName, Cursor, StreamId};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

/// What the transport body writes next.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub bytes: Bytes,
    /// Set on the chunk that completes a message: it counts as a delivery and its latency is
    /// measured from this instant when it is written.
    pub published: Option<Instant>,
    /// A WebSocket ping rather than data.
    pub ping: bool,
}

impl Chunk {
    fn data(bytes: Bytes, published: Option<Instant>) -> Chunk {
        Chunk {
            bytes,
            published,
            ping: false,
        }
    }
}

/// Result of offering something to a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// Already delivered (an older position), not subscribed, or the stream is ending.
    Skipped,
    /// The outbox is full: the reader is too slow; the caller closes the stream.
    Full,
}

/// The outbox overflowed while channels were being started (their replay and what arrived
/// meanwhile did not fit): the caller closes the stream as slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

/// What a stream (or one newly subscribed channel) is told when it starts.
pub struct Start {
    /// Frames written first, in order (`hub.connected`, `hub.reset`, `subscribed`...).
    pub head: Vec<Bytes>,
    /// The position each started channel starts from, in the order of `channels`.
    pub positions: Vec<StreamId>,
    /// History to replay, in order per channel.
    pub replay: Vec<Arc<Message>>,
}

/// One channel of a stream.
struct Chan {
    name: ChannelName,
    /// Last position delivered (or started from); older messages are skipped, which makes
    /// replay + live exactly-once.
    pos: StreamId,
    /// Being started: live messages wait in `Outbox::waiting` until its replay is queued.
    pending: bool,
}

struct Outbox {
    queue: VecDeque<Chunk>,
    /// Sorted by name.
    chans: Vec<Chan>,
    /// Live messages of pending channels (bounded like the queue).
    waiting: Vec<Arc<Message>>,
    /// Frames other than messages may be written (after `hub.connected` for SSE).
    started: bool,
    waker: Option<Waker>,
    /// No more pushes; the body ends once the queue is drained.
    ending: bool,
}

impl Outbox {
    fn index(&self, channel: &str) -> Option<usize> {
        self.chans
            .binary_search_by(|c| c.name.as_str().cmp(channel))
            .ok()
    }
}

/// A stream. Cloning the `Arc` is the only sharing; the outbox has its own small lock that is
/// never held while taking another lock.
pub struct Session {
    /// Node-local key (also spreads heartbeats over the interval).
    pub seq: u64,
    /// The `connection_id` clients see.
    pub id: uuid::Uuid,
    pub transport: Transport,
    /// Fingerprint of the channel list an SSE stream opened with (for its cursor).
    fingerprint: u32,
    /// `envelope=true`: each data is the JSON envelope with the channel.
    pub envelope: bool,
    /// The token's `sub`, when there is one.
    pub user: Option<Arc<str>>,
    /// The token's `exp` (Unix seconds): the stream is closed then.
    pub expires_at: Option<u64>,
    /// Chunks the outbox may hold: a multi-channel SSE stream uses two per message.
    capacity: usize,
    /// Coarse clock reading (seconds) of the last sign of life: a chunk the transport accepted
    /// (SSE) or a frame from the client, pongs included (WebSocket).
    last_write: AtomicU64,
    /// 0 while open, else the `CloseReason` that ended it (first one wins).
    closed: AtomicU8,
    outbox: Mutex<Outbox>,
}

impl Session {
    /// A stream whose `channels` (sorted, deduplicated) all start pending: call `start`.
    pub fn new(
        seq: u64,
        transport: Transport,
        channels: Vec<ChannelName>,
        envelope: bool,
        user: Option<Arc<str>>,
        outbox_len: usize,
        now: u64,
    ) -> Session {
        let per_message = if channels.len() > 1 && transport == Transport::Sse {
            2
        } else {
            1
        };
        let fingerprint = Cursor::fingerprint(&channels);
        let chans = channels
            .into_iter()
            .map(|name| Chan {
                name,
                pos: StreamId::ZERO,
                pending: true,
            })
            .collect();
        Session {
            seq,
            id: uuid::Uuid::new_v4(),
            transport,
            fingerprint,
            envelope,
            user,
            expires_at: None,
            capacity: outbox_len * per_message,
            last_write: AtomicU64::new(now),
            closed: AtomicU8::new(0),
            outbox: Mutex::new(Outbox {
                queue: VecDeque::new(),
                chans,
                waiting: Vec::new(),
                started: false,
                waker: None,
                ending: false,
            }),
        }
    }

    /// The channels this stream reads now.
    pub fn channels(&self) -> Vec<ChannelName> {
        self.outbox
            .lock()
            .chans
            .iter()
            .map(|c| c.name.clone())
            .collect()
    }

    pub fn channel_count(&self) -> usize {
        self.outbox.lock().chans.len()
    }

    /// The SSE `id:` for these positions (see [`Cursor`]).
    pub fn cursor(&self, positions: &[StreamId]) -> String {
        Cursor::encode(self.fingerprint, positions)
    }

    /// Reads a `Last-Event-ID` for this stream's channels.
    pub fn decode_cursor(&self, id: &str) -> Option<Vec<StreamId>> {
        Cursor::decode(id, self.channel_count(), self.fingerprint)
    }

    fn wake(mut ob: parking_lot::MutexGuard<'_, Outbox>) {
        let waker = ob.waker.take();
        drop(ob);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Offers a live message. Never blocks on the reader.
    pub fn offer(&self, msg: &Arc<Message>) -> Offer {
        let mut ob = self.outbox.lock();
        if ob.ending {
            return Offer::Skipped;
        }
        let Some(idx) = ob.index(&msg.channel) else {
            return Offer::Skipped;
        };
        if ob.chans[idx].pending {
            if ob.waiting.len() >= self.capacity {
                return Offer::Full;
            }
            ob.waiting.push(msg.clone());
            return Offer::Queued;
        }
        let offer = self.push_message(&mut ob, idx, msg);
        if offer == Offer::Queued {
            Self::wake(ob);
        }
        offer
    }

    fn push_message(&self, ob: &mut Outbox, idx: usize, msg: &Arc<Message>) -> Offer {
        if let Some(pos) = msg.position {
            if pos <= ob.chans[idx].pos {
                return Offer::Skipped;
            }
        }
        let multi =
            self.transport == Transport::Sse && ob.chans.len() > 1 && msg.position.is_some();
        if ob.queue.len() + if multi { 2 } else { 1 } > self.capacity {
            return Offer::Full;
        }
        if let Some(pos) = msg.position {
            ob.chans[idx].pos = pos;
        }
        let published = Some(msg.received);
        match self.transport {
            Transport::Ws => ob.queue.push_back(Chunk::data(msg.ws_frame(), published)),
            Transport::Sse if multi => {
                let positions: Vec<StreamId> = ob.chans.iter().map(|c| c.pos).collect();
                let cursor = self.cursor(&positions);
                let mut line = BytesMut::with_capacity(cursor.len() + 5);
                protocol::sse::write_id(&mut line, &cursor);
                ob.queue.push_back(Chunk::data(line.freeze(), None));
                ob.queue
                    .push_back(Chunk::data(msg.frame_body(self.envelope), published));
            }
            Transport::Sse if msg.position.is_some() => ob
                .queue
                .push_back(Chunk::data(msg.frame(self.envelope), published)),
            Transport::Sse => ob
                .queue
                .push_back(Chunk::data(msg.frame_body(self.envelope), published)),
        }
        Offer::Queued
    }

    /// Queues the transport's heartbeat (SSE comment, WebSocket ping). Skipped until the
    /// stream has started, so that `hub.connected` stays the first frame.
    pub fn push_heartbeat(&self) -> Offer {
        let chunk = match self.transport {
            Transport::Sse => Chunk::data(Bytes::from_static(protocol::sse::HEARTBEAT), None),
            Transport::Ws => Chunk {
                bytes: Bytes::new(),
                published: None,
                ping: true,
            },
        };
        self.push_chunk(chunk)
    }

    /// Queues a frame that is not a message (a WebSocket reply).
    pub fn push_frame(&self, bytes: Bytes) -> Offer {
        self.push_chunk(Chunk::data(bytes, None))
    }

    fn push_chunk(&self, chunk: Chunk) -> Offer {
        let mut ob = self.outbox.lock();
        if ob.ending || !ob.started {
            return Offer::Skipped;
        }
        if ob.queue.len() >= self.capacity {
            return Offer::Full;
        }
        ob.queue.push_back(chunk);
        Self::wake(ob);
        Offer::Queued
    }

    /// Starts every pending channel: writes the head frames, replays history, then what
    /// arrived live meanwhile, skipping what replay covered. `positions` are in the order of
    /// the pending channels. Returns how many messages were replayed, or [`Overflow`].
    pub fn start(&self, start: Start) -> Result<usize, Overflow> {
        let mut ob = self.outbox.lock();
        let pending: Vec<usize> = (0..ob.chans.len())
            .filter(|&i| ob.chans[i].pending)
            .collect();
        let started = self.start_locked(&mut ob, &pending, start);
        Self::wake(ob);
        started
    }

    /// Adds a channel to a started stream (WebSocket subscribe), pending until
    /// `start_channel`. `false` if the stream is ending or already has it.
    pub fn add_channel(&self, name: ChannelName) -> bool {
        let mut ob = self.outbox.lock();
        if ob.ending || self.closed.load(Ordering::Acquire) != 0 {
            return false;
        }
        match ob.chans.binary_search_by(|c| c.name.cmp(&name)) {
            Ok(_) => false,
            Err(at) => {
                ob.chans.insert(
                    at,
                    Chan {
                        name,
                        pos: StreamId::ZERO,
                        pending: true,
                    },
                );
                true
            }
        }
    }

    /// Starts one pending channel (see `start`).
    pub fn start_channel(&self, name: &str, start: Start) -> Result<usize, Overflow> {
        let mut ob = self.outbox.lock();
        let Some(idx) = ob.index(name).filter(|&i| ob.chans[i].pending) else {
            return Ok(0);
        };
        let started = self.start_locked(&mut ob, &[idx], start);
        Self::wake(ob);
        started
    }

    fn start_locked(
        &self,
        ob: &mut Outbox,
        idxs: &[usize],
        start: Start,
    ) -> Result<usize, Overflow> {
        if ob.ending {
            return Ok(0);
        }
        for (&i, p) in idxs.iter().zip(&start.positions) {
            ob.chans[i].pos = *p;
            ob.chans[i].pending = false;
        }
        ob.started = true;
        for bytes in start.head {
            ob.queue.push_back(Chunk::data(bytes, None));
        }
        let mut replayed = 0;
        let mut overflow = false;
        for msg in &start.replay {
            if let Some(i) = ob.index(&msg.channel) {
                match self.push_message(ob, i, msg) {
                    Offer::Queued => replayed += 1,
                    Offer::Full => overflow = true,
                    Offer::Skipped => {}
                }
            }
        }
        let waiting = std::mem::take(&mut ob.waiting);
        for msg in waiting {
            match ob.index(&msg.channel) {
                Some(i) if !ob.chans[i].pending => {
                    overflow |= self.push_message(ob, i, &msg) == Offer::Full
                }
                Some(_) => ob.waiting.push(msg),
                None => {}
            }
        }
        if overflow {
            Err(Overflow)
        } else {
            Ok(replayed)
        }
    }

    /// Removes a channel (WebSocket unsubscribe); `false` if it was not there.
    pub fn remove_channel(&self, name: &str) -> bool {
        let mut ob = self.outbox.lock();
        let Some(idx) = ob.index(name) else {
            return false;
        };
        ob.chans.remove(idx);
        ob.waiting.retain(|m| m.channel.as_str() != name);
        true
    }

    /// The position this stream holds for `channel`; `None` while that channel is being
    /// started (its own recovery covers it) or the stream is ending.
    pub fn position_of(&self, channel: &str) -> Option<StreamId> {
        let ob = self.outbox.lock();
        let idx = ob.index(channel)?;
        (!ob.chans[idx].pending && !ob.ending).then(|| ob.chans[idx].pos)
    }

    /// Moves `channel` to `tail` after history lost what the stream would have needed, and
    /// queues the frame `build` makes from the new positions (`hub.reset`). A full outbox
    /// means the caller closes the stream as slow.
    pub fn reset_to(
        &self,
        channel: &str,
        tail: StreamId,
        build: impl FnOnce(&[StreamId]) -> Bytes,
    ) -> Offer {
        let mut ob = self.outbox.lock();
        let Some(idx) = ob.index(channel) else {
            return Offer::Skipped;
        };
        if ob.ending || ob.chans[idx].pending || ob.chans[idx].pos >= tail {
            return Offer::Skipped;
        }
        if ob.queue.len() >= self.capacity {
            return Offer::Full;
        }
        ob.chans[idx].pos = tail;
        let positions: Vec<StreamId> = ob.chans.iter().map(|c| c.pos).collect();
        let frame = build(&positions);
        ob.queue.push_back(Chunk::data(frame, None));
        Self::wake(ob);
        Offer::Queued
    }

    /// Records the close reason; `true` for the first caller only.
    pub fn mark_closed(&self, reason: CloseReason) -> bool {
        self.closed
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        CloseReason::from_u8(self.closed.load(Ordering::Acquire))
    }

    /// Stops the outbox: optionally drops what is queued (returning how many messages that
    /// was), appends a last frame, and lets the body end after it.
    pub fn finish(&self, last: Option<Bytes>, discard_queued: bool) -> usize {
        let mut ob = self.outbox.lock();
        let mut dropped = 0;
        if discard_queued {
            dropped = ob.queue.iter().filter(|c| c.published.is_some()).count() + ob.waiting.len();
            ob.queue = VecDeque::new();
        }
        ob.waiting = Vec::new();
        if let Some(bytes) = last {
            ob.queue.push_back(Chunk::data(bytes, None));
        }
        ob.ending = true;
        Self::wake(ob);
        dropped
    }

    /// The next chunk for the transport; `Ready(None)` once finished and drained.
    pub fn poll_chunk(&self, cx: &mut Context<'_>) -> Poll<Option<Chunk>> {
        let mut ob = self.outbox.lock();
        if let Some(c) = ob.queue.pop_front() {
            if ob.queue.is_empty() && ob.queue.capacity() > 16 {
                // Give back what a burst grew, so idle streams stay small.
                ob.queue.shrink_to(4);
            }
            return Poll::Ready(Some(c));
        }
        if ob.ending {
            return Poll::Ready(None);
        }
        match &ob.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => ob.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    pub fn touch(&self, now: u64) {
        self.last_write.store(now, Ordering::Relaxed);
    }

    pub fn last_write(&self) -> u64 {
        self.last_write.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Envelope;
    use std::task::Waker;

    fn chan(s: &str) -> ChannelName {
        ChannelName::new(s).unwrap()
    }

    fn msg(c: &str, pos: Option<StreamId>, data: &str) -> Arc<Message> {
        let env = Envelope {
            event: None,
            data: data.into(),
        };
        Arc::new(Message::new(chan(c), pos, &env, Instant::now()))
    }

    fn drain(s: &Session) -> Vec<String> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = vec![];
        while let Poll::Ready(Some(c)) = s.poll_chunk(&mut cx) {
            out.push(String::from_utf8(c.bytes.to_vec()).unwrap());
        }
        out
    }

    fn started(channels: &[&str], cap: usize) -> Session {
        let s = Session::new(
            1,
            Transport::Sse,
            channels.iter().map(|c| chan(c)).collect(),
            false,
            None,
            cap,
            0,
        );
        let n = channels.len();
        s.start(Start {
            head: vec![],
            positions: vec![StreamId::ZERO; n],
            replay: vec![],
        })
        .unwrap();
        s
    }

    #[test]
    fn replay_then_buffered_live_is_exactly_once_in_order() {
        let s = Session::new(1, Transport::Sse, vec![chan("a")], false, None, 16, 0);
        // Live messages 2 and 3 arrive while history (1, 2) is being read.
        assert_eq!(
            s.offer(&msg("a", Some(StreamId::new(2, 0)), "two")),
            Offer::Queued
        );
        assert_eq!(
            s.offer(&msg("a", Some(StreamId::new(3, 0)), "three")),
            Offer::Queued
        );
        assert!(drain(&s).is_empty(), "nothing before start");
        let replayed = s
            .start(Start {
                head: vec![Bytes::from_static(b"HEAD\n")],
                positions: vec![StreamId::ZERO],
                replay: vec![
                    msg("a", Some(StreamId::new(1, 0)), "one"),
                    msg("a", Some(StreamId::new(2, 0)), "two"),
                ],
            })
            .unwrap();
        assert_eq!(replayed, 2);
        assert_eq!(
            drain(&s),
            [
                "HEAD\n",
                "id: 1-0\ndata: one\n\n",
                "id: 2-0\ndata: two\n\n",
                "id: 3-0\ndata: three\n\n"
            ]
        );
        // An old position offered again is skipped.
        assert_eq!(
            s.offer(&msg("a", Some(StreamId::new(3, 0)), "dup")),
            Offer::Skipped
        );
    }

    #[test]
    fn multi_channel_stream_writes_a_combined_cursor() {
        // Callers pass channels sorted (the node sorts them).
        let s = started(&["a", "b"], 8);
        s.offer(&msg("b", Some(StreamId::new(5, 0)), "x"));
        let out = drain(&s);
        let fp = Cursor::fingerprint(&["a", "b"]);
        assert_eq!(
            out,
            [format!("id: {fp:08x}:0-0,5-0\n"), "data: x\n\n".to_string()]
        );
        assert_eq!(
            s.decode_cursor(&format!("{fp:08x}:0-0,5-0")),
            Some(vec![StreamId::ZERO, StreamId::new(5, 0)])
        );
    }

    #[test]
    fn full_outbox_is_reported_not_grown() {
        let s = started(&["a"], 4);
        for i in 1..=4 {
            assert_eq!(
                s.offer(&msg("a", Some(StreamId::new(i, 0)), "x")),
                Offer::Queued
            );
        }
        assert_eq!(
            s.offer(&msg("a", Some(StreamId::new(9, 0)), "x")),
            Offer::Full
        );
        assert_eq!(s.push_heartbeat(), Offer::Full);
        // Finishing a slow stream drops the queue and leaves only the last frame.
        assert_eq!(s.finish(Some(Bytes::from_static(b"bye\n\n")), true), 4);
        assert_eq!(drain(&s), ["bye\n\n"]);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(s.poll_chunk(&mut cx), Poll::Ready(None)));
    }

    #[test]
    fn ephemeral_messages_carry_no_id_and_are_not_deduplicated() {
        let s = started(&["a"], 4);
        s.offer(&msg("a", None, "e"));
        s.offer(&msg("a", None, "e"));
        assert_eq!(drain(&s), ["data: e\n\n", "data: e\n\n"]);
    }

    #[test]
    fn close_reason_first_wins() {
        let s = started(&["a"], 4);
        assert!(s.mark_closed(CloseReason::Slow));
        assert!(!s.mark_closed(CloseReason::Client));
        assert_eq!(s.close_reason(), Some(CloseReason::Slow));
    }
}
