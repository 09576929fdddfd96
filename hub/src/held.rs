//! Held refusals: the thread where a connection whose answer is held back (`Addresses::hold`)
//! waits, and gets it at its tick, at the lowest CPU priority (delivery goes first). It decides
//! nothing: what is held, until when and what the answer says are the caller's.

// setpriority(2) on the holding thread: one call, explained at `lowest_priority`.
#![allow(unsafe_code)]

use crate::addresses::{Addresses, Held};
use crate::hangup::{client_gone, send_and_close};
use bytes::Bytes;
use std::io;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// A connection waiting for its answer.
struct Waiting {
    io: std::net::TcpStream,
    answer: Bytes,
    at: Instant,
    /// Its place among the held (`max_held`), given back when the answer is sent or the
    /// client leaves.
    held: Held,
}

/// The holding thread; stopped (every connection held there closed) when dropped.
pub struct HeldAnswers {
    /// Unbounded: what waits in it holds a [`Held`] place, of which there are `max_held`.
    to_thread: mpsc::UnboundedSender<Waiting>,
    _stop: oneshot::Sender<()>,
}

impl HeldAnswers {
    /// Starts the holding thread. It takes what was handed to it once a tick of `addresses`
    /// (`Addresses::tick`), so that a flood hands it thousands of connections a second at the
    /// cost of ten wake-ups.
    pub fn start(addresses: Arc<Addresses>) -> io::Result<HeldAnswers> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (to_thread, arrivals) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("hub-held".into())
            .spawn(move || {
                lowest_priority();
                rt.block_on(async move {
                    tokio::select! {
                        _ = stopped => {}
                        () = take(arrivals, &addresses) => {}
                    }
                })
            })?;
        Ok(HeldAnswers {
            to_thread,
            _stop: stop,
        })
    }

    /// Answers `io` with `answer` at `at` and closes it; or closes it unanswered as soon as
    /// the client leaves. `held` is given back either way.
    pub fn answer_at(&self, io: std::net::TcpStream, answer: Bytes, at: Instant, held: Held) {
        // A stopped thread drops the connection: closed unanswered, as at a node's stop.
        let _ = self.to_thread.send(Waiting {
            io,
            answer,
            at,
            held,
        });
    }
}

/// Takes what arrives, once a tick: the first arrival wakes the thread, which then waits for
/// the next tick and takes everything handed over meanwhile (no wake-up per connection).
async fn take(mut arrivals: mpsc::UnboundedReceiver<Waiting>, addresses: &Addresses) {
    let mut batch = Vec::new();
    while arrivals.recv_many(&mut batch, usize::MAX).await > 0 {
        let next = addresses.tick(Instant::now());
        tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
        while let Ok(w) = arrivals.try_recv() {
            batch.push(w);
        }
        for w in batch.drain(..) {
            tokio::spawn(wait_and_answer(w));
        }
    }
}

async fn wait_and_answer(w: Waiting) {
    let _held = w.held;
    let Ok(io) = TcpStream::from_std(w.io) else {
        return;
    };
    tokio::select! {
        () = tokio::time::sleep_until(tokio::time::Instant::from_std(w.at)) => {
            send_and_close(io, &w.answer).await
        }
        () = client_gone(&io, None) => {}
    }
}

/// Lowers the calling thread to the lowest priority (nice 19): it runs when the node's other
/// threads (accepting, delivering) leave it a core, or a small share (~1.5%) of a busy one.
fn lowest_priority() {
    // SAFETY: setpriority reads its three integer arguments only. On Linux a nice value is a
    // thread's own, and `who` 0 is the calling thread. Failing (a seccomp policy) leaves the
    // thread at the normal priority, which only costs the node the gain.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    if rc != 0 {
        tracing::debug!(
            error = %io::Error::last_os_error(),
            "the held refusals' thread stays at the normal priority"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    /// A held place of `a` (one refusal beyond the burst of one address).
    fn place(a: &Arc<Addresses>) -> Held {
        let ip = Some("1.1.1.1".parse().expect("ip"));
        let now = Instant::now();
        loop {
            if let Some(held) = a.hold(ip, now) {
                return held;
            }
        }
    }

    /// A connected pair: the client's end, and the server's as a std socket (non-blocking, as
    /// `TcpStream::into_std` leaves it).
    async fn pair() -> (TcpStream, std::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server.into_std().expect("std"))
    }

    /// The nice value of each `hub-held` thread of this process (one test starts them: tests
    /// run in parallel).
    fn holding_threads() -> Vec<String> {
        let mut found = Vec::new();
        for task in std::fs::read_dir("/proc/self/task")
            .expect("tasks")
            .flatten()
        {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim() == "hub-held" {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                // The nice value is field 19, the 17th after the command's closing bracket.
                let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
                found.push(after.split_whitespace().nth(16).unwrap_or("").to_owned());
            }
        }
        found
    }

    async fn wait(what: &str, deadline: Instant, mut done: impl FnMut() -> bool) {
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn held_answers_leave_at_their_tick_from_a_thread_at_the_lowest_priority() {
        let deadline = Instant::now() + Duration::from_secs(10);
        let a = Arc::new(Addresses::new(Vec::new(), 1, 0, 8));
        let holding = HeldAnswers::start(a.clone()).expect("thread");
        wait("a hub-held thread at nice 19", deadline, || {
            holding_threads() == ["19"]
        })
        .await;

        let (mut client, server) = pair().await;
        let due = a.tick(Instant::now() + Duration::from_millis(300));
        holding.answer_at(server, Bytes::from_static(b"answer"), due, place(&a));
        let (leaver, server) = pair().await;
        let later = Instant::now() + Duration::from_secs(60);
        holding.answer_at(server, Bytes::from_static(b"never"), later, place(&a));
        assert_eq!(a.held(), 2);
        // The leaver's place comes back long before its answer would have been due.
        drop(leaver);
        wait("the leaver's place given back", deadline, || a.held() == 1).await;
        // The other gets its answer, then the close, not before it is due.
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
            .await
            .expect("answered in time")
            .expect("read");
        assert!(Instant::now() >= due, "answered early");
        assert_eq!(got, b"answer");
        wait("the place given back", deadline, || a.held() == 0).await;

        // Dropped, the thread stops, closing what it holds unanswered.
        let (mut last, server) = pair().await;
        holding.answer_at(server, Bytes::from_static(b"never"), later, place(&a));
        drop(holding);
        wait("the thread stopped", deadline, || {
            holding_threads().is_empty()
        })
        .await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), last.read_to_end(&mut got))
            .await
            .expect("closed");
        assert!(got.is_empty(), "{got:?}");
        wait("its place given back", deadline, || a.held() == 0).await;
    }
}
