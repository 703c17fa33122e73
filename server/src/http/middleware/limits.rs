//! Rate limits, declared query parameters and the body size limit.

use super::error_response;
use crate::http::error::ApiError;
use crate::http::routes::{Match, Routes};
use crate::state::AppState;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use poem::http::{header, HeaderValue, StatusCode};
use poem::{Endpoint, IntoResponse, Request, Response};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

/// Request budgets. Every `/api/*` and `/ws` request spends from its IP's
/// bucket (RATE_LIMIT_PER_IP_PER_MINUTE), whatever it carries; a request
/// whose bearer token verifies also spends from its user's bucket
/// (RATE_LIMIT_PER_MINUTE, shared by every token of the user: a fresh
/// token from `/auth/refresh` or another login brings no fresh budget),
/// checked in the security scheme after verification, so junk tokens
/// never get a bucket of their own. WebSocket
/// upgrades have their own per-IP budget (WS_UPGRADES_PER_MINUTE).
pub struct RateLimits {
    by_ip: DefaultKeyedRateLimiter<IpAddr>,
    by_user: DefaultKeyedRateLimiter<i64>,
    ws_by_ip: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
    calls: std::sync::atomic::AtomicU64,
}

/// `Retry-After` for a wait: whole seconds, rounded up, at least 1.
fn retry_after(wait: std::time::Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

fn quota(per_minute: u32) -> Quota {
    let n = NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(n).allow_burst(n)
}

impl RateLimits {
    pub fn new(per_user: u32, per_ip: u32, ws_per_ip: u32) -> Self {
        Self {
            by_ip: RateLimiter::keyed(quota(per_ip)),
            by_user: RateLimiter::keyed(quota(per_user)),
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
            self.by_user.retain_recent();
            self.ws_by_ip.retain_recent();
        }
    }

    /// Whole seconds until the next request is allowed, rounded up: a
    /// client that waits `Retry-After` seconds gets through (rounded down,
    /// it came back up to a second early and was refused again).
    fn wait(&self, nu: governor::NotUntil<governor::clock::QuantaInstant>) -> u64 {
        retry_after(nu.wait_time_from(self.clock.now()))
    }

    /// `Err(seconds to wait)` when the IP's budget is spent (an IPv6
    /// client's budget is its /64's: see [`throttle_key`]).
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), u64> {
        self.upkeep();
        self.by_ip
            .check_key(&throttle_key(ip))
            .map_err(|nu| self.wait(nu))
    }

    /// For a token that has verified: its user's budget (an outside
    /// identity provider's token spends that of the user it stands for).
    pub fn check_user(&self, user_id: i64) -> Result<(), u64> {
        self.by_user.check_key(&user_id).map_err(|nu| self.wait(nu))
    }

    pub fn check_ws(&self, ip: IpAddr) -> Result<(), u64> {
        self.ws_by_ip
            .check_key(&throttle_key(ip))
            .map_err(|nu| self.wait(nu))
    }
}

/// The address a client is throttled as: an IPv4 address itself (IPv4-mapped
/// IPv6 read as IPv4), an IPv6 address its /64. A single IPv6 subscriber is
/// given at least a /64 and picks addresses in it at will (privacy
/// addresses change by themselves), so a limit per address limited nothing.
pub fn throttle_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(v6) & !((1u128 << 64) - 1),
        )),
        v4 => v4,
    }
}

/// The client's address: the connection's peer, unless the peer is one of
/// `trusted` (TRUSTED_PROXIES). Then `X-Forwarded-For` is read from its
/// right end, where the trusted proxy appended the address it saw, past
/// every trusted proxy; the first address that is not one is the client.
/// Entries left of it were written by the client and are ignored (a client
/// cannot pick the address it is throttled as). A malformed entry ends the
/// walk at the last proxy before it.
pub fn client_ip(req: &Request, trusted: &[ipnet::IpNet]) -> IpAddr {
    forwarded_client(peer_ip(req), trusted, || {
        req.headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    })
}

