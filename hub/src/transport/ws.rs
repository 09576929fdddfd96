//! The WebSocket transport: `GET /v1/ws` and its JSON frames.
//!
//! The upgrade checks the origin and the token and takes a stream slot. The socket is then one
//! pull-based response body, like an SSE stream: no task and no channel of its own. When the
//! connection can take bytes, the body reads the client's frames (`subscribe` / `unsubscribe`
//! through the node's channel-start routine, pings, close) and writes the session's items; a
//! message's frame is built once (`Message::ws_frame`) and the same bytes go to every socket.
//! On the public port's front, while the body has nothing to write, the fan-out writes those
//! bytes to the socket itself (`stream::DirectSink`); the body unparks before writing its own.
//! A bad frame gets an error frame and the socket stays open; what a client can make the body
//! hold is bounded (one frame of [`MAX_CLIENT_FRAME`] being read, one subscribe at a time).

use crate::auth::Claims;
use crate::compress;
use crate::domain::{CloseReason, Transport};
use crate::http::cors;
use crate::http::error::ApiError;
use crate::node::{Node, OpenRequest, StreamGuard, TransportGuard};
use crate::refusal::Refusal;
use crate::stream::{Item, Reply, Session};
use crate::transport::credentials::{self, Credentials};
use crate::transport::ws_frames::{
    close_code, error_frame, reply_frame, text, Budget, DISCONNECT_CODE,
};
use actix_codec::Decoder;
use actix_http::ws::{Codec, Frame, ProtocolError};
use actix_web::body::{BodySize, MessageBody};
use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use protocol::ws::{self as wire, OpCode};
use serde_json::json;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Largest frame a client may send; subscribe frames are a few hundred bytes.
pub const MAX_CLIENT_FRAME: usize = 4096;
/// Subscribes with `since` a socket may send at once: each makes the hub read history for it,
/// so a client repeating them must not make the node read without bound. A burst of this many,
/// then [`RESUMES_PER_SEC`]; beyond, an error frame 429.
pub(super) const RESUME_BURST: f64 = 16.0;
pub(super) const RESUMES_PER_SEC: f64 = 2.0;
/// Token refreshes a socket may send at once, then [`REFRESHES_PER_SEC`]: each verifies a
/// signature (RS256/ES256 cost tens of microseconds), and a client needs one per token lifetime.
pub(super) const REFRESH_BURST: f64 = 4.0;
pub(super) const REFRESHES_PER_SEC: f64 = 0.2;
/// Pongs owed to a client's pings; beyond, older pings go unanswered (RFC 6455 allows
/// answering only the latest).
const PONGS_OWED: usize = 4;

/// What an upgrade request says, from whichever HTTP front read it.
pub struct WsHead<'a> {
    /// The query string, without `?`.
    pub query: &'a str,
    pub origin: Option<&'a HeaderValue>,
    /// The `Authorization` header, if sent.
    pub authorization: Option<&'a str>,
    /// The `Cookie` header(s), joined.
    pub cookie: Option<&'a str>,
    /// The peer's address.
    pub remote: Option<std::net::SocketAddr>,
    /// The `X-Forwarded-For` header(s), joined (believed only from `HUB_TRUSTED_PROXIES`).
    pub forwarded: Option<&'a str>,
}

/// The origin check of an upgrade: another origin is 403; no `Origin` header (a server-side
/// client) is allowed.
pub fn check_origin(node: &Arc<Node>, head: &WsHead<'_>) -> Result<(), ApiError> {
    cors::allow_origin(head.origin, &node.origins).map_err(|r| node.refuse(r))?;
    Ok(())
}

