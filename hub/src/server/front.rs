//! The public port's front door: reads each connection's request head itself (httparse, at
//! most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] headers, within `HUB_HEAD_TIMEOUT_SECS`), serves a
//! plain HTTP/1.x `GET /v1/sse` on the bare socket, and hands every other connection, with the
//! bytes already read, to actix-http. It holds no buffer for the life of a stream: the head
//! buffer is dropped before the stream opens, and frames are written from the shared messages
//! by the stream's socket writer (`transport::socket`)
//! (a WebSocket's by the fan-out itself while its writer waits: `DirectWs`).
//!
//! Why: actix-http's dispatcher keeps an 8 KiB read and an 8 KiB write buffer for the whole
//! life of every connection, and copies each frame into the second; a stream needs neither
//! (BENCHMARKS.md, "A leaner HTTP/1.1 path for streams": the figures behind this module).

use crate::hangup::{client_gone, send_and_close};
use crate::http::error::ApiError;
use crate::node::Node;
use crate::peer::PeerSocket;

use crate::transport;
use crate::transport::socket::{run, DirectWs, Writer};
use crate::transport::sse::{self, StreamHead};
use crate::transport::ws::WsHead;
use actix_http::ws;
use actix_http::RequestHead;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::Uri;
use actix_web::ResponseError;
use bytes::{Buf, Bytes, BytesMut};
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Largest request head read here (a stream request is a few hundred bytes; a long token or
/// many cookies fit). A longer head is handed to actix-http, which has its own limit (32 KiB).
pub const MAX_HEAD: usize = 8 * 1024;
/// Most headers read here; more are handed to actix-http (which answers 431 past its limit).
pub const MAX_HEADERS: usize = 48;

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
    /// Every `Cookie` header, joined with `; `.
    pub cookie: Option<String>,
    /// Every `X-Forwarded-For` header, joined with `, `.
    pub forwarded: Option<String>,
    pub last_event_id: Option<String>,
    /// `Sec-WebSocket-Accept` for an upgrade.
    pub ws_accept: Option<String>,
    /// The `Sec-WebSocket-Extensions` answer when the upgrade offered `permessage-deflate`
    /// the hub accepts.
    pub ws_deflate: Option<&'static str>,
    /// `Accept-Encoding` accepts gzip.
    pub gzip: bool,
    /// `Accept: text/event-stream` (an EventSource): a refusal that passes is a 200 telling
    /// it to come back (see `sse::refusal_body`).
    pub event_stream: bool,
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
    let mut extensions: Vec<String> = Vec::new();
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
        } else if name.eq_ignore_ascii_case("cookie") {
            join(&mut out.cookie, "; ", value.to_str().unwrap_or(""));
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            join(&mut out.forwarded, ", ", value.to_str().unwrap_or(""));
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") && ws {
            let v = value.to_str().unwrap_or("");
            extensions.push(v.to_owned());
        } else if name.eq_ignore_ascii_case("accept-encoding") {
            out.gzip |= crate::compress::accepts_gzip(value.to_str().unwrap_or(""));
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
    out.ws_deflate = crate::compress::negotiate_ws(&extensions.join(","));
    Some(Head::Ws(out))
}

/// Appends a repeated header's value to those before it (`sep` between them).
fn join(all: &mut Option<String>, sep: &str, v: &str) {
    match all {
        Some(all) => {
            all.push_str(sep);
            all.push_str(v);
        }
        None => *all = Some(v.to_owned()),
    }
}

