//! Prometheus metrics: every metric name and label value the dashboards rely on, and the handles.
//!
//! Handles are resolved once at start-up so that hot paths do an atomic add, never a map lookup.
//! This module does not decide when things happen; callers record them.

use crate::domain::{CloseReason, RejectReason, Transport};
use metrics::{Counter, Gauge, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

pub const CONNECTIONS: &str = "hub_connections";
pub const CONNECTIONS_MAX: &str = "hub_connections_max";
pub const CONNECTIONS_OPENED: &str = "hub_connections_opened_total";
pub const CONNECTIONS_CLOSED: &str = "hub_connections_closed_total";
pub const CONNECTIONS_REJECTED: &str = "hub_connections_rejected_total";
pub const CHANNELS: &str = "hub_channels";
pub const MESSAGES_RECEIVED: &str = "hub_messages_received_total";
pub const MESSAGES_DELIVERED: &str = "hub_messages_delivered_total";
pub const MESSAGES_DROPPED: &str = "hub_messages_dropped_total";
pub const DELIVERY_LATENCY: &str = "hub_delivery_latency_seconds";
pub const HEARTBEATS_SENT: &str = "hub_heartbeats_sent_total";
pub const STALE_CLOSED: &str = "hub_stale_closed_total";
pub const REDIS_UP: &str = "hub_redis_up";
pub const REDIS_RECONNECTS: &str = "hub_redis_reconnects_total";
pub const HISTORY_REPLAYED: &str = "hub_history_replayed_total";
/// Beyond the contract's list: 1 while `/readyz` would answer 200 (set at every scrape).
pub const READY: &str = "hub_ready";
/// Beyond the contract's list: history reads made for streams (resume, lag, backfill); with
/// `hub_history_replayed_total` it shows how well reads are shared.
pub const HISTORY_READS: &str = "hub_history_reads_total";
/// Beyond the contract's list: channels whose history could not be read (their readers got
/// `hub.reset` and went on live).
pub const HISTORY_UNREADABLE: &str = "hub_history_unreadable_total";

/// Beyond the contract's list: distinct users (`sub`) with a stream on this node, and streams
/// without a token (presence, per node).
pub const PRESENCE_USERS: &str = "hub_presence_users";
pub const PRESENCE_ANONYMOUS: &str = "hub_presence_anonymous";

/// Webhook events by outcome (`result`: sent, retried, dropped) and the events waiting.
pub const WEBHOOK_EVENTS: &str = "hub_webhook_events_total";
pub const WEBHOOK_PENDING: &str = "hub_webhook_pending";

/// Delivery latency buckets (seconds): fine below 50 ms, where the targets are.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The delivery-latency histogram: fixed buckets of atomic counters.
///
/// Recorded once per delivery, so it must cost an atomic add and no memory: the exporter's own
/// histograms keep every raw sample until the next upkeep, which at 2 million deliveries per
/// second held tens of MB between upkeeps (seen in the slow-readers benchmark).
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    fn new() -> Self {
        LatencyHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Records one latency, in seconds.
    pub fn record(&self, secs: f64) {
        let i = LATENCY_BUCKETS.partition_point(|le| *le < secs);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add((secs.max(0.0) * 1e9) as u64, Ordering::Relaxed);
    }

    /// Prometheus text for the histogram (cumulative buckets, `+Inf`, sum, count).
    fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP {DELIVERY_LATENCY} Time from publish to write on a stream."
        );
        let _ = writeln!(out, "# TYPE {DELIVERY_LATENCY} histogram");
        let mut cumulative = 0;
        for (le, b) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            cumulative += b.load(Ordering::Relaxed);
            let _ = writeln!(out, "{DELIVERY_LATENCY}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{DELIVERY_LATENCY}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{DELIVERY_LATENCY}_sum {sum}");
        let _ = writeln!(out, "{DELIVERY_LATENCY}_count {count}");
    }
}

/// Where a message came from; the `source` label of `hub_messages_received_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Redis = 0,
    Http = 1,
    Local = 2,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::Redis, Source::Http, Source::Local];
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Redis => "redis",
            Source::Http => "http",
            Source::Local => "local",
        }
    }
}

/// Why a message was not delivered; the `reason` label of `hub_messages_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    Malformed = 0,
    TooLarge = 1,
    Slow = 2,
    /// An ephemeral message a reader had fallen behind on.
    Lagged = 3,
    /// A message of a conflated channel (`conflate_ms`) a newer one replaced.
    Conflated = 4,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::Malformed,
        DropReason::TooLarge,
        DropReason::Slow,
        DropReason::Lagged,
        DropReason::Conflated,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::TooLarge => "too_large",
            DropReason::Slow => "slow",
            DropReason::Lagged => "lagged",
            DropReason::Conflated => "conflated",
        }
    }
}

