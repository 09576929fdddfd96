//! A webhook event and a batch of them taken from where they are recorded: the vocabulary the
//! recording stores (the Redis broker's stream, the embedded queue) and the sender
//! (`crate::webhooks`) share. Types only; nothing here records or sends.

use serde::Serialize;

/// One event, as the receiver gets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub channel: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    pub time_ms: u64,
}

/// What a look at the source found.
#[derive(Debug, Default)]
pub struct Taken {
    /// This node is the one that sends (always in memory; the lock's holder in Redis).
    pub held: bool,
    /// Events dropped since the last look (the oldest, beyond the bound).
    pub dropped: u64,
    /// Events waiting (taken ones included until acknowledged).
    pub pending: u64,
    pub events: Vec<Event>,
}
