//! Brokers: where messages are published, kept and recovered from.
//!
//! The node talks to one [`Broker`]: the embedded in-process one or (later) Redis. A broker
//! never touches streams directly; it hands messages to the registry's fan-out.

pub mod local;

use crate::history::Recovery;
use crate::metrics::Source;
use protocol::{ChannelName, Envelope, StreamId};

pub use local::LocalBroker;

/// A broker failure, reported to the caller as 503.
#[derive(Debug, thiserror::Error)]
#[error("broker unavailable: {0}")]
pub struct BrokerError(pub String);

/// The node's broker. An enum rather than a trait object: two kinds, static dispatch.
pub enum Broker {
    Local(LocalBroker),
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
        }
    }

    /// Starts receiving channels that just gained their first local subscriber.
    pub async fn subscribe(&self, _channels: &[ChannelName]) -> Result<(), BrokerError> {
        match self {
            Broker::Local(_) => Ok(()),
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
        }
    }

    /// Periodic clean-up (expired history).
    pub fn sweep(&self) {
        match self {
            Broker::Local(b) => b.sweep(),
        }
    }

    /// Whether the broker can take streams now (always for the embedded one).
    pub fn is_up(&self) -> bool {
        match self {
            Broker::Local(_) => true,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Broker::Local(_) => "embedded",
        }
    }
}
