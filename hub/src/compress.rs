//! Compression made once per message and shared by every stream that asked for it.
//!
//! - WebSocket `permessage-deflate` with `server_no_context_takeover` (RFC 7692): a message is
//!   one raw deflate stream of its own, flushed and without its last 4 bytes; the frame carries
//!   RSV1. The offer is negotiated here ([`negotiate_ws`]); client frames are inflated one at
//!   a time with nothing kept between them ([`inflate_ws`]).
//! - SSE with `Content-Encoding: gzip`: a stream is a gzip member whose deflate data is a run
//!   of independent segments. A shared message is deflated once ([`segment`]: a fresh
//!   compressor, ended by a sync flush, so it refers to nothing before it and ends on a byte
//!   boundary); what belongs to one stream (its `id:` cursor, heartbeats, `hub.connected`) goes
//!   in stored blocks ([`stored`]), which cost nothing to make. The CRC-32 the trailer needs is
//!   combined from each part's ([`Gzip`]), so no compressor and no window is kept per stream.
//!
//! No I/O and no stream state beyond [`Gzip`] (a CRC and a length).

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use parking_lot::Mutex;

/// The deflate sync flush's empty stored block: what RFC 7692 strips from each message.
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// The gzip member header: deflate, no flags, no time, unknown OS.
pub const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 0xff];
/// A final empty block (fixed Huffman: BFINAL=1, BTYPE=01, end of block), byte-aligned.
const FINAL_BLOCK: [u8; 2] = [0x03, 0x00];

/// Compressors kept for reuse, reset before each message (so each refers to nothing before
/// it): a compressor's state (about 300 KB) is made once, not per message, stream or thread
/// (a large channel's fan-out threads live for one fan-out). As many as ever ran at once,
/// at most [`SPARE_COMPRESSORS`] kept.
static DEFLATE: Mutex<Vec<Compress>> = Mutex::new(Vec::new());
const SPARE_COMPRESSORS: usize = 8;

/// `data` as one raw deflate stream of its own ending with a sync flush (byte-aligned, not
/// final): segments made this way may follow each other in one deflate stream.
pub fn segment(data: &[u8]) -> Bytes {
    let mut c = DEFLATE
        .lock()
        .pop()
        .unwrap_or_else(|| Compress::new(Compression::default(), false));
    c.reset();
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    let mut input = data;
    let deflated = loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(256));
        }
        let (spare, had) = (out.capacity() - out.len(), out.len());
        let before_in = c.total_in();
        if c.compress_vec(input, &mut out, FlushCompress::Sync)
            .is_err()
        {
            // Deflating memory cannot fail; stored blocks are always right.
            break stored(data);
        }
        input = &input[(c.total_in() - before_in) as usize..];
        // The flush is complete once all input is in and the output did not fill.
        if input.is_empty() && out.len() - had < spare {
            break Bytes::from(out);
        }
    };
    let mut spare = DEFLATE.lock();
    if spare.len() < SPARE_COMPRESSORS {
        spare.push(c);
    }
    deflated
}

/// A WebSocket message's compressed payload: its [`segment`] without the trailing
/// `00 00 ff ff`, as RFC 7692 sends it.
pub fn ws_payload(data: &[u8]) -> Bytes {
    let seg = segment(data);
    if seg.ends_with(&SYNC_TAIL) {
        seg.slice(..seg.len() - SYNC_TAIL.len())
    } else {
        seg
    }
}

/// `data` in stored (uncompressed) deflate blocks, not final: valid anywhere a segment is.
pub fn stored(data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 5 * (data.len() / 65_535 + 1));
    for chunk in data.chunks(65_535) {
        let len = chunk.len() as u16;
        out.put_u8(0x00);
        out.put_u16_le(len);
        out.put_u16_le(!len);
        out.put_slice(chunk);
    }
    out.freeze()
}

/// A message compressed once for gzip streams: its segment, the CRC-32 of what it holds, and
/// the operator that moves a stream's CRC past it (so each stream combines its CRC with a
/// message's in 32 steps; `crc32fast`'s `combine` rebuilds that operator on every call, about
/// 10 us for a 2 KB message, which at 10,000 streams was most of the cost of a gzip delivery).
#[derive(Debug, Clone)]
pub struct GzPart {
    pub deflated: Bytes,
    crc: u32,
    len: u64,
    shift: Box<[u32; 32]>,
}

impl GzPart {
    pub fn of(data: &[u8]) -> GzPart {
        GzPart {
            deflated: segment(data),
            crc: crc32fast::hash(data),
            len: data.len() as u64,
            shift: Box::new(zeros_operator(data.len() as u64)),
        }
    }
}

/// `mat` (a 32x32 matrix over GF(2), by columns) times `vec`.
fn gf2_times(mat: &[u32; 32], mut vec: u32) -> u32 {
    let mut sum = 0;
    let mut i = 0;
    while vec != 0 {
        if vec & 1 != 0 {
            sum ^= mat[i];
        }
        vec >>= 1;
        i += 1;
    }
    sum
}

