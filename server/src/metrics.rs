//! Prometheus metrics (`GET /metrics`): request and query durations recorded
//! as they happen; pool, cache, WebSocket, relay and process figures read
//! at scrape time from the components that own them.

use crate::state::AppState;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
static SLOW_QUERY_MS: AtomicU64 = AtomicU64::new(500);

const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the global recorder once per process (several in-process
/// servers, as in tests, share it).
pub fn init(slow_query_ms: u64) -> Option<&'static PrometheusHandle> {
    SLOW_QUERY_MS.store(slow_query_ms, Ordering::Relaxed);
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), BUCKETS)
                .ok()?
                .install_recorder()
                .inspect(|handle| {
                    describe();
                    // Shown from the start (it is only moved by exports).
                    metrics::gauge!("exports_running").increment(0.0);
                    spawn_upkeep(handle.clone())
                })
                .map_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
                .ok()
        })
        .as_ref()
}

/// What each metric is: the exposition's `# HELP` lines.
const DESCRIPTIONS: &[(&str, &str)] = &[
    ("http_request_duration_seconds", "Time to answer an HTTP request, by method, route and status."),
    ("http_requests_total", "HTTP requests answered, by method, route and status."),
    ("db_query_duration_seconds", "Time of a database call, by statement name."),
    ("db_pool_connections", "Connections the primary's pool holds."),
    ("db_pool_idle_connections", "Idle connections in the primary's pool."),
    ("db_pool_max_connections", "Most connections the primary's pool may hold (DB_POOL_MAX)."),
    ("db_replica_up", "1 while the replica answers reads, 0 while they go to the primary."),
    ("db_replica_reads_total", "Reads answered by the replica."),
    ("db_replica_fallbacks_total", "Reads sent to the primary because the replica was down, did not follow this primary, or had not replayed far enough (lag)."),
    ("db_replica_pool_connections", "Connections the replica's pool holds."),
    ("cache_hits_total", "Cache lookups answered from the cache (either level)."),
    ("cache_misses_total", "Cache lookups answered from Postgres."),
    ("cache_errors_total", "Cache operations that failed (Redis errors and timeouts)."),
    ("cache_invalidations_total", "Tag invalidations (by events, writes and clears)."),
    ("cache_compression_saved_bytes_total", "Bytes compression saved on stored cache entries."),
    ("cache_healthy", "1 while Redis answers, 0 while reads bypass it."),
    ("websocket_connections", "Open WebSocket connections."),
    ("websocket_connections_by_role", "Open WebSocket connections, by the user's role."),
    ("websocket_subscriptions", "Channel subscriptions of open WebSocket connections."),
    ("websocket_messages_sent_total", "Messages queued to WebSocket clients."),
    ("websocket_messages_dropped_total", "Messages not delivered to a client whose queue was full."),
    ("websocket_closed_slow_total", "Connections closed because the client read too slowly."),
    ("websocket_closed_heartbeat_total", "Connections closed because the client stopped answering pings."),
    ("websocket_closed_revoked_total", "Connections closed because their user or session lost access."),
    ("events_relayed_total", "Events the relay read from the log and dispatched."),
    ("events_log_replaced_total", "Times the relay found, as it connected again, that the event log was replaced (a restore or a failover)."),
    ("events_relay_connected", "1 while the relay's reader connection is up."),
    ("events_listener_connected", "1 while the listener (access announcements, cache clears, export progress) is LISTENing."),
    ("events_relay_last_event_id", "Id of the last event this instance relayed."),
    ("events_relay_lag_events", "Events in the log past the last one this instance relayed, counted up to 10000 (10000: at least that many)."),
    ("events_delivery_held_back_max_seconds", "Longest time a running transaction has held event delivery back (over 1 s; NaN when unknown)."),
    ("events_delivery_holders", "Transactions holding event delivery back for more than 1 s (NaN when unknown)."),
    ("exports_running", "Exports streaming now."),
    ("exports_total", "Exports ended, by format, shape and status."),
    ("export_rows_total", "Rows written by exports, by format."),
    ("export_bytes_total", "Bytes sent by exports, by format."),
    ("import_chunk_retries_total", "Import chunks retried after a failure."),
    ("import_chunk_deadlock_retries_total", "Import chunks retried after a deadlock."),
    ("process_resident_memory_bytes", "Resident memory of the server process."),
    ("process_uptime_seconds", "Seconds since the server started."),
];

