//! Token buckets: `rate` tokens a second, bursts of `burst`; a take that finds none says how
//! long until one is back. [`Bucket`] is one (a WebSocket's budget of costly requests);
//! [`Buckets`] holds one per key (HTTP publishes per channel, a namespace's `publish_rate`), one
//! small entry per key limited recently, full ones dropped by [`Buckets::prune`].

use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// One token bucket, full when made.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    /// Takes one token (refilled at `rate` a second up to `burst`): `Err(wait)` when there is
    /// none, with the time until there is.
    pub fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / rate.max(f64::MIN_POSITIVE),
            ))
        }
    }
}

/// Buckets by key, behind one lock (a take is a few arithmetic operations).
pub struct Buckets<K> {
    map: Mutex<HashMap<K, Bucket>>,
}

impl<K: Eq + Hash> Default for Buckets<K> {
    fn default() -> Self {
        Buckets {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash> Buckets<K> {
    /// Takes one token from `key`'s bucket (filled at `rate` a second up to `burst`, full at
    /// first): `Err(wait)` when there is none, with the time until there is.
    pub fn take(&self, key: K, rate: f64, burst: f64, now: Instant) -> Result<(), Duration>
    where
        K: Clone,
    {
        self.take_bounded(key, rate, burst, now, usize::MAX)
    }

    /// [`Buckets::take`], keeping at most `cap` buckets: a new key at the cap first drops the
    /// buckets that are full again (nothing to remember), and if that is not enough an eighth
    /// of the others (they start full again), so that the next inserts are cheap.
    pub fn take_bounded(
        &self,
        key: K,
        rate: f64,
        burst: f64,
        now: Instant,
        cap: usize,
    ) -> Result<(), Duration>
    where
        K: Clone,
    {
        let mut map = self.map.lock();
        if map.len() >= cap && !map.contains_key(&key) {
            let full_after = Duration::from_secs_f64(burst / rate.max(f64::MIN_POSITIVE));
            map.retain(|_, b| now.saturating_duration_since(b.at) < full_after);
            if map.len() >= cap {
                let gone: Vec<K> = map.keys().take(cap / 8 + 1).cloned().collect();
                for k in gone {
                    map.remove(&k);
                }
            }
        }
        map.entry(key)
            .or_insert(Bucket::full(burst, now))
            .take(rate, burst, now)
    }

    /// Drops the buckets that would be full by `now` (nothing to remember), given each key's
    /// refill time `full_after`.
    pub fn prune(&self, now: Instant, full_after: Duration) {
        self.map
            .lock()
            .retain(|_, b| now.saturating_duration_since(b.at) < full_after);
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let b = Buckets::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(b.take("c", 3.0, 3.0, t0).is_ok());
        }
        let wait = b.take("c", 3.0, 3.0, t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(300) && wait <= Duration::from_millis(334),
            "{wait:?}"
        );
        assert!(b
            .take("c", 3.0, 3.0, t0 + Duration::from_millis(340))
            .is_ok());
        assert!(b.take("other", 3.0, 3.0, t0).is_ok(), "per key");
        b.prune(t0 + Duration::from_secs(10), Duration::from_secs(1));
        assert!(b.is_empty());
    }
}
