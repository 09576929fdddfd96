//! Presence: reports this node's per-channel user counts (kept by the registry) once a second,
//! coalesced, to the embedded table or to Redis with a lease, and turns them into `join`/`leave`.
//! It never blocks a stream and holds no stream; cost per join and lease rules: see [`run`].

use crate::broker::Broker;
use crate::channels::PresenceCount;
use crate::node::Node;
use crate::stream::PresenceEvent;
use parking_lot::Mutex;
use protocol::ChannelName;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// A channel's users (streams per `sub`) and anonymous streams.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Table {
    pub users: HashMap<Arc<str>, u32>,
    pub anonymous: u32,
}

/// The embedded broker's presence: the reported counts, from which `join`/`leave` follow.
#[derive(Default)]
pub struct MemoryPresence {
    tables: Mutex<HashMap<Arc<str>, Table>>,
}

impl MemoryPresence {
    /// Applies one count; the `join`/`leave` it makes, if any.
    fn apply(&self, c: &PresenceCount) -> Option<Arc<PresenceEvent>> {
        let mut tables = self.tables.lock();
        let table = tables.entry(c.channel.clone()).or_default();
        let event = match &c.sub {
            None => {
                table.anonymous = c.streams;
                None
            }
            Some(sub) => {
                let before = if c.streams > 0 {
                    table.users.insert(sub.clone(), c.streams)
                } else {
                    table.users.remove(sub)
                };
                let was = before.unwrap_or(0) > 0;
                let is = c.streams > 0;
                (was != is)
                    .then(|| ChannelName::new(&c.channel).ok())
                    .flatten()
                    .map(|channel| {
                        Arc::new(PresenceEvent {
                            channel,
                            sub: sub.clone(),
                            join: is,
                        })
                    })
            }
        };
        if table.users.is_empty() && table.anonymous == 0 {
            tables.remove(&c.channel);
        }
        event
    }

    pub fn read(&self, channel: &str) -> Table {
        self.tables.lock().get(channel).cloned().unwrap_or_default()
    }
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
pub async fn run(node: Arc<Node>) {
    let grace = node.config.heartbeat_secs;
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
            node.seed_presence(node.registry.presence_unseed_all());
        }
        let (users, anonymous) = node.registry.presence_gauges();
        node.metrics.presence_users.set(users as f64);
        node.metrics.presence_anonymous.set(anonymous as f64);
        match &*node.broker {
            Broker::Local(_) => {
                for c in node.registry.take_presence(grace) {
                    if let Some(ev) = node.presence.apply(&c) {
                        node.registry.presence_event(&ev);
                    }
                }
            }
            Broker::Redis(b) => {
                if !b.is_up() {
                    continue;
                }
                if !registered {
                    if let Err(e) = b.presence_forget(&node.name).await {
                        tracing::debug!(error = %e, "presence: clearing this node's old counts failed");
                        continue;
                    }
                    registered = true;
                    node.registry.presence_mark_all();
                }
                let now = b.live_epoch();
                if now.is_some() && now != epoch {
                    if epoch.is_some() {
                        node.registry.presence_mark_all();
                        // Changes published while the subscription was down were missed: the
                        // logs are read again, a heartbeat later, once the other nodes have
                        // reported their counts again too (a Redis that restarted empty).
                        reseed_at = Some(tokio::time::Instant::now() + Duration::from_secs(grace));
                    }
                    epoch = now;
                }
                let changes = node.registry.take_presence(grace);
                let mut by_channel: HashMap<Arc<str>, ChannelCounts> = HashMap::new();
                for c in &changes {
                    let e = by_channel.entry(c.channel.clone()).or_default();
                    match &c.sub {
                        None => e.0 = Some(c.streams),
                        Some(u) => e.1.push((u.clone(), c.streams)),
                    }
                }
                for (channel, (anonymous, users)) in by_channel {
                    if let Err(e) = b
                        .presence_set(&channel, &node.name, anonymous, &users)
                        .await
                    {
                        tracing::debug!(channel = %channel, error = %e, "presence: a write failed; retried");
                        node.registry.presence_retry(
                            changes.iter().filter(|c| c.channel == channel).cloned(),
                        );
                    }
                }
                match b.presence_lease(&node.name, lease_ms(grace)).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn count(ch: &str, sub: Option<&str>, streams: u32) -> PresenceCount {
        PresenceCount {
            channel: Arc::from(ch),
            sub: sub.map(Arc::from),
            streams,
        }
    }

    #[test]
    fn joins_and_leaves_follow_a_users_count_crossing_zero() {
        let p = MemoryPresence::default();
        let ev = p.apply(&count("c", Some("u"), 1)).unwrap();
        assert!(ev.join && &*ev.sub == "u" && ev.channel.as_str() == "c");
        assert!(
            p.apply(&count("c", Some("u"), 2)).is_none(),
            "a second stream"
        );
        assert!(
            p.apply(&count("c", None, 3)).is_none(),
            "anonymous are never named"
        );
        assert_eq!(p.read("c").users.get("u"), Some(&2));
        assert_eq!(p.read("c").anonymous, 3);
        assert!(!p.apply(&count("c", Some("u"), 0)).unwrap().join);
        assert!(
            p.apply(&count("c", Some("u"), 0)).is_none(),
            "a repeat changes nothing"
        );
        p.apply(&count("c", None, 0));
        assert_eq!(p.read("c"), Table::default());
        assert!(p.tables.lock().is_empty(), "an empty channel is forgotten");
    }

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
