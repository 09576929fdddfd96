//! One stream: its channels with their read positions, its bounded queue of items, and its
//! presence cursors, all behind one small lock per stream.
//!
//! - `item`: what a stream queues (items, replies) and what an offer did.
//! - `queue`: the bounded queue the transport pulls from, the writer's park and the
//!   fan-out's direct writes through a transport's [`DirectSink`] (a frame's rest goes first).
//! - `reading`: each channel's position and how it is read (live, behind, reading history).
//! - `watch`: presence cursors of the channels whose joins and leaves the client asked for.
//!
//! Lock order: a channel's lock in the registry (or the fan-out's shard lock), then this
//! stream's lock; never the other way round, never two streams' locks at once, and no waker is
//! woken and no other lock taken while it is held. Owned by the registry and the transport
//! through `Arc`; this module never touches sockets, wire frames or metrics.

mod item;
mod queue;
mod reading;
mod watch;

pub use item::{Full, Item, Offer, PresenceEvent, PresenceState, Reply};
pub use queue::{DirectSink, Sent, OFFER_BATCH};
pub use reading::{Fed, PageView, ReadRequest, StartAt};

use crate::domain::CloseReason;
use crate::message::Message;
use parking_lot::Mutex;
use protocol::{ChannelName, Cursor, StreamId};
use reading::{Chan, Read};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::Waker;
use tokio::sync::mpsc::UnboundedSender;

/// Items beyond the capacity that a stream may hold for replies and hub events (a WebSocket
/// client's answers, `hub.reset`): enough for a burst of subscribe frames, small enough that a
/// client sending frames but never reading is closed as slow instead of growing.
pub const CONTROL_SLACK: usize = 32;

struct State {
    queue: VecDeque<Item>,
    /// Sorted by name.
    chans: Vec<Chan>,
    /// Live messages of channels in `Reading`, bounded by `capacity`.
    waiting: VecDeque<Arc<Message>>,
    /// Items other than messages may be queued (after the opening item).
    started: bool,
    /// No more items; the transport ends once the queue is drained.
    ending: bool,
    /// Already waiting in the catch-up's queue.
    refill_requested: bool,
    next_token: u64,
    waker: Option<Waker>,
    /// The writer wrote everything and waits; with a sink, live messages are written by the
    /// fan-out while this holds and the queue is empty. Cleared by every [`Session::poll_item`].
    parked: bool,
    sink: Option<Box<dyn DirectSink>>,
}

impl State {
    fn index(&self, channel: &str) -> Option<usize> {
        self.chans
            .binary_search_by(|c| c.name.as_str().cmp(channel))
            .ok()
    }

    /// The index of `channel` while its read `token` is the one under way (and, with
    /// `live_only`, the stream is not ending); `None` for a read that no longer applies.
    fn reading(&self, channel: &str, token: u64, live_only: bool) -> Option<usize> {
        let i = self.index(channel)?;
        let ok = self.chans[i].read.is_read(token) && !(live_only && self.ending);
        ok.then_some(i)
    }

    fn take_token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// Removes `channel`'s buffered live messages; returns how many ephemeral ones that lost.
    fn drop_waiting(&mut self, channel: &str) -> usize {
        let mut lost = 0;
        self.waiting.retain(|m| {
            let mine = m.channel.as_str() == channel;
            lost += usize::from(mine && m.position.is_none());
            !mine
        });
        lost
    }
}

/// A stream. Cloning the `Arc` is the only sharing; the state has its own small lock that is
/// never held while taking another lock or waking a task.
pub struct Session {
    /// Node-local key (also spreads heartbeats over the interval).
    pub seq: u64,
    /// The `connection_id` clients see.
    pub id: uuid::Uuid,
    pub transport: crate::domain::Transport,
    /// Fingerprint of the channel list an SSE stream opened with (for its cursor).
    pub fingerprint: u32,
    /// `envelope=true`: each data is the JSON envelope with the channel.
    pub envelope: bool,
    /// The token's `sub`, when there is one.
    pub user: Option<Arc<str>>,
    /// The token's `exp` (Unix seconds; 0 without a token): the stream is closed then. A
    /// WebSocket's token refresh moves it.
    expires_at: AtomicU64,
    /// The connection's socket, to tell a vanished client (see [`crate::peer`]).
    pub socket: Option<crate::peer::PeerSocket>,
    /// Items the queue holds before a live channel falls behind.
    capacity: usize,
    /// Coarse clock reading (seconds) of the last sign of life: an item the transport took
    /// (SSE) or a frame from the client, pongs included (WebSocket).
    last_write: AtomicU64,
    /// Coarse clock reading of the last item the transport took (a sleeping reader's queue
    /// is given back after a while, see [`Session::trim_if_idle`]).
    last_taken: AtomicU64,
    /// 0 while open, else the `CloseReason` that ended it (first one wins).
    closed: AtomicU8,
    /// [`FLAG_PRESENCE_LOST`] and [`FLAG_MULTIPLEXED`]: one byte, where the stream's other
    /// small fields leave room (a separate `bool` cost 8 bytes per stream).
    flags: AtomicU8,
    /// Where this stream asks for history reads (its `seq`); `None` in unit tests.
    refill: Option<UnboundedSender<u64>>,
    state: Mutex<State>,
}

/// An observer that fell so far behind its channel's presence log that changes it had not read
/// were forgotten: the tick closes it as slow.
const FLAG_PRESENCE_LOST: u8 = 1;
/// One stream of an HTTP/2 connection: the HTTP server notices the client's reset of it only
/// when its body is polled, so the tick wakes its writer every second ([`Session::poke`]) to
/// look.
const FLAG_MULTIPLEXED: u8 = 2;

