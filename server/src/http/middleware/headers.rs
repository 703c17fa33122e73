//! Security headers on every response.

use poem::http::HeaderValue;
use poem::{Endpoint, IntoResponse, Request, Response};
use std::sync::Arc;

/// Security headers. The CSP is strict for the API and the dashboard;
/// the API explorer (/docs) needs its own inline scripts and styles.
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
    let dashboard = path == "/" || path == "/index.html" || path.starts_with("/assets");
    let csp = if dashboard {
        // The dashboard's scripts and styles are its own files; it sets
        // styles through the CSSOM only, never inline. It connects to this
        // server only: `'self'` covers its own origin's ws:/wss: (CSP 3), so
        // a script injected into the page could not send the token away.
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"
    } else if path.starts_with("/docs") || path.ends_with(".html") {
        // The API explorer's page is generated with inline scripts and styles.
        "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"
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
