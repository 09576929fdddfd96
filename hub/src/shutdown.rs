//! Drain on SIGTERM/SIGINT: refuse new streams, then close open ones spread over
//! `HUB_DRAIN_SECS`, each told `hub.reconnect` (reason `shutdown`).
//!
//! Closing in small batches keeps a deploy from becoming a reconnect storm on the other nodes.
//! This module does not stop the HTTP servers; `lib::run` does that after the drain.

use crate::domain::CloseReason;
use crate::node::Node;
use std::time::Duration;

/// Batches per second while draining.
const BATCHES_PER_SEC: u64 = 10;

/// Waits for SIGTERM or SIGINT.
pub async fn signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Marks the node draining and closes every stream within the drain time.
pub async fn drain(node: &Node) {
    node.start_draining();
    let sessions = node.registry.snapshot();
    let total = sessions.len();
    let steps = (node.config.drain_secs * BATCHES_PER_SEC).max(1) as usize;
    let per_batch = total.div_ceil(steps).max(1);
    let pause = Duration::from_millis(1000 / BATCHES_PER_SEC);
    tracing::info!(
        streams = total,
        drain_secs = node.config.drain_secs,
        "draining"
    );
    for (i, batch) in sessions.chunks(per_batch).enumerate() {
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        for s in batch {
            node.close(s, CloseReason::Shutdown);
        }
    }
    // Streams that were being opened when draining began.
    for s in node.registry.snapshot() {
        node.close(&s, CloseReason::Shutdown);
    }
    tracing::info!(streams = total, "drained");
}
