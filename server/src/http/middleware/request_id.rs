//! The outermost layer: request id, log span, access log line, and the
//! JSON error shape for whatever failed before a handler answered.

use crate::http::error::{ApiError, ErrorBody, CACHE_STATUS, REQUEST_ID};
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
        if status >= 500 && path.starts_with("/health") {
            // A probe polled every second during an outage: the outage is
            // logged by the probe itself (at WARN), not once per poll.
            tracing::info!(status, elapsed_ms = ms, "request");
        } else if status >= 500 {
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
    // poem-openapi names the parameter between backticks: surface it, and
    // say in words what its validator or type wanted.
    let (message, details) = match parse_failure(&message) {
        Some((param, reason)) => (
            format!("{param}: {reason}"),
            Some(serde_json::json!({"parameter": param, "reason": reason})),
        ),
        None => (message, None),
    };
    let message = if status == StatusCode::UNAUTHORIZED && message == "authorization error" {
        "missing or malformed bearer token (send Authorization: Bearer <JWT>)".to_string()
    } else {
        message
    };
    ErrorBody::response(status, code, message, details)
}

/// A typed extractor's refusal said the way the rest of the API says it:
/// a JSON body that breaks its operation's schema names the first field
/// that does and why (poem-openapi names only the object's type), and an
/// enum query parameter lists its values. Anything else is answered as
/// [`error_response`] answers it.
pub fn explained_error(
    e: poem::Error,
    routes: &Routes,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Response {
    if e.status() != StatusCode::BAD_REQUEST || e.is_from_response() {
        return error_response(e);
    }
    let message = e.to_string();
    if let Some(body) = body {
        if e.is::<poem_openapi::error::ParseRequestPayloadError>()
            || message.starts_with("parse request payload error")
        {
            if let Some((field, reason)) = routes.body_problem(method, path, body) {
                return ApiError::bad_param(&field, reason).into_response();
            }
        }
    }
    if let Some((param, reason)) = message
        .strip_prefix("failed to parse parameter `")
        .and_then(|rest| rest.split_once('`'))
    {
        if reason.contains("enumeration value") {
            if let Some(values) = routes.param_values(method, path, param) {
                return ApiError::bad_param(param, format!("must be one of {}", values.join(", ")))
                    .into_response();
            }
        }
    }
    error_response(e)
}

/// `failed to parse parameter `limit`: verification failed. minimum(1, ...)`
/// → ("limit", "must be at least 1"). Path parameters are named by position
/// (`param0`); every path of the API has one, `id`.
fn parse_failure(message: &str) -> Option<(String, String)> {
    let (param, reason) = if let Some(rest) = message.strip_prefix("failed to parse parameter `") {
        let (param, reason) = rest.split_once('`')?;
        (param.to_string(), reason)
    } else {
        let rest = message.strip_prefix("failed to parse path `")?;
        let (_, reason) = rest.split_once('`')?;
        ("id".to_string(), reason)
    };
    let reason = reason.strip_prefix(": ").unwrap_or(reason);
    Some((param, plain_reason(reason)))
}

fn plain_reason(reason: &str) -> String {
    if let Some(rule) = reason.strip_prefix("verification failed. ") {
        let arg = |name: &str| {
            rule.strip_prefix(name)
                .and_then(|r| r.strip_prefix('('))
                .and_then(|r| r.strip_suffix(')'))
        };
        let bound = |a: &str| {
            let (n, excl) = a.split_once(", exclusive: ").unwrap_or((a, "false"));
            (n.to_string(), excl == "true")
        };
        if let Some((n, excl)) = arg("minimum").map(bound) {
            return if excl {
                format!("must be more than {n}")
            } else {
                format!("must be at least {n}")
            };
        }
        if let Some((n, excl)) = arg("maximum").map(bound) {
            return if excl {
                format!("must be less than {n}")
            } else {
                format!("must be at most {n}")
            };
        }
        if let Some(n) = arg("maxLength") {
            return format!("must be at most {n} characters");
        }
        if let Some(n) = arg("minLength") {
            return format!("must be at least {n} characters");
        }
        if let Some(p) = arg("pattern") {
            return format!("must match {p}");
        }
        return rule.to_string();
    }
    // A value of the wrong type: `failed to parse "integer(int64)": ...`.
    if let Some(rest) = reason.strip_prefix("failed to parse \"") {
        let ty = rest.split('"').next().unwrap_or("");
        if ty.starts_with("integer") {
            // Digits past the type's range are a whole number, too big.
            if reason.contains("too large") || reason.contains("too small") {
                // A 32-bit parameter (year, month) has a narrower range of
                // its own, which its other checks and the document give.
                return if ty.contains("int32") {
                    "is out of range".to_string()
                } else {
                    "is out of range (a whole number in -9223372036854775808..9223372036854775807)"
                        .to_string()
                };
            }
            return "must be a whole number".to_string();
        }
        if ty.starts_with("number") {
            return "must be a number".to_string();
        }
        if ty == "boolean" {
            return "must be true or false".to_string();
        }
    }
    reason.to_string()
}

#[cfg(test)]
mod tests {
    use super::parse_failure;

    #[test]
    fn parse_failures_in_words() {
        let f = |m: &str| parse_failure(m).map(|(p, r)| format!("{p}: {r}"));
        assert_eq!(
            f("failed to parse parameter `limit`: verification failed. minimum(1, exclusive: false)").as_deref(),
            Some("limit: must be at least 1")
        );
        assert_eq!(
            f("failed to parse parameter `year`: verification failed. maximum(2100, exclusive: false)").as_deref(),
            Some("year: must be at most 2100")
        );
        assert_eq!(
            f("failed to parse parameter `limit`: failed to parse \"integer(int64)\": invalid digit found in string").as_deref(),
            Some("limit: must be a whole number")
        );
        assert_eq!(
            f("failed to parse path `param0`: failed to parse \"integer(int64)\": number too large to fit in target type").as_deref(),
            Some("id: is out of range (a whole number in -9223372036854775808..9223372036854775807)")
        );
        assert_eq!(
            f("failed to parse parameter `year`: failed to parse \"integer(int32)\": number too large to fit in target type").as_deref(),
            Some("year: is out of range")
        );
        assert_eq!(
            f("failed to parse parameter `format`: expected one of csv, json").as_deref(),
            Some("format: expected one of csv, json")
        );
        assert_eq!(f("not found"), None);
    }
}
