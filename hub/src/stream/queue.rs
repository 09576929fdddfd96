//! The stream's bounded queue: the fan-out offers, the transport pulls ([`Session::poll_item`]),
//! a sleeper gives back what it holds. While the writer is parked with nothing queued, the
//! fan-out writes a live message straight to the socket through the transport's
//! [`DirectSink`]; the rest of a frame the socket took in part is queued first and goes out
//! before anything else, the writer's own frames included ([`Session::unpark`]).
//! Never blocks on the reader and never grows past the capacity (plus the control slack).

use super::reading::{Read, Stage};
use super::{Full, Item, Offer, Reply, Session, CONTROL_SLACK};
use crate::domain::CloseReason;
use crate::message::Message;
use bytes::Bytes;
use protocol::StreamId;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Writes a live message's frame straight to a stream's socket from the fan-out, while the
/// stream's writer is parked with nothing queued or pending ([`Session::park`]): the message
/// then costs no queue entry and no wake-up of the writer. Lent by a transport that owns the
/// bare socket; called under the session's lock, so it must not block or take other locks.
pub trait DirectSink: Send + Sync {
    /// Writes what the socket takes now of `msg`'s frame (telling `session` it was taken if
    /// any of it went out; the caller counts the delivery).
    fn send(&self, msg: &Message, session: &Session) -> Sent;

    /// Writes what the socket takes now of `msgs`' frames, in order: how many went out
    /// whole, and the rest of the next one if the socket took part of it. By default one
    /// [`DirectSink::send`] each; a socket writes them at once.
    fn send_many(&self, msgs: &[&Message], session: &Session) -> (usize, Option<Bytes>) {
        for (k, msg) in msgs.iter().enumerate() {
            match self.send(msg, session) {
                Sent::All => {}
                Sent::Part(rest) => return (k, Some(rest)),
                Sent::Nothing => return (k, None),
            }
        }
        (msgs.len(), None)
    }
}

/// What a [`DirectSink`] wrote.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    All,
    /// The frame's rest: the socket took only part of it.
    Part(Bytes),
    /// Nothing (the socket is full or failed): the message is queued as usual.
    Nothing,
}

/// Most messages offered to one stream at once ([`Session::offer_many`]): one `writev` of at
/// most this many frames.
pub const OFFER_BATCH: usize = 32;

impl Session {
    /// Offers a live message. Never blocks on the reader and never grows past the capacity:
    /// a live channel whose queue is full falls behind instead.
    pub fn offer(&self, msg: &Arc<Message>) -> Offer {
        let mut out = Offer::Skipped;
        self.offer_many(std::slice::from_ref(msg), |o| out = o);
        out
    }

    /// Offers live messages (at most [`OFFER_BATCH`], in order), telling `each` what became of
    /// each one, in order. Those that go straight to a parked writer's socket are written
    /// together (one `writev` through the sink): several messages that arrive while the
    /// fan-out is busy cost the socket one write, one packet, one wake-up of its reader.
    pub fn offer_many(&self, msgs: &[Arc<Message>], mut each: impl FnMut(Offer)) {
        debug_assert!(msgs.len() <= OFFER_BATCH);
        let mut st = self.state.lock();
        // Messages bound for the socket (indices into `msgs`), written at the end or before
        // anything is queued behind them.
        let mut direct = [0usize; OFFER_BATCH];
        let mut nd = 0;
        let mut wake = false;
        for (i, msg) in msgs.iter().enumerate().take(OFFER_BATCH) {
            if st.ending {
                each(Offer::Skipped);
                continue;
            }
            let Some(idx) = st.index(&msg.channel) else {
                each(Offer::Skipped);
                continue;
            };
            let chan = &st.chans[idx];
            if msg.position.is_some_and(|p| p <= chan.pos) {
                each(Offer::Skipped);
                continue;
            }
            let lost = if msg.position.is_none() {
                Offer::Lagged
            } else {
                Offer::Skipped
            };
            match chan.read {
                Read::Behind => each(lost),
                Read::Reading { .. } => {
                    if st.waiting.len() < self.capacity {
                        st.waiting.push_back(msg.clone());
                        each(Offer::Queued);
                    } else {
                        st.chans[idx].read.lose();
                        each(lost);
                    }
                }
                Read::Live if st.queue.len() + nd < self.capacity => {
                    if let Some(p) = msg.position {
                        st.chans[idx].pos = p;
                    }
                    if st.sink.is_some() && st.parked && st.queue.is_empty() {
                        direct[nd] = i;
                        nd += 1;
                        continue;
                    }
                    if nd > 0 {
                        // Before this one: whatever of them is not written is queued first.
                        self.write_direct(&mut st, msgs, &direct[..nd], &mut each);
                        nd = 0;
                    }
                    st.queue.push_back(Item::Message(msg.clone()));
                    wake = true;
                    each(Offer::Queued);
                }
                Read::Live => {
                    // Fell behind: history carries it from its position on (the catch-up is
                    // asked when the transport has drained half the queue).
                    st.chans[idx].read = Read::Behind;
                    each(lost);
                }
            }
        }
        if nd > 0 {
            wake |= self.write_direct(&mut st, msgs, &direct[..nd], &mut each);
        }
        if wake {
            Self::wake(st);
        }
    }