/// Every handle, resolved once. Owned by the node; shared by `Arc`.
pub struct Metrics {
    handle: PrometheusHandle,
    pub connections: [Gauge; 2],
    pub connections_max: Gauge,
    pub opened: [Counter; 2],
    closed: [[Counter; CloseReason::ALL.len()]; 2],
    rejected: [Counter; RejectReason::ALL.len()],
    pub channels: Gauge,
    received: [Counter; 3],
    pub delivered: Counter,
    dropped: [Counter; 5],
    pub latency: LatencyHistogram,
    pub heartbeats: Counter,
    pub stale_closed: Counter,
    pub redis_up: Gauge,
    pub redis_reconnects: Counter,
    pub history_replayed: Counter,
    pub history_reads: Counter,
    pub history_unreadable: Counter,
    pub ready: Gauge,
    pub presence_users: Gauge,
    pub presence_anonymous: Gauge,
    /// Sent, retried, dropped (see [`WebhookResult`]).
    webhook_events: [Counter; 3],
    pub webhook_pending: Gauge,
}

/// What became of webhook events; the `result` label of `hub_webhook_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookResult {
    Sent = 0,
    Retried = 1,
    Dropped = 2,
}

impl WebhookResult {
    pub const ALL: [WebhookResult; 3] = [
        WebhookResult::Sent,
        WebhookResult::Retried,
        WebhookResult::Dropped,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookResult::Sent => "sent",
            WebhookResult::Retried => "retried",
            WebhookResult::Dropped => "dropped",
        }
    }
}

static META: Metadata<'static> = Metadata::new("hub", metrics::Level::INFO, Some("hub::metrics"));

impl Metrics {
    /// Builds a private Prometheus recorder (no global state, so tests may build several) and
    /// registers every metric so that each appears in `/metrics` from the start.
    pub fn new() -> Metrics {
        let rec = PrometheusBuilder::new().build_recorder();
        let describe = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            let key = KeyName::from_const_str(name);
            let help = SharedString::const_str(help);
            match name {
                CONNECTIONS | CONNECTIONS_MAX | CHANNELS | REDIS_UP | READY | PRESENCE_USERS
                | PRESENCE_ANONYMOUS | WEBHOOK_PENDING => rec.describe_gauge(key, unit, help),
                _ => rec.describe_counter(key, unit, help),
            }
        };
        describe(CONNECTIONS, None, "Open streams by transport.");
        describe(
            PRESENCE_USERS,
            None,
            "Distinct users (token sub) with a stream on this node.",
        );
        describe(
            PRESENCE_ANONYMOUS,
            None,
            "Streams on this node without a token.",
        );
        describe(
            WEBHOOK_EVENTS,
            None,
            "Webhook events sent (2xx), sent again (retried) or given up (dropped), by this node.",
        );
        describe(
            WEBHOOK_PENDING,
            None,
            "Webhook events waiting to be sent (over every node in Redis mode).",
        );
        describe(CONNECTIONS_MAX, None, "Configured HUB_MAX_CONNECTIONS.");
        describe(CONNECTIONS_OPENED, None, "Streams opened, by transport.");
        describe(
            CONNECTIONS_CLOSED,
            None,
            "Streams closed, by transport and reason.",
        );
        describe(
            CONNECTIONS_REJECTED,
            None,
            "Stream requests refused, by reason.",
        );
        describe(
            CHANNELS,
            None,
            "Channels with at least one local subscriber.",
        );
        describe(
            MESSAGES_RECEIVED,
            None,
            "Messages received for fan-out, by source.",
        );
        describe(
            MESSAGES_DELIVERED,
            None,
            "Messages written to a stream (one per stream).",
        );
        describe(MESSAGES_DROPPED, None, "Messages not delivered, by reason.");
        describe(HEARTBEATS_SENT, None, "Heartbeats queued to streams.");
        describe(STALE_CLOSED, None, "Streams closed by the stale sweep.");
        describe(
            REDIS_UP,
            None,
            "1 while the Redis subscription is up (always 1 on the embedded broker).",
        );
        describe(REDIS_RECONNECTS, None, "Reconnections to Redis.");
        describe(
            READY,
            None,
            "1 while the node accepts streams (/readyz answers 200): not draining, broker up.",
        );
        describe(
            HISTORY_REPLAYED,
            None,
            "Messages replayed from history (resume, readers catching up, backfill).",
        );
        describe(
            HISTORY_READS,
            None,
            "History reads made for streams (each bounded, shared by every reader of a page).",
        );
        describe(
            HISTORY_UNREADABLE,
            None,
            "Channels whose history could not be read (their readers were reset).",
        );

