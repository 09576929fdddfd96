//! The WebSocket transport: `GET /v1/ws` and its JSON frames.
//!
//! The upgrade checks the origin and the token and takes a stream slot; then one task per
//! socket moves frames from the session's bounded outbox to the socket and handles the
//! client's `subscribe`/`unsubscribe` frames against the same registry, broker, history and
//! grants as SSE. A bad frame gets an error frame and the socket stays open.

use crate::auth::{Claims, PUBLIC_PREFIX};
use crate::http::error::ApiError;
use crate::http::{bearer, cors};
use crate::metrics::{CloseReason, RejectReason, Transport};
use crate::node::{Node, OpenRequest, TransportGuard};
use crate::session::{Offer, Session, Start};
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{CloseCode, Message as WsMessage};
use bytes::Bytes;
use bytestring::ByteString;
use protocol::{ChannelName, StreamId};
use serde_json::json;
use std::sync::Arc;

/// Largest frame a client may send; subscribe frames are a few hundred bytes.
pub const MAX_CLIENT_FRAME: usize = 4096;

/// A frame from the client.
#[derive(Debug, serde::Deserialize)]
struct ClientFrame {
    op: String,
    channel: Option<String>,
    since: Option<String>,
}

fn frame(v: serde_json::Value) -> Bytes {
    Bytes::from(v.to_string())
}

/// `{"type":"error","code":N,"message":"...","channel":"C"}` (channel omitted when absent).
pub fn error_frame(code: u16, message: &str, channel: Option<&str>) -> Bytes {
    match channel {
        Some(c) => frame(json!({"type": "error", "code": code, "message": message, "channel": c})),
        None => frame(json!({"type": "error", "code": code, "message": message})),
    }
}

/// `{"type":"reset","channel":"C"}` for each channel whose history no longer reaches back
/// (a single frame: callers reset one channel at a time).
pub fn reset_frame(reset: &[ChannelName]) -> Bytes {
    let c = reset.first().map(|c| c.as_str()).unwrap_or_default();
    frame(json!({"type": "reset", "channel": c}))
}

/// The frame before the close, if the reason has one.
pub fn last_frame(reason: CloseReason) -> Option<Bytes> {
    match reason {
        CloseReason::TokenExpired => Some(error_frame(
            401,
            "the token has expired; reconnect with a fresh one",
            None,
        )),
        _ => None,
    }
}

fn close_code(reason: Option<CloseReason>) -> CloseCode {
    match reason {
        Some(CloseReason::Shutdown) => CloseCode::Restart,
        Some(CloseReason::Slow) => CloseCode::Again,
        Some(CloseReason::TokenExpired) => CloseCode::Policy,
        Some(CloseReason::Stale) => CloseCode::Away,
        Some(CloseReason::Error) => CloseCode::Error,
        Some(CloseReason::Client) | None => CloseCode::Normal,
    }
}

/// `GET /v1/ws`.
pub async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    node: web::Data<Node>,
) -> Result<HttpResponse, ApiError> {
    let node = node.into_inner();
    let refuse = |reason: RejectReason, e: ApiError| {
        node.metrics.rejected(reason).increment(1);
        e
    };
    // Another origin: 403. No Origin header (a server-side client): allowed.
    cors::allow_origin(&req, &node.origins).map_err(|e| refuse(RejectReason::Forbidden, e))?;
    let query_token = form_urlencoded::parse(req.query_string().as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned());
    let token = bearer(&req).map(str::to_owned).or(query_token);
    let claims = match token {
        None => None,
        Some(t) => match node.auth.verify(&t) {
            Ok(c) => Some(Arc::new(c)),
            Err(why) => {
                return Err(refuse(
                    RejectReason::Unauthorized,
                    ApiError::unauthorized(format!("invalid token: {why}")),
                ))
            }
        },
    };
    let (res, ws, stream) = actix_ws::handle(&req, body).map_err(|e| {
        refuse(
            RejectReason::BadRequest,
            ApiError::bad_request(format!("not a WebSocket upgrade: {e}")),
        )
    })?;
    let session = node
        .open(OpenRequest {
            transport: Transport::Ws,
            channels: Vec::new(),
            envelope: false,
            last_event_id: None,
            user: claims.as_ref().map(|c| Arc::from(c.sub.as_str())),
            expires_at: claims.as_ref().map(|c| c.exp),
        })
        .await
        .map_err(|r| r.error)?;
    let stream = stream.max_frame_size(MAX_CLIENT_FRAME);
    actix_web::rt::spawn(
        Conn {
            _live: node.track_transport(),
            node,
            session,
            claims,
        }
        .run(ws, stream),
    );
    Ok(res)
}

/// One socket's state on the hub side.
struct Conn {
    node: Arc<Node>,
    session: Arc<Session>,
    claims: Option<Arc<Claims>>,
    /// Counts this socket as alive until its task ends.
    _live: TransportGuard,
}

