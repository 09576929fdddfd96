//! The public port's front door: reads each connection's request head itself (httparse, at
//! most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] headers, within `REQUEST_HEAD_SECS`), serves a
//! plain HTTP/1.x `GET /v1/sse` on the bare socket, and hands every other connection, with the
//! bytes already read, to actix-http. It holds no buffer for the life of a stream: the head
//! buffer is dropped before the stream opens, and frames are written from the shared messages
//! (a WebSocket's by the fan-out itself while its writer waits: `DirectWs`).
//!
//! Why: actix-http's dispatcher keeps an 8 KiB read and an 8 KiB write buffer for the whole
//! life of every connection, and copies each frame into the second; a stream needs neither
//! (BENCHMARKS.md, "A leaner HTTP/1.1 path for streams": the figures behind this module).

use crate::http::error::ApiError;
use crate::message::Message;
use crate::node::Node;
use crate::peer::PeerSocket;
use crate::stream::{DirectSink, Sent, Session};
use crate::transport;
use crate::transport::sse::{self, SseBody, StreamHead};
use crate::transport::ws::{WsBody, WsHead};
use actix_http::ws;
use actix_http::RequestHead;
use actix_web::body::MessageBody as _;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::Uri;
use actix_web::ResponseError;
use bytes::{Buf, Bytes, BytesMut};
use std::borrow::Borrow;
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Largest request head read here (a stream request is a few hundred bytes; a long token or
/// many cookies fit). A longer head is handed to actix-http, which has its own limit (32 KiB).
pub const MAX_HEAD: usize = 8 * 1024;
/// Most headers read here; more are handed to actix-http (which answers 431 past its limit).
pub const MAX_HEADERS: usize = 48;
/// Bytes a stream's client may send after its request before its stream is closed as an error.
/// EventSource sends nothing; the bytes are read and dropped so that a close is seen at once,
/// and bounded so that a client cannot keep the node reading for ever.
const MAX_DISCARD: usize = 64 * 1024;
/// Frames gathered into one `writev` when several are ready (a burst, a catch-up).
const BATCH: usize = 16;
/// Seconds a connection whose stream the hub ended is read on, for the client's close.
const LINGER_SECS: u64 = 2;
/// Seconds an error answer may take to be written before the connection is dropped.
const ANSWER_SECS: u64 = 5;

/// What a connection's first bytes turned out to be.
#[derive(Debug, PartialEq)]
pub enum Head {
    /// A complete plain stream request, served here.
    Stream(StreamRequest),
    /// A complete WebSocket upgrade of `/v1/ws` that passes the handshake, served here.
    Ws(StreamRequest),
    /// Anything else, complete or not: actix-http's to answer.
    Other,
    /// Not complete yet (and within limits).
    Partial,
}

/// The parts of a stream request the stream needs, owned (the head buffer is dropped).
#[derive(Debug, PartialEq, Default)]
pub struct StreamRequest {
    pub query: String,
    pub origin: Option<HeaderValue>,
    pub authorization: Option<String>,
    pub last_event_id: Option<String>,
    /// `Sec-WebSocket-Accept` for an upgrade.
    pub ws_accept: Option<String>,
    /// `Accept: text/event-stream` (an EventSource): a refusal that passes is a 200 telling
    /// it to come back (see `sse::refusal_body`).
    pub event_stream: bool,
}

impl StreamRequest {
    /// The credential of `Authorization: Bearer <credential>`, if sent.
    fn bearer(&self) -> Option<&str> {
        self.authorization
            .as_deref()
            .and_then(crate::http::bearer_credential)
    }
}

/// Reads a request head. A stream request is `GET /v1/sse[?query]` over HTTP/1.0 or 1.1 with
/// no body and no `Upgrade`, whose URI and header values actix would also accept; anything
/// else (another path or method, an odd header, a malformed or oversized head) is `Other`, so
/// actix-http answers it exactly as it would have without this front.
pub fn parse_head(buf: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => Head::Partial,
        Ok(httparse::Status::Complete(_)) => stream_request(&req).unwrap_or(Head::Other),
        _ => Head::Other,
    }
}

