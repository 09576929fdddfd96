//! Revoked tokens, as this node knows them: by `jti` (until the token's `exp`) and by `sub`
//! with an instant (tokens issued before it, or without `iat`, for a while).
//!
//! Every check is a lookup in memory (no Redis round trip per stream open); the control
//! channel and the re-read after a reconnection keep the set current. No I/O here.

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Longest `jti` or `sub` a revocation may name (tokens' ids are uuids or shorter).
pub const MAX_ID_LEN: usize = 256;

/// One revocation, as `POST /v1/revoke` takes it, the control channel carries it and Redis
/// keeps it. `until` (Unix seconds) is when it stops mattering: the token's `exp`, or the
/// revocation's time plus `HUB_REVOKE_KEEP_SECS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Revocation {
    Jti {
        jti: String,
        until: u64,
    },
    Sub {
        sub: String,
        before: u64,
        until: u64,
    },
}

impl Revocation {
    /// The Redis hash field that keeps it (one per `jti`, one per `sub`: a newer revocation of
    /// a `sub` replaces the older).
    pub fn field(&self) -> String {
        match self {
            Revocation::Jti { jti, .. } => format!("j:{jti}"),
            Revocation::Sub { sub, .. } => format!("s:{sub}"),
        }
    }

    pub fn until(&self) -> u64 {
        match self {
            Revocation::Jti { until, .. } | Revocation::Sub { until, .. } => *until,
        }
    }
}

/// What a stream's token says about itself, for the revocation check (`None`s when absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenId {
    pub jti: Option<Box<str>>,
    /// The token's `iat`; for a grant of the authorization hook, when it was granted.
    pub iat: Option<u64>,
}

#[derive(Default)]
struct Set {
    /// `jti` → until.
    jti: HashMap<Box<str>, u64>,
    /// `sub` → (before, until).
    sub: HashMap<Box<str>, (u64, u64)>,
}

impl Set {
    /// Adds a revocation (a `sub`'s replaces the one before).
    fn insert(&mut self, r: &Revocation) {
        match r {
            Revocation::Jti { jti, until } => {
                self.jti.insert(jti.as_str().into(), *until);
            }
            Revocation::Sub { sub, before, until } => {
                self.sub.insert(sub.as_str().into(), (*before, *until));
            }
        }
    }
}

/// The set, behind a read-write lock: reads (every stream open with a token, every sweep of
/// a control message) far outnumber changes.
#[derive(Default)]
pub struct Revocations {
    set: RwLock<Set>,
    /// Bumped by every change, so that a re-read that raced with a change does not undo it
    /// (see [`Revocations::replace_since`]).
    version: AtomicU64,
}

impl Revocations {
    /// Whether a token of `sub` with `id` is revoked at `now` (Unix seconds).
    pub fn is_revoked(&self, sub: &str, id: &TokenId, now: u64) -> bool {
        self.is_revoked_parts(sub, id.jti.as_deref(), id.iat, now)
    }

    /// [`Revocations::is_revoked`] of a token's parts.
    pub fn is_revoked_parts(
        &self,
        sub: &str,
        jti: Option<&str>,
        iat: Option<u64>,
        now: u64,
    ) -> bool {
        let set = self.set.read();
        if set.jti.is_empty() && set.sub.is_empty() {
            return false;
        }
        if let Some(jti) = jti {
            if set.jti.get(jti).is_some_and(|until| *until > now) {
                return true;
            }
        }
        set.sub
            .get(sub)
            .is_some_and(|(before, until)| *until > now && iat.is_none_or(|iat| iat < *before))
    }

    /// The change counter, to pass to [`Revocations::replace_since`].
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Adds (or, for a `sub`, replaces) a revocation.
    pub fn add(&self, r: &Revocation) {
        let mut set = self.set.write();
        self.version.fetch_add(1, Ordering::AcqRel);
        set.insert(r);
    }

    /// Lifts a revocation (its `jti`, or its `sub`'s).
    pub fn lift(&self, r: &Revocation) {
        let mut set = self.set.write();
        self.version.fetch_add(1, Ordering::AcqRel);
        match r {
            Revocation::Jti { jti, .. } => {
                set.jti.remove(jti.as_str());
            }
            Revocation::Sub { sub, .. } => {
                set.sub.remove(sub.as_str());
            }
        }
    }