/// Whether a trusted proxy (see [`client_ip`]) says the client used HTTPS:
/// the first `X-Forwarded-Proto` entry, the one the proxy nearest the
/// client wrote. From any other peer the header counts for nothing.
pub fn forwarded_https(req: &Request, trusted: &[ipnet::IpNet]) -> bool {
    is_trusted(trusted, &peer_ip(req))
        && req
            .headers()
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"))
}

/// The connection's peer (the unspecified address when it has none, which
/// no trusted network contains).
fn peer_ip(req: &Request) -> IpAddr {
    req.remote_addr()
        .as_socket_addr()
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED))
}

/// Whether `ip` (IPv4-mapped IPv6 read as IPv4) is in a trusted network.
fn is_trusted(trusted: &[ipnet::IpNet], ip: &IpAddr) -> bool {
    let ip = ip.to_canonical();
    trusted.iter().any(|n| n.contains(&ip))
}

fn forwarded_client<'a>(
    peer: IpAddr,
    trusted: &[ipnet::IpNet],
    headers: impl FnOnce() -> Vec<&'a str>,
) -> IpAddr {
    if !is_trusted(trusted, &peer) {
        return peer;
    }
    let values = headers();
    let mut client = peer;
    for hop in values.iter().rev().flat_map(|v| v.rsplit(',')) {
        let hop = hop.trim();
        let Ok(ip) = hop
            .parse::<IpAddr>()
            .or_else(|_| hop.parse::<std::net::SocketAddr>().map(|a| a.ip()))
        else {
            break;
        };
        client = ip.to_canonical();
        if !is_trusted(trusted, &client) {
            break;
        }
    }
    client
}

