//! One stream's state: its channels with their read positions, and its bounded queue of items.
//!
//! Each channel of a stream is read in one of three ways. **Live**: fan-out queues the shared
//! message. **Behind**: the reader fell more than the queue's capacity behind; live durable
//! messages are left to history and ephemeral ones are lost (counted `lagged` by the caller).
//! **Reading**: a history read is in flight; live messages wait in a bounded buffer and are
//! merged, deduplicated by position, when the read lands. A reader that is behind is fed from
//! history by the catch-up at its own pace, so nothing here grows with how far behind it is.
//! Owned by the registry and the transport through `Arc`; this module never touches sockets,
//! wire frames or metrics: the transport renders [`Item`]s, and where it owns a bare socket it
//! may lend a [`Sink`] that the fan-out writes through while the stream's writer is parked.

use crate::domain::CloseReason;
use crate::message::Message;
use bytes::Bytes;
use parking_lot::Mutex;
use protocol::{ChannelName, Cursor, StreamId};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use tokio::sync::mpsc::UnboundedSender;

/// Items beyond the capacity that a stream may hold for replies and hub events (a WebSocket
/// client's answers, `hub.reset`): enough for a burst of subscribe frames, small enough that a
/// client sending frames but never reading is closed as slow instead of growing.
pub const CONTROL_SLACK: usize = 32;

/// Something a transport writes; the transport decides how it looks on the wire.
#[derive(Debug, Clone)]
pub enum Item {
    /// The stream started; the position of each channel, in the stream's channel order.
    Opened(Box<Vec<StreamId>>),
    /// A message (shared by every stream that gets it).
    Message(Arc<Message>),
    /// History no longer reached these channels' positions: each continues from the new one.
    Reset(Box<Vec<(ChannelName, StreamId)>>),
    /// Keep-alive (SSE comment, WebSocket ping).
    Heartbeat,
    /// An answer to the client (WebSocket); boxed, so that every item stays small.
    Reply(Box<Reply>),
    /// A user's first stream on a channel opened, or its last one closed, on some node.
    Presence(Arc<PresenceEvent>),
    /// Who is on a channel when a stream starts observing it (its changes follow).
    Present(Box<PresenceState>),
    /// The last item: why the stream ends.
    End(CloseReason),
    /// What a [`Sink`] could not write of a frame: written as it is, before anything else.
    Raw(Bytes),
}

/// Writes a live message's frame straight to a stream's socket from the fan-out, while the
/// stream's writer is parked with nothing queued or pending ([`Session::park`]): the message
/// then costs no queue entry and no wake-up of the writer. Lent by a transport that owns the
/// bare socket; called under the session's lock, so it must not block or take other locks.
pub trait Sink: Send + Sync {
    /// Writes what the socket takes now of `msg`'s frame (telling `session` it was taken if
    /// any of it went out; the caller counts the delivery).
    fn send(&self, msg: &Message, session: &Session) -> Sent;
}

/// What a [`Sink`] wrote.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    All,
    /// The frame's rest: the socket took only part of it.
    Part(Bytes),
    /// Nothing (the socket is full or failed): the message is queued as usual.
    Nothing,
}

/// `join`/`leave` of a user on a channel (shared by every stream that gets it).
#[derive(Debug, PartialEq, Eq)]
pub struct PresenceEvent {
    pub channel: ChannelName,
    pub sub: Arc<str>,
    pub join: bool,
}

/// The users on a channel (over every node) when an observer starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceState {
    pub channel: ChannelName,
    /// Sorted; shared by the observers that start while nothing changes.
    pub users: Arc<[Arc<str>]>,
}

/// Answers to a WebSocket client's frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Subscribed(ChannelName),
    Unsubscribed(ChannelName),
    /// A WebSocket's token was replaced; its new expiry.
    Refreshed(u64),
    Error {
        code: u16,
        message: String,
        channel: Option<String>,
    },
}

/// What happened to a live message offered to a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// Written to the socket through the stream's [`Sink`] (all of it, or its rest queued):
    /// the caller counts the delivery.
    Written,
    /// Not for this stream now: already delivered (an older position), not subscribed, left to
    /// history because the reader is behind, or the stream is ending.
    Skipped,
    /// An ephemeral message this reader fell behind on: lost to it (counted `lagged`).
    Lagged,
    /// A presence change left for the catch-up, which feeds it from the channel's log when
    /// the observer has room (see [`Session::offer_presence`]).
    Behind,
}

/// A reply or hub event did not fit even in the control slack: the client sends but does not
/// read. The caller closes the stream as slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// Where a channel starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// Live from this position (the channel's latest, read after subscribing).
    Live(StreamId),
    /// From this position through history (a resume): the catch-up reads what follows.
    Resume(StreamId),
    /// History lost this stream's position: `hub.reset`, then live from this position.
    Reset(StreamId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    Live,
    /// More than the queue holds behind; waits for the catch-up.
    Behind,
    /// A history read (or the start) is in flight; live messages are buffered in `waiting`.
    Reading {
        token: u64,
    },
}

/// One channel of a stream.
struct Chan {
    name: ChannelName,
    /// Last position queued (or started from); older messages are skipped, which makes history
    /// + live exactly-once.
    pos: StreamId,
    /// Last position the transport took (what a trimmed queue rewinds to).
    taken: StreamId,
    read: Read,
    /// A live message for this channel was lost while Reading (the buffer was full): the read
    /// that lands cannot take the reader live.
    lost: bool,
    /// Subscribed but not started yet (see [`Session::start`]).
    fresh: bool,
    /// Reading (buffering live messages) whose read the catch-up has not issued yet.
    unread: bool,
    /// The client asked for this channel's `join`/`leave` events.
    presence: bool,
    /// Presence changes not all queued: the catch-up feeds them from the channel's log
    /// (see [`crate::presence_log`]) when the queue has room.
    presence_behind: bool,
    /// The channel's presence log read up to here (its cursor).
    presence_at: u64,
    /// Owed the channel's users as they are now ([`Item::Present`]) before any change.
    presence_fresh: bool,
}

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
    sink: Option<Box<dyn Sink>>,
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
        let ok = self.chans[i].read == (Read::Reading { token }) && !(live_only && self.ending);
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

