//! Webhook events over Redis: the stream `hub:{webhooks}` the presence functions append to,
//! its consumer group, and the calls of the one node that sends (`hub_webhook_take`, which
//! also holds the sender's lock, and `hub_webhook_ack`). Sending is `crate::webhooks`'.

use super::*;
use crate::webhook_events::{Event, Taken};
use fred::interfaces::StreamsInterface;

/// The stream of events (its entry ids are the events' ids).
pub const WEBHOOK_STREAM: &str = "hub:{webhooks}";
const WEBHOOK_LOCK: &str = "hub:{webhooks}:lock";
const WEBHOOK_DROPPED: &str = "hub:{webhooks}:dropped";
const WEBHOOK_GROUP: &str = "hub";

impl RedisBroker {
    /// Creates the stream and its consumer group when missing (which is what turns recording
    /// on in the presence functions); an existing group is left as it is.
    pub async fn webhook_group(&self) -> Result<(), BrokerError> {
        match within(
            "XGROUP CREATE",
            self.client
                .xgroup_create::<Value, _, _, _>(WEBHOOK_STREAM, WEBHOOK_GROUP, "0", true),
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.says("BUSYGROUP") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Takes or renews the sender's lock and, holding it, the next `count` events (this
    /// node's unacknowledged ones first, a dead sender's included once claimed). A stream or
    /// group that is gone (a Redis that restarted empty) is created again.
    pub async fn webhook_take(
        &self,
        node: &str,
        lock_ms: u64,
        count: usize,
    ) -> Result<Taken, BrokerError> {
        let call = || {
            self.client.fcall::<Vec<Value>, _, _, _>(
                "hub_webhook_take",
                vec![WEBHOOK_LOCK, WEBHOOK_STREAM, WEBHOOK_DROPPED],
                vec![node.to_string(), lock_ms.to_string(), count.to_string()],
            )
        };
        let flat = match within("FCALL hub_webhook_take", call()).await {
            Err(e) if e.says("NOGROUP") => {
                self.webhook_group().await?;
                within("FCALL hub_webhook_take", call()).await?
            }
            other => other?,
        };
        let int = |v: Option<&Value>| v.and_then(|v| v.as_i64()).unwrap_or(0);
        let held = int(flat.first()) == 1;
        let pending = int(flat.get(2));
        if held && pending < 0 {
            self.webhook_group().await?;
        }
        let text = |v: &Value| v.as_string().unwrap_or_default();
        let events = flat
            .get(3..)
            .unwrap_or_default()
            .chunks(4)
            .filter_map(|e| {
                let [id, kind, channel, sub] = e else {
                    return None;
                };
                let id = text(id);
                let time_ms = id.split('-').next()?.parse().ok()?;
                let sub = text(sub);
                Some(Event {
                    id,
                    kind: text(kind),
                    channel: text(channel),
                    sub: (!sub.is_empty()).then_some(sub),
                    time_ms,
                })
            })
            .collect();
        Ok(Taken {
            held,
            dropped: int(flat.get(1)).max(0) as u64,
            pending: pending.max(0) as u64,
            events,
        })
    }

    /// Acknowledges (and deletes) sent or given-up events; returns how many were still in
    /// the stream (not trimmed meanwhile).
    pub async fn webhook_ack(&self, events: &[Event]) -> Result<u64, BrokerError> {
        if events.is_empty() {
            return Ok(0);
        }
        let removed: i64 = within(
            "FCALL hub_webhook_ack",
            self.client.fcall(
                "hub_webhook_ack",
                vec![WEBHOOK_STREAM],
                events.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
            ),
        )
        .await?;
        Ok(removed.max(0) as u64)
    }
}
