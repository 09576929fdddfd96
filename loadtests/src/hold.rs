//! `loadgen hold`: holds N SSE (or WebSocket) streams from one source address and counts what
//! arrives.
//!
//! Each stream is a raw TCP connection with its own small chunked-encoding decoder and SSE line
//! parser, or WebSocket frame parser (no HTTP client per stream), so one process holds thousands
//! cheaply. Message data is `<seq> <unix micros>`; latency is now minus the send time. With
//! `--reconnect` an ended stream comes back with `Last-Event-ID`, as `EventSource` does (a hub
//! WebSocket subscribes again with `"since"`: the last message id it read). Prints
//! `READY <opened> <failed>` once every stream was tried, then the JSON report as its last line.

use crate::report::{self, HoldReport};
use anyhow::Context as _;
use hdrhistogram::Histogram;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};

#[derive(clap::Args, Debug, Clone)]
pub struct HoldArgs {
    /// Server address, e.g. 127.0.0.1:8080.
    #[arg(long)]
    pub target: SocketAddr,
    /// Other nodes a reconnecting stream turns to when its node refuses connections (it is
    /// gone): stream i tries fallback (i + attempt) mod n, as a load balancer would send it.
    #[arg(long = "fallback")]
    pub fallbacks: Vec<SocketAddr>,
    #[command(flatten)]
    pub stream: StreamOpts,
    #[arg(long)]
    pub streams: u64,
    /// Global index of this process's first stream (so channel numbers spread across processes).
    #[arg(long, default_value_t = 0)]
    pub first_index: u64,
    /// Channels the streams are spread over (`{ch}` in the path runs over 0..channels). The
    /// publisher takes the same channels in turn, so a stream on channel c expects the sequence
    /// numbers c, c + channels, c + 2 * channels, ...
    #[arg(long, default_value_t = 1)]
    pub channels: u64,
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

/// How each stream is opened and kept: the same for `hold` and `run` (which hands them on).
#[derive(clap::Args, Debug, Clone)]
pub struct StreamOpts {
    /// Request path and query, e.g. /v1/sse?channel=public:bench; `{ch}` is replaced by the
    /// stream's channel number (its global index modulo `--channels`).
    #[arg(long)]
    pub path: String,
    /// WebSocket instead of SSE: the path is upgraded, then `--subscribe` is sent (if given).
    #[arg(long)]
    pub ws: bool,
    /// Text frame sent after a WebSocket upgrade, `{ch}` replaced as in the path, e.g.
    /// {"op":"subscribe","channel":"public:c{ch}"}
    #[arg(long)]
    pub subscribe: Option<String>,
    /// Reconnect a stream that ended: SSE with `Last-Event-ID` set to the last `id:` seen, a
    /// WebSocket by sending `--subscribe` again, with `"since":"<id>"` added when its frames
    /// carried ids (the hub's; a Pusher server's carry none and have no resume).
    #[arg(long)]
    pub reconnect: bool,
    /// Send `Accept: text/event-stream`, as an EventSource does. Nchan needs it to serve an
    /// EventSource subscriber; the hub is asked without it by default, so that a refusal comes
    /// as its status (503, 429) and is counted by reason (an EventSource gets a 200 with
    /// `hub.reconnect` instead, which would read as a stream that opened and ended).
    #[arg(long)]
    pub accept_event_stream: bool,
    /// Reconnect delay: a stream waits a random time below this before its first attempt, and
    /// this long between failed attempts.
    #[arg(long, default_value_t = 1000)]
    pub reconnect_ms: u64,
    /// Stalled streams (`--stall`) read on this many milliseconds after the hold started
    /// (sleepers, all at once), and are then expected to receive every message like the
    /// others; 0: they never read again.
    #[arg(long, default_value_t = 0)]
    pub wake_ms: u64,
    /// Receive buffer of stalled streams, in bytes (0: the system's), so that a reader that
    /// stops really stops the server's writes instead of filling a large socket buffer.
    #[arg(long, default_value_t = 0)]
    pub stall_rcvbuf: u32,
    /// Churn: every stream closes after a random time below this many milliseconds and opens
    /// again (fresh), until the hold ends; refused attempts are counted by reason (0: off).
    #[arg(long, default_value_t = 0)]
    pub churn_ms: u64,
    /// Returners: a stream leaves after this many messages (0: never), stays away `--away-ms`,
    /// and comes back with `Last-Event-ID`; the time it takes to catch up is measured.
    #[arg(long, default_value_t = 0)]
    pub leave_after: u64,
    #[arg(long, default_value_t = 0)]
    pub away_ms: u64,
    /// A first open refused with a status (503, 429: a client that would come back, as an
    /// EventSource does) is tried again up to this many times, after a random time below
    /// `--reconnect-ms` (0: a refused first open counts as failed).
    #[arg(long, default_value_t = 0)]
    pub open_retries: u64,
    /// Every stream sends a session cookie of its own (`Cookie: session=<address>-<index>`),
    /// the same on every reconnect, as a browser does.
    #[arg(long)]
    pub session_cookie: bool,
    /// Ask for compression: SSE `Accept-Encoding: gzip` (the body inflated as it comes),
    /// WebSocket `permessage-deflate` (compressed frames inflated one by one).
    #[arg(long)]
    pub compress: bool,
    /// Streams leave from this many source addresses in turn instead of one (stream i of a
    /// holder bound to 127.0.0.P: 127.P.(i mod K) / 256.(i mod K) mod 256), so that per-address
    /// limits see many clients, as they would in the field (0: the holder's one address).
    #[arg(long, default_value_t = 0)]
    pub spread_sources: u64,
}

impl StreamOpts {
    /// The same options as command-line arguments, for a `hold` child process.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--path".into(),
            self.path.clone(),
            "--reconnect-ms".into(),
            self.reconnect_ms.to_string(),
        ];
        if self.ws {
            a.push("--ws".into());
        }
        if let Some(sub) = &self.subscribe {
            a.extend(["--subscribe".into(), sub.clone()]);
        }
        if self.reconnect {
            a.push("--reconnect".into());
        }
        if self.accept_event_stream {
            a.push("--accept-event-stream".into());
        }
        if self.session_cookie {
            a.push("--session-cookie".into());
        }
        if self.compress {
            a.push("--compress".into());
        }
        for (flag, v) in [
            ("--wake-ms", self.wake_ms),
            ("--stall-rcvbuf", u64::from(self.stall_rcvbuf)),
            ("--churn-ms", self.churn_ms),
            ("--leave-after", self.leave_after),
            ("--away-ms", self.away_ms),
            ("--open-retries", self.open_retries),
            ("--spread-sources", self.spread_sources),
        ] {
            if v > 0 {
                a.extend([flag.into(), v.to_string()]);
            }
        }
        a
    }
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
    gaps: AtomicU64,
    stalled: AtomicU64,
    reconnects: AtomicU64,
    /// Reconnect attempts that failed (refused, not 200, broken before the head).
    retries: AtomicU64,
    /// Per stream, microseconds from its drop to its return.
    resume_hist: Mutex<Histogram<u64>>,
    /// Per returning stream, microseconds from its return to having every message.
    catchup_hist: Mutex<Histogram<u64>>,
    /// Churn: streams closed on purpose and opened again.
    churn_cycles: AtomicU64,
    wire_bytes: AtomicU64,
    /// Reads that returned bytes, once the stream was open.
    reads: AtomicU64,
    /// Streams dropped and not (yet) back.
    down: AtomicU64,
    /// Failed connection attempts by reason (refused, status 503, ...).
    failures: Mutex<std::collections::BTreeMap<String, u64>>,
    first_drop_us: AtomicU64,
    last_reopen_us: AtomicU64,
    counts: Mutex<Vec<u64>>,
    last_connect: Mutex<Option<Instant>>,
    expect: Option<u64>,
    /// When the hold started (sleepers wake relative to it).
    epoch: Instant,
}

