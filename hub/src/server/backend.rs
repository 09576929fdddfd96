//! Control from the backend on the admin port: `POST /v1/disconnect`, `POST /v1/revoke` and
//! `DELETE /v1/revoke`, guarded by `HUB_PUBLISH_KEY` as publishing is.
//!
//! Each body is read bounded, parsed strictly (unknown keys are 400) and handed to the node
//! as one control message; a message that matches no stream is still accepted.

use crate::control::{Control, Target, DEFAULT_REASON, MAX_REASON_CHARS};
use crate::http::error::ApiError;
use crate::node::Node;
use crate::revocations::{Revocation, MAX_ID_LEN};
use crate::server::admin::{check_key, read_body};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

/// Largest body of a control request: a few ids and a 64-character reason.
const MAX_BODY: usize = 4096;

/// `POST /v1/disconnect`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    sub: Option<String>,
    connection_id: Option<String>,
    channel: Option<String>,
    reason: Option<String>,
}

/// `/v1/revoke`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    jti: Option<String>,
    exp: Option<u64>,
    sub: Option<String>,
    before: Option<u64>,
}

fn accepted() -> HttpResponse {
    HttpResponse::Accepted().json(serde_json::json!({ "accepted": true }))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8], shape: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("body must be JSON {shape}: {e}")))
}

fn id(what: &str, v: String) -> Result<String, ApiError> {
    if v.is_empty() || v.len() > MAX_ID_LEN {
        return Err(ApiError::bad_request(format!(
            "{what} must be 1 to {MAX_ID_LEN} bytes"
        )));
    }
    Ok(v)
}

/// `POST /v1/disconnect`.
pub async fn disconnect(
    req: HttpRequest,
    node: web::Data<Node>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    check_key(&req, &node)?;
    let body = read_body(&req, body, MAX_BODY).await?;
    let shape = r#"{"sub": "42"} or {"connection_id": "<uuid>"} or {"channel": "C"}, with an optional "reason""#;
    let b: DisconnectBody = parse(&body, shape)?;
    let target = match (b.sub, b.connection_id, b.channel) {
        (Some(sub), None, None) => Target::Sub(id("sub", sub)?),
        (None, Some(c), None) => Target::ConnectionId(
            uuid::Uuid::parse_str(&c)
                .map_err(|_| ApiError::bad_request("connection_id must be a uuid"))?,
        ),
        (None, None, Some(c)) => Target::Channel(
            protocol::ChannelName::new(&c)
                .map_err(|e| ApiError::bad_request(format!("invalid channel: {e}")))?
                .to_string(),
        ),
        _ => {
            return Err(ApiError::bad_request(format!(
                "name exactly one of sub, connection_id and channel: {shape}"
            )))
        }
    };
    let reason = b.reason.unwrap_or_else(|| DEFAULT_REASON.to_string());
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(ApiError::bad_request(format!(
            "reason must be at most {MAX_REASON_CHARS} characters"
        )));
    }
    node.control(Control::Disconnect { target, reason }).await?;
    Ok(accepted())
}

/// `POST /v1/revoke` (`lift` false) and `DELETE /v1/revoke` (`lift` true).
async fn revoke_or_lift(
    req: HttpRequest,
    node: web::Data<Node>,
    body: web::Payload,
    lift: bool,
) -> Result<HttpResponse, ApiError> {
    check_key(&req, &node)?;
    let body = read_body(&req, body, MAX_BODY).await?;
    let shape = r#"{"jti": "<id>", "exp": <unix s>} or {"sub": "42", "before": <unix s>}"#;
    let b: RevokeBody = parse(&body, shape)?;
    let now = crate::auth::now_secs();
    let revocation = match (b.jti, b.exp, b.sub, b.before) {
        (Some(jti), exp, None, None) if lift || exp.is_some() => Revocation::Jti {
            jti: id("jti", jti)?,
            until: exp.unwrap_or(0),
        },
        (None, None, Some(sub), before) if lift || before.is_some() => Revocation::Sub {
            sub: id("sub", sub)?,
            before: before.unwrap_or(0),
            until: now.saturating_add(node.config.revoke_keep_secs),
        },
        _ => {
            return Err(ApiError::bad_request(format!(
                "name a token by jti (with its exp) or a user by sub (with before): {shape}"
            )))
        }
    };
    let c = if lift {
        Control::Lift { revocation }
    } else {
        Control::Revoke { revocation }
    };
    node.control(c).await?;
    Ok(accepted())
}

/// `POST /v1/revoke`.
pub async fn revoke(
    req: HttpRequest,
    node: web::Data<Node>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    revoke_or_lift(req, node, body, false).await
}

/// `DELETE /v1/revoke`.
pub async fn lift(
    req: HttpRequest,
    node: web::Data<Node>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    revoke_or_lift(req, node, body, true).await
}
