//! Brokers: where messages are published, kept and recovered from.
//!
//! The node talks to one [`Broker`]: the embedded in-process one or Redis. A broker never
//! touches streams directly; it hands messages to the registry's fan-out.

pub mod local;
pub mod redis;

use crate::history::Recovery;
use crate::metrics::Source;
use protocol::{ChannelName, Envelope, StreamId};

pub use local::LocalBroker;
pub use redis::RedisBroker;
use std::sync::Arc;

/// A broker failure, reported to the caller as 503.
#[derive(Debug, thiserror::Error)]
#[error("broker unavailable: {0}")]
pub struct BrokerError(pub String);

/// The node's broker. An enum rather than a trait object: two kinds, static dispatch.
pub enum Broker {
    Local(LocalBroker),
    Redis(Arc<RedisBroker>),
}

impl Broker {
    /// Publishes a message; returns its id (the channel position for durable messages).
    pub async fn publish(
        &self,
        channel: ChannelName,
        env: &Envelope,
        durable: bool,
        source: Source,
    ) -> Result<String, BrokerError> {
        match self {
            Broker::Local(b) => Ok(b.publish(channel, env, durable, source)),
            Broker::Redis(b) => {
                let id = b.publish(channel, env, durable).await?;
                // Counted again as `redis` on every node that receives it for its streams.
                if source != Source::Redis {
                    b.count_received(source);
                }
                Ok(id)
            }
        }
    }

    /// Makes sure the node receives these channels before a stream reads their history.
    pub async fn subscribe(&self, channels: &[ChannelName]) -> Result<(), BrokerError> {
        match self {
            Broker::Local(_) => Ok(()),
            Broker::Redis(b) => b.subscribe(channels).await,
        }
    }

    /// What a stream at `since` (or fresh) must be sent for `channel`.
    pub async fn recover(
        &self,
        channel: &ChannelName,
        since: Option<StreamId>,
    ) -> Result<Recovery, BrokerError> {
        match self {
            Broker::Local(b) => Ok(b.recover(channel, since)),
            Broker::Redis(b) => b.recover(channel, since).await,
        }
    }

    /// Periodic clean-up (expired history).
    pub fn sweep(&self) {
        match self {
            Broker::Local(b) => b.sweep(),
            Broker::Redis(_) => {}
        }
    }

    /// Whether the broker can take streams now (always for the embedded one).
    pub fn is_up(&self) -> bool {
        match self {
            Broker::Local(_) => true,
            Broker::Redis(b) => b.is_up(),
        }
    }

    /// The registry the broker delivers into.
    pub fn registry(&self) -> &Arc<crate::registry::Registry> {
        match self {
            Broker::Local(b) => b.registry(),
            Broker::Redis(b) => b.registry(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Broker::Local(_) => "embedded",
            Broker::Redis(_) => "redis",
        }
    }
}
