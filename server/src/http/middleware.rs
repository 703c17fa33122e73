//! Everything every response gets: request id (header, task-local, log span),
//! errors in one JSON shape, rate limits, body limits, ETag / 304,
//! Cache-Control, Vary, compression, security headers.

use super::error::{ErrorBody, REQUEST_ID};
use super::routes::{Match, Routes};
use crate::state::AppState;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use poem::http::{header, HeaderValue, Method, StatusCode};
use poem::{Endpoint, IntoResponse, Request, Response};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

/// Marks a response whose body is a stream (exports): it is neither buffered
/// for an ETag nor compressed here (the producer compresses on the fly).
#[derive(Clone, Copy, Debug)]
pub struct Streaming;

/// Bodies under this size are sent uncompressed.
pub const COMPRESS_MIN: usize = 1024;
/// Bodies over this size get a higher compression level.
pub const COMPRESS_HIGH: usize = 10 * 1024;

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
            super::error::CACHE_STATUS.scope(std::cell::Cell::new(None), async {
                let r = ep.call(req).instrument(span.clone()).await;
                (r, super::error::CACHE_STATUS.with(|c| c.get()))
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
        super::routes::method_label(method.as_str()),
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
        e.to_string()
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
    let body = ErrorBody::new(code, message, details);
    let mut resp = Response::builder()
        .status(status)
        .content_type("application/json; charset=utf-8")
        .body(
            serde_json::to_vec(&serde_json::json!({"error": body.0.error_json()}))
                .unwrap_or_default(),
        );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

impl super::error::ErrorDetail {
    fn error_json(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code, "message": self.message, "details": self.details, "requestId": self.request_id})
    }
}

impl super::error::ErrorBody {
    fn error_json(&self) -> serde_json::Value {
        self.error.error_json()
    }
}

/// Request budgets. Every `/api/*` and `/ws` request spends from its IP's
/// bucket (RATE_LIMIT_PER_IP_PER_MINUTE), whatever it carries; a request
/// whose bearer token verifies also spends from that token's bucket
/// (RATE_LIMIT_PER_MINUTE), checked in the security scheme after
/// verification, so junk tokens never get a bucket of their own. WebSocket
/// upgrades have their own per-IP budget (WS_UPGRADES_PER_MINUTE).
pub struct RateLimits {
    by_ip: DefaultKeyedRateLimiter<IpAddr>,
    by_token: DefaultKeyedRateLimiter<String>,
    ws_by_ip: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
    calls: std::sync::atomic::AtomicU64,
}

fn quota(per_minute: u32) -> Quota {
    let n = NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(n).allow_burst(n)
}

impl RateLimits {
    pub fn new(per_token: u32, per_ip: u32, ws_per_ip: u32) -> Self {
        Self {
            by_ip: RateLimiter::keyed(quota(per_ip)),
            by_token: RateLimiter::keyed(quota(per_token)),
            ws_by_ip: RateLimiter::keyed(quota(ws_per_ip)),
            clock: DefaultClock::default(),
            calls: Default::default(),
        }
    }

    pub fn from_config(c: &crate::config::Config) -> Self {
        Self::new(
            c.rate_limit_per_minute,
            c.rate_limit_per_ip_per_minute,
            c.ws_upgrades_per_minute,
        )
    }

    fn upkeep(&self) {
        // Forget idle keys now and then so the maps stay small.
        if self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % 10_000
            == 9_999
        {
            self.by_ip.retain_recent();
            self.by_token.retain_recent();
            self.ws_by_ip.retain_recent();
        }
    }

    fn wait(&self, nu: governor::NotUntil<governor::clock::QuantaInstant>) -> u64 {
        nu.wait_time_from(self.clock.now()).as_secs().max(1)
    }

    /// `Err(seconds to wait)` when the IP's budget is spent.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), u64> {
        self.upkeep();
        self.by_ip.check_key(&ip).map_err(|nu| self.wait(nu))
    }

    /// For a token that has verified.
    pub fn check_token(&self, token: &str) -> Result<(), u64> {
        // Keyed by a digest: raw tokens are not kept in memory.
        let key = hex(&Sha256::digest(token.as_bytes())[..16]);
        self.by_token.check_key(&key).map_err(|nu| self.wait(nu))
    }

    pub fn check_ws(&self, ip: IpAddr) -> Result<(), u64> {
        self.ws_by_ip.check_key(&ip).map_err(|nu| self.wait(nu))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn client_ip(req: &Request) -> IpAddr {
    req.remote_addr()
        .as_socket_addr()
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED))
}