impl Shared {
    fn new(expect: Option<u64>) -> Shared {
        Shared {
            hist: Mutex::new(report::histogram()),
            opened: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            done: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            stalled: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            resume_hist: Mutex::new(report::histogram()),
            catchup_hist: Mutex::new(report::histogram()),
            churn_cycles: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            down: AtomicU64::new(0),
            failures: Mutex::default(),
            first_drop_us: AtomicU64::new(u64::MAX),
            last_reopen_us: AtomicU64::new(0),
            counts: Mutex::new(Vec::new()),
            last_connect: Mutex::new(None),
            expect,
            epoch: Instant::now(),
        }
    }

    fn count_failure(&self, why: String) {
        if let Ok(mut f) = self.failures.lock() {
            *f.entry(why).or_default() += 1;
        }
    }
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

/// WebSocket frames from a server (unmasked), fed byte slices.
#[derive(Default)]
struct WsFrames {
    buf: Vec<u8>,
}

enum WsFrame {
    Text(Vec<u8>),
    Ping(Vec<u8>),
    Close,
}

impl WsFrames {
    fn feed(&mut self, input: &[u8], out: &mut Vec<WsFrame>) {
        self.buf.extend_from_slice(input);
        loop {
            let b = &self.buf;
            if b.len() < 2 {
                return;
            }
            let opcode = b[0] & 0x0f;
            let compressed = b[0] & 0x40 != 0;
            let masked = b[1] & 0x80 != 0;
            let (len, mut at) = match b[1] & 0x7f {
                126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
                127 if b.len() >= 10 => {
                    let mut n = [0u8; 8];
                    n.copy_from_slice(&b[2..10]);
                    (u64::from_be_bytes(n) as usize, 10)
                }
                126 | 127 => return,
                n => (n as usize, 2),
            };
            let mask = if masked {
                if b.len() < at + 4 {
                    return;
                }
                at += 4;
                Some([b[at - 4], b[at - 3], b[at - 2], b[at - 1]])
            } else {
                None
            };
            if b.len() < at + len {
                return;
            }
            let mut payload = b[at..at + len].to_vec();
            if let Some(m) = mask {
                payload
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, x)| *x ^= m[i % 4]);
            }
            self.buf.drain(..at + len);
            let payload = if compressed {
                inflate_message(&payload)
            } else {
                payload
            };
            match opcode {
                0..=2 => out.push(WsFrame::Text(payload)),
                8 => out.push(WsFrame::Close),
                9 => out.push(WsFrame::Ping(payload)),
                _ => {}
            }
        }
    }
}

