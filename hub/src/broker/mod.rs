//! Brokers: where messages are published, kept and read back from.
//!
//! The node talks to one [`Broker`]: the embedded in-process one or Redis. A broker never sees
//! streams: it hands every message it receives to a [`Sink`] (the node's registry) and answers
//! bounded history reads. Which channels it receives is decided by the node (first local reader
//! subscribes, last one unsubscribes).

pub mod history;
pub mod local;
pub mod redis;

use crate::message::Message;
use crate::metrics::Source;
use protocol::{ChannelName, Envelope, StreamId};

pub use local::LocalBroker;
pub use redis::RedisBroker;
use std::sync::Arc;

/// A broker failure. Logged by whoever gets it; clients only learn that they may retry.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Redis did not answer `what` within the command timeout.
    #[error("broker unavailable: Redis did not answer {what} within {after:?}")]
    Timeout {
        what: String,
        after: std::time::Duration,
    },
    /// Redis answered `what` with an error reply (a key of the wrong type, a script error, a
    /// function that is not loaded): asking again will not help.
    #[error("broker unavailable: {what}: Redis answered {reply}")]
    Refused { what: String, reply: String },
    /// The connection failed or was lost, or the client gave up on `what`.
    #[error("broker unavailable: {what}: {error}")]
    Failed { what: String, error: String },
    /// Redis answered something this build cannot read.
    #[error("broker unavailable: {0}")]
    Unexpected(String),
}

impl BrokerError {
    /// Redis answered with an error: asking again will not help. Timeouts and lost
    /// connections are not such answers.
    pub fn answered(&self) -> bool {
        matches!(self, BrokerError::Refused { .. })
    }

    /// Redis answered with an error reply that says `words` (case-insensitive), as in
    /// `ERR Function not found`.
    pub fn says(&self, words: &str) -> bool {
        matches!(self, BrokerError::Refused { reply, .. }
            if reply.to_ascii_lowercase().contains(&words.to_ascii_lowercase()))
    }
}

/// Where a broker delivers: the narrow view it has of the node.
pub trait Sink: Send + Sync + 'static {
    /// A message arrived for local readers (in position order per channel). Must not wait for
    /// the fan-out: the node queues it for its fan-out lanes and returns.
    fn deliver(&self, msg: &Arc<Message>);
    /// The broker may have lost messages (reconnection, lost burst): every live reader checks
    /// its position against history before it takes live messages again.
    fn fall_behind(&self);
    /// [`Sink::fall_behind`] for the readers of these channels only.
    fn fall_behind_on(&self, channels: &[ChannelName]);
    /// A user joined or left a channel (on some node): readers that asked are told.
    fn presence(&self, ev: &Arc<crate::stream::PresenceEvent>);
    /// The channels the node has local readers for (what a reconnection subscribes again).
    fn channels(&self) -> Vec<ChannelName>;
}

/// One bounded history read: what follows a position, and what history vouches for.
#[derive(Debug, Default)]
pub struct Page {
    /// Messages after the asked position, in order, contiguous in history.
    pub entries: Vec<Arc<Message>>,
    /// The channel's latest position at the read.
    pub tail: StreamId,
    /// Every message after this position is still in history: a reader at an older position
    /// (or one after `tail`, from elsewhere) has lost messages and gets `hub.reset`.
    pub floor: StreamId,
    /// The read stopped at its size: more messages follow `last`.
    pub more: bool,
    /// The position of the last message read, including one dropped as malformed (a reader
    /// that took the whole page is there).
    pub last: Option<StreamId>,
}

/// The node's broker. An enum rather than a trait object: two kinds, static dispatch.
pub enum Broker {
    Local(LocalBroker),
    Redis(Arc<RedisBroker>),
}

impl Broker {
    /// Publishes a message; returns its id (the channel position for durable messages). A
    /// durable message's idempotency `key` (checked by the caller) makes a repeat within
    /// `HUB_IDEMPOTENCY_SECS` return the first id and publish nothing.
    pub async fn publish(
        &self,
        channel: ChannelName,
        env: &Envelope,
        durable: bool,
        source: Source,
        key: Option<&str>,
    ) -> Result<String, BrokerError> {
        match self {
            Broker::Local(b) => Ok(b.publish(channel, env, durable, source, key)),
            Broker::Redis(b) => {
                let id = b.publish(channel, env, durable, key).await?;
                // Counted again as `redis` on every node that receives it for its streams.
                if source != Source::Redis {
                    b.count_received(source);
                }
                Ok(id)
            }
        }
    }

    /// Whether subscriptions cost anything (Redis): the node serializes them per channel.
    pub fn subscribes(&self) -> bool {
        matches!(self, Broker::Redis(_))
    }

    /// Starts receiving these channels; returns once the broker delivers them.
    pub async fn subscribe(&self, channels: &[ChannelName]) -> Result<(), BrokerError> {
        match self {
            Broker::Local(_) => Ok(()),
            Broker::Redis(b) => b.subscribe(channels).await,
        }
    }

    /// Stops receiving a channel that has no local reader any more.
    pub async fn unsubscribe(&self, channel: &ChannelName) {
        if let Broker::Redis(b) = self {
            b.unsubscribe(channel).await
        }
    }

    /// The channel's latest position (where a fresh reader starts).
    pub async fn tail(&self, channel: &ChannelName) -> Result<StreamId, BrokerError> {
        match self {
            Broker::Local(b) => Ok(b.tail(channel)),
            Broker::Redis(b) => Ok(b.read(channel, None, 0).await?.tail),
        }
    }

    /// Where a stream that wants the channel's last `n` durable messages starts (a resume
    /// from there replays them): the position before them, or history's floor when it holds
    /// fewer.
    pub async fn rewind_point(
        &self,
        channel: &ChannelName,
        n: usize,
    ) -> Result<StreamId, BrokerError> {
        match self {
            Broker::Local(b) => Ok(b.rewind_point(channel, n)),
            Broker::Redis(b) => b.rewind_point(channel, n).await,
        }
    }

    /// At most `count` messages after `after` (see [`Page`]).
    pub async fn read(
        &self,
        channel: &ChannelName,
        after: StreamId,
        count: usize,
    ) -> Result<Page, BrokerError> {
        match self {
            Broker::Local(b) => Ok(b.read(channel, after, count)),
            Broker::Redis(b) => b.read(channel, Some(after), count).await,
        }
    }

    /// The broker's delivery epoch while its subscriptions are whole, `None` while they may
    /// be missing messages (reconnecting). A reader may go live after a history read only if
    /// the epoch was `Some` before the read and unchanged after it.
    pub fn live_epoch(&self) -> Option<u64> {
        match self {
            Broker::Local(_) => Some(0),
            Broker::Redis(b) => b.live_epoch(),
        }
    }

    /// Resolves once the broker's subscriptions are whole again (at once if they are), or
    /// after `limit`.
    pub async fn wait_whole(&self, limit: std::time::Duration) {
        if let Broker::Redis(b) = self {
            b.wait_whole(limit).await
        }
    }

    /// Periodic clean-up (expired history).
    pub fn sweep(&self) {
        match self {
            Broker::Local(b) => {
                b.sweep();
                b.sweep_keys();
            }
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

    /// Stops the broker's background tasks.
    pub fn shutdown(&self) {
        if let Broker::Redis(b) = self {
            b.shutdown()
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Broker::Local(_) => "embedded",
            Broker::Redis(_) => "redis",
        }
    }
}