/// 400 for a query parameter the operation does not declare, or one given
/// twice: handlers would ignore it, and the response must not depend on
/// (or be cached under) anything they ignore.
pub fn check_query(req: &Request, routes: &Routes) -> Result<(), super::error::ApiError> {
    let Some(query) = req.uri().query() else {
        return Ok(());
    };
    let Match::Operation(_, allowed) = routes.find(req.method().as_str(), req.uri().path()) else {
        return Ok(());
    };
    let mut seen = std::collections::HashSet::new();
    for (k, _) in form_urlencoded::parse(query.as_bytes()) {
        if k.is_empty() {
            continue;
        }
        if !allowed.contains(k.as_ref()) {
            let mut names: Vec<&str> = allowed.iter().map(String::as_str).collect();
            names.sort_unstable();
            let name: String = k.chars().take(64).collect();
            return Err(super::error::ApiError::bad_param(
                &name,
                if names.is_empty() {
                    "unknown query parameter; this operation takes none".to_string()
                } else {
                    format!(
                        "unknown query parameter; this operation takes: {}",
                        names.join(", ")
                    )
                },
            ));
        }
        if !seen.insert(k.clone()) {
            return Err(super::error::ApiError::bad_param(
                &k,
                "given more than once",
            ));
        }
    }
    Ok(())
}

/// Rate limits, declared query parameters, and the body size limit,
/// enforced while the body is read, whatever the headers (or their absence,
/// as over HTTP/2) say.
pub async fn with_limits<E: Endpoint>(
    ep: Arc<E>,
    req: Request,
    state: Arc<AppState>,
    limits: Arc<RateLimits>,
    routes: Arc<Routes>,
) -> poem::Result<Response> {
    let path = req.uri().path();
    let is_ws = path == "/ws";
    if path.starts_with("/api/") || is_ws {
        let ip = client_ip(&req);
        let checked =
            limits
                .check_ip(ip)
                .and_then(|()| if is_ws { limits.check_ws(ip) } else { Ok(()) });
        if let Err(retry) = checked {
            return Ok(super::error::ApiError::too_many(retry).into_response());
        }
    }
    if let Some(allowed) = routes.allowed(req.uri().path()) {
        let method = req.method().as_str();
        if !allowed.contains(&method) && method != "OPTIONS" {
            let mut resp = error_response(poem::Error::from_string(
                format!("{method} is not allowed here; use {}", allowed.join(", ")),
                StatusCode::METHOD_NOT_ALLOWED,
            ));
            if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
                resp.headers_mut().insert(header::ALLOW, v);
            }
            return Ok(resp);
        }
    }
    if let Err(e) = check_query(&req, &routes) {
        return Ok(e.into_response());
    }
    if req.headers().contains_key(header::UPGRADE) || super::imports::streams_body(&req) {
        // An import counts its body against IMPORT_MAX_BYTES as it streams.
        return ep.call(req).await.map(IntoResponse::into_response);
    }
    let limit = state.config.body_limit;
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Ok(super::error::ApiError::too_large(format!(
                "body of {len} bytes exceeds BODY_LIMIT ({limit} bytes)"
            ))
            .into_response());
        }
    }
    let (parts, body) = req.into_parts();
    let bytes = match body.into_bytes_limit(limit).await {
        Ok(b) => b,
        Err(poem::error::ReadBodyError::PayloadTooLarge) => {
            return Ok(super::error::ApiError::too_large(format!(
                "body exceeds BODY_LIMIT ({limit} bytes)"
            ))
            .into_response())
        }
        Err(e) => {
            return Ok(
                super::error::ApiError::bad_param("body", format!("could not be read: {e}"))
                    .into_response(),
            )
        }
    };
    let req = Request::from_parts(parts, poem::Body::from(bytes));
    ep.call(req).await.map(IntoResponse::into_response)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Zstd,
    Brotli,
    Gzip,
    Identity,
}

impl Encoding {
    pub fn token(self) -> &'static str {
        match self {
            Encoding::Zstd => "zstd",
            Encoding::Brotli => "br",
            Encoding::Gzip => "gzip",
            Encoding::Identity => "identity",
        }
    }
}

