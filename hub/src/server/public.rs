//! The public port: `/v1/sse`, `/v1/ws` and health. Nothing else is served here.

use crate::http::error;
use crate::server::{get_only, healthz, readyz};
use crate::transport::{sse, ws};
use actix_web::http::Method;
use actix_web::web;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/sse")
            .route(web::get().to(sse::stream))
            .route(web::method(Method::OPTIONS).to(sse::preflight))
            .default_service(web::to(error::method_not_allowed)),
    )
    .service(get_only("/v1/ws", ws::upgrade))
    .service(get_only("/healthz", healthz))
    .service(get_only("/readyz", readyz))
    .default_service(web::to(error::not_found));
}
