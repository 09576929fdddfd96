//! The admin port: `POST /v1/publish`, control from the backend, `/metrics`, `/v1/stats`,
//! the status page (`GET /`, `/v1/status`) and health.
//!
//! Publishing checks the key, the size (before parsing) and the body, then hands the message
//! to the node. Nothing here is reachable from the public port.

use crate::http::error;
use crate::http::error::ApiError;
use crate::metrics::{DropReason, Source};
use crate::node::Node;
use crate::server::{get_only, healthz, readyz};
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use protocol::envelope::PublishResponse;
use protocol::{ChannelName, PublishRequest};

/// Room for the body's own fields (`channel`, `durable`, JSON punctuation) on top of the
/// envelope limit: a 128-byte channel name and the keys fit in far less.
const BODY_OVERHEAD: usize = 1024;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/publish")
            .route(web::post().to(publish))
            .default_service(web::to(error::method_not_allowed)),
    )
    .service(
        web::resource("/v1/disconnect")
            .route(web::post().to(super::backend::disconnect))
            .default_service(web::to(error::method_not_allowed)),
    )
    .service(
        web::resource("/v1/revoke")
            .route(web::post().to(super::backend::revoke))
            .route(web::delete().to(super::backend::lift))
            .default_service(web::to(error::method_not_allowed)),
    )
    .service(
        web::resource("/v1/presence")
            .route(web::get().to(presence))
            .default_service(web::to(error::method_not_allowed)),
    )
    .service(get_only("/v1/namespaces", namespaces))
    .service(get_only("/metrics", metrics))
    .service(get_only("/v1/stats", stats))
    .service(get_only("/v1/status", status))
    .service(get_only("/", page))
    .service(get_only("/healthz", healthz))
    .service(get_only("/readyz", readyz))
    .default_service(web::to(error::not_found));
}

/// Compares in time independent of where the first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `Authorization: Bearer <HUB_PUBLISH_KEY>`, when the key is set: publishing and control
/// from the backend need it.
pub fn check_key(req: &HttpRequest, node: &Node) -> Result<(), ApiError> {
    if let Some(key) = &node.config.publish_key {
        let given = crate::http::bearer(req);
        if !given.is_some_and(|g| same_secret(g.as_bytes(), key.as_bytes())) {
            return Err(ApiError::unauthorized(
                "this needs Authorization: Bearer <HUB_PUBLISH_KEY>",
            ));
        }
    }
    Ok(())
}

/// Reads a request body of at most `max` bytes (413 beyond, unread).
pub async fn read_body(
    req: &HttpRequest,
    mut body: web::Payload,
    max: usize,
) -> Result<web::BytesMut, ApiError> {
    // actix reads the body of a request that asks to upgrade until the connection closes,
    // whatever its Content-Length says: it would never end, so it is refused unread.
    if req.headers().contains_key(actix_web::http::header::UPGRADE) {
        return Err(ApiError::bad_request(
            "the admin port does not upgrade connections: send it without an Upgrade header",
        ));
    }
    let mut buf = web::BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("could not read the body: {e}")))?;
        if buf.len() + chunk.len() > max {
            return Err(ApiError::too_large(format!(
                "the body is {} bytes or more; at most {max} here",
                buf.len() + chunk.len()
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// `POST /v1/publish`.
async fn publish(
    req: HttpRequest,
    node: web::Data<Node>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    check_key(&req, &node)?;
    let max = node.config.max_message_bytes as usize;
    let too_large = |size: usize| {
        node.metrics.dropped(DropReason::TooLarge).increment(1);
        ApiError::too_large(format!(
            "message is {size} bytes or more; the limit is {max} (HUB_MAX_MESSAGE_BYTES)"
        ))
    };
    let buf = match read_body(&req, body, max + BODY_OVERHEAD).await {
        Ok(buf) => buf,
        Err(e)
            if actix_web::ResponseError::status_code(&e)
                == actix_web::http::StatusCode::PAYLOAD_TOO_LARGE =>
        {
            return Err(too_large(max + BODY_OVERHEAD))
        }
        Err(e) => return Err(e),
    };
    let malformed = |msg: String| {
        node.metrics.dropped(DropReason::Malformed).increment(1);
        ApiError::bad_request(msg)
    };
    let parsed: PublishRequest = serde_json::from_slice(&buf).map_err(|e| {
        malformed(format!("body must be JSON {{\"channel\":\"C\",\"event\":\"...\",\"data\":...,\"durable\":true}}: {e}"))
    })?;
    let (channel, env, durable) = parsed.into_envelope();
    let channel =
        ChannelName::new(&channel).map_err(|e| malformed(format!("invalid channel: {e}")))?;
    env.validate().map_err(|e| malformed(e.to_string()))?;
    let size = env.to_bytes().len();
    if size > max {
        return Err(too_large(size));
    }
    let key = idempotency_key(&req, durable)?;
    let rate = node.config.namespaces.of(&channel).publish_rate;
    if rate > 0 {
        // Burst = the rate (at least 1); beyond it 429 with the whole seconds until a token.
        let burst = rate as f64;
        if let Err(wait) = node.publishes.take(
            channel.clone(),
            rate as f64,
            burst,
            std::time::Instant::now(),
        ) {
            return Err(ApiError::too_many(
                format!("at most {rate} publishes a second on this channel (its namespace's publish_rate)"),
                wait.as_secs_f64().ceil() as u64,
            ));
        }
    }
    let id = node
        .publish(channel, &env, durable, Source::Http, key)
        .await?;
    Ok(HttpResponse::Accepted().json(PublishResponse { id }))
}

/// The `Idempotency-Key` header, checked: only a durable message can have one (an ephemeral
/// one is not kept, so there is no first id to return).
fn idempotency_key(req: &HttpRequest, durable: bool) -> Result<Option<&str>, ApiError> {
    let Some(v) = req.headers().get("idempotency-key") else {
        return Ok(None);
    };
    let key = v
        .to_str()
        .ok()
        .filter(|k| protocol::idempotency::validate(k).is_ok())
        .ok_or_else(|| {
            ApiError::bad_request("Idempotency-Key must be 1 to 128 printable ASCII characters")
        })?;
    if !durable {
        return Err(ApiError::bad_request(
            "Idempotency-Key applies to durable messages only (\"durable\": false is not kept)",
        ));
    }
    Ok(Some(key))
}

/// `GET /v1/presence?channel=C`: the channel's users (streams per `sub`) and anonymous
/// streams over every node.
async fn presence(req: HttpRequest, node: web::Data<Node>) -> Result<HttpResponse, ApiError> {
    let channel = form_urlencoded::parse(req.query_string().as_bytes())
        .find(|(k, _)| k == "channel")
        .map(|(_, v)| v.into_owned())
        .ok_or_else(|| ApiError::bad_request("the channel is required: ?channel=NAME"))?;
    let channel = ChannelName::new(&channel)
        .map_err(|e| ApiError::bad_request(format!("invalid channel: {e}")))?;
    let table = node.presence.read(channel.as_str()).await.map_err(|e| {
        tracing::warn!(error = %e, "reading presence failed");
        ApiError::from(crate::refusal::Refusal::unavailable())
    })?;
    let users: serde_json::Map<String, serde_json::Value> = table
        .users
        .iter()
        .map(|(u, n)| (u.to_string(), (*n).into()))
        .collect();
    let anonymous = table.anonymous;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "channel": channel.as_str(),
        "users": users,
        "anonymous": anonymous,
    })))
}