/// 400 for a query parameter the operation does not declare, or one given
/// twice: handlers would ignore it, and the response must not depend on
/// (or be cached under) anything they ignore.
pub fn check_query(req: &Request, routes: &Routes) -> Result<(), ApiError> {
    let Some(query) = req.uri().query() else {
        return Ok(());
    };
    let Match::Operation(_, allowed) = routes.find(req.method().as_str(), req.uri().path()) else {
        return Ok(());
    };
    // A value whose percent-escapes are not UTF-8 would be read with
    // replacement characters (`region=%FF` matched nothing, answering an
    // empty page): refused, naming it.
    let utf8 = |part: &str| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8()
            .is_ok()
    };
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !utf8(name) {
            return Err(ApiError::bad_param(
                "query",
                "a parameter name is not UTF-8 once its %-escapes are decoded",
            ));
        }
        if !utf8(value) {
            let name: String = form_urlencoded::parse(pair.as_bytes())
                .next()
                .map(|(k, _)| k.chars().take(64).collect())
                .unwrap_or_default();
            return Err(ApiError::bad_param(
                &name,
                "is not UTF-8 once its %-escapes are decoded",
            ));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (k, _) in form_urlencoded::parse(query.as_bytes()) {
        if k.is_empty() {
            continue;
        }
        if !allowed.contains(k.as_ref()) {
            let mut names: Vec<&str> = allowed.iter().map(String::as_str).collect();
            names.sort_unstable();
            let name: String = k.chars().take(64).collect();
            return Err(ApiError::bad_param(
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
            return Err(ApiError::bad_param(&k, "given more than once"));
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
    let cors = !state.config.cors_origins.is_empty();
    let had_token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer "));
    let mut resp = limited(ep, req, state, limits, routes).await?;
    // A refusal made here (429, 400, 405, 413, 415, 501) never reached the
    // layer that marks responses: mark it as that layer marks an error.
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(resp);
    }
    super::representation::mark(&mut resp, cors);
    // Every 401 challenges (`/ws` sets its own, by the same rule).
    if resp.status() == StatusCode::UNAUTHORIZED
        && !resp.headers().contains_key(header::WWW_AUTHENTICATE)
    {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, bearer_challenge(had_token));
    }
    Ok(resp)
}

/// The `WWW-Authenticate` of a 401: it names the scheme to authenticate
/// with (RFC 9110 11.6.1), and says whether a token was sent and refused
/// (RFC 6750 3.1).
pub fn bearer_challenge(token_sent: bool) -> HeaderValue {
    HeaderValue::from_static(if token_sent {
        r#"Bearer realm="pg_sales", error="invalid_token""#
    } else {
        r#"Bearer realm="pg_sales""#
    })
}

async fn limited<E: Endpoint>(
    ep: Arc<E>,
    req: Request,
    state: Arc<AppState>,
    limits: Arc<RateLimits>,
    routes: Arc<Routes>,
) -> poem::Result<Response> {
    let path = req.uri().path();
    let is_ws = path == "/ws";
    if path.starts_with("/api/") || is_ws {
        let ip = client_ip(&req, &state.config.trusted_proxies);
        let checked =
            limits
                .check_ip(ip)
                .and_then(|()| if is_ws { limits.check_ws(ip) } else { Ok(()) });
        if let Err(retry) = checked {
            return Ok(ApiError::too_many(retry).into_response());
        }
    }
    if let Some(allowed) = routes.allowed_any(req.uri().path()) {
        let method = req.method().as_str();
        // What the resource allows, OPTIONS included: the same `Allow` on
        // an OPTIONS request and on a 405 (and in the 405's message), as
        // RFC 9110 has both answer.
        let mut methods = allowed.to_vec();
        methods.push("OPTIONS");
        let methods = methods.join(", ");
        let allow = HeaderValue::from_str(&methods).ok();
        let cors = !state.config.cors_origins.is_empty();
        if method == "OPTIONS"
            && !(cors && req.headers().contains_key("access-control-request-method"))
        {
            // Not a CORS preflight (those go on to the CORS layer when
            // CORS_ORIGINS is set; without it, a preflight is an OPTIONS
            // request like any, answered with no CORS header).
            let mut resp = Response::builder().status(StatusCode::NO_CONTENT).finish();
            if let Some(v) = allow {
                resp.headers_mut().insert(header::ALLOW, v);
            }
            return Ok(resp);
        }
        if !allowed.contains(&method) && method != "OPTIONS" {
            let mut resp = error_response(poem::Error::from_string(
                format!("{method} is not allowed here; use {methods}"),
                StatusCode::METHOD_NOT_ALLOWED,
            ));
            if let Some(v) = allow {
                resp.headers_mut().insert(header::ALLOW, v);
            }
            return Ok(resp);
        }
    }
    if let Err(e) = check_query(&req, &routes) {
        return Ok(e.into_response());
    }
    // Bodies are read as UTF-8: one declared in another charset is refused
    // rather than misread. (A GET, HEAD or OPTIONS has no body to read: its
    // Content-Type and Content-Encoding say nothing.)
    let bodiless = matches!(
        *req.method(),
        poem::http::Method::GET | poem::http::Method::HEAD | poem::http::Method::OPTIONS
    );
    if let Some(charset) = req
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase())
        .and_then(|ct| {
            ct.split(';').skip(1).find_map(|p| {
                let (k, v) = p.split_once('=')?;
                (k.trim() == "charset").then(|| v.trim().trim_matches('"').to_string())
            })
        })
        .filter(|c| c != "utf-8" && c != "utf8" && !bodiless)
    {
        return Ok(error_response(poem::Error::from_string(
            format!("charset {charset:?} is not accepted: bodies are read as UTF-8"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        )));
    }
    // Request bodies are read as sent: one compressed (or labelled with any
    // coding but `identity`) would be read as its bytes, and refused as bad
    // JSON or, worse, taken as written.
    if let Some(coding) = req
        .headers()
        .get(header::CONTENT_ENCODING)
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|c| !c.is_empty() && c != "identity" && !bodiless)
    {
        return Ok(error_response(poem::Error::from_string(
            format!("Content-Encoding {coding:?} is not accepted: send the body uncompressed"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        )));
    }
    // A transfer coding other than chunked (`gzip, chunked`) is one the
    // server does not undo: the body would be taken as written (RFC 9112
    // 6.1 has such a request answered 501).
    for v in req.headers().get_all(header::TRANSFER_ENCODING) {
        let text = String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase();
        if let Some(coding) = text
            .split(',')
            .map(str::trim)
            .find(|c| !c.is_empty() && *c != "chunked")
        {
            // The client's request, not a fault of the server: said so,
            // naming the coding (not the opaque answer of a 5xx).
            return Ok(crate::http::error::ErrorBody::response(
                StatusCode::NOT_IMPLEMENTED,
                "not_implemented",
                format!(
                    "Transfer-Encoding {coding:?} is not supported: send the body as is or chunked"
                ),
                Some(serde_json::json!({"header": "Transfer-Encoding", "coding": coding})),
            ));
        }
    }
    // One caller per request: with two Authorization headers, a proxy that
    // reads the last one and this server, which would read the first, would
    // each see a different caller.
    if req.headers().get_all(header::AUTHORIZATION).iter().count() > 1 {
        return Ok(crate::http::error::ErrorBody::response(
            StatusCode::BAD_REQUEST,
            "bad_parameter",
            "give one Authorization header".to_string(),
            Some(serde_json::json!({"header": "Authorization", "reason": "given twice"})),
        ));
    }
    // `application/json ; charset=utf-8` is the same media type as
    // `application/json; charset=utf-8` (RFC 9110 5.6.6 allows spaces
    // around the `;`), which the typed extractors alone would refuse (415).
    let mut req = req;
    if let Some(canonical) = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        // A quoted parameter value may hold a `;` of its own: left as sent.
        .filter(|ct| !ct.contains('"'))
        .map(|ct| {
            ct.split(';')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
                .join("; ")
        })
        .filter(|c| {
            req.headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes() != c.as_bytes())
        })
        .and_then(|c| HeaderValue::from_str(&c).ok())
    {
        req.headers_mut().insert(header::CONTENT_TYPE, canonical);
    }
    let upgrade = is_ws && req.method() == poem::http::Method::GET;
    if upgrade || crate::http::imports::streams_body(&req) {
        // A WebSocket upgrade has no body to read; an import counts its body
        // against IMPORT_MAX_BYTES as it streams. Everything else, whatever
        // its headers, is read within BODY_LIMIT.
        return ep.call(req).await.map(IntoResponse::into_response);
    }
    let batch = is_batch(req.method(), req.uri().path());
    let limit = body_limit_for(batch, state.config.body_limit);
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Ok(ApiError::too_large(format!(
                "body of {len} bytes exceeds the limit for this operation ({limit} bytes)"
            ))
            .into_response());
        }
    }
    let (parts, body) = req.into_parts();
    let bytes = match body.into_bytes_limit(limit).await {
        Ok(b) => b,
        Err(poem::error::ReadBodyError::PayloadTooLarge) => {
            return Ok(ApiError::too_large(format!(
                "body exceeds the limit for this operation ({limit} bytes)"
            ))
            .into_response())
        }
        Err(e) => {
            return Ok(
                ApiError::bad_param("body", format!("could not be read: {e}")).into_response(),
            )
        }
    };
    if batch {
        // A batch body is parsed whole into a tree before its records are
        // counted; a body of nothing but empty objects would make that tree
        // dozens of times its size. Counted first, cheaply: no record of
        // BATCH_MAX_RECORDS needs more than RECORD_NESTING objects and arrays.
        let most = state
            .config
            .batch_max_records
            .saturating_mul(RECORD_NESTING)
            .saturating_add(16);
        if containers(&bytes) > most {
            return Ok(ApiError::too_large(format!(
                "the body holds more JSON objects and arrays than {} records (BATCH_MAX_RECORDS) can",
                state.config.batch_max_records
            ))
            .into_response());
        }
    }
    if !(batch && parts.method == poem::http::Method::POST) {
        // A key twice in one object: refused by name rather than read as its
        // last value. (A batch of records finds them as it reads each
        // record, and reports them as that record's error.)
        if let Some(path) = sales_core::json::repeated_key(&bytes) {
            return Ok(ApiError::bad_param(&path, sales_core::json::REPEATED).into_response());
        }
    }
    let mut req = Request::from_parts(parts, poem::Body::from(bytes.clone()));
    // Kept (the same buffer, not a copy) in case the body is refused: the
    // refusal then names the field at fault (`explained_error`).
    req.extensions_mut().insert(RawBody(bytes));
    ep.call(req).await.map(IntoResponse::into_response)
}

