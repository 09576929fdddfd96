//! One channel's recent `join`/`leave`s on this node, which its observers read at their own pace
//! by cursor, so that a storm of thousands of joins reaches a reader whole, however small its
//! queue. It keeps per user only the changes some observer has not read; it never touches
//! streams, locks or the broker (the registry holds it under the channel's lock).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// Changes kept per channel at most, however slow its slowest observer (24 bytes each): at
/// 10,000 users joining and then leaving that is 5 storms behind. Past it the oldest half is
/// forgotten and an observer that had not read it is closed as slow (see [`PresenceLog::prune`]).
pub const MAX_KEPT: usize = 100_000;
/// Changes one [`PresenceLog::read`] looks at, at most: bounds the time the channel's lock is
/// held (a reader that gets nothing from them, e.g. joins and leaves that cancel, asks again).
const SCAN: usize = 4096;

/// What [`PresenceLog::record`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Not a change (a join of a user already present).
    Nothing,
    /// The change's sequence number.
    At(u64),
    /// The change's sequence number; the log is due for pruning to the slowest observer's
    /// cursor (see [`PresenceLog::prune`]).
    Full(u64),
}

/// See the module doc.
#[derive(Default)]
pub struct PresenceLog {
    /// Sequence number of the change before `changes[0]`: a cursor before it missed some.
    floor: u64,
    /// Changes after `floor`, in order: the user and whether it joined.
    changes: VecDeque<(Arc<str>, bool)>,
    /// Users present as far as this node heard.
    present: HashSet<Arc<str>>,
    /// Prune when `changes` reaches this many (doubles with what survives a prune).
    next_prune: usize,
    /// The users present at `head()` = .0, sorted: shared by every observer that starts
    /// while nothing changes.
    snapshot: Option<(u64, Arc<[Arc<str>]>)>,
}

impl PresenceLog {
    /// The cursor of an observer that has read everything.
    pub fn head(&self) -> u64 {
        self.floor + self.changes.len() as u64
    }

    /// The oldest cursor the log can still serve.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Records that `sub` joined (`join`) or left. A leave of a user this node never heard
    /// join is kept (a client may know of it from `GET /v1/presence`).
    pub fn record(&mut self, sub: &Arc<str>, join: bool) -> Recorded {
        if join {
            if !self.present.insert(sub.clone()) {
                return Recorded::Nothing;
            }
        } else {
            self.present.remove(sub);
        }
        self.changes.push_back((sub.clone(), join));
        let seq = self.head();
        if self.changes.len() >= self.next_prune.max(1024) {
            Recorded::Full(seq)
        } else {
            Recorded::At(seq)
        }
    }

    /// Forgets the changes every observer has read (`slowest`: the lowest cursor; `head()`
    /// without observers), and if [`MAX_KEPT`] or more remain, the oldest down to half of
    /// it. Returns the new floor: observers before it missed changes.
    pub fn prune(&mut self, slowest: u64) -> u64 {
        let mut floor = slowest.clamp(self.floor, self.head());
        if self.head() - floor >= MAX_KEPT as u64 {
            floor = self.head() - (MAX_KEPT / 2) as u64;
        }
        let drop = (floor - self.floor) as usize;
        self.changes.drain(..drop);
        self.floor = floor;
        if self.changes.is_empty() {
            self.changes = VecDeque::new();
        }
        self.next_prune = (2 * self.changes.len()).clamp(1024, MAX_KEPT);
        floor
    }

