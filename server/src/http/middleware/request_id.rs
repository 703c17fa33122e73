//! The outermost layer: request id, log span, access log line, and the
//! JSON error shape for whatever failed before a handler answered.

use crate::http::error::{ErrorBody, CACHE_STATUS, REQUEST_ID};
use crate::http::routes::Routes;
use poem::http::{HeaderValue, StatusCode};
use poem::{Endpoint, IntoResponse, Request, Response};
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

pub fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Outermost layer: request id, log span, access log line.
pub async fn with_request_id<E: Endpoint>(
    ep: Arc<E>,
    req: Request,
    routes: Arc<Routes>,
) -> poem::Result<Response> {
    let id = request_id(&req);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let span = tracing::info_span!("request", request_id = %id, method = %method, path = %path, user_id = tracing::field::Empty);
    let started = Instant::now();
    let (result, cache_status) = REQUEST_ID
        .scope(
            id.clone(),
            CACHE_STATUS.scope(std::cell::Cell::new(None), async {
                let r = ep.call(req).instrument(span.clone()).await;
                (r, CACHE_STATUS.with(|c| c.get()))
            }),
        )
        .await;
    let mut resp = match result {
        Ok(r) => r.into_response(),
        Err(e) => {
            REQUEST_ID
                .scope(id.clone(), async { error_response(e) })
                .await
        }
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    if let Some(c) = cache_status {
        resp.headers_mut()
            .insert("x-cache", HeaderValue::from_static(c));
    }
    let status = resp.status().as_u16();
    crate::metrics::record_request(
        crate::http::routes::method_label(method.as_str()),
        routes.label(&path),
        status,
        started,
    );
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    span.in_scope(|| {
        if status >= 500 {
            tracing::error!(status, elapsed_ms = ms, "request failed");
        } else {
            tracing::info!(status, elapsed_ms = ms, "request");
        }
    });
    Ok(resp)
}

/// Turns any error (routing, parameter parsing, auth) into the JSON shape.
pub fn error_response(e: poem::Error) -> Response {
    if e.is_from_response() {
        return e.into_response();
    }
    let status = e.status();
    let code = match status.as_u16() {
        400 => "bad_parameter",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        429 => "rate_limited",
        s if s >= 500 => "internal",
        _ => "error",
    };
    let message = if status.is_server_error() {
        tracing::error!(error = %e, "internal error");
        "internal error; see the server log for this request id".to_string()
    } else {
        crate::clip(&e.to_string(), crate::MAX_MESSAGE).into_owned()
    };
    // poem-openapi names the parameter between backticks: surface it.
    let details = message
        .strip_prefix("failed to parse parameter `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(param, _)| serde_json::json!({"parameter": param}));
    let message = if status == StatusCode::UNAUTHORIZED && message == "authorization error" {
        "missing or malformed bearer token (send Authorization: Bearer <JWT>)".to_string()
    } else {
        message
    };
    ErrorBody::response(status, code, message, details)
}
