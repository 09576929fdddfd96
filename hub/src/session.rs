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
}

/// Result of offering something to a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// Already delivered (an older position), or the stream is ending.
    Skipped,
    /// The outbox is full: the reader is too slow; the caller closes the stream.
    Full,
}

/// The outbox overflowed while a stream was being started (its replay and what arrived
/// meanwhile did not fit): the caller closes the stream as slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

/// What the stream is told when it opens (built by the node once recovery is known).
pub struct Start {
    /// Frames written first, in order (`retry`+`hub.connected`, then `hub.reset` if any).
    pub head: Vec<Bytes>,
    /// The position of each channel the stream starts from, in channel order.
    pub positions: Vec<StreamId>,
    /// History to replay, in order per channel.
    pub replay: Vec<Arc<Message>>,
}

struct Outbox {
    queue: VecDeque<Chunk>,
    /// Last position delivered (or started from) per channel; older messages are skipped, which
    /// makes replay + live exactly-once.
    positions: Box<[StreamId]>,
    /// While the stream is being set up, live messages wait here (bounded like the queue).
    recovering: Option<Vec<Arc<Message>>>,
    waker: Option<Waker>,
    /// No more pushes; the body ends once the queue is drained.
    ending: bool,
}

/// A stream. Cloning the `Arc` is the only sharing; the outbox has its own small lock that is
/// never held while taking another lock.
pub struct Session {
    /// Node-local key (also spreads heartbeats over the interval).
    pub seq: u64,
    /// The `connection_id` clients see.
    pub id: uuid::Uuid,
    pub transport: Transport,
    /// Sorted and deduplicated.
    pub channels: Box<[ChannelName]>,
    fingerprint: u32,
    /// `envelope=true`: each data is the JSON envelope with the channel.
    pub envelope: bool,
    /// The token's `sub`, when there is one.
    pub user: Option<Arc<str>>,
    /// The token's `exp` (Unix seconds): the stream is closed then.
    pub expires_at: Option<u64>,
    /// Chunks the outbox may hold: a multi-channel stream uses two per message.
    capacity: usize,
    /// Coarse clock reading (seconds) of the last chunk the transport accepted.
    last_write: AtomicU64,
    /// 0 while open, else the `CloseReason` that ended it (first one wins).
    closed: AtomicU8,
    outbox: Mutex<Outbox>,
}

impl Session {
    pub fn new(
        seq: u64,
        transport: Transport,
        channels: Vec<ChannelName>,
        envelope: bool,
        user: Option<Arc<str>>,
        outbox_len: usize,
        now: u64,
    ) -> Session {
        let per_message = if channels.len() > 1 { 2 } else { 1 };
        let fingerprint = Cursor::fingerprint(&channels);
        let n = channels.len();
        Session {
            seq,
            id: uuid::Uuid::new_v4(),
            transport,
            channels: channels.into_boxed_slice(),
            fingerprint,
            envelope,
            user,
            expires_at: None,
            capacity: outbox_len * per_message,
            last_write: AtomicU64::new(now),
            closed: AtomicU8::new(0),
            outbox: Mutex::new(Outbox {
                queue: VecDeque::new(),
                positions: vec![StreamId::ZERO; n].into_boxed_slice(),
                recovering: Some(Vec::new()),
                waker: None,
                ending: false,
            }),
        }
    }

    /// The SSE `id:` for these positions (see [`Cursor`]).
    pub fn cursor(&self, positions: &[StreamId]) -> String {
        Cursor::encode(self.fingerprint, positions)
    }

    /// Reads a `Last-Event-ID` for this stream's channels.
    pub fn decode_cursor(&self, id: &str) -> Option<Vec<StreamId>> {
        Cursor::decode(id, self.channels.len(), self.fingerprint)
    }

    fn channel_index(&self, channel: &str) -> Option<usize> {
        self.channels
            .binary_search_by(|c| c.as_str().cmp(channel))
            .ok()
    }

    /// Offers a live message. Never blocks on the reader.
    pub fn offer(&self, msg: &Arc<Message>) -> Offer {
        let mut ob = self.outbox.lock();
        if ob.ending {
            return Offer::Skipped;
        }
        if let Some(buf) = ob.recovering.as_mut() {
            if buf.len() >= self.capacity {
                return Offer::Full;
            }
            buf.push(msg.clone());
            return Offer::Queued;
        }
        let offer = self.push_message(&mut ob, msg);
        let waker = if offer == Offer::Queued {
            ob.waker.take()
        } else {
            None
        };
        drop(ob);
        if let Some(w) = waker {
            w.wake();
        }
        offer
    }

