//! The node's status for the admin port's page (`GET /`) and `GET /v1/status`: a snapshot of
//! this node (streams, its busiest channels, lagging readers, totals by reason read from its own
//! metrics) and, in Redis mode, the snapshots every live node keeps there under a lease.
//! It only reads: it never changes a stream, a count or a metric.

use crate::broker::Broker;
use crate::node::Node;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The page, served from the binary (no build step, nothing fetched from elsewhere).
pub const PAGE: &str = include_str!("status.html");

/// Channels listed per node (the page merges every node's and shows this many).
pub const TOP_CHANNELS: usize = 20;
/// How often a node writes its snapshot to Redis.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(2);
/// A snapshot not renewed for this long is gone: the node is taken for dead (three writes).
pub const LEASE: Duration = Duration::from_secs(6);

/// One node's state at `at_ms`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    pub node: String,
    pub version: String,
    pub broker: String,
    pub uptime_secs: u64,
    pub ready: bool,
    pub draining: bool,
    pub connections: Connections,
    pub channels: usize,
    /// Its channels with the most local readers, most first.
    pub top_channels: Vec<TopChannel>,
    /// Streams with a channel that fell behind (reading history to catch up).
    pub lagging: usize,
    pub totals: Totals,
    /// `None` on the embedded broker.
    pub redis: Option<RedisState>,
    /// When the snapshot was taken (this node's clock, ms since the Unix epoch).
    pub at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Connections {
    pub sse: usize,
    pub ws: usize,
    pub max: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopChannel {
    pub channel: String,
    pub readers: usize,
}

/// Counters since the node started (the page makes rates of them).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Totals {
    pub received: u64,
    pub delivered: u64,
    pub rejected: BTreeMap<String, u64>,
    pub closed: BTreeMap<String, u64>,
    pub dropped: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RedisState {
    pub up: bool,
    pub reconnects: u64,
}

/// What `GET /v1/status` answers.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The node that answered.
    pub node: String,
    /// Every live node, this one first, then by name.
    pub nodes: Vec<NodeStatus>,
    /// Redis mode: why the other nodes could not be read (the list then holds this node only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// This node's snapshot now.
pub fn snapshot(node: &Node) -> NodeStatus {
    use crate::metrics as m;
    let text = node.metrics.render();
    let counts = node.registry.counts();
    let redis = match &*node.broker {
        Broker::Redis(_) => Some(RedisState {
            up: total(&text, m::REDIS_UP) > 0,
            reconnects: total(&text, m::REDIS_RECONNECTS),
        }),
        _ => None,
    };
    NodeStatus {
        node: node.name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        broker: node.broker.kind().to_string(),
        uptime_secs: node.started.elapsed().as_secs(),
        ready: node.is_ready(),
        draining: node.is_draining(),
        connections: Connections {
            sse: counts.sse,
            ws: counts.ws,
            max: node.config.max_connections,
        },
        channels: counts.channels,
        top_channels: node
            .registry
            .top_channels(TOP_CHANNELS)
            .into_iter()
            .map(|(channel, readers)| TopChannel { channel, readers })
            .collect(),
        lagging: node.registry.lagging(),
        totals: Totals {
            received: total(&text, m::MESSAGES_RECEIVED),
            delivered: total(&text, m::MESSAGES_DELIVERED),
            rejected: by_label(&text, m::CONNECTIONS_REJECTED, "reason"),
            closed: by_label(&text, m::CONNECTIONS_CLOSED, "reason"),
            dropped: by_label(&text, m::MESSAGES_DROPPED, "reason"),
        },
        redis,
        at_ms: now_ms(),
    }
}

/// This node's snapshot and, in Redis mode, every other live node's.
pub async fn status(node: &Node) -> Status {
    let this = snapshot(node);
    let mut status = Status {
        node: this.node.clone(),
        nodes: Vec::new(),
        error: None,
    };
    if let Broker::Redis(redis) = &*node.broker {
        match redis.status_all().await {
            Ok(all) => {
                let mut others: Vec<NodeStatus> = all
                    .iter()
                    .filter_map(|json| serde_json::from_str::<NodeStatus>(json).ok())
                    .filter(|s| s.node != this.node)
                    .collect();
                others.sort_by(|a, b| a.node.cmp(&b.node));
                status.nodes = others;
            }
            Err(e) => status.error = Some(format!("the other nodes could not be read: {e}")),
        }
    }
    status.nodes.insert(0, this);
    status
}

/// Redis mode: writes this node's snapshot every [`PUBLISH_EVERY`] under a [`LEASE`]; runs
/// until the node stops. A failed write is logged at debug (Redis being away is told by
/// `hub_redis_up` and the logs of the broker).
pub async fn publish(node: std::sync::Arc<Node>) {
    let Broker::Redis(_) = &*node.broker else {
        return;
    };
    let mut every = tokio::time::interval(PUBLISH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Broker::Redis(redis) = &*node.broker else {
            return;
        };
        let json = serde_json::to_string(&snapshot(&node)).unwrap_or_default();
        if let Err(e) = redis.status_put(&node.name, json, LEASE).await {
            tracing::debug!(error = %e, "writing this node's status to Redis failed");
        }
    }
}

/// The sample lines of one metric family: (labels, value).
fn samples<'a>(text: &'a str, family: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines().filter_map(move |line| {
        let rest = line.strip_prefix(family)?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => {
                let end = r.rfind('}')?;
                (&r[..end], r[end + 1..].trim())
            }
            None if rest.starts_with(' ') => ("", rest.trim()),
            None => return None,
        };
        Some((labels, value.parse::<f64>().ok()?))
    })
}