/// A `permessage-deflate` message inflated (no context kept: the hub compresses each on its
/// own); what cannot be inflated is returned empty (and counted as nothing delivered).
fn inflate_message(payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut d = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(payload.len() * 8 + 256);
    let mut rest: &[u8] = &input;
    while !rest.is_empty() {
        out.reserve(out.len().max(1024));
        let before = d.total_in();
        if d.decompress_vec(rest, &mut out, flate2::FlushDecompress::Sync)
            .is_err()
        {
            return Vec::new();
        }
        let used = (d.total_in() - before) as usize;
        if used == 0 && out.len() < out.capacity() {
            break;
        }
        rest = &rest[used..];
    }
    out
}

/// A gzip body inflated as it comes (the 10-byte header skipped first).
struct Gunzip {
    d: flate2::Decompress,
    header: usize,
}

impl Gunzip {
    fn new() -> Gunzip {
        Gunzip {
            d: flate2::Decompress::new(false),
            header: 10,
        }
    }

    fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        let skip = self.header.min(input.len());
        self.header -= skip;
        input = &input[skip..];
        while !input.is_empty() {
            out.reserve(input.len() * 8 + 1024);
            let before = self.d.total_in();
            if self
                .d
                .decompress_vec(input, out, flate2::FlushDecompress::Sync)
                .is_err()
            {
                return;
            }
            let used = (self.d.total_in() - before) as usize;
            if used == 0 {
                return; // the trailer after the final block
            }
            input = &input[used..];
        }
    }
}

