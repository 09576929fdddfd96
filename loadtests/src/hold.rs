//! `loadgen hold`: holds N SSE streams from one source address and counts what arrives.
//!
//! Each stream is a raw TCP connection with its own small chunked-encoding decoder and SSE line
//! parser (no HTTP client per stream), so one process holds thousands cheaply. Message data is
//! `<seq> <unix micros>`; latency is now minus the send time. Prints `READY <opened> <failed>`
//! once every stream was tried, then the JSON report as its last line.

use crate::report::{self, HoldReport};
use anyhow::Context as _;
use hdrhistogram::Histogram;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};

#[derive(clap::Args, Debug, Clone)]
pub struct HoldArgs {
    /// Server address, e.g. 127.0.0.1:8080.
    #[arg(long)]
    pub target: SocketAddr,
    /// Request path and query, e.g. /v1/sse?channel=public:bench
    #[arg(long)]
    pub path: String,
    #[arg(long)]
    pub streams: u64,
    /// Source address of this process's connections (127.0.0.2, ...).
    #[arg(long, default_value = "127.0.0.1")]
    pub source: IpAddr,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Stop when every open stream has received this many messages.
    #[arg(long)]
    pub expect: Option<u64>,
    /// Longest hold, in seconds, whatever happens.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// This many of the streams stop reading once they are open (slow readers); they are not
    /// expected to receive anything.
    #[arg(long, default_value_t = 0)]
    pub stall: u64,
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

struct Shared {
    hist: Mutex<Histogram<u64>>,
    opened: AtomicU64,
    failed: AtomicU64,
    ended: AtomicU64,
    done: AtomicU64,
    deliveries: AtomicU64,
    duplicates: AtomicU64,
    stalled: AtomicU64,
    counts: Mutex<Vec<u64>>,
    last_connect: Mutex<Option<Instant>>,
    expect: Option<u64>,
}

/// Chunked transfer decoding, fed byte slices.
#[derive(Default)]
struct Chunked {
    size_line: Vec<u8>,
    remaining: usize,
    /// CR LF still to skip after a chunk's data.
    skip: usize,
    /// The last chunk (size 0) was seen: the response, and so the stream, is over.
    done: bool,
}

impl Chunked {
    fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(input.len());
                self.skip -= n;
                input = &input[n..];
            } else if self.remaining > 0 {
                let n = self.remaining.min(input.len());
                out.extend_from_slice(&input[..n]);
                self.remaining -= n;
                input = &input[n..];
                if self.remaining == 0 {
                    self.skip = 2;
                }
            } else {
                let b = input[0];
                input = &input[1..];
                if b == b'\n' {
                    let line = String::from_utf8_lossy(&self.size_line);
                    let hex = line.trim().split(';').next().unwrap_or("");
                    self.remaining = usize::from_str_radix(hex, 16).unwrap_or(0);
                    let last = self.remaining == 0 && !hex.is_empty();
                    self.size_line.clear();
                    if last {
                        self.done = true;
                        return;
                    }
                } else {
                    self.size_line.push(b);
                }
            }
        }
    }
}

/// One stream's SSE parsing state.
struct Stream {
    line: Vec<u8>,
    count: u64,
    last_seq: Option<u64>,
}

impl Stream {
    /// Processes decoded body bytes: every `data: <seq> <sent micros>` line is a delivery.
    fn feed(&mut self, bytes: &[u8], shared: &Shared, hist: &mut Vec<u64>) {
        for &b in bytes {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            if let Some(data) = self.line.strip_prefix(b"data: ") {
                let text = String::from_utf8_lossy(data);
                let mut parts = text.split(' ');
                if let (Some(Ok(seq)), Some(Ok(sent))) = (
                    parts.next().map(str::parse::<u64>),
                    parts.next().map(str::parse::<u64>),
                ) {
                    if self.last_seq.is_some_and(|l| seq <= l) {
                        shared.duplicates.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.last_seq = Some(seq);
                        self.count += 1;
                        shared.deliveries.fetch_add(1, Ordering::Relaxed);
                        hist.push(now_us().saturating_sub(sent).max(1));
                    }
                }
            }
            self.line.clear();
        }
    }
}

