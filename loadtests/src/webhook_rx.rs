//! A webhook receiver for the presence storm: answers every POST 200 at once and counts what
//! came (events by type after deduplication by id, duplicates, the largest batch, requests and
//! when the last new event arrived). HTTP/1.1 with keep-alive, as the hub's client speaks it.
//!
//! Bounded: a request's head at most 16 KB and its body at most 1 MB (a batch of 100 events
//! is about 12 KB); a connection that sends more is closed.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1024 * 1024;

/// What the receiver got.
#[derive(Default)]
pub struct Got {
    ids: HashSet<String>,
    pub by_type: HashMap<String, u64>,
    pub duplicates: u64,
    pub max_batch: usize,
    pub requests: u64,
    pub last_new: Option<Instant>,
}

impl Got {
    pub fn count(&self, kind: &str) -> u64 {
        self.by_type.get(kind).copied().unwrap_or(0)
    }
}

/// No lock is held across an await.
pub type Shared = Arc<std::sync::Mutex<Got>>;

/// Listens on `addr` and counts until the process ends.
pub async fn start(addr: SocketAddr) -> anyhow::Result<Shared> {
    let listener = TcpListener::bind(addr).await?;
    let got: Shared = Arc::default();
    let g = got.clone();
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            let g = g.clone();
            tokio::spawn(async move { serve(io, g).await });
        }
    });
    Ok(got)
}

async fn serve(mut io: TcpStream, got: Shared) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_HEAD {
                return;
            }
            let mut chunk = [0u8; 8192];
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if len > MAX_BODY {
            return;
        }
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 8192];
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        record(&got, &buf[head_end..head_end + len]);
        buf.drain(..head_end + len);
        if io
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
    }
}

fn record(got: &Shared, body: &[u8]) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    let events = v["events"].as_array().cloned().unwrap_or_default();
    let Ok(mut g) = got.lock() else { return };
    g.requests += 1;
    g.max_batch = g.max_batch.max(events.len());
    for e in events {
        let id = e["id"].as_str().unwrap_or_default().to_string();
        if !g.ids.insert(id) {
            g.duplicates += 1;
            continue;
        }
        let kind = e["type"].as_str().unwrap_or_default().to_string();
        *g.by_type.entry(kind).or_default() += 1;
        g.last_new = Some(Instant::now());
    }
}