fn stream_request(req: &httparse::Request<'_, '_>) -> Option<Head> {
    if req.method? != "GET" || !matches!(req.version?, 0 | 1) {
        return None;
    }
    let uri: Uri = req.path?.parse().ok()?;
    let ws = match uri.path() {
        "/v1/sse" => false,
        "/v1/ws" => true,
        _ => return None,
    };
    if uri.scheme().is_some() {
        return None;
    }
    let mut out = StreamRequest {
        query: uri.query().unwrap_or("").to_owned(),
        ..StreamRequest::default()
    };
    // The headers a WebSocket handshake is judged on, as actix judges them.
    let mut upgrade = RequestHead::default();
    for h in req.headers.iter() {
        // The value as actix would hold it; one it would refuse sends the request there.
        let value = HeaderValue::from_bytes(h.value).ok()?;
        let name = h.name;
        if name.eq_ignore_ascii_case("transfer-encoding")
            || (name.eq_ignore_ascii_case("upgrade") && !ws)
            || (name.eq_ignore_ascii_case("content-length") && value != "0")
        {
            return None;
        }
        if ws {
            for known in [
                header::UPGRADE,
                header::CONNECTION,
                header::SEC_WEBSOCKET_VERSION,
                header::SEC_WEBSOCKET_KEY,
            ] {
                if name.eq_ignore_ascii_case(known.as_str()) {
                    upgrade.headers.append(known, value.clone());
                }
            }
        }
        // The first of repeated headers counts, as with actix's `headers().get()`.
        if name.eq_ignore_ascii_case("origin") {
            out.origin.get_or_insert(value);
        } else if name.eq_ignore_ascii_case("authorization") {
            if out.authorization.is_none() {
                out.authorization = Some(value.to_str().unwrap_or("").to_owned());
            }
        } else if name.eq_ignore_ascii_case("accept") {
            out.event_stream |= sse::wants_event_stream(Some(h.value));
        } else if name.eq_ignore_ascii_case("last-event-id") && out.last_event_id.is_none() {
            if let Ok(v) = value.to_str() {
                out.last_event_id = Some(v.to_owned());
            }
        }
    }
    if !ws {
        return Some(Head::Stream(out));
    }
    // A handshake actix would refuse goes there, for its answer.
    ws::verify_handshake(&upgrade).ok()?;
    let key = upgrade.headers.get(header::SEC_WEBSOCKET_KEY)?;
    out.ws_accept = Some(String::from_utf8_lossy(&ws::hash_key(key.as_bytes())).into_owned());
    Some(Head::Ws(out))
}

/// Reads until the head is complete, over the limit, or the client stopped sending. `None`
/// when the connection closed before sending anything.
async fn read_head(io: &mut TcpStream, buf: &mut BytesMut) -> io::Result<Option<Head>> {
    loop {
        buf.reserve(1024.min(MAX_HEAD + 1 - buf.len()).max(1));
        if io.read_buf(buf).await? == 0 {
            return Ok((!buf.is_empty()).then_some(Head::Other));
        }
        match parse_head(buf) {
            Head::Partial => continue,
            head => return Ok(Some(head)),
        }
    }
}

/// Serves one accepted connection of the public port; `http` answers whatever is not a stream.
pub async fn serve<H, F>(node: Arc<Node>, io: TcpStream, head_secs: u64, http: H)
where
    H: FnOnce(Conn) -> F,
    F: Future<Output = ()>,
{
    let mut io = io;
    // Frames are small and must leave at once; Nagle would hold one behind an unacked one.
    let _ = io.set_nodelay(true);
    let socket = PeerSocket(io.as_raw_fd());
    let mut buf = BytesMut::new();
    let head =
        tokio::time::timeout(Duration::from_secs(head_secs), read_head(&mut io, &mut buf)).await;
    match head {
        Ok(Ok(Some(Head::Stream(req)))) => {
            drop(buf);
            // Boxed: the opening (token check, slot, catch-up) must not size the task that
            // lives as long as the stream.
            Box::pin(stream(node, io, socket, req)).await
        }
        Ok(Ok(Some(Head::Ws(req)))) => {
            drop(buf);
            Box::pin(socket_upgrade(node, io, socket, req)).await
        }
        // Not a stream, or the head still incomplete at the deadline: actix-http answers (a
        // 408 after its own timer, for the latter).
        Ok(Ok(Some(_))) | Err(_) => {
            Box::pin(http(Conn {
                read: buf.freeze(),
                io,
                socket,
            }))
            .await
        }
        Ok(Ok(None)) | Ok(Err(_)) => {}
    }
}

