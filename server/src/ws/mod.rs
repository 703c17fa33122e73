//! `/ws`: the WebSocket endpoint, one task per connection, and the admin
//! stats endpoint.
//!
//! The token comes from `?token=`, the `Authorization: Bearer` header, or the
//! `Sec-WebSocket-Protocol` bearer form (`bearer, <token>`; the server answers
//! with the `bearer` protocol). A missing or bad token is refused with 401
//! before the upgrade.
//!
//! Each connection is driven by a single task that reads client frames and
//! writes what the hub queued for it, from one hand-written poll loop, so an
//! idle connection costs one small task, the socket, tungstenite's state
//! (read buffer 512 bytes) and its hub entry. A resume adds a second,
//! short-lived task that replays from the log.

pub mod hub;
pub mod protocol;

pub use hub::{Hub, HubConfig};

use crate::events::model::{is_pruned, Event};
use crate::state::AppState;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use hub::{Conn, SubscribeError};
use poem::http::{header, HeaderValue, StatusCode};
use poem::{Endpoint, Request, Response};
use protocol::{Channel, ClientMessage};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Utf8Bytes};
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

type Socket = WebSocketStream<poem::Upgraded>;

/// Client frames are small JSON requests.
const MAX_CLIENT_MESSAGE: usize = 16 * 1024;
/// tungstenite reads into a buffer this large (its default is 128 KiB, kept
/// for the life of the connection).
const READ_BUFFER: usize = 512;
/// Frames are gathered up to this many bytes before a write to the socket.
const WRITE_BUFFER: usize = 4096;
/// How long a closing connection waits for the client's close frame: a slow
/// consumer gets time to read what was already written before the close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
const CLOSE_TIMEOUT_SLOW: Duration = Duration::from_secs(10);
/// Events read from the log per query during a replay.
const REPLAY_PAGE: i32 = 500;

fn socket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + MAX_CLIENT_MESSAGE * 64)
        .max_message_size(Some(MAX_CLIENT_MESSAGE))
        .max_frame_size(Some(MAX_CLIENT_MESSAGE))
}

/// Sets TCP_NODELAY on every accepted socket: small frames (events, acks)
/// leave at once instead of waiting for the client's delayed ACK (Nagle).
pub struct NoDelay<A>(pub A);

impl<A> poem::listener::Acceptor for NoDelay<A>
where
    A: poem::listener::Acceptor<Io = tokio::net::TcpStream>,
{
    type Io = tokio::net::TcpStream;

    fn local_addr(&self) -> Vec<poem::web::LocalAddr> {
        self.0.local_addr()
    }

    async fn accept(
        &mut self,
    ) -> std::io::Result<(
        Self::Io,
        poem::web::LocalAddr,
        poem::web::RemoteAddr,
        poem::http::uri::Scheme,
    )> {
        let (io, local, remote, scheme) = self.0.accept().await?;
        let _ = io.set_nodelay(true);
        Ok((io, local, remote, scheme))
    }
}

