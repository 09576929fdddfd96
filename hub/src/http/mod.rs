//! The HTTP vocabulary the transports and the servers share: JSON error answers ([`error`]),
//! CORS ([`cors`]) and bearer credentials. It knows no route and no node; the route tables
//! live in `server`.

pub mod cors;
pub mod error;

use actix_web::http::header;
use actix_web::HttpRequest;

/// The credential of an `Authorization: Bearer <credential>` header, if there is one.
pub fn bearer(req: &HttpRequest) -> Option<&str> {
    bearer_credential(req.headers().get(header::AUTHORIZATION)?.to_str().ok()?)
}

/// The credential of an `Authorization` header's value `Bearer <credential>`.
pub fn bearer_credential(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}
