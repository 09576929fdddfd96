//! The background tasks of a node or a broker: every task they start is kept here, so that a
//! stop aborts all of them (none outlives its owner), and finished ones are dropped as new ones
//! start, so a long-lived node's list stays as short as what runs. Nothing here decides when to
//! start or stop; it does not await the tasks.

use parking_lot::Mutex;
use std::future::Future;
use tokio::task::AbortHandle;

/// Running tasks; `None` once stopped (a task started after that is aborted at once).
#[derive(Default)]
pub struct Tasks(Mutex<Option<Vec<AbortHandle>>>);

impl Tasks {
    pub fn new() -> Tasks {
        Tasks(Mutex::new(Some(Vec::new())))
    }

    /// Starts `task` on the runtime, to be aborted at [`Tasks::stop`].
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.keep(tokio::spawn(task).abort_handle());
    }

    /// Keeps a task started elsewhere (a client library's connection task, say).
    pub fn keep(&self, handle: AbortHandle) {
        let mut running = self.0.lock();
        match running.as_mut() {
            Some(list) => {
                list.retain(|h| !h.is_finished());
                list.push(handle);
            }
            None => handle.abort(),
        }
    }

    /// Aborts every task, and every one started from now on.
    pub fn stop(&self) {
        let list = self.0.lock().take();
        for h in list.into_iter().flatten() {
            h.abort();
        }
    }

    /// Tasks kept and not known to be finished (for tests).
    pub fn len(&self) -> usize {
        self.0.lock().as_ref().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn finished_tasks_are_dropped_and_a_stop_aborts_the_rest_and_any_later() {
        let tasks = Tasks::new();
        for _ in 0..100 {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            tasks.spawn(async move {
                let _ = tx.send(());
            });
            rx.await.expect("the task ran");
        }
        // A finished task may still be reported running for a moment after its last poll.
        tokio::time::timeout(Duration::from_secs(5), async {
            while tasks.len() > 1 {
                tokio::task::yield_now().await;
                tasks.spawn(async {});
            }
        })
        .await
        .expect("finished tasks are dropped as new ones start");

        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            let _keep = tx;
            std::future::pending::<()>().await;
        });
        tasks.stop();
        assert!(
            rx.await.is_err(),
            "the running task was aborted (its sender dropped)"
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            let _keep = tx;
            std::future::pending::<()>().await;
        });
        assert!(
            rx.await.is_err(),
            "a task started after the stop is aborted at once"
        );
        assert!(tasks.is_empty());
    }
}
