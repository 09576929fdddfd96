//! CORS for `/v1/sse` and the Origin check, driven by `HUB_ALLOWED_ORIGINS`.
//!
//! A request from an origin that is not allowed is refused with 403 before it takes a stream
//! slot (a browser could not read the answer anyway). Requests without `Origin` (servers,
//! curl) are allowed. Hand-written because the rules are four lines and errors must be JSON.

use crate::config::Origins;
use crate::http::error::ApiError;
use crate::refusal::Refusal;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, HttpResponseBuilder};

/// Headers browsers may send on a stream request.
const ALLOWED_HEADERS: &str = "Authorization, Last-Event-ID, Cache-Control, Accept";
/// How long a browser may cache a preflight answer (seconds).
const PREFLIGHT_MAX_AGE: &str = "600";

/// The `Access-Control-Allow-Origin` value for this request, `None` when it has no `Origin`,
/// or 403 when its origin is not allowed.
pub fn allow_origin(
    origin: Option<&HeaderValue>,
    origins: &Origins,
) -> Result<Option<HeaderValue>, Refusal> {
    let Some(origin) = origin else {
        return Ok(None);
    };
    let text = origin.to_str().unwrap_or("");
    if !origins.allows(text) {
        return Err(Refusal::forbidden(format!(
            "origin {text:?} is not allowed (HUB_ALLOWED_ORIGINS)"
        )));
    }
    Ok(Some(match origins {
        Origins::Any => HeaderValue::from_static("*"),
        Origins::List(_) => origin.clone(),
    }))
}

/// Whether an allowed origin may send credentials (cookies): an origin `HUB_ALLOWED_ORIGINS`
/// names, never `*` (browsers refuse credentials with a wildcard anyway).
pub fn with_credentials(allow: &HeaderValue) -> bool {
    allow != "*"
}

/// Adds the CORS answer headers: with a named origin, `Access-Control-Allow-Credentials`, so
/// that `new EventSource(url, {withCredentials: true})` sends its cookies across origins.
pub fn apply(res: &mut HttpResponseBuilder, allow: Option<HeaderValue>) {
    if let Some(v) = allow {
        if with_credentials(&v) {
            res.insert_header((header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true"));
        }
        res.insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, v));
        res.insert_header((header::VARY, "Origin"));
    }
}

/// `OPTIONS /v1/sse`.
pub fn preflight(req: &HttpRequest, origins: &Origins) -> Result<HttpResponse, ApiError> {
    let allow = allow_origin(req.headers().get(header::ORIGIN), origins)?;
    let mut res = HttpResponse::NoContent();
    apply(&mut res, allow);
    res.insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, "GET, OPTIONS"));
    res.insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, ALLOWED_HEADERS));
    res.insert_header((header::ACCESS_CONTROL_MAX_AGE, PREFLIGHT_MAX_AGE));
    Ok(res.finish())
}