    /// Replaces the whole set by `all`, read from Redis after [`Revocations::version`] was
    /// `seen`. If a change came in meanwhile (the control channel and the read travel on
    /// different connections, so a revocation may be heard before a read that missed it
    /// answers), `all` is added instead: nothing heard is undone; what was lifted meanwhile
    /// may stay until the next read.
    pub fn replace_since(&self, all: &[Revocation], seen: u64) {
        let mut set = self.set.write();
        if self.version.load(Ordering::Acquire) == seen {
            *set = Set::default();
        }
        self.version.fetch_add(1, Ordering::AcqRel);
        for r in all {
            set.insert(r);
        }
    }

    /// Forgets what no longer matters at `now`.
    pub fn prune(&self, now: u64) {
        let mut set = self.set.write();
        set.jti.retain(|_, until| *until > now);
        set.sub.retain(|_, (_, until)| *until > now);
    }

    pub fn len(&self) -> usize {
        let set = self.set.read();
        set.jti.len() + set.sub.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(jti: Option<&str>, iat: Option<u64>) -> TokenId {
        TokenId {
            jti: jti.map(Into::into),
            iat,
        }
    }

    #[test]
    fn by_jti_until_it_expires() {
        let r = Revocations::default();
        r.add(&Revocation::Jti {
            jti: "t1".into(),
            until: 100,
        });
        assert!(r.is_revoked("42", &id(Some("t1"), Some(5)), 99));
        assert!(
            !r.is_revoked("42", &id(Some("t1"), Some(5)), 100),
            "expired"
        );
        assert!(!r.is_revoked("42", &id(Some("t2"), Some(5)), 99));
        assert!(!r.is_revoked("42", &id(None, None), 99));
        r.lift(&Revocation::Jti {
            jti: "t1".into(),
            until: 0,
        });
        assert!(!r.is_revoked("42", &id(Some("t1"), Some(5)), 99));
    }

    #[test]
    fn by_sub_before_an_instant_and_tokens_without_iat() {
        let r = Revocations::default();
        r.add(&Revocation::Sub {
            sub: "42".into(),
            before: 1000,
            until: 5000,
        });
        assert!(r.is_revoked("42", &id(None, Some(999)), 2000));
        assert!(
            !r.is_revoked("42", &id(None, Some(1000)), 2000),
            "issued at the instant"
        );
        assert!(r.is_revoked("42", &id(Some("x"), None), 2000), "no iat");
        assert!(!r.is_revoked("43", &id(None, None), 2000), "another sub");
        assert!(!r.is_revoked("42", &id(None, None), 5000), "kept no longer");
        r.prune(5000);
        assert!(r.is_empty());
    }

    #[test]
    fn replace_sets_exactly_what_it_read_unless_a_change_came_in_meanwhile() {
        let r = Revocations::default();
        r.add(&Revocation::Jti {
            jti: "old".into(),
            until: 100,
        });
        let seven = Revocation::Sub {
            sub: "7".into(),
            before: 10,
            until: 100,
        };
        r.replace_since(std::slice::from_ref(&seven), r.version());
        assert!(!r.is_revoked("1", &id(Some("old"), None), 0));
        assert!(r.is_revoked("7", &id(None, Some(9)), 0));
        assert_eq!(r.len(), 1);
        // A read that started before a revocation was heard does not undo it.
        let seen = r.version();
        r.add(&Revocation::Jti {
            jti: "heard".into(),
            until: 100,
        });
        r.replace_since(&[], seen);
        assert!(r.is_revoked("1", &id(Some("heard"), None), 0));
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn wire_form() {
        let r = Revocation::Sub {
            sub: "42".into(),
            before: 10,
            until: 20,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, r#"{"by":"sub","sub":"42","before":10,"until":20}"#);
        assert_eq!(serde_json::from_str::<Revocation>(&json).unwrap(), r);
        assert_eq!(r.field(), "s:42");
    }
}