/// Picks the best encoding the client accepts (q > 0), preferring zstd, br, gzip.
pub fn negotiate(accept: Option<&str>, offered: &[Encoding]) -> Encoding {
    let Some(accept) = accept else {
        return Encoding::Identity;
    };
    let mut best: Option<(Encoding, f32, usize)> = None;
    for part in accept.split(',') {
        let mut it = part.trim().split(';');
        let name = it.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = it
            .find_map(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|v| v.trim().parse::<f32>().ok())
            })
            .unwrap_or(1.0);
        if q <= 0.0 {
            continue;
        }
        let candidates: Vec<Encoding> = match name.as_str() {
            "zstd" => vec![Encoding::Zstd],
            "br" => vec![Encoding::Brotli],
            "gzip" | "x-gzip" => vec![Encoding::Gzip],
            "*" => offered.to_vec(),
            _ => vec![],
        };
        for enc in candidates {
            let Some(rank) = offered.iter().position(|o| *o == enc) else {
                continue;
            };
            let better = match best {
                None => true,
                Some((_, bq, br)) => q > bq || (q == bq && rank < br),
            };
            if better {
                best = Some((enc, q, rank));
            }
        }
    }
    best.map(|(e, _, _)| e).unwrap_or(Encoding::Identity)
}

/// Compresses `data`; `level` is COMPRESSION_LEVEL (1..9), raised for large bodies.
pub fn compress(enc: Encoding, data: &[u8], level: u32) -> std::io::Result<Vec<u8>> {
    let level = if data.len() > COMPRESS_HIGH {
        (level + 3).min(9)
    } else {
        level.clamp(1, 9)
    };
    match enc {
        Encoding::Identity => Ok(data.to_vec()),
        Encoding::Zstd => zstd::bulk::compress(data, level as i32),
        Encoding::Gzip => {
            let mut w = flate2::write::GzEncoder::new(
                Vec::with_capacity(data.len() / 4),
                flate2::Compression::new(level),
            );
            w.write_all(data)?;
            w.finish()
        }
        Encoding::Brotli => {
            let mut out = Vec::with_capacity(data.len() / 4);
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, level.min(11), 22);
                w.write_all(data)?;
            }
            Ok(out)
        }
    }
}

fn compressible(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        ct.starts_with("application/json")
            || ct.starts_with("text/")
            || ct.starts_with("application/javascript")
            || ct.starts_with("application/x-ndjson")
    })
}

fn if_none_match_hits(header_value: Option<&str>, etag: &str) -> bool {
    header_value.is_some_and(|v| {
        v.split(',').any(|t| {
            let t = t.trim();
            t == "*" || t == etag || t.strip_prefix("W/") == Some(etag)
        })
    })
}