/// Authorizes an upgrade whose origin passed (its token, else the backend's hook) and takes a
/// stream slot. `input` is the client's bytes as actix reads them, or `None` when the caller
/// feeds them ([`WsBody::feed`]). Cancel-safe: a client that goes away holds nothing.
pub async fn open(
    node: &Arc<Node>,
    head: &WsHead<'_>,
    socket: Option<crate::peer::PeerSocket>,
    input: Option<web::Payload>,
) -> Result<WsBody, ApiError> {
    // The client's address first: a flood is refused before anything else is looked at.
    let place = node.admit_address(head.remote, head.forwarded)?;
    let query_token = form_urlencoded::parse(head.query.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned());
    let creds = Credentials {
        authorization: head.authorization,
        query_token: query_token.as_deref(),
        cookie: head.cookie,
        origin: head.origin.and_then(|o| o.to_str().ok()),
        remote: head.remote,
    };
    let grant = credentials::grant(node, &[], Transport::Ws, &creds)
        .await
        .map_err(|r| node.refuse(r))?;
    let token = grant.token_id();
    let stream = node
        .open(OpenRequest {
            transport: Transport::Ws,
            channels: Vec::new(),
            envelope: false,
            last_event_id: None,
            user: grant.user,
            expires_at: grant.expires_at,
            token,
            socket,
            rewind: 0,
            presence: false,
            multiplexed: false,
            place,
        })
        .await?;
    Ok(WsBody {
        _live: node.track_transport(),
        stream,
        claims: grant.claims,
        resumes: Budget::new(RESUME_BURST, RESUMES_PER_SEC),
        refreshes: Budget::new(REFRESH_BURST, REFRESHES_PER_SEC),
        input,
        read: BytesMut::new(),
        codec: Codec::new().max_size(MAX_CLIENT_FRAME),
        subscribing: None,
        pongs: Vec::new(),
        state: State::Open,
        deflate: false,
        compressed: false,
    })
}

/// `GET /v1/ws` through actix's router (the public port's front upgrades plain requests
/// itself and hands only the others here).
pub async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    node: web::Data<Node>,
) -> Result<HttpResponse, ApiError> {
    let node = node.into_inner();
    let cookie = crate::http::cookies(&req);
    let forwarded = crate::http::forwarded_for(&req);
    let head = WsHead {
        query: req.query_string(),
        origin: req.headers().get(header::ORIGIN),
        authorization: crate::http::authorization(&req),
        cookie: cookie.as_deref(),
        remote: req.peer_addr(),
        forwarded: forwarded.as_deref(),
    };
    check_origin(&node, &head)?;
    let mut res = actix_http::ws::handshake(req.head()).map_err(|e| {
        node.refuse(Refusal::bad_request(format!(
            "not a WebSocket upgrade: {e}"
        )))
    })?;
    let socket = req.conn_data::<crate::peer::PeerSocket>().copied();
    let mut body = open(&node, &head, socket, Some(body)).await?;
    if let Some(answer) = deflate_offer(&req) {
        res.insert_header((header::SEC_WEBSOCKET_EXTENSIONS, answer));
        body.set_deflate();
    }
    Ok(res.body(body).map_into_boxed_body().into())
}

/// The `permessage-deflate` answer to a request's offers (every `Sec-WebSocket-Extensions`
/// header), if it made one the hub accepts.
fn deflate_offer(req: &HttpRequest) -> Option<&'static str> {
    let offers: Vec<&str> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .filter_map(|v| v.to_str().ok())
        .collect();
    compress::negotiate_ws(&offers.join(","))
}

/// Where a socket is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// The client's input ended or broke: write what the session still has, then end.
    InputDone,
    /// The close frame is written: the body ends.
    Closed,
}

/// One socket: the response body. Dropping it (client gone, server stopping) drops the stream
/// guard, which closes the stream with reason `client` unless it was already closed.
pub struct WsBody {
    pub(super) stream: StreamGuard,
    pub(super) claims: Option<Arc<Claims>>,
    pub(super) resumes: Budget,
    pub(super) refreshes: Budget,
    /// The client's bytes (when actix reads them; the front feeds them instead), and what of
    /// them is not yet a whole frame.
    input: Option<web::Payload>,
    read: BytesMut,
    codec: Codec,
    /// A subscribe being started (history, Redis); client frames wait behind it.
    pub(super) subscribing: Option<Pin<Box<dyn Future<Output = ()>>>>,
    /// Pong frames owed, at most [`PONGS_OWED`].
    pongs: Vec<Bytes>,
    state: State,
    /// The socket negotiated `permessage-deflate` (see [`WsBody::set_deflate`]).
    deflate: bool,
    /// The frame being decoded came with RSV1: its payload is compressed.
    compressed: bool,
    /// Counts this socket as alive until the HTTP server drops the body.
    _live: TransportGuard,
}

impl WsBody {
    pub(super) fn node(&self) -> &Arc<Node> {
        self.stream.node()
    }

