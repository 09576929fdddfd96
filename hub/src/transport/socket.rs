//! The raw-socket writer of a stream the public port's front serves on the bare socket: it
//! pulls frames from the stream's body ([`Outbound`]) and writes them (several at once with one
//! `writev`), reads and bounds what the client sends, parks the body when all is written (a
//! WebSocket's fan-out then writes through [`DirectWs`]), and lingers for the client's close
//! when the hub ended the stream. It owns no stream logic: the bodies render the items.

use crate::hangup::MAX_DISCARD;
use crate::message::Message;
use crate::node::Node;
use crate::stream::{DirectSink, Sent, Session, OFFER_BATCH};
use crate::transport::sse::SseBody;
use crate::transport::ws::WsBody;
use actix_web::body::MessageBody as _;
use bytes::{Buf, Bytes, BytesMut};
use std::borrow::Borrow;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Frames gathered into one `writev` when several are ready (a burst, a catch-up).
const BATCH: usize = 16;
/// Seconds a connection whose stream the hub ended is read on, for the client's close.
const LINGER_SECS: u64 = 2;

/// Runs a stream to its end. When the hub ended it (drain, slow, expiry, a refused frame), the
/// stream is released at once (a stopping node does not wait for slow readers), then within
/// `LINGER_SECS` its last bytes are written, the write side is shut, and the connection is
/// read on until the client closes: closing a socket with unread bytes resets it, and the
/// client could lose those last bytes.
pub async fn run<B: Outbound, S: Socket>(mut writer: Writer<B, S>) {
    if !(&mut writer).await {
        return;
    }
    let Writer { io, pending, .. } = writer;
    // The body is gone and took its sink back: the socket is the writer's alone again.
    let Some(mut io) = io.into_stream() else {
        return;
    };
    let _ = tokio::time::timeout(Duration::from_secs(LINGER_SECS), async {
        io.write_all(&pending).await?;
        io.shutdown().await?;
        let mut scratch = [0u8; 512];
        let mut read = 0;
        while read <= MAX_DISCARD {
            let n = io.read(&mut scratch).await?;
            if n == 0 {
                break;
            }
            read += n;
        }
        Ok::<_, io::Error>(())
    })
    .await;
}

/// Where the reading of a client's bytes stands after a poll.
#[derive(Debug, PartialEq, Eq)]
enum ReadSide {
    /// Closed, reset, or more bytes than a stream may send: the connection ends.
    Gone,
    /// Nothing to read; woken when there is.
    Waiting,
    /// The body takes no bytes now (it has frames to handle first); nothing registered.
    Held,
}

/// A stream's body as the front drives it: frames out, the client's bytes in.
pub trait Outbound: Unpin {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>>;
    /// Whether the client's bytes are read now (a WebSocket that has frames to handle
    /// first lets them wait in the socket).
    fn wants_input(&self) -> bool;
    /// The client's bytes; `false` when they mean nothing here (dropped and counted).
    fn input(&mut self, bytes: &[u8]) -> bool;
    /// Everything is written and the body has nothing ready: the writer waits.
    fn park(&self) {}
}

impl Outbound for SseBody {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        Pin::new(self).poll_next(cx).map(|b| b.map(|Ok(b)| b))
    }
    fn wants_input(&self) -> bool {
        true
    }
    fn input(&mut self, _: &[u8]) -> bool {
        false
    }
}

impl Outbound for WsBody {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        Pin::new(self).poll_next(cx).map(|b| b.map(|Ok(b)| b))
    }
    fn wants_input(&self) -> bool {
        WsBody::wants_input(self)
    }
    fn input(&mut self, bytes: &[u8]) -> bool {
        self.feed(bytes);
        true
    }
    fn park(&self) {
        WsBody::park(self);
    }
}

/// A WebSocket's [`DirectSink`]: the fan-out writes a live message's shared frame to the socket
/// itself while the socket's writer is parked, as many as the socket takes without blocking.
/// Per message and socket that saves the queue entry, the wake-up of the connection's task and
/// its poll (BENCHMARKS.md, WebSocket fan-out).
pub struct DirectWs {
    pub io: Arc<TcpStream>,
    pub node: Arc<Node>,
    /// The socket negotiated `permessage-deflate`.
    pub deflate: bool,
}