/// A client frame (masked, as clients must).
fn ws_client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let n = payload.len();
    if n < 126 {
        f.push(0x80 | n as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    }
    let mask = [0x1b, 0x2c, 0x3d, 0x4e];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// One stream's parsing and counting state; it outlives reconnects.
struct Stream {
    line: Vec<u8>,
    count: u64,
    last_seq: Option<u64>,
    /// The first sequence number this stream's channel gets, and the step between its messages.
    first_seq: u64,
    stride: u64,
    last_id: Option<String>,
    /// When the current drop began (while reconnecting).
    dropped_at: Option<Instant>,
    /// The stream has had the messages it expects.
    reached: bool,
    /// Returners: it left once already; when it came back.
    left: bool,
    returned_at: Option<Instant>,
    /// The session cookie it sends (`--session-cookie`).
    cookie: Option<String>,
    /// The address it connects from (see `--spread-sources`).
    source: IpAddr,
    /// The node it connects to (`--target`, or a fallback once that one is gone), and how
    /// many times it moved.
    target: SocketAddr,
    moves: u64,
}

impl Stream {
    /// One message's data, `<seq> <sent micros> [padding]`.
    fn message(&mut self, data: &[u8], shared: &Shared, hist: &mut Vec<u64>) {
        let text = String::from_utf8_lossy(data);
        let mut parts = text.split(' ');
        let (Some(Ok(seq)), Some(Ok(sent))) = (
            parts.next().map(str::parse::<u64>),
            parts.next().map(str::parse::<u64>),
        ) else {
            return;
        };
        if self.last_seq.is_some_and(|l| seq <= l) {
            shared.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let expected = self.last_seq.map_or(self.first_seq, |l| l + self.stride);
        if seq > expected {
            shared
                .gaps
                .fetch_add((seq - expected) / self.stride.max(1), Ordering::Relaxed);
        }
        self.last_seq = Some(seq);
        self.count += 1;
        shared.deliveries.fetch_add(1, Ordering::Relaxed);
        hist.push(now_us().saturating_sub(sent).max(1));
    }

    /// Processes decoded SSE body bytes: every `data: <seq> <sent micros>` line is a delivery.
    fn feed_sse(&mut self, bytes: &[u8], shared: &Shared, hist: &mut Vec<u64>) {
        for &b in bytes {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            let line = std::mem::take(&mut self.line);
            if let Some(data) = line.strip_prefix(b"data: ") {
                self.message(data, shared, hist);
            } else if let Some(id) = line.strip_prefix(b"id: ") {
                self.last_id = Some(String::from_utf8_lossy(id).into_owned());
            }
            self.line = line;
            self.line.clear();
        }
    }

    /// A WebSocket text frame: the hub's JSON `{"type":"message",...,"data":"<seq> <us>"}`,
    /// a Pusher server's `{"event":"msg","channel":...,"data":"<seq> <us>"}`, or the bare
    /// data (Nchan). Frames whose data is not `<seq> <us>` (replies, pings) count for nothing.
    fn feed_ws(&mut self, payload: &[u8], shared: &Shared, hist: &mut Vec<u64>) {
        if payload.first() == Some(&b'{') {
            if let Some((at, data)) = string_field(payload, b"\"data\":\"") {
                // The hub's frames carry the message's id before its data.
                if let Some((_, id)) = string_field(&payload[..at], b"\"id\":\"") {
                    self.last_id = Some(String::from_utf8_lossy(id).into_owned());
                }
                self.message(data, shared, hist);
            }
        } else {
            self.message(payload, shared, hist);
        }
    }
}

/// Where `key` (e.g. `"data":"`) is in `json` and the string value after it, up to its closing
/// quote or the end (the values read here, ids and `<seq> <us>`, have no escapes).
fn string_field<'a>(json: &'a [u8], key: &[u8]) -> Option<(usize, &'a [u8])> {
    let at = json.windows(key.len()).position(|w| w == key)?;
    let rest = &json[at + key.len()..];
    let end = rest.iter().position(|&c| c == b'"').unwrap_or(rest.len());
    Some((at, &rest[..end]))
}

/// The subscribe frame for channel `ch`: the template, resuming after `last_id` if there is
/// one (`"since"`, the hub's WebSocket resume).
fn subscribe_frame(template: &str, ch: u64, last_id: Option<&str>) -> String {
    let sub = fill(template, ch);
    match (last_id, sub.strip_suffix('}')) {
        (Some(id), Some(open)) => format!("{open},\"since\":\"{id}\"}}"),
        _ => sub,
    }
}

/// Whether a WebSocket text frame confirms the subscription: the hub's `subscribed`, or a
/// Pusher server's `pusher_internal:subscription_succeeded`.
fn subscribed(frame: &[u8]) -> bool {
    frame.starts_with(br#"{"type":"subscribed""#)
        || frame.starts_with(br#"{"event":"pusher_internal:subscription_succeeded""#)
}

fn fill(template: &str, ch: u64) -> String {
    template.replace("{ch}", &ch.to_string())
}

/// The address stream `index` connects from (see `--spread-sources`).
fn source_of(args: &HoldArgs, index: u64) -> IpAddr {
    match (args.source, args.stream.spread_sources) {
        (IpAddr::V4(v4), k) if k > 0 => {
            let i = index % k.min(65_536);
            IpAddr::V4(std::net::Ipv4Addr::new(
                127,
                v4.octets()[3],
                (i / 256) as u8,
                (i % 256) as u8,
            ))
        }
        (ip, _) => ip,
    }
}

async fn connect(
    args: &HoldArgs,
    target: SocketAddr,
    source: IpAddr,
    ch: u64,
    last_id: Option<&str>,
    stall: bool,
    cookie: Option<&str>,
) -> anyhow::Result<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    if stall && args.stream.stall_rcvbuf > 0 {
        sock.set_recv_buffer_size(args.stream.stall_rcvbuf)?;
    }
    sock.bind(SocketAddr::new(source, 0))?;
    let mut s = sock.connect(target).await?;
    let path = fill(&args.stream.path, ch);
    let req = if args.stream.ws {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{}\r\n",
            target,
            if args.stream.compress {
                "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
            } else {
                ""
            }
        )
    } else {
        let resume = last_id
            .map(|id| format!("Last-Event-ID: {id}\r\n"))
            .unwrap_or_default();
        let accept = if args.stream.accept_event_stream {
            "Accept: text/event-stream\r\n"
        } else {
            ""
        };
        let cookie = cookie
            .map(|c| format!("Cookie: {c}\r\n"))
            .unwrap_or_default();
        let gzip = if args.stream.compress {
            "Accept-Encoding: gzip\r\n"
        } else {
            ""
        };
        format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\n{accept}{gzip}{resume}{cookie}\r\n",
            target
        )
    };
    s.write_all(req.as_bytes()).await?;
    Ok(s)
}