    pub(super) fn session(&self) -> &Arc<Session> {
        &self.stream.session
    }

    pub(super) fn reply(&self, reply: Reply) {
        reply_to(&self.stream.session, self.node(), reply);
    }

    pub(super) fn reply_error(&self, code: u16, message: &str, channel: Option<&str>) {
        self.reply(Reply::Error {
            code,
            message: message.to_string(),
            channel: channel.map(str::to_owned),
        });
    }

    /// Reads and handles the client's frames until none is whole, a subscribe must wait for
    /// Redis, or the input ends. `Some(bytes)` is a frame to write at once (a refusal that
    /// ends the socket).
    fn poll_input(&mut self, cx: &mut Context<'_>) -> Option<Bytes> {
        loop {
            if let Some(f) = self.subscribing.as_mut() {
                if f.as_mut().poll(cx).is_pending() {
                    return None;
                }
                self.subscribing = None;
            }
            // A frame declared over the limit is refused from its header: waiting for its
            // payload would make the socket hold it.
            if wire::declared_len(&self.read).is_some_and(|n| n > MAX_CLIENT_FRAME as u64) {
                return Some(self.refuse_input(&ProtocolError::Overflow));
            }
            // RSV1 (a compressed message) is this socket's to read; the codec refuses it, so
            // it is noted and cleared before the codec sees the frame's header.
            if self.deflate {
                if let Some(first) = self.read.first_mut() {
                    if *first & 0x40 != 0 {
                        *first &= !0x40;
                        self.compressed = true;
                    }
                }
            }
            match self.codec.decode(&mut self.read) {
                Ok(Some(frame)) => {
                    let now = self.node().registry.clock.now();
                    self.session().touch(now);
                    let frame = match std::mem::take(&mut self.compressed) {
                        false => frame,
                        true => match frame {
                            Frame::Text(t) => match compress::inflate_ws(&t, MAX_CLIENT_FRAME) {
                                Some(plain) => Frame::Text(Bytes::from(plain)),
                                None => return Some(self.refuse_input(&ProtocolError::Overflow)),
                            },
                            // Only a message's data may be compressed.
                            _ => return Some(self.refuse_input(&ProtocolError::Overflow)),
                        },
                    };
                    self.on_frame(frame);
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Some(self.refuse_input(&e)),
            }
            if self.state != State::Open {
                return None;
            }
            // No input of its own: the front feeds the bytes.
            let input = self.input.as_mut()?;
            match Pin::new(input).poll_next(cx) {
                Poll::Ready(Some(Ok(bytes))) => self.read.extend_from_slice(&bytes),
                Poll::Ready(Some(Err(_))) | Poll::Ready(None) => {
                    self.input_ended();
                    return None;
                }
                Poll::Pending => return None,
            }
        }
    }

    /// Whether the body takes more of the client's bytes now: while open, and while what it
    /// holds unread is under two frames (a client that sends faster than its frames are
    /// handled, or during a subscribe, waits in its socket).
    pub fn wants_input(&self) -> bool {
        self.state == State::Open && self.read.len() < 2 * MAX_CLIENT_FRAME
    }

    /// The socket negotiated `permessage-deflate`: messages of `HUB_COMPRESS_MIN_BYTES` or
    /// more go out compressed, and the client's compressed frames are inflated.
    pub fn set_deflate(&mut self) {
        self.deflate = true;
    }

    /// Lets the fan-out write live messages to the socket while the writer is parked.
    pub fn attach(&self, sink: Box<dyn crate::stream::DirectSink>) {
        self.session().attach(sink);
    }

    /// The writer has nothing to write and waits (see `Session::park`).
    pub fn park(&self) {
        self.session().park();
    }

    /// The client's bytes, read by the caller; handled at the next `poll_next`.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.read.extend_from_slice(bytes);
    }

    /// The client is gone (or its bytes are): nothing more will be read.
    pub fn input_ended(&mut self) {
        self.state = State::InputDone;
        self.stream.close(CloseReason::Client);
    }

    /// Oversized or broken framing: the byte stream cannot be trusted further.
    fn refuse_input(&mut self, e: &ProtocolError) -> Bytes {
        self.state = State::Closed;
        self.stream.close(CloseReason::Client);
        let mut out = BytesMut::new();
        out.extend_from_slice(&error_frame(413, &format!("frame refused: {e}"), None));
        out.extend_from_slice(&wire::close(1009, "frame refused"));
        out.freeze()
    }

