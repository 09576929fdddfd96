//! The node's one background clock: heartbeats, token expiry, stale streams, sweeps and metric
//! upkeep.
//!
//! A single task ticks every second. Each idle stream gets a heartbeat every
//! `HUB_HEARTBEAT_SECS`, spread over the interval by its sequence number so 10,000 streams are
//! not woken at once; no stream owns a timer. Streams whose token expired or that took nothing
//! for `HUB_STALE_AFTER_SECS` are closed on the tick that finds them; every `HUB_SWEEP_SECS` the
//! gauges are reconciled with the registry. This module decides when; the registry finds, the
//! node closes.

use crate::node::Node;
use crate::peer;
use std::sync::Arc;
use std::time::Duration;

/// How often histogram samples are folded into buckets.
const UPKEEP_EVERY_SECS: u64 = 5;

/// Runs until the node stops (the task is aborted then).
pub async fn run(node: Arc<Node>) {
    let every = node.config.heartbeat_secs;
    let sweep_every = node.config.sweep_secs;
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut done = 0u64;
    loop {
        interval.tick().await;
        let now = node.registry.clock.tick();
        // Catch up on every whole second that passed, so no stream's turn is skipped.
        while done < now {
            done += 1;
            let now_unix = crate::broker::local::now_ms() / 1000;
            let stale_after = node.config.stale_after_secs;
            let silent_ms = (every * 1000).min(u64::from(u32::MAX)) as u32;
            let vanished =
                |s: &crate::stream::Session| s.socket.is_some_and(|p| peer::vanished(p, silent_ms));
            for (s, reason) in node
                .registry
                .tick(done, every, now_unix, stale_after, vanished)
            {
                match reason {
                    crate::domain::CloseReason::TokenExpired => {
                        tracing::info!(connection_id = %s.id, "closing stream: its token expired")
                    }
                    crate::domain::CloseReason::Slow => {
                        tracing::info!(connection_id = %s.id, "closing slow stream: it fell too far behind its channel's presence changes")
                    }
                    _ => {
                        tracing::info!(connection_id = %s.id, "closing stale stream: it took nothing for HUB_STALE_AFTER_SECS, or its client stopped acknowledging")
                    }
                }
                node.close(&s, reason);
            }
            if done.is_multiple_of(sweep_every) {
                let stale = node.registry.stale(stale_after);
                for (s, reason) in &stale {
                    node.close(s, *reason);
                }
                node.registry.reconcile();
                node.broker.sweep();
                node.refresh_revocations();
                tracing::debug!(closed = stale.len(), "sweep done");
            }
            // Rate buckets that are full again are forgotten (they hold nothing).
            node.addresses.prune(std::time::Instant::now());
            if done.is_multiple_of(UPKEEP_EVERY_SECS) {
                node.metrics.upkeep();
            }
        }
    }
}