/// The body of a request as it was read, for explaining its refusal.
#[derive(Clone)]
pub struct RawBody(pub bytes::Bytes);

/// Objects and arrays one batch record (or delete item) can need: the
/// record, its `dailyData`, 31 days, and room to spare.
const RECORD_NESTING: usize = 40;

/// How many JSON objects and arrays a body opens, counted by their opening
/// bytes (an upper bound: a `{` inside a string counts too).
fn containers(body: &[u8]) -> usize {
    body.iter().filter(|b| matches!(b, b'{' | b'[')).count()
}

/// The most any body but a batch's may hold: logins, users, stores,
/// announcements and the like are small, and a JSON body is parsed whole
/// into a tree many times its size, so only the batch endpoints (whose
/// records are the point) may send up to BODY_LIMIT.
pub const SMALL_BODY_LIMIT: usize = 256 << 10;

/// Whether a request is one of the batch endpoints' (`POST` and `DELETE
/// /api/v2/sales/batch`), the only ones that take large bodies.
fn is_batch(method: &poem::http::Method, path: &str) -> bool {
    path == "/api/v2/sales/batch"
        && (method == poem::http::Method::POST || method == poem::http::Method::DELETE)
}

/// The body limit of one request: BODY_LIMIT for the batch endpoints,
/// SMALL_BODY_LIMIT (or BODY_LIMIT when lower) for everything else.
fn body_limit_for(batch: bool, body_limit: usize) -> usize {
    if batch {
        body_limit
    } else {
        body_limit.min(SMALL_BODY_LIMIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_are_counted_by_their_opening_bytes() {
        assert_eq!(containers(br#"{"keys": [{}, {"a": [1, 2]}], "s": "{"}"#), 6);
        assert_eq!(containers(b"1"), 0);
    }

    #[test]
    fn only_batches_may_send_large_bodies() {
        use poem::http::Method;
        let big = 16 << 20;
        for m in [Method::POST, Method::DELETE] {
            assert!(is_batch(&m, "/api/v2/sales/batch"));
            assert_eq!(
                body_limit_for(is_batch(&m, "/api/v2/sales/batch"), big),
                big
            );
        }
        for (m, p) in [
            (Method::POST, "/api/v2/auth/login"),
            (Method::POST, "/api/v2/users"),
            (Method::PATCH, "/api/v2/stores/3"),
            (Method::GET, "/api/v2/sales/batch"),
        ] {
            assert!(!is_batch(&m, p), "{m} {p}");
            assert_eq!(body_limit_for(false, big), SMALL_BODY_LIMIT, "{m} {p}");
        }
        assert_eq!(body_limit_for(false, 2048), 2048);
        assert_eq!(body_limit_for(true, 2048), 2048);
    }

    #[test]
    fn the_client_behind_trusted_proxies() {
        let nets =
            |s: &[&str]| -> Vec<ipnet::IpNet> { s.iter().map(|n| n.parse().unwrap()).collect() };
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let client = |peer: &str, trusted: &[ipnet::IpNet], xff: &[&'static str]| {
            let xff = xff.to_vec();
            forwarded_client(ip(peer), trusted, move || xff)
        };
        let proxies = nets(&["127.0.0.1/32", "10.0.0.0/8"]);
        // No trusted proxies: the header is ignored.
        assert_eq!(client("127.0.0.1", &[], &["203.0.113.9"]), ip("127.0.0.1"));
        // An untrusted peer's header is ignored.
        assert_eq!(
            client("198.51.100.4", &proxies, &["203.0.113.9"]),
            ip("198.51.100.4")
        );
        // A trusted peer: the address it saw.
        assert_eq!(
            client("127.0.0.1", &proxies, &["203.0.113.9"]),
            ip("203.0.113.9")
        );
        // Entries the client wrote (left of what the proxies appended) do not count.
        assert_eq!(
            client("127.0.0.1", &proxies, &["1.1.1.1, 203.0.113.9, 10.2.3.4"]),
            ip("203.0.113.9")
        );
        // Several header lines read as one list; ports and mapped IPv6 are understood.
        assert_eq!(
            client(
                "::ffff:127.0.0.1",
                &proxies,
                &["1.1.1.1", "203.0.113.9:5123, 10.2.3.4"]
            ),
            ip("203.0.113.9")
        );
        assert_eq!(
            client("127.0.0.1", &proxies, &["::ffff:10.0.0.3, 2001:db8::7"]),
            ip("2001:db8::7")
        );
        // Only proxies: the farthest one. No header: the peer.
        assert_eq!(
            client("127.0.0.1", &proxies, &["10.0.0.2, 10.0.0.3"]),
            ip("10.0.0.2")
        );
        assert_eq!(client("127.0.0.1", &proxies, &[]), ip("127.0.0.1"));
        // A malformed entry stops the walk at the last proxy before it.
        assert_eq!(
            client("127.0.0.1", &proxies, &["203.0.113.9, unknown, 10.0.0.3"]),
            ip("10.0.0.3")
        );
    }

    #[test]
    fn rate_limit_per_user_and_ip() {
        let l = RateLimits::new(3, 5, 1);
        for _ in 0..3 {
            assert!(l.check_user(7).is_ok());
        }
        assert!(l.check_user(7).is_err());
        assert!(l.check_user(8).is_ok());
        let ip: IpAddr = "1.2.3.4".parse().unwrap();
        for _ in 0..5 {
            assert!(l.check_ip(ip).is_ok());
        }
        assert!(l.check_ip(ip).is_err());
        assert!(l.check_ip("1.2.3.5".parse().unwrap()).is_ok());
        assert!(l.check_ws(ip).is_ok() && l.check_ws(ip).is_err());
    }

    /// An IPv6 client is throttled as its /64 (it picks addresses in it at
    /// will); another /64 has its own budget; IPv4-mapped IPv6 is IPv4.
    #[test]
    fn an_ipv6_client_is_throttled_as_its_64() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        assert_eq!(
            throttle_key(ip("2001:db8:1:2:abcd::9")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(throttle_key(ip("::ffff:1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(throttle_key(ip("1.2.3.4")), ip("1.2.3.4"));
        let l = RateLimits::new(3, 2, 1);
        assert!(l.check_ip(ip("2001:db8:1:2::1")).is_ok());
        assert!(l.check_ip(ip("2001:db8:1:2::ffff")).is_ok());
        assert!(l.check_ip(ip("2001:db8:1:2:9:9:9:9")).is_err());
        assert!(l.check_ip(ip("2001:db8:1:3::1")).is_ok());
        assert!(l.check_ws(ip("2001:db8:1:2::1")).is_ok());
        assert!(l.check_ws(ip("2001:db8:1:2::2")).is_err());
    }

    #[test]
    fn retry_after_is_rounded_up() {
        use std::time::Duration;
        assert_eq!(retry_after(Duration::from_millis(9_200)), 10);
        assert_eq!(retry_after(Duration::from_millis(5_999)), 6);
        assert_eq!(retry_after(Duration::from_secs(6)), 6);
        assert_eq!(retry_after(Duration::from_millis(300)), 1);
        assert_eq!(retry_after(Duration::ZERO), 1);
    }
}
