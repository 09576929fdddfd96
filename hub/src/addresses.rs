//! Client addresses: which address a stream request comes from (the peer, or behind
//! `HUB_TRUSTED_PROXIES` the right-most `X-Forwarded-For` hop that is not a trusted proxy), and
//! the per-address limits: streams held (`HUB_MAX_STREAMS_PER_IP`) and new streams per second
//! (`HUB_CONNECT_RATE_PER_IP`). No I/O. Memory is bounded: counts exist only for addresses
//! holding streams, and rate buckets are capped at [`MAX_BUCKETS`] (full ones pruned first).
//! Also which refusals are held back ([`Addresses::hold`]): an address refused more than a few
//! times a second is answered only after [`HOLD`] to twice that, on shared ticks, at most
//! `max_held` at once.

use crate::domain::RejectReason;
use crate::ratelimit::Buckets;
use ipnet::IpNet;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rate buckets kept at most (about 64 bytes each: 4 MB). An attacker rotating addresses faster
/// than buckets refill makes the oldest be forgotten (they start full again), never memory grow.
pub const MAX_BUCKETS: usize = 65_536;
/// How long, at least, the answer to a refusal beyond [`REFUSALS_BURST`] (and
/// [`REFUSALS_RATE`] a second) to one address is held back: the longest `Retry-After` the hub
/// gives. A client that asks again at once (a flood, a buggy retry loop) is then served no
/// faster than it was told to ask, instead of costing the node an accept, a head and an answer
/// as fast as it can ask. Held answers are spread over `HOLD` to twice that (see
/// [`Addresses::held_until`]).
pub const HOLD: Duration = Duration::from_secs(5);
/// Held answers leave on ticks this far apart (see [`Addresses::tick`]).
const TICK: Duration = Duration::from_millis(100);
/// Refusals a second one address is answered at once (after [`REFUSALS_BURST`]).
const REFUSALS_RATE: f64 = 1.0;
/// Refusals in a row one address is answered at once (a page with a few tabs over its limit).
const REFUSALS_BURST: f64 = 4.0;
/// `X-Forwarded-For` hops looked at, at most (a header is bounded by the head's size anyway).
const MAX_HOPS: usize = 32;

/// The key an address is limited by: IPv4 whole, IPv6 by its /64 (one host's share of a
/// network; an attacker owns a /64 as easily as one address of it).
fn key_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// See the module doc.
pub struct Addresses {
    trusted: Vec<IpNet>,
    max_streams: u32,
    rate: f64,
    /// Streams per address key; an entry exists only while the address holds one.
    streams: Mutex<HashMap<IpAddr, u32>>,
    buckets: Buckets<IpAddr>,
    /// Refusals answered at once, per address key (bounded as `buckets`).
    refusals: Buckets<IpAddr>,
    /// Refusals held back now, and at most (each holds a socket: the budget of files beyond
    /// the streams, see `node::build`).
    held: AtomicUsize,
    max_held: usize,
    /// The start of the ticks held answers leave on (see [`Addresses::tick`]).
    epoch: Instant,
}

/// A refusal held back: one of `max_held` places, given back when dropped.
pub struct Held {
    addresses: Arc<Addresses>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.addresses.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A place an address holds for one stream; given back when dropped.
pub struct AddressPlace {
    addresses: Arc<Addresses>,
    key: IpAddr,
}

impl Drop for AddressPlace {
    fn drop(&mut self) {
        let mut streams = self.addresses.streams.lock();
        if let Some(n) = streams.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                streams.remove(&self.key);
            }
        }
    }
}

/// Why an address was refused, and when to come back (a rate refusal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressRefusal {
    pub reason: RejectReason,
    pub retry_after: Duration,
}

impl Addresses {
    pub fn new(trusted: Vec<IpNet>, max_streams: u64, rate: u64, max_held: usize) -> Addresses {
        Addresses {
            trusted,
            max_streams: u32::try_from(max_streams).unwrap_or(u32::MAX),
            rate: rate as f64,
            streams: Mutex::new(HashMap::new()),
            buckets: Buckets::default(),
            refusals: Buckets::default(),
            held: AtomicUsize::new(0),
            max_held,
            epoch: Instant::now(),
        }
    }

    /// When a refusal held back now is answered: after [`HOLD`] to twice that, spread so that
    /// answers held together (a flood's burst) do not all come back, and ask again, together;
    /// on a tick (see [`Addresses::tick`]). A flooding address asks at most as often as its
    /// connections, divided by the hold or by its own patience: a client that gives up before
    /// its answer (many time out within 10 s) costs the node no answer at all.
    pub fn held_until(&self, now: Instant) -> Instant {
        self.tick(now + HOLD + HOLD.mul_f64(fastrand::f64()))
    }

    /// `at` rounded up to the next [`TICK`]: held answers due within one tick leave together,
    /// in one wake-up of the worker, and the requests they send back come together.
    pub fn tick(&self, at: Instant) -> Instant {
        let since = at.saturating_duration_since(self.epoch).as_nanos();
        let tick = TICK.as_nanos();
        let ticks = since.div_ceil(tick);
        let rounded = u64::try_from(ticks * tick).unwrap_or(u64::MAX);
        self.epoch + Duration::from_nanos(rounded)
    }