/// Every open stream costs this much besides its channels and queue: checked at compile time
/// (240 bytes on x86-64 before the split into modules; it must not grow).
const _: () = assert!(std::mem::size_of::<Session>() <= 240);

/// What a new session needs besides its channels.
pub struct SessionInit {
    pub seq: u64,
    pub transport: crate::domain::Transport,
    pub envelope: bool,
    pub user: Option<Arc<str>>,
    pub expires_at: Option<u64>,
    pub capacity: usize,
    pub now: u64,
    pub refill: Option<UnboundedSender<u64>>,
    pub socket: Option<crate::peer::PeerSocket>,
    pub multiplexed: bool,
}

impl Session {
    /// A stream with `channels` (sorted, deduplicated), each `Reading` until [`Session::start`].
    pub fn new(init: SessionInit, channels: Vec<ChannelName>) -> Session {
        let fingerprint = Cursor::fingerprint(&channels);
        let mut state = State {
            queue: VecDeque::new(),
            chans: Vec::with_capacity(channels.len()),
            waiting: VecDeque::new(),
            started: false,
            ending: false,
            refill_requested: false,
            next_token: 0,
            waker: None,
            parked: false,
            sink: None,
        };
        for name in channels {
            let token = state.take_token();
            state.chans.push(Chan::new(name, token));
        }
        Session {
            seq: init.seq,
            id: uuid::Uuid::new_v4(),
            transport: init.transport,
            fingerprint,
            envelope: init.envelope,
            user: init.user,
            expires_at: AtomicU64::new(init.expires_at.unwrap_or(0)),
            socket: init.socket,
            capacity: init.capacity.max(1),
            last_write: AtomicU64::new(init.now),
            last_taken: AtomicU64::new(init.now),
            closed: AtomicU8::new(0),
            flags: AtomicU8::new(if init.multiplexed {
                FLAG_MULTIPLEXED
            } else {
                0
            }),
            refill: init.refill,
            state: Mutex::new(state),
        }
    }

    /// The token's expiry (Unix seconds), if the stream has a token.
    pub fn expires_at(&self) -> Option<u64> {
        match self.expires_at.load(Ordering::Relaxed) {
            0 => None,
            e => Some(e),
        }
    }

    /// A refreshed token's expiry replaces the old one.
    pub fn set_expires_at(&self, exp: u64) {
        self.expires_at.store(exp.max(1), Ordering::Relaxed);
    }

    /// The channels this stream reads now.
    pub fn channels(&self) -> Vec<ChannelName> {
        self.state
            .lock()
            .chans
            .iter()
            .map(|c| c.name.clone())
            .collect()
    }

    pub fn channel_count(&self) -> usize {
        self.state.lock().chans.len()
    }

    /// Reads a `Last-Event-ID` for this stream's channels (see [`Cursor`]).
    pub fn decode_cursor(&self, id: &str) -> Option<Vec<StreamId>> {
        Cursor::decode(id, self.channel_count(), self.fingerprint)
    }

    fn wake(mut st: parking_lot::MutexGuard<'_, State>) {
        let waker = st.waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Asks the catch-up for a read (once until it answers), outside the lock.
    fn request_refill(&self) {
        if let Some(tx) = &self.refill {
            let _ = tx.send(self.seq);
        }
    }

    /// Marks a refill as requested if one is due now: a channel is behind and the queue has
    /// room for at least half its capacity.
    fn refill_due(&self, st: &mut State) -> bool {
        let due = !st.refill_requested
            && !st.ending
            && st.queue.len() <= self.capacity / 2
            && st
                .chans
                .iter()
                .any(|c| c.read == Read::Behind || c.read.is_due() || c.presence_behind);
        if due {
            st.refill_requested = true;
        }
        due
    }

    /// Adds a channel to a started stream (WebSocket subscribe), `Reading` until started.
    /// `false` if the stream is ending or already has it.
    pub fn add_channel(&self, name: ChannelName) -> bool {
        let mut st = self.state.lock();
        if st.ending || self.closed.load(Ordering::Acquire) != 0 {
            return false;
        }
        match st.chans.binary_search_by(|c| c.name.cmp(&name)) {
            Ok(_) => false,
            Err(at) => {
                let token = st.take_token();
                // Most sockets hold one channel or a few: grow by one, not to four at once
                // (massif: 336 bytes per WebSocket for a single channel).
                st.chans.reserve_exact(1);
                st.chans.insert(at, Chan::new(name, token));
                true
            }
        }
    }

    /// Removes a channel (WebSocket unsubscribe); `false` if it was not there.
    pub fn remove_channel(&self, name: &str) -> bool {
        let mut st = self.state.lock();
        let Some(idx) = st.index(name) else {
            return false;
        };
        st.chans.remove(idx);
        st.drop_waiting(name);
        true
    }

    /// The position each channel holds, by name (for tests and stats).
    pub fn position_of(&self, channel: &str) -> Option<StreamId> {
        let st = self.state.lock();
        st.index(channel).map(|i| st.chans[i].pos)
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

    /// A sign of life (SSE: an item written; WebSocket: a frame from the client).
    pub fn touch(&self, now: u64) {
        self.last_write.store(now, Ordering::Relaxed);
    }

    /// The transport took an item.
    pub fn took(&self, now: u64) {
        self.last_taken.store(now, Ordering::Relaxed);
    }

    /// One stream of an HTTP/2 connection: the tick pokes it each second (see [`Session::poke`]).
    pub fn is_multiplexed(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & FLAG_MULTIPLEXED != 0
    }

    pub fn last_write(&self) -> u64 {
        self.last_write.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
