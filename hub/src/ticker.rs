//! The node's one background clock: heartbeats, sweeps and metric upkeep.
//!
//! A single task ticks every second. Each stream gets a heartbeat every `HUB_HEARTBEAT_SECS`,
//! spread over the interval by its sequence number so 10,000 streams are not woken at once; no
//! stream owns a timer. This module decides when; the registry does the work.

use crate::node::Node;
use std::sync::Arc;
use std::time::Duration;

/// How often histogram samples are folded into buckets.
const UPKEEP_EVERY_SECS: u64 = 5;

/// Runs until the node is dropped (the task is aborted at shutdown).
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
            node.registry
                .heartbeat(done, every, now_unix, node.config.stale_after_secs);
            if done.is_multiple_of(sweep_every) {
                let closed = node.registry.sweep(node.config.stale_after_secs);
                node.broker.sweep();
                tracing::debug!(closed, "sweep done");
            }
            if done.is_multiple_of(UPKEEP_EVERY_SECS) {
                node.metrics.upkeep();
            }
        }
    }
}