    fn on_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Text(t) => match std::str::from_utf8(&t) {
                Ok(t) => self.on_text(t),
                Err(_) => self.reply_error(400, "text frames must be UTF-8", None),
            },
            Frame::Binary(_) | Frame::Continuation(_) => self.reply_error(
                400,
                "binary and fragmented frames are not supported; send JSON text frames",
                None,
            ),
            Frame::Ping(p) => {
                if self.pongs.len() >= PONGS_OWED {
                    self.pongs.remove(0);
                }
                self.pongs.push(wire::frame(OpCode::Pong, &p));
            }
            Frame::Pong(_) => {}
            Frame::Close(_) => {
                // The client closes: answer with a close frame, then end.
                self.state = State::InputDone;
                self.stream.close(CloseReason::Client);
            }
        }
    }

    /// The bytes of one item, or `None` for items a socket does not write.
    fn render(&mut self, item: Item) -> Option<Bytes> {
        match item {
            Item::Message(m) => {
                let metrics = &self.node().metrics;
                metrics.delivered.increment(1);
                metrics.latency.record(m.received.elapsed().as_secs_f64());
                let min = self.node().config.compress_min_bytes as usize;
                Some(m.ws_frame_for(self.deflate, min))
            }
            Item::Reset(reset) => {
                let mut out = BytesMut::new();
                for (c, _) in reset.iter() {
                    out.extend_from_slice(&text(json!({"type": "reset", "channel": c.as_str()})));
                }
                Some(out.freeze())
            }
            Item::Heartbeat => Some(Bytes::from_static(wire::PING)),
            Item::Reply(r) => Some(reply_frame(&r)),
            Item::Presence(ev) => Some(text(json!({
                "type": if ev.join { "join" } else { "leave" },
                "channel": ev.channel.as_str(),
                "sub": &*ev.sub,
            }))),
            Item::Present(p) => Some(text(json!({
                "type": "presence",
                "channel": p.channel.as_str(),
                "users": p.users.iter().map(|u| &**u).collect::<Vec<&str>>(),
            }))),
            Item::Opened(_) => None,
            Item::Raw(bytes) => Some(bytes),
            Item::Disconnect(note) => Some(error_frame(DISCONNECT_CODE, &note, None)),
            Item::End(reason) => {
                // The hub ended the stream (shutdown, slow, stale, token expired, the client's
                // close).
                self.state = State::Closed;
                let mut out = BytesMut::new();
                if reason == CloseReason::TokenExpired {
                    out.extend_from_slice(&error_frame(
                        401,
                        "the token has expired; reconnect with a fresh one",
                        None,
                    ));
                }
                out.extend_from_slice(&wire::close(close_code(reason), ""));
                Some(out.freeze())
            }
        }
    }
}

/// Queues a reply; a client that sends frames but reads none of the answers is closed `slow`.
pub(super) fn reply_to(session: &Arc<Session>, node: &Arc<Node>, reply: Reply) {
    if session.push_reply(reply).is_err() {
        node.close(session, CloseReason::Slow);
    }
}

impl Drop for WsBody {
    fn drop(&mut self) {
        // The socket closes with the connection: nothing may write through the sink after.
        self.stream.session.detach();
    }
}

impl MessageBody for WsBody {
    type Error = std::convert::Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = &mut *self;
        if this.state == State::Closed {
            return Poll::Ready(None);
        }
        // Frames of its own (not from the session's queue) stop the fan-out's direct writes
        // first (see `Session::park`), and follow the rest of a frame the fan-out cut.
        let last = this.poll_input(cx);
        if last.is_some() || !this.pongs.is_empty() {
            let mut out = BytesMut::new();
            if let Some(rest) = this.session().unpark() {
                out.extend_from_slice(&rest);
            }
            for p in this.pongs.drain(..) {
                out.extend_from_slice(&p);
            }
            if let Some(last) = last {
                out.extend_from_slice(&last);
            }
            return Poll::Ready(Some(Ok(out.freeze())));
        }
        loop {
            let item = match this.stream.session.poll_item(cx) {
                Poll::Ready(Some(item)) => item,
                Poll::Ready(None) => {
                    // Ended and drained without an End item: close now (`poll_item` unparked).
                    this.state = State::Closed;
                    return Poll::Ready(Some(Ok(wire::close(1000, ""))));
                }
                Poll::Pending => return Poll::Pending,
            };
            let now = this.node().registry.clock.now();
            this.stream.session.took(now);
            if let Some(bytes) = this.render(item) {
                return Poll::Ready(Some(Ok(bytes)));
            }
        }
    }
}

