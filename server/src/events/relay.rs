//! The relay: reads the event log in delivery order and hands each event to
//! a [`Sink`] (the WebSocket hub), marking the cache tags it touches first.
//!
//! Two dedicated connections per server instance, never from the pool, each
//! reconnecting with backoff:
//!
//! - the reader long-polls `sales.events_after_seq(last seq, page, wait)`
//!   (what `sales.events_next` does after looking up an event id's seq; the
//!   relay knows the seq of its last event, so it skips that lookup and a
//!   pruned last event is no special case): Postgres answers as soon as an
//!   event-writing transaction of this database ends, with the events that
//!   are final (no running transaction can still add one before them), or
//!   with nothing after `wait` (then it simply asks again). No NOTIFY is
//!   needed, so a coalesced or lost NOTIFY cannot delay or lose anything,
//!   and a (re)connect catches up from the table.
//! - the listener LISTENs on `sales_ephemeral`: NOTIFY-only messages
//!   (export progress) that are never stored; and on `sales_access`: each
//!   user or session event announced as it commits (migration 0025), so
//!   that a revocation is applied at once even while an open transaction
//!   holds that event back in delivery order; and on `sales_cache`: an
//!   admin's cache clear on another instance (this one's in-process first
//!   level is dropped).
//!
//! Nothing waits on Redis or on a socket between reading a page and
//! dispatching it: cache invalidation is marked in process and applied in
//! the background ([`crate::cache::Invalidator`]), dispatch only queues.

use super::model::{Ephemeral, Event, Pos};
use super::rules;
use super::vocab::{ACCESS_CHANNEL, CACHE_CHANNEL, EPHEMERAL_CHANNEL};
use crate::cache::Invalidator;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{ConnectOptions, PgConnection};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const PAGE: i32 = 1000;
/// How long one `events_next` call waits for something to deliver.
const LONG_POLL_MS: i32 = 5000;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Low on purpose: one connection attempt a second per instance costs Postgres
/// nothing, and a longer pause (it doubles while Postgres is away) would
/// hold back every event for that long after Postgres is back.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Where relayed events go (the WebSocket hub implements it).
pub trait Sink: Send + Sync + 'static {
    /// Delivers one event; called in delivery order. True when some client
    /// queue is filling up (the relay then yields before the next event).
    fn deliver(&self, e: &Event) -> bool;
    fn ephemeral(&self, e: &Ephemeral);
    /// A user or session event announced on `sales_access` as it committed
    /// (a hint to read that user's access back; see `ws::revoke`).
    fn access(&self, _hint: &serde_json::Value) {}
    /// The listener is LISTENing again after a (re)connect: announcements
    /// sent while it was away were missed (every user's access is read
    /// back; see `ws::revoke`).
    fn announcements_missed(&self) {}
    /// Whether the listener is LISTENing.
    fn listening(&self, _up: bool) {}
    /// Whether the reader is connected.
    fn connected(&self, up: bool);
    fn reconnected(&self);
    /// The epoch of the log events are delivered from (see
    /// `Event::log_identity`).
    fn epoch(&self) -> Arc<str>;
    /// The log was replaced while the relay was away: it goes on from
    /// `head` of the log of `epoch`.
    fn log_replaced(&self, epoch: &str, head: Pos);
    /// The position of the last event delivered.
    fn position(&self) -> Pos;
}

/// What the relay needs, and nothing else.
pub struct Deps {
    pub connect: PgConnectOptions,
    pub connect_timeout: Duration,
    pub sink: Arc<dyn Sink>,
    pub invalidator: Invalidator,
    /// The primary's WAL position the replica must reach before a cached
    /// read may come from it (raised for every page; see `state::Replica`).
    pub lsn_floor: Option<Arc<AtomicU64>>,
}

/// Where a new instance starts: the head of the log. It relays what
/// happens from now on (clients ask for older events with resume).
pub async fn head(pool: &sqlx::PgPool) -> Result<Pos, sqlx::Error> {
    Event::head(&mut *pool.acquire().await?).await
}