/// Counts a stream as open (its first time) or back (after a drop at `dropped_at`; a churning
/// stream that opens again is counted by its cycles instead).
fn opened(
    shared: &Shared,
    permit: &mut Option<tokio::sync::OwnedSemaphorePermit>,
    dropped_at: Option<Instant>,
) {
    if let Ok(mut t) = shared.last_connect.lock() {
        *t = Some(Instant::now());
    }
    if permit.take().is_some() {
        shared.opened.fetch_add(1, Ordering::Relaxed);
    } else if dropped_at.is_some() {
        shared.reconnects.fetch_add(1, Ordering::Relaxed);
        shared.down.fetch_sub(1, Ordering::Relaxed);
        shared.last_reopen_us.fetch_max(now_us(), Ordering::Relaxed);
        if let (Some(t), Ok(mut h)) = (dropped_at, shared.resume_hist.lock()) {
            let _ = h.record((t.elapsed().as_micros() as u64).clamp(1, report::MAX_LATENCY_US));
        }
    }
}

/// How one connection of a stream ended.
enum End {
    /// The hold is over.
    Stop,
    /// The connection failed before the stream opened, and why.
    Failed(String),
    /// The stream was open and the server ended it (or the socket broke).
    Dropped,
    /// Churn: the stream closed itself after its time.
    Churned,
    /// Returner: the stream left after its messages.
    Left,
}

