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

/// The `Authorization` header, as text.
pub fn authorization(req: &HttpRequest) -> Option<&str> {
    req.headers().get(header::AUTHORIZATION)?.to_str().ok()
}

/// Every `Cookie` header joined with `; ` (HTTP/2 clients may send one per cookie).
pub fn cookies(req: &HttpRequest) -> Option<String> {
    joined(req, header::COOKIE, "; ")
}

/// Every `X-Forwarded-For` header joined with `, ` (their hops, in order).
pub fn forwarded_for(req: &HttpRequest) -> Option<String> {
    joined(req, header::X_FORWARDED_FOR, ", ")
}

fn joined(req: &HttpRequest, name: header::HeaderName, sep: &str) -> Option<String> {
    let mut all = req.headers().get_all(name).filter_map(|v| v.to_str().ok());
    let first = all.next()?;
    Some(all.fold(first.to_owned(), |mut acc, v| {
        acc.push_str(sep);
        acc.push_str(v);
        acc
    }))
}

/// The credential of an `Authorization` header's value `Bearer <credential>`.
pub fn bearer_credential(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}