    /// Writes `msgs[direct]` through the sink (the queue is empty and the writer parked); what
    /// the socket did not take is queued (the rest of a frame cut at its edge first). Returns
    /// whether anything was queued (the writer must be woken).
    fn write_direct(
        &self,
        st: &mut super::State,
        msgs: &[Arc<Message>],
        direct: &[usize],
        each: &mut impl FnMut(Offer),
    ) -> bool {
        // On the stack: this runs for every socket of every fan-out.
        let mut batch: [&Message; OFFER_BATCH] = [&*msgs[direct[0]]; OFFER_BATCH];
        for (slot, &i) in batch.iter_mut().zip(direct) {
            *slot = &*msgs[i];
        }
        let (sent, rest) = match &st.sink {
            Some(sink) => sink.send_many(&batch[..direct.len()], self),
            None => (0, None),
        };
        let mut queued = false;
        for (k, &i) in direct.iter().enumerate() {
            let msg = &msgs[i];
            let written = k < sent || (k == sent && rest.is_some());
            if written {
                // Taken by the transport (a rest goes out before anything else).
                if let Some(p) = msg.position {
                    if let Some(c) = st.index(&msg.channel) {
                        st.chans[c].taken = p;
                    }
                }
                if k == sent {
                    if let Some(rest) = &rest {
                        st.queue.push_back(Item::Raw(rest.clone()));
                        queued = true;
                    }
                }
                each(Offer::Written);
            } else {
                st.queue.push_back(Item::Message(msg.clone()));
                queued = true;
                each(Offer::Queued);
            }
        }
        queued
    }

    /// Queues a heartbeat if the stream has started. SSE: only when nothing is waiting to be
    /// written (queued data keeps the connection busy anyway). WebSocket: also behind queued
    /// messages (within the control slack), since its pong is how the client shows it is
    /// alive.
    pub fn push_heartbeat(&self) -> bool {
        let mut st = self.state.lock();
        let room = match self.transport {
            crate::domain::Transport::Sse => st.queue.is_empty(),
            crate::domain::Transport::Ws => st.queue.len() < self.capacity + CONTROL_SLACK,
        };
        if st.ending || !st.started || !room {
            return false;
        }
        st.queue.push_back(Item::Heartbeat);
        Self::wake(st);
        true
    }

    /// Queues a reply to the client.
    pub fn push_reply(&self, reply: Reply) -> Result<(), Full> {
        let mut st = self.state.lock();
        if st.ending {
            return Ok(());
        }
        if st.queue.len() >= self.capacity + CONTROL_SLACK {
            return Err(Full);
        }
        st.queue.push_back(Item::Reply(Box::new(reply)));
        Self::wake(st);
        Ok(())
    }

    /// Ends the queue: optionally drops what is queued (returning how many messages that was),
    /// then queues the backend's `note` ([`Item::Disconnect`]) if there is one, and
    /// [`Item::End`]; the transport ends after it.
    pub fn finish(
        &self,
        reason: CloseReason,
        discard_queued: bool,
        note: Option<Arc<str>>,
    ) -> usize {
        let mut st = self.state.lock();
        let mut dropped = 0;
        if discard_queued {
            dropped = st
                .queue
                .iter()
                .filter(|i| matches!(i, Item::Message(_)))
                .count();
            // A frame's rest stays: the last item must not follow half a frame.
            st.queue.retain(|i| matches!(i, Item::Raw(_)));
            st.queue.shrink_to_fit();
        }
        st.waiting = VecDeque::new();
        if let Some(note) = note {
            st.queue.push_back(Item::Disconnect(note));
        }
        st.queue.push_back(Item::End(reason));
        st.ending = true;
        Self::wake(st);
        dropped
    }

