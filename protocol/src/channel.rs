//! Channel names: the one place that decides what a valid channel is.
//!
//! A name matches `^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,127}$`. This module does not know about
//! tokens or grants; it only says whether a string is a channel.

use std::fmt;
use std::sync::Arc;

/// Longest valid channel name, in bytes (all valid names are ASCII).
pub const MAX_CHANNEL_LEN: usize = 128;

/// Why a string is not a channel name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is longer than {MAX_CHANNEL_LEN} characters")]
    TooLong,
    #[error("channel name must start with a letter or digit")]
    BadStart,
    #[error("channel name contains a character outside A-Z a-z 0-9 _ . : @ / -")]
    BadChar,
}

/// A validated channel name. Cloning is shallow (an atomic reference count increment).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

impl ChannelName {
    /// Validates `name` and wraps it.
    pub fn new(name: &str) -> Result<Self, ChannelError> {
        validate(name)?;
        Ok(ChannelName(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The shared string, for maps keyed by channel.
    pub fn as_arc(&self) -> &Arc<str> {
        &self.0
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl AsRef<str> for ChannelName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for ChannelName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

fn is_first(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

fn is_rest(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'/' | b'-')
}

/// Checks `name` against `^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,127}$`.
pub fn validate(name: &str) -> Result<(), ChannelError> {
    let bytes = name.as_bytes();
    let Some(&first) = bytes.first() else {
        return Err(ChannelError::Empty);
    };
    if bytes.len() > MAX_CHANNEL_LEN {
        return Err(ChannelError::TooLong);
    }
    if !is_first(first) {
        return Err(ChannelError::BadStart);
    }
    if !bytes[1..].iter().all(|&b| is_rest(b)) {
        return Err(ChannelError::BadChar);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["a", "Z9", "public:news", "user:42", "room/7.a_b-c@d:e", "0"] {
            assert_eq!(validate(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate(&"a".repeat(128)), Ok(()));
    }

    #[test]
    fn rejects_everything_else() {
        assert_eq!(validate(""), Err(ChannelError::Empty));
        assert_eq!(validate(&"a".repeat(129)), Err(ChannelError::TooLong));
        assert_eq!(validate("_a"), Err(ChannelError::BadStart));
        assert_eq!(validate(":a"), Err(ChannelError::BadStart));
        assert_eq!(validate("a b"), Err(ChannelError::BadChar));
        assert_eq!(validate("a\nb"), Err(ChannelError::BadChar));
        assert_eq!(validate("a*"), Err(ChannelError::BadChar));
        assert_eq!(validate("é"), Err(ChannelError::BadStart));
        assert_eq!(validate("aé"), Err(ChannelError::BadChar));
    }

    proptest! {
        /// The hand-written check agrees with a literal reading of the regular expression.
        #[test]
        fn agrees_with_the_regex(s in "\\PC{0,140}|[A-Za-z0-9_.:@/ *-]{0,140}") {
            let b = s.as_bytes();
            let expected = !b.is_empty()
                && b.len() <= 128
                && b[0].is_ascii_alphanumeric()
                && b.iter().skip(1).all(|c| c.is_ascii_alphanumeric() || b"_.:@/-".contains(c));
            prop_assert_eq!(validate(&s).is_ok(), expected);
        }
    }
}