async fn connection(
    args: &HoldArgs,
    shared: &Shared,
    st: &mut Stream,
    ch: u64,
    permit: &mut Option<tokio::sync::OwnedSemaphorePermit>,
    stop: &mut watch::Receiver<bool>,
    stall: bool,
) -> End {
    let conn = connect(
        args,
        st.target,
        st.source,
        ch,
        st.last_id.as_deref(),
        stall,
        st.cookie.as_deref(),
    );
    let mut s = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(30), conn) => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let kind = e
                    .downcast_ref::<std::io::Error>()
                    .map(|e| format!("connect: {:?}", e.kind()))
                    .unwrap_or_else(|| "connect".into());
                return End::Failed(kind);
            }
            Err(_) => return End::Failed("connect: timed out".into()),
        },
        _ = stop.changed() => return End::Stop,
    };
    let mut buf = vec![0u8; 16 * 1024];
    let mut head = Vec::new();
    let mut body = Vec::new();
    let mut chunked: Option<Chunked> = None;
    let mut gunzip: Option<Gunzip> = None;
    let mut inflated = Vec::new();
    let mut ws = WsFrames::default();
    let mut frames = Vec::new();
    let mut lat = Vec::new();
    let mut open = false;
    // Churn: when this connection closes itself (set once it opens).
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
    let churn = tokio::time::sleep_until(far);
    tokio::pin!(churn);
    loop {
        let n = tokio::select! {
            () = &mut churn => return End::Churned,
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    return if open {
                        End::Dropped
                    } else {
                        End::Failed("closed before the response head".into())
                    }
                }
                Ok(n) => n,
            },
            _ = stop.changed() => return End::Stop,
        };
        let mut data = &buf[..n];
        if open {
            shared.wire_bytes.fetch_add(n as u64, Ordering::Relaxed);
            shared.reads.fetch_add(1, Ordering::Relaxed);
        }
        if !open {
            head.extend_from_slice(data);
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
            let want = if args.stream.ws {
                "http/1.1 101"
            } else {
                "http/1.1 200"
            };
            if !text.starts_with(want) {
                let status = text.split(' ').nth(1).unwrap_or("?").to_string();
                return End::Failed(format!("status {status}"));
            }
            let mut c = Chunked::default();
            if !text.contains("transfer-encoding: chunked") {
                c.remaining = usize::MAX;
            }
            if text.contains("content-encoding: gzip") {
                gunzip = Some(Gunzip::new());
            }
            let rest = head.split_off(end + 4);
            shared
                .wire_bytes
                .fetch_add(rest.len() as u64, Ordering::Relaxed);
            chunked = Some(c);
            open = true;
            // A WebSocket that subscribes is open once the server confirms the subscription.
            if !(args.stream.ws && args.stream.subscribe.is_some()) {
                opened(shared, permit, st.dropped_at.take());
            }
            if st.left && st.returned_at.is_none() {
                st.returned_at = Some(Instant::now());
            }
            if args.stream.churn_ms > 0 {
                let hold = jitter(ch ^ now_us(), args.stream.churn_ms);
                churn
                    .as_mut()
                    .reset(tokio::time::Instant::now() + Duration::from_millis(hold));
            }
            if args.stream.ws {
                if let Some(sub) = &args.stream.subscribe {
                    let f = ws_client_frame(
                        1,
                        subscribe_frame(sub, ch, st.last_id.as_deref()).as_bytes(),
                    );
                    if s.write_all(&f).await.is_err() {
                        return End::Dropped;
                    }
                }
                ws.feed(&rest, &mut frames);
            } else if let Some(c) = chunked.as_mut() {
                c.feed(&rest, &mut body);
            }
            data = &[];
            if stall && args.stream.wake_ms == 0 {
                // A reader that stopped: keep the socket open, never read again.
                shared.stalled.fetch_add(1, Ordering::Relaxed);
                let _ = stop.changed().await;
                return End::Stop;
            }
            if stall {
                // A sleeper: reads nothing for a while, then reads on.
                let wake = shared.epoch + Duration::from_millis(args.stream.wake_ms);
                tokio::select! {
                    _ = tokio::time::sleep_until(wake.into()) => {}
                    _ = stop.changed() => return End::Stop,
                }
            }
        }
        let mut over = false;
        if args.stream.ws {
            ws.feed(data, &mut frames);
            for f in frames.drain(..) {
                match f {
                    WsFrame::Text(p) => {
                        if (permit.is_some() || st.dropped_at.is_some()) && subscribed(&p) {
                            opened(shared, permit, st.dropped_at.take());
                        }
                        // A Pusher server (Sockudo) pings in JSON after a quiet spell.
                        if p.starts_with(br#"{"event":"pusher:ping""#) {
                            let pong = br#"{"event":"pusher:pong","data":{}}"#;
                            if s.write_all(&ws_client_frame(1, pong)).await.is_err() {
                                over = true;
                            }
                        }
                        st.feed_ws(&p, shared, &mut lat)
                    }
                    WsFrame::Ping(p) => {
                        if s.write_all(&ws_client_frame(10, &p)).await.is_err() {
                            over = true;
                        }
                    }
                    WsFrame::Close => over = true,
                }
            }
        } else {
            if let Some(c) = chunked.as_mut() {
                c.feed(data, &mut body);
            }
            if let Some(g) = gunzip.as_mut() {
                g.feed(&body, &mut inflated);
                std::mem::swap(&mut body, &mut inflated);
                inflated.clear();
            }
            st.feed_sse(&body, shared, &mut lat);
            over = chunked.as_ref().is_some_and(|c| c.done);
            body.clear();
        }
        if !lat.is_empty() {
            if let Ok(mut h) = shared.hist.lock() {
                for v in lat.drain(..) {
                    let _ = h.record(v.min(report::MAX_LATENCY_US));
                }
            }
        }
        if !st.reached && shared.expect.is_some_and(|e| st.count >= e) {
            st.reached = true;
            shared.done.fetch_add(1, Ordering::Relaxed);
            if let (Some(t), Ok(mut h)) = (st.returned_at, shared.catchup_hist.lock()) {
                let _ = h.record((t.elapsed().as_micros() as u64).clamp(1, report::MAX_LATENCY_US));
            }
        }
        if !st.left && args.stream.leave_after > 0 && st.count >= args.stream.leave_after {
            st.left = true;
            return End::Left;
        }
        if over {
            // The server ended the response (a keep-alive connection stays open after it).
            return End::Dropped;
        }
    }
}

/// A small per-stream pseudo-random number (reconnect jitter), no shared state.
fn jitter(seed: u64, below: u64) -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ now_us();
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x % below.max(1)
}