    /// The next item for the transport; `Ready(None)` once ended and drained. Asks the
    /// catch-up for history when a channel is behind and half the queue has been written.
    pub fn poll_item(&self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let mut st = self.state.lock();
        st.parked = false;
        if let Some(item) = st.queue.pop_front() {
            match &item {
                Item::Message(m) => {
                    if let Some(p) = m.position {
                        // An SSE stream's channels never change: one channel needs no lookup.
                        let single =
                            self.transport == crate::domain::Transport::Sse && st.chans.len() == 1;
                        let at = if single {
                            Some(0)
                        } else {
                            st.index(&m.channel)
                        };
                        if let Some(i) = at {
                            st.chans[i].taken = p;
                        }
                    }
                }
                Item::Opened(positions) => {
                    for (c, p) in st.chans.iter_mut().zip(positions.iter()) {
                        c.taken = *p;
                    }
                }
                Item::Reset(reset) => {
                    for (c, p) in reset.iter() {
                        if let Some(i) = st.index(c) {
                            st.chans[i].taken = *p;
                        }
                    }
                }
                _ => {}
            }
            if st.queue.is_empty() && st.queue.capacity() > 16 {
                // Give back what a burst grew, so idle streams stay small.
                st.queue.shrink_to(4);
            }
            let due = self.refill_due(&mut st);
            drop(st);
            if due {
                self.request_refill();
            }
            return Poll::Ready(Some(item));
        }
        if st.ending {
            return Poll::Ready(None);
        }
        match &st.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => st.waker = Some(cx.waker().clone()),
        }
        let due = self.refill_due(&mut st);
        drop(st);
        if due {
            self.request_refill();
        }
        Poll::Pending
    }

    /// Wakes the writer without giving it anything, so that it looks at its connection (see
    /// [`Session::is_multiplexed`]).
    pub fn poke(&self) {
        let waker = self.state.lock().waker.take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Lends the transport's sink (see [`DirectSink`]).
    pub fn attach(&self, sink: Box<dyn DirectSink>) {
        self.state.lock().sink = Some(sink);
    }

    /// Takes the sink back (the socket is closing); no write through it follows.
    pub fn detach(&self) {
        let sink = {
            let mut st = self.state.lock();
            st.parked = false;
            st.sink.take()
        };
        drop(sink);
    }

    /// The writer has written everything and waits for the next item: live messages may go
    /// through the sink until the writer polls for an item again (or [`Session::unpark`]).
    pub fn park(&self) {
        let mut st = self.state.lock();
        st.parked = st.sink.is_some() && st.queue.is_empty() && !st.ending;
    }

    /// The writer is about to write bytes of its own (not from the queue): the fan-out stops
    /// writing to the socket, and the rest of a frame it cut at the socket's edge, if one is
    /// queued, is handed back: those bytes must go out before any of the writer's own.
    pub fn unpark(&self) -> Option<Bytes> {
        let mut st = self.state.lock();
        st.parked = false;
        // A rest is always first: the fan-out writes only to an empty queue.
        if matches!(st.queue.front(), Some(Item::Raw(_))) {
            if let Some(Item::Raw(rest)) = st.queue.pop_front() {
                return Some(rest);
            }
        }
        None
    }

    /// Items queued now (for tests and stats).
    pub fn queued(&self) -> usize {
        self.state.lock().queue.len()
    }

    /// Whether a channel of this stream fell behind (it waits for, or reads, history).
    pub fn is_behind(&self) -> bool {
        self.state
            .lock()
            .chans
            .iter()
            .any(|c| c.read == Read::Behind)
    }

    /// A reader that fell behind and whose transport took nothing since `idle_since` (coarse
    /// seconds) — it sleeps — gives back its queued durable messages: each channel rewinds to
    /// what was taken and continues from history when the reader reads on, so a sleeping
    /// stream holds none. Queued ephemeral messages (and replies) stay queued. Returns the
    /// ephemeral messages lost (buffered for a read that the rewind made void).
    pub fn trim_if_idle(&self, idle_since: u64) -> usize {
        if self.last_taken.load(Ordering::Relaxed) > idle_since {
            return 0;
        }
        let mut st = self.state.lock();
        if st.ending
            || !st.chans.iter().any(|c| c.read == Read::Behind)
            || !st
                .queue
                .iter()
                .any(|i| matches!(i, Item::Message(m) if m.position.is_some()))
        {
            return 0;
        }
        let mut kept = VecDeque::new();
        for item in std::mem::take(&mut st.queue) {
            match item {
                Item::Message(m) if m.position.is_some() => {}
                other => kept.push_back(other),
            }
        }
        // Rewind to what the transport took, or to a reset still waiting to be written.
        let mut rewind: Vec<StreamId> = st.chans.iter().map(|c| c.taken).collect();
        for item in &kept {
            if let Item::Reset(reset) = item {
                for (c, p) in reset.iter() {
                    if let Some(i) = st.index(c) {
                        rewind[i] = *p;
                    }
                }
            }
        }
        let mut lagged = 0;
        for (i, at) in rewind.into_iter().enumerate() {
            let c = &mut st.chans[i];
            if c.read.is_starting() || c.pos == at {
                continue;
            }
            c.pos = at;
            match c.read {
                // A read not issued yet starts from the rewound position anyway.
                Read::Reading {
                    stage: Stage::Due, ..
                } => {}
                // A read in flight began after the old position: its page would skip what
                // lies between. It no longer applies (its token is void); the reader reads
                // again from the rewound position, and the live messages buffered for it are
                // left to history.
                Read::Reading { .. } => {
                    c.read = Read::Behind;
                    let name = c.name.clone();
                    lagged += st.drop_waiting(&name);
                }
                Read::Live | Read::Behind => c.read = Read::Behind,
            }
        }
        st.queue = kept;
        lagged
    }
}
