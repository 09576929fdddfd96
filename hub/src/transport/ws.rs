//! The WebSocket transport: `GET /v1/ws` and its JSON frames.
//!
//! The upgrade checks the origin and the token and takes a stream slot; then one task per
//! socket renders the session's items as frames and handles the client's `subscribe` /
//! `unsubscribe` frames through the node's channel-start routine, against the same registry,
//! broker, history and grants as SSE. A bad frame gets an error frame and the socket stays open.

use crate::auth::{Auth, Claims};
use crate::http::error::ApiError;
use crate::http::{bearer, cors};
use crate::metrics::{CloseReason, Transport};
use crate::node::{Node, OpenRequest, StreamGuard, TransportGuard, Want};
use crate::refusal::Refusal;
use crate::session::{Item, Reply};
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{CloseCode, Message as WsMessage};
use bytestring::ByteString;
use protocol::ChannelName;
use serde_json::json;
use std::sync::Arc;

/// Largest frame a client may send; subscribe frames are a few hundred bytes.
pub const MAX_CLIENT_FRAME: usize = 4096;
/// Subscribes with `since` a socket may send at once: each makes the hub read history for it,
/// so a client repeating them must not make the node read without bound. A burst of this many,
/// then [`RESUMES_PER_SEC`]; beyond, an error frame 429.
const RESUME_BURST: f64 = 16.0;
const RESUMES_PER_SEC: f64 = 2.0;

/// A token bucket for one socket's resumes.
struct ResumeBudget {
    tokens: std::cell::Cell<f64>,
    at: std::cell::Cell<std::time::Instant>,
}

impl ResumeBudget {
    fn new() -> Self {
        ResumeBudget {
            tokens: std::cell::Cell::new(RESUME_BURST),
            at: std::cell::Cell::new(std::time::Instant::now()),
        }
    }

    /// Takes one resume if the budget allows it.
    fn take(&self) -> bool {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.at.get()).as_secs_f64() * RESUMES_PER_SEC;
        let tokens = (self.tokens.get() + refill).min(RESUME_BURST);
        self.at.set(now);
        if tokens < 1.0 {
            self.tokens.set(tokens);
            return false;
        }
        self.tokens.set(tokens - 1.0);
        true
    }
}

/// A frame from the client.
#[derive(Debug, serde::Deserialize)]
struct ClientFrame {
    op: String,
    channel: Option<String>,
    since: Option<String>,
}

/// What a client frame asks for.
#[derive(Debug, PartialEq)]
enum Command {
    Subscribe(ChannelName, Option<String>),
    Unsubscribe(ChannelName),
}

/// Why a client frame was refused (an error frame 400, the socket stays open).
#[derive(Debug)]
struct FrameError {
    message: String,
    /// The channel the frame named, when it named one.
    channel: Option<String>,
}

/// Reads a client frame: JSON `{"op":"subscribe"|"unsubscribe","channel":"C","since":"<id>"}`.
fn parse_frame(text: &str) -> Result<Command, FrameError> {
    let err = |message: String, channel: Option<&str>| FrameError {
        message,
        channel: channel.map(str::to_owned),
    };
    let f: ClientFrame = serde_json::from_str(text).map_err(|_| {
        err(
            r#"frames are JSON {"op":"subscribe"|"unsubscribe","channel":"C","since":"<id>"}"#
                .into(),
            None,
        )
    })?;
    let Some(name) = f.channel.as_deref() else {
        return Err(err("channel is required".into(), None));
    };
    let channel =
        ChannelName::new(name).map_err(|e| err(format!("invalid channel: {e}"), Some(name)))?;
    match f.op.as_str() {
        "subscribe" => Ok(Command::Subscribe(channel, f.since)),
        "unsubscribe" => Ok(Command::Unsubscribe(channel)),
        _ => Err(err(
            "op must be subscribe or unsubscribe".into(),
            Some(name),
        )),
    }
}

fn frame(v: serde_json::Value) -> ByteString {
    ByteString::from(v.to_string())
}

/// `{"type":"error","code":N,"message":"...","channel":"C"}` (channel omitted when absent).
pub fn error_frame(code: u16, message: &str, channel: Option<&str>) -> ByteString {
    match channel {
        Some(c) => frame(json!({"type": "error", "code": code, "message": message, "channel": c})),
        None => frame(json!({"type": "error", "code": code, "message": message})),
    }
}

fn reply_frame(reply: &Reply) -> ByteString {
    match reply {
        Reply::Subscribed(c) => frame(json!({"type": "subscribed", "channel": c.as_str()})),
        Reply::Unsubscribed(c) => frame(json!({"type": "unsubscribed", "channel": c.as_str()})),
        Reply::Error {
            code,
            message,
            channel,
        } => error_frame(*code, message, channel.as_deref()),
    }
}

