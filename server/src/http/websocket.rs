//! `GET /ws`: the WebSocket upgrade. The connection itself is `crate::ws`.
//!
//! The token comes from `?token=`, the `Authorization: Bearer` header, or the
//! `Sec-WebSocket-Protocol` bearer form (`bearer, <token>`; the server answers
//! with the `bearer` protocol). A missing or bad token is refused with 401
//! before the upgrade, with the `WWW-Authenticate` every 401 has; a token
//! given any of those ways and refused is an `invalid_token` there.

use super::error::ErrorBody;
use crate::ws::Context;
use poem::http::{header, HeaderValue, StatusCode};
use poem::{Endpoint, Request, Response};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// A refused upgrade, in the error body every endpoint uses.
fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    ErrorBody::response(status, code, message, None)
}

/// A 401, challenging as the API does; `token_sent`: a token was given
/// (whichever way) and refused.
fn unauthorized(message: &str, token_sent: bool) -> Response {
    let mut resp = error_response(StatusCode::UNAUTHORIZED, "unauthorized", message);
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        super::middleware::bearer_challenge(token_sent),
    );
    resp
}

fn query_token(req: &Request) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Q {
        token: Option<String>,
    }
    req.params::<Q>().ok()?.token.filter(|t| !t.is_empty())
}

/// `Sec-WebSocket-Protocol: bearer, <token>`: the item after `bearer`.
fn protocol_token(req: &Request) -> Option<String> {
    let items: Vec<&str> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let at = items
        .iter()
        .position(|p| p.eq_ignore_ascii_case("bearer"))?;
    items
        .get(at + 1)
        .filter(|t| !t.is_empty())
        .map(|t| t.to_string())
}

fn offers_bearer_protocol(req: &Request) -> bool {
    req.headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("bearer"))
}

/// The token from `?token=`, the Authorization header or the protocol header.
fn find_token(req: &Request) -> Option<String> {
    query_token(req)
        .or_else(|| {
            req.header(header::AUTHORIZATION)
                .and_then(crate::auth::bearer)
                .map(str::to_string)
        })
        .or_else(|| protocol_token(req))
}

fn header_has_token(req: &Request, name: header::HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case(token))
}

/// `GET /ws`.
pub struct WsEndpoint {
    ctx: Arc<Context>,
}

pub fn endpoint(ctx: Context) -> WsEndpoint {
    WsEndpoint { ctx: Arc::new(ctx) }
}

impl Endpoint for WsEndpoint {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        Ok(upgrade(&req, &self.ctx))
    }
}

fn upgrade(req: &Request, ctx: &Arc<Context>) -> Response {
    let Some(token) = find_token(req) else {
        return unauthorized(
            "a token is required: ?token=, Authorization: Bearer, or Sec-WebSocket-Protocol: bearer, <token>",
            false,
        );
    };
    let principal = match ctx.auth.verify_once(&token) {
        Ok(p) => {
            // The upgrade's access line names the user, as every other
            // authenticated request's does.
            tracing::Span::current().record("user_id", p.user_id);
            p
        }
        Err(e) => return unauthorized(&e.client_message(), true),
    };
    if req.method() != poem::http::Method::GET
        || !header_has_token(req, header::UPGRADE, "websocket")
        || !header_has_token(req, header::CONNECTION, "upgrade")
    {
        let mut resp = error_response(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint speaks WebSocket only",
        );
        resp.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return resp;
    }
    if req.header(header::SEC_WEBSOCKET_VERSION) != Some("13") {
        let mut resp = error_response(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "WebSocket version 13 is required",
        );
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return resp;
    }
    let Some(key) = req
        .header(header::SEC_WEBSOCKET_KEY)
        .filter(|k| !k.is_empty())
    else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Sec-WebSocket-Key is missing",
        );
    };
    if ctx.hub.is_shutting_down() {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the server is shutting down",
        );
    }
    if !ctx.hub.user_has_room(principal.user_id) {
        ctx.hub.counters.refused_connections.fetch_add(1, Relaxed);
        return error_response(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections",
            &format!(
                "at most {} WebSocket connections per user",
                ctx.hub.cfg.max_per_user
            ),
        );
    }
    let on_upgrade = match req.take_upgrade() {
        Ok(u) => u,
        Err(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the connection cannot be upgraded",
            )
        }
    };
    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        )
        .finish();
    if offers_bearer_protocol(req) {
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("bearer"),
        );
    }
    let ctx = ctx.clone();
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            crate::ws::session::serve(upgraded, principal, ctx).await;
        }
    });
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = Request::builder().uri(uri.parse().unwrap());
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.finish()
    }

    #[test]
    fn token_sources() {
        assert_eq!(find_token(&req("/ws?token=abc", &[])), Some("abc".into()));
        assert_eq!(
            find_token(&req("/ws", &[("authorization", "Bearer xyz")])),
            Some("xyz".into())
        );
        assert_eq!(
            find_token(&req("/ws", &[("sec-websocket-protocol", "bearer, t.o.k")])),
            Some("t.o.k".into())
        );
        assert_eq!(
            find_token(&req("/ws", &[("sec-websocket-protocol", "bearer")])),
            None
        );
        assert_eq!(find_token(&req("/ws?token=", &[])), None);
    }
}