pub struct Relay {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Relay {
    pub fn spawn(deps: Deps) -> Relay {
        let (stop, rx) = watch::channel(false);
        let deps = Arc::new(deps);
        let tasks = vec![
            tokio::spawn(read_loop(deps.clone(), rx.clone())),
            tokio::spawn(listen_loop(deps, rx)),
        ];
        Relay { stop, tasks }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Sleeps `backoff` plus jitter; false when asked to stop meanwhile.
async fn pause(backoff: &mut Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let jitter =
        Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 4 + 1));
    let go_on = tokio::select! {
        _ = stop.changed() => false,
        _ = tokio::time::sleep(*backoff + jitter) => true,
    };
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    go_on
}

async fn read_loop(deps: Arc<Deps>, mut stop: watch::Receiver<bool>) {
    let mut last = deps.sink.position();
    let mut backoff = BACKOFF_MIN;
    let mut first = true;
    loop {
        if *stop.borrow() {
            return;
        }
        let why = tokio::select! {
            _ = stop.changed() => return,
            r = read_session(&deps, &mut last, &mut first, &mut backoff) => r,
        };
        deps.sink.connected(false);
        tracing::warn!(error = %why, retry_in_ms = backoff.as_millis() as u64, "event relay lost its connection");
        if !pause(&mut backoff, &mut stop).await {
            return;
        }
    }
}

/// How the reader connects, from the server's connect options.
pub fn reader_options(connect: &PgConnectOptions) -> PgConnectOptions {
    connect
        .clone()
        .application_name("sales-server-relay")
        // Above the long poll: a wait is never cut short by the timeout.
        // A page's regions are looked up by the stores' key, whatever the
        // planner thinks of a small table (see `model::REGIONS_SQL`).
        .options([
            ("statement_timeout", format!("{}", LONG_POLL_MS as u64 * 3)),
            ("enable_seqscan", "off".to_string()),
        ])
        // A long poll that waits its whole time out is not a slow
        // statement: warn only past it (an idle server would otherwise log
        // one warning per poll).
        .log_slow_statements(
            log::LevelFilter::Warn,
            Duration::from_millis(LONG_POLL_MS as u64 + 1000),
        )
}

/// Reads until the connection fails; returns why.
async fn read_session(
    deps: &Deps,
    last: &mut Pos,
    first: &mut bool,
    backoff: &mut Duration,
) -> String {
    let connect = reader_options(&deps.connect);
    let mut conn = match tokio::time::timeout(deps.connect_timeout, connect.connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return e.to_string(),
        Err(_) => return "timed out connecting".into(),
    };
    if !std::mem::take(first) {
        deps.sink.reconnected();
    }
    // A log restored from a dump, recovered to an earlier point or a
    // standby promoted without the newest events: its ids and positions
    // are given again, so reading on after the last one relayed would skip
    // new events, and the cache holds rows that are no longer so.
    let (mut epoch, newest) = match Event::log_identity(&mut conn).await {
        Ok(x) => x,
        Err(e) => return e.to_string(),
    };
    if *epoch != *deps.sink.epoch() || newest < last.seq {
        if *epoch == *deps.sink.epoch() {
            // The newest events are gone under the same epoch (a copy of
            // the database put back without a recovery): the log is given
            // a new identity, so the ids given again are of another epoch
            // for every instance and every client. Only the first instance
            // to find it renews it (the identity it read is the one it
            // replaces).
            let renewed = sqlx::query(
                "UPDATE sales.event_log_identity SET epoch = gen_random_uuid()
                 WHERE epoch::text = split_part($1, '.', 1)",
            )
            .bind(&epoch)
            .execute(&mut conn)
            .await;
            if let Err(e) = renewed {
                tracing::warn!(error = %e, "could not give the event log a new epoch");
            }
            epoch = match Event::log_identity(&mut conn).await {
                Ok((e, _)) => e,
                Err(e) => return e.to_string(),
            };
        }
        let head = match Event::head(&mut conn).await {
            Ok(h) => h,
            Err(e) => return e.to_string(),
        };
        tracing::warn!(
            epoch = %epoch,
            was = %deps.sink.epoch(),
            newest_seq = newest,
            relayed_seq = last.seq,
            head = head.id,
            "the event log is not the one relayed before (restored, recovered to an earlier point, or a standby promoted): relaying from its head, every WebSocket client resumes, the cache is made stale"
        );
        deps.invalidator.set_log_epoch(&epoch);
        deps.invalidator
            .invalidate_soon(vec![crate::cache::TAG_ALL.to_string()]);
        *last = head;
        deps.sink.log_replaced(&epoch, head);
    }
    deps.sink.connected(true);
    tracing::info!(last_event_id = last.id, "event relay reading");
    loop {
        let page = match next_page(&mut conn, *last).await {
            Ok(p) => p,
            Err(e) => return e.to_string(),
        };
        *backoff = BACKOFF_MIN;
        if page.events.is_empty() {
            continue;
        }
        deliver(deps, &page).await;
        *last = page.events.last().map(Event::pos).unwrap_or(*last);
        // Let the connection tasks write before the next page is read.
        tokio::task::yield_now().await;
    }
}

struct Page {
    events: Vec<Event>,
    /// The primary's WAL position when the page was read.
    lsn: Option<u64>,
}

async fn deliver(deps: &Deps, page: &Page) {
    if let (Some(floor), Some(lsn)) = (&deps.lsn_floor, page.lsn) {
        floor.fetch_max(lsn, Ordering::Relaxed);
    }
    // Marked before any client hears of the change (see `Invalidator`).
    deps.invalidator.invalidate_soon_upto(
        rules::cache_tags(&page.events),
        page.events.last().map(|e| e.seq),
    );
    for e in &page.events {
        if deps.sink.deliver(e) {
            // Some queue is filling: let the connection tasks drain before
            // the next event (never waits for any of them).
            tokio::task::yield_now().await;
        }
    }
}

async fn next_page(conn: &mut PgConnection, last: Pos) -> Result<Page, sqlx::Error> {
    let (events, lsn) = Event::after_seq(&mut *conn, last, PAGE, LONG_POLL_MS).await?;
    Ok(Page { events, lsn })
}

async fn listen_loop(deps: Arc<Deps>, mut stop: watch::Receiver<bool>) {
    let mut backoff = BACKOFF_MIN;
    // Kept across reconnects: a copy sent again while the listener was
    // away is still one it relayed.
    let mut replays = super::sealed::Replays::default();
    loop {
        if *stop.borrow() {
            return;
        }
        let why = tokio::select! {
            _ = stop.changed() => return,
            r = listen_session(&deps, &mut backoff, &mut replays) => r,
        };
        deps.sink.listening(false);
        tracing::warn!(error = %why, retry_in_ms = backoff.as_millis() as u64, "ephemeral listener lost its connection");
        if !pause(&mut backoff, &mut stop).await {
            return;
        }
    }
}

async fn listen_session(
    deps: &Deps,
    backoff: &mut Duration,
    replays: &mut super::sealed::Replays,
) -> String {
    let opts = deps
        .connect
        .clone()
        .application_name("sales-server-ephemeral");
    // A pool of one used only by the listener: the connection is its own,
    // outside the request pool, and reconnects go through our backoff.
    let pool = match PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(deps.connect_timeout)
        .connect_with(opts)
        .await
    {
        Ok(p) => p,
        Err(e) => return e.to_string(),
    };
    let mut listener = match PgListener::connect_with(&pool).await {
        Ok(l) => l,
        Err(e) => return e.to_string(),
    };
    listener.eager_reconnect(false);
    listener.ignore_pool_close_event(true);
    if let Err(e) = listener
        .listen_all([EPHEMERAL_CHANNEL, ACCESS_CHANNEL, CACHE_CHANNEL])
        .await
    {
        return e.to_string();
    }
    *backoff = BACKOFF_MIN;
    deps.sink.listening(true);
    // What was NOTIFYed while nothing listened is lost: a cache clear made
    // through another instance (this first level is dropped) and access
    // announcements (every user's access is read back). At the first
    // session this covers what changed between the start-up load and now.
    deps.invalidator.drop_first_level();
    deps.sink.announcements_missed();
    loop {
        match listener.try_recv().await {
            Ok(Some(n)) if n.channel() == CACHE_CHANNEL => {
                // Sealed by the instance that cleared: one sent by hand
                // would otherwise let any role that can connect keep every
                // first level empty.
                let now = chrono::Utc::now().timestamp_millis();
                match replays.open(n.payload(), now) {
                    Ok(_) => {
                        // Refilled from the replica only once it has
                        // replayed what the clear was for.
                        if let Some(floor) = &deps.lsn_floor {
                            let lsn =
                                sqlx::query_scalar::<_, i64>(&crate::db::write::read_floor_sql())
                                    .fetch_one(&mut listener)
                                    .await;
                            match lsn {
                                Ok(v) => {
                                    floor.fetch_max(v as u64, Ordering::Relaxed);
                                }
                                Err(e) => return e.to_string(),
                            }
                        }
                        deps.invalidator.drop_first_level()
                    }
                    Err(why) => tracing::debug!(
                        why,
                        sender_pid = n.process_id(),
                        "ignoring a sales_cache notification"
                    ),
                }
            }
            Ok(Some(n)) if n.channel() == ACCESS_CHANNEL => {
                match serde_json::from_str::<serde_json::Value>(n.payload()) {
                    Ok(hint) => deps.sink.access(&hint),
                    Err(why) => tracing::debug!(
                        %why,
                        sender_pid = n.process_id(),
                        "ignoring a sales_access notification"
                    ),
                }
            }
            Ok(Some(n)) => {
                let now = chrono::Utc::now().timestamp_millis();
                match replays
                    .open(n.payload(), now)
                    .map_err(String::from)
                    .and_then(Ephemeral::parse)
                {
                    Ok(e) => deps.sink.ephemeral(&e),
                    Err(why) => tracing::warn!(
                        %why,
                        sender_pid = n.process_id(),
                        "ignoring a sales_ephemeral notification"
                    ),
                }
            }
            Ok(None) => return "connection closed".into(),
            Err(e) => return e.to_string(),
        }
    }
}
