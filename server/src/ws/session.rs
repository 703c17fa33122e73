//! One WebSocket connection: a single task that reads client frames and
//! writes what the hub queued for it, from one hand-written poll loop.

use super::hub::{Conn, Refused, SubscribeError};
use super::protocol::{self, Channel, ClientMessage};
use super::Context;
use crate::auth::Principal;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context as TaskCx, Poll};
use std::time::Duration;
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Utf8Bytes};
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

type Socket = WebSocketStream<poem::Upgraded>;

/// Client frames are JSON requests; the largest a client needs is a resume
/// naming the most channels a connection follows (1,000): `sales-data-<id>`
/// with any id takes at most 32 bytes of the list, so 1,000 fit with room
/// for region names averaging up to about 55 characters.
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;
/// Bytes of frames the socket may hold back unsent before a write fails
/// (a slow consumer is closed well before, by the send queue's bound).
const MAX_WRITE_BUFFER: usize = WRITE_BUFFER + 1024 * 1024;
/// tungstenite reads into a buffer this large (its default is 128 KiB, kept
/// for the life of the connection).
const READ_BUFFER: usize = 512;
/// Frames are gathered up to this many bytes before a write to the socket.
const WRITE_BUFFER: usize = 4096;
/// How long a closing connection waits for the client's close frame: a slow
/// consumer gets time to read what was already written before the close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
const CLOSE_TIMEOUT_SLOW: Duration = Duration::from_secs(10);

fn socket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(Some(MAX_CLIENT_MESSAGE))
        .max_frame_size(Some(MAX_CLIENT_MESSAGE))
}

