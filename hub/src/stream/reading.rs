//! Each channel of a stream and how it is read. **Live**: the fan-out queues the shared
//! message. **Behind**: the reader fell more than the queue's capacity behind; live durable
//! messages are left to history and ephemeral ones are lost (counted `lagged` by the caller).
//! **Reading**: a start or a history read is due or in flight; live messages wait in a bounded
//! buffer and are merged, deduplicated by position, when it lands. A reader that is behind is
//! fed from history by the catch-up at its own pace, so nothing here grows with how far behind
//! it is.

use super::{Item, Session, State, CONTROL_SLACK};
use crate::message::Message;
use protocol::{ChannelName, StreamId};
use std::sync::Arc;

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

/// How a channel is read: one state, no loose flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Read {
    /// The fan-out queues its messages.
    Live,
    /// More than the queue holds behind; waits for the catch-up.
    Behind,
    /// Live messages are buffered in `waiting` until what is under way lands: the channel's
    /// start, or the history read `token`.
    Reading {
        token: u64,
        stage: Stage,
        /// A live message was lost meanwhile (the buffer was full): what lands cannot take
        /// the reader live.
        lost: bool,
    },
}

/// Where a [`Read::Reading`] channel is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// Subscribed but not started yet (see [`Session::start`]).
    Starting,
    /// Its position must be checked against history; the catch-up has not issued the read.
    Due,
    /// The read is issued (or the start is being completed): its page goes to
    /// [`Session::feed`].
    Issued,
}

impl Read {
    /// A channel whose start is still to come.
    pub(super) fn starting(token: u64) -> Read {
        Read::Reading {
            token,
            stage: Stage::Starting,
            lost: false,
        }
    }

    pub(super) fn is_starting(&self) -> bool {
        matches!(
            self,
            Read::Reading {
                stage: Stage::Starting,
                ..
            }
        )
    }

    /// A read the catch-up should issue.
    pub(super) fn is_due(&self) -> bool {
        matches!(
            self,
            Read::Reading {
                stage: Stage::Due,
                ..
            }
        )
    }

    /// Whether this is the read `token`, at whatever stage.
    pub(super) fn is_read(&self, token: u64) -> bool {
        matches!(self, Read::Reading { token: t, .. } if *t == token)
    }

    /// Marks what is under way as unable to take the reader live.
    pub(super) fn lose(&mut self) {
        if let Read::Reading { lost, .. } = self {
            *lost = true;
        }
    }
}

/// One channel of a stream.
pub(super) struct Chan {
    pub(super) name: ChannelName,
    /// Last position queued (or started from); older messages are skipped, which makes history
    /// + live exactly-once.
    pub(super) pos: StreamId,
    /// Last position the transport took (what a trimmed queue rewinds to).
    pub(super) taken: StreamId,
    pub(super) read: Read,
    /// The client asked for this channel's `join`/`leave` events.
    pub(super) presence: bool,
    /// Presence changes not all queued: the catch-up feeds them from the channel's log
    /// (see [`crate::channels::presence_log`]) when the queue has room.
    pub(super) presence_behind: bool,
    /// The channel's presence log read up to here (its cursor).
    pub(super) presence_at: u64,
    /// Owed the channel's users as they are now ([`Item::Present`]) before any change.
    pub(super) presence_fresh: bool,
}

impl Chan {
    /// A channel just subscribed: `Reading` until its start.
    pub(super) fn new(name: ChannelName, token: u64) -> Chan {
        Chan {
            name,
            pos: StreamId::ZERO,
            taken: StreamId::ZERO,
            read: Read::starting(token),
            presence: false,
            presence_behind: false,
            presence_at: 0,
            presence_fresh: false,
        }
    }
}

/// Each channel of a stream costs this (most streams have one): checked at compile time.
const _: () = assert!(std::mem::size_of::<Chan>() <= CHAN_BYTES);
/// The bound of [`Chan`]'s size: name (16), two positions (32), the read state (16),
/// the presence cursor (8) and its flags.
const CHAN_BYTES: usize = 80;

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

impl Session {
    /// Makes every live channel check its position against history before it takes live
    /// messages again (the broker may have lost some, e.g. across a reconnection): from now on
    /// live messages are buffered (bounded) and merged after the catch-up's read, as during
    /// any read, so ephemeral ones are not lost for the time the read takes.
    pub fn fall_behind(&self) {
        self.fall_behind_where(|_| true);
    }

    /// [`Session::fall_behind`] for one of its channels only.
    pub fn fall_behind_on(&self, channel: &str) {
        self.fall_behind_where(|name| name.as_str() == channel);
    }

    fn fall_behind_where(&self, pick: impl Fn(&ChannelName) -> bool) {
        let mut st = self.state.lock();
        for i in 0..st.chans.len() {
            if st.chans[i].read == Read::Live && pick(&st.chans[i].name) {
                let token = st.take_token();
                let c = &mut st.chans[i];
                c.read = Read::Reading {
                    token,
                    stage: Stage::Due,
                    lost: false,
                };
            }
        }
        let due = self.refill_due(&mut st);
        drop(st);
        if due {
            self.request_refill();
        }
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
            let Read::Reading { stage, .. } = &mut c.read else {
                continue;
            };
            if *stage != Stage::Starting {
                continue;
            }
            // Completed below, in this same step: live or behind.
            *stage = Stage::Issued;
            let start = match *at {
                StartAt::Live(p) | StartAt::Resume(p) | StartAt::Reset(p) => p,
            };
            c.taken = start;
            match *at {
                StartAt::Live(p) => c.pos = p,
                StartAt::Resume(p) => {
                    c.pos = p;
                    c.read = Read::Behind;
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
        if matches!(st.chans[i].read, Read::Reading { lost: true, .. }) {
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
                Read::Behind => st.take_token(),
                Read::Reading {
                    token,
                    stage: Stage::Due,
                    ..
                } => token,
                _ => continue,
            };
            let c = &mut st.chans[i];
            // A read due keeps what it knows of lost messages; one from behind starts clean.
            let lost = matches!(c.read, Read::Reading { lost: true, .. });
            c.read = Read::Reading {
                token,
                stage: Stage::Issued,
                lost,
            };
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
        if let Read::Reading { lost, .. } = &mut st.chans[i].read {
            *lost = false;
        }
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
}
