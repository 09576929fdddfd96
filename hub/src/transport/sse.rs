//! The SSE transport: `GET /v1/sse`, its frames, and the response body that renders a stream.
//!
//! It parses and checks the request (channels, limits, origin, token) before any slot is
//! taken, then hands the stream to actix as a streaming body. The body only pulls items from
//! the session and renders them (messages are framed once and shared; only the multi-channel
//! `id:` line is written per stream); it never waits on other streams, and dropping it closes
//! the stream.

use crate::domain::Transport;
use crate::http::cors;
use crate::http::error::ApiError;
use crate::node::{Node, OpenRequest};
use crate::refusal::Refusal;
use crate::transport::credentials::{self, Credentials};
use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use protocol::{sse, ChannelName};
use std::sync::Arc;

pub use super::sse_body::{SseBody, WatchedBody};

/// Hub event names (never usable by publishers: `hub.` is reserved).
pub const EVENT_CONNECTED: &str = "hub.connected";
pub const EVENT_RESET: &str = "hub.reset";
pub const EVENT_RECONNECT: &str = "hub.reconnect";
pub const EVENT_JOIN: &str = "hub.join";
pub const EVENT_LEAVE: &str = "hub.leave";
/// The backend ended the stream (a disconnect, a revoked token): `{"reason": "..."}`.
pub const EVENT_DISCONNECT: &str = "hub.disconnect";
/// Who is on a channel when the stream starts observing it.
pub const EVENT_PRESENCE: &str = "hub.presence";

/// The query of a stream request.
#[derive(Debug, Default, PartialEq)]
pub struct StreamQuery {
    pub channels: Vec<String>,
    pub envelope: bool,
    pub last_event_id: Option<String>,
    pub token: Option<String>,
    /// `rewind=N`: the last N durable messages of each channel first (checked against
    /// `HUB_HISTORY_LEN` by [`open`]).
    pub rewind: u64,
    /// `presence=true`: `hub.join`/`hub.leave` of the stream's channels.
    pub presence: bool,
}

/// Parses `channel=A&channel=B&envelope=true&last_event_id=..&lastEventId=..&token=..`.
/// Unknown parameters (cache busters) are ignored.
pub fn parse_query(query: &str) -> Result<StreamQuery, Refusal> {
    let mut q = StreamQuery::default();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "channel" => q.channels.push(v.into_owned()),
            "envelope" => {
                q.envelope = match &*v {
                    "true" | "1" => true,
                    "false" | "0" | "" => false,
                    _ => return Err(Refusal::bad_request("envelope must be true or false")),
                }
            }
            "last_event_id" | "lastEventId" => q.last_event_id = Some(v.into_owned()),
            "token" => q.token = Some(v.into_owned()),
            "presence" => {
                q.presence = match &*v {
                    "true" | "1" => true,
                    "false" | "0" | "" => false,
                    _ => return Err(Refusal::bad_request("presence must be true or false")),
                }
            }
            "rewind" => {
                q.rewind = v.parse().map_err(|_| {
                    Refusal::bad_request("rewind must be a whole number of messages")
                })?
            }
            _ => {}
        }
    }
    Ok(q)
}

/// Validates, sorts and deduplicates the channel list against the per-stream limit.
pub fn check_channels(names: &[String], max: usize) -> Result<Vec<ChannelName>, Refusal> {
    if names.is_empty() {
        return Err(Refusal::bad_request(
            "at least one channel is required: ?channel=NAME",
        ));
    }
    let mut channels = Vec::with_capacity(names.len());
    for n in names {
        let c = ChannelName::new(n).map_err(|e| {
            let shown: String = n.chars().take(64).collect();
            Refusal::bad_request(format!("invalid channel {shown:?}: {e}"))
        })?;
        channels.push(c);
    }
    channels.sort();
    channels.dedup();
    if channels.len() > max {
        return Err(Refusal::bad_request(format!(
            "{} channels requested; at most {max} per stream (HUB_MAX_CHANNELS_PER_CONN)",
            channels.len()
        )));
    }
    Ok(channels)
}

/// What a stream request says, from whichever HTTP front read it (actix's router, or the
/// public port's own reader of stream requests, [`crate::server::front`]).
pub struct StreamHead<'a> {
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
    /// `Accept-Encoding` accepts gzip.
    pub gzip: bool,
    pub last_event_id: Option<&'a str>,
    pub socket: Option<crate::peer::PeerSocket>,
    /// One stream of an HTTP/2 connection (its body is then a [`WatchedBody`]).
    pub multiplexed: bool,
}

/// A stream that passed every check and took its slot: the CORS answer and the body.
pub struct Opened {
    pub allow: Option<HeaderValue>,
    pub body: SseBody,
    /// The body is gzip-encoded (`Content-Encoding: gzip`).
    pub gzip: bool,
}