    /// What an observer at `cursor` (at or after the floor) has not seen, as at most `max`
    /// net changes: each user whose state moved between `cursor` and the returned cursor,
    /// once, with its state there (a join and a leave it did not read cancel). Reading on
    /// from the returned cursor gets the rest; the returned cursor is `head()` when done.
    pub fn read(&self, cursor: u64, max: usize) -> (Vec<(Arc<str>, bool)>, u64) {
        let from = cursor.saturating_sub(self.floor) as usize;
        // Per user touched, in first-touch order: an odd number of changes, and the last one.
        let mut touched: Vec<(&Arc<str>, bool, bool)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut odd = 0;
        let mut at = cursor.max(self.floor);
        for (sub, join) in self.changes.iter().skip(from).take(SCAN) {
            let i = *index.entry(&**sub).or_insert_with(|| {
                touched.push((sub, false, false));
                touched.len() - 1
            });
            let t = &mut touched[i];
            if !t.1 && odd == max {
                // One more net change would not fit: stop before it.
                break;
            }
            t.1 = !t.1;
            t.2 = *join;
            if t.1 {
                odd += 1;
            } else {
                odd -= 1;
            }
            at += 1;
        }
        let out = touched
            .into_iter()
            .filter(|t| t.1)
            .map(|(sub, _, join)| (sub.clone(), join))
            .collect();
        (out, at)
    }

    /// The users present now, sorted (what a new observer starts from, with cursor `head()`).
    pub fn snapshot(&mut self) -> Arc<[Arc<str>]> {
        let head = self.head();
        match &self.snapshot {
            Some((at, users)) if *at == head => users.clone(),
            _ => {
                let mut users: Vec<Arc<str>> = self.present.iter().cloned().collect();
                users.sort_unstable();
                let users: Arc<[Arc<str>]> = users.into();
                self.snapshot = Some((head, users.clone()));
                users
            }
        }
    }

    /// The changes that make this log's users `truth` (read from every node's counts): a
    /// leave for each present user not in it, a join for each one in it not present.
    pub fn reconcile(&self, truth: &HashSet<Arc<str>>) -> Vec<(Arc<str>, bool)> {
        let mut out: Vec<(Arc<str>, bool)> = self
            .present
            .iter()
            .filter(|u| !truth.contains(*u))
            .map(|u| (u.clone(), false))
            .collect();
        out.extend(
            truth
                .iter()
                .filter(|u| !self.present.contains(*u))
                .map(|u| (u.clone(), true)),
        );
        out.sort_unstable();
        out
    }

