//! A WebSocket's frames as JSON: the client's commands (parsed and checked, never trusted),
//! the hub's replies and error frames, the close codes, and the budget that bounds a socket's
//! costly requests. No socket and no stream here: `ws` drives them.

use crate::domain::CloseReason;
use crate::stream::Reply;
use bytes::Bytes;
use protocol::ws::{self as wire, OpCode};
use protocol::ChannelName;
use serde_json::json;

/// A token bucket for one socket's costly requests (resumes, refreshes).
pub(super) struct Budget {
    bucket: std::cell::Cell<crate::ratelimit::Bucket>,
    burst: f64,
    per_sec: f64,
}

impl Budget {
    pub(super) fn new(burst: f64, per_sec: f64) -> Self {
        Budget {
            bucket: std::cell::Cell::new(crate::ratelimit::Bucket::full(
                burst,
                std::time::Instant::now(),
            )),
            burst,
            per_sec,
        }
    }

    /// Takes one request's worth if the budget allows it.
    pub(super) fn take(&self) -> bool {
        let mut b = self.bucket.get();
        let ok = b
            .take(self.per_sec, self.burst, std::time::Instant::now())
            .is_ok();
        self.bucket.set(b);
        ok
    }
}

/// A frame from the client.
#[derive(Debug, serde::Deserialize)]
pub(super) struct ClientFrame {
    pub(super) op: String,
    pub(super) channel: Option<String>,
    pub(super) since: Option<String>,
    /// Checked by hand, so that a bad value gets its own message.
    pub(super) rewind: Option<serde_json::Value>,
    pub(super) token: Option<String>,
    pub(super) presence: Option<bool>,
}

/// A subscribe: the channel, and where it starts (`since` wins over `rewind`).
#[derive(Debug, PartialEq)]
pub(super) struct Subscribe {
    pub(super) channel: ChannelName,
    pub(super) since: Option<String>,
    /// The last N durable messages first (0: none).
    pub(super) rewind: u64,
    /// `join`/`leave` of the channel's users.
    pub(super) presence: bool,
}

/// What a client frame asks for.
#[derive(Debug, PartialEq)]
pub(super) enum Command {
    Subscribe(Subscribe),
    Unsubscribe(ChannelName),
    /// A new token for the socket (never echoed or logged).
    Refresh(String),
}

/// Why a client frame was refused (an error frame 400, the socket stays open).
#[derive(Debug)]
pub(super) struct FrameError {
    pub(super) message: String,
    /// The channel the frame named, when it named one.
    pub(super) channel: Option<String>,
}

/// Reads a client frame: JSON `{"op":"subscribe"|"unsubscribe","channel":"C","since":"<id>",
/// "rewind":N}` or `{"op":"refresh","token":"<jwt>"}`.
pub(super) fn parse_frame(text: &str) -> Result<Command, FrameError> {
    let err = |message: String, channel: Option<&str>| FrameError {
        message,
        channel: channel.map(str::to_owned),
    };
    let f: ClientFrame = serde_json::from_str(text).map_err(|_| {
        err(
            r#"frames are JSON {"op":"subscribe"|"unsubscribe","channel":"C","since":"<id>"} or {"op":"refresh","token":"<jwt>"}"#
                .into(),
            None,
        )
    })?;
    if f.op == "refresh" {
        return match f.token {
            Some(t) if !t.is_empty() => Ok(Command::Refresh(t)),
            _ => Err(err("refresh needs a token".into(), None)),
        };
    }
    let Some(name) = f.channel.as_deref() else {
        return Err(err("channel is required".into(), None));
    };
    let channel =
        ChannelName::new(name).map_err(|e| err(format!("invalid channel: {e}"), Some(name)))?;
    match f.op.as_str() {
        "subscribe" => {
            let rewind = match &f.rewind {
                None | Some(serde_json::Value::Null) => 0,
                Some(v) => v.as_u64().ok_or_else(|| {
                    err(
                        "rewind must be a whole number of messages".into(),
                        Some(name),
                    )
                })?,
            };
            Ok(Command::Subscribe(Subscribe {
                channel,
                since: f.since,
                rewind,
                presence: f.presence.unwrap_or(false),
            }))
        }
        "unsubscribe" => Ok(Command::Unsubscribe(channel)),
        _ => Err(err(
            "op must be subscribe, unsubscribe or refresh".into(),
            Some(name),
        )),
    }
}

/// A JSON text frame.
pub(super) fn text(v: serde_json::Value) -> Bytes {
    wire::frame(OpCode::Text, v.to_string().as_bytes())
}

/// `{"type":"error","code":N,"message":"...","channel":"C"}` (channel omitted when absent).
pub fn error_frame(code: u16, message: &str, channel: Option<&str>) -> Bytes {
    match channel {
        Some(c) => text(json!({"type": "error", "code": code, "message": message, "channel": c})),
        None => text(json!({"type": "error", "code": code, "message": message})),
    }
}

