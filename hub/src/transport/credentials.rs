//! A stream request's credentials and its grant: the token from `Authorization: Bearer`, else
//! `?token=`, else the cookie `HUB_JWT_COOKIE` names (a header or query token, valid or not, is
//! the one used); without any, the backend's hook (`HUB_AUTH_URL`) decides when it is set.
//! Both transports and both HTTP readers go through [`grant`]; nothing here opens a stream.

use crate::auth::Grant;
use crate::authhook::{Ask, AskHeaders};
use crate::domain::Transport;
use crate::node::Node;
use crate::refusal::Refusal;
use protocol::ChannelName;
use std::borrow::Cow;
use std::net::SocketAddr;

/// What a request carries that may authorize it.
#[derive(Debug, Default, Clone, Copy)]
pub struct Credentials<'a> {
    /// The whole `Authorization` header (the hook gets it as it came).
    pub authorization: Option<&'a str>,
    /// `?token=`, decoded.
    pub query_token: Option<&'a str>,
    /// The `Cookie` header (several joined with `; `, as HTTP/2 may split them).
    pub cookie: Option<&'a str>,
    pub origin: Option<&'a str>,
    /// The client's address (the TCP peer).
    pub remote: Option<SocketAddr>,
}

/// The value of cookie `name` in a `Cookie` header (the first, if repeated; RFC 6265
/// section 5.4: `name=value` pairs separated by `;`, a value possibly in double quotes). The
/// cookie crate's parser reads `Set-Cookie` lines, not this header, so the split is here.
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<Cow<'a, str>> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| {
            let v = v.trim();
            v.strip_prefix('"')
                .and_then(|q| q.strip_suffix('"'))
                .unwrap_or(v)
        })
        .filter(|v| !v.is_empty())
        .map(Cow::Borrowed)
}

impl<'a> Credentials<'a> {
    /// The token this request carries, by the order above.
    pub fn token(&self, cookie_name: Option<&str>) -> Option<Cow<'a, str>> {
        let bearer = self.authorization.and_then(crate::http::bearer_credential);
        if let Some(t) = bearer.or(self.query_token) {
            return Some(Cow::Borrowed(t));
        }
        cookie_value(self.cookie?, cookie_name?)
    }

    fn ask_headers(&self) -> AskHeaders<'a> {
        AskHeaders {
            cookie: self.cookie,
            authorization: self.authorization,
            origin: self.origin,
        }
    }
}

/// Decides a stream request: 401 without a valid token for a protected channel (or when the
/// hook says so), 403 when the grant does not hold a channel, 503 when the hook cannot
/// answer. A WebSocket (no channels yet) is decided once: its token, else the hook's grant
/// (asked with no channels), else anonymous.
pub async fn grant(
    node: &Node,
    channels: &[ChannelName],
    transport: Transport,
    creds: &Credentials<'_>,
) -> Result<Grant, Refusal> {
    let token = creds.token(node.config.jwt_cookie.as_deref());
    let hook = node.hook.as_ref().filter(|_| token.is_none());
    let needs_grant = transport == Transport::Ws || node.auth.protected(channels).next().is_some();
    match (hook, needs_grant) {
        (Some(hook), true) => {
            let ask = Ask::new(channels, transport, creds.remote, creds.ask_headers());
            let granted = hook.ask(&ask).await?;
            node.auth
                .grant(granted.claims, channels, granted.expires_at)
        }
        _ if transport == Transport::Ws => match token {
            None => Ok(Grant::default()),
            Some(t) => match node.auth.verify(&t) {
                Ok(c) => {
                    let exp = c.exp;
                    Ok(Grant::of(std::sync::Arc::new(c), Some(exp)))
                }
                Err(why) => Err(Refusal::unauthorized(format!("invalid token: {why}"))),
            },
        },
        _ => node.auth.authorize(channels, token.as_deref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_then_query_then_cookie() {
        let c = Credentials {
            authorization: Some("Bearer h"),
            query_token: Some("q"),
            cookie: Some("a=1; hub=c"),
            ..Credentials::default()
        };
        assert_eq!(c.token(Some("hub")).as_deref(), Some("h"));
        let c = Credentials {
            authorization: Some("Basic xyz"),
            ..c
        };
        assert_eq!(c.token(Some("hub")).as_deref(), Some("q"));
        let c = Credentials {
            query_token: None,
            ..c
        };
        assert_eq!(c.token(Some("hub")).as_deref(), Some("c"));
        assert_eq!(c.token(None), None, "no cookie configured");
        assert_eq!(c.token(Some("other")), None);
    }

    #[test]
    fn cookie_headers() {
        assert_eq!(cookie_value("hub=abc", "hub").as_deref(), Some("abc"));
        assert_eq!(
            cookie_value("x=1;hub=abc; y=2", "hub").as_deref(),
            Some("abc")
        );
        assert_eq!(cookie_value("hubx=1; xhub=2", "hub"), None);
        assert_eq!(cookie_value("hub=", "hub"), None);
        assert_eq!(cookie_value(";;; =; hub", "hub"), None);
        assert_eq!(cookie_value("hub=\"q\"", "hub").as_deref(), Some("q"));
    }
}