impl DirectSink for DirectWs {
    fn send(&self, msg: &Message, session: &Session) -> Sent {
        let min = self.node.config.compress_min_bytes as usize;
        let frame = msg.ws_frame_for(self.deflate, min);
        let sent = match self.io.try_write(&frame) {
            Ok(n) if n == frame.len() => Sent::All,
            Ok(n) if n > 0 => Sent::Part(frame.slice(n..)),
            _ => return Sent::Nothing,
        };
        self.wrote(&[msg], session);
        sent
    }

    /// The frames with one `writev` (a burst that came while the fan-out was busy).
    fn send_many(&self, msgs: &[&Message], session: &Session) -> (usize, Option<Bytes>) {
        if msgs.len() < 2 {
            return match msgs.first().map(|m| self.send(m, session)) {
                Some(Sent::All) => (1, None),
                Some(Sent::Part(rest)) => (0, Some(rest)),
                Some(Sent::Nothing) | None => (0, None),
            };
        }
        let min = self.node.config.compress_min_bytes as usize;
        // On the stack: this runs for every socket of a burst's fan-out.
        let msgs = &msgs[..msgs.len().min(OFFER_BATCH)];
        let mut frames: [Bytes; OFFER_BATCH] = Default::default();
        for (f, m) in frames.iter_mut().zip(msgs) {
            *f = m.ws_frame_for(self.deflate, min);
        }
        let frames = &frames[..msgs.len()];
        let mut slices = [IoSlice::new(&[]); OFFER_BATCH];
        for (s, f) in slices.iter_mut().zip(frames) {
            *s = IoSlice::new(f);
        }
        let Ok(mut n) = self.io.try_write_vectored(&slices[..frames.len()]) else {
            return (0, None);
        };
        if n == 0 {
            return (0, None);
        }
        let mut whole = 0;
        let mut rest = None;
        for f in frames {
            if n >= f.len() {
                n -= f.len();
                whole += 1;
            } else {
                if n > 0 {
                    rest = Some(f.slice(n..));
                }
                break;
            }
        }
        self.wrote(&msgs[..whole + usize::from(rest.is_some())], session);
        (whole, rest)
    }
}

impl DirectWs {
    /// `msgs` went out (whole or a first part): their publish-to-write latency, and the
    /// session's last write. Counted delivered by the fan-out (once per message, not per
    /// socket).
    fn wrote(&self, msgs: &[&Message], session: &Session) {
        for m in msgs {
            self.node
                .metrics
                .latency
                .record(m.received.elapsed().as_secs_f64());
        }
        session.took(self.node.registry.clock.now());
    }
}

/// A stream's socket as its writer holds it: alone (SSE) or shared with a [`DirectSink`] (WebSocket;
/// an SSE stream does not pay for the sharing).
pub trait Socket: Borrow<TcpStream> + Unpin {
    /// The socket alone again (its sink was taken back), for the last bytes and the close.
    fn into_stream(self) -> Option<TcpStream>;
}

impl Socket for TcpStream {
    fn into_stream(self) -> Option<TcpStream> {
        Some(self)
    }
}

impl Socket for Arc<TcpStream> {
    fn into_stream(self) -> Option<TcpStream> {
        Arc::try_unwrap(self).ok()
    }
}

/// `poll_write_vectored` on a socket shared with its [`DirectSink`] (which writes only while the
/// writer is parked, so the two never write at once).
fn poll_writev(
    io: &TcpStream,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    loop {
        std::task::ready!(io.poll_write_ready(cx))?;
        match io.try_write_vectored(bufs) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            done => return Poll::Ready(done),
        }
    }
}

/// Writes a stream's frames to its socket and reads the socket for the client's bytes and its
/// close. Ends (and, dropped, releases the stream) when the client closes, a write fails, or
/// the stream ends.
pub struct Writer<B, S> {
    /// The socket, or (a WebSocket's) shared with the body's sink.
    pub io: S,
    /// `None` once the body ended (the stream is released; its last bytes may be pending).
    pub body: Option<B>,
    /// Bytes taken from the body and not yet written (a slow reader's, or the head).
    pub pending: Bytes,
    pub discarded: usize,
}