/// The JSON error body every endpoint uses.
fn error_response(req: &Request, status: StatusCode, code: &str, message: &str) -> Response {
    let request_id = req.header("x-request-id").map(str::to_string);
    let body = serde_json::json!({
        "error": {"code": code, "message": message, "details": null, "requestId": request_id},
    });
    let mut resp = Response::builder()
        .status(status)
        .content_type("application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(body.to_string());
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

/// Where the token came from.
#[derive(Debug, PartialEq, Eq)]
enum TokenSource {
    Query,
    Header,
    Protocol,
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

fn find_token(req: &Request) -> Option<(String, TokenSource)> {
    if let Some(t) = query_token(req) {
        return Some((t, TokenSource::Query));
    }
    if let Some(t) = req
        .header(header::AUTHORIZATION)
        .and_then(crate::auth::bearer)
    {
        return Some((t.to_string(), TokenSource::Header));
    }
    protocol_token(req).map(|t| (t, TokenSource::Protocol))
}

/// The `exp` claim of an already verified token.
fn token_expiry(token: &str) -> Option<i64> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()?
        .get("exp")?
        .as_i64()
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
    state: Arc<AppState>,
}

pub fn endpoint(state: Arc<AppState>) -> WsEndpoint {
    WsEndpoint { state }
}

impl Endpoint for WsEndpoint {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        Ok(upgrade(&req, &self.state))
    }
}

fn upgrade(req: &Request, state: &Arc<AppState>) -> Response {
    let Some((token, _source)) = find_token(req) else {
        return error_response(
            req,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a token is required: ?token=, Authorization: Bearer, or Sec-WebSocket-Protocol: bearer, <token>",
        );
    };
    let principal = match state.auth.verify(&token) {
        Ok(p) => p,
        Err(e) => {
            return error_response(
                req,
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                &e.to_string(),
            )
        }
    };
    if req.method() != poem::http::Method::GET
        || !header_has_token(req, header::UPGRADE, "websocket")
        || !header_has_token(req, header::CONNECTION, "upgrade")
    {
        let mut resp = error_response(
            req,
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
            req,
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
            req,
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Sec-WebSocket-Key is missing",
        );
    };
    if state.hub.is_shutting_down() {
        return error_response(
            req,
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the server is shutting down",
        );
    }
    let on_upgrade = match req.take_upgrade() {
        Ok(u) => u,
        Err(_) => {
            return error_response(
                req,
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
    let exp = token_expiry(&token);
    let state = state.clone();
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let socket =
            WebSocketStream::from_raw_socket(upgraded, WsRole::Server, Some(socket_config())).await;
        let Some(conn) = state.hub.register(&principal, exp) else {
            let mut socket = socket;
            let _ = tokio::time::timeout(
                CLOSE_TIMEOUT,
                socket.close(Some(close_frame(1001, "server shutting down"))),
            )
            .await;
            return;
        };
        drop(principal);
        run_connection(socket, conn, state).await;
    });
    resp
}

fn close_frame(code: u16, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code: code.into(),
        reason: Utf8Bytes::from_static(reason),
    }
}

enum Outcome {
    /// The client closed or the socket failed.
    Gone,
    Close(u16, &'static str),
}

impl Outcome {
    fn from_error(e: WsError) -> Outcome {
        match e {
            WsError::Capacity(_) => Outcome::Close(protocol::CLOSE_TOO_BIG, "message too big"),
            WsError::Protocol(_) | WsError::Utf8(_) => Outcome::Close(1002, "protocol error"),
            _ => Outcome::Gone,
        }
    }
}

struct Session {
    state: Arc<AppState>,
    conn: Arc<Conn>,
    /// A frame taken from the queue that the socket was not ready for.
    in_flight: Option<Message>,
    flush_pending: bool,
}

async fn run_connection(mut socket: Socket, conn: Arc<Conn>, state: Arc<AppState>) {
    let hub = &state.hub;
    hub.reply(
        &conn,
        protocol::ready(
            conn.user_id,
            conn.role.as_str(),
            hub.position().id,
            hub.cfg.ping_interval.as_millis(),
            hub.cfg.send_queue,
        ),
    );
    let mut session = Session {
        state: state.clone(),
        conn: conn.clone(),
        in_flight: None,
        flush_pending: false,
    };
    let outcome = std::future::poll_fn(|cx| session.poll(&mut socket, cx)).await;
    drop(session);
    match outcome {
        Outcome::Close(code, reason) => {
            hub.close(&conn, code, reason);
            let wait = if code == protocol::CLOSE_SLOW_CONSUMER {
                CLOSE_TIMEOUT_SLOW
            } else {
                CLOSE_TIMEOUT
            };
            let _ = tokio::time::timeout(wait, async {
                if socket.close(Some(close_frame(code, reason))).await.is_ok() {
                    // Read until the client answers, so it gets everything sent before.
                    while let Some(Ok(_)) = socket.next().await {}
                }
            })
            .await;
        }
        Outcome::Gone => {
            hub.close(&conn, 1000, "closed");
            let _ = tokio::time::timeout(Duration::from_secs(1), socket.flush()).await;
        }
    }
    hub.unregister(&conn);
}

impl Session {
    fn poll(&mut self, ws: &mut Socket, cx: &mut Context<'_>) -> Poll<Outcome> {
        // Client frames first.
        let mut budget = 64;
        loop {
            match Pin::new(&mut *ws).poll_next(cx) {
                Poll::Ready(Some(Ok(msg))) => {
                    self.conn.alive();
                    self.on_message(msg);
                    // tungstenite may have queued a pong or a close reply.
                    self.flush_pending = true;
                    budget -= 1;
                    if budget == 0 {
                        cx.waker().wake_by_ref();
                        break;
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Outcome::from_error(e)),
                Poll::Ready(None) => return Poll::Ready(Outcome::Gone),
                Poll::Pending => break,
            }
        }
        // Register before looking at the queue so that no push is missed.
        self.conn.waker.register(cx.waker());
        if let Some((code, reason)) = self.conn.close_requested() {
            return Poll::Ready(Outcome::Close(code, reason));
        }
        let mut budget = 256;
        loop {
            if self.in_flight.is_none() {
                self.in_flight = self.conn.pop();
            }
            let Some(msg) = self.in_flight.take() else {
                break;
            };
            match Pin::new(&mut *ws).poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    let counted = msg.is_text();
                    if let Err(e) = Pin::new(&mut *ws).start_send(msg) {
                        return Poll::Ready(Outcome::from_error(e));
                    }
                    if counted {
                        self.state.hub.counters.sent.fetch_add(1, Relaxed);
                    }
                    self.flush_pending = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Outcome::from_error(e)),
                Poll::Pending => {
                    self.in_flight = Some(msg);
                    break;
                }
            }
            budget -= 1;
            if budget == 0 {
                cx.waker().wake_by_ref();
                break;
            }
        }
        if self.flush_pending {
            match Pin::new(&mut *ws).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.flush_pending = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Outcome::from_error(e)),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }

    fn on_message(&mut self, msg: Message) {
        let hub = &self.state.hub;
        match msg {
            Message::Text(text) => self.on_request(text.as_str()),
            Message::Binary(_) => hub.reply(
                &self.conn,
                protocol::error("bad_request", "send JSON text frames, not binary", None),
            ),
            // Pongs mark the connection alive (done by the caller); pings
            // and the close handshake are answered by tungstenite.
            _ => {}
        }
    }

    fn on_request(&mut self, text: &str) {
        let hub = &self.state.hub;
        let conn = &self.conn;
        let request = match ClientMessage::parse(text) {
            Ok(r) => r,
            Err(m) => return hub.reply(conn, protocol::error("bad_request", &m, None)),
        };
        match request {
            ClientMessage::Ping => hub.reply(conn, protocol::pong()),
            ClientMessage::Subscribe { event } => {
                if let Some(ch) = channel_or_reply(hub, conn, &event) {
                    subscribe_reply(hub, conn, &event, hub.subscribe(conn, ch))
                }
            }
            ClientMessage::Unsubscribe { event } => match Channel::parse(&event) {
                Some(ch) => {
                    hub.unsubscribe(conn, ch);
                    hub.reply(conn, protocol::unsubscribed(&event))
                }
                None if protocol::IMPLICIT.contains(&event.as_str()) => hub.reply(
                    conn,
                    protocol::error(
                        "bad_request",
                        "your own notifications cannot be unsubscribed",
                        Some(&event),
                    ),
                ),
                None => hub.reply(
                    conn,
                    protocol::error("unknown_channel", "no such channel", Some(&event)),
                ),
            },
            ClientMessage::Resume {
                last_event_id,
                events,
            } => {
                if last_event_id < 0 {
                    return hub.reply(
                        conn,
                        protocol::error(
                            "bad_request",
                            "lastEventId must be 0 or an event id",
                            None,
                        ),
                    );
                }
                let named: Vec<(String, Channel)> = events
                    .into_iter()
                    .filter_map(|e| channel_or_reply(hub, conn, &e).map(|ch| (e, ch)))
                    .collect();
                let channels: Vec<Channel> = named.iter().map(|(_, ch)| *ch).collect();
                match hub.begin_resume(conn, &channels) {
                    Ok((snap, added)) => {
                        for ((name, _), result) in named.iter().zip(added) {
                            subscribe_reply(hub, conn, name, result);
                        }
                        tokio::spawn(replay(
                            self.state.clone(),
                            conn.clone(),
                            snap,
                            last_event_id,
                        ));
                    }
                    Err(m) => hub.reply(conn, protocol::error("bad_request", m, None)),
                }
            }
        }
    }
}

/// The channel a name denotes; otherwise answers (implicit channel: ack;
/// unknown: error) and returns `None`.
fn channel_or_reply(hub: &Hub, conn: &Conn, event: &str) -> Option<Channel> {
    match Channel::parse(event) {
        Some(ch) => Some(ch),
        None if protocol::IMPLICIT.contains(&event) => {
            hub.reply(conn, protocol::subscribed(event, true));
            None
        }
        None => {
            hub.reply(
                conn,
                protocol::error(
                    "unknown_channel",
                    "channels are sales-data-<storeId>, stores, announcements and batch",
                    Some(event),
                ),
            );
            None
        }
    }
}

fn subscribe_reply(hub: &Hub, conn: &Conn, event: &str, result: Result<bool, SubscribeError>) {
    let text = match result {
        Ok(_) => protocol::subscribed(event, false),
        Err(e @ SubscribeError::Forbidden(_)) => {
            protocol::error("forbidden", &e.to_string(), Some(event))
        }
        Err(e @ SubscribeError::TooMany(_)) => {
            protocol::error("too_many_subscriptions", &e.to_string(), Some(event))
        }
    };
    hub.reply(conn, text);
}

enum ReplayEnd {
    Done(crate::events::Pos, u64),
    Pruned,
    Closed,
}

/// Replays from the log what `conn` missed after `last_event_id` (only what
/// its subscriptions and scope allow, and only what was not delivered live),
/// up to the position where live delivery was held back; then the held-back
/// live events follow.
async fn replay(
    state: Arc<AppState>,
    conn: Arc<Conn>,
    snap: hub::ResumeSnapshot,
    last_event_id: i64,
) {
    let hub = &state.hub;
    let run = async {
        let _slot = hub
            .replay_slots
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let Some(from) = Event::position_of(&state.pool, last_event_id).await? else {
            return Ok::<_, sqlx::Error>(ReplayEnd::Pruned);
        };
        let mut after = last_event_id;
        let mut count = 0u64;
        if from < snap.upto {
            'pages: loop {
                let page = Event::since(&state.pool, after, REPLAY_PAGE).await?;
                for e in &page {
                    if e.pos() > snap.upto {
                        break 'pages;
                    }
                    if snap.wants(&conn, e) {
                        if !hub
                            .push_replay(&conn, Message::Text(Utf8Bytes::from(e.to_frame())))
                            .await
                        {
                            return Ok(ReplayEnd::Closed);
                        }
                        count += 1;
                    }
                }
                match page.last() {
                    Some(e) if page.len() == REPLAY_PAGE as usize => after = e.id,
                    _ => break,
                }
            }
        }
        Ok(ReplayEnd::Done(from, count))
    };
    match run.await {
        Ok(ReplayEnd::Done(from, count)) => {
            let seam = from.max(snap.upto);
            hub.finish_resume(
                &conn,
                &snap,
                seam,
                Some(from),
                protocol::resumed(last_event_id, count, seam.id),
            );
        }
        Ok(ReplayEnd::Closed) => {}
        Ok(ReplayEnd::Pruned) => {
            hub.counters.resync_required.fetch_add(1, Relaxed);
            let msg = format!(
                "event {last_event_id} is older than the retention ({} days) or unknown; reload, then follow live events",
                state.config.event_retention.as_secs() / 86400
            );
            hub.finish_resume(
                &conn,
                &snap,
                snap.upto,
                None,
                protocol::error("resync_required", &msg, None),
            );
        }
        Err(e) if is_pruned(&e) => {
            hub.counters.resync_required.fetch_add(1, Relaxed);
            hub.finish_resume(
                &conn,
                &snap,
                snap.upto,
                None,
                protocol::error(
                    "resync_required",
                    "the events after lastEventId were pruned during the replay",
                    None,
                ),
            );
        }
        Err(e) => {
            // Flushing the live events now would leave a gap: close instead,
            // so that the client resumes again from the same id.
            tracing::warn!(error = %e, "resume failed");
            hub.close(&conn, 1011, "resume failed; reconnect and resume again");
        }
    }
}

