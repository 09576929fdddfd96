//! A message as the node fans it out: framed once, shared by every subscriber through `Arc`.
//!
//! The SSE bytes are built when the message enters the node (the enveloped variant on first use),
//! so the cost of a message does not grow with its subscribers beyond a reference-count increment
//! per delivery. This module does not route or store messages.

use crate::compress::GzPart;
use bytes::{Bytes, BytesMut};
use protocol::sse;
use protocol::{ChannelName, Envelope, StreamId};
use std::sync::OnceLock;
use std::time::Instant;

/// One published message. Shared as `Arc<Message>`; never mutated after creation except for the
/// lazily built enveloped frame.
#[derive(Debug)]
pub struct Message {
    pub channel: ChannelName,
    /// Position in the channel for durable messages; `None` for ephemeral ones, which carry no
    /// SSE `id:` and cannot be resumed.
    pub position: Option<StreamId>,
    /// The id clients see: the position, or for an ephemeral message a fresh UUID.
    pub id: Box<str>,
    pub event: Option<Box<str>>,
    /// The data as compact JSON, kept for enveloped frames and WebSocket frames.
    pub data_json: Box<str>,
    /// When the node received it; the start of the delivery-latency measurement.
    pub received: Instant,
    /// `id: ...\n` (durable only) followed by the event lines and the blank line.
    plain: Bytes,
    /// Length of the `id:` line at the start of `plain`/enveloped frames (0 for ephemeral).
    id_len: usize,
    enveloped: OnceLock<Bytes>,
    /// The WebSocket text frame's payload, built on first use.
    ws: OnceLock<Bytes>,
    /// The same frame compressed (`permessage-deflate`), built on first use.
    ws_deflated: OnceLock<Bytes>,
    /// The SSE frames compressed for gzip streams, built on first use: plain, plain without
    /// the `id:` line, enveloped, enveloped without it (boxed: a message kept in history that
    /// no gzip stream read costs one pointer for them).
    gz: OnceLock<Box<[OnceLock<GzPart>; 4]>>,
}

impl Message {
    pub fn new(
        channel: ChannelName,
        position: Option<StreamId>,
        env: &Envelope,
        received: Instant,
    ) -> Message {
        let id: Box<str> = match position {
            Some(p) => p.to_string().into(),
            None => uuid::Uuid::now_v7().to_string().into(),
        };
        let data_text = env.data_text();
        let mut buf = BytesMut::with_capacity(data_text.len() + id.len() + 32);
        if position.is_some() {
            sse::write_id(&mut buf, &id);
        }
        let id_len = buf.len();
        sse::write_event(&mut buf, env.event.as_deref(), &data_text);
        Message {
            channel,
            position,
            id,
            event: env.event.as_deref().map(Box::from),
            data_json: env.data.to_string().into(),
            received,
            plain: buf.freeze(),
            id_len,
            enveloped: OnceLock::new(),
            ws: OnceLock::new(),
            ws_deflated: OnceLock::new(),
            gz: OnceLock::new(),
        }
    }

    pub fn event_name(&self) -> &str {
        self.event.as_deref().unwrap_or("message")
    }

    /// The full frame (with this message's own `id:` line, if durable).
    pub fn frame(&self, envelope: bool) -> Bytes {
        if envelope {
            self.enveloped_frame().clone()
        } else {
            self.plain.clone()
        }
    }

    /// The frame without the `id:` line, for streams that write a combined cursor instead.
    pub fn frame_body(&self, envelope: bool) -> Bytes {
        self.frame(envelope).slice(self.id_len..)
    }

    fn enveloped_frame(&self) -> &Bytes {
        self.enveloped.get_or_init(|| {
            let json = self.envelope_json();
            let mut buf = BytesMut::with_capacity(json.len() + self.id_len + 32);
            buf.extend_from_slice(&self.plain[..self.id_len]);
            sse::write_event(&mut buf, self.event.as_deref(), &json);
            buf.freeze()
        })
    }

    /// The WebSocket text frame (header included) of
    /// `{"type":"message","channel":..,"id":..,"event":..,"data":..}`, made once and shared by
    /// every WebSocket subscriber.
    pub fn ws_frame(&self) -> Bytes {
        self.ws
            .get_or_init(|| {
                let env = self.envelope_json();
                let json = format!("{{\"type\":\"message\",{}", &env[1..]);
                protocol::ws::frame(protocol::ws::OpCode::Text, json.as_bytes())
            })
            .clone()
    }

