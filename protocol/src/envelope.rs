//! The publish envelope `{"event": "...", "data": <any JSON>}` and the HTTP publish body.
//!
//! Parsing enforces the size limit first and guarantees an event name that is safe to put in an
//! SSE `event:` line. It does not know about channels' existence, history or delivery.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::borrow::Cow;

/// Longest accepted event name.
pub const MAX_EVENT_LEN: usize = 128;
/// Event names the hub itself uses (`hub.connected`, `hub.reset`, `hub.reconnect`) start with
/// this; publishers may not use it, so a client can trust them.
pub const RESERVED_EVENT_PREFIX: &str = "hub.";

/// Why an envelope was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope is {size} bytes, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("{0}")]
    Malformed(String),
}

/// A message as publishers send it. `event` defaults to `message`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    pub data: Value,
}

impl Envelope {
    /// Parses an envelope received from Redis or built from an HTTP body, refusing anything over
    /// `max_bytes` before parsing it.
    pub fn parse(bytes: &[u8], max_bytes: usize) -> Result<Envelope, EnvelopeError> {
        if bytes.len() > max_bytes {
            return Err(EnvelopeError::TooLarge {
                size: bytes.len(),
                limit: max_bytes,
            });
        }
        let env: Envelope = serde_json::from_slice(bytes).map_err(|e| {
            EnvelopeError::Malformed(format!(
                "envelope is not valid JSON of the form {{\"event\":..., \"data\":...}}: {e}"
            ))
        })?;
        env.validate()?;
        Ok(env)
    }

    /// Checks the event name: 1 to 128 characters, no control characters, not `hub.*`.
    pub fn validate(&self) -> Result<(), EnvelopeError> {
        if let Some(e) = &self.event {
            if e.is_empty() || e.len() > MAX_EVENT_LEN {
                return Err(EnvelopeError::Malformed(format!(
                    "event name must be 1 to {MAX_EVENT_LEN} characters"
                )));
            }
            if e.chars().any(char::is_control) {
                return Err(EnvelopeError::Malformed(
                    "event name must not contain control characters".into(),
                ));
            }
            if e.starts_with(RESERVED_EVENT_PREFIX) {
                return Err(EnvelopeError::Malformed(format!(
                    "event names starting with \"{RESERVED_EVENT_PREFIX}\" are reserved for the hub"
                )));
            }
        }
        Ok(())
    }

    /// The event name, `message` when none was given.
    pub fn event_name(&self) -> &str {
        self.event.as_deref().unwrap_or("message")
    }

    /// What goes into SSE `data:` lines: a JSON string as the raw string, any other value as
    /// compact JSON.
    pub fn data_text(&self) -> Cow<'_, str> {
        match &self.data {
            Value::String(s) => Cow::Borrowed(s),
            other => Cow::Owned(other.to_string()),
        }
    }

    /// The envelope as JSON bytes, as it is published to Redis and measured against the limit.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing a Value with a String key map cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

fn default_true() -> bool {
    true
}

/// Body of `POST /v1/publish`: `{"channel": "C", "event": "...", "data": ..., "durable": true}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishRequest {
    pub channel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    pub data: Value,
    #[serde(default = "default_true")]
    pub durable: bool,
}

impl PublishRequest {
    /// Splits off the envelope part.
    pub fn into_envelope(self) -> (String, Envelope, bool) {
        (
            self.channel,
            Envelope {
                event: self.event,
                data: self.data,
            },
            self.durable,
        )
    }
}

/// Body of the `202` answer to `POST /v1/publish`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishResponse {
    pub id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_data_is_raw_other_data_is_compact_json() {
        let e = Envelope::parse(br#"{"event":"chat","data":"a\nb"}"#, 1000).unwrap();
        assert_eq!(e.event_name(), "chat");
        assert_eq!(e.data_text(), "a\nb");
        let e = Envelope::parse(br#"{ "data" : { "x" : [1, 2] , "y":null } }"#, 1000).unwrap();
        assert_eq!(e.event_name(), "message");
        assert_eq!(e.data_text(), r#"{"x":[1,2],"y":null}"#);
    }

    #[test]
    fn refuses_oversize_before_parsing() {
        let err = Envelope::parse(b"not json at all", 4).unwrap_err();
        assert_eq!(err, EnvelopeError::TooLarge { size: 15, limit: 4 });
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            &b"{"[..],
            b"[]",
            b"{\"event\":\"x\"}",
            b"{\"event\":5,\"data\":1}",
            b"{\"event\":\"a\\nb\",\"data\":1}",
            b"{\"event\":\"\",\"data\":1}",
            b"{\"event\":\"hub.reset\",\"data\":1}",
            b"\xff\xfe",
        ] {
            assert!(
                matches!(Envelope::parse(bad, 1000), Err(EnvelopeError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn serializes_without_absent_event() {
        let e = Envelope {
            event: None,
            data: Value::from(1),
        };
        assert_eq!(e.to_bytes(), br#"{"data":1}"#);
        let e = Envelope {
            event: Some("x".into()),
            data: Value::from("s"),
        };
        assert_eq!(e.to_bytes(), br#"{"event":"x","data":"s"}"#);
    }

    #[test]
    fn publish_request_defaults_to_durable() {
        let r: PublishRequest = serde_json::from_str(r#"{"channel":"c","data":1}"#).unwrap();
        assert!(r.durable);
        let r: PublishRequest =
            serde_json::from_str(r#"{"channel":"c","data":1,"durable":false}"#).unwrap();
        assert!(!r.durable);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(10_000))]

            /// Any bytes from Redis or HTTP parse or are refused, without panicking; what is
            /// accepted has an event name safe for an SSE `event:` line and round-trips.
            #[test]
            fn envelopes_parse_or_refuse(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
                if let Ok(env) = Envelope::parse(&bytes, 150) {
                    let ev = env.event_name();
                    prop_assert!(!ev.contains(['\r', '\n']) && !ev.starts_with(RESERVED_EVENT_PREFIX));
                    prop_assert_eq!(Envelope::parse(&env.to_bytes(), usize::MAX), Ok(env.clone()));
                }
            }

            #[test]
            fn json_like_envelopes_parse_or_refuse(
                event in proptest::option::of("\\PC{0,20}|hub\\.[a-z]{0,5}|[a-z\r\n]{0,8}"),
                data in "\\PC{0,40}",
            ) {
                let text = match &event {
                    Some(e) => serde_json::json!({"event": e, "data": data}).to_string(),
                    None => serde_json::json!({"data": data}).to_string(),
                };
                match Envelope::parse(text.as_bytes(), 65_536) {
                    Ok(env) => {
                        prop_assert!(!env.event_name().chars().any(char::is_control));
                        prop_assert_eq!(env.data_text(), data);
                    }
                    Err(_) => prop_assert!(event.is_some()),
                }
            }
        }
    }
}