/// Checks a stream request and opens its stream. Nothing is taken before every check passed.
pub async fn open(node: &Arc<Node>, head: StreamHead<'_>) -> Result<Opened, ApiError> {
    // The client's address first: a flood is refused before anything else is looked at.
    let place = node.admit_address(head.remote, head.forwarded)?;
    // Channel names first: a bad name is 400 before any token is looked at.
    let q = parse_query(head.query).map_err(|r| node.refuse(r))?;
    let channels = check_channels(&q.channels, node.config.max_channels_per_conn as usize)
        .map_err(|r| node.refuse(r))?;
    // Each channel's history length bounds rewind (HUB_HISTORY_LEN, or its namespace's).
    if let Some((c, len)) = channels
        .iter()
        .map(|c| (c, node.config.history_len_of(c)))
        .find(|(_, len)| q.rewind > *len)
    {
        return Err(node
            .refuse(Refusal::bad_request(format!(
                "rewind must be from 0 to {len} (the history length of channel {c})"
            )))
            .into());
    }
    let allow = cors::allow_origin(head.origin, &node.origins).map_err(|r| node.refuse(r))?;
    if q.presence {
        let namespaces = &node.config.namespaces;
        if let Some(off) = channels.iter().find(|c| !namespaces.of(c).presence) {
            return Err(node
                .refuse(Refusal::forbidden(format!(
                    "presence is off for channel {off}'s namespace"
                )))
                .into());
        }
    }
    let creds = Credentials {
        authorization: head.authorization,
        query_token: q.token.as_deref(),
        cookie: head.cookie,
        origin: head.origin.and_then(|o| o.to_str().ok()),
        remote: head.remote,
    };
    let grant = credentials::grant(node, &channels, Transport::Sse, &creds)
        .await
        .map_err(|r| node.refuse(r))?;
    let token = grant.token_id();
    let last_event_id = head.last_event_id.map(str::to_owned).or(q.last_event_id);
    let gzip = head.gzip && node.config.sse_gzip;

    let stream = node
        .open(OpenRequest {
            transport: Transport::Sse,
            channels: channels.clone(),
            envelope: q.envelope,
            last_event_id,
            user: grant.user,
            expires_at: grant.expires_at,
            token,
            socket: head.socket,
            rewind: q.rewind as usize,
            presence: q.presence,
            multiplexed: head.multiplexed,
            place,
        })
        .await?;
    Ok(Opened {
        allow,
        gzip,
        body: SseBody::new(stream, channels, gzip, node.track_transport()),
    })
}

/// The response headers of a stream, after the status line (each line ends in CRLF).
pub const HEADERS: [(&str, &str); 3] = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),
];

/// The least `retry:` a refused EventSource is told: no browser comes back sooner than this.
const MIN_REFUSAL_RETRY_MS: u64 = 1000;
/// How far a refused EventSource's `retry:` is spread around the `Retry-After` (one part in
/// five either way), so that browsers refused together do not all come back together.
const REFUSAL_JITTER_DIVISOR: u64 = 5;

/// Whether a request's `Accept` header asks for an event stream, as every EventSource's does.
pub fn wants_event_stream(accept: Option<&[u8]>) -> bool {
    accept.is_some_and(|a| {
        a.split(|b| *b == b',').any(|part| {
            let kind = part.split(|b| *b == b';').next().unwrap_or_default();
            kind.trim_ascii().eq_ignore_ascii_case(b"text/event-stream")
        })
    })
}

/// The body that tells an EventSource to come back later, for a refusal that passes: a
/// browser's EventSource closes for good on any status but 200, but reconnects after a stream
/// that ends. So: `retry:` (the refusal's `Retry-After`, jittered, at least a second), one
/// `hub.reconnect` with the reason, and the end. `None` for refusals that do not pass.
pub fn refusal_body(e: &ApiError) -> Option<Bytes> {
    let reason = e.passing?;
    let base = e.retry_after.unwrap_or(1).saturating_mul(1000);
    let jitter = base / REFUSAL_JITTER_DIVISOR;
    let retry = (base - jitter + fastrand::u64(0..=2 * jitter)).max(MIN_REFUSAL_RETRY_MS);
    let mut buf = BytesMut::with_capacity(96);
    sse::write_retry(&mut buf, retry);
    let data = format!("{{\"reason\":\"{reason}\",\"retry_ms\":{retry}}}");
    sse::write_event(&mut buf, Some(EVENT_RECONNECT), &data);
    Some(buf.freeze())
}

/// What a refused stream request asked by an EventSource (`event_stream`) gets instead of the
/// status, for a refusal that passes: the origin CORS allows, and [`refusal_body`]. `None`
/// when the status stands (another client, or a refusal that does not pass). Both HTTP
/// readers (the front, and actix's router) answer with it.
pub fn come_back(
    node: &Node,
    e: &ApiError,
    event_stream: bool,
    origin: Option<&HeaderValue>,
) -> Option<(Option<HeaderValue>, Bytes)> {
    let body = event_stream.then(|| refusal_body(e)).flatten()?;
    Some((
        cors::allow_origin(origin, &node.origins).ok().flatten(),
        body,
    ))
}

