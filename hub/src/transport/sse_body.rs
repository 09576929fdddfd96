//! An SSE stream's response body: the stream's items rendered as SSE frames (a shared
//! message's frame made once, gzip-encoded when the client asked), and the HTTP/2 wrapper that
//! watches for the client's reset. Checking and opening a stream is `sse`'s.

use super::sse::{
    EVENT_CONNECTED, EVENT_DISCONNECT, EVENT_JOIN, EVENT_LEAVE, EVENT_PRESENCE, EVENT_RECONNECT,
    EVENT_RESET,
};
use crate::compress::Gzip;
use crate::domain::CloseReason;
use crate::message::Message;
use crate::node::{StreamGuard, TransportGuard};
use crate::stream::Item;
use actix_web::body::{BodySize, MessageBody};
use actix_web::web;
use bytes::{Bytes, BytesMut};
use protocol::{sse, ChannelName, Cursor, StreamId};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

#[derive(serde::Serialize)]
struct Connected<'a> {
    connection_id: String,
    node: &'a str,
    channels: Vec<&'a str>,
    heartbeat_secs: u64,
}

/// `hub.reset` naming the channels, with the stream's new cursor as its `id:`.
fn reset_event(id: &str, reset: &[(ChannelName, StreamId)]) -> Bytes {
    let data = serde_json::json!({ "channels": reset.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>() });
    let mut buf = BytesMut::with_capacity(96);
    sse::write_id(&mut buf, id);
    sse::write_event(&mut buf, Some(EVENT_RESET), &data.to_string());
    buf.freeze()
}

/// `hub.reconnect` for the reasons a client should come back from (with a `retry:` so that a
/// plain EventSource waits that long). Shutdown spreads clients over one more retry interval.
fn last_frame(seq: u64, reason: CloseReason, retry_ms: u64) -> Option<Bytes> {
    let retry = match reason {
        CloseReason::Shutdown => retry_ms + spread(seq, retry_ms),
        CloseReason::Slow | CloseReason::TokenExpired => retry_ms,
        // The backend's own event (`hub.disconnect`) came just before.
        CloseReason::Client
        | CloseReason::Stale
        | CloseReason::Error
        | CloseReason::Disconnected
        | CloseReason::Revoked => return None,
    };
    let mut buf = BytesMut::with_capacity(96);
    sse::write_retry(&mut buf, retry);
    let data = format!(
        "{{\"reason\":\"{}\",\"retry_ms\":{retry}}}",
        reason.as_str()
    );
    sse::write_event(&mut buf, Some(EVENT_RECONNECT), &data);
    Some(buf.freeze())
}

/// A deterministic spread in `[0, range)` from a sequence number (Fibonacci hashing).
fn spread(seq: u64, range: u64) -> u64 {
    (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % range.max(1)
}

/// The response body of one stream. Dropping it (client gone, server stopping) drops the
/// stream guard, which closes the stream with reason `client` unless it was already closed.
pub struct SseBody {
    pub(super) stream: StreamGuard,
    /// The stream's channels, sorted (the cursor's order).
    channels: Vec<ChannelName>,
    /// Each channel's position as written so far: the cursor of the next `id:`.
    positions: Vec<StreamId>,
    /// A message whose frame (without its `id:` line) follows the cursor line just returned
    /// (multi-channel streams).
    next: Option<Arc<Message>>,
    /// The stream is gzip-encoded: its CRC and length so far (see `crate::compress`).
    gzip: Option<Box<Gzip>>,
    /// Counts this stream as alive until the HTTP server drops the body.
    _live: TransportGuard,
}

/// What one item writes: bytes of this stream's own, or a shared message's frame (whole, or
/// without its `id:` line), which a gzip stream takes compressed as made once.
enum Out {
    Own(Bytes),
    Frame(Arc<Message>, bool),
}

/// The body of an SSE stream on an HTTP/2 connection: the stream's body, and its request's
/// body watched for the client's reset. actix-http's HTTP/2 dispatcher awaits the body's next
/// chunk without watching the stream for the client's reset (RST_STREAM) or the connection's
/// end, so an idle stream would be held until its next heartbeat is written (30 s by default).
/// The request's receiving side ends in error on either; while the stream is idle the body
/// looks at it on every poll, and the tick pokes it each second
/// ([`crate::stream::Session::poke`]). A wrapper, so that the streams of the front (HTTP/1)
/// carry nothing for it.
pub struct WatchedBody {
    pub(super) body: SseBody,
    pub(super) watch: web::Payload,
}

impl WatchedBody {
    /// Whether the client reset this stream or lost its connection. A request body sent with
    /// the stream (EventSource sends none) is read and dropped; flow control bounds it.
    fn client_reset(&mut self, cx: &mut Context<'_>) -> bool {
        use futures_util::Stream as _;
        loop {
            match Pin::new(&mut self.watch).poll_next(cx) {
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(_))) => return true,
                Poll::Ready(None) | Poll::Pending => return false,
            }
        }
    }
}

impl MessageBody for WatchedBody {
    type Error = std::convert::Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_next(cx) {
            Poll::Pending if this.client_reset(cx) => {
                this.body.stream.close(CloseReason::Client);
                Poll::Ready(None)
            }
            other => other,
        }
    }
}

impl SseBody {
    /// The body of an opened stream of `channels` (sorted), gzip-encoded with `gzip`.
    pub(super) fn new(
        stream: StreamGuard,
        channels: Vec<ChannelName>,
        gzip: bool,
        live: TransportGuard,
    ) -> SseBody {
        SseBody {
            _live: live,
            positions: vec![StreamId::ZERO; channels.len()],
            channels,
            next: None,
            gzip: gzip.then(Box::default),
            stream,
        }
    }

