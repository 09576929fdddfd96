//! Presence cursors: for each channel whose `join`/`leave` the client asked for, how far it
//! has read the channel's presence log (see [`crate::channels::presence_log`]). A change goes straight
//! into the queue only when the observer has read everything before it and has room; any other
//! is left to the catch-up, which feeds it from the log at the reader's pace.

use super::{Item, Offer, PresenceEvent, PresenceState, Session};
use protocol::ChannelName;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Session {
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
        let fits =
            st.started && !c.read.is_starting() && !st.ending && st.queue.len() < self.capacity;
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
        self.flags
            .fetch_or(super::FLAG_PRESENCE_LOST, Ordering::Relaxed);
    }

    pub fn is_presence_lost(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & super::FLAG_PRESENCE_LOST != 0
    }
}