/// `a` times `b` (apply `b`, then `a`).
fn gf2_compose(a: &[u32; 32], b: &[u32; 32]) -> [u32; 32] {
    std::array::from_fn(|n| gf2_times(a, b[n]))
}

/// The linear operator that advances a (finalized) CRC-32 past `len` zero bytes: with it,
/// CRC(A then B) = op(CRC(A)) ^ CRC(B) for |B| = `len` (zlib's crc32_combine, with the
/// operator kept instead of rebuilt).
fn zeros_operator(mut len: u64) -> [u32; 32] {
    // One zero bit: the reflected polynomial, then a shift.
    let mut odd: [u32; 32] =
        std::array::from_fn(|n| if n == 0 { 0xedb8_8320 } else { 1 << (n - 1) });
    let mut even = gf2_compose(&odd, &odd); // two bits
    odd = gf2_compose(&even, &even); // four bits
    let mut result: [u32; 32] = std::array::from_fn(|n| 1 << n);
    while len != 0 {
        even = gf2_compose(&odd, &odd); // 8 bits at first, then doubling
        if len & 1 != 0 {
            result = gf2_compose(&even, &result);
        }
        len >>= 1;
        if len == 0 {
            break;
        }
        odd = gf2_compose(&even, &even);
        if len & 1 != 0 {
            result = gf2_compose(&odd, &result);
        }
        len >>= 1;
    }
    result
}

/// One gzip stream's state: the CRC-32 and length of everything sent (a few bytes; the
/// compression itself is shared or stored).
#[derive(Debug, Clone, Default)]
pub struct Gzip {
    crc: u32,
    len: u64,
    started: bool,
}

impl Gzip {
    /// The header, the first time.
    fn start(&mut self, out: &mut BytesMut) {
        if !self.started {
            self.started = true;
            out.extend_from_slice(&GZIP_HEADER);
        }
    }

    /// A part of this stream only, in stored blocks.
    pub fn own(&mut self, data: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(data.len() + 16);
        self.start(&mut out);
        let mut h = crc32fast::Hasher::new_with_initial(self.crc);
        h.update(data);
        self.crc = h.finalize();
        self.len += data.len() as u64;
        out.extend_from_slice(&stored(data));
        out.freeze()
    }

    /// A shared part: its bytes as made once.
    pub fn shared(&mut self, part: &GzPart) -> Bytes {
        self.crc = gf2_times(&part.shift, self.crc) ^ part.crc;
        self.len += part.len;
        if self.started {
            return part.deflated.clone();
        }
        let mut out = BytesMut::with_capacity(part.deflated.len() + 10);
        self.start(&mut out);
        out.extend_from_slice(&part.deflated);
        out.freeze()
    }

    /// The end of the member: a final empty block, the CRC-32 and the length (mod 2^32).
    pub fn finish(&mut self) -> Bytes {
        let mut out = BytesMut::with_capacity(20);
        self.start(&mut out);
        out.extend_from_slice(&FINAL_BLOCK);
        out.put_u32_le(self.crc);
        out.put_u32_le(self.len as u32);
        out.freeze()
    }
}

/// Whether an `Accept-Encoding` value accepts gzip (a `gzip` or `x-gzip` coding whose `q` is
/// not 0; `*` counts).
pub fn accepts_gzip(value: &str) -> bool {
    value.split(',').any(|coding| {
        let mut parts = coding.split(';').map(str::trim);
        let name = parts.next().unwrap_or("").to_ascii_lowercase();
        let q_zero = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        matches!(name.as_str(), "gzip" | "x-gzip" | "*") && !q_zero
    })
}

/// The answer to a client's `Sec-WebSocket-Extensions` offers (all such headers, joined with
/// `,`): the `permessage-deflate` offer the hub accepts, as the response header's value, or
/// `None`. An offer asking the server for a window under 15 bits is declined (the shared
/// compressor uses 15); the hub always answers `server_no_context_takeover` (every message is
/// compressed on its own) and `client_no_context_takeover` (nothing is kept for the client's).
pub fn negotiate_ws(offers: &str) -> Option<&'static str> {
    for offer in offers.split(',') {
        let mut params = offer.split(';').map(str::trim);
        if !params
            .next()
            .is_some_and(|n| n.eq_ignore_ascii_case("permessage-deflate"))
        {
            continue;
        }
        let acceptable = params.all(|p| {
            let (name, value) = match p.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (p, None),
            };
            match name {
                "server_no_context_takeover" | "client_no_context_takeover" => value.is_none(),
                "client_max_window_bits" => {
                    value.is_none_or(|v| v.parse::<u8>().is_ok_and(|b| (8..=15).contains(&b)))
                }
                "server_max_window_bits" => value == Some("15"),
                _ => false,
            }
        });
        if acceptable {
            return Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            );
        }
    }
    None
}

