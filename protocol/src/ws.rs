//! WebSocket framing of what a server sends (RFC 6455 section 5.2: unmasked, unfragmented), so
//! that one message's frame is built once and the same bytes go to every socket.
//!
//! Only server-to-client frames are made here; of a client's (masked) frames only the declared
//! length is read here ([`declared_len`]), decoding them is the WebSocket codec's job in the hub.

use bytes::{BufMut, Bytes, BytesMut};

/// Frame opcodes a server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    Text = 0x1,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

/// An empty ping (a heartbeat).
pub const PING: &[u8] = &[0x80 | OpCode::Ping as u8, 0];

/// Bytes of the header of a frame with `len` bytes of payload.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65_535 => 4,
        _ => 10,
    }
}

/// Appends the header of a final, unmasked frame of `len` payload bytes.
pub fn write_header(buf: &mut BytesMut, op: OpCode, len: usize) {
    buf.put_u8(0x80 | op as u8);
    match len {
        0..=125 => buf.put_u8(len as u8),
        126..=65_535 => {
            buf.put_u8(126);
            buf.put_u16(len as u16);
        }
        _ => {
            buf.put_u8(127);
            buf.put_u64(len as u64);
        }
    }
}

/// One whole frame: header and payload.
pub fn frame(op: OpCode, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    write_header(&mut buf, op, payload.len());
    buf.put_slice(payload);
    buf.freeze()
}

/// One whole frame whose payload is compressed (`permessage-deflate`: RSV1 set).
pub fn frame_compressed(op: OpCode, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    write_header(&mut buf, op, payload.len());
    buf[0] |= 0x40;
    buf.put_slice(payload);
    buf.freeze()
}

/// The header length of a whole frame made here (read from its second byte).
pub fn header_len_of(frame: &[u8]) -> usize {
    match frame.get(1).map(|b| b & 0x7F) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    }
}

/// A close frame with a status code and a reason (cut to fit a control frame's 125 bytes, on a
/// character boundary).
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    frame(OpCode::Close, &payload)
}

/// The payload length a frame's header declares, once the header's length bytes are in
/// `buf` (`None` before). A server reads it before waiting for the payload, so that a client
/// declaring a frame over the limit is refused at once rather than buffered.
pub fn declared_len(buf: &[u8]) -> Option<u64> {
    let short = *buf.get(1)? & 0x7F;
    match short {
        126 => Some(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as u64),
        127 => Some(u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)),
        n => Some(n as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_lengths_read_back() {
        for len in [0usize, 1, 125, 126, 65_535, 65_536, 1 << 20] {
            let f = frame(OpCode::Text, &vec![b'x'; len]);
            assert_eq!(declared_len(&f), Some(len as u64), "{len}");
            // Masked (a client's) headers carry the same length bits.
            let mut masked = f[..header_len(len)].to_vec();
            masked[1] |= 0x80;
            assert_eq!(declared_len(&masked), Some(len as u64));
            assert_eq!(declared_len(&f[..header_len(len) - 1]), None);
        }
        assert_eq!(declared_len(&[]), None);
    }

    /// Reads a frame back: (fin, opcode, masked, payload).
    fn parse(b: &[u8]) -> (bool, u8, bool, &[u8]) {
        let (fin, op, masked) = (b[0] & 0x80 != 0, b[0] & 0x0F, b[1] & 0x80 != 0);
        let (len, at) = match b[1] & 0x7F {
            126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        assert_eq!(b.len(), at + len, "one frame, nothing after it");
        (fin, op, masked, &b[at..])
    }

    #[test]
    fn lengths_take_the_shortest_form() {
        for (len, header) in [(0, 2), (125, 2), (126, 4), (65_535, 4), (65_536, 10)] {
            let payload = vec![b'x'; len];
            let f = frame(OpCode::Text, &payload);
            assert_eq!(f.len(), header + len);
            assert_eq!(header_len(len), header);
            assert_eq!(parse(&f), (true, 1, false, &payload[..]));
        }
        assert_eq!(parse(PING), (true, 9, false, &b""[..]));
    }

    #[test]
    fn close_frames_carry_code_and_a_cut_reason() {
        let f = close(1012, "restarting");
        assert_eq!(parse(&f), (true, 8, false, &b"\x03\xf4restarting"[..]));
        let long = "é".repeat(100);
        let f = close(1000, &long);
        let (_, _, _, p) = parse(&f);
        assert!(p.len() <= 125);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2_000))]

            #[test]
            fn any_payload_reads_back(
                len in prop_oneof![0..300usize, 65_530..65_545usize, 100_000..100_003usize],
                seed in any::<u8>(),
            ) {
                let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
                let f = frame(OpCode::Text, &payload);
                prop_assert_eq!(parse(&f), (true, 1, false, &payload[..]));
            }
        }
    }
}
