//! Test harness: starts real `hub` processes on free loopback ports, talks to them over HTTP and
//! SSE, and stops them by PID.
//!
//! Every wait is on a condition with a deadline; nothing here sleeps in place of a check.
//! The `hub` binary must be built first (`cargo build --workspace --bins`, as scripts/test.sh
//! does); it is found next to the test executable's `deps/` folder.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

pub mod browser;
pub mod cdp;
pub mod client;
pub mod gzip;
pub mod netns;
pub mod nginx;
pub mod receiver;
pub mod redis_server;

use bytes::{Buf, BytesMut};
use futures_util::StreamExt;
use serde_json::Value;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use nginx::Nginx;
pub use redis_server::{free_port, Cluster, Redis, SentinelSet, TlsCerts};
pub use reqwest;

/// Installs the process's rustls provider (ring, as the hub's): reqwest is built with rustls
/// but without a provider of its own, and refuses to build a client before one is set.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Default deadline for conditions that should hold almost at once.
pub const WAIT: Duration = Duration::from_secs(10);

/// A unique channel prefix per test, so tests never read each other's messages.
pub fn prefix(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "public:{test}.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Path of a binary built by this workspace (`hub`, later `loadgen`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile> folder");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Polls `cond` until it is true or `timeout` passes; panics with `what` on timeout.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running hub process. Dropping it kills the process (by its PID) if it still runs.
pub struct Hub {
    child: Child,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub node: String,
    pub http: reqwest::Client,
    stderr: PathBuf,
}

