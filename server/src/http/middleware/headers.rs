//! Security headers on every response.

use poem::http::HeaderValue;
use poem::{Endpoint, IntoResponse, Request, Response};
use std::sync::Arc;

/// Security headers. The CSP is strict for the API; pages (/docs and the
/// dashboard) need their own inline scripts and styles.
pub async fn with_security_headers<E: Endpoint>(
    ep: Arc<E>,
    req: Request,
    hsts: bool,
) -> poem::Result<Response> {
    let path = req.uri().path().to_string();
    let mut resp = ep.call(req).await.map(IntoResponse::into_response)?;
    let h = resp.headers_mut();
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    let page = path == "/"
        || path.starts_with("/docs")
        || path.starts_with("/assets")
        || path.ends_with(".html");
    let csp = if page {
        "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self' ws: wss:; frame-ancestors 'none'"
    } else {
        "default-src 'none'; frame-ancestors 'none'"
    };
    h.insert("content-security-policy", HeaderValue::from_static(csp));
    if hsts {
        h.insert(
            "strict-transport-security",
            HeaderValue::from_static("max-age=31536000; includeSubDomains"),
        );
    }
    Ok(resp)
}