    /// The WebSocket frame for a socket that negotiated `permessage-deflate` (`deflate`):
    /// compressed (RSV1) when its payload is `min_bytes` or more, made once and shared.
    pub fn ws_frame_for(&self, deflate: bool, min_bytes: usize) -> Bytes {
        if !deflate {
            return self.ws_frame();
        }
        self.ws_deflated
            .get_or_init(|| {
                let plain = self.ws_frame();
                let payload = &plain[protocol::ws::header_len_of(&plain)..];
                if payload.len() < min_bytes {
                    return plain;
                }
                let packed = crate::compress::ws_payload(payload);
                protocol::ws::frame_compressed(protocol::ws::OpCode::Text, &packed)
            })
            .clone()
    }

    /// The SSE frame (see [`Message::frame`], or [`Message::frame_body`] with `body`) deflated
    /// once for every gzip stream.
    pub fn gz_part(&self, envelope: bool, body: bool) -> &GzPart {
        let i = usize::from(envelope) * 2 + usize::from(body);
        self.gz.get_or_init(Box::default)[i].get_or_init(|| {
            let frame = if body {
                self.frame_body(envelope)
            } else {
                self.frame(envelope)
            };
            GzPart::of(&frame)
        })
    }

    /// `{"channel":..,"id":..,"event":..,"data":..}` as one line of JSON.
    pub fn envelope_json(&self) -> String {
        let mut s = String::with_capacity(self.data_json.len() + self.channel.len() + 64);
        s.push_str("{\"channel\":");
        push_json_str(&mut s, &self.channel);
        s.push_str(",\"id\":");
        push_json_str(&mut s, &self.id);
        s.push_str(",\"event\":");
        push_json_str(&mut s, self.event_name());
        s.push_str(",\"data\":");
        s.push_str(&self.data_json);
        s.push('}');
        s
    }
}

fn push_json_str(out: &mut String, s: &str) {
    // serde_json escapes exactly as JSON requires; a &str always serializes.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(pos: Option<StreamId>, event: Option<&str>, data: serde_json::Value) -> Message {
        let env = Envelope {
            event: event.map(String::from),
            data,
        };
        Message::new(
            ChannelName::new("public:a").unwrap(),
            pos,
            &env,
            Instant::now(),
        )
    }

    #[test]
    fn durable_frame_has_id_and_splits_lines() {
        let m = msg(Some(StreamId::new(7, 1)), Some("chat"), json!("x\ny"));
        assert_eq!(
            &m.frame(false)[..],
            b"id: 7-1\nevent: chat\ndata: x\ndata: y\n\n"
        );
        assert_eq!(
            &m.frame_body(false)[..],
            b"event: chat\ndata: x\ndata: y\n\n"
        );
    }

    #[test]
    fn ephemeral_frame_has_no_id_line() {
        let m = msg(None, None, json!({"a": 1}));
        assert_eq!(&m.frame(false)[..], b"data: {\"a\":1}\n\n");
        assert_eq!(m.frame_body(false), m.frame(false));
    }

    #[test]
    fn enveloped_frame_carries_channel_id_event_and_json_data() {
        let m = msg(Some(StreamId::new(7, 1)), None, json!("line1\nline2"));
        let expected = "id: 7-1\ndata: {\"channel\":\"public:a\",\"id\":\"7-1\",\"event\":\"message\",\"data\":\"line1\\nline2\"}\n\n";
        assert_eq!(std::str::from_utf8(&m.frame(true)).unwrap(), expected);
        let v: serde_json::Value = serde_json::from_str(&m.envelope_json()).unwrap();
        assert_eq!(v["data"], "line1\nline2");
        let f = m.ws_frame();
        assert_eq!(f[0], 0x81, "a final text frame");
        let w: serde_json::Value = serde_json::from_slice(&f[2..]).unwrap();
        assert_eq!(
            w,
            serde_json::json!({"type": "message", "channel": "public:a", "id": "7-1", "event": "message", "data": "line1\nline2"})
        );
    }
}