    /// Whether the answer to a per-address refusal of `ip` (just refused) is held back for
    /// [`HOLD`]: yes beyond [`REFUSALS_BURST`] refusals in a row and [`REFUSALS_RATE`] a second,
    /// while fewer than `max_held` are; the returned place is kept while the answer waits.
    /// Past `max_held` an answer goes at once, as every one did before.
    pub fn hold(self: &Arc<Self>, ip: Option<IpAddr>, now: Instant) -> Option<Held> {
        let key = key_of(ip?);
        let at_once =
            self.refusals
                .take_bounded(key, REFUSALS_RATE, REFUSALS_BURST, now, MAX_BUCKETS);
        if at_once.is_ok() {
            return None;
        }
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_held).then_some(n + 1)
            })
            .ok()?;
        Some(Held {
            addresses: self.clone(),
        })
    }

    /// Refusals held back now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Whether any per-address limit is on.
    pub fn limits(&self) -> bool {
        self.max_streams > 0 || self.rate > 0.0
    }

    /// The client's address: the peer's, or, when the peer is a trusted proxy, the right-most
    /// address of `X-Forwarded-For` (all its headers, in order) that is not a trusted proxy (the
    /// left-most when all are). A malformed hop ends the walk there: the address before it
    /// (the last one trusted said so) is taken.
    pub fn client(&self, peer: Option<SocketAddr>, forwarded: &[&str]) -> Option<IpAddr> {
        let mut addr = peer?.ip();
        if !self.is_trusted(addr) {
            return Some(addr);
        }
        let hops: Vec<&str> = forwarded
            .iter()
            .flat_map(|h| h.split(','))
            .map(str::trim)
            .collect();
        for hop in hops.iter().rev().take(MAX_HOPS) {
            let Some(ip) = parse_hop(hop) else {
                break;
            };
            addr = ip;
            if !self.is_trusted(ip) {
                break;
            }
        }
        Some(addr)
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.trusted.iter().any(|n| n.contains(&ip))
    }

    /// Takes a place for a new stream of `ip`: first a token of its connect rate, then a place
    /// under its stream limit. `Ok(None)` when no limit is on (nothing is kept).
    pub fn admit(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
        now: Instant,
    ) -> Result<Option<AddressPlace>, AddressRefusal> {
        let (Some(ip), true) = (ip, self.limits()) else {
            return Ok(None);
        };
        let key = key_of(ip);
        if self.rate > 0.0 {
            let burst = 2.0 * self.rate;
            self.buckets
                .take_bounded(key, self.rate, burst, now, MAX_BUCKETS)
                .map_err(|wait| AddressRefusal {
                    reason: RejectReason::RateLimited,
                    retry_after: wait,
                })?;
        }
        if self.max_streams == 0 {
            return Ok(None);
        }
        let mut streams = self.streams.lock();
        let n = streams.entry(key).or_insert(0);
        if *n >= self.max_streams {
            return Err(AddressRefusal {
                reason: RejectReason::IpLimit,
                retry_after: Duration::from_secs(5),
            });
        }
        *n += 1;
        Ok(Some(AddressPlace {
            addresses: self.clone(),
            key,
        }))
    }

    /// Forgets the rate buckets that are full again (the node's sweep and tick call it).
    pub fn prune(&self, now: Instant) {
        if self.rate > 0.0 {
            self.buckets.prune(now, Duration::from_secs_f64(2.0));
        }
        self.refusals
            .prune(now, Duration::from_secs_f64(REFUSALS_BURST / REFUSALS_RATE));
    }

    /// Addresses holding streams, and rate buckets kept (for tests and `/v1/stats`).
    pub fn sizes(&self) -> (usize, usize) {
        (self.streams.lock().len(), self.buckets.len())
    }
}