impl Conn {
    async fn run(self, mut ws: actix_ws::Session, mut stream: actix_ws::MessageStream) {
        loop {
            tokio::select! {
                chunk = std::future::poll_fn(|cx| self.session.poll_chunk(cx)) => match chunk {
                    Some(c) => {
                        let sent = if c.ping {
                            ws.ping(b"").await
                        } else {
                            match ByteString::try_from(c.bytes) {
                                Ok(text) => ws.text(text).await,
                                Err(_) => Ok(()),
                            }
                        };
                        if sent.is_err() {
                            break;
                        }
                        if let Some(t) = c.published {
                            self.node.metrics.delivered.increment(1);
                            self.node.metrics.latency.record(t.elapsed().as_secs_f64());
                        }
                    }
                    None => {
                        // The hub ended the stream (shutdown, slow, stale, token expired).
                        let code = close_code(self.session.close_reason());
                        let _ = ws.close(Some(code.into())).await;
                        return;
                    }
                },
                msg = stream.recv() => match msg {
                    None => break,
                    Some(Ok(m)) => {
                        self.session.touch(self.node.registry.clock.now());
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
                        let _ = ws.text(ByteString::from(String::from_utf8_lossy(&error_frame(413, &format!("frame refused: {e}"), None)).into_owned())).await;
                        let _ = ws.close(Some(CloseCode::Size.into())).await;
                        break;
                    }
                },
            }
        }
        self.node.close(&self.session, CloseReason::Client);
    }

    fn reply(&self, bytes: Bytes) {
        if self.session.push_frame(bytes) == Offer::Full {
            self.node.close(&self.session, CloseReason::Slow);
        }
    }

    fn reply_error(&self, code: u16, message: &str, channel: Option<&str>) {
        self.reply(error_frame(code, message, channel));
    }

    async fn on_frame(&self, text: &str) {
        let f: ClientFrame = match serde_json::from_str(text) {
            Ok(f) => f,
            Err(_) => return self.reply_error(
                400,
                r#"frames are JSON {"op":"subscribe"|"unsubscribe","channel":"C","since":"<id>"}"#,
                None,
            ),
        };
        let Some(name) = f.channel.as_deref() else {
            return self.reply_error(400, "channel is required", None);
        };
        let channel = match ChannelName::new(name) {
            Ok(c) => c,
            Err(e) => return self.reply_error(400, &format!("invalid channel: {e}"), Some(name)),
        };
        match f.op.as_str() {
            "subscribe" => self.subscribe(channel, f.since).await,
            "unsubscribe" => {
                self.node.registry.remove_channel(&self.session, &channel);
                self.reply(frame(
                    json!({"type": "unsubscribed", "channel": channel.as_str()}),
                ));
            }
            _ => self.reply_error(400, "op must be subscribe or unsubscribe", Some(name)),
        }
    }

    async fn subscribe(&self, channel: ChannelName, since: Option<String>) {
        let name = channel.as_str();
        if !name.starts_with(PUBLIC_PREFIX) {
            match &self.claims {
                None => {
                    return self.reply_error(
                        401,
                        "this channel needs a token, given at the upgrade",
                        Some(name),
                    )
                }
                Some(c) if !c.grants(name) => {
                    return self.reply_error(
                        403,
                        "the token does not grant this channel",
                        Some(name),
                    )
                }
                Some(_) => {}
            }
        }
        let max = self.node.config.max_channels_per_conn as usize;
        if self.session.channel_count() >= max {
            return self.reply_error(
                400,
                &format!("at most {max} channels per connection (HUB_MAX_CHANNELS_PER_CONN)"),
                Some(name),
            );
        }
        if !self.session.add_channel(channel.clone()) {
            // Already subscribed: say so again.
            return self.reply(frame(json!({"type": "subscribed", "channel": name})));
        }
        if !self.node.registry.add_channel(&self.session, &channel) {
            return;
        }
        let failed = |e: crate::broker::BrokerError| {
            tracing::warn!(channel = name, error = %e, "subscribe failed");
            self.node.registry.remove_channel(&self.session, &channel);
            self.reply_error(503, "the broker is unavailable; try again", Some(name));
        };
        if let Err(e) = self
            .node
            .broker
            .subscribe(std::slice::from_ref(&channel))
            .await
        {
            return failed(e);
        }
        let asked = since.as_deref().map(|s| s.parse::<StreamId>().ok());
        let rec = match self.node.broker.recover(&channel, asked.flatten()).await {
            Ok(r) => r,
            Err(e) => return failed(e),
        };
        let unreadable = matches!(asked, Some(None));
        let mut head = vec![frame(json!({"type": "subscribed", "channel": name}))];
        let (position, replay) = if rec.reset || unreadable {
            head.push(reset_frame(std::slice::from_ref(&channel)));
            (rec.tail, Vec::new())
        } else {
            (asked.flatten().unwrap_or(rec.tail), rec.replay)
        };
        match self.session.start_channel(
            name,
            Start {
                head,
                positions: vec![position],
                replay,
            },
        ) {
            Ok(n) => self.node.metrics.history_replayed.increment(n as u64),
            Err(_) => {
                self.node.close(&self.session, CloseReason::Slow);
            }
        }
    }
}
