//! Conflation (`conflate_ms` of a namespace): a conflated channel's readers get at most one
//! message every N ms, the newest. A message that comes sooner waits in its channel's one slot
//! (a newer one replaces it, counted `conflated` once per reader) and goes out when the N ms
//! are up, from the flusher task. Only the fan-out's side; history reads jump by themselves
//! (see `catchup`).

use super::{shard_of, Registry};
use crate::message::Message;
use crate::metrics::DropReason;
use crate::namespaces::Namespaces;
use protocol::ChannelName;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;

/// A channel's conflation slot (under its shard lock).
pub(super) struct Slot {
    /// When a message last went out to its readers.
    last: Instant,
    /// The newest message that came sooner than N ms after it.
    waiting: Option<Arc<Message>>,
}

/// The registry's conflation settings and the flusher's queue.
pub(super) struct Conflation {
    namespaces: Namespaces,
    /// Channels whose slot holds a message, with when it is due. Unbounded but holding at most
    /// one entry per channel: a channel is queued only when its slot fills, and its slot fills
    /// again only after the flusher emptied it.
    due: UnboundedSender<(ChannelName, Instant)>,
}

/// What the fan-out does with a message of a conflated channel.
pub(super) enum Pace {
    /// Send it now.
    Now,
    /// It waits in the slot (or replaced what waited there).
    Held,
}

impl Registry {
    /// Turns conflation on for the namespaces with `conflate_ms` > 0 (none: nothing is
    /// checked per message). Returns the flusher the node runs; call once.
    pub fn conflate(
        &self,
        namespaces: &Namespaces,
    ) -> Option<UnboundedReceiver<(ChannelName, Instant)>> {
        if namespaces.all().iter().all(|n| n.conflate_ms == 0) {
            return None;
        }
        let (due, rx) = tokio::sync::mpsc::unbounded_channel();
        let set = self.conflation.set(Conflation {
            namespaces: namespaces.clone(),
            due,
        });
        set.is_ok().then_some(rx)
    }

    /// The fan-out's pace for `msg`: always [`Pace::Now`] on channels that are not conflated.
    pub(super) fn pace(&self, msg: &Arc<Message>) -> Pace {
        let Some(conf) = self.conflation.get() else {
            return Pace::Now;
        };
        let every = conf.namespaces.of(msg.channel.as_str()).conflate_ms;
        if every == 0 {
            return Pace::Now;
        }
        let every = Duration::from_millis(every);
        let now = Instant::now();
        let mut shard = self.channels[shard_of(&msg.channel)].lock();
        let Some(c) = shard.get_mut(msg.channel.as_str()) else {
            return Pace::Now; // no reader here: nothing to pace
        };
        let slot = c.conflate.get_or_insert_with(|| {
            Box::new(Slot {
                last: now - every,
                waiting: None,
            })
        });
        if slot.waiting.is_none() && now >= slot.last + every {
            slot.last = now;
            return Pace::Now;
        }
        match slot.waiting.replace(msg.clone()) {
            Some(_) => {
                let readers = c.readers.len() as u64;
                drop(shard);
                self.metrics
                    .dropped(DropReason::Conflated)
                    .increment(readers);
            }
            None => {
                let _ = conf.due.send((msg.channel.clone(), slot.last + every));
            }
        }
        Pace::Held
    }

    /// Sends what waits in `channel`'s slot (the flusher calls it when it is due).
    fn flush_conflated(&self, channel: &ChannelName) {
        let msg = {
            let mut shard = self.channels[shard_of(channel)].lock();
            let Some(slot) = shard
                .get_mut(channel.as_str())
                .and_then(|c| c.conflate.as_mut())
            else {
                return;
            };
            slot.last = Instant::now();
            slot.waiting.take()
        };
        if let Some(m) = msg {
            self.fanout_queued(&m);
        }
    }
}

/// Sends each conflated channel's waiting message when it is due, until the node stops.
pub async fn flusher(registry: Arc<Registry>, mut due: UnboundedReceiver<(ChannelName, Instant)>) {
    let mut heap: BinaryHeap<Reverse<(Instant, ChannelName)>> = BinaryHeap::new();
    loop {
        let next = heap.peek().map(|Reverse((at, _))| *at);
        tokio::select! {
            d = due.recv() => match d {
                Some((ch, at)) => heap.push(Reverse((at, ch))),
                None => return,
            },
            _ = async { tokio::time::sleep_until(next.unwrap_or_else(Instant::now)).await }, if next.is_some() => {
                let now = Instant::now();
                while heap.peek().is_some_and(|Reverse((at, _))| *at <= now) {
                    if let Some(Reverse((_, ch))) = heap.pop() {
                        registry.flush_conflated(&ch);
                    }
                }
            }
        }
    }
}
