//! Control from the backend, as it travels between nodes: disconnects and revocations (and
//! their lifting), one JSON message each on the control channel.
//!
//! Plain data and its wire form only: the admin server parses requests into it, the broker
//! carries it, the node applies it to its streams.

use crate::revocations::Revocation;
use serde::{Deserialize, Serialize};

/// Longest reason a disconnect may give (characters).
pub const MAX_REASON_CHARS: usize = 64;
/// The reason of a disconnect that names none.
pub const DEFAULT_REASON: &str = "disconnected";
/// The reason a stream whose token was revoked is given.
pub const REVOKED_REASON: &str = "revoked";
/// Largest control message read from the control channel (a request's body is bounded
/// smaller by the admin server).
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// Which streams a disconnect ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Sub(String),
    ConnectionId(uuid::Uuid),
    Channel(String),
}

/// One control message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Control {
    /// End every matching stream, telling it `reason`.
    Disconnect { target: Target, reason: String },
    /// Refuse such tokens from now on and end the streams holding one.
    Revoke { revocation: Revocation },
    /// Stop refusing them.
    Lift { revocation: Revocation },
}

impl Control {
    pub fn to_bytes(&self) -> Vec<u8> {
        // A derived Serialize of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A message from the control channel; `Err` says why it cannot be read.
    pub fn parse(bytes: &[u8]) -> Result<Control, String> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(format!(
                "a control message of {} bytes (at most {MAX_MESSAGE_BYTES})",
                bytes.len()
            ));
        }
        serde_json::from_slice(bytes).map_err(|e| format!("an unreadable control message: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_junk() {
        for c in [
            Control::Disconnect {
                target: Target::Sub("42".into()),
                reason: "logout".into(),
            },
            Control::Disconnect {
                target: Target::ConnectionId(uuid::Uuid::nil()),
                reason: DEFAULT_REASON.into(),
            },
            Control::Revoke {
                revocation: Revocation::Jti {
                    jti: "abc".into(),
                    until: 9,
                },
            },
            Control::Lift {
                revocation: Revocation::Sub {
                    sub: "1".into(),
                    before: 2,
                    until: 3,
                },
            },
        ] {
            assert_eq!(Control::parse(&c.to_bytes()), Ok(c));
        }
        assert!(Control::parse(b"").is_err());
        assert!(Control::parse(br#"{"op":"explode"}"#).is_err());
        assert!(Control::parse(&vec![b' '; MAX_MESSAGE_BYTES + 1]).is_err());
    }
}
