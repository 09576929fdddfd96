//! The embedded broker: single-node publish straight into the sink, with in-memory history.
//!
//! Durable messages get their position and are delivered under the channel's history lock, so
//! every stream sees a channel in position order, and a history read never interleaves with a
//! delivery. It keeps nothing per stream.

use crate::broker::{Page, Sink};
use crate::history::MemoryHistory;
use crate::message::Message;
use crate::metrics::{Metrics, Source};
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
    sink: Arc<dyn Sink>,
    metrics: Arc<Metrics>,
}

impl LocalBroker {
    pub fn new(
        sink: Arc<dyn Sink>,
        metrics: Arc<Metrics>,
        history_len: usize,
        history_ttl_secs: u64,
    ) -> LocalBroker {
        LocalBroker {
            history: MemoryHistory::new(history_len, history_ttl_secs, now_ms()),
            sink,
            metrics,
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
        self.metrics.received(source).increment(1);
        if !durable {
            let msg = Arc::new(Message::new(channel, None, env, received));
            self.sink.deliver(&msg);
            return msg.id.to_string();
        }
        let (id, _) = self.history.append(
            &channel,
            now_ms(),
            |id| Arc::new(Message::new(channel.clone(), Some(id), env, received)),
            |msg| self.sink.deliver(msg),
        );
        id.to_string()
    }

    pub fn tail(&self, channel: &ChannelName) -> StreamId {
        self.history.tail(channel, now_ms())
    }

    pub fn rewind_point(&self, channel: &ChannelName, n: usize) -> StreamId {
        self.history.rewind_point(channel, n, now_ms())
    }

    pub fn read(&self, channel: &ChannelName, after: StreamId, count: usize) -> Page {
        self.history.read(channel, after, count, now_ms())
    }

    pub fn sweep(&self) {
        self.history.expire(now_ms());
    }
}