/// `GET /v1/namespaces`: the namespaces in force, longest prefix first, with the history
/// settings they inherit filled in.
async fn namespaces(node: web::Data<Node>) -> HttpResponse {
    let config = &node.config;
    let list: Vec<crate::namespaces::Namespace> = config
        .namespaces
        .all()
        .iter()
        .map(|n| crate::namespaces::Namespace {
            history_len: Some(n.history_len.unwrap_or(config.history_len)),
            history_ttl_secs: Some(n.history_ttl_secs.unwrap_or(config.history_ttl_secs)),
            ..n.clone()
        })
        .collect();
    let mut answer = serde_json::json!({ "namespaces": list });
    if let crate::broker::Broker::Redis(redis) = &*node.broker {
        // Redis keeps the namespaces FCALL hub_publish follows (the library's): whether they
        // are this node's.
        answer["redis_differs"] = redis.namespaces_differ().into();
    }
    HttpResponse::Ok().json(answer)
}

/// `GET /metrics`: Prometheus text.
async fn metrics(node: web::Data<Node>) -> HttpResponse {
    node.metrics
        .ready
        .set(if node.is_ready() { 1.0 } else { 0.0 });
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(node.metrics.render())
}

/// `GET /v1/stats`.
async fn stats(node: web::Data<Node>) -> HttpResponse {
    let c = node.registry.counts();
    HttpResponse::Ok().json(serde_json::json!({
        "node": node.name,
        "broker": node.broker.kind(),
        "uptime_secs": node.started.elapsed().as_secs(),
        "ready": node.is_ready(),
        "draining": node.is_draining(),
        "connections": {
            "sse": c.sse,
            "ws": c.ws,
            "total": c.sse + c.ws,
            // Streams holding a place, including those still being opened.
            "admitted": node.registry.admitted(),
            "max": node.config.max_connections,
            // Refused connections whose answer is held back (`Addresses::hold`).
            "refusals_held": node.addresses.held(),
        },
        "channels": c.channels,
    }))
}

/// `GET /`: the status page. It reads `/v1/status` and `/v1/presence`, and calls
/// `/v1/disconnect` with the key the operator types (kept by the page only while it is open).
async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("cache-control", "no-store"))
        .insert_header(("x-content-type-options", "nosniff"))
        .insert_header((
            "content-security-policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             img-src data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'",
        ))
        .body(crate::status::PAGE)
}

/// `GET /v1/status`: every live node's snapshot (this one first).
async fn status(node: web::Data<Node>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header(("cache-control", "no-store"))
        .json(crate::status::status(&node).await)
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secret_comparison() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
    }
}
