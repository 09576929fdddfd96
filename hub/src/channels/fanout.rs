//! The fan-out: a message offered to every local reader of its channel (each stream's lock in
//! turn), by the fan-out lanes ([`super::lanes`]) when they run, else by the caller.

use super::conflate::Pace;
use super::{shard_of, Registry};
use crate::message::Message;
use crate::metrics::DropReason;
use crate::stream::{Offer, Session};
use std::sync::Arc;

/// What one fan-out did: messages queued, written to sockets, lost to readers behind.
#[derive(Default)]
pub(super) struct Offered {
    queued: usize,
    written: u64,
    lagged: u64,
}

impl std::ops::AddAssign for Offered {
    fn add_assign(&mut self, o: Offered) {
        self.queued += o.queued;
        self.written += o.written;
        self.lagged += o.lagged;
    }
}

impl Offered {
    /// Counts one outcome.
    pub(super) fn count(&mut self, o: Offer) {
        match o {
            Offer::Queued => self.queued += 1,
            Offer::Written => self.written += 1,
            Offer::Lagged => self.lagged += 1,
            Offer::Skipped | Offer::Behind => {}
        }
    }
}

/// Offers `msg` to `readers`.
fn offer_all<'a>(readers: impl Iterator<Item = &'a Arc<Session>>, msg: &Arc<Message>) -> Offered {
    let mut out = Offered::default();
    for s in readers {
        out.count(s.offer(msg));
    }
    out
}

impl Registry {
    /// Offers `msg` to every local reader of its channel on the caller's thread (a conflated
    /// channel's may wait, see [`super::conflate`]). Returns how many took it now. Tests
    /// only: the node delivers through [`Registry::fanout_later`].
    #[cfg(test)]
    pub fn fanout(&self, msg: &Arc<Message>) -> usize {
        match self.pace(msg) {
            Pace::Now => self.fanout_now(msg),
            Pace::Held => 0,
        }
    }

    /// Offers `msg` to every local reader of its channel, here and now (under the channel's
    /// lock). Returns how many took it. The node's messages go through its lanes
    /// ([`Registry::fanout_later`]); this is their path when none run.
    pub(super) fn fanout_now(&self, msg: &Arc<Message>) -> usize {
        let offered = {
            let shard = self.channels[shard_of(&msg.channel)].lock();
            match shard.get(msg.channel.as_str()) {
                None => Offered::default(),
                Some(c) => offer_all(c.readers.values(), msg),
            }
        };
        self.count_offered(&offered);
        offered.queued + offered.written as usize
    }

    /// Counts what one fan-out (or one lane's part of it) did.
    pub(super) fn count_offered(&self, offered: &Offered) {
        if offered.lagged > 0 {
            self.metrics
                .dropped(DropReason::Lagged)
                .increment(offered.lagged);
        }
        // Counted here, once per fan-out: queued ones are counted when the transport takes them.
        if offered.written > 0 {
            self.metrics.delivered.increment(offered.written);
        }
    }

    /// Hands `msg` to the fan-out lanes (see [`super::lanes`]) when they run, else offers it
    /// here. A conflated channel's message may wait (see [`super::conflate`]).
    pub fn fanout_later(&self, msg: &Arc<Message>) {
        if let Pace::Now = self.pace(msg) {
            self.fanout_queued(msg);
        }
    }

    /// [`Registry::fanout_later`] after the pace was decided.
    pub(super) fn fanout_queued(&self, msg: &Arc<Message>) {
        let Some(lanes) = self.lanes.get() else {
            self.fanout_now(msg);
            return;
        };
        let full = lanes.queue(msg);
        for k in full {
            self.lane_full(lanes, msg, k);
        }
    }
}
