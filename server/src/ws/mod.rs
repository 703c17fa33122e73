//! `/ws`: the WebSocket endpoint, one task per connection.
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

use crate::auth::Auth;
use crate::events::model::{is_pruned, Event};
use crate::http::error::ErrorBody;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use hub::{Conn, Refused, SubscribeError};
use poem::http::{header, HeaderValue, StatusCode};
use poem::{Endpoint, Request, Response};
use protocol::{Channel, ClientMessage};
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context as TaskCx, Poll};
use std::time::Duration;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Utf8Bytes};
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

type Socket = WebSocketStream<poem::Upgraded>;

/// What the WebSocket side uses: the hub, token checks, and the pool that
/// replays read the log from.
#[derive(Clone)]
pub struct Context {
    pub hub: Arc<Hub>,
    pub auth: Arc<Auth>,
    pub pool: sqlx::PgPool,
    pub event_retention: Duration,
}

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

/// A refused upgrade, in the error body every endpoint uses.
fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    let mut resp = ErrorBody::response(status, code, message, None);
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
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
        return error_response(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a token is required: ?token=, Authorization: Bearer, or Sec-WebSocket-Protocol: bearer, <token>",
        );
    };
    let principal = match ctx.auth.verify(&token) {
        Ok(p) => p,
        Err(e) => return error_response(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string()),
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
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let socket =
            WebSocketStream::from_raw_socket(upgraded, WsRole::Server, Some(socket_config())).await;
        let conn = match ctx.hub.register(principal) {
            Ok(c) => c,
            Err(why) => {
                let frame = match why {
                    Refused::ShuttingDown => close_frame(1001, "server shutting down"),
                    // Raced past the check before the upgrade.
                    Refused::TooMany => {
                        close_frame(protocol::CLOSE_POLICY, "too many connections for this user")
                    }
                };
                let mut socket = socket;
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.close(Some(frame))).await;
                return;
            }
        };
        run_connection(socket, conn, ctx).await;
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
    ctx: Arc<Context>,
    conn: Arc<Conn>,
    /// A frame taken from the queue that the socket was not ready for.
    in_flight: Option<Message>,
    flush_pending: bool,
    read_wake: Arc<ReadWake>,
}

/// The waker the socket's read side is polled with: it notes that the read
/// side woke the task. Most wake-ups are the hub queueing an event; those
/// skip polling the read side (tungstenite, the split stream's lock, the
/// readiness check), which the profile showed as about a third of the
/// server's user-space CPU per delivered message.
struct ReadWake {
    ready: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl futures_util::task::ArcWake for ReadWake {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self
            .ready
            .store(true, std::sync::atomic::Ordering::Release);
        arc_self.task.wake();
    }
}