fn close_code(reason: CloseReason) -> CloseCode {
    match reason {
        CloseReason::Shutdown => CloseCode::Restart,
        CloseReason::Slow => CloseCode::Again,
        CloseReason::TokenExpired => CloseCode::Policy,
        CloseReason::Stale => CloseCode::Away,
        CloseReason::Error => CloseCode::Error,
        CloseReason::Client => CloseCode::Normal,
    }
}

/// `GET /v1/ws`.
pub async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    node: web::Data<Node>,
) -> Result<HttpResponse, ApiError> {
    let node = node.into_inner();
    // Another origin: 403. No Origin header (a server-side client): allowed.
    cors::allow_origin(&req, &node.origins).map_err(|r| node.refuse(r))?;
    let query_token = form_urlencoded::parse(req.query_string().as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned());
    let token = bearer(&req).map(str::to_owned).or(query_token);
    let claims = match token {
        None => None,
        Some(t) => match node.auth.verify(&t) {
            Ok(c) => Some(Arc::new(c)),
            Err(why) => {
                return Err(node
                    .refuse(Refusal::unauthorized(format!("invalid token: {why}")))
                    .into())
            }
        },
    };
    let (res, ws, messages) = actix_ws::handle(&req, body).map_err(|e| {
        node.refuse(Refusal::bad_request(format!(
            "not a WebSocket upgrade: {e}"
        )))
    })?;
    let stream = node
        .open(OpenRequest {
            transport: Transport::Ws,
            channels: Vec::new(),
            envelope: false,
            last_event_id: None,
            user: claims.as_ref().map(|c| Arc::from(c.sub.as_str())),
            expires_at: claims.as_ref().map(|c| c.exp),
            socket: req.conn_data::<crate::peer::PeerSocket>().copied(),
        })
        .await?;
    let messages = messages.max_frame_size(MAX_CLIENT_FRAME);
    actix_web::rt::spawn(
        Conn {
            _live: node.track_transport(),
            stream,
            claims,
            resumes: ResumeBudget::new(),
        }
        .run(ws, messages),
    );
    Ok(res)
}

/// One socket's state on the hub side. Dropping it (the task ends) closes the stream.
struct Conn {
    stream: StreamGuard,
    claims: Option<Arc<Claims>>,
    resumes: ResumeBudget,
    /// Counts this socket as alive until its task ends.
    _live: TransportGuard,
}

impl Conn {
    fn node(&self) -> &Arc<Node> {
        self.stream.node()
    }

    async fn run(self, mut ws: actix_ws::Session, mut messages: actix_ws::MessageStream) {
        let session = self.stream.session.clone();
        loop {
            tokio::select! {
                item = std::future::poll_fn(|cx| session.poll_item(cx)) => match item {
                    Some(Item::End(reason)) => {
                        // The hub ended the stream (shutdown, slow, stale, token expired).
                        if reason == CloseReason::TokenExpired {
                            let _ = ws.text(error_frame(401, "the token has expired; reconnect with a fresh one", None)).await;
                        }
                        let _ = ws.close(Some(close_code(reason).into())).await;
                        return;
                    }
                    Some(item) => {
                        session.took(self.node().registry.clock.now());
                        if self.write(&mut ws, item).await.is_err() {
                            break;
                        }
                    }
                    None => return,
                },
                msg = messages.recv() => match msg {
                    None => break,
                    Some(Ok(m)) => {
                        session.touch(self.node().registry.clock.now());
                        match m {
                            WsMessage::Text(t) => self.on_frame(&t).await,
                            WsMessage::Binary(_) => self.reply_error(400, "binary frames are not supported; send JSON text frames", None),
                            WsMessage::Ping(b) if ws.pong(&b).await.is_err() => break,
                            WsMessage::Close(_) => break,
                            _ => {}
                        }
                    }
                    Some(Err(e)) => {
                        // Oversized or broken framing: the byte stream cannot be trusted further.
                        let _ = ws.text(error_frame(413, &format!("frame refused: {e}"), None)).await;
                        let _ = ws.close(Some(CloseCode::Size.into())).await;
                        break;
                    }
                },
            }
        }
        self.stream.close(CloseReason::Client);
    }

    /// Writes one item as frames.
    async fn write(&self, ws: &mut actix_ws::Session, item: Item) -> Result<(), actix_ws::Closed> {
        match item {
            Item::Message(m) => {
                // The frame is built once per message and shared; the text check is the
                // WebSocket library's price for a `ByteString`.
                if let Ok(text) = ByteString::try_from(m.ws_frame()) {
                    ws.text(text).await?;
                }
                let metrics = &self.node().metrics;
                metrics.delivered.increment(1);
                metrics.latency.record(m.received.elapsed().as_secs_f64());
            }
            Item::Reset(reset) => {
                for (c, _) in reset.iter() {
                    ws.text(frame(json!({"type": "reset", "channel": c.as_str()})))
                        .await?;
                }
            }
            Item::Heartbeat => ws.ping(b"").await?,
            Item::Reply(r) => ws.text(reply_frame(&r)).await?,
            Item::Opened(_) | Item::End(_) => {}
        }
        Ok(())
    }

