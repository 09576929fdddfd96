//! The embedded broker's webhook events: recorded in memory as the embedded presence table
//! decides them, in order, bounded (the oldest beyond `HUB_WEBHOOK_MAX_PENDING` are dropped and
//! counted). Lost when the process ends. It only records and hands out; the sender sends.

use super::{Event, Taken};
use crate::namespaces::Namespaces;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

/// See the module doc.
pub struct MemoryQueue {
    namespaces: Namespaces,
    max: usize,
    inner: Mutex<Inner>,
    seq: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// Waiting, oldest first; the first `taken` are the batch being sent.
    events: VecDeque<Event>,
    taken: usize,
    dropped: u64,
}

impl MemoryQueue {
    pub fn new(namespaces: Namespaces, max: usize) -> MemoryQueue {
        MemoryQueue {
            namespaces,
            max: max.max(1),
            inner: Mutex::new(Inner::default()),
            seq: AtomicU64::new(0),
        }
    }

    /// Records a channel's events of one presence change, in order: `occupied` first, the
    /// member events, then `vacated` (`was`/`is`: whether the channel had any stream before
    /// and after). Channels whose namespace has `webhooks = false` record nothing.
    pub fn record(&self, channel: &str, was: bool, is: bool, member: Option<(&str, bool)>) {
        if !self.namespaces.of(channel).webhooks {
            return;
        }
        let mut kinds: Vec<(&str, Option<&str>)> = Vec::with_capacity(3);
        if !was && is {
            kinds.push(("channel_occupied", None));
        }
        if let Some((sub, added)) = member {
            let kind = if added {
                "member_added"
            } else {
                "member_removed"
            };
            kinds.push((kind, Some(sub)));
        }
        if was && !is {
            kinds.push(("channel_vacated", None));
        }
        if kinds.is_empty() {
            return;
        }
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut inner = self.inner.lock();
        for (kind, sub) in kinds {
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            if inner.events.len() >= self.max {
                inner.events.pop_front();
                inner.dropped += 1;
                inner.taken = inner.taken.saturating_sub(1);
            }
            inner.events.push_back(Event {
                id: format!("{time_ms}-{seq}"),
                kind: kind.to_string(),
                channel: channel.to_string(),
                sub: sub.map(str::to_string),
                time_ms,
            });
        }
    }

    /// The next batch (after the one being sent, which is handed out again until it is
    /// acknowledged: a sender only asks again once it is done with it).
    pub(super) fn take(&self, count: usize) -> Taken {
        let mut inner = self.inner.lock();
        let dropped = std::mem::take(&mut inner.dropped);
        let pending = inner.events.len() as u64;
        if count == 0 {
            // A look while a batch is being retried.
            return Taken {
                held: true,
                dropped,
                pending,
                events: Vec::new(),
            };
        }
        let n = count.min(inner.events.len());
        inner.taken = n;
        Taken {
            held: true,
            dropped,
            pending,
            events: inner.events.iter().take(n).cloned().collect(),
        }
    }

    /// The batch handed out is done (sent or given up): it leaves the queue. Returns how many
    /// of it were still there (the bound may have dropped, and counted, some meanwhile).
    pub(super) fn ack(&self) -> u64 {
        let mut inner = self.inner.lock();
        let taken = std::mem::take(&mut inner.taken);
        let n = taken.min(inner.events.len());
        inner.events.drain(..n);
        n as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(t: &Taken) -> Vec<(String, Option<String>)> {
        t.events
            .iter()
            .map(|e| (e.kind.clone(), e.sub.clone()))
            .collect()
    }

    #[test]
    fn occupied_comes_first_and_vacated_last_and_ids_are_unique() {
        let q = MemoryQueue::new(Namespaces::default(), 100);
        q.record("room:1", false, true, Some(("alice", true)));
        q.record("room:1", true, false, Some(("alice", false)));
        q.record("room:1", true, true, None);
        let t = q.take(10);
        assert_eq!(
            kinds(&t),
            vec![
                ("channel_occupied".into(), None),
                ("member_added".into(), Some("alice".into())),
                ("member_removed".into(), Some("alice".into())),
                ("channel_vacated".into(), None),
            ]
        );
        let ids: std::collections::HashSet<_> = t.events.iter().map(|e| &e.id).collect();
        assert_eq!(ids.len(), 4);
    }

    #[test]
    fn a_batch_is_handed_out_again_until_acknowledged_and_the_bound_drops_the_oldest() {
        let q = MemoryQueue::new(Namespaces::default(), 3);
        for i in 0..5 {
            q.record(&format!("c{i}"), false, true, None);
        }
        let t = q.take(2);
        assert_eq!((t.dropped, t.pending), (2, 3));
        assert_eq!(t.events[0].channel, "c2");
        assert_eq!(
            q.take(2).events,
            t.events,
            "the same batch until acknowledged"
        );
        assert_eq!(q.take(0).events.len(), 0, "a look takes nothing");
        assert_eq!(q.ack(), 2);
        let t = q.take(2);
        assert_eq!((t.dropped, t.pending, t.events.len()), (0, 1, 1));
        assert_eq!(t.events[0].channel, "c4");
    }
}
