//! A gzip SSE stream read the way a browser reads it: each part inflated as it arrives (no
//! waiting for the member to end), for the compression and proxy tests.

use crate::WAIT;
use flate2::{Decompress, FlushDecompress};
use std::time::Instant;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The next bytes `io` sends; panics if none come before `deadline` (saying what was awaited,
/// `what()`) or the connection closes.
pub async fn next_bytes(
    io: &mut TcpStream,
    deadline: Instant,
    what: impl FnOnce() -> String,
) -> Vec<u8> {
    let mut chunk = [0u8; 8192];
    let n = tokio::time::timeout(deadline - Instant::now(), io.read(&mut chunk))
        .await
        .unwrap_or_else(|_| panic!("{} never came", what()))
        .expect("read");
    assert!(n > 0, "closed");
    chunk[..n].to_vec()
}

/// Reads until the response head is complete; returns it (lower-cased) and what came after.
pub async fn read_head(io: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
            return (head, buf[i + 4..].to_vec());
        }
        buf.extend(next_bytes(io, deadline, || "a response head".into()).await);
    }
}

/// Inflates a gzip SSE body as it arrives (after its 10-byte header).
pub struct GzReader {
    d: Decompress,
    /// The body is `Transfer-Encoding: chunked` (through a proxy): what is not a whole chunk
    /// yet waits here.
    chunked: Option<Vec<u8>>,
    /// Every byte of the body so far.
    pub raw: Vec<u8>,
    /// What inflated so far.
    pub text: String,
}

impl GzReader {
    pub fn new() -> GzReader {
        GzReader {
            d: Decompress::new(false),
            chunked: None,
            raw: Vec::new(),
            text: String::new(),
        }
    }

    /// A reader of a body in `Transfer-Encoding: chunked`.
    pub fn chunked() -> GzReader {
        GzReader {
            chunked: Some(Vec::new()),
            ..GzReader::new()
        }
    }

    /// Takes body bytes as they come off the connection.
    pub fn feed(&mut self, bytes: &[u8]) {
        let Some(pending) = self.chunked.as_mut() else {
            return self.feed_body(bytes);
        };
        pending.extend_from_slice(bytes);
        let mut body = Vec::new();
        while let Some(eol) = pending.windows(2).position(|w| w == b"\r\n") {
            let size = std::str::from_utf8(&pending[..eol])
                .ok()
                .and_then(|h| {
                    usize::from_str_radix(h.split(';').next().unwrap_or("").trim(), 16).ok()
                })
                .expect("a chunk size");
            if pending.len() < eol + 2 + size + 2 {
                break;
            }
            body.extend_from_slice(&pending[eol + 2..eol + 2 + size]);
            pending.drain(..eol + 2 + size + 2);
        }
        self.feed_body(&body);
    }

    fn feed_body(&mut self, bytes: &[u8]) {
        let start = self.raw.len();
        self.raw.extend_from_slice(bytes);
        let from = start.max(10);
        if self.raw.len() <= from {
            return;
        }
        let mut input = &self.raw[from..];
        if start < 10 {
            assert_eq!(&self.raw[..2], &[0x1f, 0x8b], "a gzip header");
        }
        let mut out = Vec::with_capacity(input.len() * 8 + 1024);
        while !input.is_empty() {
            let before = self.d.total_in();
            out.reserve(4096);
            self.d
                .decompress_vec(input, &mut out, FlushDecompress::Sync)
                .unwrap();
            let used = (self.d.total_in() - before) as usize;
            if used == 0 {
                break; // the 8-byte trailer after the final block
            }
            input = &input[used..];
        }
        self.text.push_str(std::str::from_utf8(&out).unwrap());
    }
}

impl Default for GzReader {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads `io` into `gz` until its text holds `needle` (panics after [`WAIT`]).
pub async fn read_until(io: &mut TcpStream, gz: &mut GzReader, needle: &str) {
    let deadline = Instant::now() + WAIT;
    while !gz.text.contains(needle) {
        let got = next_bytes(io, deadline, || format!("{needle:?} (have {:?})", gz.text)).await;
        gz.feed(&got);
    }
}