    fn cursor(&self) -> String {
        Cursor::encode(self.stream.session.fingerprint, &self.positions)
    }

    fn index(&self, channel: &str) -> Option<usize> {
        self.channels
            .binary_search_by(|c| c.as_str().cmp(channel))
            .ok()
    }

    /// The bytes of one item as sent: compressed on a gzip stream.
    fn encode(&mut self, out: Out) -> Bytes {
        let envelope = self.stream.session.envelope;
        match (self.gzip.as_deref_mut(), out) {
            (None, Out::Own(b)) => b,
            (None, Out::Frame(m, false)) => m.frame(envelope),
            (None, Out::Frame(m, true)) => m.frame_body(envelope),
            (Some(g), Out::Own(b)) => g.own(&b),
            (Some(g), Out::Frame(m, body)) => g.shared(m.gz_part(envelope, body)),
        }
    }

    /// What one item writes, or `None` for items SSE does not write.
    fn render(&mut self, item: Item) -> Option<Out> {
        match item {
            Item::Message(m) => self.render_message(m),
            other => self.render_own(other).map(Out::Own),
        }
    }

    /// A message: its shared frame, after this stream's cursor line when it has several
    /// channels.
    fn render_message(&mut self, m: Arc<Message>) -> Option<Out> {
        let node = self.stream.node();
        node.metrics.delivered.increment(1);
        node.metrics
            .latency
            .record(m.received.elapsed().as_secs_f64());
        if self.channels.len() == 1 {
            // Its own `id:` line (if durable) is the single channel's cursor.
            if let Some(p) = m.position {
                self.positions[0] = p;
            }
            return Some(Out::Frame(m, false));
        }
        match (self.index(&m.channel), m.position) {
            (Some(i), Some(p)) => self.positions[i] = p,
            _ => return Some(Out::Frame(m, true)),
        }
        let cursor = self.cursor();
        let mut line = BytesMut::with_capacity(cursor.len() + 5);
        sse::write_id(&mut line, &cursor);
        self.next = Some(m);
        Some(Out::Own(line.freeze()))
    }

    /// The bytes of an item of this stream's own (not a message).
    fn render_own(&mut self, item: Item) -> Option<Bytes> {
        let node = self.stream.node();
        match item {
            Item::Opened(positions) => {
                self.positions = *positions;
                let mut buf = BytesMut::with_capacity(256);
                sse::write_retry(&mut buf, node.config.retry_ms);
                sse::write_id(&mut buf, &self.cursor());
                let data = serde_json::to_string(&Connected {
                    connection_id: self.stream.session.id.to_string(),
                    node: &node.name,
                    channels: self.channels.iter().map(|c| c.as_str()).collect(),
                    heartbeat_secs: node.config.heartbeat_secs,
                })
                .unwrap_or_default();
                sse::write_event(&mut buf, Some(EVENT_CONNECTED), &data);
                Some(buf.freeze())
            }
            Item::Reset(reset) => {
                for (c, p) in reset.iter() {
                    if let Some(i) = self.index(c) {
                        self.positions[i] = *p;
                    }
                }
                Some(reset_event(&self.cursor(), &reset))
            }
            Item::Heartbeat => Some(Bytes::from_static(sse::HEARTBEAT)),
            Item::Presence(ev) => {
                let name = if ev.join { EVENT_JOIN } else { EVENT_LEAVE };
                let data = serde_json::json!({"channel": ev.channel.as_str(), "sub": &*ev.sub})
                    .to_string();
                let mut buf = BytesMut::with_capacity(data.len() + 32);
                sse::write_event(&mut buf, Some(name), &data);
                Some(buf.freeze())
            }
            Item::Present(p) => {
                let data = serde_json::json!({"channel": p.channel.as_str(), "users": p.users.iter().map(|u| &**u).collect::<Vec<&str>>()})
                    .to_string();
                let mut buf = BytesMut::with_capacity(data.len() + 32);
                sse::write_event(&mut buf, Some(EVENT_PRESENCE), &data);
                Some(buf.freeze())
            }
            Item::Reply(_) => None,
            Item::Disconnect(note) => {
                let data = serde_json::json!({ "reason": &*note }).to_string();
                let mut buf = BytesMut::with_capacity(data.len() + 32);
                sse::write_event(&mut buf, Some(EVENT_DISCONNECT), &data);
                Some(buf.freeze())
            }
            Item::End(reason) => last_frame(self.stream.session.seq, reason, node.config.retry_ms),
            Item::Raw(bytes) => Some(bytes),
            // Messages are rendered by `render_message`.
            Item::Message(_) => None,
        }
    }
}

impl MessageBody for SseBody {
    type Error = std::convert::Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        if let Some(m) = self.next.take() {
            let bytes = self.encode(Out::Frame(m, true));
            return Poll::Ready(Some(Ok(bytes)));
        }
        loop {
            let item = match self.stream.session.poll_item(cx) {
                Poll::Ready(Some(item)) => item,
                // A gzip stream that ends cleanly ends its member (trailer), then the body.
                Poll::Ready(None) => {
                    return Poll::Ready(self.gzip.take().map(|mut g| Ok(g.finish())));
                }
                Poll::Pending => return Poll::Pending,
            };
            let now = self.stream.node().registry.clock.now();
            self.stream.session.touch(now);
            self.stream.session.took(now);
            if let Some(out) = self.render(item) {
                let bytes = self.encode(out);
                return Poll::Ready(Some(Ok(bytes)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_stays_in_range() {
        assert!((0..1000).all(|s| spread(s, 2000) < 2000));
        assert_eq!(spread(5, 0), 0);
    }
}