/// A client's compressed message payload inflated (nothing kept from earlier messages), at
/// most `max` bytes: `None` if it is broken or larger.
pub fn inflate_ws(payload: &[u8], max: usize) -> Option<Vec<u8>> {
    let mut d = Decompress::new(false);
    let mut input = Vec::with_capacity(payload.len() + SYNC_TAIL.len());
    input.extend_from_slice(payload);
    input.extend_from_slice(&SYNC_TAIL);
    // One more byte than allowed: filling it means the message is too large.
    let mut out = Vec::with_capacity(max + 1);
    let mut rest: &[u8] = &input;
    loop {
        let before = d.total_in();
        let status = d
            .decompress_vec(rest, &mut out, FlushDecompress::Sync)
            .ok()?;
        rest = &rest[(d.total_in() - before) as usize..];
        if out.len() > max {
            return None;
        }
        if rest.is_empty() || status == Status::StreamEnd {
            return Some(out);
        }
        if out.len() == out.capacity() || d.total_in() == before {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::{DeflateDecoder, GzDecoder};
    use std::io::Read;

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        GzDecoder::new(bytes).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn shared_segments_and_stored_parts_make_one_gzip_member_with_the_right_crc() {
        let big = "{\"price\": 101.25, \"symbol\": \"BTC\"} ".repeat(60);
        let part = GzPart::of(big.as_bytes());
        assert!(
            part.deflated.len() < big.len() / 4,
            "{}",
            part.deflated.len()
        );
        let mut a = Gzip::default();
        let mut b = Gzip::default();
        let mut sa = Vec::new();
        let mut sb = Vec::new();
        sa.extend_from_slice(&a.own(b"retry: 2000\n\n"));
        sb.extend_from_slice(&b.shared(&part)); // header comes with the first part
        sa.extend_from_slice(&a.shared(&part));
        sa.extend_from_slice(&a.own(b":\n\n"));
        sa.extend_from_slice(&a.shared(&part));
        sb.extend_from_slice(&b.finish());
        sa.extend_from_slice(&a.finish());
        assert_eq!(
            gunzip(&sa),
            format!("retry: 2000\n\n{big}:\n\n{big}").into_bytes()
        );
        assert_eq!(gunzip(&sb), big.as_bytes());
    }

    #[test]
    fn the_kept_operator_combines_as_crc32fast_does() {
        let a = b"retry: 2000\n\nid: 1-0\n";
        for len in [0usize, 1, 7, 64, 333, 2048, 20_000] {
            let b: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut whole = crc32fast::Hasher::new();
            whole.update(a);
            whole.update(&b);
            let part = GzPart::of(&b);
            let combined = gf2_times(&part.shift, crc32fast::hash(a)) ^ part.crc;
            assert_eq!(combined, whole.finalize(), "len {len}");
        }
    }

    #[test]
    fn each_part_is_readable_as_soon_as_it_arrives() {
        // A reader that has only the header and the first segment can inflate all of it.
        let part = GzPart::of(b"data: hello\n\n");
        let mut g = Gzip::default();
        let first = g.shared(&part);
        let mut d = Decompress::new(false);
        let mut out = Vec::with_capacity(64);
        d.decompress_vec(&first[10..], &mut out, FlushDecompress::Sync)
            .unwrap();
        assert_eq!(out, b"data: hello\n\n");
    }

    #[test]
    fn a_websocket_payload_round_trips_and_refers_to_nothing_before() {
        let msg = b"{\"type\":\"message\",\"data\":\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"}";
        let p1 = ws_payload(msg);
        let p2 = ws_payload(msg);
        assert_eq!(p1, p2, "no context taken over");
        assert_eq!(inflate_ws(&p1, 1024).unwrap(), msg);
        // As a client library inflates it: raw deflate with the tail appended.
        let mut with_tail = p1.to_vec();
        with_tail.extend_from_slice(&SYNC_TAIL);
        let mut out = Vec::new();
        let _ = DeflateDecoder::new(&with_tail[..]).read_to_end(&mut out);
        assert_eq!(out, msg);
        assert!(inflate_ws(&p1, 10).is_none(), "bounded");
        assert!(inflate_ws(b"\xff\xff\xff", 1024).is_none(), "broken");
    }

    #[test]
    fn offers() {
        let ok = Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover");
        assert_eq!(
            negotiate_ws("permessage-deflate; client_max_window_bits"),
            ok
        );
        assert_eq!(negotiate_ws("permessage-deflate"), ok);
        assert_eq!(
            negotiate_ws("permessage-deflate; server_max_window_bits=10, permessage-deflate"),
            ok
        );
        assert_eq!(
            negotiate_ws("permessage-deflate; server_max_window_bits=10"),
            None
        );
        assert_eq!(negotiate_ws("x-webkit-deflate-frame"), None);
        assert!(accepts_gzip("gzip, deflate, br"));
        assert!(accepts_gzip("br;q=1.0, gzip;q=0.8"));
        assert!(!accepts_gzip("gzip;q=0, br"));
        assert!(!accepts_gzip("identity"));
    }
}