/// Reads until the head is complete, over the limit, or the client stopped sending. `None`
/// when the connection closed before sending anything.
async fn read_head(io: &TcpStream, buf: &mut BytesMut) -> io::Result<Option<Head>> {
    loop {
        // Polled rather than `readable()`: no waiter node in the task of every connection.
        std::future::poll_fn(|cx| io.poll_read_ready(cx)).await?;
        match take_some(io, buf) {
            Ok(0) => return Ok((!buf.is_empty()).then_some(Head::Other)),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
        match parse_head(buf) {
            Head::Partial => continue,
            head => return Ok(Some(head)),
        }
    }
}

/// Reads what the socket has (up to [`MAX_HEAD`] in all) through a stack buffer and keeps
/// only those bytes: a connection that trickles its head (a slowloris) or sends nothing holds
/// a few bytes while it waits, not a buffer reserved ahead (a synchronous call, so the stack
/// buffer is not part of the waiting task).
fn take_some(io: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let mut chunk = [0u8; 1024];
    let room = (MAX_HEAD + 1)
        .saturating_sub(buf.len())
        .clamp(1, chunk.len());
    let n = io.try_read(&mut chunk[..room])?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
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
    let head = tokio::time::timeout(Duration::from_secs(head_secs), read_head(&io, &mut buf)).await;
    match head {
        Ok(Ok(Some(Head::Stream(req)))) => {
            drop(buf);
            // Boxed: the opening (token check, slot, catch-up) must not size the task that
            // lives as long as the stream.
            Box::pin(stream(node, io, socket, Box::new(req))).await
        }
        Ok(Ok(Some(Head::Ws(req)))) => {
            drop(buf);
            Box::pin(socket_upgrade(node, io, socket, req)).await
        }
        // The head still incomplete at the deadline (a slow or silent client): closed, with
        // a 408 if it sent anything (actix-http would give it its own timer again).
        Err(_) => {
            if !buf.is_empty() {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    io.write_all(b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"),
                )
                .await;
            }
        }
        // Not a stream: actix-http answers.
        Ok(Ok(Some(_))) => {
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

/// `req` is boxed: the request is dropped before the stream runs, but the task's size is set
/// by everything it holds at any await (see `the_task_of_a_stream_stays_small`).
async fn stream(node: Arc<Node>, io: TcpStream, socket: PeerSocket, req: Box<StreamRequest>) {
    let remote = io.peer_addr().ok();
    let opening = Box::pin(sse::open(
        &node,
        StreamHead {
            query: &req.query,
            origin: req.origin.as_ref(),
            authorization: req.authorization.as_deref(),
            cookie: req.cookie.as_deref(),
            remote,
            forwarded: req.forwarded.as_deref(),
            gzip: req.gzip,
            last_event_id: req.last_event_id.as_deref(),
            socket: Some(socket),
            multiplexed: false,
        },
    ));
    // A client that leaves while its stream opens (Redis slow, a catch-up read) drops the
    // opening at whichever await it is, which releases what it took.
    let opened = tokio::select! {
        biased;
        opened = opening => opened,
        () = client_gone(&io, None) => return,
    };
    match opened {
        Ok(opened) => {
            // Nothing of the request is kept for the stream's life (the task stays small).
            drop(req);
            let head = response_head(opened.allow.as_ref(), opened.gzip);
            run(Writer {
                io,
                body: Some(opened.body),
                pending: head,
                discarded: 0,
            })
            .await
        }
        // Boxed: the refusal's answer must not size the task of every stream.
        Err(e) => Box::pin(refused(io, &node, req, remote, &e)).await,
    }
}

/// Answers a refused stream request: an EventSource refused for a reason that passes is told
/// to come back (a 200, see `sse::refusal_body`); any other gets the status.
async fn refused(
    io: TcpStream,
    node: &Node,
    req: Box<StreamRequest>,
    remote: Option<SocketAddr>,
    e: &ApiError,
) {
    let answer = match sse::come_back(node, e, req.event_stream, req.origin.as_ref()) {
        Some((allow, body)) => {
            let mut answer = BytesMut::from(&response_head(allow.as_ref(), false)[..]);
            answer.extend_from_slice(&body);
            answer.freeze()
        }
        None => error_answer(e).await,
    };
    answer_refusal(io, node, remote, req.forwarded.as_deref(), e, answer).await
}

async fn socket_upgrade(node: Arc<Node>, io: TcpStream, socket: PeerSocket, req: StreamRequest) {
    let head = WsHead {
        query: &req.query,
        origin: req.origin.as_ref(),
        authorization: req.authorization.as_deref(),
        cookie: req.cookie.as_deref(),
        remote: io.peer_addr().ok(),
        forwarded: req.forwarded.as_deref(),
    };
    if let Err(e) = transport::ws::check_origin(&node, &head) {
        return refuse(io, &e).await;
    }
    let opening = Box::pin(transport::ws::open(&node, &head, Some(socket), None));
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
            let accept = req.ws_accept.as_deref().unwrap_or_default();
            let req_deflate = req.ws_deflate.is_some();
            let extensions = match req.ws_deflate {
                Some(answer) => {
                    body.set_deflate();
                    format!("sec-websocket-extensions: {answer}\r\n")
                }
                None => String::new(),
            };
            let head = format!(
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: {accept}\r\n{extensions}\r\n"
            );
            // Nothing of the request is kept for the socket's life (the task stays small).
            drop(req);
            let io = Arc::new(io);
            body.attach(Box::new(DirectWs {
                io: io.clone(),
                deflate: req_deflate,
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
        Err(e) => {
            let answer = error_answer(&e).await;
            answer_refusal(io, &node, head.remote, head.forwarded, &e, answer).await
        }
    }
}

/// Sends a refusal's answer and closes; or, for a per-address refusal (`ip_limit`,
/// `rate_limited`) of an address refused more than a few times a second (see
/// `Addresses::hold`), hands the connection to the held refusals' thread (`crate::held`),
/// which answers it after [`crate::addresses::HOLD`] to twice that. `remote` is the peer as
/// the opening saw it (no second `getpeername` per refusal).
async fn answer_refusal(
    io: TcpStream,
    node: &Node,
    remote: Option<SocketAddr>,
    forwarded: Option<&str>,
    e: &ApiError,
    answer: Bytes,
) {
    if let (true, Some(holding)) = (matches!(e.code, "ip_limit" | "rate_limited"), &node.held) {
        let client = node.addresses.client(remote, forwarded.as_slice());
        let now = std::time::Instant::now();
        if let Some(held) = node.addresses.hold(client, now) {
            let at = node.addresses.held_until(now);
            if let Ok(io) = io.into_std() {
                holding.answer_at(io, answer, at, held);
            }
            return;
        }
    }
    send_and_close(io, &answer).await
}

/// Answers a refused request and closes the connection.
async fn refuse(io: TcpStream, e: &ApiError) {
    send_and_close(io, &error_answer(e).await).await
}

/// `HTTP/1.1 200` with the stream headers. The body is delimited by the connection's close
/// (`Connection: close`, no chunked framing): a stream's connection carries nothing after it.
pub fn response_head(allow: Option<&HeaderValue>, gzip: bool) -> Bytes {
    let mut head = BytesMut::with_capacity(192);
    head.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    for (k, v) in sse::HEADERS {
        head.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if gzip {
        head.extend_from_slice(b"content-encoding: gzip\r\nvary: Accept-Encoding\r\n");
    }
    if let Some(origin) = allow {
        head.extend_from_slice(b"access-control-allow-origin: ");
        head.extend_from_slice(origin.as_bytes());
        head.extend_from_slice(b"\r\nvary: Origin\r\n");
        if crate::http::cors::with_credentials(origin) {
            head.extend_from_slice(b"access-control-allow-credentials: true\r\n");
        }
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

    /// A stream on the front is one boxed future for its whole life: what it holds across its
    /// `run` is memory per stream. 8 more bytes in it once crossed the allocator's size class
    /// (+0.28 KB per idle stream, issue 21's benchmarks): keep it under the bound.
    #[tokio::test]
    async fn the_task_of_a_stream_stays_small() {
        use clap::Parser as _;
        let config = crate::Config::try_parse_from(["hub"]).expect("config");
        let node = Node::new(config).await.expect("node");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (io, _) = listener.accept().await.expect("accept");
        let socket = PeerSocket(io.as_raw_fd());
        let task = stream(node.clone(), io, socket, Box::default());
        let bytes = std::mem::size_of_val(&task);
        drop(task);
        node.stop();
        assert!(
            bytes <= STREAM_TASK_BYTES,
            "the stream's future is {bytes} bytes"
        );
    }

    /// The bound of [`the_task_of_a_stream_stays_small`], as measured in the test (debug)
    /// build: 1,816 bytes (jemalloc's class of 2,048).
    const STREAM_TASK_BYTES: usize = 1816;

    fn head(text: &str) -> Head {
        parse_head(text.as_bytes())
    }

    /// A head that trickles in (a slowloris) is held as the bytes that came, not in a buffer
    /// reserved ahead; the rest completes it.
    #[tokio::test]
    async fn a_trickled_head_holds_only_its_bytes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (io, _) = listener.accept().await.expect("accept");
        client.write_all(b"GET").await.expect("write");
        let mut buf = BytesMut::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while buf.len() < 3 {
            assert!(std::time::Instant::now() < deadline, "3 bytes never read");
            let waiting =
                tokio::time::timeout(Duration::from_millis(20), read_head(&io, &mut buf)).await;
            assert!(waiting.is_err(), "an incomplete head is not a head");
        }
        assert_eq!(&buf[..], b"GET");
        assert!(buf.capacity() < 64, "holds {} bytes", buf.capacity());
        client
            .write_all(b" /v1/sse?channel=public:a HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let head = tokio::time::timeout(Duration::from_secs(10), read_head(&io, &mut buf))
            .await
            .expect("the head completes");
        assert!(matches!(head, Ok(Some(Head::Stream(_)))));
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
