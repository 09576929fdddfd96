//! The registry's side of presence: each channel's streams per user (and anonymous), the
//! counts that changed since the last report, and each channel's log of joins and leaves with
//! its observers' cursors, all under the channel's lock. The reporter (`crate::presence`) takes
//! the counts; the catch-up pumps observers that are behind.

use super::{shard_of, Channel, Registry};
use crate::channels::presence_log::{Recorded, MAX_KEPT};
use crate::metrics::DropReason;
use crate::stream::{PresenceEvent, Session};
use protocol::ChannelName;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// How far a channel's presence log knows who is there.
#[derive(Default)]
pub(super) enum Seed {
    /// Only from the changes heard since the channel got its first local reader.
    #[default]
    Partial,
    /// The users over every node are being read; changes heard meanwhile wait here and are
    /// applied after them (bounded: past [`crate::channels::presence_log::MAX_KEPT`] the read is not
    /// waited for).
    Reading(Vec<Arc<PresenceEvent>>),
    /// From that read on.
    Whole,
}

/// A (channel, user) whose count on this node changed (`None`: the anonymous count).
pub(super) type PresenceKey = (Arc<str>, Option<Arc<str>>);

/// One presence count to report: the node's streams on `channel` for `sub` (or anonymous).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceCount {
    pub channel: Arc<str>,
    pub sub: Option<Arc<str>>,
    pub streams: u32,
}

impl Registry {
    /// Notes presence counts that changed (outside the channel locks: `take_presence` takes
    /// this lock first and the channel locks after).
    pub(super) fn presence_changed(&self, keys: Vec<PresenceKey>) {
        if keys.is_empty() {
            return;
        }
        let now = self.clock.now();
        let mut dirty = self.presence_dirty.lock();
        for k in keys {
            let n = self.presence_changes.fetch_add(1, Ordering::Relaxed);
            dirty.insert(k, (now, n));
        }
    }

    /// The node's streams on `channel` for `sub` (anonymous with `None`).
    fn presence_count(&self, channel: &str, sub: Option<&Arc<str>>) -> u32 {
        let shard = self.channels[shard_of(channel)].lock();
        shard.get(channel).map_or(0, |c| match sub {
            Some(u) => c.users.get(u).copied().unwrap_or(0),
            None => c.anonymous,
        })
    }

    /// The presence counts to report now (coalesced since the last call): each changed
    /// (channel, user) with its current count, except a count (a user's, or the anonymous
    /// streams') that fell to 0 less than `grace` seconds ago: it is kept for later, so that a
    /// client that reconnects within it (to this node or another) makes no `leave` and no
    /// `join`, and its channel no `channel_vacated` and `channel_occupied`.
    pub fn take_presence(&self, grace: u64) -> Vec<PresenceCount> {
        let now = self.clock.now();
        let keys: Vec<(PresenceKey, (u64, u64))> = self
            .presence_dirty
            .lock()
            .iter()
            .map(|(k, t)| (k.clone(), *t))
            .collect();
        let mut out = Vec::new();
        let mut done = Vec::new();
        for ((channel, sub), (since, n)) in keys {
            let streams = self.presence_count(&channel, sub.as_ref());
            if streams == 0 && now < since + grace {
                continue;
            }
            done.push(((channel.clone(), sub.clone()), n));
            out.push(PresenceCount {
                channel,
                sub,
                streams,
            });
        }
        let mut dirty = self.presence_dirty.lock();
        for (k, n) in done {
            // Changed again meanwhile: reported again next time.
            if dirty.get(&k).is_some_and(|(_, m)| *m == n) {
                dirty.remove(&k);
            }
        }
        out
    }

    /// Marks every (channel, user) with local streams, and every channel's anonymous count,
    /// to be reported (a node that cleared what it had reported before reports it all again).
    pub fn presence_mark_all(&self) {
        let mut keys = Vec::new();
        for shard in self.channels.iter() {
            for (name, c) in shard.lock().iter() {
                keys.extend(c.users.keys().map(|u| (name.clone(), Some(u.clone()))));
                keys.push((name.clone(), None));
            }
        }
        self.presence_changed(keys);
    }

    /// Counts whose report failed: reported again next time (at once, even a 0).
    pub fn presence_retry(&self, counts: impl Iterator<Item = PresenceCount>) {
        let mut dirty = self.presence_dirty.lock();
        for c in counts {
            let n = self.presence_changes.fetch_add(1, Ordering::Relaxed);
            dirty.entry((c.channel, c.sub)).or_insert((0, n));
        }
    }

    /// Records a `join`/`leave` in its channel's presence log and hands it to the local
    /// readers that asked for them (the ones behind read it from the log later).
    pub fn presence_event(&self, ev: &Arc<PresenceEvent>) {
        let lost = {
            let mut shard = self.channels[shard_of(&ev.channel)].lock();
            let Some(c) = shard.get_mut(ev.channel.as_str()) else {
                return;
            };
            match &mut c.seed {
                Seed::Reading(held) if held.len() < MAX_KEPT => {
                    held.push(ev.clone());
                    0
                }
                Seed::Reading(_) => {
                    tracing::warn!(channel = %ev.channel, "presence: too many changes while reading the channel's users; not waiting for the read");
                    Self::end_seed(c, &ev.channel, None) + Self::record_presence(c, ev)
                }
                _ => Self::record_presence(c, ev),
            }
        };
        if lost > 0 {
            self.metrics.dropped(DropReason::Lagged).increment(lost);
        }
    }