/// A history read a stream needs (see [`Session::begin_reads`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    pub channel: ChannelName,
    /// The reader's position: the read starts after it.
    pub after: StreamId,
    /// Identifies this read to [`Session::feed`].
    pub token: u64,
    /// Messages the stream's queue can take now.
    pub room: usize,
}

/// How one history page is fed to one reader (see [`Session::feed`]).
pub struct PageView<'a> {
    /// Messages in position order, contiguous in the channel's history.
    pub entries: &'a [Arc<Message>],
    /// The position of the last message read (some may have been dropped as malformed).
    pub last: Option<StreamId>,
    /// The channel's latest position when the page was read.
    pub tail: StreamId,
    /// Every message after this position is still in history; a reader before it lost some.
    pub floor: StreamId,
    /// The page stopped at its size: more may follow `entries`.
    pub more: bool,
    /// The read began after the reader started buffering live messages and the broker's
    /// subscription stayed whole meanwhile, so a reader that reaches the end can go live.
    pub live_ok: bool,
}

/// What feeding a page did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// Messages queued from history.
    pub replayed: usize,
    /// Ephemeral messages lost (buffered live ones dropped because the reader stays behind).
    pub lagged: usize,
    /// The reader still needs history and has room now: request another read.
    pub again: bool,
    /// The reader's position had left history: it got `hub.reset`.
    pub reset: bool,
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
    /// One stream of an HTTP/2 connection: the HTTP server notices the client's reset of it
    /// only when its body is polled, so the tick wakes its writer every second
    /// ([`Session::poke`]) to look.
    pub multiplexed: bool,
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
    /// An observer that fell so far behind its channel's presence log that changes it had not
    /// read were forgotten: the tick closes it as slow.
    presence_lost: std::sync::atomic::AtomicBool,
    /// Where this stream asks for history reads (its `seq`); `None` in unit tests.
    refill: Option<UnboundedSender<u64>>,
    state: Mutex<State>,
}

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
            state.chans.push(Chan {
                name,
                pos: StreamId::ZERO,
                taken: StreamId::ZERO,
                read: Read::Reading { token },
                lost: false,
                fresh: true,
                unread: false,
                presence: false,
                presence_behind: false,
                presence_at: 0,
                presence_fresh: false,
            });
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
            multiplexed: init.multiplexed,
            capacity: init.capacity.max(1),
            last_write: AtomicU64::new(init.now),
            last_taken: AtomicU64::new(init.now),
            closed: AtomicU8::new(0),
            presence_lost: std::sync::atomic::AtomicBool::new(false),
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
                .any(|c| c.read == Read::Behind || c.unread || c.presence_behind);
        if due {
            st.refill_requested = true;
        }
        due
    }

    /// Offers a live message. Never blocks on the reader and never grows past the capacity:
    /// a live channel whose queue is full falls behind instead.
    pub fn offer(&self, msg: &Arc<Message>) -> Offer {
        let mut st = self.state.lock();
        if st.ending {
            return Offer::Skipped;
        }
        let Some(idx) = st.index(&msg.channel) else {
            return Offer::Skipped;
        };
        let chan = &st.chans[idx];
        if msg.position.is_some_and(|p| p <= chan.pos) {
            return Offer::Skipped;
        }
        let lost = || {
            if msg.position.is_none() {
                Offer::Lagged
            } else {
                Offer::Skipped
            }
        };
        match chan.read {
            Read::Behind => lost(),
            Read::Reading { .. } => {
                if st.waiting.len() < self.capacity {
                    st.waiting.push_back(msg.clone());
                    Offer::Queued
                } else {
                    st.chans[idx].lost = true;
                    lost()
                }
            }
            Read::Live if st.queue.len() < self.capacity => {
                if let Some(p) = msg.position {
                    st.chans[idx].pos = p;
                }
                let sent = match &st.sink {
                    Some(sink) if st.parked && st.queue.is_empty() => sink.send(msg, self),
                    _ => Sent::Nothing,
                };
                let rest = match sent {
                    Sent::Nothing => {
                        st.queue.push_back(Item::Message(msg.clone()));
                        Self::wake(st);
                        return Offer::Queued;
                    }
                    Sent::All => None,
                    Sent::Part(rest) => Some(rest),
                };
                // Written (a rest goes out before anything else): taken by the transport.
                if let Some(p) = msg.position {
                    st.chans[idx].taken = p;
                }
                if let Some(rest) = rest {
                    st.queue.push_back(Item::Raw(rest));
                    Self::wake(st);
                }
                Offer::Written
            }
            Read::Live => {
                // Fell behind: history carries it from its position on (the catch-up is asked
                // when the transport has drained half the queue).
                st.chans[idx].read = Read::Behind;
                lost()
            }
        }
    }

    /// Makes every live channel check its position against history before it takes live
    /// messages again (the broker may have lost some, e.g. across a reconnection): from now on
    /// live messages are buffered (bounded) and merged after the catch-up's read, as during
    /// any read, so ephemeral ones are not lost for the time the read takes.
    pub fn fall_behind(&self) {
        let mut st = self.state.lock();
        for i in 0..st.chans.len() {
            if st.chans[i].read == Read::Live {
                let token = st.take_token();
                let c = &mut st.chans[i];
                c.read = Read::Reading { token };
                c.lost = false;
                c.unread = true;
            }
        }
        let due = self.refill_due(&mut st);
        drop(st);
        if due {
            self.request_refill();
        }
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
                st.chans.insert(
                    at,
                    Chan {
                        name,
                        pos: StreamId::ZERO,
                        taken: StreamId::ZERO,
                        read: Read::Reading { token },
                        lost: false,
                        fresh: true,
                        unread: false,
                        presence: false,
                        presence_behind: false,
                        presence_at: 0,
                        presence_fresh: false,
                    },
                );
                true
            }
        }
    }

    /// The client wants `join`/`leave` events of `channel` (all channels with `None`).
    pub fn want_presence(&self, channel: Option<&str>) {
        let mut st = self.state.lock();
        for c in st.chans.iter_mut() {
            if channel.is_none_or(|n| n == c.name.as_str()) {
                c.presence = true;
            }
        }
    }

    /// Whether the client asked for `channel`'s presence: its log cursor if so.
    pub fn presence_cursor(&self, channel: &str) -> Option<u64> {
        let st = self.state.lock();
        let i = st.index(channel)?;
        st.chans[i].presence.then_some(st.chans[i].presence_at)
    }

    /// Starts an observer of `channel` at its presence log's `head` (the registry calls it
    /// under the channel's lock, as it offers changes): it is owed the users present first.
    /// `false` if it does not observe it.
    pub fn presence_start(&self, channel: &str, head: u64) -> bool {
        let mut st = self.state.lock();
        let Some(i) = st.index(channel) else {
            return false;
        };
        let c = &mut st.chans[i];
        c.presence_at = head;
        c.presence_behind = c.presence;
        c.presence_fresh = c.presence;
        c.presence
    }

    /// Something this observer waited for is there (its channel's users were read): asks the
    /// catch-up to feed it when there is room.
    pub fn presence_poke(&self, channel: &str) {
        let mut st = self.state.lock();
        let Some(i) = st.index(channel) else {
            return;
        };
        if !st.chans[i].presence_behind {
            return;
        }
        let due = self.refill_due(&mut st);
        drop(st);
        if due {
            self.request_refill();
        }
    }

    /// Offers the presence change `seq` of its channel's log. An observer that has read the
    /// log up to it and has room gets the shared event now; any other is left behind and
    /// the catch-up feeds it from the log at its pace ([`Session::presence_room`]): so no
    /// change is lost to a full queue (`Behind`). `Skipped` for a stream that does not observe
    /// it.
    pub fn offer_presence(&self, ev: &Arc<PresenceEvent>, seq: u64) -> Offer {
        let mut st = self.state.lock();
        if st.ending {
            return Offer::Skipped;
        }
        let Some(i) = st.index(&ev.channel) else {
            return Offer::Skipped;
        };
        if !st.chans[i].presence {
            return Offer::Skipped;
        }
        let c = &st.chans[i];
        if !c.presence_behind
            && st.started
            && c.presence_at + 1 == seq
            && st.queue.len() < self.capacity
        {
            st.chans[i].presence_at = seq;
            st.queue.push_back(Item::Presence(ev.clone()));
            Self::wake(st);
            return Offer::Queued;
        }
        st.chans[i].presence_behind = true;
        let due = self.refill_due(&mut st);
        drop(st);
        if due {
            self.request_refill();
        }
        Offer::Behind
    }

    /// The channels whose presence changes the catch-up should feed now.
    pub fn presence_due(&self) -> Vec<ChannelName> {
        let st = self.state.lock();
        if st.ending || !st.started {
            return Vec::new();
        }
        st.chans
            .iter()
            .filter(|c| c.presence_behind)
            .map(|c| c.name.clone())
            .collect()
    }

    /// An observer behind on `channel`'s presence: its cursor, the changes its queue can
    /// take now, and whether it is still owed the users present.
    pub fn presence_room(&self, channel: &str) -> Option<(u64, usize, bool)> {
        let st = self.state.lock();
        let i = st.index(channel)?;
        let c = &st.chans[i];
        // After the channel's start (its `subscribed` reply, the stream's opening).
        let fits = st.started && !c.fresh && !st.ending && st.queue.len() < self.capacity;
        (c.presence && c.presence_behind && fits).then(|| {
            (
                c.presence_at,
                self.capacity - st.queue.len(),
                c.presence_fresh,
            )
        })
    }

    /// Queues what was read from `channel`'s presence log at `from` (as
    /// [`Session::presence_room`] gave it, under the same channel lock): the users present
    /// (for an observer owed them), then changes, up to cursor `to`; caught up when `to` is
    /// the log's `head`.
    pub fn presence_fed(
        &self,
        channel: &str,
        from: u64,
        users: Option<Arc<[Arc<str>]>>,
        events: Vec<Arc<PresenceEvent>>,
        to: u64,
        head: u64,
    ) {
        let mut st = self.state.lock();
        let Some(i) = st.index(channel) else {
            return;
        };
        if st.ending || st.chans[i].presence_at != from {
            return;
        }
        let c = &mut st.chans[i];
        c.presence_at = to;
        c.presence_behind = to < head;
        if let Some(users) = users {
            c.presence_fresh = false;
            let channel = c.name.clone();
            st.queue
                .push_back(Item::Present(Box::new(PresenceState { channel, users })));
        }
        st.queue.extend(events.into_iter().map(Item::Presence));
        Self::wake(st);
    }

    /// Changes this observer had not read were forgotten (its channel's log hit its bound):
    /// it is closed as slow at the next tick.
    pub fn presence_lost(&self) {
        self.presence_lost.store(true, Ordering::Relaxed);
    }

    pub fn is_presence_lost(&self) -> bool {
        self.presence_lost.load(Ordering::Relaxed)
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

    /// Starts channels that are still being started: queues `head` (made from the position of
    /// every channel of the stream, e.g. `hub.connected`), then `hub.reset` for those that
    /// start with one, then takes the `Live` ones live (with what arrived meanwhile) and
    /// leaves the `Resume` ones behind for the catch-up.
    pub fn start(
        &self,
        starts: &[(ChannelName, StartAt)],
        head: impl FnOnce(&[StreamId]) -> Vec<Item>,
    ) -> Fed {
        let mut st = self.state.lock();
        if st.ending {
            return Fed::default();
        }
        let mut resets = Vec::new();
        let mut lagged = 0;
        for (name, at) in starts {
            let Some(i) = st.index(name) else { continue };
            let c = &mut st.chans[i];
            if !c.fresh {
                continue;
            }
            c.fresh = false;
            let start = match *at {
                StartAt::Live(p) | StartAt::Resume(p) | StartAt::Reset(p) => p,
            };
            c.taken = start;
            match *at {
                StartAt::Live(p) => c.pos = p,
                StartAt::Resume(p) => {
                    c.pos = p;
                    c.read = Read::Behind;
                    c.lost = false;
                    lagged += st.drop_waiting(name);
                }
                StartAt::Reset(p) => {
                    c.pos = p;
                    resets.push((name.clone(), p));
                }
            }
        }
        let positions: Vec<StreamId> = st.chans.iter().map(|c| c.pos).collect();
        st.queue.extend(head(&positions));
        st.started = true;
        if !resets.is_empty() {
            st.queue.push_back(Item::Reset(Box::new(resets)));
        }
        let mut fed = Fed {
            lagged,
            ..Fed::default()
        };
        for (name, at) in starts {
            if matches!(at, StartAt::Live(_) | StartAt::Reset(_)) {
                if let Some(i) = st.index(name) {
                    if matches!(st.chans[i].read, Read::Reading { .. }) {
                        self.go_live(&mut st, i, &mut fed);
                    }
                }
            }
        }
        let due = self.refill_due(&mut st);
        Self::wake(st);
        if due {
            self.request_refill();
        }
        fed
    }

    /// Takes a `Reading` channel live: queues its buffered live messages after its position.
    /// A lost buffered message, or a queue that fills up, leaves it behind instead.
    fn go_live(&self, st: &mut State, i: usize, fed: &mut Fed) {
        let name = st.chans[i].name.clone();
        if st.chans[i].lost {
            st.chans[i].lost = false;
            st.chans[i].read = Read::Behind;
            fed.lagged += st.drop_waiting(&name);
            return;
        }
        st.chans[i].read = Read::Live;
        let mine: Vec<Arc<Message>> = st
            .waiting
            .iter()
            .filter(|m| m.channel == name)
            .cloned()
            .collect();
        st.drop_waiting(&name);
        for (n, m) in mine.iter().enumerate() {
            if m.position.is_some_and(|p| p <= st.chans[i].pos) {
                continue;
            }
            if st.queue.len() >= self.capacity {
                st.chans[i].read = Read::Behind;
                fed.lagged += mine[n..].iter().filter(|m| m.position.is_none()).count();
                return;
            }
            if let Some(p) = m.position {
                st.chans[i].pos = p;
            }
            st.queue.push_back(Item::Message(m.clone()));
        }
    }

    /// Starts history reads for the channels that are behind, if the queue has room: each
    /// becomes `Reading` (live messages buffered from now on). Returns one [`ReadRequest`] per
    /// channel; the answer goes to [`Session::feed`].
    pub fn begin_reads(&self) -> Vec<ReadRequest> {
        let mut st = self.state.lock();
        st.refill_requested = false;
        if st.ending || st.queue.len() >= self.capacity {
            return Vec::new();
        }
        let room = self.capacity - st.queue.len();
        let mut reads = Vec::new();
        for i in 0..st.chans.len() {
            let token = match st.chans[i].read {
                Read::Behind => {
                    let token = st.take_token();
                    st.chans[i].read = Read::Reading { token };
                    st.chans[i].lost = false;
                    token
                }
                Read::Reading { token } if st.chans[i].unread => token,
                _ => continue,
            };
            let c = &mut st.chans[i];
            c.unread = false;
            reads.push(ReadRequest {
                channel: c.name.clone(),
                after: c.pos,
                token,
                room,
            });
        }
        reads
    }

    /// History cannot be read for `channel`: the read `token` ends with `hub.reset` (the
    /// client refetches its state) and the channel goes live from where it stands.
    pub fn give_up_read(&self, channel: &str, token: u64) -> Fed {
        let mut fed = Fed::default();
        let mut st = self.state.lock();
        let Some(i) = st.reading(channel, token, true) else {
            return fed;
        };
        let (name, pos) = (st.chans[i].name.clone(), st.chans[i].pos);
        st.queue.push_back(Item::Reset(Box::new(vec![(name, pos)])));
        fed.reset = true;
        st.chans[i].lost = false;
        self.go_live(&mut st, i, &mut fed);
        Self::wake(st);
        fed
    }

    /// Gives up a read that failed: the channel is behind again (the caller retries later).
    pub fn abort_read(&self, channel: &str, token: u64) -> usize {
        let mut st = self.state.lock();
        let Some(i) = st.reading(channel, token, false) else {
            return 0;
        };
        st.chans[i].read = Read::Behind;
        st.drop_waiting(channel)
    }

    /// Feeds one history page to the read `token` of `channel`: queues what follows the
    /// reader's position while there is room; a reader before the page's floor gets
    /// `hub.reset` and continues from the tail; a reader that reached the end of a fresh read
    /// goes live. Ignored if the channel changed meanwhile (unsubscribed, another read).
    pub fn feed(&self, channel: &str, token: u64, page: &PageView<'_>) -> Fed {
        let mut fed = Fed::default();
        let mut st = self.state.lock();
        let Some(i) = st.reading(channel, token, true) else {
            return fed;
        };
        let pos = st.chans[i].pos;
        let mut at_end = !page.more;
        if pos < page.floor || pos > page.tail {
            if st.queue.len() >= self.capacity + CONTROL_SLACK {
                st.chans[i].read = Read::Behind;
                fed.lagged += st.drop_waiting(channel);
                return fed;
            }
            st.chans[i].pos = page.tail;
            let name = st.chans[i].name.clone();
            st.queue
                .push_back(Item::Reset(Box::new(vec![(name, page.tail)])));
            fed.reset = true;
            at_end = true;
        } else {
            let start = page
                .entries
                .partition_point(|m| m.position.is_some_and(|p| p <= pos));
            let mut whole = true;
            for m in &page.entries[start..] {
                if st.queue.len() >= self.capacity {
                    whole = false;
                    break;
                }
                if let Some(p) = m.position {
                    st.chans[i].pos = p;
                }
                st.queue.push_back(Item::Message(m.clone()));
                fed.replayed += 1;
            }
            if whole {
                // Past what was dropped as malformed at the end of the page, too.
                if let Some(last) = page.last.filter(|l| *l > st.chans[i].pos) {
                    st.chans[i].pos = last;
                }
            } else {
                at_end = false;
            }
        }
        if at_end && page.live_ok {
            self.go_live(&mut st, i, &mut fed);
        } else {
            st.chans[i].read = Read::Behind;
            fed.lagged += st.drop_waiting(channel);
        }
        fed.again = self.refill_due(&mut st);
        Self::wake(st);
        fed
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

    /// Ends the queue: optionally drops what is queued (returning how many messages that was),
    /// then queues [`Item::End`]; the transport ends after it.
    pub fn finish(&self, reason: CloseReason, discard_queued: bool) -> usize {
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
    /// [`Session::multiplexed`]).
    pub fn poke(&self) {
        let waker = self.state.lock().waker.take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Lends the transport's sink (see [`Sink`]).
    pub fn attach(&self, sink: Box<dyn Sink>) {
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
            if c.fresh || c.pos == at {
                continue;
            }
            c.pos = at;
            match c.read {
                // A read not issued yet starts from the rewound position anyway.
                Read::Reading { .. } if c.unread => {}
                // A read in flight began after the old position: its page would skip what
                // lies between. It no longer applies (its token is void); the reader reads
                // again from the rewound position, and the live messages buffered for it are
                // left to history.
                Read::Reading { .. } => {
                    c.read = Read::Behind;
                    c.lost = false;
                    let name = c.name.clone();
                    lagged += st.drop_waiting(&name);
                }
                Read::Live | Read::Behind => c.read = Read::Behind,
            }
        }
        st.queue = kept;
        lagged
    }

    /// A sign of life (SSE: an item written; WebSocket: a frame from the client).
    pub fn touch(&self, now: u64) {
        self.last_write.store(now, Ordering::Relaxed);
    }

    /// The transport took an item.
    pub fn took(&self, now: u64) {
        self.last_taken.store(now, Ordering::Relaxed);
    }

    pub fn last_write(&self) -> u64 {
        self.last_write.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Transport;
    use protocol::Envelope;
    use std::time::Instant;

    fn chan(s: &str) -> ChannelName {
        ChannelName::new(s).unwrap()
    }

    fn id(n: u64) -> StreamId {
        StreamId::new(n, 0)
    }

    fn msg(c: &str, pos: Option<u64>, data: &str) -> Arc<Message> {
        let env = Envelope {
            event: None,
            data: data.into(),
        };
        Arc::new(Message::new(chan(c), pos.map(id), &env, Instant::now()))
    }

    fn session(channels: &[&str], cap: usize) -> Session {
        Session::new(
            SessionInit {
                seq: 1,
                transport: Transport::Sse,
                envelope: false,
                user: None,
                expires_at: None,
                capacity: cap,
                now: 0,
                refill: None,
                socket: None,
                multiplexed: false,
            },
            channels.iter().map(|c| chan(c)).collect(),
        )
    }

    /// What the transport would get now: data of messages, `reset`, `opened`, `hb`, `end`.
    fn drain(s: &Session) -> Vec<String> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = vec![];
        while let Poll::Ready(Some(item)) = s.poll_item(&mut cx) {
            out.push(match item {
                Item::Message(m) => m.data_json.trim_matches('"').to_string(),
                Item::Opened(_) => "opened".into(),
                Item::Reset(_) => "reset".into(),
                Item::Heartbeat => "hb".into(),
                Item::Reply(_) => "reply".into(),
                Item::Presence(p) => format!("{}:{}", if p.join { "join" } else { "leave" }, p.sub),
                Item::Present(p) => format!("present:{}", p.users.join(",")),
                Item::End(_) => "end".into(),
                Item::Raw(b) => format!("raw:{}", String::from_utf8_lossy(&b)),
            });
        }
        out
    }

    fn live(channels: &[&str], cap: usize) -> Session {
        let s = session(channels, cap);
        let starts: Vec<_> = channels
            .iter()
            .map(|c| (chan(c), StartAt::Live(StreamId::ZERO)))
            .collect();
        s.start(&starts, |_| vec![Item::Opened(Box::default())]);
        assert_eq!(drain(&s), ["opened"]);
        s
    }

    fn page<'a>(entries: &'a [Arc<Message>], tail: u64, more: bool) -> PageView<'a> {
        PageView {
            entries,
            last: entries.last().and_then(|m| m.position),
            tail: id(tail),
            floor: StreamId::ZERO,
            more,
            live_ok: true,
        }
    }

    #[test]
    fn live_messages_during_the_start_follow_it_exactly_once() {
        let s = session(&["a"], 16);
        // 2 and 3 arrive while the start reads the tail (2).
        assert_eq!(s.offer(&msg("a", Some(2), "two")), Offer::Queued);
        assert_eq!(s.offer(&msg("a", Some(3), "three")), Offer::Queued);
        assert!(drain(&s).is_empty(), "nothing before the start");
        s.start(&[(chan("a"), StartAt::Live(id(2)))], |p| {
            assert_eq!(p, [id(2)]);
            vec![Item::Opened(Box::new(p.to_vec()))]
        });
        assert_eq!(drain(&s), ["opened", "three"]);
        assert_eq!(s.offer(&msg("a", Some(3), "dup")), Offer::Skipped);
    }

    #[test]
    fn a_full_queue_falls_behind_and_history_takes_it_back_live() {
        let s = live(&["a"], 4);
        for n in 1..=4 {
            assert_eq!(s.offer(&msg("a", Some(n), "x")), Offer::Queued);
        }
        // The fifth does not fit: the reader falls behind; durable left to history, an
        // ephemeral one lost.
        assert_eq!(s.offer(&msg("a", Some(5), "x")), Offer::Skipped);
        assert_eq!(s.offer(&msg("a", None, "e")), Offer::Lagged);
        assert_eq!(s.offer(&msg("a", Some(6), "x")), Offer::Skipped);
        assert_eq!(s.queued(), 4, "the queue never grows past its capacity");
        assert_eq!(drain(&s).len(), 4);
        // Reading: live 7 arrives during the read and is merged after it.
        let reads = s.begin_reads();
        assert_eq!(reads.len(), 1);
        let (from, token) = (reads[0].after, reads[0].token);
        assert_eq!((from, reads[0].room), (id(4), 4));
        assert_eq!(s.offer(&msg("a", Some(7), "seven")), Offer::Queued);
        let entries = [msg("a", Some(5), "five"), msg("a", Some(6), "six")];
        let fed = s.feed("a", token, &page(&entries, 6, false));
        assert_eq!((fed.replayed, fed.again, fed.reset), (2, false, false));
        assert_eq!(drain(&s), ["five", "six", "seven"]);
        // Live again.
        assert_eq!(s.offer(&msg("a", Some(8), "eight")), Offer::Queued);
    }

    #[test]
    fn a_reader_takes_only_what_fits_and_asks_again() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut s = session(&["a"], 4);
        s.refill = Some(tx);
        s.start(&[(chan("a"), StartAt::Resume(id(0)))], |_| Vec::new());
        assert_eq!(rx.try_recv(), Ok(1), "a resume asks for history at once");
        let entries: Vec<_> = (1..=10).map(|n| msg("a", Some(n), "x")).collect();
        let token = s.begin_reads()[0].token;
        let fed = s.feed("a", token, &page(&entries, 10, false));
        assert_eq!((fed.replayed, fed.again), (4, false), "4 fit; no room yet");
        assert_eq!(drain(&s).len(), 4);
        assert_eq!(rx.try_recv(), Ok(1), "asked again once drained");
        let read = s.begin_reads()[0].clone();
        let token = read.token;
        assert_eq!(read.after, id(4));
        let fed = s.feed("a", token, &page(&entries, 10, false));
        assert_eq!(fed.replayed, 4);
    }

    #[test]
    fn a_reader_before_the_floor_is_reset_to_the_tail() {
        let s = session(&["a"], 8);
        s.start(&[(chan("a"), StartAt::Resume(id(1)))], |_| Vec::new());
        let token = s.begin_reads()[0].token;
        let entries = [msg("a", Some(5), "five")];
        let fed = s.feed(
            "a",
            token,
            &PageView {
                entries: &entries,
                last: Some(id(5)),
                tail: id(5),
                floor: id(3),
                more: false,
                live_ok: true,
            },
        );
        assert!(fed.reset);
        assert_eq!(drain(&s), ["reset"]);
        assert_eq!(s.position_of("a"), Some(id(5)));
        assert_eq!(s.offer(&msg("a", Some(6), "six")), Offer::Queued);
    }

    #[test]
    fn a_read_that_cannot_vouch_for_live_leaves_the_reader_behind() {
        let s = session(&["a"], 8);
        s.start(&[(chan("a"), StartAt::Resume(id(1)))], |_| Vec::new());
        let token = s.begin_reads()[0].token;
        assert_eq!(s.offer(&msg("a", None, "e")), Offer::Queued);
        let fed = s.feed(
            "a",
            token,
            &PageView {
                live_ok: false,
                ..page(&[], 1, false)
            },
        );
        assert_eq!(fed.lagged, 1, "the buffered ephemeral message is lost");
        assert_eq!(s.begin_reads().len(), 1, "still behind");
    }

    #[test]
    fn a_stale_token_is_ignored() {
        let s = session(&["a"], 8);
        s.start(&[(chan("a"), StartAt::Resume(id(1)))], |_| Vec::new());
        let token = s.begin_reads()[0].token;
        assert_eq!(s.abort_read("a", token), 0);
        let entries = [msg("a", Some(2), "two")];
        assert_eq!(
            s.feed("a", token, &page(&entries, 2, false)),
            Fed::default()
        );
        assert!(drain(&s).is_empty());
    }

    #[test]
    fn a_sleeping_reader_that_fell_behind_gives_back_its_durable_messages() {
        let s = live(&["a"], 4);
        s.offer(&msg("a", Some(1), "one"));
        s.offer(&msg("a", None, "e"));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(
            s.poll_item(&mut cx),
            Poll::Ready(Some(Item::Message(_)))
        ));
        s.took(5);
        for n in 2..=4 {
            assert_eq!(s.offer(&msg("a", Some(n), "x")), Offer::Queued);
        }
        s.trim_if_idle(10);
        assert_eq!(s.queued(), 4, "not behind yet: nothing given back");
        assert_eq!(
            s.offer(&msg("a", Some(5), "five")),
            Offer::Skipped,
            "falls behind"
        );
        s.trim_if_idle(4);
        assert_eq!(s.queued(), 4, "took something since: kept");
        s.trim_if_idle(10);
        assert_eq!(drain(&s), ["e"], "the ephemeral one stays");
        let read = s.begin_reads()[0].clone();
        assert_eq!(read.after, id(1), "rewound to what was taken");
    }

    /// Issue 21, defect 3: a sleeper's queue was trimmed while another of its channels had a
    /// history read in flight; the channel rewound but kept the read, whose page began after
    /// the old position, so the messages between were never delivered.
    #[test]
    fn a_trim_while_a_read_is_in_flight_loses_nothing() {
        let s = live(&["a", "b"], 8);
        for n in 1..=6 {
            s.offer(&msg("a", Some(n), &format!("a{n}")));
        }
        s.offer(&msg("b", Some(1), "b1"));
        s.offer(&msg("a", Some(7), "a7"));
        assert_eq!(
            s.offer(&msg("a", Some(8), "a8")),
            Offer::Skipped,
            "a falls behind"
        );
        let mut cx = Context::from_waker(Waker::noop());
        assert!(
            matches!(s.poll_item(&mut cx), Poll::Ready(Some(_))),
            "a1 taken"
        );
        s.took(1);
        // A reconnection to the broker: b must check its position too.
        s.fall_behind();
        let reads = s.begin_reads();
        let read = |c: &str| {
            reads
                .iter()
                .find(|r| r.channel.as_str() == c)
                .cloned()
                .unwrap()
        };
        let (ra, rb) = (read("a"), read("b"));
        assert_eq!((ra.after, rb.after), (id(7), id(1)));
        // a's page fills the queue and leaves it behind; b's read is still under way.
        let a8 = [msg("a", Some(8), "a8")];
        s.feed("a", ra.token, &page(&a8, 9, true));
        // The reader sleeps: its durable messages are given back.
        s.trim_if_idle(5);
        // b's read lands with what followed b1.
        let history_b = [msg("b", Some(1), "b1"), msg("b", Some(2), "b2")];
        s.feed("b", rb.token, &page(&history_b[1..], 2, false));
        // The catch-up goes on until nothing is behind; collect what b gets.
        let history_a: Vec<_> = (1..=9)
            .map(|n| msg("a", Some(n), &format!("a{n}")))
            .collect();
        let mut got = Vec::new();
        for _ in 0..10 {
            got.extend(drain(&s));
            for r in s.begin_reads() {
                let h: &[Arc<Message>] = if r.channel.as_str() == "a" {
                    &history_a
                } else {
                    &history_b
                };
                let from = h.partition_point(|m| m.position <= Some(r.after));
                let tail = h.last().and_then(|m| m.position).unwrap().ms;
                s.feed(r.channel.as_str(), r.token, &page(&h[from..], tail, false));
            }
        }
        got.extend(drain(&s));
        let b: Vec<_> = got.iter().filter(|d| d.starts_with('b')).cloned().collect();
        assert_eq!(
            b,
            ["b1", "b2"],
            "every message of b once, in order: {got:?}"
        );
        let a: Vec<_> = got.iter().filter(|d| d.starts_with('a')).cloned().collect();
        let want: Vec<_> = (2..=9).map(|n| format!("a{n}")).collect();
        assert_eq!(a, want, "every message of a after what was taken");
    }

    #[test]
    fn a_reader_that_must_check_its_position_buffers_live_messages_meanwhile() {
        let s = live(&["a"], 8);
        s.offer(&msg("a", Some(1), "one"));
        s.fall_behind();
        // Until the read lands, live messages wait (an ephemeral one is not lost).
        assert_eq!(s.offer(&msg("a", None, "e")), Offer::Queued);
        assert_eq!(s.offer(&msg("a", Some(3), "three")), Offer::Queued);
        let read = s.begin_reads()[0].clone();
        assert_eq!(read.after, id(1));
        assert!(s.begin_reads().is_empty(), "one read at a time");
        // History had 2 (lost live across the reconnection) and 3.
        let entries = [msg("a", Some(2), "two"), msg("a", Some(3), "three")];
        let fed = s.feed("a", read.token, &page(&entries, 3, false));
        assert_eq!((fed.replayed, fed.lagged), (2, 0));
        assert_eq!(drain(&s), ["one", "two", "three", "e"]);
    }

    #[test]
    fn heartbeats_only_on_an_idle_started_stream() {
        let s = session(&["a"], 4);
        assert!(!s.push_heartbeat(), "not before the start");
        s.start(&[(chan("a"), StartAt::Live(id(0)))], |_| Vec::new());
        assert!(s.push_heartbeat());
        assert!(!s.push_heartbeat(), "not while something is queued");
        assert_eq!(drain(&s), ["hb"]);
    }

    #[test]
    fn replies_have_a_bounded_slack() {
        let s = live(&["a"], 2);
        for _ in 0..2 + CONTROL_SLACK {
            assert_eq!(s.push_reply(Reply::Subscribed(chan("a"))), Ok(()));
        }
        assert_eq!(s.push_reply(Reply::Subscribed(chan("a"))), Err(Full));
    }

    #[test]
    fn presence_events_reach_only_channels_that_asked_and_a_full_queue_falls_behind() {
        let s = live(&["a", "b"], 4);
        drain(&s);
        let ev = |c: &str, join: bool| {
            Arc::new(PresenceEvent {
                channel: chan(c),
                sub: Arc::from("u"),
                join,
            })
        };
        assert_eq!(s.offer_presence(&ev("a", true), 1), Offer::Skipped);
        s.want_presence(Some("a"));
        assert!(s.presence_start("a", 1) && !s.presence_start("b", 0));
        // Owed the users present first: a change waits behind them.
        assert_eq!(s.offer_presence(&ev("a", true), 2), Offer::Behind);
        assert_eq!(s.presence_room("a"), Some((1, 4, true)));
        s.presence_fed("a", 1, Some(Arc::from(vec![Arc::from("v")])), vec![], 1, 2);
        assert_eq!(s.presence_room("a"), Some((1, 3, false)));
        s.presence_fed("a", 1, None, vec![ev("a", true)], 2, 2);
        assert_eq!(drain(&s), ["present:v", "join:u"]);
        assert_eq!(s.offer_presence(&ev("b", true), 1), Offer::Skipped);
        assert_eq!(s.presence_cursor("a"), Some(2));
        assert_eq!(s.presence_cursor("b"), None);
        // A full queue: the change is left to the log, and so is every later one.
        for i in 0..4 {
            s.offer(&msg("a", Some(i + 1), "m"));
        }
        assert_eq!(s.offer_presence(&ev("a", false), 3), Offer::Behind);
        assert_eq!(s.presence_room("a"), None, "no room yet");
        assert_eq!(drain(&s).len(), 4);
        assert_eq!(s.presence_due(), [chan("a")]);
        assert_eq!(s.presence_room("a"), Some((2, 4, false)));
        s.presence_fed("a", 2, None, vec![ev("a", false)], 3, 3);
        assert_eq!(drain(&s), ["leave:u"]);
        assert!(s.presence_due().is_empty(), "caught up");
        assert_eq!(s.offer_presence(&ev("a", true), 4), Offer::Queued);
        assert_eq!(drain(&s), ["join:u"], "queued directly again");
    }

    /// A socket that takes what the test scripts, and keeps what it took.
    #[derive(Default)]
    struct Script {
        takes: Mutex<VecDeque<usize>>,
        wrote: Mutex<Vec<String>>,
    }

    impl Sink for Arc<Script> {
        fn send(&self, msg: &Message, session: &Session) -> Sent {
            let frame = Bytes::from(msg.data_json.trim_matches('"').to_string());
            let n = self
                .takes
                .lock()
                .pop_front()
                .unwrap_or(usize::MAX)
                .min(frame.len());
            if n == 0 {
                return Sent::Nothing;
            }
            self.wrote
                .lock()
                .push(String::from_utf8_lossy(&frame[..n]).into_owned());
            session.took(7);
            if n == frame.len() {
                Sent::All
            } else {
                Sent::Part(frame.slice(n..))
            }
        }
    }

    #[test]
    fn a_parked_writer_lets_the_fanout_write_and_anything_queued_goes_first() {
        let s = live(&["a"], 4);
        let sock = Arc::new(Script::default());
        s.attach(Box::new(sock.clone()));
        // Not parked yet: queued.
        s.offer(&msg("a", Some(1), "m1"));
        assert_eq!(drain(&s), ["m1"]);
        s.park();
        assert_eq!(s.offer(&msg("a", Some(2), "m2")), Offer::Written);
        assert_eq!(s.queued(), 0, "written by the fan-out, not queued");
        assert_eq!(*sock.wrote.lock(), ["m2"]);
        assert_eq!(s.last_taken.load(Ordering::Relaxed), 7);
        // A short write: the frame's rest is queued and everything after it follows it.
        sock.takes.lock().extend([1]);
        s.offer(&msg("a", Some(3), "m3"));
        s.offer(&msg("a", Some(4), "m4"));
        assert_eq!(*sock.wrote.lock(), ["m2", "m"]);
        // Already written (or started): an older position is not offered again.
        assert_eq!(s.offer(&msg("a", Some(3), "m3")), Offer::Skipped);
        assert_eq!(drain(&s), ["raw:3", "m4"]);
        // The socket is full: queued, and the writer (woken) writes it.
        s.park();
        sock.takes.lock().extend([0]);
        s.offer(&msg("a", Some(5), "m5"));
        assert_eq!(drain(&s), ["m5"]);
        // Something of the writer's own queued (a heartbeat): messages queue behind it.
        s.park();
        assert!(s.push_heartbeat());
        s.offer(&msg("a", Some(6), "m6"));
        // The writer about to write bytes of its own.
        assert_eq!(drain(&s), ["hb", "m6"]);
        s.park();
        s.unpark();
        s.offer(&msg("a", Some(7), "m7"));
        assert_eq!(drain(&s), ["m7"]);
        // Taken back: nothing is written through it again.
        s.park();
        s.detach();
        s.offer(&msg("a", Some(8), "m8"));
        assert_eq!(drain(&s), ["m8"]);
        assert_eq!(*sock.wrote.lock(), ["m2", "m"]);
    }

    #[test]
    fn a_dropped_queue_keeps_a_frames_rest_and_a_sleeper_rewinds_to_what_was_written() {
        let s = live(&["a"], 2);
        let sock = Arc::new(Script::default());
        s.attach(Box::new(sock.clone()));
        s.park();
        sock.takes.lock().extend([1]);
        s.offer(&msg("a", Some(1), "m1"));
        s.offer(&msg("a", Some(2), "m2"));
        assert_eq!(s.finish(CloseReason::Slow, true), 1);
        assert_eq!(drain(&s), ["raw:1", "end"]);
        // Written through the sink counts as taken: the queue gives back only what follows.
        let s = live(&["a"], 1);
        s.attach(Box::new(sock.clone()));
        s.park();
        s.offer(&msg("a", Some(1), "m1"));
        s.unpark();
        s.offer(&msg("a", Some(2), "m2"));
        s.offer(&msg("a", Some(3), "m3"));
        s.last_taken.store(0, Ordering::Relaxed);
        s.trim_if_idle(1);
        assert_eq!(s.queued(), 0);
        assert_eq!(s.position_of("a"), Some(id(1)));
    }

    #[test]
    fn finish_ends_with_the_reason() {
        let s = live(&["a"], 4);
        s.offer(&msg("a", Some(1), "x"));
        assert_eq!(s.finish(CloseReason::Stale, true), 1);
        assert_eq!(drain(&s), ["end"]);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(s.poll_item(&mut cx), Poll::Ready(None)));
        assert!(s.mark_closed(CloseReason::Stale));
        assert!(!s.mark_closed(CloseReason::Client), "first reason wins");
    }
}
