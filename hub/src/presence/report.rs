//! Presence: reports this node's per-channel user counts (kept by the registry) once a second,
//! coalesced, to the embedded table or to Redis with a lease, and turns them into `join`/`leave`.
//! It never blocks a stream and holds no stream; cost per join and lease rules: see [`run`].

use super::store::Store;
use crate::channels::Registry;
use crate::metrics::Metrics;
use crate::tasks::Tasks;
use protocol::ChannelName;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Attempts at reading a channel's users from Redis before its log goes on with what this
/// node heard (half a second apart).
const SEED_ATTEMPTS: u32 = 5;

/// What the reporter works with, built by the node (no reference back to it).
pub struct Reporter {
    pub registry: Arc<Registry>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// This node's name: its counts and its lease in Redis.
    pub node: String,
    /// How long a user's 0 is held back (one heartbeat).
    pub grace: u64,
    /// Where seed reads run (aborted when the node stops).
    pub tasks: Arc<Tasks>,
}

/// One channel's changed counts: the anonymous streams (if changed) and users' streams.
type ChannelCounts = (Option<u32>, Vec<(Arc<str>, u32)>);

/// How long a node's lease lasts: a node that stops renewing it (killed) stops counting within
/// two heartbeats, the survivors' next second included.
fn lease_ms(heartbeat_secs: u64) -> u64 {
    (2 * heartbeat_secs).saturating_sub(2).max(2) * 1000
}

/// Reports presence once a second until the node stops (the task is aborted then).
///
/// Coalesced: all that moved on a channel within the second is one write, and a user whose
/// last stream closed is reported gone only one heartbeat later, so a client that reconnects
/// (here or on another node) within it makes neither `leave` nor `join`: a reconnect storm is
/// not a presence storm. Embedded broker: counts and events stay in memory. Redis: per changed
/// channel and second one `FCALL hub_presence` (per user in it: HGET, HSET, HINCRBY, and a
/// PUBLISH when the user's total over all nodes crosses 0: 4 commands per join, 2 per
/// reconnect, 5 per leave, measured in BENCHMARKS.md) and one SADD; per second one lease
/// renewal (`hub_presence_lease`), which runs out after 2 heartbeats (less 2 s) and makes the
/// survivors remove a dead node's counts and send its users' `leave`s. A failed write is
/// retried the next second; a reconnection reports everything again.
pub async fn run(r: Arc<Reporter>) {
    let grace = r.grace;
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Redis: what this node left there before a restart under the same name goes first.
    let mut registered = false;
    // The subscription's epoch: a reconnection may mean a Redis that lost its data, or a lease
    // that ran out meanwhile (the survivors removed this node's counts): all is reported again
    // (counts are absolute, so reporting what Redis still has changes nothing).
    let mut epoch = None;
    let mut reseed_at = None;
    loop {
        interval.tick().await;
        if reseed_at.is_some_and(|t| t <= tokio::time::Instant::now()) {
            reseed_at = None;
            seed(
                &r.registry,
                &r.store,
                &r.tasks,
                r.registry.presence_unseed_all(),
            );
        }
        let (users, anonymous) = r.registry.presence_gauges();
        r.metrics.presence_users.set(users as f64);
        r.metrics.presence_anonymous.set(anonymous as f64);
        match &*r.store {
            Store::Memory(table) => {
                for c in r.registry.take_presence(grace) {
                    if let Some(ev) = table.apply(&c) {
                        r.registry.presence_event(&ev);
                    }
                }
            }
            Store::Redis(b) => {
                if !b.is_up() {
                    continue;
                }
                if !registered {
                    if let Err(e) = b.presence_forget(&r.node).await {
                        tracing::debug!(error = %e, "presence: clearing this node's old counts failed");
                        continue;
                    }
                    registered = true;
                    r.registry.presence_mark_all();
                }
                let now = b.live_epoch();
                if now.is_some() && now != epoch {
                    if epoch.is_some() {
                        r.registry.presence_mark_all();
                        // Changes published while the subscription was down were missed: the
                        // logs are read again, a heartbeat later, once the other nodes have
                        // reported their counts again too (a Redis that restarted empty).
                        reseed_at = Some(tokio::time::Instant::now() + Duration::from_secs(grace));
                    }
                    epoch = now;
                }
                let changes = r.registry.take_presence(grace);
                let mut by_channel: HashMap<Arc<str>, ChannelCounts> = HashMap::new();
                for c in &changes {
                    let e = by_channel.entry(c.channel.clone()).or_default();
                    match &c.sub {
                        None => e.0 = Some(c.streams),
                        Some(u) => e.1.push((u.clone(), c.streams)),
                    }
                }
                for (channel, (anonymous, users)) in by_channel {
                    if let Err(e) = b.presence_set(&channel, &r.node, anonymous, &users).await {
                        tracing::debug!(channel = %channel, error = %e, "presence: a write failed; retried");
                        r.registry.presence_retry(
                            changes.iter().filter(|c| c.channel == channel).cloned(),
                        );
                    }
                }
                match b.presence_lease(&r.node, lease_ms(grace)).await {
                    Ok(dead) => {
                        for d in dead {
                            tracing::info!(node = %d, "presence: a node's lease ran out; its users are removed");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "presence: renewing the lease failed"),
                }
            }
        }
    }
}

/// Reads the users over every node of each channel whose presence log is not known whole (see
/// `Registry::presence_claim_seed`) and hands them to the registry. Embedded: at once. Redis:
/// one `FCALL_RO hub_presence_read` per channel in a task of its own (a stream that goes away
/// meanwhile leaves nothing waiting), retried up to `SEED_ATTEMPTS` times half a second
/// apart; after that the log goes on with what this node heard (logged) until the next
/// observer has it read again.
pub fn seed(
    registry: &Arc<Registry>,
    store: &Arc<Store>,
    tasks: &Tasks,
    channels: Vec<ChannelName>,
) {
    for ch in channels {
        if !registry.presence_claim_seed(&ch) {
            continue;
        }
        if let Some(users) = store.users_now(&ch) {
            registry.presence_seed(&ch, Some(users));
            continue;
        }
        let (registry, store) = (registry.clone(), store.clone());
        tasks.spawn(async move {
            for attempt in 1..=SEED_ATTEMPTS {
                match store.read(&ch).await {
                    Ok(table) => {
                        let users = table
                            .users
                            .into_iter()
                            .filter(|(_, n)| *n > 0)
                            .map(|(u, _)| u)
                            .collect();
                        registry.presence_seed(&ch, Some(users));
                        return;
                    }
                    Err(e) if attempt == SEED_ATTEMPTS => {
                        tracing::warn!(channel = %ch, error = %e, "presence: reading the channel's users failed; its observers start from what this node heard");
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
            registry.presence_seed(&ch, None);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_outlives_a_heartbeat_and_ends_within_two() {
        for hb in [1, 2, 5, 30] {
            let l = lease_ms(hb);
            assert!(
                l >= hb * 1000 && l + 1000 <= (2 * hb).max(3) * 1000,
                "{hb}: {l}"
            );
        }
    }
}
