//! Why the hub refuses a request, independent of HTTP: the kind (which decides the status, the
//! error code and the `hub_connections_rejected_total` reason) and one sentence for the client.
//!
//! The core (node, auth, transports' checks) returns a [`Refusal`]; `http::error` alone turns it
//! into a response. Nothing here counts or logs.

use crate::domain::RejectReason;

/// The kinds of refusal, each with one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 400: a malformed request (channel name, query, frame).
    BadRequest,
    /// 401: a protected channel without a valid token.
    Unauthorized,
    /// 403: a valid token that does not grant a channel, or an origin that is not allowed.
    Forbidden,
    /// 413: a message over `HUB_MAX_MESSAGE_BYTES` (publishing).
    TooLarge,
    /// 429: the token's `sub` holds `HUB_MAX_CONNECTIONS_PER_USER` streams on this node.
    UserLimit,
    /// 429: a channel has its namespace's `max_readers` streams on this node.
    ChannelLimit,
    /// 429: the client's address holds `HUB_MAX_STREAMS_PER_IP` streams on this node.
    IpLimit,
    /// 429: the client's address opens streams faster than `HUB_CONNECT_RATE_PER_IP`; come
    /// back in this many seconds.
    RateLimited(u64),
    /// 503: this node holds `HUB_MAX_CONNECTIONS` streams.
    Capacity,
    /// 503: this node is shutting down.
    Draining,
    /// 503: the broker (Redis) cannot serve now; the details went to the log.
    Unavailable,
}

/// A refusal: its kind and the sentence the client reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: Kind,
    pub message: String,
}

impl Refusal {
    pub fn new(kind: Kind, message: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Refusal {
        Refusal::new(Kind::BadRequest, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Refusal {
        Refusal::new(Kind::Unauthorized, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Refusal {
        Refusal::new(Kind::Forbidden, message)
    }
    pub fn too_large(message: impl Into<String>) -> Refusal {
        Refusal::new(Kind::TooLarge, message)
    }
    pub fn capacity() -> Refusal {
        Refusal::new(
            Kind::Capacity,
            "this node holds its maximum number of streams",
        )
    }
    pub fn draining() -> Refusal {
        Refusal::new(
            Kind::Draining,
            "this node is shutting down; connect to another",
        )
    }
    /// A channel is at its namespace's `max_readers` on this node.
    pub fn channel_limit(channel: &str, max: u64) -> Refusal {
        Refusal::new(
            Kind::ChannelLimit,
            format!("channel {channel} already has {max} readers on this node (its namespace's max_readers)"),
        )
    }

    /// An address at one of its limits (see `crate::addresses`).
    pub fn address(refused: crate::addresses::AddressRefusal) -> Refusal {
        match refused.reason {
            RejectReason::RateLimited => Refusal::new(
                Kind::RateLimited(refused.retry_after.as_secs_f64().ceil().max(1.0) as u64),
                "this address opens streams faster than this node allows (HUB_CONNECT_RATE_PER_IP)",
            ),
            _ => Refusal::new(
                Kind::IpLimit,
                "this address holds as many streams as this node allows (HUB_MAX_STREAMS_PER_IP)",
            ),
        }
    }

    /// The broker failed; the client learns only that it may retry (details are logged).
    pub fn unavailable() -> Refusal {
        Refusal::new(
            Kind::Unavailable,
            "this node cannot serve streams right now; retry shortly or connect to another",
        )
    }

    /// The HTTP status (and the WebSocket error frame's `code`).
    pub fn status(&self) -> u16 {
        match self.kind {
            Kind::BadRequest => 400,
            Kind::Unauthorized => 401,
            Kind::Forbidden => 403,
            Kind::TooLarge => 413,
            Kind::UserLimit | Kind::ChannelLimit | Kind::IpLimit | Kind::RateLimited(_) => 429,
            Kind::Capacity | Kind::Draining | Kind::Unavailable => 503,
        }
    }

    /// The `error` field of the JSON answer.
    pub fn code(&self) -> &'static str {
        match self.kind {
            Kind::BadRequest => "bad_request",
            Kind::Unauthorized => "unauthorized",
            Kind::Forbidden => "forbidden",
            Kind::TooLarge => "too_large",
            Kind::UserLimit => "user_limit",
            Kind::ChannelLimit => "channel_limit",
            Kind::IpLimit => "ip_limit",
            Kind::RateLimited(_) => "rate_limited",
            Kind::Capacity => "capacity",
            Kind::Draining => "draining",
            Kind::Unavailable => "broker_unavailable",
        }
    }

    /// The reason a refused stream is counted under (`None`: not a stream refusal).
    pub fn reason(&self) -> Option<RejectReason> {
        Some(match self.kind {
            Kind::BadRequest => RejectReason::BadRequest,
            Kind::Unauthorized => RejectReason::Unauthorized,
            Kind::Forbidden => RejectReason::Forbidden,
            Kind::UserLimit => RejectReason::UserLimit,
            Kind::ChannelLimit => RejectReason::ChannelLimit,
            Kind::IpLimit => RejectReason::IpLimit,
            Kind::RateLimited(_) => RejectReason::RateLimited,
            Kind::Capacity => RejectReason::Capacity,
            Kind::Draining => RejectReason::Draining,
            Kind::Unavailable => RejectReason::Unavailable,
            Kind::TooLarge => return None,
        })
    }

    /// Seconds a client should wait before retrying (`Retry-After`), for refusals that pass
    /// (503 and 429).
    pub fn retry_after(&self) -> Option<u64> {
        match self.kind {
            Kind::Capacity | Kind::UserLimit | Kind::ChannelLimit | Kind::IpLimit => Some(5),
            Kind::RateLimited(secs) => Some(secs),
            Kind::Draining => Some(1),
            Kind::Unavailable => Some(2),
            _ => None,
        }
    }

    /// For a refusal that passes, the `hub.reconnect` reason an EventSource is told instead of
    /// the status (it would close for good on anything but 200); `None` for those that do not.
    pub fn passing(&self) -> Option<&'static str> {
        match self.kind {
            Kind::Capacity => Some("capacity"),
            Kind::UserLimit => Some("user_limit"),
            Kind::ChannelLimit => Some("channel_limit"),
            Kind::IpLimit => Some("ip_limit"),
            Kind::RateLimited(_) => Some("rate_limited"),
            Kind::Draining => Some("draining"),
            Kind::Unavailable => Some("unavailable"),
            Kind::BadRequest | Kind::Unauthorized | Kind::Forbidden | Kind::TooLarge => None,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status(), self.code(), self.message)
    }
}