/// A family's samples summed (every label).
pub fn total(text: &str, family: &str) -> u64 {
    samples(text, family).map(|(_, v)| v).sum::<f64>() as u64
}

/// A family's samples summed per value of `label` (over every other label).
pub fn by_label(text: &str, family: &str, label: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let key = format!("{label}=\"");
    for (labels, v) in samples(text, family) {
        let Some(start) = labels.find(&key).map(|i| i + key.len()) else {
            continue;
        };
        let Some(len) = labels[start..].find('"') else {
            continue;
        };
        *out.entry(labels[start..start + len].to_string())
            .or_insert(0) += v as u64;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE hub_connections_rejected_total counter\n\
        hub_connections_rejected_total{reason=\"ip_limit\",transport=\"sse\"} 3\n\
        hub_connections_rejected_total{reason=\"ip_limit\",transport=\"ws\"} 2\n\
        hub_connections_rejected_total{reason=\"capacity\"} 0\n\
        hub_connections_rejected_total_other 9\n\
        hub_messages_received_total{source=\"http\"} 5\n\
        hub_messages_received_total{source=\"redis\"} 7\n\
        hub_redis_up 1\n";

    #[test]
    fn totals_are_summed_from_the_metrics_text() {
        assert_eq!(total(TEXT, "hub_messages_received_total"), 12);
        assert_eq!(total(TEXT, "hub_redis_up"), 1);
        assert_eq!(total(TEXT, "hub_nothing"), 0);
        let r = by_label(TEXT, "hub_connections_rejected_total", "reason");
        assert_eq!(r.get("ip_limit"), Some(&5));
        assert_eq!(r.get("capacity"), Some(&0));
        assert_eq!(
            r.len(),
            2,
            "another family that starts alike is not summed: {r:?}"
        );
    }

    #[test]
    fn a_node_snapshot_reads_back() {
        let s = NodeStatus {
            node: "a".into(),
            version: "1".into(),
            broker: "redis".into(),
            uptime_secs: 3,
            ready: true,
            draining: false,
            connections: Connections {
                sse: 1,
                ws: 2,
                max: 10,
            },
            channels: 1,
            top_channels: vec![TopChannel {
                channel: "public:a".into(),
                readers: 3,
            }],
            lagging: 0,
            totals: Totals::default(),
            redis: Some(RedisState {
                up: true,
                reconnects: 0,
            }),
            at_ms: 1,
        };
        let back: NodeStatus = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
