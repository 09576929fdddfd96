//! Publishing from Rust services: the contract's two calls over the `redis` crate.
//!
//! [`publish_durable`] runs `FCALL hub_publish 1 <channel> <envelope>` (kept in history, resumable)
//! and returns the message id; [`publish_ephemeral`] runs `PUBLISH hub:ch:<channel> <envelope>`
//! (or `SPUBLISH hub:ch:{<channel>}` against a Redis Cluster) and reaches only those connected now.
//! Both check the channel name and the envelope before sending. Enable with feature `redis`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), protocol::publish::PublishError> {
//! use protocol::{publish, Envelope};
//! let client = redis::Client::open("redis://127.0.0.1:6379/")?;
//! let mut conn = client.get_multiplexed_async_connection().await?;
//! let env = Envelope { event: Some("chat".into()), data: serde_json::json!({"text": "hi"}) };
//! let id = publish::publish_durable(&mut conn, "room:42", &env).await?;
//! publish::publish_ephemeral(&mut conn, "room:42", &env, false).await?;
//! # let _ = id; Ok(()) }
//! ```

use crate::channel::{self, ChannelError};
use crate::envelope::{Envelope, EnvelopeError};
use redis::aio::ConnectionLike;

/// Prefix of the pub/sub channel a hub channel is published on.
pub const LIVE_PREFIX: &str = "hub:ch:";

/// Why a publish did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("invalid channel: {0}")]
    Channel(#[from] ChannelError),
    #[error("invalid envelope: {0}")]
    Envelope(#[from] EnvelopeError),
    #[error("invalid idempotency key: {0}")]
    Key(#[from] crate::idempotency::KeyError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// The pub/sub channel carrying `channel` (`hub:ch:<channel>`, hash-tagged for a cluster).
pub fn live_channel(channel: &str, cluster: bool) -> String {
    if cluster {
        format!("{LIVE_PREFIX}{{{channel}}}")
    } else {
        format!("{LIVE_PREFIX}{channel}")
    }
}

fn checked(channel: &str, envelope: &Envelope) -> Result<Vec<u8>, PublishError> {
    channel::validate(channel)?;
    envelope.validate()?;
    Ok(envelope.to_bytes())
}

/// `FCALL hub_publish 1 <channel> <envelope>`: stored in the channel's history and published in
/// one atomic step. Returns the message id (its position in the channel). Works the same
/// against a Redis Cluster connection (the call is routed by the channel's key slot).
pub async fn publish_durable<C: ConnectionLike>(
    conn: &mut C,
    channel: &str,
    envelope: &Envelope,
) -> Result<String, PublishError> {
    let bytes = checked(channel, envelope)?;
    let id: String = redis::cmd("FCALL")
        .arg("hub_publish")
        .arg(1)
        .arg(channel)
        .arg(bytes)
        .query_async(conn)
        .await?;
    Ok(id)
}

/// `FCALL hub_publish 1 <channel> <envelope> <key>`: as [`publish_durable`], but a `key` already
/// used on this channel within `HUB_IDEMPOTENCY_SECS` returns the first call's id and publishes
/// nothing, so a publish whose answer was lost (a timeout, a dropped connection) can be retried
/// safely with the same key.
pub async fn publish_durable_once<C: ConnectionLike>(
    conn: &mut C,
    channel: &str,
    envelope: &Envelope,
    key: &str,
) -> Result<String, PublishError> {
    let bytes = checked(channel, envelope)?;
    crate::idempotency::validate(key)?;
    let id: String = redis::cmd("FCALL")
        .arg("hub_publish")
        .arg(1)
        .arg(channel)
        .arg(bytes)
        .arg(key)
        .query_async(conn)
        .await?;
    Ok(id)
}

/// `PUBLISH hub:ch:<channel> <envelope>` (`SPUBLISH hub:ch:{<channel>}` when `cluster`):
/// delivered to the streams connected now, not kept. Returns how many hub nodes received it.
pub async fn publish_ephemeral<C: ConnectionLike>(
    conn: &mut C,
    channel: &str,
    envelope: &Envelope,
    cluster: bool,
) -> Result<u64, PublishError> {
    let bytes = checked(channel, envelope)?;
    let command = if cluster { "SPUBLISH" } else { "PUBLISH" };
    let receivers: u64 = redis::cmd(command)
        .arg(live_channel(channel, cluster))
        .arg(bytes)
        .query_async(conn)
        .await?;
    Ok(receivers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_channel_names() {
        assert_eq!(live_channel("room:1", false), "hub:ch:room:1");
        assert_eq!(live_channel("room:1", true), "hub:ch:{room:1}");
    }
}