/// `GET /v1/sse` through actix's router (the public port's front serves plain HTTP/1.x stream
/// requests itself and hands only the others here).
pub async fn stream(
    req: HttpRequest,
    node: web::Data<Node>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let node = node.into_inner();
    let http2 = req.version() == actix_web::http::Version::HTTP_2;
    let headers = req.headers();
    let origin = headers.get(header::ORIGIN);
    let cookie = crate::http::cookies(&req);
    let forwarded = crate::http::forwarded_for(&req);
    let opening = open(
        &node,
        StreamHead {
            query: req.query_string(),
            origin,
            authorization: crate::http::authorization(&req),
            cookie: cookie.as_deref(),
            remote: req.peer_addr(),
            forwarded: forwarded.as_deref(),
            gzip: headers
                .get(header::ACCEPT_ENCODING)
                .and_then(|v| v.to_str().ok())
                .is_some_and(crate::compress::accepts_gzip),
            last_event_id: headers.get("last-event-id").and_then(|v| v.to_str().ok()),
            socket: req.conn_data::<crate::peer::PeerSocket>().copied(),
            multiplexed: http2,
        },
    )
    .await;
    let mut res = HttpResponse::Ok();
    for h in HEADERS {
        res.insert_header(h);
    }
    let opened = match opening {
        Ok(opened) => opened,
        Err(e) => {
            let accept = headers.get(header::ACCEPT).map(HeaderValue::as_bytes);
            let Some((allow, body)) = come_back(&node, &e, wants_event_stream(accept), origin)
            else {
                return Err(e);
            };
            cors::apply(&mut res, allow);
            return Ok(res.body(body));
        }
    };
    // A stream is never followed by another request on its connection (EventSource opens a
    // new one): close it when the stream ends, rather than holding an idle keep-alive socket
    // that a stopping node would have to wait for. (An HTTP/2 stream ends alone; its
    // connection carries the page's other streams.)
    if !http2 {
        res.force_close();
    }
    cors::apply(&mut res, opened.allow);
    if opened.gzip {
        res.insert_header((header::CONTENT_ENCODING, "gzip"));
        res.insert_header((header::VARY, "Accept-Encoding"));
    }
    Ok(if http2 {
        res.body(WatchedBody {
            body: opened.body,
            watch: payload,
        })
    } else {
        res.body(opened.body)
    })
}

/// `OPTIONS /v1/sse` (CORS preflight).
pub async fn preflight(req: HttpRequest, node: web::Data<Node>) -> Result<HttpResponse, ApiError> {
    cors::preflight(&req, &node.origins)
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

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(10_000))]

            /// Any query string reads as a query or a 400, never a panic; the channels that
            /// pass are valid, sorted, distinct and within the limit.
            #[test]
            fn any_query_is_a_query_or_a_400(
                q in "\\PC{0,120}|((channel|envelope|lastEventId|last_event_id|token|rewind|x)=[a-z0-9:%&=*. -]{0,20}&?){0,8}",
                max in 1usize..8,
            ) {
                if let Ok(parsed) = parse_query(&q) {
                    match check_channels(&parsed.channels, max) {
                        Ok(cs) => {
                            prop_assert!(!cs.is_empty() && cs.len() <= max);
                            prop_assert!(cs.windows(2).all(|w| w[0] < w[1]));
                            prop_assert!(cs.iter().all(|c| parsed.channels.iter().any(|n| n == c.as_str())));
                        }
                        Err(r) => prop_assert_eq!(r.status(), 400),
                    }
                } else {
                    prop_assert!(q.contains("envelope") || q.contains("rewind") || q.contains("presence"));
                }
            }

            /// Parameters written by a client library read back as written, in any order and
            /// percent-encoded.
            #[test]
            fn encoded_queries_round_trip(
                channels in proptest::collection::vec("[A-Za-z0-9_:.@-]{1,20}", 0..5),
                id in proptest::option::of("\\PC{0,30}"),
                token in proptest::option::of("[A-Za-z0-9._-]{0,40}"),
                envelope in any::<bool>(),
                rewind in 0u64..100_000,
            ) {
                let mut enc = form_urlencoded::Serializer::new(String::new());
                for c in &channels {
                    enc.append_pair("channel", c);
                }
                if let Some(id) = &id {
                    enc.append_pair("lastEventId", id);
                }
                if let Some(t) = &token {
                    enc.append_pair("token", t);
                }
                enc.append_pair("envelope", if envelope { "true" } else { "false" });
                enc.append_pair("rewind", &rewind.to_string());
                enc.append_pair("_", "1733000000000");
                let q = parse_query(&enc.finish()).unwrap();
                prop_assert_eq!(q, StreamQuery { channels, envelope, last_event_id: id, token, rewind, presence: false });
            }
        }
    }
}
