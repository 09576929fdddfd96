//! The node's two ports: the public one (streams and health only, behind its own front door
//! for stream requests) and the admin one (publishing, metrics, stats, presence). Route tables
//! and small handlers live here; stream logic lives in `transport`, policy in `node`.

pub mod admin;
pub mod backend;
pub mod front;
pub mod public;

use crate::http::error;
use crate::node::Node;
use actix_web::{web, HttpResponse};

/// `GET /healthz`: the process is alive.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// `GET /readyz`: 200 only while this node accepts streams.
pub async fn readyz(node: web::Data<Node>) -> Result<HttpResponse, error::ApiError> {
    if node.is_draining() {
        return Err(error::ApiError::unavailable(
            "not_ready",
            "draining: this node is shutting down",
            1,
        ));
    }
    if !node.broker.is_up() {
        return Err(error::ApiError::unavailable(
            "not_ready",
            "the broker subscription is down",
            1,
        ));
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "status": "ready" })))
}

/// A resource with the given GET handler whose other methods answer a JSON 405.
pub fn get_only<F, Args>(path: &str, handler: F) -> actix_web::Resource
where
    F: actix_web::Handler<Args>,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    web::resource(path)
        .route(web::get().to(handler))
        .default_service(web::to(error::method_not_allowed))
}
