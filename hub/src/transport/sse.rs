//! The SSE transport: `GET /v1/sse`, its frames, and the response body that drains a session.
//!
//! It parses and checks the request (channels, limits, origin, token) before any slot is
//! taken, then hands a session to actix as a streaming body. The body only pulls from the
//! session's outbox; it never waits on other streams, and dropping it closes the session.

use crate::http::error::ApiError;
use crate::http::{bearer, cors};
use crate::metrics::{CloseReason, RejectReason, Transport};
use crate::node::{Node, OpenRequest, TransportGuard};
use crate::session::Session;
use actix_web::body::{BodySize, MessageBody};
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use protocol::{sse, ChannelName, StreamId};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Hub event names (never usable by publishers: `hub.` is reserved).
pub const EVENT_CONNECTED: &str = "hub.connected";
pub const EVENT_RESET: &str = "hub.reset";
pub const EVENT_RECONNECT: &str = "hub.reconnect";

/// The query of a stream request.
#[derive(Debug, Default, PartialEq)]
pub struct StreamQuery {
    pub channels: Vec<String>,
    pub envelope: bool,
    pub last_event_id: Option<String>,
    pub token: Option<String>,
}

/// Parses `channel=A&channel=B&envelope=true&last_event_id=..&lastEventId=..&token=..`.
/// Unknown parameters (cache busters) are ignored.
pub fn parse_query(query: &str) -> Result<StreamQuery, ApiError> {
    let mut q = StreamQuery::default();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "channel" => q.channels.push(v.into_owned()),
            "envelope" => {
                q.envelope = match &*v {
                    "true" | "1" => true,
                    "false" | "0" | "" => false,
                    _ => return Err(ApiError::bad_request("envelope must be true or false")),
                }
            }
            "last_event_id" | "lastEventId" => q.last_event_id = Some(v.into_owned()),
            "token" => q.token = Some(v.into_owned()),
            _ => {}
        }
    }
    Ok(q)
}

/// Validates, sorts and deduplicates the channel list against the per-stream limit.
pub fn check_channels(names: &[String], max: usize) -> Result<Vec<ChannelName>, ApiError> {
    if names.is_empty() {
        return Err(ApiError::bad_request(
            "at least one channel is required: ?channel=NAME",
        ));
    }
    let mut channels = Vec::with_capacity(names.len());
    for n in names {
        let c = ChannelName::new(n).map_err(|e| {
            let shown: String = n.chars().take(64).collect();
            ApiError::bad_request(format!("invalid channel {shown:?}: {e}"))
        })?;
        channels.push(c);
    }
    channels.sort();
    channels.dedup();
    if channels.len() > max {
        return Err(ApiError::bad_request(format!(
            "{} channels requested; at most {max} per stream (HUB_MAX_CHANNELS_PER_CONN)",
            channels.len()
        )));
    }
    Ok(channels)
}

/// `GET /v1/sse`.
pub async fn stream(req: HttpRequest, node: web::Data<Node>) -> Result<HttpResponse, ApiError> {
    let node = node.into_inner();
    let refuse = |reason: RejectReason, e: ApiError| {
        node.metrics.rejected(reason).increment(1);
        e
    };
    // Channel names first: a bad name is 400 before any token is looked at.
    let q = parse_query(req.query_string()).map_err(|e| refuse(RejectReason::BadRequest, e))?;
    let channels = check_channels(&q.channels, node.config.max_channels_per_conn as usize)
        .map_err(|e| refuse(RejectReason::BadRequest, e))?;
    let allow =
        cors::allow_origin(&req, &node.origins).map_err(|e| refuse(RejectReason::Forbidden, e))?;
    let token = bearer(&req).or(q.token.as_deref());
    let grant = node
        .auth
        .authorize(&channels, token)
        .map_err(|(r, e)| refuse(r, e))?;
    let last_event_id = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(q.last_event_id);

    let session = node
        .open(OpenRequest {
            transport: Transport::Sse,
            channels,
            envelope: q.envelope,
            last_event_id,
            user: grant.user,
            expires_at: grant.expires_at,
        })
        .await
        .map_err(|r| r.error)?;

    let mut res = HttpResponse::Ok();
    res.insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"));
    // A stream is never followed by another request on its connection (EventSource opens a
    // new one): close it when the stream ends, rather than holding an idle keep-alive socket
    // that a stopping node would have to wait for.
    res.force_close();
    cors::apply(&mut res, allow);
    let _live = node.track_transport();
    Ok(res.body(SseBody {
        node,
        session,
        _live,
    }))
}

/// `OPTIONS /v1/sse` (CORS preflight).
pub async fn preflight(req: HttpRequest, node: web::Data<Node>) -> Result<HttpResponse, ApiError> {
    cors::preflight(&req, &node.origins)
}