/// ETag / 304, Cache-Control, Vary and compression for buffered bodies.
pub async fn with_representation<E: Endpoint>(
    ep: Arc<E>,
    req: Request,
    state: Arc<AppState>,
) -> poem::Result<Response> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let accept = req
        .headers()
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let inm = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut resp = ep
        .call(req)
        .await
        .map(IntoResponse::into_response)
        .unwrap_or_else(error_response);
    let headers = resp.headers_mut();
    headers.insert(
        header::VARY,
        HeaderValue::from_static("Authorization, Accept-Encoding"),
    );
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        || resp.extensions().get::<Streaming>().is_some()
    {
        return Ok(resp);
    }
    let cacheable =
        (method == Method::GET || method == Method::HEAD) && resp.status() == StatusCode::OK;
    if !resp.headers().contains_key(header::CACHE_CONTROL) {
        let value = if cacheable && path.starts_with("/api/v2/") {
            format!("private, max-age={}", state.config.cache_ttl.as_secs())
        } else if cacheable
            && (path == "/openapi.json" || path.starts_with("/docs") || path.starts_with("/assets"))
        {
            "no-cache".to_string()
        } else {
            "no-store".to_string()
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(header::CACHE_CONTROL, v);
        }
    }
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (parts, body) = resp.into_parts();
    let bytes = body
        .into_bytes()
        .await
        .map_err(|e| poem::Error::new(e, StatusCode::INTERNAL_SERVER_ERROR))?;
    let mut enc = Encoding::Identity;
    if bytes.len() >= COMPRESS_MIN && compressible(content_type.as_deref()) {
        enc = negotiate(
            accept.as_deref(),
            &[Encoding::Zstd, Encoding::Brotli, Encoding::Gzip],
        );
    }
    let mut resp = Response::from_parts(parts, poem::Body::empty());
    if cacheable {
        // Strong ETag of the representation: the body's digest, plus the
        // encoding, since each encoding is a different byte sequence.
        let digest = hex(&Sha256::digest(&bytes)[..12]);
        let etag = match enc {
            Encoding::Identity => format!("\"{digest}\""),
            e => format!("\"{digest}-{}\"", e.token()),
        };
        if let Ok(v) = HeaderValue::from_str(&etag) {
            resp.headers_mut().insert(header::ETAG, v);
        }
        if if_none_match_hits(inm.as_deref(), &etag) {
            resp.set_status(StatusCode::NOT_MODIFIED);
            resp.headers_mut().remove(header::CONTENT_TYPE);
            resp.headers_mut().remove(header::CONTENT_LENGTH);
            return Ok(resp);
        }
    }
    if enc != Encoding::Identity {
        let level = state.config.compression_level;
        let data = bytes.clone();
        let compressed = if bytes.len() > 256 * 1024 {
            tokio::task::spawn_blocking(move || compress(enc, &data, level))
                .await
                .ok()
                .and_then(Result::ok)
        } else {
            compress(enc, &data, level).ok()
        };
        if let Some(c) = compressed {
            resp.headers_mut().insert(
                header::CONTENT_ENCODING,
                HeaderValue::from_static(enc.token()),
            );
            resp.headers_mut().remove(header::CONTENT_LENGTH);
            resp.set_body(c);
            return Ok(resp);
        }
    }
    resp.set_body(bytes);
    Ok(resp)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        let all = [Encoding::Zstd, Encoding::Brotli, Encoding::Gzip];
        assert_eq!(
            negotiate(Some("gzip, deflate, br, zstd"), &all),
            Encoding::Zstd
        );
        assert_eq!(negotiate(Some("gzip, br"), &all), Encoding::Brotli);
        assert_eq!(negotiate(Some("gzip"), &all), Encoding::Gzip);
        assert_eq!(
            negotiate(Some("zstd;q=0, gzip;q=0.5"), &all),
            Encoding::Gzip
        );
        assert_eq!(
            negotiate(Some("br;q=0.2, gzip;q=0.9"), &all),
            Encoding::Gzip
        );
        assert_eq!(negotiate(Some("identity"), &all), Encoding::Identity);
        assert_eq!(negotiate(Some("*"), &all), Encoding::Zstd);
        assert_eq!(negotiate(None, &all), Encoding::Identity);
    }

    #[test]
    fn round_trips() {
        let data = br#"{"data":[1,2,3]}"#.repeat(500);
        for enc in [Encoding::Zstd, Encoding::Gzip, Encoding::Brotli] {
            let c = compress(enc, &data, 3).unwrap();
            assert!(c.len() < data.len() / 5, "{enc:?}");
        }
        assert_eq!(
            zstd::decode_all(&compress(Encoding::Zstd, &data, 3).unwrap()[..]).unwrap(),
            data
        );
    }

    #[test]
    fn etag_matching() {
        assert!(if_none_match_hits(Some("\"a\", \"b\""), "\"b\""));
        assert!(if_none_match_hits(Some("W/\"b\""), "\"b\""));
        assert!(if_none_match_hits(Some("*"), "\"b\""));
        assert!(!if_none_match_hits(Some("\"c\""), "\"b\""));
        assert!(!if_none_match_hits(None, "\"b\""));
    }

    #[test]
    fn rate_limit_per_token_and_ip() {
        let l = RateLimits::new(3, 5, 1);
        for _ in 0..3 {
            assert!(l.check_token("tok").is_ok());
        }
        assert!(l.check_token("tok").is_err());
        assert!(l.check_token("other").is_ok());
        let ip: IpAddr = "1.2.3.4".parse().unwrap();
        for _ in 0..5 {
            assert!(l.check_ip(ip).is_ok());
        }
        assert!(l.check_ip(ip).is_err());
        assert!(l.check_ip("1.2.3.5".parse().unwrap()).is_ok());
        assert!(l.check_ws(ip).is_ok() && l.check_ws(ip).is_err());
    }
}
