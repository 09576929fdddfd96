//! Who may read which channel: JWT verification and channel grants.
//!
//! `public:*` is open to anyone; `user:<sub>` to a token with that `sub`; every other channel to
//! a token whose `channels` claim holds it or a pattern for it (`room:*`, `*`). A request is
//! granted whole or refused whole. Each algorithm is verified only with its own key (no
//! `alg: none`, no algorithm confusion). Tokens never reach a log line or an error message.

use crate::config::Config;
use crate::refusal::Refusal;
use crate::revocations::{Revocations, TokenId};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use protocol::ChannelName;
use std::sync::Arc;

/// Prefix of a user's own channel, `user:<sub>`.
pub const USER_PREFIX: &str = "user:";

/// The claims the hub reads.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default)]
    pub channels: Vec<String>,
    /// The token's id, for revocation by `jti`.
    #[serde(default)]
    pub jti: Option<String>,
    /// When it was issued, for revocation by `sub` + `before`.
    #[serde(default)]
    pub iat: Option<u64>,
}

impl Claims {
    /// What a revocation is checked against: `None` when the token has neither `jti` nor `iat`.
    pub fn token_id(&self) -> Option<Arc<TokenId>> {
        (self.jti.is_some() || self.iat.is_some()).then(|| {
            Arc::new(TokenId {
                jti: self.jti.as_deref().map(Into::into),
                iat: self.iat,
            })
        })
    }

    /// Whether this token may read `channel` (public channels aside).
    pub fn grants(&self, channel: &str) -> bool {
        channel.strip_prefix(USER_PREFIX) == Some(self.sub.as_str())
            || self.channels.iter().any(|p| pattern_matches(p, channel))
    }
}

/// `*` matches everything; `prefix*` matches what starts with prefix; anything else matches
/// itself. A `*` anywhere but at the end is not a pattern (and matches nothing, since channel
/// names cannot contain `*`).
pub fn pattern_matches(pattern: &str, channel: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) if !prefix.contains('*') => channel.starts_with(prefix),
        Some(_) => false,
        None => pattern == channel,
    }
}

/// Now, in Unix seconds.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Who a stream belongs to, once authorized.
#[derive(Debug, Clone, Default)]
pub struct Grant {
    /// The token's `sub`; `None` for anonymous readers of public channels.
    pub user: Option<Arc<str>>,
    /// The token's `exp` (Unix seconds): the stream is closed then.
    pub expires_at: Option<u64>,
    /// The verified claims, for later subscriptions on the same connection (WebSocket).
    pub claims: Option<Arc<Claims>>,
}

impl Grant {
    /// The grant of verified claims (a token's, or the authorization hook's with its
    /// `expires_at`).
    pub fn of(claims: Arc<Claims>, expires_at: Option<u64>) -> Grant {
        Grant {
            user: Some(Arc::from(claims.sub.as_str())),
            expires_at,
            claims: Some(claims),
        }
    }

    /// The token's id for revocations.
    pub fn token_id(&self) -> Option<Arc<TokenId>> {
        self.claims.as_ref().and_then(|c| c.token_id())
    }
}