async fn stream(node: Arc<Node>, io: TcpStream, socket: PeerSocket, req: StreamRequest) {
    let opening = Box::pin(sse::open(
        &node,
        StreamHead {
            query: &req.query,
            origin: req.origin.as_ref(),
            bearer: req.bearer(),
            last_event_id: req.last_event_id.as_deref(),
            socket: Some(socket),
            reset_watch: None,
        },
    ));
    // A client that leaves while its stream opens (Redis slow, a catch-up read) drops the
    // opening at whichever await it is, which releases what it took.
    let opened = tokio::select! {
        biased;
        opened = opening => opened,
        () = client_gone(&io, None) => return,
    };
    let (origin, event_stream) = (req.origin, req.event_stream);
    drop(req.query);
    match opened {
        Ok(opened) => {
            let head = response_head(opened.allow.as_ref());
            run(Writer {
                io,
                body: Some(opened.body),
                pending: head,
                discarded: 0,
            })
            .await
        }
        Err(e) => match event_stream.then(|| sse::refusal_body(&e)).flatten() {
            // Refused for a reason that passes: the EventSource is told to come back.
            Some(body) => {
                let allow = crate::http::cors::allow_origin(origin.as_ref(), &node.origins);
                let mut answer = BytesMut::from(&response_head(allow.ok().flatten().as_ref())[..]);
                answer.extend_from_slice(&body);
                send_and_close(io, &answer).await
            }
            None => refuse(io, &e).await,
        },
    }
}

async fn socket_upgrade(node: Arc<Node>, io: TcpStream, socket: PeerSocket, req: StreamRequest) {
    let checked = transport::ws::check(
        &node,
        &WsHead {
            query: &req.query,
            origin: req.origin.as_ref(),
            bearer: req.bearer(),
        },
    );
    let claims = match checked {
        Ok(claims) => claims,
        Err(e) => return refuse(io, &e).await,
    };
    let accept = req.ws_accept.unwrap_or_default();
    drop(req.query);
    let opening = Box::pin(transport::ws::open(&node, claims, Some(socket), None));
    // Frames a client sends before the 101 (it should not) are kept for the socket.
    let mut early = BytesMut::new();
    let opened = tokio::select! {
        biased;
        opened = opening => opened,
        () = client_gone(&io, Some(&mut early)) => return,
    };
    match opened {
        Ok(mut body) => {
            body.feed(&early);
            drop(early);
            let head = format!(
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
            );
            let io = Arc::new(io);
            body.attach(Box::new(DirectWs {
                io: io.clone(),
                node,
            }));
            run(Writer {
                io,
                body: Some(body),
                pending: Bytes::from(head),
                discarded: 0,
            })
            .await
        }
        Err(e) => refuse(io, &e).await,
    }
}

/// Runs a stream to its end. When the hub ended it (drain, slow, expiry, a refused frame), the
/// stream is released at once (a stopping node does not wait for slow readers), then within
/// [`LINGER_SECS`] its last bytes are written, the write side is shut, and the connection is
/// read on until the client closes: closing a socket with unread bytes resets it, and the
/// client could lose those last bytes.
async fn run<B: Outbound, S: Socket>(mut writer: Writer<B, S>) {
    if !(&mut writer).await {
        return;
    }
    let Writer { io, pending, .. } = writer;
    // The body is gone and took its sink back: the socket is the writer's alone again.
    let Some(mut io) = io.into_stream() else {
        return;
    };
    let _ = tokio::time::timeout(Duration::from_secs(LINGER_SECS), async {
        io.write_all(&pending).await?;
        io.shutdown().await?;
        let mut scratch = [0u8; 512];
        let mut read = 0;
        while read <= MAX_DISCARD {
            let n = io.read(&mut scratch).await?;
            if n == 0 {
                break;
            }
            read += n;
        }
        Ok::<_, io::Error>(())
    })
    .await;
}