#[derive(serde::Serialize)]
struct Connected<'a> {
    connection_id: String,
    node: &'a str,
    channels: Vec<&'a str>,
    heartbeat_secs: u64,
}

/// `retry:`, `id:` (the starting cursor) and `hub.connected`; then `hub.reset` if any.
pub fn opening_frames(
    node: &Node,
    session: &Session,
    positions: &[StreamId],
    reset: &[ChannelName],
) -> Vec<Bytes> {
    let mut buf = BytesMut::with_capacity(256);
    sse::write_retry(&mut buf, node.config.retry_ms);
    sse::write_id(&mut buf, &session.cursor(positions));
    let channels = session.channels();
    let data = serde_json::to_string(&Connected {
        connection_id: session.id.to_string(),
        node: &node.name,
        channels: channels.iter().map(|c| c.as_str()).collect(),
        heartbeat_secs: node.config.heartbeat_secs,
    })
    .unwrap_or_default();
    sse::write_event(&mut buf, Some(EVENT_CONNECTED), &data);
    let mut frames = vec![buf.freeze()];
    if !reset.is_empty() {
        frames.push(reset_event(None, reset));
    }
    frames
}

/// `hub.reset` sent mid-stream (history lost messages during a broker outage): with the new
/// cursor, so that a reconnect resumes after it.
pub fn reset_frame(session: &Session, positions: &[StreamId], reset: &[ChannelName]) -> Bytes {
    reset_event(Some(&session.cursor(positions)), reset)
}

fn reset_event(id: Option<&str>, reset: &[ChannelName]) -> Bytes {
    let data =
        serde_json::json!({ "channels": reset.iter().map(|c| c.as_str()).collect::<Vec<_>>() });
    let mut buf = BytesMut::with_capacity(96);
    if let Some(id) = id {
        sse::write_id(&mut buf, id);
    }
    sse::write_event(&mut buf, Some(EVENT_RESET), &data.to_string());
    buf.freeze()
}

/// `hub.reconnect` for the reasons a client should come back from (with a `retry:` so that a
/// plain EventSource waits that long). Shutdown spreads clients over one more retry interval.
pub fn last_frame(session: &Session, reason: CloseReason, retry_ms: u64) -> Option<Bytes> {
    let retry = match reason {
        CloseReason::Shutdown => retry_ms + spread(session.seq, retry_ms),
        CloseReason::Slow | CloseReason::TokenExpired => retry_ms,
        CloseReason::Client | CloseReason::Stale | CloseReason::Error => return None,
    };
    let mut buf = BytesMut::with_capacity(96);
    sse::write_retry(&mut buf, retry);
    let data = format!(
        "{{\"reason\":\"{}\",\"retry_ms\":{retry}}}",
        reason.as_str()
    );
    sse::write_event(&mut buf, Some(EVENT_RECONNECT), &data);
    Some(buf.freeze())
}

/// A deterministic spread in `[0, range)` from a sequence number (Fibonacci hashing).
fn spread(seq: u64, range: u64) -> u64 {
    (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % range.max(1)
}

/// The response body of one stream. Dropping it (client gone, server stopping) closes the
/// session with reason `client` unless it was already closed for another reason.
pub struct SseBody {
    node: Arc<Node>,
    session: Arc<Session>,
    /// Counts this stream as alive until the HTTP server drops the body.
    _live: TransportGuard,
}

impl MessageBody for SseBody {
    type Error = std::convert::Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        match self.session.poll_chunk(cx) {
            Poll::Ready(Some(chunk)) => {
                self.session.touch(self.node.registry.clock.now());
                if let Some(t) = chunk.published {
                    self.node.metrics.delivered.increment(1);
                    self.node.metrics.latency.record(t.elapsed().as_secs_f64());
                }
                Poll::Ready(Some(Ok(chunk.bytes)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        self.node.close(&self.session, CloseReason::Client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let q =
            parse_query("channel=public%3Aa&channel=public:b&envelope=true&lastEventId=5-0&_=123")
                .unwrap();
        assert_eq!(q.channels, ["public:a", "public:b"]);
        assert!(q.envelope);
        assert_eq!(q.last_event_id.as_deref(), Some("5-0"));
        assert!(parse_query("envelope=maybe").is_err());
    }

    #[test]
    fn channel_checks() {
        assert!(check_channels(&[], 4).is_err());
        assert!(check_channels(&["bad name".into()], 4).is_err());
        let many: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
        assert!(check_channels(&many, 4).is_err());
        let dup = vec!["b".to_string(), "a".into(), "b".into()];
        let got = check_channels(&dup, 2).unwrap();
        assert_eq!(
            got.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn spread_stays_in_range() {
        assert!((0..1000).all(|s| spread(s, 2000) < 2000));
        assert_eq!(spread(5, 0), 0);
    }
}