/// One `X-Forwarded-For` hop: an address, possibly with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    hop.parse::<SocketAddr>().ok().map(|s| s.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(trusted: &[&str], max: u64, rate: u64) -> Arc<Addresses> {
        Arc::new(Addresses::new(
            trusted.iter().map(|t| t.parse().unwrap()).collect(),
            max,
            rate,
            2,
        ))
    }

    fn peer(s: &str) -> Option<SocketAddr> {
        Some(SocketAddr::new(s.parse().unwrap(), 1))
    }

    #[test]
    fn held_answers_leave_on_shared_ticks() {
        let a = addrs(&[], 0, 0);
        let at = a.epoch + Duration::from_millis(3_217);
        let tick = a.tick(at);
        assert_eq!(tick, a.epoch + Duration::from_millis(3_300));
        // Every instant of that tick leaves with it; the next tick's do not.
        assert_eq!(a.tick(a.epoch + Duration::from_millis(3_201)), tick);
        assert_eq!(a.tick(a.epoch + Duration::from_millis(3_300)), tick);
        assert_eq!(a.tick(a.epoch + Duration::from_millis(3_301)), tick + TICK);
        // Never earlier than asked.
        for ms in 0..1_000 {
            let at = a.epoch + Duration::from_micros(ms * 1_317);
            assert!(a.tick(at) >= at && a.tick(at) < at + TICK);
        }
        // Held answers: after HOLD to twice that, on a tick, spread over the whole range.
        let now = a.epoch + Duration::from_millis(1_234);
        let (mut first, mut last) = (now + 2 * HOLD + TICK, now);
        for _ in 0..1_000 {
            let until = a.held_until(now);
            assert!(until >= now + HOLD && until <= now + 2 * HOLD + TICK);
            assert_eq!(a.tick(until), until, "on a tick");
            (first, last) = (first.min(until), last.max(until));
        }
        assert!(first < now + HOLD + HOLD / 4 && last > now + 2 * HOLD - HOLD / 4);
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let a = addrs(&["10.0.0.0/8", "::1/128"], 0, 0);
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        // Untrusted peer: its own address, whatever it claims.
        assert_eq!(a.client(peer("1.2.3.4"), &["9.9.9.9"]), ip("1.2.3.4"));
        // Trusted peer: right-most untrusted hop; spoofed hops to its left are ignored.
        assert_eq!(
            a.client(peer("10.0.0.1"), &["6.6.6.6, 5.5.5.5", "10.0.0.2"]),
            ip("5.5.5.5")
        );
        // All trusted: the left-most.
        assert_eq!(a.client(peer("10.0.0.1"), &["10.1.1.1"]), ip("10.1.1.1"));
        // None: the proxy itself.
        assert_eq!(a.client(peer("10.0.0.1"), &[]), ip("10.0.0.1"));
        // A malformed hop ends the walk.
        assert_eq!(
            a.client(peer("10.0.0.1"), &["5.5.5.5, junk"]),
            ip("10.0.0.1")
        );
        // Ports and IPv6.
        assert_eq!(
            a.client(peer("::1"), &["[2001:db8::1]:443"]),
            ip("2001:db8::1")
        );
    }

    #[test]
    fn streams_per_address_are_given_back_and_ipv6_counts_by_its_64() {
        let a = addrs(&[], 2, 0);
        let now = Instant::now();
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let one = a.admit(ip("2001:db8::1"), now).unwrap();
        let _two = a.admit(ip("2001:db8::2"), now).unwrap();
        let e = a.admit(ip("2001:db8::3"), now).err().unwrap();
        assert_eq!(e.reason, RejectReason::IpLimit);
        assert!(a.admit(ip("2001:db9::1"), now).is_ok(), "another /64");
        drop(one);
        assert!(a.admit(ip("2001:db8::3"), now).unwrap().is_some());
        assert!(addrs(&[], 0, 0)
            .admit(ip("1.1.1.1"), now)
            .unwrap()
            .is_none());
    }

    #[test]
    fn refusals_beyond_a_few_a_second_are_held_up_to_the_cap() {
        let a = addrs(&[], 1, 0);
        let now = Instant::now();
        let ip = Some("1.1.1.1".parse::<IpAddr>().unwrap());
        let other = Some("2.2.2.2".parse::<IpAddr>().unwrap());
        for _ in 0..REFUSALS_BURST as usize {
            assert!(a.hold(ip, now).is_none(), "the first ones go at once");
        }
        let first = a.hold(ip, now).expect("beyond the burst: held");
        let second = a.hold(ip, now).expect("held");
        assert_eq!(a.held(), 2);
        assert!(a.hold(ip, now).is_none(), "past max_held (2): at once");
        assert!(
            a.hold(other, now).is_none(),
            "another address has its own burst"
        );
        drop(first);
        assert!(
            a.hold(ip, now).is_some(),
            "a place given back is taken again"
        );
        drop(second);
        // A second later one more goes at once; unknown addresses are never held.
        assert!(a.hold(ip, now + Duration::from_secs(1)).is_none());
        assert!(a.hold(None, now).is_none());
        assert_eq!(a.held(), 0);
        a.prune(now + Duration::from_secs(10));
        assert_eq!(a.refusals.len(), 0);
    }

    #[test]
    fn the_connect_rate_has_a_burst_of_twice_the_rate_and_the_buckets_are_bounded() {
        let a = addrs(&[], 0, 2);
        let now = Instant::now();
        let ip = Some("1.1.1.1".parse::<IpAddr>().unwrap());
        for _ in 0..4 {
            assert!(a.admit(ip, now).is_ok());
        }
        let e = a.admit(ip, now).err().unwrap();
        assert_eq!(e.reason, RejectReason::RateLimited);
        assert!(e.retry_after <= Duration::from_millis(500));
        assert!(a.admit(ip, now + Duration::from_millis(500)).is_ok());
        // Rotating addresses: the buckets never pass the cap.
        for i in 0..(MAX_BUCKETS as u32 + 10_000) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            let _ = a.admit(Some(ip), now);
        }
        assert!(a.sizes().1 <= MAX_BUCKETS, "{:?}", a.sizes());
        a.prune(now + Duration::from_secs(5));
        assert_eq!(a.sizes(), (0, 0));
    }
}