    fn push_message(&self, ob: &mut Outbox, msg: &Arc<Message>) -> Offer {
        let Some(idx) = self.channel_index(&msg.channel) else {
            return Offer::Skipped;
        };
        let multi = self.channels.len() > 1;
        if let Some(pos) = msg.position {
            if pos <= ob.positions[idx] {
                return Offer::Skipped;
            }
        }
        let needed = if multi && msg.position.is_some() {
            2
        } else {
            1
        };
        if ob.queue.len() + needed > self.capacity {
            return Offer::Full;
        }
        let published = Some(msg.received);
        match msg.position {
            Some(pos) => {
                ob.positions[idx] = pos;
                if multi {
                    let cursor = self.cursor(&ob.positions);
                    let mut line = BytesMut::with_capacity(cursor.len() + 5);
                    protocol::sse::write_id(&mut line, &cursor);
                    ob.queue.push_back(Chunk {
                        bytes: line.freeze(),
                        published: None,
                    });
                    ob.queue.push_back(Chunk {
                        bytes: msg.frame_body(self.envelope),
                        published,
                    });
                } else {
                    ob.queue.push_back(Chunk {
                        bytes: msg.frame(self.envelope),
                        published,
                    });
                }
            }
            None => ob.queue.push_back(Chunk {
                bytes: msg.frame_body(self.envelope),
                published,
            }),
        }
        Offer::Queued
    }

    /// Queues a frame that is not a message (heartbeat). Skipped while the stream is being set
    /// up, so that `hub.connected` stays the first frame.
    pub fn push_control(&self, bytes: Bytes) -> Offer {
        let mut ob = self.outbox.lock();
        if ob.ending || ob.recovering.is_some() {
            return Offer::Skipped;
        }
        if ob.queue.len() >= self.capacity {
            return Offer::Full;
        }
        ob.queue.push_back(Chunk {
            bytes,
            published: None,
        });
        let waker = ob.waker.take();
        drop(ob);
        if let Some(w) = waker {
            w.wake();
        }
        Offer::Queued
    }

    /// Ends set-up: writes the head frames, replays history, then whatever arrived live
    /// meanwhile, skipping what replay already covered. Returns how many messages were replayed,
    /// or [`Overflow`].
    pub fn start(&self, start: Start) -> Result<usize, Overflow> {
        let mut ob = self.outbox.lock();
        if ob.ending {
            return Ok(0);
        }
        for (slot, p) in ob.positions.iter_mut().zip(&start.positions) {
            *slot = *p;
        }
        for bytes in start.head {
            ob.queue.push_back(Chunk {
                bytes,
                published: None,
            });
        }
        let mut replayed = 0;
        let mut overflow = false;
        for msg in &start.replay {
            match self.push_message(&mut ob, msg) {
                Offer::Queued => replayed += 1,
                Offer::Full => overflow = true,
                Offer::Skipped => {}
            }
        }
        let live = ob.recovering.take().unwrap_or_default();
        for msg in &live {
            if self.push_message(&mut ob, msg) == Offer::Full {
                overflow = true;
            }
        }
        let waker = ob.waker.take();
        drop(ob);
        if let Some(w) = waker {
            w.wake();
        }
        if overflow {
            Err(Overflow)
        } else {
            Ok(replayed)
        }
    }

    /// The position this stream holds for `channel`; `None` while it is being set up (its own
    /// recovery covers it) or ending.
    pub fn position_of(&self, channel: &str) -> Option<StreamId> {
        let idx = self.channel_index(channel)?;
        let ob = self.outbox.lock();
        (ob.recovering.is_none() && !ob.ending).then(|| ob.positions[idx])
    }

    /// Moves `channel` to `tail` after history lost what the stream would have needed, and
    /// queues the frame `build` makes from the new positions (`hub.reset`). Returns whether
    /// the outbox had room; a full one means the caller closes the stream as slow.
    pub fn reset_to(
        &self,
        channel: &str,
        tail: StreamId,
        build: impl FnOnce(&[StreamId]) -> Bytes,
    ) -> Offer {
        let Some(idx) = self.channel_index(channel) else {
            return Offer::Skipped;
        };
        let mut ob = self.outbox.lock();
        if ob.ending || ob.recovering.is_some() || ob.positions[idx] >= tail {
            return Offer::Skipped;
        }
        if ob.queue.len() >= self.capacity {
            return Offer::Full;
        }
        ob.positions[idx] = tail;
        let frame = build(&ob.positions);
        ob.queue.push_back(Chunk {
            bytes: frame,
            published: None,
        });
        let waker = ob.waker.take();
        drop(ob);
        if let Some(w) = waker {
            w.wake();
        }
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
            dropped = ob.queue.iter().filter(|c| c.published.is_some()).count();
            dropped += ob.recovering.as_ref().map_or(0, Vec::len);
            ob.queue = VecDeque::new();
        }
        ob.recovering = None;
        if let Some(bytes) = last {
            ob.queue.push_back(Chunk {
                bytes,
                published: None,
            });
        }
        ob.ending = true;
        let waker = ob.waker.take();
        drop(ob);
        if let Some(w) = waker {
            w.wake();
        }
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

    /// Still in set-up (no `hub.connected` written yet).
    pub fn is_starting(&self) -> bool {
        self.outbox.lock().recovering.is_some()
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
        assert_eq!(s.push_control(Bytes::from_static(b":\n\n")), Offer::Full);
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