/// Runs an upgraded connection for `principal` until it closes.
pub async fn serve(upgraded: poem::Upgraded, principal: Principal, ctx: Arc<Context>) {
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
    // A revocation applied between the upgrade's check and this
    // registration found no connection to close: with the connection
    // registered, any later one closes it, and this check the earlier ones.
    super::revoke::close_if_revoked(&ctx.hub, ctx.auth.revocations(), conn.user_id());
    run_connection(socket, conn, ctx).await;
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
            WsError::Protocol(_) => Outcome::Close(1002, "protocol error"),
            // RFC 6455 7.4.1: data inconsistent with the frame's type.
            WsError::Utf8(_) => Outcome::Close(1007, "text frame is not UTF-8"),
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
            conn.opened_at().id,
            &conn.opened_epoch(),
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
        // An expired token gets no answer (and no replay): it is closed.
        if matches!(msg, Message::Text(_) | Message::Binary(_)) && hub.close_if_expired(&self.conn)
        {
            return;
        }
        match msg {
            Message::Text(text) => self.on_request(text.as_str()),
            Message::Binary(_) => {
                hub.end_opening(&self.conn);
                hub.reply(
                    &self.conn,
                    protocol::error("bad_request", "send JSON text frames, not binary", None),
                )
            }
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
            Err(m) => {
                hub.end_opening(conn);
                // The channel a refused subscribe named, so that the client
                // can tell which request this answers (an error naming a
                // channel says it is not followed, which for a refused
                // unsubscribe would be wrong).
                let named = serde_json::from_str::<serde_json::Value>(text)
                    .ok()
                    .filter(|v| v.get("type").and_then(|t| t.as_str()) == Some("subscribe"))
                    .and_then(|v| v.get("event")?.as_str().map(str::to_string));
                return hub.reply(conn, protocol::error("bad_request", &m, named.as_deref()));
            }
        };
        if !matches!(request, ClientMessage::Resume { .. }) {
            hub.end_opening(conn);
        }
        match request {
            ClientMessage::Ping {} => hub.reply(conn, protocol::pong()),
            ClientMessage::Subscribe { event } => {
                let mut out = Vec::new();
                if let Some(ch) = channel_or_reply(&mut out, &event) {
                    out.push(subscribe_reply(&event, hub.subscribe(conn, ch)));
                }
                hub.replies(conn, out);
            }
            ClientMessage::Unsubscribe { event } => match Channel::parse_to_leave(&event) {
                Some(Ok(ch)) => {
                    hub.unsubscribe(conn, ch);
                    hub.reply_after_held(conn, protocol::unsubscribed(&event))
                }
                // A region nobody follows: nothing to leave.
                Some(Err(())) => hub.reply(conn, protocol::unsubscribed(&event)),
                // Named in the message, not as `event`: an error naming a
                // channel says it is not followed, and this one always is.
                None if protocol::IMPLICIT.contains(&event.as_str()) => hub.reply(
                    conn,
                    protocol::error(
                        "bad_request",
                        &format!(
                            "{event} cannot be unsubscribed: your own notifications always arrive"
                        ),
                        None,
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
                epoch,
            } => {
                // A resume refused outright is answered like any other
                // request: the events held since the connection opened are
                // released (they waited for the hold to run out).
                if last_event_id < 0 {
                    hub.end_opening(conn);
                    return hub.reply(
                        conn,
                        protocol::error(
                            "bad_request",
                            "lastEventId must be 0 or an event id",
                            None,
                        ),
                    );
                }
                let most = hub.cfg.max_subscriptions;
                if events.len() > most {
                    hub.end_opening(conn);
                    return hub.reply(
                        conn,
                        protocol::error(
                            "bad_request",
                            &format!(
                                "a resume names at most {most} channels (it named {})",
                                events.len()
                            ),
                            None,
                        ),
                    );
                }
                // Its replies go out together (see Hub::replies), one per
                // channel in the order the request named them.
                let mut answers: Vec<Option<String>> = Vec::with_capacity(events.len());
                let mut named: Vec<(usize, String, Channel)> = Vec::new();
                for e in events {
                    let mut out = Vec::new();
                    match channel_or_reply(&mut out, &e) {
                        Some(ch) => {
                            named.push((answers.len(), e, ch));
                            answers.push(None);
                        }
                        None => answers.push(out.pop()),
                    }
                }
                let channels: Vec<Channel> = named.iter().map(|(_, _, ch)| *ch).collect();
                match hub.begin_resume(conn, &channels) {
                    Ok((snap, added)) => {
                        for ((at, name, _), result) in named.iter().zip(added) {
                            answers[*at] = Some(subscribe_reply(name, result));
                        }
                        hub.replies(conn, answers.into_iter().flatten().collect());
                        hub.hold_answers_until_resumed(conn);
                        tokio::spawn(super::replay::replay(
                            self.ctx.clone(),
                            conn.clone(),
                            snap,
                            last_event_id,
                            epoch,
                        ));
                    }
                    Err(m) => {
                        hub.end_opening(conn);
                        hub.reply(conn, protocol::error("bad_request", m, None))
                    }
                }
            }
        }
    }
}

/// The channel a name denotes; otherwise adds the answer to `out`
/// (implicit channel: ack; unknown: error) and returns `None`.
fn channel_or_reply(out: &mut Vec<String>, event: &str) -> Option<Channel> {
    match Channel::parse(event) {
        Some(ch) => Some(ch),
        None if protocol::IMPLICIT.contains(&event) => {
            out.push(protocol::subscribed(event, true));
            None
        }
        None => {
            out.push(protocol::error(
                "unknown_channel",
                "channels are sales-data-<storeId>, all-stores, region-<name> (at most 100 \
                 characters; a name no store has counts against a table of 1,000 such names), \
                 stores, announcements, batch and admin",
                Some(event),
            ));
            None
        }
    }
}

fn subscribe_reply(event: &str, result: Result<bool, SubscribeError>) -> String {
    match result {
        Ok(_) => protocol::subscribed(event, false),
        Err(e @ SubscribeError::Forbidden(_)) => {
            protocol::error("forbidden", &e.to_string(), Some(event))
        }
        Err(e @ SubscribeError::TooMany(_)) => {
            protocol::error("too_many_subscriptions", &e.to_string(), Some(event))
        }
    }
}
