//! Who may read which channel.
//!
//! `public:*` channels are open to anyone; every other channel needs a token, and without a
//! configured key no token can be valid, so those answer 401. Grants are whole or nothing.
//! This module never logs tokens.

use crate::http::error::ApiError;
use crate::metrics::RejectReason;
use protocol::ChannelName;
use std::sync::Arc;

/// Prefix of channels anyone may read.
pub const PUBLIC_PREFIX: &str = "public:";

/// Who the stream belongs to, once authorized.
#[derive(Debug, Clone, Default)]
pub struct Grant {
    /// The token's `sub`; `None` for anonymous readers of public channels.
    pub user: Option<Arc<str>>,
}

/// Decides a stream request for `channels` with an optional bearer token.
pub fn authorize(
    channels: &[ChannelName],
    token: Option<&str>,
) -> Result<Grant, (RejectReason, ApiError)> {
    let protected: Vec<&str> = channels
        .iter()
        .map(|c| c.as_str())
        .filter(|c| !c.starts_with(PUBLIC_PREFIX))
        .collect();
    if protected.is_empty() {
        return Ok(Grant::default());
    }
    let what = if token.is_some() {
        "the token cannot be verified"
    } else {
        "no token was given"
    };
    Err((
        RejectReason::Unauthorized,
        ApiError::unauthorized(format!(
            "channel {} needs a token and {what}; no token key is configured on this node, so only public:* channels can be read",
            protected[0]
        )),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chans(v: &[&str]) -> Vec<ChannelName> {
        v.iter().map(|c| ChannelName::new(c).unwrap()).collect()
    }

    #[test]
    fn public_channels_need_nothing_others_are_refused_whole() {
        assert!(authorize(&chans(&["public:a", "public:b"]), None).is_ok());
        assert!(authorize(&chans(&["public:a"]), Some("junk")).is_ok());
        let (reason, err) = authorize(&chans(&["public:a", "room:1"]), None).unwrap_err();
        assert_eq!(reason, RejectReason::Unauthorized);
        assert_eq!(err.status.as_u16(), 401);
        assert!(!err.message.contains("junk"));
    }
}
