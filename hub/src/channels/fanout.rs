//! The fan-out: a message offered to every local reader of its channel under the channel's
//! shard lock (shard lock, then each stream's lock; no allocation per reader), split over the
//! cores for large channels so that the last reader does not wait for all the others.

use super::conflate::Pace;
use super::{shard_of, Registry};
use crate::message::Message;
use crate::metrics::DropReason;
use crate::stream::{Offer, Session};
use std::sync::Arc;

/// Readers of one channel from which a message's fan-out is split over the cores: a reader
/// whose socket the fan-out writes itself (see `stream::DirectSink`) costs a `write`, and one
/// thread writing 10,000 sockets in turn would make the last wait for all the others.
pub(super) const SPLIT_AT: usize = 1024;
/// Most threads one fan-out uses (the caller's included).
pub(super) const SPLIT_MAX: usize = 4;
/// Stack of a fan-out helper thread: it only offers a message to sessions.
const SPLIT_STACK: usize = 64 * 1024;

/// What one fan-out did: messages queued, written to sockets, lost to readers behind.
#[derive(Default)]
struct Offered {
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

/// Offers `msg` to `readers`.
fn offer_all<'a>(readers: impl Iterator<Item = &'a Arc<Session>>, msg: &Arc<Message>) -> Offered {
    let mut out = Offered::default();
    for s in readers {
        match s.offer(msg) {
            Offer::Queued => out.queued += 1,
            Offer::Written => out.written += 1,
            Offer::Lagged => out.lagged += 1,
            Offer::Skipped | Offer::Behind => {}
        }
    }
    out
}

impl Registry {
    /// Offers `msg` to every local reader of its channel (a conflated channel's may wait,
    /// see [`super::conflate`]). Returns how many took it now.
    pub fn fanout(&self, msg: &Arc<Message>) -> usize {
        match self.pace(msg) {
            Pace::Now => self.fanout_now(msg),
            Pace::Held => 0,
        }
    }

    /// Offers `msg` to every local reader of its channel. Returns how many took it. A
    /// channel with `SPLIT_AT` readers or more is offered by one thread per core at once
    /// (scoped threads, joined before returning, so messages stay in order).
    pub(super) fn fanout_now(&self, msg: &Arc<Message>) -> usize {
        let offered = {
            let shard = self.channels[shard_of(&msg.channel)].lock();
            match shard.get(msg.channel.as_str()) {
                None => Offered::default(),
                Some(c) if c.readers.len() < SPLIT_AT || self.cores < 2 => {
                    offer_all(c.readers.values(), msg)
                }
                Some(c) => {
                    let per = c.readers.len().div_ceil(self.cores);
                    std::thread::scope(|scope| {
                        let part =
                            |k: usize| offer_all(c.readers.values().skip(k * per).take(per), msg);
                        let helpers: Vec<_> = (1..self.cores)
                            .map(|k| {
                                let spawned = std::thread::Builder::new()
                                    .stack_size(SPLIT_STACK)
                                    .spawn_scoped(scope, move || part(k));
                                // No thread (resource limit): this one does that part too.
                                spawned.map_err(|_| part(k))
                            })
                            .collect();
                        let mut total = part(0);
                        for h in helpers {
                            total += match h {
                                Ok(h) => h.join().unwrap_or_else(|_| {
                                    // A bug, not input: the node stays up, and says so.
                                    tracing::error!(channel = %msg.channel, "a fan-out thread panicked; its part of the readers missed this message");
                                    Offered::default()
                                }),
                                Err(done) => done,
                            };
                        }
                        total
                    })
                }
            }
        };
        if offered.lagged > 0 {
            self.metrics
                .dropped(DropReason::Lagged)
                .increment(offered.lagged);
        }
        // Counted here, once per fan-out: queued ones are counted when the transport takes them.
        if offered.written > 0 {
            self.metrics.delivered.increment(offered.written);
        }
        offered.queued + offered.written as usize
    }
}
