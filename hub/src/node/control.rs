//! Control from the backend on this node: sending a disconnect or a revocation to every node
//! (through Redis, or straight to itself on the embedded broker) and applying one to the
//! streams it holds. The admin server parses requests; the broker carries messages.

use super::Node;
use crate::broker::redis::{ControlHandler, Heard};
use crate::broker::Broker;
use crate::control::{Control, Target, REVOKED_REASON};
use crate::domain::CloseReason;
use crate::refusal::Refusal;
use crate::revocations::TokenId;
use crate::stream::Session;
use std::sync::Arc;

impl Node {
    /// Sends a control message to every node. Redis mode: a revocation is kept in Redis
    /// first, then the message is published (every node, this one included, applies it as it
    /// hears it); this node also applies it at once, so that its own streams do not wait for
    /// the round trip (applying twice changes nothing).
    pub async fn control(&self, c: Control) -> Result<(), Refusal> {
        if let Broker::Redis(redis) = &*self.broker {
            redis.send_control(&c).await.map_err(|e| {
                tracing::warn!(error = %e, "sending a control message failed");
                Refusal::unavailable()
            })?;
        }
        self.apply(&c);
        Ok(())
    }

    /// Applies a control message to this node's revocations and streams.
    pub fn apply(&self, c: &Control) {
        match c {
            Control::Disconnect { target, reason } => {
                let streams = match target {
                    Target::Sub(sub) => self
                        .registry
                        .streams_where(|s| s.user.as_deref() == Some(sub.as_str())),
                    Target::ConnectionId(id) => self.registry.streams_where(|s| s.id == *id),
                    Target::Channel(channel) => self.registry.readers_of(channel),
                };
                if let (Target::Sub(sub), Some(hook)) = (target, &self.hook) {
                    hook.forget(sub);
                }
                let note: Arc<str> = Arc::from(reason.as_str());
                for s in &streams {
                    self.close_saying(s, CloseReason::Disconnected, Some(note.clone()));
                }
                if !streams.is_empty() {
                    tracing::info!(
                        ?target,
                        reason,
                        streams = streams.len(),
                        "disconnected by the backend"
                    );
                }
            }
            Control::Revoke { revocation } => {
                if let (crate::revocations::Revocation::Sub { sub, .. }, Some(hook)) =
                    (revocation, &self.hook)
                {
                    hook.forget(sub);
                }
                self.auth.revocations.add(revocation);
                self.close_revoked();
            }
            Control::Lift { revocation } => self.auth.revocations.lift(revocation),
        }
    }

    /// Whether a stream's token (or grant) is revoked now.
    fn holds_revoked(&self, s: &Session, token: Option<&TokenId>) -> bool {
        let Some(user) = s.user.as_deref() else {
            return false;
        };
        let (jti, iat) = token.map_or((None, None), |t| (t.jti.as_deref(), t.iat));
        self.auth
            .revocations
            .is_revoked_parts(user, jti, iat, crate::auth::now_secs())
    }

    /// Ends the streams whose token is revoked now (reason `revoked`).
    pub fn close_revoked(&self) {
        if self.auth.revocations.is_empty() {
            return;
        }
        let streams = self.registry.streams_where(|s| {
            s.user.is_some() && self.holds_revoked(s, self.registry.token_of(s).as_deref())
        });
        let note: Arc<str> = Arc::from(REVOKED_REASON);
        for s in &streams {
            self.close_saying(s, CloseReason::Revoked, Some(note.clone()));
        }
        if !streams.is_empty() {
            tracing::info!(
                streams = streams.len(),
                "closed streams whose token was revoked"
            );
        }
    }

    /// Records a new stream's token id; refuses it (401) if the token was revoked after it was
    /// checked and before the stream was registered (a revocation's sweep of the streams could
    /// not see it).
    pub(super) fn hold_token(
        &self,
        s: &Arc<Session>,
        token: Option<Arc<TokenId>>,
    ) -> Result<(), Refusal> {
        let revoked = self.holds_revoked(s, token.as_deref());
        if token.is_some() {
            self.registry.set_token(s, token);
        }
        if revoked {
            return Err(Refusal::unauthorized("the token has been revoked"));
        }
        Ok(())
    }

    /// Forgets revocations that no longer matter and, in Redis mode, reads them all again
    /// (a control message lost with a connection is made good here), in its own task.
    pub fn refresh_revocations(self: &Arc<Self>) {
        self.auth.revocations.prune(crate::auth::now_secs());
        if let Some(hook) = &self.hook {
            hook.prune();
        }
        // A publish bucket idle this long is full again: nothing to remember.
        self.publishes
            .prune(std::time::Instant::now(), std::time::Duration::from_secs(1));
        if let Broker::Redis(redis) = &*self.broker {
            let redis = redis.clone();
            self.spawn(async move {
                if let Err(e) = redis.read_revocations().await {
                    tracing::debug!(error = %e, "reading revocations at the sweep failed");
                }
            });
        }
    }
}

impl ControlHandler for Node {
    fn heard(&self, heard: Heard) {
        match heard {
            Heard::Control(c) => self.apply(&c),
            Heard::Revocations { all, seen } => {
                self.auth.revocations.replace_since(&all, seen);
                self.close_revoked();
            }
        }
    }

    fn revocation_version(&self) -> u64 {
        self.auth.revocations.version()
    }
}