pub(super) fn reply_frame(reply: &Reply) -> Bytes {
    match reply {
        Reply::Subscribed(c) => text(json!({"type": "subscribed", "channel": c.as_str()})),
        Reply::Unsubscribed(c) => text(json!({"type": "unsubscribed", "channel": c.as_str()})),
        Reply::Refreshed(exp) => text(json!({"type": "refreshed", "exp": exp})),
        Reply::Error {
            code,
            message,
            channel,
        } => error_frame(*code, message, channel.as_deref()),
    }
}

/// The error frame's `code` and the close code of a socket the backend ended (a disconnect, a
/// revoked token): in the range RFC 6455 leaves to applications.
pub(super) const DISCONNECT_CODE: u16 = 4000;

/// The close code (RFC 6455 section 7.4) for why the hub ends a socket.
pub(super) fn close_code(reason: CloseReason) -> u16 {
    match reason {
        CloseReason::Shutdown => 1012,     // service restart
        CloseReason::Slow => 1013,         // try again later
        CloseReason::TokenExpired => 1008, // policy
        CloseReason::Stale => 1001,        // going away
        CloseReason::Error => 1011,        // internal error
        CloseReason::Client => 1000,       // normal
        // The backend ended it: the contract's application code.
        CloseReason::Disconnected | CloseReason::Revoked => DISCONNECT_CODE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames() {
        assert_eq!(
            parse_frame(r#"{"op":"subscribe","channel":"public:a","since":"5-0"}"#).unwrap(),
            Command::Subscribe(Subscribe {
                channel: ChannelName::new("public:a").unwrap(),
                since: Some("5-0".into()),
                rewind: 0,
                presence: false
            })
        );
        assert_eq!(
            parse_frame(r#"{"op":"subscribe","channel":"a","rewind":20}"#).unwrap(),
            Command::Subscribe(Subscribe {
                channel: ChannelName::new("a").unwrap(),
                since: None,
                rewind: 20,
                presence: false
            })
        );
        for bad in [r#""3""#, "-1", "1.5", "true"] {
            let e = parse_frame(&format!(
                r#"{{"op":"subscribe","channel":"a","rewind":{bad}}}"#
            ))
            .unwrap_err();
            assert!(e.message.contains("rewind"), "{bad}: {}", e.message);
        }
        assert_eq!(
            parse_frame(r#"{"op":"unsubscribe","channel":"a"}"#).unwrap(),
            Command::Unsubscribe(ChannelName::new("a").unwrap())
        );
        let e = parse_frame(r#"{"op":"jump","channel":"a"}"#).unwrap_err();
        assert_eq!(e.channel.as_deref(), Some("a"));
        assert_eq!(
            parse_frame(r#"{"op":"refresh","token":"a.b.c"}"#).unwrap(),
            Command::Refresh("a.b.c".into())
        );
        for bad in [r#"{"op":"refresh"}"#, r#"{"op":"refresh","token":""}"#] {
            let e = parse_frame(bad).unwrap_err();
            assert!(e.message.contains("token") && e.channel.is_none(), "{bad}");
        }
        assert!(parse_frame(r#"{"op":"subscribe"}"#).is_err());
        assert!(parse_frame(r#"{"op":"subscribe","channel":"a b"}"#).is_err());
        assert!(parse_frame("not json").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        /// Any text a client sends is a command or an error, never a panic; an error names
        /// the channel only as the client wrote it.
        #[test]
        fn any_text_is_a_command_or_an_error(text in "\\PC{0,80}|\\{\"op\":\"[a-z]{0,12}\",\"channel\":\"\\PC{0,20}\"(,\"since\":\"[0-9a-z-]{0,20}\")?\\}") {
            match parse_frame(&text) {
                Ok(Command::Subscribe(Subscribe { channel: c, .. })) | Ok(Command::Unsubscribe(c)) => {
                    prop_assert!(ChannelName::new(c.as_str()).is_ok());
                }
                Ok(Command::Refresh(t)) => prop_assert!(!t.is_empty()),
                Err(e) => {
                    if let Some(c) = e.channel {
                        prop_assert!(text.contains(&c) || text.contains('\\'));
                    }
                }
            }
        }

        /// A well-formed frame reads back as what was written.
        #[test]
        fn frames_round_trip(
            sub in any::<bool>(),
            name in "[a-zA-Z0-9_:.-]{1,64}",
            since in proptest::option::of("[0-9]{1,14}-[0-9]{1,4}"),
        ) {
            let op = if sub { "subscribe" } else { "unsubscribe" };
            let text = serde_json::json!({"op": op, "channel": name, "since": since}).to_string();
            let want = match ChannelName::new(&name) {
                Ok(channel) if sub => Command::Subscribe(Subscribe { channel, since, rewind: 0, presence: false }),
                Ok(c) => Command::Unsubscribe(c),
                Err(_) => return Ok(()),
            };
            prop_assert_eq!(parse_frame(&text).unwrap(), want);
        }
    }
}