/// Registers [`DESCRIPTIONS`] with the recorder.
fn describe() {
    for &(name, help) in DESCRIPTIONS {
        if name.ends_with("_total") {
            metrics::describe_counter!(name, help);
        } else if name.ends_with("_duration_seconds") {
            metrics::describe_histogram!(name, help);
        } else {
            metrics::describe_gauge!(name, help);
        }
    }
}

/// Histogram samples wait in the recorder until they are folded into
/// buckets, which rendering does, and so a scrape. Without anyone scraping
/// `/metrics` they would pile up for ever (about 8 bytes a sample, a few
/// samples a request): fold them every few seconds.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(5));
            handle.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "metrics upkeep thread not started; histograms grow until scraped");
    }
}

/// One answered request. `route` is a label from a bounded set (see
/// `http::routes::Routes::label`): the document's template, not the path.
pub fn record_request(method: &str, route: &str, status: u16, started: Instant) {
    let labels = [
        ("method", method.to_string()),
        ("route", route.to_string()),
        ("status", status.to_string()),
    ];
    metrics::histogram!("http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("http_requests_total", &labels).increment(1);
}

/// Times a database call under a statement name; slow ones are logged.
pub async fn timed<T, F: std::future::Future<Output = T>>(statement: &'static str, fut: F) -> T {
    let started = Instant::now();
    let out = fut.await;
    let secs = started.elapsed().as_secs_f64();
    metrics::histogram!("db_query_duration_seconds", "statement" => statement).record(secs);
    let ms = secs * 1000.0;
    if ms >= SLOW_QUERY_MS.load(Ordering::Relaxed) as f64 {
        tracing::warn!(statement, duration_ms = ms, "slow query");
    }
    out
}

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn gauge(name: &'static str, v: f64) {
    metrics::gauge!(name).set(v);
}

/// Reads the components' current figures into gauges, then renders.
pub async fn render(state: &AppState) -> String {
    let Some(handle) = HANDLE.get().and_then(Option::as_ref) else {
        return "# metrics recorder unavailable\n".into();
    };
    let pool = &state.pool;
    gauge("db_pool_connections", pool.size() as f64);
    gauge("db_pool_idle_connections", pool.num_idle() as f64);
    gauge("db_pool_max_connections", state.config.db_pool_max as f64);

    if let Some(r) = &state.replica {
        gauge(
            "db_replica_up",
            if r.up.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            },
        );
        metrics::counter!("db_replica_reads_total").absolute(r.reads.load(Ordering::Relaxed));
        metrics::counter!("db_replica_fallbacks_total")
            .absolute(r.fallbacks.load(Ordering::Relaxed));
        gauge("db_replica_pool_connections", r.pool.size() as f64);
    }

    let c = state.cache.snapshot();
    metrics::counter!("cache_hits_total").absolute(c.hits);
    metrics::counter!("cache_misses_total").absolute(c.misses);
    metrics::counter!("cache_errors_total").absolute(c.errors);
    metrics::counter!("cache_invalidations_total").absolute(c.invalidations);
    metrics::counter!("cache_compression_saved_bytes_total").absolute(c.bytes_saved_by_compression);
    gauge("cache_healthy", if c.healthy { 1.0 } else { 0.0 });

    let ws = state.hub.stats();
    let n = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    gauge("websocket_connections", n(&ws["connections"]["total"]));
    if let Some(roles) = ws["connections"]["byRole"].as_object() {
        for (role, v) in roles {
            metrics::gauge!("websocket_connections_by_role", "role" => role.clone()).set(n(v));
        }
    }
    if let Some(chans) = ws["subscriptions"]["byChannel"].as_object() {
        // `+ 0.0`: the sum of nothing is -0.0, which the exposition showed.
        gauge(
            "websocket_subscriptions",
            chans.values().map(n).sum::<f64>() + 0.0,
        );
    }
    metrics::counter!("websocket_messages_sent_total").absolute(n(&ws["messages"]["sent"]) as u64);
    metrics::counter!("websocket_messages_dropped_total")
        .absolute(n(&ws["messages"]["dropped"]) as u64);
    metrics::counter!("websocket_closed_slow_total")
        .absolute(n(&ws["closed"]["slowConsumer"]) as u64);
    metrics::counter!("websocket_closed_heartbeat_total")
        .absolute(n(&ws["closed"]["heartbeat"]) as u64);
    metrics::counter!("websocket_closed_revoked_total")
        .absolute(n(&ws["closed"]["revoked"]) as u64);
    metrics::counter!("events_relayed_total")
        .absolute(state.hub.counters.events_relayed.load(Ordering::Relaxed));
    metrics::counter!("events_log_replaced_total")
        .absolute(state.hub.relay.log_replaced.load(Ordering::Relaxed));
    let relayed_to = state.hub.position();
    gauge(
        "events_relay_connected",
        if state.hub.relay.connected.load(Ordering::Relaxed) {
            1.0
        } else {
            0.0
        },
    );
    gauge(
        "events_listener_connected",
        if state.hub.relay.listening.load(Ordering::Relaxed) {
            1.0
        } else {
            0.0
        },
    );
    gauge("events_relay_last_event_id", relayed_to.id as f64);
    // Relay lag: events the log holds past what this instance has relayed,
    // counted up to RELAY_LAG_COUNTED, so that a scrape costs the same
    // however far behind the relay is (a full count of a large backlog is
    // what a scrape during an incident would pay).
    if let Ok(head) = relay_lag(pool, relayed_to.seq).await {
        gauge("events_relay_lag_events", head as f64);
    }
    let holders = held_back(pool).await;
    if let Some(rss) = rss_bytes() {
        gauge("process_resident_memory_bytes", rss as f64);
    }
    gauge(
        "process_uptime_seconds",
        state.started.elapsed().as_secs_f64(),
    );
    let mut out = handle.render();
    out.push_str(&holders);
    out
}