/// Answers a refused request and closes the connection.
async fn refuse(io: TcpStream, e: &ApiError) {
    send_and_close(io, &error_answer(e).await).await
}

/// Writes a whole answer (within [`ANSWER_SECS`]) and closes the connection.
async fn send_and_close(mut io: TcpStream, answer: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(ANSWER_SECS), async {
        io.write_all(answer).await?;
        io.shutdown().await
    })
    .await;
}

/// Resolves when the client closes or resets the connection, or sends more than it may
/// ([`MAX_DISCARD`]). What it sends meanwhile is dropped, or kept in `keep`.
async fn client_gone(io: &TcpStream, mut keep: Option<&mut BytesMut>) {
    let mut read = 0;
    loop {
        if io.readable().await.is_err() {
            return;
        }
        let mut scratch = [0u8; 512];
        match io.try_read(&mut scratch) {
            Ok(0) => return,
            Ok(n) => {
                read += n;
                if read > MAX_DISCARD {
                    return;
                }
                if let Some(keep) = keep.as_deref_mut() {
                    keep.extend_from_slice(&scratch[..n]);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// `HTTP/1.1 200` with the stream headers. The body is delimited by the connection's close
/// (`Connection: close`, no chunked framing): a stream's connection carries nothing after it.
pub fn response_head(allow: Option<&HeaderValue>) -> Bytes {
    let mut head = BytesMut::with_capacity(192);
    head.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    for (k, v) in sse::HEADERS {
        head.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if let Some(origin) = allow {
        head.extend_from_slice(b"access-control-allow-origin: ");
        head.extend_from_slice(origin.as_bytes());
        head.extend_from_slice(b"\r\nvary: Origin\r\n");
    }
    head.extend_from_slice(b"connection: close\r\n\r\n");
    head.freeze()
}

/// The whole answer of a refused stream request, as actix would send it (JSON, `Retry-After`),
/// with `Connection: close`.
async fn error_answer(e: &ApiError) -> Bytes {
    let res = e.error_response();
    let status = res.status();
    let mut out = BytesMut::with_capacity(256);
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .as_bytes(),
    );
    for (k, v) in res.headers() {
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let body = actix_web::body::to_bytes(res.into_body())
        .await
        .unwrap_or_default();
    out.extend_from_slice(
        format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&body);
    out.freeze()
}

/// Where the reading of a client's bytes stands after a poll.
#[derive(Debug, PartialEq, Eq)]
enum ReadSide {
    /// Closed, reset, or more bytes than a stream may send: the connection ends.
    Gone,
    /// Nothing to read; woken when there is.
    Waiting,
    /// The body takes no bytes now (it has frames to handle first); nothing registered.
    Held,
}

/// A stream's body as the front drives it: frames out, the client's bytes in.
trait Outbound: Unpin {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>>;
    /// Whether the client's bytes are read now (a WebSocket that has frames to handle
    /// first lets them wait in the socket).
    fn wants_input(&self) -> bool;
    /// The client's bytes; `false` when they mean nothing here (dropped and counted).
    fn input(&mut self, bytes: &[u8]) -> bool;
    /// Everything is written and the body has nothing ready: the writer waits.
    fn park(&self) {}
}

impl Outbound for SseBody {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        Pin::new(self).poll_next(cx).map(|b| b.map(|Ok(b)| b))
    }
    fn wants_input(&self) -> bool {
        true
    }
    fn input(&mut self, _: &[u8]) -> bool {
        false
    }
}

impl Outbound for WsBody {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        Pin::new(self).poll_next(cx).map(|b| b.map(|Ok(b)| b))
    }
    fn wants_input(&self) -> bool {
        WsBody::wants_input(self)
    }
    fn input(&mut self, bytes: &[u8]) -> bool {
        self.feed(bytes);
        true
    }
    fn park(&self) {
        WsBody::park(self);
    }
}

/// A WebSocket's [`Sink`]: the fan-out writes a live message's shared frame to the socket
/// itself while the socket's writer is parked, as many as the socket takes without blocking.
/// Per message and socket that saves the queue entry, the wake-up of the connection's task and
/// its poll (BENCHMARKS.md, WebSocket fan-out).
struct DirectWs {
    io: Arc<TcpStream>,
    node: Arc<Node>,
}

impl DirectSink for DirectWs {
    fn send(&self, msg: &Message, session: &Session) -> Sent {
        let frame = msg.ws_frame();
        let sent = match self.io.try_write(&frame) {
            Ok(n) if n == frame.len() => Sent::All,
            Ok(n) if n > 0 => Sent::Part(frame.slice(n..)),
            _ => return Sent::Nothing,
        };
        // Counted delivered by the fan-out (once per message, not per socket).
        self.node
            .metrics
            .latency
            .record(msg.received.elapsed().as_secs_f64());
        session.took(self.node.registry.clock.now());
        sent
    }
}

/// A stream's socket as its writer holds it: alone (SSE) or shared with a [`Sink`] (WebSocket;
/// an SSE stream does not pay for the sharing).
trait Socket: Borrow<TcpStream> + Unpin {
    /// The socket alone again (its sink was taken back), for the last bytes and the close.
    fn into_stream(self) -> Option<TcpStream>;
}

impl Socket for TcpStream {
    fn into_stream(self) -> Option<TcpStream> {
        Some(self)
    }
}

impl Socket for Arc<TcpStream> {
    fn into_stream(self) -> Option<TcpStream> {
        Arc::try_unwrap(self).ok()
    }
}

/// `poll_write_vectored` on a socket shared with its [`Sink`] (which writes only while the
/// writer is parked, so the two never write at once).
fn poll_writev(
    io: &TcpStream,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    loop {
        std::task::ready!(io.poll_write_ready(cx))?;
        match io.try_write_vectored(bufs) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            done => return Poll::Ready(done),
        }
    }
}

/// Writes a stream's frames to its socket and reads the socket for the client's bytes and its
/// close. Ends (and, dropped, releases the stream) when the client closes, a write fails, or
/// the stream ends.
struct Writer<B, S> {
    /// The socket, or (a WebSocket's) shared with the body's sink.
    io: S,
    /// `None` once the body ended (the stream is released; its last bytes may be pending).
    body: Option<B>,
    /// Bytes taken from the body and not yet written (a slow reader's, or the head).
    pending: Bytes,
    discarded: usize,
}

impl<B: Outbound, S: Socket> Writer<B, S> {
    /// Reads the client's bytes into the body while it takes them.
    fn poll_read_side(&mut self, cx: &mut Context<'_>) -> ReadSide {
        loop {
            if !self.body.as_ref().is_some_and(B::wants_input) {
                return ReadSide::Held;
            }
            match self.io.borrow().poll_read_ready(cx) {
                Poll::Pending => return ReadSide::Waiting,
                Poll::Ready(Err(_)) => return ReadSide::Gone,
                Poll::Ready(Ok(())) => {}
            }
            let mut scratch = [0u8; 512];
            match self.io.borrow().try_read(&mut scratch) {
                Ok(0) => return ReadSide::Gone,
                Ok(n) => {
                    if !self.body.as_mut().is_some_and(|b| b.input(&scratch[..n])) {
                        self.discarded += n;
                        if self.discarded > MAX_DISCARD {
                            return ReadSide::Gone;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return ReadSide::Gone,
            }
        }
    }

    /// Writes what is pending, then gathers ready frames into one write, until the body has
    /// nothing ready (`Pending`), the socket is full (`Pending`), or the stream ended.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            while !self.pending.is_empty() {
                let n = std::task::ready!(poll_writev(
                    self.io.borrow(),
                    cx,
                    &[IoSlice::new(&self.pending)]
                ))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pending.advance(n);
            }
            let Some(body) = self.body.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            let mut batch: [Bytes; BATCH] = Default::default();
            let mut count = 0;
            let mut ended = false;
            while count < BATCH {
                match body.poll_frame(cx) {
                    Poll::Ready(Some(b)) => {
                        if !b.is_empty() {
                            batch[count] = b;
                            count += 1;
                        }
                    }
                    Poll::Ready(None) => {
                        ended = true;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            if count > 0 {
                let slices: [IoSlice<'_>; BATCH] = std::array::from_fn(|i| IoSlice::new(&batch[i]));
                let written = match poll_writev(self.io.borrow(), cx, &slices[..count]) {
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => 0,
                };
                self.pending = unwritten(&mut batch[..count], written);
            }
            if ended {
                // Released now; what is pending is written by `run`.
                self.body = None;
                return Poll::Ready(Ok(()));
            }
            if count == 0 {
                body.park();
                return Poll::Pending;
            }
        }
    }
}

/// What is left of `batch` after `written` bytes went out: one frame's tail without a copy,
/// several frames joined (a slow reader's, which is rare and bounded by the batch).
fn unwritten(batch: &mut [Bytes], mut written: usize) -> Bytes {
    let mut skip = 0;
    while skip < batch.len() && written >= batch[skip].len() {
        written -= batch[skip].len();
        skip += 1;
    }
    let rest = &mut batch[skip..];
    let Some((first, tail)) = rest.split_first_mut() else {
        return Bytes::new();
    };
    first.advance(written);
    if tail.is_empty() {
        return std::mem::take(first);
    }
    let mut joined =
        BytesMut::with_capacity(first.len() + tail.iter().map(Bytes::len).sum::<usize>());
    joined.extend_from_slice(first);
    for b in tail {
        joined.extend_from_slice(b);
    }
    joined.freeze()
}

/// `true` when the hub ended the stream (the body is dropped; its last bytes may be pending),
/// `false` when the client left or the connection failed.
impl<B: Outbound, S: Socket> Future for Writer<B, S> {
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let this = self.get_mut();
        // Rounds of reading and handling a client's frames per wake-up: a client that sends
        // without pause must not hold the worker's thread.
        for _ in 0..16 {
            let read = this.poll_read_side(cx);
            if read == ReadSide::Gone {
                return Poll::Ready(false);
            }
            match this.poll_write_out(cx) {
                // The body handled what it held and takes bytes again: read them now (no
                // wake-up is registered for them).
                Poll::Pending
                    if read == ReadSide::Held && this.body.as_ref().is_some_and(B::wants_input) =>
                {
                    continue
                }
                other => return Self::finish(other),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<B: Outbound, S: Socket> Writer<B, S> {
    fn finish(out: Poll<io::Result<()>>) -> Poll<bool> {
        match out {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(_)) => Poll::Ready(false),
            // The stream ended (drain, slow, expiry): `run` writes the rest and closes.
            Poll::Ready(Ok(())) => Poll::Ready(true),
        }
    }
}

/// A connection handed to actix-http: the bytes the front already read, then the socket.
pub struct Conn {
    read: Bytes,
    io: TcpStream,
    socket: PeerSocket,
}

impl Conn {
    pub fn socket(&self) -> PeerSocket {
        self.socket
    }

    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.io.peer_addr().ok()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read[..n]);
            this.read.advance(n);
            if this.read.is_empty() {
                this.read = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        parse_head(text.as_bytes())
    }

    #[test]
    fn stream_requests_are_recognised() {
        let h = head(
            "GET /v1/sse?channel=a&lastEventId=5-0 HTTP/1.1\r\nHost: x\r\nOrigin: https://app\r\n\
             Authorization: Bearer t0k\r\nLast-Event-ID: 7-0\r\nlast-event-id: 9-0\r\n\r\n",
        );
        let Head::Stream(r) = h else { panic!("{h:?}") };
        assert_eq!(r.query, "channel=a&lastEventId=5-0");
        assert_eq!(r.origin.unwrap(), "https://app");
        assert_eq!(r.authorization.as_deref(), Some("Bearer t0k"));
        assert_eq!(r.last_event_id.as_deref(), Some("7-0"));
        assert!(matches!(
            head("GET /v1/sse HTTP/1.0\r\n\r\n"),
            Head::Stream(_)
        ));
    }

    #[test]
    fn websocket_upgrades_that_pass_the_handshake_are_recognised() {
        let up = "GET /v1/ws?token=t HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                  Connection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        let Head::Ws(r) = head(up) else {
            panic!("{:?}", head(up))
        };
        assert_eq!(r.query, "token=t");
        // RFC 6455's example key and answer.
        assert_eq!(r.ws_accept.as_deref(), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        for broken in [
            up.replace("Version: 13", "Version: 8"),
            up.replace("dGhlIHNhbXBsZSBub25jZQ==", "short"),
            up.replace("Upgrade: websocket\r\n", ""),
            up.replace("keep-alive, Upgrade", "keep-alive"),
            up.replace("GET", "POST"),
        ] {
            assert_eq!(head(&broken), Head::Other, "{broken:?}");
        }
    }

    #[test]
    fn everything_else_goes_to_actix() {
        for text in [
            "POST /v1/sse HTTP/1.1\r\n\r\n",
            "HEAD /v1/sse HTTP/1.1\r\n\r\n",
            "GET /v1/sse/ HTTP/1.1\r\n\r\n",
            "GET /v1/ws HTTP/1.1\r\n\r\n",
            "GET /v1/ws/ HTTP/1.1\r\n\r\n",
            "GET /healthz HTTP/1.1\r\n\r\n",
            "GET http://h/v1/sse HTTP/1.1\r\n\r\n",
            "GET /v1/sse HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET /v1/sse HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "GET /v1/sse HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /v1/sse HTTP/2.0\r\n\r\n",
            "GET /v1/sse HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "\u{0}\u{1}junk\r\n\r\n",
        ] {
            assert_eq!(head(text), Head::Other, "{text:?}");
        }
        let many = format!(
            "GET /v1/sse HTTP/1.1\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(head(&many), Head::Other);
        let long = format!("GET /v1/sse HTTP/1.1\r\nA: {}", "b".repeat(MAX_HEAD));
        assert_eq!(head(&long), Head::Other);
        assert_eq!(head("GET /v1/sse HTTP/1.1\r\nHost: x\r\n"), Head::Partial);
        assert_eq!(head(""), Head::Partial);
    }

    #[test]
    fn unwritten_keeps_exactly_the_tail() {
        let mk = || {
            [
                Bytes::from_static(b"abc"),
                Bytes::from_static(b"defg"),
                Bytes::from_static(b"hi"),
            ]
        };
        for written in 0..=9 {
            let mut b = mk();
            assert_eq!(&unwritten(&mut b, written)[..], &b"abcdefghi"[written..]);
        }
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(10_000))]

            /// Any bytes read as a head, never a panic; a stream request is only ever a GET of
            /// `/v1/sse` whose head ends within the limit.
            #[test]
            fn any_bytes_are_a_head(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
                if let Head::Stream(_) = parse_head(&bytes) {
                    prop_assert!(bytes.starts_with(b"GET /v1/sse"));
                }
            }

            /// Requests as clients write them: recognised with their query and headers intact,
            /// whatever the case of the header names.
            #[test]
            fn written_requests_read_back(
                query in "[A-Za-z0-9=&%:._-]{0,80}",
                id in proptest::option::of("[ -~]{0,40}"),
                upper in any::<bool>(),
                split in 0usize..200,
            ) {
                let name = if upper { "LAST-EVENT-ID" } else { "Last-Event-Id" };
                let mut text = format!("GET /v1/sse?{query} HTTP/1.1\r\nHost: h\r\n");
                if let Some(id) = &id {
                    text.push_str(&format!("{name}: {id}\r\n"));
                }
                text.push_str("\r\n");
                // Any prefix is partial; the whole is the request.
                let cut = split.min(text.len() - 1);
                prop_assert_eq!(parse_head(&text.as_bytes()[..cut]), Head::Partial);
                let Head::Stream(r) = parse_head(text.as_bytes()) else {
                    return Err(TestCaseError::fail("not a stream request"));
                };
                prop_assert_eq!(r.query, query);
                prop_assert_eq!(r.last_event_id, id.map(|s| s.trim().to_string()));
            }
        }
    }
}