        let counter = |name: &'static str, labels: Vec<Label>| {
            rec.register_counter(&Key::from_parts(name, labels), &META)
        };
        let gauge = |name: &'static str, labels: Vec<Label>| {
            rec.register_gauge(&Key::from_parts(name, labels), &META)
        };
        let t = |t: Transport| Label::new("transport", t.as_str());

        let m = Metrics {
            connections: Transport::ALL.map(|tr| gauge(CONNECTIONS, vec![t(tr)])),
            connections_max: gauge(CONNECTIONS_MAX, vec![]),
            opened: Transport::ALL.map(|tr| counter(CONNECTIONS_OPENED, vec![t(tr)])),
            closed: Transport::ALL.map(|tr| {
                CloseReason::ALL.map(|r| {
                    counter(
                        CONNECTIONS_CLOSED,
                        vec![t(tr), Label::new("reason", r.as_str())],
                    )
                })
            }),
            rejected: RejectReason::ALL
                .map(|r| counter(CONNECTIONS_REJECTED, vec![Label::new("reason", r.as_str())])),
            channels: gauge(CHANNELS, vec![]),
            received: Source::ALL
                .map(|s| counter(MESSAGES_RECEIVED, vec![Label::new("source", s.as_str())])),
            delivered: counter(MESSAGES_DELIVERED, vec![]),
            dropped: DropReason::ALL
                .map(|r| counter(MESSAGES_DROPPED, vec![Label::new("reason", r.as_str())])),
            latency: LatencyHistogram::new(),
            heartbeats: counter(HEARTBEATS_SENT, vec![]),
            stale_closed: counter(STALE_CLOSED, vec![]),
            redis_up: gauge(REDIS_UP, vec![]),
            redis_reconnects: counter(REDIS_RECONNECTS, vec![]),
            history_replayed: counter(HISTORY_REPLAYED, vec![]),
            history_reads: counter(HISTORY_READS, vec![]),
            history_unreadable: counter(HISTORY_UNREADABLE, vec![]),
            ready: gauge(READY, vec![]),
            presence_users: gauge(PRESENCE_USERS, vec![]),
            presence_anonymous: gauge(PRESENCE_ANONYMOUS, vec![]),
            webhook_events: WebhookResult::ALL
                .map(|r| counter(WEBHOOK_EVENTS, vec![Label::new("result", r.as_str())])),
            webhook_pending: gauge(WEBHOOK_PENDING, vec![]),
            handle: rec.handle(),
        };
        // Counters appear in the output only once touched.
        for c in m
            .opened
            .iter()
            .chain(m.closed.iter().flatten())
            .chain(&m.rejected)
            .chain(&m.received)
            .chain(&m.dropped)
            .chain(&m.webhook_events)
        {
            c.increment(0);
        }
        for c in [
            &m.delivered,
            &m.heartbeats,
            &m.stale_closed,
            &m.redis_reconnects,
            &m.history_replayed,
            &m.history_reads,
            &m.history_unreadable,
        ] {
            c.increment(0);
        }
        for g in m.connections.iter().chain([
            &m.channels,
            &m.redis_up,
            &m.ready,
            &m.presence_users,
            &m.presence_anonymous,
            &m.webhook_pending,
        ]) {
            g.set(0.0);
        }
        m
    }

    pub fn webhook(&self, r: WebhookResult) -> &Counter {
        &self.webhook_events[r as usize]
    }

    pub fn closed(&self, t: Transport, r: CloseReason) -> &Counter {
        &self.closed[t as usize][r.index()]
    }
    pub fn rejected(&self, r: RejectReason) -> &Counter {
        &self.rejected[r as usize]
    }
    pub fn received(&self, s: Source) -> &Counter {
        &self.received[s as usize]
    }
    pub fn dropped(&self, r: DropReason) -> &Counter {
        &self.dropped[r as usize]
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut text = self.handle.render();
        text.push('\n');
        self.latency.render(&mut text);
        text
    }

    /// Housekeeping of the exporter; call every few seconds.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_metric_is_rendered_from_the_start() {
        let m = Metrics::new();
        let text = m.render();
        for name in [
            CONNECTIONS,
            CONNECTIONS_MAX,
            CONNECTIONS_OPENED,
            CONNECTIONS_CLOSED,
            CONNECTIONS_REJECTED,
            CHANNELS,
            MESSAGES_RECEIVED,
            MESSAGES_DELIVERED,
            MESSAGES_DROPPED,
            HEARTBEATS_SENT,
            STALE_CLOSED,
            REDIS_UP,
            REDIS_RECONNECTS,
            HISTORY_REPLAYED,
        ] {
            assert!(
                text.contains(&format!("\n{name}")) || text.starts_with(name),
                "{name} missing:\n{text}"
            );
        }
        assert!(
            text.contains(
                r#"hub_connections_closed_total{transport="ws",reason="token_expired"} 0"#
            ),
            "{text}"
        );
        m.latency.record(0.002);
        m.upkeep();
        let text = m.render();
        assert!(
            text.contains("hub_delivery_latency_seconds_bucket{le=\"0.0025\"} 1"),
            "{text}"
        );
    }
}