/// The body against a real in-process node, with a sink standing in for a socket that takes
/// only part of a frame.
#[cfg(test)]
mod body_tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
    use super::*;
    use crate::message::Message;
    use crate::stream::{DirectSink, Sent};
    use clap::Parser as _;
    use protocol::{ChannelName, Envelope, StreamId};
    use std::task::Waker;
    use std::time::{Duration, Instant};

    /// Takes the first [`Cut::TAKES`] bytes of each frame offered, as a full socket would.
    struct Cut(Arc<parking_lot::Mutex<Vec<u8>>>);

    impl Cut {
        const TAKES: usize = 10;
    }

    impl DirectSink for Cut {
        fn send(&self, msg: &Message, _: &Session) -> Sent {
            let frame = msg.ws_frame();
            self.0.lock().extend_from_slice(&frame[..Self::TAKES]);
            Sent::Part(frame.slice(Self::TAKES..))
        }
    }

    /// A client frame (masked with a zero key, which leaves the payload as it is).
    fn client_frame(op: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mut f = vec![0x80 | op, 0x80 | payload.len() as u8, 0, 0, 0, 0];
        f.extend_from_slice(payload);
        f
    }

    /// What the body writes now, without waiting.
    fn now(body: &mut WsBody) -> Option<Bytes> {
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(body).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(b))) => Some(b),
            _ => None,
        }
    }

    /// The next bytes the body writes, within a bounded wait.
    async fn next(body: &mut WsBody) -> Bytes {
        let polled = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_next(cx));
        match tokio::time::timeout(Duration::from_secs(10), polled).await {
            Ok(Some(Ok(b))) => b,
            other => panic!("the body wrote nothing: {other:?}"),
        }
    }

    /// Issue 21, defect 2: a ping read while the rest of a frame the fan-out cut was queued
    /// had its pong written inside that frame, and the client saw a corrupt stream.
    #[tokio::test]
    async fn a_pong_waits_for_the_rest_of_a_frame_the_fanout_cut() {
        let node = Node::new(crate::Config::try_parse_from(["hub"]).unwrap())
            .await
            .unwrap();
        let head = WsHead {
            query: "",
            origin: None,
            authorization: None,
            cookie: None,
            remote: None,
            forwarded: None,
        };
        let mut body = open(&node, &head, None, None).await.unwrap();
        let written = Arc::new(parking_lot::Mutex::new(Vec::new()));
        body.attach(Box::new(Cut(written.clone())));
        body.feed(&client_frame(
            0x1,
            br#"{"op":"subscribe","channel":"public:cut"}"#,
        ));
        let reply = next(&mut body).await;
        assert!(
            String::from_utf8_lossy(&reply).contains(r#""type":"subscribed""#),
            "{reply:?}"
        );
        assert_eq!(now(&mut body), None, "nothing else to write");
        body.park();

        let env = Envelope {
            event: None,
            data: serde_json::json!("x".repeat(40)),
        };
        let channel = ChannelName::new("public:cut").unwrap();
        let msg = Arc::new(Message::new(
            channel,
            Some(StreamId::new(u64::MAX / 2, 0)),
            &env,
            Instant::now(),
        ));
        assert_eq!(node.registry.fanout(&msg), 1);
        let frame = msg.ws_frame();
        assert_eq!(
            *written.lock(),
            frame[..Cut::TAKES],
            "the socket took part of it"
        );

        // The client pings before the rest is written.
        body.feed(&client_frame(0x9, b"hi"));
        let mut out = Vec::new();
        while let Some(b) = now(&mut body) {
            out.extend_from_slice(&b);
        }
        let pong = wire::frame(OpCode::Pong, b"hi");
        let mut want = frame[Cut::TAKES..].to_vec();
        want.extend_from_slice(&pong);
        assert_eq!(out, want, "the frame's rest, then the pong");
        node.stop();
    }
}
