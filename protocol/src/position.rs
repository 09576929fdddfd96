//! Positions: where a message stands in its channel, and the SSE cursor over several channels.
//!
//! A [`StreamId`] is `<ms>-<seq>`, the format of Redis stream entry ids, so the embedded and the
//! Redis broker hand out the same kind of id. A [`Cursor`] is what an SSE stream puts in `id:`;
//! it is opaque to clients. This module holds no state.

use std::fmt;
use std::str::FromStr;

/// A message's position in its channel: strictly increasing per channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };

    pub const fn new(ms: u64, seq: u64) -> Self {
        StreamId { ms, seq }
    }

    /// The id that follows `self` at wall-clock time `now_ms` (Redis' rule for `XADD *`).
    pub fn next(self, now_ms: u64) -> StreamId {
        if now_ms > self.ms {
            StreamId::new(now_ms, 0)
        } else {
            StreamId::new(self.ms, self.seq + 1)
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// `s` is not of the form `<ms>-<seq>` with two decimal numbers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a stream position (<ms>-<seq>)")]
pub struct BadStreamId;

impl FromStr for StreamId {
    type Err = BadStreamId;
    fn from_str(s: &str) -> Result<Self, BadStreamId> {
        let (ms, seq) = s.split_once('-').ok_or(BadStreamId)?;
        let num = |p: &str| {
            if p.is_empty() || p.len() > 20 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(BadStreamId);
            }
            p.parse::<u64>().map_err(|_| BadStreamId)
        };
        Ok(StreamId::new(num(ms)?, num(seq)?))
    }
}

/// The SSE `id:` of a stream: the position of each of its channels.
///
/// One channel: the position itself, so it equals the id the publisher got back.
/// Several: `<fingerprint>:<p1>,<p2>,...` in the order of the stream's sorted channel list, where
/// the fingerprint (FNV-1a of that list) makes an id from another channel set unreadable instead
/// of wrongly readable.
pub struct Cursor;

impl Cursor {
    /// FNV-1a (32-bit) over the channel names, each followed by a newline.
    pub fn fingerprint<S: AsRef<str>>(channels: &[S]) -> u32 {
        let mut h: u32 = 0x811c_9dc5;
        for c in channels {
            for &b in c.as_ref().as_bytes().iter().chain(b"\n") {
                h ^= u32::from(b);
                h = h.wrapping_mul(0x0100_0193);
            }
        }
        h
    }

    /// Encodes positions; `fingerprint` is only written when there are several.
    pub fn encode(fingerprint: u32, positions: &[StreamId]) -> String {
        use fmt::Write;
        if let [one] = positions {
            return one.to_string();
        }
        let mut s = String::with_capacity(9 + positions.len() * 17);
        let _ = write!(s, "{fingerprint:08x}:");
        for (i, p) in positions.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "{p}");
        }
        s
    }

    /// Decodes an id for a stream of `count` channels with `fingerprint`; `None` when it cannot
    /// be read for that stream.
    pub fn decode(s: &str, count: usize, fingerprint: u32) -> Option<Vec<StreamId>> {
        if count == 1 {
            return s.parse().ok().map(|p| vec![p]);
        }
        let (fp, rest) = s.split_once(':')?;
        if fp.len() != 8 || u32::from_str_radix(fp, 16).ok()? != fingerprint {
            return None;
        }
        let positions: Vec<StreamId> = rest
            .split(',')
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        (positions.len() == count).then_some(positions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_id_text_round_trip() {
        let id: StreamId = "1700000000000-3".parse().unwrap();
        assert_eq!(id, StreamId::new(1_700_000_000_000, 3));
        assert_eq!(id.to_string(), "1700000000000-3");
        for bad in [
            "",
            "1",
            "-1",
            "1-",
            "a-1",
            "1-2-3",
            "+1-2",
            "1 -2",
            "99999999999999999999999-0",
        ] {
            assert!(bad.parse::<StreamId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn next_follows_redis_rules() {
        assert_eq!(StreamId::new(5, 2).next(9), StreamId::new(9, 0));
        assert_eq!(StreamId::new(5, 2).next(5), StreamId::new(5, 3));
        // A clock that went back does not make ids go back.
        assert_eq!(StreamId::new(5, 2).next(4), StreamId::new(5, 3));
    }

    #[test]
    fn single_channel_cursor_is_the_position() {
        let p = [StreamId::new(10, 1)];
        assert_eq!(Cursor::encode(7, &p), "10-1");
        assert_eq!(Cursor::decode("10-1", 1, 7), Some(p.to_vec()));
    }

    #[test]
    fn multi_channel_cursor_round_trip_and_fingerprint() {
        let chans = ["a", "b"];
        let fp = Cursor::fingerprint(&chans);
        let p = [StreamId::new(10, 1), StreamId::new(0, 0)];
        let s = Cursor::encode(fp, &p);
        assert_eq!(s, format!("{fp:08x}:10-1,0-0"));
        assert_eq!(Cursor::decode(&s, 2, fp), Some(p.to_vec()));
        // Another channel set, another count, or junk: unreadable.
        assert_eq!(
            Cursor::decode(&s, 2, Cursor::fingerprint(&["a", "c"])),
            None
        );
        assert_eq!(Cursor::decode(&s, 3, fp), None);
        assert_eq!(Cursor::decode("garbage", 2, fp), None);
        assert_ne!(
            Cursor::fingerprint(&["ab"]),
            Cursor::fingerprint(&["a", "b"])
        );
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn id() -> impl Strategy<Value = StreamId> {
            (any::<u64>(), any::<u64>()).prop_map(|(ms, seq)| StreamId::new(ms, seq))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(10_000))]

            /// Any text reads as a position or not, without panicking; a position reads back as
            /// itself.
            #[test]
            fn positions_parse_or_refuse(s in "\\PC{0,48}|[0-9-]{0,44}") {
                if let Ok(p) = s.parse::<StreamId>() {
                    prop_assert_eq!(p.to_string().parse::<StreamId>(), Ok(p));
                }
            }

            #[test]
            fn positions_round_trip(p in id()) {
                prop_assert_eq!(p.to_string().parse::<StreamId>(), Ok(p));
            }

            /// A cursor decodes to the positions it was made of, for its own channel set only;
            /// any other text (a Last-Event-ID in any form) is refused, never a panic.
            #[test]
            fn cursors_round_trip_for_their_channels_only(
                ps in proptest::collection::vec(id(), 1..6),
                names in proptest::collection::vec("[a-z]{1,6}", 6),
                junk in "\\PC{0,64}",
            ) {
                let chans = &names[..ps.len()];
                let fp = Cursor::fingerprint(chans);
                let s = Cursor::encode(fp, &ps);
                prop_assert_eq!(Cursor::decode(&s, ps.len(), fp), Some(ps.clone()));
                if ps.len() > 1 {
                    prop_assert_eq!(Cursor::decode(&s, ps.len(), fp ^ 1), None);
                    prop_assert_eq!(Cursor::decode(&s, ps.len() + 1, fp), None);
                }
                let _ = Cursor::decode(&junk, ps.len(), fp);
            }
        }
    }
}