impl<B: Outbound, S: Socket> Writer<B, S> {
    /// Reads the client's bytes into the body while it takes them.
    fn poll_read_side(&mut self, cx: &mut Context<'_>) -> ReadSide {
        loop {
            if !self.body.as_ref().is_some_and(B::wants_input) {
                return ReadSide::Held;
            }
            match self.io.borrow().poll_read_ready(cx) {
                Poll::Pending => return ReadSide::Waiting,
                Poll::Ready(Err(_)) => return ReadSide::Gone,
                Poll::Ready(Ok(())) => {}
            }
            let mut scratch = [0u8; 512];
            match self.io.borrow().try_read(&mut scratch) {
                Ok(0) => return ReadSide::Gone,
                Ok(n) => {
                    if !self.body.as_mut().is_some_and(|b| b.input(&scratch[..n])) {
                        self.discarded += n;
                        if self.discarded > MAX_DISCARD {
                            return ReadSide::Gone;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return ReadSide::Gone,
            }
        }
    }

    /// Writes what is pending, then gathers ready frames into one write, until the body has
    /// nothing ready (`Pending`), the socket is full (`Pending`), or the stream ended.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            while !self.pending.is_empty() {
                let n = std::task::ready!(poll_writev(
                    self.io.borrow(),
                    cx,
                    &[IoSlice::new(&self.pending)]
                ))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pending.advance(n);
            }
            let Some(body) = self.body.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            let mut batch: [Bytes; BATCH] = Default::default();
            let mut count = 0;
            let mut ended = false;
            while count < BATCH {
                match body.poll_frame(cx) {
                    Poll::Ready(Some(b)) => {
                        if !b.is_empty() {
                            batch[count] = b;
                            count += 1;
                        }
                    }
                    Poll::Ready(None) => {
                        ended = true;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            if count > 0 {
                let slices: [IoSlice<'_>; BATCH] = std::array::from_fn(|i| IoSlice::new(&batch[i]));
                let written = match poll_writev(self.io.borrow(), cx, &slices[..count]) {
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => 0,
                };
                self.pending = unwritten(&mut batch[..count], written);
            }
            if ended {
                // Released now; what is pending is written by `run`.
                self.body = None;
                return Poll::Ready(Ok(()));
            }
            if count == 0 {
                body.park();
                return Poll::Pending;
            }
        }
    }
}

/// What is left of `batch` after `written` bytes went out: one frame's tail without a copy,
/// several frames joined (a slow reader's, which is rare and bounded by the batch).
fn unwritten(batch: &mut [Bytes], mut written: usize) -> Bytes {
    let mut skip = 0;
    while skip < batch.len() && written >= batch[skip].len() {
        written -= batch[skip].len();
        skip += 1;
    }
    let rest = &mut batch[skip..];
    let Some((first, tail)) = rest.split_first_mut() else {
        return Bytes::new();
    };
    first.advance(written);
    if tail.is_empty() {
        return std::mem::take(first);
    }
    let mut joined =
        BytesMut::with_capacity(first.len() + tail.iter().map(Bytes::len).sum::<usize>());
    joined.extend_from_slice(first);
    for b in tail {
        joined.extend_from_slice(b);
    }
    joined.freeze()
}

/// `true` when the hub ended the stream (the body is dropped; its last bytes may be pending),
/// `false` when the client left or the connection failed.
impl<B: Outbound, S: Socket> Future for Writer<B, S> {
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let this = self.get_mut();
        // Rounds of reading and handling a client's frames per wake-up: a client that sends
        // without pause must not hold the worker's thread.
        for _ in 0..16 {
            let read = this.poll_read_side(cx);
            if read == ReadSide::Gone {
                return Poll::Ready(false);
            }
            match this.poll_write_out(cx) {
                // The body handled what it held and takes bytes again: read them now (no
                // wake-up is registered for them).
                Poll::Pending
                    if read == ReadSide::Held && this.body.as_ref().is_some_and(B::wants_input) =>
                {
                    continue
                }
                other => return Self::finish(other),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<B: Outbound, S: Socket> Writer<B, S> {
    fn finish(out: Poll<io::Result<()>>) -> Poll<bool> {
        match out {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(_)) => Poll::Ready(false),
            // The stream ended (drain, slow, expiry): `run` writes the rest and closes.
            Poll::Ready(Ok(())) => Poll::Ready(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritten_keeps_exactly_the_tail() {
        let mk = || {
            [
                Bytes::from_static(b"abc"),
                Bytes::from_static(b"defg"),
                Bytes::from_static(b"hi"),
            ]
        };
        for written in 0..=9 {
            let mut b = mk();
            assert_eq!(&unwritten(&mut b, written)[..], &b"abcdefghi"[written..]);
        }
    }
}