async fn one(
    args: Arc<HoldArgs>,
    shared: Arc<Shared>,
    index: u64,
    permit: tokio::sync::OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
    stall: bool,
) {
    let channels = args.channels.max(1);
    let ch = index % channels;
    let mut st = Stream {
        line: Vec::new(),
        count: 0,
        last_seq: None,
        first_seq: ch,
        stride: channels,
        last_id: None,
        dropped_at: None,
        reached: false,
        left: false,
        returned_at: None,
        cookie: args
            .stream
            .session_cookie
            .then(|| format!("session={}-{index}", args.source)),
        source: source_of(&args, index),
        target: args.target,
        moves: 0,
    };
    let mut permit = Some(permit);
    let mut open_retries = args.stream.open_retries;
    loop {
        let end = connection(&args, &shared, &mut st, ch, &mut permit, &mut stop, stall).await;
        // The permit goes when the stream first opens.
        let never_opened = permit.is_some();
        match end {
            End::Stop => break,
            End::Failed(why) if never_opened && open_retries > 0 && why.starts_with("status ") => {
                open_retries -= 1;
                shared.retries.fetch_add(1, Ordering::Relaxed);
                shared.count_failure(why);
                let wait = jitter(index + open_retries, args.stream.reconnect_ms);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                    _ = stop.changed() => break,
                }
            }
            End::Failed(why) if never_opened => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                shared.count_failure(why);
                break;
            }
            End::Dropped if never_opened => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                shared.count_failure("closed before it opened".into());
                break;
            }
            End::Churned => {
                // Opens again at once, fresh, as a new page would.
                shared.churn_cycles.fetch_add(1, Ordering::Relaxed);
                st.last_id = None;
            }
            End::Left => {
                st.dropped_at = Some(Instant::now());
                shared.down.fetch_add(1, Ordering::Relaxed);
                shared.first_drop_us.fetch_min(now_us(), Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(args.stream.away_ms)) => {}
                    _ = stop.changed() => break,
                }
            }
            End::Dropped if !args.stream.reconnect => {
                shared.ended.fetch_add(1, Ordering::Relaxed);
                break;
            }
            End::Dropped => {
                st.dropped_at = Some(Instant::now());
                shared.down.fetch_add(1, Ordering::Relaxed);
                shared.first_drop_us.fetch_min(now_us(), Ordering::Relaxed);
                let wait = jitter(index, args.stream.reconnect_ms);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                    _ = stop.changed() => break,
                }
            }
            End::Failed(why) => {
                // Down and not back yet: try again after the reconnect delay (on another node,
                // if there are fallbacks: this one may be gone).
                shared.retries.fetch_add(1, Ordering::Relaxed);
                shared.count_failure(why);
                if !args.fallbacks.is_empty() {
                    let n = args.fallbacks.len() as u64;
                    let first_move = st.moves == 0;
                    st.target = args.fallbacks[((index + st.moves) % n) as usize];
                    st.moves += 1;
                    if first_move {
                        // Its node is gone: a load balancer sends the retry elsewhere at once.
                        continue;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(args.stream.reconnect_ms)) => {}
                    _ = stop.changed() => break,
                }
            }
        }
    }
    // Streams that stopped reading on purpose are not expected to receive anything.
    if !stall || args.stream.wake_ms > 0 {
        if let Ok(mut c) = shared.counts.lock() {
            c.push(st.count);
        }
    }
}