    /// Users present as far as this log knows (for tests).
    #[cfg(test)]
    fn present(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.present.iter().map(|s| &**s).collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn sub(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    /// Reads everything after `cursor`, `page` at a time.
    fn read_all(log: &PresenceLog, mut cursor: u64, page: usize) -> (Vec<(String, bool)>, u64) {
        let mut out = Vec::new();
        loop {
            let (got, next) = log.read(cursor, page);
            out.extend(got.into_iter().map(|(s, j)| (s.to_string(), j)));
            if next == cursor || next == log.head() {
                return (out, next);
            }
            cursor = next;
        }
    }

    #[test]
    fn an_observer_gets_each_net_change_once_and_unread_pairs_cancel() {
        let mut log = PresenceLog::default();
        let a = sub("a");
        let b = sub("b");
        assert_eq!(log.record(&a, true), Recorded::At(1));
        assert_eq!(log.record(&a, true), Recorded::Nothing, "already present");
        let seen_a = log.head();
        assert_eq!(log.record(&b, true), Recorded::At(2));
        assert_eq!(log.record(&b, false), Recorded::At(3));
        assert_eq!(log.record(&a, false), Recorded::At(4));
        // From the start: b joined and left unseen (nothing), a left unseen after its join.
        assert_eq!(read_all(&log, 0, 10).0, []);
        // After a's join: only a's leave.
        assert_eq!(read_all(&log, seen_a, 10).0, [("a".into(), false)]);
        assert_eq!(read_all(&log, seen_a, 10).1, 4);
        // A leave of a user never seen here (joined before this node listened) is a change.
        assert_eq!(log.record(&sub("c"), false), Recorded::At(5));
        assert_eq!(read_all(&log, 4, 10).0, [("c".into(), false)]);
    }

    #[test]
    fn pruning_keeps_what_the_slowest_observer_has_not_read_and_bounds_the_rest() {
        let mut log = PresenceLog::default();
        for i in 0..100 {
            log.record(&sub(&format!("u{i}")), true);
        }
        for i in 0..50 {
            log.record(&sub(&format!("u{i}")), false);
        }
        assert_eq!(log.prune(120), 120);
        assert_eq!(log.changes.len(), 30, "changes 121..150");
        assert_eq!(read_all(&log, 120, 7).0.len(), 30);
        assert_eq!(log.prune(log.head()), 150);
        assert!(log.changes.is_empty());
        assert_eq!(log.present().len(), 50, "users 50..99");
        let snap = log.snapshot();
        assert_eq!(snap.len(), 50);
        assert!(Arc::ptr_eq(&snap, &log.snapshot()), "shared until a change");
        let truth: HashSet<Arc<str>> = ["u50", "u98", "new"].into_iter().map(sub).collect();
        let fix = log.reconcile(&truth);
        assert_eq!(fix.len(), 48 + 1);
        assert!(fix.contains(&(sub("new"), true)) && fix.contains(&(sub("u51"), false)));
        for (u, j) in fix {
            log.record(&u, j);
        }
        assert_eq!(log.present(), ["new", "u50", "u98"]);
        assert!(!Arc::ptr_eq(&snap, &log.snapshot()));
        // A stuck observer at 0 cannot hold more than MAX_KEPT.
        let mut log = PresenceLog::default();
        for i in 0..MAX_KEPT as u64 + 10 {
            let s = sub(&format!("u{}", i / 2));
            if let Recorded::Full(_) = log.record(&s, i % 2 == 0) {
                let floor = log.prune(0);
                assert!(log.changes.len() < MAX_KEPT, "{}", log.changes.len());
                assert!(floor == 0 || floor >= log.head() - MAX_KEPT as u64);
            }
        }
        assert!(log.floor() > 0, "the stuck observer was left behind");
    }

    proptest! {
        /// Whatever the interleaving of changes, reads of any page size and prunes to the
        /// slowest cursor, an observer that applies what it reads (join: add, leave: remove)
        /// ends with exactly the users present, and never gets a change that is no change.
        #[test]
        fn an_observer_that_applies_what_it_reads_holds_the_truth(
            ops in proptest::collection::vec((0u8..6, any::<bool>(), 0u8..4), 1..300),
            page in 1usize..5,
        ) {
            let mut log = PresenceLog::default();
            let mut truth = BTreeSet::new();
            // Two observers: one reads often, one rarely.
            let mut views = [BTreeSet::new(), BTreeSet::new()];
            let mut cursors = [0u64, 0u64];
            for (i, (user, join, action)) in ops.into_iter().enumerate() {
                let s = format!("u{user}");
                // The registry reports a user's count crossing 0, so every event is a change.
                if truth.contains(&s) != join {
                    if let Recorded::Full(_) = log.record(&sub(&s), join) {
                        log.prune(cursors[0].min(cursors[1]));
                    }
                    if join { truth.insert(s); } else { truth.remove(&s); }
                }
                for (o, every) in [(0usize, 1usize), (1, 7)] {
                    if i % every == 0 && action > 0 {
                        let (got, next) = log.read(cursors[o], page);
                        for (s, j) in got {
                            let s = s.to_string();
                            if j { prop_assert!(views[o].insert(s)); } else { prop_assert!(views[o].remove(&s)); }
                        }
                        cursors[o] = next;
                    }
                }
                if action == 3 {
                    log.prune(cursors[0].min(cursors[1]));
                }
            }
            for o in 0..2 {
                let (got, _) = read_all(&log, cursors[o], page);
                for (s, j) in got {
                    if j { prop_assert!(views[o].insert(s)); } else { prop_assert!(views[o].remove(&s)); }
                }
                prop_assert_eq!(&views[o], &truth);
            }
        }
    }
}