impl Hub {
    /// Starts `hub` with ports chosen by the kernel and the given extra environment.
    pub async fn start(env: &[(&str, &str)]) -> Hub {
        let dir = std::env::temp_dir().join(format!("hub-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        static N: AtomicU64 = AtomicU64::new(0);
        let stderr = dir.join(format!("hub-{}.log", N.fetch_add(1, Ordering::Relaxed)));
        let mut cmd = Command::new(binary("hub"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HUB_BIND", "127.0.0.1:0")
            .env("HUB_ADMIN_BIND", "127.0.0.1:0")
            .env("HUB_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("log file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn hub");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "hub did not start; log:\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
        };
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")).map(str::to_owned))
                .unwrap_or_else(|| panic!("no {k}= in {line:?}"))
        };
        Hub {
            public: field("public").parse().expect("public addr"),
            admin: field("admin").parse().expect("admin addr"),
            node: field("node"),
            child,
            http: {
                install_crypto();
                reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .build()
                    .expect("client")
            },
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended (it should not have).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The process's resident memory (VmRSS), in KiB.
    pub fn rss_kb(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    /// Publishes each of `data` as a durable message, one after another; returns the ids.
    pub async fn publish_many(&self, channel: &str, data: &[String]) -> Vec<String> {
        let mut ids = Vec::with_capacity(data.len());
        for d in data {
            ids.push(
                self.publish(channel, None, Value::String(d.clone()), true)
                    .await,
            );
        }
        ids
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.public, path)
    }

    /// `GET /v1/presence?channel=<ch>` on the admin port: `{"channel","users","anonymous"}`.
    pub async fn presence(&self, ch: &str) -> Value {
        self.http
            .get(self.admin_url(&format!("/v1/presence?channel={ch}")))
            .send()
            .await
            .expect("admin port answers")
            .json()
            .await
            .expect("JSON")
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// The hub's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// `POST /v1/publish`; returns the id. Panics unless the answer is 202.
    pub async fn publish(
        &self,
        channel: &str,
        event: Option<&str>,
        data: Value,
        durable: bool,
    ) -> String {
        let mut body = serde_json::json!({ "channel": channel, "data": data, "durable": durable });
        if let Some(e) = event {
            body["event"] = e.into();
        }
        let res = self
            .http
            .post(self.admin_url("/v1/publish"))
            .json(&body)
            .send()
            .await
            .expect("publish");
        let status = res.status();
        let text = res.text().await.unwrap_or_default();
        assert_eq!(status.as_u16(), 202, "publish answered {status}: {text}");
        let v: Value = serde_json::from_str(&text).expect("publish answer is JSON");
        v["id"].as_str().expect("id").to_string()
    }

    /// `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// One sample's value, e.g. `hub_connections{transport="sse"}`; 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics().await, sample)
    }

    /// Waits until a sample equals `want`.
    pub async fn wait_metric(&self, sample: &str, want: f64, timeout: Duration) {
        wait_until(&format!("{sample} == {want}"), timeout, || async {
            self.metric(sample).await == want
        })
        .await;
    }

    pub async fn stats(&self) -> Value {
        self.http
            .get(self.admin_url("/v1/stats"))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("json")
    }

    /// `GET /v1/namespaces` as JSON.
    pub async fn namespaces(&self) -> Value {
        self.http
            .get(self.admin_url("/v1/namespaces"))
            .send()
            .await
            .expect("namespaces")
            .json()
            .await
            .expect("json")
    }

    /// Opens `GET /v1/sse?<query>` with extra headers.
    pub async fn sse(&self, query: &str, headers: &[(&str, &str)]) -> SseStream {
        let mut req = self.http.get(self.url(&format!("/v1/sse?{query}")));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        SseStream::new(req.send().await.expect("sse request"))
    }

    /// Opens a stream that must succeed and returns it after its `hub.connected` frame.
    pub async fn connect(&self, query: &str, headers: &[(&str, &str)]) -> (SseStream, SseEvent) {
        let mut s = self.sse(query, headers).await;
        if s.status != 200 {
            let status = s.status;
            panic!("stream refused with {status}: {}", s.error_body().await);
        }
        let first = s.next_event(WAIT).await.expect("hub.connected frame");
        assert_eq!(first.event, "hub.connected", "first frame: {first:?}");
        (s, first)
    }

    /// Whether `/readyz` on the public port answers 200.
    pub async fn is_ready(&self) -> bool {
        self.http
            .get(self.url("/readyz"))
            .send()
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    }

    /// Waits until `/readyz` answers 200 (in Redis mode: the subscription is up).
    pub async fn wait_ready(&self, timeout: Duration) {
        wait_until("readyz 200", timeout, || self.is_ready()).await;
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        signal(self.child.id(), "TERM");
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            if Instant::now() > deadline {
                panic!("hub did not exit within {timeout:?}; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends a signal (`TERM`, `INT`, `STOP`, ...) to a process we started, by its PID.
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid} failed");
}

/// Reads one sample from Prometheus text (exact series, labels in the exporter's order).
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// Sends `GET <path_and_query>` on a new raw socket (with a receive buffer of `recv_buf` bytes,
/// if given) and returns the socket unread: for clients that stop reading, or reset.
pub async fn raw_get(
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, &str)],
    recv_buf: Option<u32>,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    if let Some(bytes) = recv_buf {
        sock.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
    }
    let mut c = sock.connect(addr).await.expect("connect");
    let mut req = format!("GET {path_and_query} HTTP/1.1\r\nHost: hub\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    c.write_all(req.as_bytes()).await.expect("send request");
    c
}

/// One SSE event as EventSource would see it, or a comment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    /// `message` when no `event:` line.
    pub event: String,
    /// `data:` lines joined with LF.
    pub data: String,
    pub retry: Option<u64>,
    /// The block was only a comment (a heartbeat).
    pub comment: bool,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("data is not JSON ({e}): {:?}", self.data))
    }
}

/// A response read as an SSE stream.
pub struct SseStream {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    body: Option<futures_util::stream::BoxStream<'static, Result<bytes::Bytes, String>>>,
    res: Option<reqwest::Response>,
    buf: BytesMut,
}

impl SseStream {
    /// Opens `GET url` as an SSE stream (through a proxy, say) with extra headers.
    pub async fn open(http: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> SseStream {
        let mut req = http.get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        SseStream::new(req.send().await.expect("sse request"))
    }

    /// Opens `GET <path_and_query>` on a raw socket whose receive buffer is `recv_buf` bytes,
    /// so that a reader that stops reading really stops the hub's writes (no client library
    /// buffers for it). Reads the response head; the body is read on demand.
    pub async fn raw(
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
        recv_buf: u32,
    ) -> SseStream {
        use tokio::io::AsyncReadExt;
        let mut c = raw_get(addr, path_and_query, headers, Some(recv_buf)).await;
        let mut buf = BytesMut::with_capacity(8192);
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = tokio::time::timeout(WAIT, c.read_buf(&mut buf))
                .await
                .expect("response head in time")
                .expect("read head");
            assert!(n > 0, "connection closed before the response head");
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        buf.advance(head_end);
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status line");
        let mut map = reqwest::header::HeaderMap::new();
        for l in lines.filter(|l| !l.is_empty()) {
            if let Some((k, v)) = l.split_once(':') {
                if let (Ok(k), Ok(v)) = (
                    reqwest::header::HeaderName::from_bytes(k.trim().as_bytes()),
                    reqwest::header::HeaderValue::from_str(v.trim()),
                ) {
                    map.insert(k, v);
                }
            }
        }
        let chunked = map
            .get("transfer-encoding")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        // The body, de-chunked: (socket, raw bytes not yet decoded).
        let body = futures_util::stream::unfold((c, buf), move |(mut c, mut raw)| async move {
            loop {
                if !chunked {
                    if !raw.is_empty() {
                        let out = raw.split().freeze();
                        return Some((Ok(out), (c, raw)));
                    }
                } else if let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
                    let size_text = String::from_utf8_lossy(&raw[..eol]).to_string();
                    let size =
                        usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
                    if size == 0 {
                        return None;
                    }
                    if raw.len() >= eol + 2 + size + 2 {
                        raw.advance(eol + 2);
                        let out = raw.split_to(size).freeze();
                        raw.advance(2);
                        return Some((Ok(out), (c, raw)));
                    }
                }
                match c.read_buf(&mut raw).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        });
        SseStream {
            status,
            headers: map,
            body: Some(body.boxed()),
            res: None,
            buf: BytesMut::new(),
        }
    }

    fn new(res: reqwest::Response) -> SseStream {
        SseStream {
            status: res.status().as_u16(),
            headers: res.headers().clone(),
            body: None,
            res: Some(res),
            buf: BytesMut::new(),
        }
    }

    /// A stream over any body (an HTTP/2 stream, say): its status and its bytes.
    pub fn from_body(
        status: u16,
        body: futures_util::stream::BoxStream<'static, Result<bytes::Bytes, String>>,
    ) -> SseStream {
        SseStream {
            status,
            headers: reqwest::header::HeaderMap::new(),
            body: Some(body),
            res: None,
            buf: BytesMut::new(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body of a refused request.
    pub async fn error_body(&mut self) -> String {
        match self.res.take() {
            Some(r) => r.text().await.unwrap_or_default(),
            None => String::new(),
        }
    }

    /// The next block (event or comment); `None` at end of stream. Panics on timeout.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<SseEvent> {
        if self.body.is_none() {
            let res = self.res.take()?;
            self.body = Some(
                res.bytes_stream()
                    .map(|r| r.map_err(|e| e.to_string()))
                    .boxed(),
            );
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(ev) = self.take_block() {
                return Some(ev);
            }
            let body = self.body.as_mut()?;
            match tokio::time::timeout_at(deadline, body.next()).await {
                Err(_) => panic!(
                    "no SSE event within {timeout:?}; buffered: {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
                Ok(None) | Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(chunk))) => self.buf.extend_from_slice(&chunk),
            }
        }
    }

    /// Applies this stream's `hub.presence` (the list), `hub.join` and `hub.leave` to `list`
    /// until it is `want`; every join and leave must change it, and any other event fails.
    pub async fn follow_presence(
        &mut self,
        list: &mut std::collections::BTreeSet<String>,
        want: &[&str],
    ) {
        while list.iter().map(String::as_str).collect::<Vec<_>>() != want {
            let e = self.next_message(WAIT).await.expect("stream open");
            let v = e.json();
            let sub = || v["sub"].as_str().unwrap_or_default().to_string();
            match e.event.as_str() {
                "hub.presence" => {
                    *list = v["users"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|u| u.as_str().map(String::from))
                        .collect()
                }
                "hub.join" => assert!(list.insert(sub()), "join of one listed: {v}"),
                "hub.leave" => assert!(list.remove(&sub()), "leave of one not listed: {v}"),
                other => panic!("{other}: {v}"),
            }
        }
    }

    /// The next event that is not a comment.
    pub async fn next_message(&mut self, timeout: Duration) -> Option<SseEvent> {
        // One deadline for all: heartbeats must not keep a test waiting forever.
        let deadline = Instant::now() + timeout;
        loop {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                panic!("no SSE message (only comments) within {timeout:?}");
            };
            let ev = self.next_event(left).await?;
            if !ev.comment {
                return Some(ev);
            }
        }
    }

    /// Parses one complete block (ended by a blank line) per the SSE spec's line rules.
    fn take_block(&mut self) -> Option<SseEvent> {
        let text = std::str::from_utf8(&self.buf).ok()?;
        let normalized = text.replace("\r\n", "\n").replace('\r', "\n");
        let end = normalized.find("\n\n")?;
        // Map the end back to the raw buffer by counting consumed characters.
        let block = normalized[..end].to_string();
        let consumed_norm = end + 2;
        let mut raw = 0;
        let mut seen = 0;
        let bytes = self.buf.as_ref();
        while seen < consumed_norm {
            if bytes[raw] == b'\r' && bytes.get(raw + 1) == Some(&b'\n') {
                raw += 2;
            } else {
                raw += 1;
            }
            seen += 1;
        }
        self.buf.advance(raw);
        let mut ev = SseEvent {
            event: "message".into(),
            ..Default::default()
        };
        let mut data: Vec<&str> = Vec::new();
        let mut any_field = false;
        for line in block.split('\n') {
            if line.starts_with(':') {
                continue;
            }
            any_field = true;
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "id" => ev.id = Some(value.to_string()),
                "event" => ev.event = value.to_string(),
                "data" => data.push(value),
                "retry" => ev.retry = value.parse().ok(),
                _ => {}
            }
        }
        ev.data = data.join("\n");
        ev.comment = !any_field;
        Some(ev)
    }
}
