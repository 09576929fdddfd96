//! Reports: what one `hold` process saw, in a form that merges across processes.
//!
//! Latencies travel as (microseconds, count) pairs of an HDR histogram so that merging is exact.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency recorded (60 s); anything above is clamped.
pub const MAX_LATENCY_US: u64 = 60_000_000;

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct HoldReport {
    pub streams_wanted: u64,
    pub streams_opened: u64,
    pub streams_failed: u64,
    /// Streams that ended before the hold was over.
    pub streams_ended: u64,
    /// Seconds from the first connect attempt to the last `200` answer.
    pub connect_secs: f64,
    pub deliveries: u64,
    /// Streams that stopped reading on purpose (`--stall`).
    #[serde(default)]
    pub streams_stalled: u64,
    /// Messages a stream saw twice (seq at or below one it already had).
    pub duplicates: u64,
    /// Messages a stream should have had (by its channel's sequence numbers) but never saw.
    #[serde(default)]
    pub gaps: u64,
    /// Streams that came back after the server ended them (`--reconnect`).
    #[serde(default)]
    pub reconnects: u64,
    /// Streams that were dropped and had not come back when the hold ended.
    #[serde(default)]
    pub still_down: u64,
    /// Reconnect attempts that failed and were tried again.
    #[serde(default)]
    pub reconnect_retries: u64,
    /// Failed connection attempts by reason.
    #[serde(default)]
    pub failures: std::collections::BTreeMap<String, u64>,
    /// Per stream, time from its drop to its return, as (microseconds, count).
    #[serde(default)]
    pub resume_us: Vec<(u64, u64)>,
    /// Per returning stream, time from its return to having every message.
    #[serde(default)]
    pub catchup_us: Vec<(u64, u64)>,
    /// Churn: streams closed on purpose and opened again.
    #[serde(default)]
    pub churn_cycles: u64,
    /// Bytes read off the streams' sockets after their response heads (compressed or not).
    #[serde(default)]
    pub wire_bytes: u64,
    /// Reads of the streams' sockets that returned bytes (after the heads): deliveries per
    /// read is how many messages a wake-up of the client brought.
    #[serde(default)]
    pub reads: u64,
    /// Unix micros of the first drop and of the last reopen after a drop.
    #[serde(default)]
    pub first_drop_us: Option<u64>,
    #[serde(default)]
    pub last_reopen_us: Option<u64>,
    /// Fewest and most messages any stream received.
    pub min_per_stream: u64,
    pub max_per_stream: u64,
    /// Latency histogram as (microseconds, count).
    pub latency_us: Vec<(u64, u64)>,
}

impl HoldReport {
    pub fn merge(&mut self, o: &HoldReport) {
        let first = self.streams_wanted == 0;
        self.streams_wanted += o.streams_wanted;
        self.streams_opened += o.streams_opened;
        self.streams_failed += o.streams_failed;
        self.streams_ended += o.streams_ended;
        self.connect_secs = self.connect_secs.max(o.connect_secs);
        self.deliveries += o.deliveries;
        self.duplicates += o.duplicates;
        self.gaps += o.gaps;
        self.reconnects += o.reconnects;
        self.still_down += o.still_down;
        self.reconnect_retries += o.reconnect_retries;
        for (k, v) in &o.failures {
            *self.failures.entry(k.clone()).or_default() += v;
        }
        self.resume_us = merge_pairs(&self.resume_us, &o.resume_us);
        self.catchup_us = merge_pairs(&self.catchup_us, &o.catchup_us);
        self.churn_cycles += o.churn_cycles;
        self.wire_bytes += o.wire_bytes;
        self.reads += o.reads;
        self.first_drop_us = match (self.first_drop_us, o.first_drop_us) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_reopen_us = self.last_reopen_us.max(o.last_reopen_us);
        self.streams_stalled += o.streams_stalled;
        self.min_per_stream = if first {
            o.min_per_stream
        } else {
            self.min_per_stream.min(o.min_per_stream)
        };
        self.max_per_stream = self.max_per_stream.max(o.max_per_stream);
        self.latency_us = merge_pairs(&self.latency_us, &o.latency_us);
    }

    pub fn histogram(&self) -> Histogram<u64> {
        from_pairs(&self.latency_us)
    }
}

/// A histogram given as (microseconds, count) pairs.
pub fn from_pairs(p: &[(u64, u64)]) -> Histogram<u64> {
    let mut h = histogram();
    for &(v, c) in p {
        let _ = h.record_n(v.clamp(1, MAX_LATENCY_US), c);
    }
    h
}

/// Two histograms given as pairs, merged.
pub fn merge_pairs(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut h = from_pairs(a);
    let _ = h.add(from_pairs(b));
    pairs(&h)
}

pub fn pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_is_exact() {
        let mut a = HoldReport {
            streams_wanted: 1,
            min_per_stream: 5,
            max_per_stream: 5,
            ..Default::default()
        };
        let mut h = histogram();
        h.record_n(1000, 3).unwrap();
        a.latency_us = pairs(&h);
        let mut b = HoldReport {
            streams_wanted: 2,
            min_per_stream: 2,
            max_per_stream: 7,
            ..Default::default()
        };
        let mut h = histogram();
        h.record_n(3000, 1).unwrap();
        b.latency_us = pairs(&h);
        let mut all = HoldReport::default();
        all.merge(&a);
        all.merge(&b);
        assert_eq!(
            (all.streams_wanted, all.min_per_stream, all.max_per_stream),
            (3, 2, 7)
        );
        let h = all.histogram();
        assert_eq!(h.len(), 4);
        assert_eq!(h.value_at_quantile(0.5), 1000);
        assert!(h.max() >= 3000 && h.max() < 3010);
    }
}