    /// Records one change and offers it to the channel's observers. When the log is due for
    /// pruning, it forgets what every observer has read; an observer so slow that the log's
    /// bound forgot changes it had not read is marked to be closed as slow (returns how many).
    fn record_presence(c: &mut Channel, ev: &Arc<PresenceEvent>) -> u64 {
        let (seq, full) = match c.log.record(&ev.sub, ev.join) {
            Recorded::Nothing => return 0,
            Recorded::At(seq) => (seq, false),
            Recorded::Full(seq) => (seq, true),
        };
        for s in c.observers.values() {
            s.offer_presence(ev, seq);
        }
        if !full {
            if c.observers.is_empty() {
                // Nobody to read it: only who is present is kept.
                c.log.prune(seq);
            }
            return 0;
        }
        let slowest = c
            .observers
            .values()
            .filter_map(|s| s.presence_cursor(ev.channel.as_str()))
            .min()
            .unwrap_or(seq);
        let floor = c.log.prune(slowest);
        let mut lost = 0;
        if floor > slowest {
            for s in c.observers.values() {
                if s.presence_cursor(ev.channel.as_str())
                    .is_some_and(|at| at < floor)
                {
                    tracing::warn!(connection_id = %s.id, channel = %ev.channel, "an observer fell too far behind the channel's presence changes: closing it as slow");
                    s.presence_lost();
                    lost += 1;
                }
            }
        }
        lost
    }

    /// Ends a channel's seed read: the changes that make its log match `users` (the users over
    /// every node when they were read; `None` if the read failed: the log stays partial), then
    /// the changes heard meanwhile; its observers waiting for their first list are fed.
    fn end_seed(
        c: &mut Channel,
        channel: &ChannelName,
        users: Option<&std::collections::HashSet<Arc<str>>>,
    ) -> u64 {
        // A failed read leaves the log partial: the next observer has it read again.
        let next = if users.is_some() {
            Seed::Whole
        } else {
            Seed::Partial
        };
        let held = match std::mem::replace(&mut c.seed, next) {
            Seed::Reading(held) => held,
            other => {
                c.seed = other;
                return 0;
            }
        };
        let mut lost = 0;
        if let Some(users) = users {
            for (sub, join) in c.log.reconcile(users) {
                let ev = Arc::new(PresenceEvent {
                    channel: channel.clone(),
                    sub,
                    join,
                });
                lost += Self::record_presence(c, &ev);
            }
        }
        for ev in &held {
            lost += Self::record_presence(c, ev);
        }
        lost
    }

    /// Claims `channel`'s seed read: `true` if its log is not known whole (the channel's
    /// first observer, or the first after a reconnection to the broker) and nobody reads it;
    /// the caller then reads every node's users and hands them to [`Registry::presence_seed`].
    pub fn presence_claim_seed(&self, channel: &str) -> bool {
        let mut shard = self.channels[shard_of(channel)].lock();
        match shard.get_mut(channel) {
            Some(c) if matches!(c.seed, Seed::Partial) => {
                c.seed = Seed::Reading(Vec::new());
                true
            }
            _ => false,
        }
    }

    /// The users over every node (`None`: they could not be read) for a claimed seed read.
    pub fn presence_seed(&self, channel: &ChannelName, users: Option<Vec<Arc<str>>>) {
        let users: Option<std::collections::HashSet<Arc<str>>> =
            users.map(|u| u.into_iter().collect());
        let (lost, observers) = {
            let mut shard = self.channels[shard_of(channel)].lock();
            let Some(c) = shard.get_mut(channel.as_str()) else {
                return;
            };
            let lost = Self::end_seed(c, channel, users.as_ref());
            (lost, c.observers.values().cloned().collect::<Vec<_>>())
        };
        for s in observers {
            s.presence_poke(channel.as_str());
        }
        if lost > 0 {
            self.metrics.dropped(DropReason::Lagged).increment(lost);
        }
    }

    /// Every channel's log may have missed changes (the broker reconnected): each is read
    /// again. Returns the channels with observers, for the caller to claim and read.
    pub fn presence_unseed_all(&self) -> Vec<ChannelName> {
        let mut out = Vec::new();
        for shard in self.channels.iter() {
            for (name, c) in shard.lock().iter_mut() {
                if matches!(c.seed, Seed::Whole) {
                    c.seed = Seed::Partial;
                }
                if !c.observers.is_empty() {
                    out.extend(ChannelName::new(name).ok());
                }
            }
        }
        out
    }

    /// Feeds `session` what it is owed of its channels' presence, as far as its queue takes
    /// it (the catch-up calls it when the stream has room): first the users present (once
    /// the channel's seed read is done), then changes from its cursor on.
    pub fn pump_presence(&self, session: &Session) {
        for ch in session.presence_due() {
            loop {
                let mut shard = self.channels[shard_of(&ch)].lock();
                let Some(c) = shard.get_mut(ch.as_str()) else {
                    break;
                };
                let Some((from, room, fresh)) = session.presence_room(ch.as_str()) else {
                    break;
                };
                let head = c.log.head();
                if fresh {
                    if matches!(c.seed, Seed::Reading(_)) {
                        break; // fed when the read lands (presence_poke)
                    }
                    let users = c.log.snapshot();
                    session.presence_fed(ch.as_str(), from, Some(users), Vec::new(), head, head);
                    break;
                }
                if from < c.log.floor() {
                    session.presence_lost();
                    break;
                }
                let (changes, to) = c.log.read(from, room);
                let events = changes
                    .into_iter()
                    .map(|(sub, join)| {
                        Arc::new(PresenceEvent {
                            channel: ch.clone(),
                            sub,
                            join,
                        })
                    })
                    .collect();
                session.presence_fed(ch.as_str(), from, None, events, to, head);
                if to == head || to == from {
                    break;
                }
            }
        }
    }
}
