//! Admission: a place for a new stream against the node's limit and its user's, released
//! exactly once at the stream's close, and the wait of an opening at a limit for a place being
//! released. No I/O; the node decides how long to wait.

use super::Registry;
use crate::domain::RejectReason;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Registry {
    /// Reserves a place for a new stream of `user`: refused with `Capacity` when `max` streams
    /// are admitted, with `UserLimit` when `user` already has `per_user`. Released by `close`
    /// (the session carries the user).
    pub fn try_admit(
        &self,
        max: usize,
        user: Option<&Arc<str>>,
        per_user: usize,
    ) -> Result<(), RejectReason> {
        let mut users = user.map(|_| self.users.lock());
        if let (Some(users), Some(u)) = (users.as_mut(), user) {
            if users.get(u).copied().unwrap_or(0) >= per_user {
                return Err(RejectReason::UserLimit);
            }
        }
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| RejectReason::Capacity)?;
        if let (Some(users), Some(u)) = (users.as_mut(), user) {
            *users.entry(u.clone()).or_insert(0) += 1;
        }
        Ok(())
    }

    pub(crate) fn release(&self, user: Option<&Arc<str>>) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
        if let Some(u) = user {
            let mut users = self.users.lock();
            if let Some(n) = users.get_mut(u) {
                *n -= 1;
                if *n == 0 {
                    users.remove(u);
                }
            }
        }
        // Every waiter looks (at most `ADMIT_WAITERS`): the first in line may be a user still
        // at its own limit, for whom this place is no use, while another waits for it.
        self.released.notify_waiters();
    }

    /// Notified (every waiter) whenever a place is released.
    pub fn releases(&self) -> &tokio::sync::Notify {
        &self.released
    }

    /// Streams admitted for `user`.
    pub fn user_streams(&self, user: &str) -> usize {
        self.users.lock().get(user).copied().unwrap_or(0)
    }

    pub fn admitted(&self) -> usize {
        self.admitted.load(Ordering::Acquire)
    }

    /// Distinct users with a stream on this node, and streams without a token.
    pub fn presence_gauges(&self) -> (usize, usize) {
        let users = self.users.lock();
        let with_user: usize = users.values().sum();
        (
            users.len(),
            self.admitted
                .load(Ordering::Relaxed)
                .saturating_sub(with_user),
        )
    }
}