/// The configured keys, each with the one algorithm it verifies, and the issuer and audience a
/// token must name (when configured).
pub struct Auth {
    keys: Vec<(Algorithm, DecodingKey)>,
    /// Tokens refused before their `exp` (`POST /v1/revoke`), kept current by the node.
    pub revocations: Revocations,
    /// Which channels are readable without a token (anonymous namespaces).
    namespaces: crate::namespaces::Namespaces,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Auth {
    /// Reads `HUB_JWT_SECRET` (HS256) and the PEM at `HUB_JWT_PUBLIC_KEY` (RS256 for an RSA key,
    /// ES256 for an EC P-256 key). Errors name the variable.
    pub fn from_config(config: &Config) -> Result<Auth, String> {
        let mut keys = Vec::new();
        if let Some(secret) = &config.jwt_secret {
            if secret.len() < 16 {
                return Err("HUB_JWT_SECRET must be at least 16 bytes".into());
            }
            keys.push((
                Algorithm::HS256,
                DecodingKey::from_secret(secret.as_bytes()),
            ));
        }
        if let Some(path) = &config.jwt_public_key {
            let pem = std::fs::read(path)
                .map_err(|e| format!("HUB_JWT_PUBLIC_KEY {path:?}: cannot read: {e}"))?;
            if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                keys.push((Algorithm::RS256, k));
            } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                keys.push((Algorithm::ES256, k));
            } else {
                return Err(format!(
                    "HUB_JWT_PUBLIC_KEY {path:?}: not an RSA or EC public key in PEM form"
                ));
            }
        }
        Ok(Auth {
            keys,
            revocations: Revocations::default(),
            namespaces: config.namespaces.clone(),
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
        })
    }

    pub fn configured(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Verifies a token: signature with the key of its algorithm, `exp` and `nbf` (no leeway),
    /// `sub`, and `iss` / `aud` when `HUB_JWT_ISSUER` / `HUB_JWT_AUDIENCE` are set. Without an
    /// audience configured, a token's `aud` is not looked at (identity providers always set one).
    pub fn verify(&self, token: &str) -> Result<Claims, &'static str> {
        if self.keys.is_empty() {
            return Err(
                "no token key is configured on this node, so only public:* channels can be read",
            );
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| "the token is not a JWT")?;
        let Some((alg, key)) = self.keys.iter().find(|(alg, _)| *alg == header.alg) else {
            return Err("the token's algorithm is not accepted here");
        };
        let mut v = Validation::new(*alg);
        v.leeway = 0;
        v.validate_nbf = true;
        v.validate_aud = false;
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        if let Some(aud) = &self.audience {
            v.set_audience(&[aud]);
            v.validate_aud = true;
            required.push("aud");
        }
        v.set_required_spec_claims(&required);
        match jsonwebtoken::decode::<Claims>(token, key, &v) {
            Ok(data) if data.claims.sub.is_empty() => Err("the token's sub is empty"),
            Ok(data) if self.is_revoked(&data.claims) => Err("the token has been revoked"),
            Ok(data) => Ok(data.claims),
            Err(e) => Err(match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => "the token has expired",
                jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    "the token's signature does not verify"
                }
                jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(_) => {
                    "the token lacks a required claim (sub, exp, or the iss/aud this hub checks)"
                }
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => {
                    "the token is not valid yet (nbf)"
                }
                jsonwebtoken::errors::ErrorKind::InvalidIssuer => "the token's iss is not accepted",
                jsonwebtoken::errors::ErrorKind::InvalidAudience => {
                    "the token's aud is not accepted"
                }
                _ => "the token is invalid",
            }),
        }
    }

    /// Whether verified claims are revoked now.
    pub fn is_revoked(&self, claims: &Claims) -> bool {
        self.revocations.is_revoked_parts(
            &claims.sub,
            claims.jti.as_deref(),
            claims.iat,
            now_secs(),
        )
    }

    /// Whether a stream holding `claims` (or no token) may read `channel` (WebSocket
    /// subscribe): 401 without a token for a protected channel, 403 when the token does not
    /// grant it.
    pub fn check(&self, claims: Option<&Claims>, channel: &str) -> Result<(), Refusal> {
        if self.namespaces.is_anonymous(channel) {
            return Ok(());
        }
        match claims {
            None => Err(Refusal::unauthorized(
                "this channel needs a token, given at the upgrade",
            )),
            Some(c) if !c.grants(channel) => {
                Err(Refusal::forbidden("the token does not grant this channel"))
            }
            Some(_) => Ok(()),
        }
    }

    /// The channels of `channels` that need a grant (all but those of anonymous namespaces,
    /// `public:*` by default).
    pub fn protected<'a>(
        &'a self,
        channels: &'a [ChannelName],
    ) -> impl Iterator<Item = &'a str> + 'a {
        channels
            .iter()
            .map(|c| c.as_str())
            .filter(|c| !self.namespaces.is_anonymous(c))
    }

    /// The grant of `claims` for `channels`, or 403 naming the first they do not grant.
    pub fn grant(
        &self,
        claims: Arc<Claims>,
        channels: &[ChannelName],
        expires_at: Option<u64>,
    ) -> Result<Grant, Refusal> {
        if let Some(refused) = self.protected(channels).find(|c| !claims.grants(c)) {
            return Err(Refusal::forbidden(format!(
                "the grant does not include channel {refused}"
            )));
        }
        Ok(Grant::of(claims, expires_at))
    }

    /// Decides a request for `channels` with an optional bearer token: 401 when a protected
    /// channel is asked without a valid token, 403 when a valid token does not grant one.
    pub fn authorize(
        &self,
        channels: &[ChannelName],
        token: Option<&str>,
    ) -> Result<Grant, Refusal> {
        let verified = token.map(|t| self.verify(t));
        let protected: Vec<&str> = self.protected(channels).collect();
        let claims = match verified {
            Some(Ok(c)) => Arc::new(c),
            // Public channels need nothing: a bad token there is ignored, not refused.
            _ if protected.is_empty() => return Ok(Grant::default()),
            None => {
                return Err(Refusal::unauthorized(format!(
                    "channel {} needs a token (Authorization: Bearer or ?token=)",
                    protected[0]
                )))
            }
            Some(Err(why)) => {
                return Err(Refusal::unauthorized(format!(
                    "channel {} needs a valid token: {why}",
                    protected[0]
                )))
            }
        };
        if let Some(refused) = protected.iter().find(|c| !claims.grants(c)) {
            return Err(Refusal::forbidden(format!(
                "the token does not grant channel {refused}"
            )));
        }
        let exp = claims.exp;
        Ok(Grant::of(claims, Some(exp)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn claims(sub: &str, channels: &[&str]) -> Claims {
        Claims {
            sub: sub.into(),
            exp: 0,
            channels: channels.iter().map(|s| s.to_string()).collect(),
            jti: None,
            iat: None,
        }
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "anything:at/all"));
        assert!(pattern_matches("room:*", "room:7"));
        assert!(pattern_matches("room:*", "room:"));
        assert!(!pattern_matches("room:*", "rooms:7"));
        assert!(pattern_matches("room:7", "room:7"));
        assert!(!pattern_matches("room:7", "room:77"));
        assert!(
            !pattern_matches("ro*m:7", "room:7"),
            "* only as the last character"
        );
        assert!(!pattern_matches("**", "x"));
    }

    #[test]
    fn grants() {
        let c = claims("42", &["room:*", "news"]);
        assert!(c.grants("user:42"));
        assert!(!c.grants("user:43"));
        assert!(!c.grants("user:4"));
        assert!(c.grants("room:1"));
        assert!(c.grants("news"));
        assert!(!c.grants("newsroom"));
    }

    proptest! {
        /// A pattern grants a channel exactly when it equals it, or ends in one `*` and the
        /// channel starts with what precedes it.
        #[test]
        fn pattern_rule(prefix in "[a-z:]{0,6}", rest in "[a-z:]{0,6}", star in any::<bool>()) {
            let pattern = if star { format!("{prefix}*") } else { prefix.clone() };
            let channel = format!("{prefix}{rest}");
            prop_assert_eq!(pattern_matches(&pattern, &channel), star || rest.is_empty());
            prop_assert!(pattern_matches("*", &channel));
        }

        /// `user:<sub>` is granted to that sub only, whatever the channels claim says otherwise.
        #[test]
        fn own_user_channel(sub in "[a-z0-9]{1,8}", other in "[a-z0-9]{1,8}") {
            let c = claims(&sub, &[]);
            let own = format!("user:{sub}");
            let theirs = format!("user:{other}");
            prop_assert!(c.grants(&own));
            prop_assert_eq!(c.grants(&theirs), sub == other);
        }
    }

    fn hs_auth(secret: &str) -> Auth {
        Auth {
            keys: vec![(
                Algorithm::HS256,
                DecodingKey::from_secret(secret.as_bytes()),
            )],
            issuer: Some("api".into()),
            audience: None,
            revocations: Revocations::default(),
            namespaces: Default::default(),
        }
    }

    fn token(secret: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// Any text as a token is refused with a reason, never a panic.
        #[test]
        fn junk_tokens_are_refused(t in "\\PC{0,200}|[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_-]{0,40}") {
            prop_assert!(hs_auth("0123456789abcdef0123").verify(&t).is_err());
        }

        /// A valid token with any one character changed no longer verifies (or still says
        /// the same thing), and one signed with another key never does.
        #[test]
        fn tampered_tokens_are_refused(
            sub in "[a-z0-9]{1,8}",
            at in any::<prop::sample::Index>(),
            to in "[A-Za-z0-9_-]",
        ) {
            let secret = "0123456789abcdef0123";
            let claims = serde_json::json!({"sub": sub, "exp": 4_000_000_000u64, "iss": "api"});
            let good = token(secret, claims.clone());
            let auth = hs_auth(secret);
            prop_assert_eq!(auth.verify(&good).map(|c| c.sub), Ok(sub.clone()));
            prop_assert!(auth.verify(&token("another-key-of-20-bytes", claims)).is_err());
            let i = at.index(good.len());
            let mut bad = good.clone().into_bytes();
            bad[i] = to.as_bytes()[0];
            let bad = String::from_utf8(bad).unwrap();
            if let Ok(c) = auth.verify(&bad) {
                // Base64 has spare bits in a last character: the same bytes, the same claims.
                prop_assert_eq!(c.sub, sub);
            }
        }
    }
}
