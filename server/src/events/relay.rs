//! The relay: one dedicated LISTEN connection per server instance (its own
//! connection, never one from the pool), reconnecting with backoff. On every
//! NOTIFY and on every (re)connect it reads `sales.events_since(last)` page by
//! page until nothing is left and hands each event, in order, to the hub.
//!
//! NOTIFY is only the wake-up call; the log is the truth. `events_since` only
//! returns events below the oldest running transaction, so an event can be
//! committed and notified yet held back by an unrelated open transaction. The
//! relay therefore remembers the ids it was notified of and polls again (5 ms,
//! doubling to 50 ms) until each has been read; with nothing pending it still
//! polls every second, which also covers a NOTIFY lost in a reconnect.

use super::model::{is_pruned, Ephemeral, Event, Pos, EPHEMERAL_CHANNEL, EVENTS_CHANNEL};
use crate::state::AppState;
use sqlx::postgres::{PgListener, PgPoolOptions};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const PAGE: i32 = 1000;
const IDLE_POLL: Duration = Duration::from_secs(1);
const PENDING_POLL_MIN: Duration = Duration::from_millis(5);
const PENDING_POLL_MAX: Duration = Duration::from_millis(50);
/// A notified id not seen after this long is forgotten (it cannot be read:
/// pruned, or the payload was not ours).
const PENDING_FORGET: Duration = Duration::from_secs(600);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Sets the hub's starting position to the head of the log: a new instance
/// relays what happens from now on (clients ask for older events with resume).
pub async fn init(state: &AppState) -> Result<Pos, sqlx::Error> {
    let head = Event::head(&state.pool).await?;
    state.hub.set_position(head);
    Ok(head)
}

pub struct Relay {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub fn spawn(state: Arc<AppState>) -> Relay {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(run(state, rx));
        Relay { stop, task }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

enum End {
    Stopped,
    Lost(String),
}

async fn run(state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
    let hub = &state.hub;
    let mut last = hub.position();
    let mut backoff = BACKOFF_MIN;
    let mut first = true;
    loop {
        if *stop.borrow() {
            return;
        }
        let connected = tokio::select! {
            _ = stop.changed() => return,
            r = connect(&state) => r,
        };
        let end = match connected {
            Ok(mut listener) => {
                if !first {
                    hub.relay.reconnects.fetch_add(1, Relaxed);
                }
                first = false;
                hub.relay.connected.store(true, Relaxed);
                tracing::info!(last_event_id = last.id, "event relay listening");
                let end = session(&state, &mut listener, &mut last, &mut stop, &mut backoff).await;
                hub.relay.connected.store(false, Relaxed);
                end
            }
            Err(e) => End::Lost(e.to_string()),
        };
        match end {
            End::Stopped => return,
            End::Lost(why) => {
                tracing::warn!(error = %why, retry_in_ms = backoff.as_millis() as u64, "event relay lost its connection");
                let jitter = Duration::from_millis(
                    rand::random::<u64>() % (backoff.as_millis() as u64 / 4 + 1),
                );
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(backoff + jitter) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

async fn connect(state: &AppState) -> Result<PgListener, sqlx::Error> {
    let opts = crate::db::connect_options(&state.config.database_url, &state.config)?
        .application_name("sales-server-relay");
    // A pool of one used only by the listener: the connection is its own,
    // outside the request pool, and reconnects go through our backoff.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(state.config.db_connection_timeout)
        .connect_with(opts)
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.eager_reconnect(false);
    listener.ignore_pool_close_event(true);
    listener
        .listen_all([EVENTS_CHANNEL, EPHEMERAL_CHANNEL])
        .await?;
    Ok(listener)
}

async fn session(
    state: &AppState,
    listener: &mut PgListener,
    last: &mut Pos,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> End {
    // Ids we were told about and have not read yet, with when we heard.
    let mut pending: BTreeMap<i64, Instant> = BTreeMap::new();
    let mut retry = PENDING_POLL_MIN;
    let mut read = true;
    loop {
        if read {
            match drain(state, listener, last, &mut pending).await {
                Ok(()) => *backoff = BACKOFF_MIN,
                Err(e) => return End::Lost(e.to_string()),
            }
            let now = Instant::now();
            pending.retain(|_, at| now.duration_since(*at) < PENDING_FORGET);
            retry = if pending.is_empty() {
                PENDING_POLL_MIN
            } else {
                retry
            };
        }
        let wait = if pending.is_empty() { IDLE_POLL } else { retry };
        read = tokio::select! {
            _ = stop.changed() => return End::Stopped,
            n = listener.try_recv() => match n {
                Ok(Some(n)) => {
                    let mut wake = on_notification(state, n.channel(), n.payload(), &mut pending);
                    // Take everything already buffered before reading the log once.
                    while let Some(n) = listener.next_buffered() {
                        wake |= on_notification(state, n.channel(), n.payload(), &mut pending);
                    }
                    if wake {
                        retry = PENDING_POLL_MIN;
                    }
                    wake
                }
                Ok(None) => return End::Lost("connection closed".into()),
                Err(e) => return End::Lost(e.to_string()),
            },
            _ = tokio::time::sleep(wait) => {
                if !pending.is_empty() {
                    retry = (retry * 2).min(PENDING_POLL_MAX);
                }
                true
            }
        };
    }
}

/// Returns true when the log should be read.
fn on_notification(
    state: &AppState,
    channel: &str,
    payload: &str,
    pending: &mut BTreeMap<i64, Instant>,
) -> bool {
    if channel == EPHEMERAL_CHANNEL {
        match Ephemeral::parse(payload) {
            Ok(e) => state.hub.dispatch_ephemeral(&e),
            Err(why) => tracing::warn!(%why, "ignoring a malformed sales_ephemeral notification"),
        }
        return false;
    }
    if let Ok(id) = payload.trim().parse::<i64>() {
        if id > 0 {
            pending.entry(id).or_insert_with(Instant::now);
        }
    }
    true
}

/// Reads and dispatches until the log has nothing more to give.
async fn drain(
    state: &AppState,
    listener: &mut PgListener,
    last: &mut Pos,
    pending: &mut BTreeMap<i64, Instant>,
) -> Result<(), sqlx::Error> {
    let hub = &state.hub;
    loop {
        let page = match Event::since(&mut *listener, last.id, PAGE).await {
            // Our last event was pruned (a quiet log older than the
            // retention): carry on from its position, which we know.
            Err(e) if is_pruned(&e) => Event::after_position(&mut *listener, *last, PAGE).await?,
            r => r?,
        };
        // The cache learns of every change (any instance, plain SQL) from
        // the same stream, before clients are told about it.
        let mut tags: Vec<String> = page
            .iter()
            .flat_map(|e| {
                crate::cache::tags_for_event(&e.kind_name, e.store_id, e.row_id, &e.payload)
            })
            .collect();
        tags.sort();
        tags.dedup();
        if !page.is_empty() {
            state.note_change(&mut *listener).await;
        }
        state.cache.invalidate(&tags).await;
        for e in &page {
            pending.remove(&e.id);
            if hub.dispatch(e) {
                // Some queue is filling: let the connection tasks drain
                // before the next event (never waits for any of them).
                tokio::task::yield_now().await;
            }
            *last = e.pos();
        }
        if page.len() < PAGE as usize {
            return Ok(());
        }
    }
}