async fn run_connection(mut socket: Socket, conn: Arc<Conn>, ctx: Arc<Context>) {
    let hub = &ctx.hub;
    hub.reply(
        &conn,
        protocol::ready(
            conn.user_id(),
            conn.principal.role.as_str(),
            hub.position().id,
            hub.cfg.ping_interval.as_millis(),
            hub.cfg.send_queue,
        ),
    );
    let mut session = Session {
        ctx: ctx.clone(),
        conn: conn.clone(),
        in_flight: None,
        flush_pending: false,
        read_wake: Arc::new(ReadWake {
            ready: AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        }),
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
    fn poll(&mut self, ws: &mut Socket, cx: &mut TaskCx<'_>) -> Poll<Outcome> {
        // Client frames first, when the read side woke us (or may have:
        // the flag is cleared before polling, so a wake meanwhile sets it again).
        self.read_wake.task.register(cx.waker());
        if self
            .read_wake
            .ready
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            let read_wake = self.read_wake.clone();
            let waker = futures_util::task::waker_ref(&read_wake);
            let mut rcx = TaskCx::from_waker(&waker);
            let mut budget = 64;
            loop {
                match Pin::new(&mut *ws).poll_next(&mut rcx) {
                    Poll::Ready(Some(Ok(msg))) => {
                        self.conn.alive();
                        self.on_message(msg);
                        // tungstenite may have queued a pong or a close reply.
                        self.flush_pending = true;
                        budget -= 1;
                        if budget == 0 {
                            self.read_wake
                                .ready
                                .store(true, std::sync::atomic::Ordering::Release);
                            cx.waker().wake_by_ref();
                            break;
                        }
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Outcome::from_error(e)),
                    Poll::Ready(None) => return Poll::Ready(Outcome::Gone),
                    Poll::Pending => break,
                }
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
                        self.ctx.hub.counters.sent.fetch_add(1, Relaxed);
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
        let hub = &self.ctx.hub;
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
        let hub = &self.ctx.hub;
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
                        tokio::spawn(replay(self.ctx.clone(), conn.clone(), snap, last_event_id));
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
    TooLong,
    Closed,
}

/// Replays from the log what `conn` missed after `last_event_id` (only what
/// its subscriptions and scope allow, and only what was not delivered live),
/// up to the position where live delivery was held back; then the held-back
/// live events follow.
///
/// Bounds, so that no client can delay another's resume: a user runs one
/// replay at a time (their others wait behind it); a replay holds one of the
/// hub's replay slots only while it reads a page, never while it waits for
/// its client to read; it sends at most `replay_max_events` (then the client
/// is told to resync) and ends after `replay_timeout` (then its connection
/// is closed as a slow consumer, 4008, and the client resumes again).
async fn replay(ctx: Arc<Context>, conn: Arc<Conn>, snap: hub::ResumeSnapshot, last_event_id: i64) {
    let hub = &ctx.hub;
    let pool = &ctx.pool;
    let run = async {
        let _turn = hub.replay_turn(conn.user_id()).await;
        let from = {
            let _slot = hub
                .replay_slots
                .acquire()
                .await
                .map_err(|_| sqlx::Error::PoolClosed)?;
            Event::position_of(pool, last_event_id).await?
        };
        let Some(from) = from else {
            return Ok::<_, sqlx::Error>(ReplayEnd::Pruned);
        };
        let mut after = last_event_id;
        let mut count = 0u64;
        if from < snap.upto {
            'pages: loop {
                let page = {
                    let _slot = hub
                        .replay_slots
                        .acquire()
                        .await
                        .map_err(|_| sqlx::Error::PoolClosed)?;
                    Event::since(pool, after, REPLAY_PAGE).await?
                };
                for e in &page {
                    if e.pos() > snap.upto {
                        break 'pages;
                    }
                    if let Some(variant) = snap.wants(&conn, e) {
                        if count >= hub.cfg.replay_max_events {
                            return Ok(ReplayEnd::TooLong);
                        }
                        let msg = Message::Text(Utf8Bytes::from(e.frame(variant)));
                        if !hub.push_replay(&conn, msg).await {
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
    let resync = |msg: &str| {
        hub.counters.resync_required.fetch_add(1, Relaxed);
        hub.finish_resume(
            &conn,
            &snap,
            snap.upto,
            None,
            protocol::error("resync_required", msg, None),
        );
    };
    match tokio::time::timeout(hub.cfg.replay_timeout, run).await {
        Ok(Ok(ReplayEnd::Done(from, count))) => {
            let seam = from.max(snap.upto);
            hub.finish_resume(
                &conn,
                &snap,
                seam,
                Some(from),
                protocol::resumed(last_event_id, count, seam.id),
            );
        }
        Ok(Ok(ReplayEnd::Closed)) => {}
        Ok(Ok(ReplayEnd::Pruned)) => resync(&format!(
            "event {last_event_id} is older than the retention ({} days) or unknown; reload, then follow live events",
            ctx.event_retention.as_secs() / 86400
        )),
        Ok(Ok(ReplayEnd::TooLong)) => resync(&format!(
            "more than {} events were missed; reload, then follow live events",
            hub.cfg.replay_max_events
        )),
        Ok(Err(e)) if is_pruned(&e) => {
            resync("the events after lastEventId were pruned during the replay")
        }
        Ok(Err(e)) => {
            // Flushing the live events now would leave a gap: close instead,
            // so that the client resumes again from the same id.
            tracing::warn!(error = %e, "resume failed");
            hub.close(&conn, 1011, "resume failed; reconnect and resume again");
        }
        Err(_) => {
            hub.counters.replays_timed_out.fetch_add(1, Relaxed);
            if hub.close(
                &conn,
                protocol::CLOSE_SLOW_CONSUMER,
                protocol::REASON_SLOW_CONSUMER,
            ) {
                hub.counters.closed_slow.fetch_add(1, Relaxed);
            }
        }
    }
}

/// The WebSocket heartbeat of one running server: pings every connection
/// each `ping_interval`, closing dead ones and those whose token expired.
pub struct Heartbeat {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    pub fn spawn(hub: Arc<Hub>) -> Heartbeat {
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(async move {
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
        Heartbeat { stop, task }
    }

    /// Closes every socket with 1001, waits (at most `limit`) for them to
    /// go, then stops.
    pub async fn stop(self, hub: &Hub, limit: Duration) {
        hub.begin_shutdown();
        if !hub.wait_empty(limit).await {
            tracing::warn!(
                open = hub.connections(),
                "WebSocket connections still open at shutdown"
            );
        }
        let _ = self.stop.send(true);
        let _ = self.task.await;
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
