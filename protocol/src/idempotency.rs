//! Idempotency keys of durable publishes: what a key may be.
//!
//! A key (1 to 128 printable ASCII characters, space included) names one publish on one channel
//! for `HUB_IDEMPOTENCY_SECS`; a retry with it gets the first id and publishes nothing. Only the
//! check lives here; the hub's Redis function and embedded broker remember keys.

/// Longest key, in bytes.
pub const MAX_LEN: usize = 128;

/// Why a key is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an idempotency key is 1 to {MAX_LEN} printable ASCII characters")]
pub struct KeyError;

/// Checks a key.
pub fn validate(key: &str) -> Result<(), KeyError> {
    let ok = (1..=MAX_LEN).contains(&key.len()) && key.bytes().all(|b| (b' '..=b'~').contains(&b));
    ok.then_some(()).ok_or(KeyError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for good in ["a", "order-42 retry", &"k".repeat(MAX_LEN), "~!{}:"] {
            assert!(validate(good).is_ok(), "{good:?}");
        }
        for bad in ["", &"k".repeat(MAX_LEN + 1), "tab\there", "é", "line\n"] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
    }
}