pub async fn hold(
    args: HoldArgs,
    mut on_ready: impl FnMut(u64, u64),
) -> anyhow::Result<HoldReport> {
    let args = Arc::new(args);
    let shared = Arc::new(Shared::new(args.expect));
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
            args.first_index + i,
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
        // `--expect 0` holds the streams idle: done as soon as they are open. Churn runs until
        // the deadline.
        if Instant::now() >= deadline
            || (args.stream.churn_ms == 0
                && (args.expect == Some(0) || (args.expect.is_some() && finished >= open)))
        {
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
    let first_drop = shared.first_drop_us.load(Ordering::Relaxed);
    Ok(HoldReport {
        streams_wanted: args.streams,
        streams_opened: shared.opened.load(Ordering::Relaxed),
        streams_failed: shared.failed.load(Ordering::Relaxed),
        streams_ended: shared.ended.load(Ordering::Relaxed),
        connect_secs,
        deliveries: shared.deliveries.load(Ordering::Relaxed),
        duplicates: shared.duplicates.load(Ordering::Relaxed),
        gaps: shared.gaps.load(Ordering::Relaxed),
        streams_stalled: shared.stalled.load(Ordering::Relaxed),
        reconnects: shared.reconnects.load(Ordering::Relaxed),
        reconnect_retries: shared.retries.load(Ordering::Relaxed),
        failures: shared
            .failures
            .lock()
            .map(|f| f.clone())
            .unwrap_or_default(),
        resume_us: shared
            .resume_hist
            .lock()
            .map(|h| report::pairs(&h))
            .unwrap_or_default(),
        catchup_us: shared
            .catchup_hist
            .lock()
            .map(|h| report::pairs(&h))
            .unwrap_or_default(),
        churn_cycles: shared.churn_cycles.load(Ordering::Relaxed),
        wire_bytes: shared.wire_bytes.load(Ordering::Relaxed),
        reads: shared.reads.load(Ordering::Relaxed),
        still_down: shared.down.load(Ordering::Relaxed),
        first_drop_us: (first_drop != u64::MAX).then_some(first_drop),
        last_reopen_us: Some(shared.last_reopen_us.load(Ordering::Relaxed)).filter(|&t| t > 0),
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

    #[test]
    fn websocket_frames_across_splits() {
        let mut wire = vec![0x81, 5];
        wire.extend_from_slice(b"1 200");
        wire.extend_from_slice(&[0x89, 2, b'h', b'i']);
        let long = vec![b'x'; 300];
        wire.extend_from_slice(&[0x81, 126, 1, 44]);
        wire.extend_from_slice(&long);
        wire.extend_from_slice(&[0x88, 0]);
        for split in 1..wire.len() {
            let mut f = WsFrames::default();
            let mut out = Vec::new();
            f.feed(&wire[..split], &mut out);
            f.feed(&wire[split..], &mut out);
            assert_eq!(out.len(), 4, "split at {split}");
            assert!(matches!(&out[0], WsFrame::Text(p) if p == b"1 200"));
            assert!(matches!(&out[1], WsFrame::Ping(p) if p == b"hi"));
            assert!(matches!(&out[2], WsFrame::Text(p) if p.len() == 300));
            assert!(matches!(&out[3], WsFrame::Close));
        }
    }

    #[test]
    fn client_frames_are_masked_and_parse_back() {
        let payload = br#"{"op":"subscribe","channel":"public:c7"}"#;
        let wire = ws_client_frame(1, payload);
        assert_ne!(&wire[6..], &payload[..], "masked");
        let mut f = WsFrames::default();
        let mut out = Vec::new();
        f.feed(&wire, &mut out);
        assert!(matches!(&out[0], WsFrame::Text(p) if p == payload));
    }

    #[test]
    fn gaps_follow_the_channel_stride() {
        let shared = Shared::new(None);
        let mut st = Stream {
            line: Vec::new(),
            count: 0,
            last_seq: None,
            first_seq: 3,
            stride: 10,
            last_id: None,
            dropped_at: None,
            reached: false,
            left: false,
            returned_at: None,
            cookie: None,
            source: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            target: SocketAddr::from(([127, 0, 0, 1], 1)),
            moves: 0,
        };
        let mut lat = Vec::new();
        // 3 and 13 arrive, 23 and 33 are missed, 43 arrives, then 13 again.
        let body = b"id: 1-0\ndata: 3 1\n\ndata: 13 1\n\nid: 9-0\ndata: 43 1\n\ndata: 13 1\n\n";
        st.feed_sse(body, &shared, &mut lat);
        assert_eq!(st.count, 3);
        assert_eq!(shared.gaps.load(Ordering::Relaxed), 2);
        assert_eq!(shared.duplicates.load(Ordering::Relaxed), 1);
        assert_eq!(st.last_id.as_deref(), Some("9-0"));
        st.feed_ws(
            br#"{"type":"message","channel":"c","id":"1-0","event":"message","data":"53 1"}"#,
            &shared,
            &mut lat,
        );
        assert_eq!(st.count, 4);
        // A WebSocket resumes after the id its last message frame carried.
        assert_eq!(st.last_id.as_deref(), Some("1-0"));
        st.feed_ws(
            br#"{"event":"msg","channel":"c","data":"63 1"}"#,
            &shared,
            &mut lat,
        );
        assert_eq!((st.count, st.last_id.as_deref()), (5, Some("1-0")));
    }

    #[test]
    fn a_websocket_subscribes_again_after_its_last_id() {
        let t = r#"{"op":"subscribe","channel":"public:c{ch}"}"#;
        assert_eq!(
            subscribe_frame(t, 3, None),
            r#"{"op":"subscribe","channel":"public:c3"}"#
        );
        assert_eq!(
            subscribe_frame(t, 3, Some("17-0")),
            r#"{"op":"subscribe","channel":"public:c3","since":"17-0"}"#
        );
    }
}