/// How many events past the relay's position `events_relay_lag_events`
/// counts at most.
pub const RELAY_LAG_COUNTED: i64 = 10_000;

/// Events in the log past the relay's position (its `seq`, the order the
/// relay delivers in: an event's id and its seq are taken one after the
/// other, so two writers' events can be ordered apart by the two, and an
/// event relayed with a higher id than the last one was counted as lag
/// until a later event came), counted up to [`RELAY_LAG_COUNTED`] (an
/// index range of at most that many entries).
pub async fn relay_lag(pool: &sqlx::PgPool, relayed_seq: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM sales.events WHERE seq > $1 LIMIT $2) behind",
    )
    .bind(relayed_seq)
    .bind(RELAY_LAG_COUNTED)
    .fetch_one(pool)
    .await
}

/// `events_delivery_held_back_seconds{pid, since, query_start}`: how long
/// each transaction holding event delivery back for more than a second (see
/// `events::holders`) has done so, rendered here for the holders of this
/// scrape only (through the registry, every holder and every statement of
/// one, by its `query_start`, stayed a series for good). Plus the oldest
/// age and the count, label-free, for alerts. When the holders cannot be
/// read, those two are NaN (unknown), not the last figures.
async fn held_back(pool: &sqlx::PgPool) -> String {
    let holders = match tokio::time::timeout(
        std::time::Duration::from_secs(2),
        crate::events::holders::list(pool),
    )
    .await
    {
        Ok(Ok(h)) => h,
        _ => {
            gauge("events_delivery_held_back_max_seconds", f64::NAN);
            gauge("events_delivery_holders", f64::NAN);
            return String::new();
        }
    };
    let mut out = String::new();
    if !holders.is_empty() {
        out.push_str(
            "# HELP events_delivery_held_back_seconds How long each transaction holding event delivery back (over 1 s) has done so.\n\
             # TYPE events_delivery_held_back_seconds gauge\n",
        );
    }
    for h in &holders {
        // Numbers and RFC 3339 times: nothing a label value must escape.
        let _ = writeln!(
            out,
            "events_delivery_held_back_seconds{{pid=\"{}\",since=\"{}\",query_start=\"{}\"}} {}",
            h.pid,
            h.since.to_rfc3339(),
            h.query_start.map(|t| t.to_rfc3339()).unwrap_or_default(),
            h.held_for_seconds
        );
    }
    let oldest = holders
        .iter()
        .map(|h| h.held_for_seconds)
        .fold(0.0, f64::max);
    gauge("events_delivery_held_back_max_seconds", oldest);
    gauge("events_delivery_holders", holders.len() as f64);
    out
}