/// `GET /api/admin/websocket/stats` (admin token required).
pub struct StatsEndpoint {
    state: Arc<AppState>,
}

pub fn stats_endpoint(state: Arc<AppState>) -> StatsEndpoint {
    StatsEndpoint { state }
}

impl Endpoint for StatsEndpoint {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        let Some(token) = req
            .header(header::AUTHORIZATION)
            .and_then(crate::auth::bearer)
        else {
            return Ok(error_response(
                &req,
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing bearer token",
            ));
        };
        let principal = match self.state.auth.verify(token) {
            Ok(p) => p,
            Err(e) => {
                return Ok(error_response(
                    &req,
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    &e.to_string(),
                ))
            }
        };
        if !principal.is_admin() {
            return Ok(error_response(
                &req,
                StatusCode::FORBIDDEN,
                "forbidden",
                "admin role required",
            ));
        }
        Ok(Response::builder()
            .content_type("application/json")
            .header(header::CACHE_CONTROL, "no-store")
            .body(self.state.hub.stats().to_string()))
    }
}

/// The relay and the heartbeat of one running server.
pub struct Realtime {
    relay: crate::events::relay::Relay,
    stop: watch::Sender<bool>,
    ticker: tokio::task::JoinHandle<()>,
}

/// Starts the relay and the heartbeat (the hub's position must be set:
/// see `events::relay::init`).
pub fn start(state: &Arc<AppState>) -> Realtime {
    let relay = crate::events::relay::Relay::spawn(state.clone());
    let (stop, mut rx) = watch::channel(false);
    let hub_state = state.clone();
    let ticker = tokio::spawn(async move {
        let hub = &hub_state.hub;
        let mut ping = tokio::time::interval(hub.cfg.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            tokio::select! {
                _ = rx.changed() => return,
                _ = ping.tick() => hub.heartbeat(),
            }
        }
    });
    Realtime {
        relay,
        stop,
        ticker,
    }
}