async fn one(
    args: Arc<HoldArgs>,
    shared: Arc<Shared>,
    permit: tokio::sync::OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
    stall: bool,
) {
    let conn = async {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(args.source, 0))?;
        let mut s = sock.connect(args.target).await?;
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            args.path, args.target
        );
        s.write_all(req.as_bytes()).await?;
        anyhow::Ok(s)
    };
    let mut s = match tokio::time::timeout(Duration::from_secs(30), conn).await {
        Ok(Ok(s)) => s,
        _ => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let mut buf = vec![0u8; 16 * 1024];
    let mut head = Vec::new();
    let mut body = Vec::new();
    let mut chunked: Option<Chunked> = None;
    let mut st = Stream {
        line: Vec::new(),
        count: 0,
        last_seq: None,
    };
    let mut permit = Some(permit);
    let mut lat = Vec::new();
    let mut reached = false;
    loop {
        let n = tokio::select! {
            r = s.read(&mut buf) => match r { Ok(0) | Err(_) => { shared.ended.fetch_add(1, Ordering::Relaxed); break } Ok(n) => n },
            _ = stop.changed() => break,
        };
        let mut data = &buf[..n];
        if chunked.is_none() {
            head.extend_from_slice(data);
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
            if !text.starts_with("http/1.1 200") {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let mut c = Chunked::default();
            if !text.contains("transfer-encoding: chunked") {
                c.remaining = usize::MAX;
            }
            let rest = head.split_off(end + 4);
            chunked = Some(c);
            shared.opened.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut t) = shared.last_connect.lock() {
                *t = Some(Instant::now());
            }
            permit.take();
            body.clear();
            if let Some(c) = chunked.as_mut() {
                c.feed(&rest, &mut body);
            }
            data = &[];
            if stall {
                // A reader that stopped: keep the socket open, never read again.
                shared.stalled.fetch_add(1, Ordering::Relaxed);
                let _ = stop.changed().await;
                return;
            }
        }
        if let Some(c) = chunked.as_mut() {
            c.feed(data, &mut body);
        }
        st.feed(&body, &shared, &mut lat);
        let over = chunked.as_ref().is_some_and(|c| c.done);
        body.clear();
        if !lat.is_empty() {
            if let Ok(mut h) = shared.hist.lock() {
                for v in lat.drain(..) {
                    let _ = h.record(v.min(report::MAX_LATENCY_US));
                }
            }
        }
        if !reached && shared.expect.is_some_and(|e| st.count >= e) {
            reached = true;
            shared.done.fetch_add(1, Ordering::Relaxed);
        }
        if over {
            // The server ended the response (a keep-alive connection stays open after it).
            shared.ended.fetch_add(1, Ordering::Relaxed);
            break;
        }
    }
    if let Ok(mut c) = shared.counts.lock() {
        c.push(st.count);
    }
}

pub async fn hold(
    args: HoldArgs,
    mut on_ready: impl FnMut(u64, u64),
) -> anyhow::Result<HoldReport> {
    let args = Arc::new(args);
    let shared = Arc::new(Shared {
        hist: Mutex::new(report::histogram()),
        opened: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        ended: AtomicU64::new(0),
        done: AtomicU64::new(0),
        deliveries: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        stalled: AtomicU64::new(0),
        counts: Mutex::new(Vec::new()),
        last_connect: Mutex::new(None),
        expect: args.expect,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let sem = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration);
    let mut tasks = Vec::with_capacity(args.streams as usize);
    for i in 0..args.streams {
        let permit = sem.clone().acquire_owned().await.context("semaphore")?;
        let stall = i < args.stall;
        tasks.push(tokio::spawn(one(
            args.clone(),
            shared.clone(),
            permit,
            stop_rx.clone(),
            stall,
        )));
    }
    // Every stream is connected or failed once all permits are back.
    let _all = tokio::time::timeout_at(
        deadline.into(),
        sem.acquire_many(args.concurrency.max(1) as u32),
    )
    .await;
    let opened = shared.opened.load(Ordering::Relaxed);
    let failed = shared.failed.load(Ordering::Relaxed);
    on_ready(opened, failed);
    let connect_secs = shared
        .last_connect
        .lock()
        .ok()
        .and_then(|t| *t)
        .map(|t| t.duration_since(started).as_secs_f64())
        .unwrap_or(0.0);
    loop {
        let open = shared.opened.load(Ordering::Relaxed);
        // Every stream is either done, ended by the server, or stalled on purpose.
        let finished = shared.done.load(Ordering::Relaxed)
            + shared.ended.load(Ordering::Relaxed)
            + shared.stalled.load(Ordering::Relaxed);
        if Instant::now() >= deadline || (args.expect.is_some() && finished >= open) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let counts = shared.counts.lock().map(|c| c.clone()).unwrap_or_default();
    let hist = shared
        .hist
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| report::histogram());
    Ok(HoldReport {
        streams_wanted: args.streams,
        streams_opened: shared.opened.load(Ordering::Relaxed),
        streams_failed: shared.failed.load(Ordering::Relaxed),
        streams_ended: shared.ended.load(Ordering::Relaxed),
        connect_secs,
        deliveries: shared.deliveries.load(Ordering::Relaxed),
        duplicates: shared.duplicates.load(Ordering::Relaxed),
        streams_stalled: shared.stalled.load(Ordering::Relaxed),
        min_per_stream: counts.iter().copied().min().unwrap_or(0),
        max_per_stream: counts.iter().copied().max().unwrap_or(0),
        latency_us: report::pairs(&hist),
    })
}

pub async fn main(args: HoldArgs) -> anyhow::Result<()> {
    let report = hold(args, |opened, failed| println!("READY {opened} {failed}")).await?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_decoding_across_splits() {
        let wire = b"5\r\nhello\r\nB;ext=1\r\n world, ok.\r\n0\r\n\r\n";
        for split in 1..wire.len() {
            let mut c = Chunked::default();
            let mut out = Vec::new();
            c.feed(&wire[..split], &mut out);
            c.feed(&wire[split..], &mut out);
            assert_eq!(out, b"hello world, ok.", "split at {split}");
            assert!(c.done, "the last chunk ends the body");
        }
    }
}
