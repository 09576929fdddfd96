//! A backend the tests run: an HTTP/1.1 keep-alive server on loopback that records every
//! request (head and body) and answers with a status the test sets (webhook receivers).

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as received.
#[derive(Debug, Clone)]
pub struct Request {
    /// The request line and headers, lower-cased.
    pub head: String,
    pub body: Vec<u8>,
    /// The status it was answered.
    pub status: u16,
}

impl Request {
    /// A header's value (name in lower case).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
    }
}

/// See the module doc.
#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    status: Arc<AtomicU16>,
    /// Requests answered 500 before `status` applies again.
    fail_next: Arc<AtomicUsize>,
    got: Arc<Mutex<Vec<Request>>>,
}

impl Receiver {
    /// Listens on a free loopback port; answers `status` to every request.
    pub async fn start(status: u16) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let r = Receiver {
            url,
            status: Arc::new(AtomicU16::new(status)),
            fail_next: Arc::new(AtomicUsize::new(0)),
            got: Arc::new(Mutex::new(Vec::new())),
        };
        let me = r.clone();
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                let me = me.clone();
                tokio::spawn(async move { me.serve(io).await });
            }
        });
        r
    }

    /// The status answered from now on.
    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// The next `n` requests are answered 500.
    pub fn fail_next(&self, n: usize) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.got.lock().expect("lock").clone()
    }

    async fn serve(&self, mut io: TcpStream) {
        let mut buf = Vec::new();
        while let Some((head, body)) = read_request(&mut io, &mut buf).await {
            let failing = self
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let status = if failing {
                500
            } else {
                self.status.load(Ordering::SeqCst)
            };
            self.got
                .lock()
                .expect("lock")
                .push(Request { head, body, status });
            let res = format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\n\r\n{{}}");
            if io.write_all(res.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

/// Reads the next HTTP/1.1 request of a keep-alive connection: its head (lower-cased) and its
/// body (`Content-Length`); `buf` keeps what came after it. `None` when the connection ends.
pub async fn read_request(io: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        read_more(io, buf).await?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        read_more(io, buf).await?;
    }
    let body = buf[head_end..head_end + len].to_vec();
    buf.drain(..head_end + len);
    Some((head, body))
}

async fn read_more(io: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 4096];
    match io.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}
