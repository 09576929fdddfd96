//! The embedded broker: single-node publish straight into the registry, with in-memory history.
//!
//! Durable messages get their position and are delivered under the channel's history lock, so
//! every stream sees a channel in position order. It keeps nothing per stream.

use crate::history::{MemoryHistory, Recovery};
use crate::message::Message;
use crate::metrics::Source;
use crate::registry::Registry;
use protocol::{ChannelName, Envelope, StreamId};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub struct LocalBroker {
    history: MemoryHistory,
    registry: Arc<Registry>,
}

impl LocalBroker {
    pub fn new(registry: Arc<Registry>, history_len: usize, history_ttl_secs: u64) -> LocalBroker {
        LocalBroker {
            history: MemoryHistory::new(history_len, history_ttl_secs, now_ms()),
            registry,
        }
    }

    pub fn publish(
        &self,
        channel: ChannelName,
        env: &Envelope,
        durable: bool,
        source: Source,
    ) -> String {
        let received = Instant::now();
        self.registry.metrics.received(source).increment(1);
        if !durable {
            let msg = Arc::new(Message::new(channel, None, env, received));
            self.registry.fanout(&msg);
            return msg.id.to_string();
        }
        let (id, _) = self.history.append(
            &channel,
            now_ms(),
            |id| Arc::new(Message::new(channel.clone(), Some(id), env, received)),
            |msg| self.registry.fanout(msg),
        );
        id.to_string()
    }

    pub fn recover(&self, channel: &ChannelName, since: Option<StreamId>) -> Recovery {
        self.history.recover(channel, since, now_ms())
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn sweep(&self) {
        self.history.expire(now_ms());
    }
}