impl Realtime {
    /// Closes every socket with 1001, waits (at most `limit`) for them to
    /// go, then stops the relay and the heartbeat.
    pub async fn stop(self, state: &AppState, limit: Duration) {
        state.hub.begin_shutdown();
        if !state.hub.wait_empty(limit).await {
            tracing::warn!(
                open = state.hub.connections(),
                "WebSocket connections still open at shutdown"
            );
        }
        let _ = self.stop.send(true);
        let _ = self.ticker.await;
        self.relay.stop().await;
    }
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
        assert_eq!(
            find_token(&req("/ws?token=abc", &[])),
            Some(("abc".into(), TokenSource::Query))
        );
        assert_eq!(
            find_token(&req("/ws", &[("authorization", "Bearer xyz")])),
            Some(("xyz".into(), TokenSource::Header))
        );
        assert_eq!(
            find_token(&req("/ws", &[("sec-websocket-protocol", "bearer, t.o.k")])),
            Some(("t.o.k".into(), TokenSource::Protocol))
        );
        assert_eq!(
            find_token(&req("/ws", &[("sec-websocket-protocol", "bearer")])),
            None
        );
        assert_eq!(find_token(&req("/ws?token=", &[])), None);
    }

    #[test]
    fn expiry_from_payload() {
        use base64::Engine;
        let body =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"sub":"1","exp":1234}"#);
        assert_eq!(token_expiry(&format!("h.{body}.s")), Some(1234));
        assert_eq!(token_expiry("nonsense"), None);
    }
}
