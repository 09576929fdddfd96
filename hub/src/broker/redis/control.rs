//! Control from the backend over Redis: the control channel every node subscribes to, and
//! the revocations kept in one hash (`hub:revoked`, a field per `jti` or `sub`, each with the
//! instant it stops mattering) that a node reads whole when it (re)connects, before it is
//! ready. What a node hears is handed to the handler the node set; nothing here closes streams.

use super::*;
use crate::control::Control;
use crate::revocations::Revocation;
use fred::interfaces::HashesInterface;

/// The pub/sub channel of control messages (a shard channel in cluster mode).
pub const CONTROL_CHANNEL: &str = "hub:control";
/// The hash of revocations: field `j:<jti>` or `s:<sub>`, value the revocation as JSON.
pub const REVOKED_KEY: &str = "hub:revoked";

/// What the broker hears for the node.
#[derive(Debug)]
pub enum Heard {
    /// A control message (from this node or another).
    Control(Control),
    /// Every revocation in force, read after a (re)connection or at a sweep; `seen` is the
    /// node's revocation version when the read was issued.
    Revocations { all: Vec<Revocation>, seen: u64 },
}

/// The node's handler of what the broker hears, and the revocation version it reads.
pub trait ControlHandler: Send + Sync + 'static {
    fn heard(&self, heard: Heard);
    /// See [`crate::revocations::Revocations::version`].
    fn revocation_version(&self) -> u64;
}

impl RedisBroker {
    /// Sets who handles control messages and revocation reads (once, when the node is built).
    pub fn set_control_handler(&self, handler: std::sync::Weak<dyn ControlHandler>) {
        if self.control.set(handler).is_err() {
            tracing::warn!("a second control handler was ignored");
        }
    }

    fn handler(&self) -> Option<Arc<dyn ControlHandler>> {
        self.control.get().and_then(|w| w.upgrade())
    }

    /// Keeps a revocation change in Redis, then tells every node (this one included): stored
    /// first, so a node that reconnects between the two reads it.
    pub async fn send_control(&self, c: &Control) -> Result<(), BrokerError> {
        match c {
            Control::Revoke { revocation } => {
                let value = serde_json::to_string(revocation).unwrap_or_default();
                within(
                    "HSET revoked",
                    self.client
                        .hset::<i64, _, _>(REVOKED_KEY, (revocation.field(), value)),
                )
                .await?;
            }
            Control::Lift { revocation } => {
                within(
                    "HDEL revoked",
                    self.client
                        .hdel::<i64, _, _>(REVOKED_KEY, revocation.field()),
                )
                .await?;
            }
            Control::Disconnect { .. } => {}
        }
        let bytes = c.to_bytes();
        if self.cluster {
            within(
                "SPUBLISH control",
                self.client.spublish::<i64, _, _>(CONTROL_CHANNEL, bytes),
            )
            .await?;
        } else {
            within(
                "PUBLISH control",
                self.client.publish::<i64, _, _>(CONTROL_CHANNEL, bytes),
            )
            .await?;
        }
        Ok(())
    }

    /// A message on the control channel.
    pub(super) fn on_control(&self, payload: &[u8]) {
        match Control::parse(payload) {
            Ok(c) => {
                if let Some(h) = self.handler() {
                    h.heard(Heard::Control(c));
                }
            }
            Err(why) => {
                self.metrics.dropped(DropReason::Malformed).increment(1);
                tracing::warn!(error = %why, "dropped a message on the control channel");
            }
        }
    }

    /// Reads every revocation in force and hands them to the node; fields that no longer
    /// matter (or that this build cannot read) are deleted on the way.
    pub async fn read_revocations(&self) -> Result<(), BrokerError> {
        let Some(h) = self.handler() else {
            // The node is still being built: the caller retries.
            return Err(BrokerError::Unexpected(
                "the node cannot take revocations yet".into(),
            ));
        };
        let seen = h.revocation_version();
        let all: std::collections::HashMap<String, String> =
            within("HGETALL revoked", self.client.hgetall(REVOKED_KEY)).await?;
        let now = crate::auth::now_secs();
        let mut kept = Vec::with_capacity(all.len());
        let mut stale = Vec::new();
        for (field, value) in all {
            match serde_json::from_str::<Revocation>(&value) {
                Ok(r) if r.until() > now && r.field() == field => kept.push(r),
                Ok(_) => stale.push(field),
                Err(e) => {
                    tracing::warn!(field, error = %e, "deleting an unreadable revocation");
                    stale.push(field);
                }
            }
        }
        if !stale.is_empty() {
            if let Err(e) = within(
                "HDEL revoked",
                self.client.hdel::<i64, _, _>(REVOKED_KEY, stale),
            )
            .await
            {
                tracing::debug!(error = %e, "deleting expired revocations failed");
            }
        }
        h.heard(Heard::Revocations { all: kept, seen });
        Ok(())
    }
}
