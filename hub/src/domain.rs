//! The hub's vocabulary shared by every layer: the transports a stream uses, why a stream
//! ends, why one is refused. Names here are the labels metrics and clients see; this module
//! holds no state and depends on nothing in the crate.

/// Stream transports; the index into per-transport handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Sse = 0,
    Ws = 1,
}

impl Transport {
    pub const ALL: [Transport; 2] = [Transport::Sse, Transport::Ws];
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::Ws => "ws",
        }
    }
}

/// Why a stream ended; the `reason` label of `hub_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    Client = 1,
    Slow = 2,
    Stale = 3,
    Shutdown = 4,
    TokenExpired = 5,
    Error = 6,
    /// Ended by the backend (`POST /v1/disconnect`).
    Disconnected = 7,
    /// Its token was revoked (`POST /v1/revoke`).
    Revoked = 8,
}

impl CloseReason {
    pub const ALL: [CloseReason; 8] = [
        CloseReason::Client,
        CloseReason::Slow,
        CloseReason::Stale,
        CloseReason::Shutdown,
        CloseReason::TokenExpired,
        CloseReason::Error,
        CloseReason::Disconnected,
        CloseReason::Revoked,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::Slow => "slow",
            CloseReason::Stale => "stale",
            CloseReason::Shutdown => "shutdown",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::Error => "error",
            CloseReason::Disconnected => "disconnected",
            CloseReason::Revoked => "revoked",
        }
    }
    pub fn from_u8(v: u8) -> Option<CloseReason> {
        CloseReason::ALL.into_iter().find(|r| *r as u8 == v)
    }
    /// Its index among [`CloseReason::ALL`] (per-reason handles).
    pub fn index(self) -> usize {
        self as usize - 1
    }
}

/// Why a stream was refused; the `reason` label of `hub_connections_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    Capacity = 0,
    UserLimit = 1,
    Unauthorized = 2,
    Forbidden = 3,
    BadRequest = 4,
    Draining = 5,
    /// The broker cannot serve streams now (Redis down), or the authorization hook cannot.
    Unavailable = 6,
    /// A channel has its namespace's `max_readers` streams on this node.
    ChannelLimit = 7,
    /// The client's address holds `HUB_MAX_STREAMS_PER_IP` streams on this node.
    IpLimit = 8,
    /// The client's address opens streams faster than `HUB_CONNECT_RATE_PER_IP`.
    RateLimited = 9,
}

impl RejectReason {
    pub const ALL: [RejectReason; 10] = [
        RejectReason::Capacity,
        RejectReason::UserLimit,
        RejectReason::Unauthorized,
        RejectReason::Forbidden,
        RejectReason::BadRequest,
        RejectReason::Draining,
        RejectReason::Unavailable,
        RejectReason::ChannelLimit,
        RejectReason::IpLimit,
        RejectReason::RateLimited,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Capacity => "capacity",
            RejectReason::UserLimit => "user_limit",
            RejectReason::Unauthorized => "unauthorized",
            RejectReason::Forbidden => "forbidden",
            RejectReason::BadRequest => "bad_request",
            RejectReason::Draining => "draining",
            RejectReason::Unavailable => "unavailable",
            RejectReason::ChannelLimit => "channel_limit",
            RejectReason::IpLimit => "ip_limit",
            RejectReason::RateLimited => "rate_limited",
        }
    }
}