    fn reply(&self, reply: Reply) {
        if self.stream.session.push_reply(reply).is_err() {
            // Sends frames but reads none of the answers.
            self.stream.close(CloseReason::Slow);
        }
    }

    fn reply_error(&self, code: u16, message: &str, channel: Option<&str>) {
        self.reply(Reply::Error {
            code,
            message: message.to_string(),
            channel: channel.map(str::to_owned),
        });
    }

    async fn on_frame(&self, text: &str) {
        match parse_frame(text) {
            Ok(Command::Subscribe(channel, since)) => self.subscribe(channel, since).await,
            Ok(Command::Unsubscribe(channel)) => {
                self.node().drop_channel(&self.stream.session, &channel);
                self.reply(Reply::Unsubscribed(channel));
            }
            Err(e) => self.reply_error(400, &e.message, e.channel.as_deref()),
        }
    }

    async fn subscribe(&self, channel: ChannelName, since: Option<String>) {
        let name = channel.as_str();
        if let Err(r) = Auth::check(self.claims.as_deref(), name) {
            return self.reply_error(r.status(), &r.message, Some(name));
        }
        let session = &self.stream.session;
        let max = self.node().config.max_channels_per_conn as usize;
        if session.channel_count() >= max {
            return self.reply_error(
                400,
                &format!("at most {max} channels per connection (HUB_MAX_CHANNELS_PER_CONN)"),
                Some(name),
            );
        }
        if since.is_some() && !self.resumes.take() {
            return self.reply_error(
                429,
                &format!(
                    "too many subscribes with since on this socket: at most {RESUME_BURST} at once, then {RESUMES_PER_SEC} a second"
                ),
                Some(name),
            );
        }
        if !session.add_channel(channel.clone()) {
            // Already subscribed: say so again.
            return self.reply(Reply::Subscribed(channel));
        }
        // An id that cannot be read is a reset, as on SSE.
        let want = match since.as_deref().map(str::parse) {
            None => Want::Fresh,
            Some(Ok(p)) => Want::After(p),
            Some(Err(_)) => Want::Reset,
        };
        let subscribed = Reply::Subscribed(channel.clone());
        let started = self
            .node()
            .start_channels(session, vec![(channel.clone(), want)], |_| {
                vec![Item::Reply(Box::new(subscribed))]
            })
            .await;
        if let Err(r) = started {
            self.node().drop_channel(session, &channel);
            self.reply_error(r.status(), &r.message, Some(name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames() {
        assert_eq!(
            parse_frame(r#"{"op":"subscribe","channel":"public:a","since":"5-0"}"#).unwrap(),
            Command::Subscribe(ChannelName::new("public:a").unwrap(), Some("5-0".into()))
        );
        assert_eq!(
            parse_frame(r#"{"op":"unsubscribe","channel":"a"}"#).unwrap(),
            Command::Unsubscribe(ChannelName::new("a").unwrap())
        );
        let e = parse_frame(r#"{"op":"jump","channel":"a"}"#).unwrap_err();
        assert_eq!(e.channel.as_deref(), Some("a"));
        assert!(parse_frame(r#"{"op":"subscribe"}"#).is_err());
        assert!(parse_frame(r#"{"op":"subscribe","channel":"a b"}"#).is_err());
        assert!(parse_frame("not json").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        /// Any text a client sends is a command or an error, never a panic; an error names
        /// the channel only as the client wrote it.
        #[test]
        fn any_text_is_a_command_or_an_error(text in "\\PC{0,80}|\\{\"op\":\"[a-z]{0,12}\",\"channel\":\"\\PC{0,20}\"(,\"since\":\"[0-9a-z-]{0,20}\")?\\}") {
            match parse_frame(&text) {
                Ok(Command::Subscribe(c, _)) | Ok(Command::Unsubscribe(c)) => {
                    prop_assert!(ChannelName::new(c.as_str()).is_ok());
                }
                Err(e) => {
                    if let Some(c) = e.channel {
                        prop_assert!(text.contains(&c) || text.contains('\\'));
                    }
                }
            }
        }

        /// A well-formed frame reads back as what was written.
        #[test]
        fn frames_round_trip(
            sub in any::<bool>(),
            name in "[a-zA-Z0-9_:.-]{1,64}",
            since in proptest::option::of("[0-9]{1,14}-[0-9]{1,4}"),
        ) {
            let op = if sub { "subscribe" } else { "unsubscribe" };
            let text = serde_json::json!({"op": op, "channel": name, "since": since}).to_string();
            let want = match ChannelName::new(&name) {
                Ok(c) if sub => Command::Subscribe(c, since),
                Ok(c) => Command::Unsubscribe(c),
                Err(_) => return Ok(()),
            };
            prop_assert_eq!(parse_frame(&text).unwrap(), want);
        }
    }
}
