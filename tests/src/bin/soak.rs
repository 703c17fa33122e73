//! Soak test (`make soak`, `scripts/soak.sh`): a release server against its
//! own seeded database under a mixed load for a set duration, then a report.
//!
//! Load: readers (list with fields, get one, summary, a conditional GET that
//! may answer 304, a GET of a missing id that must answer 404), writers
//! (batches of upserts, new months created and deleted again), exporters
//! (CSV, daily shape, one store) and WebSockets held open the whole time,
//! spread over task groups that each run on their own thread and runtime,
//! each socket subscribed to one or two stores' sales events and resuming
//! from its last event id if it is ever dropped.
//!
//! Report: requests by kind with latencies, errors (any transport error or
//! unexpected status; the 304s and 404s asked for are not errors), WebSocket
//! messages and events received, events missing or duplicated at any socket,
//! event delivery lag, and the server's RSS sampled every few seconds.
//!
//! Fails (exit 1) on any error, any missing or duplicated event, a server
//! that does not exit cleanly on SIGTERM, or RSS in the last third of the run
//! (after warm-up) more than --max-rss-growth percent above the first third.
//!
//! Flags [defaults]: --seconds [300, or SOAK_SECONDS] --websockets [1000]
//! --groups [4] --readers [6] --writers [2] --exporters [1] --stores [50]
//! --months [24] --sample [5] (seconds between RSS samples) --warmup
//! [a fifth of --seconds] --max-rss-growth [10] (percent) --scrape [0]
//! (seconds between GETs of /metrics, as Prometheus would; 0: none)
//! --server [target/release/sales-server, or SOAK_SERVER_BIN]
//! --private-cluster (a Postgres 15 cluster of its own, made with initdb as
//! the postgres user, instead of a database on the DATABASE_URL cluster).
//!
//! Event delivery waits for older write transactions that are still running
//! (the relay reads below sales.events_horizon()), so the report also says
//! how long that horizon stood still, and which database held it.

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rand::{rngs::StdRng, Rng, SeedableRng};
use sales_e2e::fixtures::procfs;
use sales_e2e::private_pg::PrivatePg;
use sales_e2e::{redis_url, ServerProc, TestDb, TEST_JWT_SECRET};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

/// Soak test (see the header of tests/src/bin/soak.rs).
#[derive(Debug, Clone, Parser)]
struct Opts {
    #[arg(long, env = "SOAK_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,
    #[arg(long, default_value_t = 1000)]
    websockets: usize,
    /// Task groups, each on a thread and runtime of its own.
    #[arg(long, default_value_t = 4)]
    groups: usize,
    #[arg(long, default_value_t = 6)]
    readers: usize,
    #[arg(long, default_value_t = 2)]
    writers: usize,
    #[arg(long, default_value_t = 1)]
    exporters: usize,
    #[arg(long, default_value_t = 50)]
    stores: u32,
    #[arg(long, default_value_t = 24)]
    months: u32,
    /// Seconds between RSS samples.
    #[arg(long, default_value_t = 5)]
    sample: u64,
    /// Seconds of warm-up [a fifth of --seconds].
    #[arg(long)]
    warmup: Option<u64>,
    /// Percent the RSS of the last third may exceed the first third's.
    #[arg(long, default_value_t = 10.0)]
    max_rss_growth: f64,
    /// Seconds between scrapes of /metrics (0: never).
    #[arg(long, default_value_t = 0)]
    scrape: u64,
    /// Run against a Postgres cluster of its own (initdb in a temporary
    /// directory) instead of a database on the shared cluster.
    #[arg(long)]
    private_cluster: bool,
    /// The server binary [target/release/sales-server].
    #[arg(long, env = "SOAK_SERVER_BIN", default_value_os_t = release_server())]
    server: PathBuf,
}

fn release_server() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("release/sales-server")
}

fn opts() -> Result<Opts, String> {
    let mut o = Opts::parse();
    o.groups = o.groups.max(1);
    o.stores = o.stores.max(2);
    o.months = o.months.max(1);
    o.sample = o.sample.max(1);
    Ok(o)
}

/// A token for the soak's users, valid past the end of the run.
fn sign(user_id: i64, role: &str, stores: &[i64], seconds: u64) -> String {
    let exp = chrono::Utc::now().timestamp() + seconds as i64 + 3600;
    sales_e2e::fixtures::token::sign(TEST_JWT_SECRET, user_id, role, stores, exp)
}

/// Counters and latencies per kind of request.
#[derive(Default)]
struct KindStats {
    ok: u64,
    /// Deliberate non-2xx answers (304 to a conditional GET, 404 for a missing id).
    expected: u64,
    errors: u64,
    hist: Option<Histogram<u64>>,
    /// Extra volume: records written, rows or bytes exported.
    items: u64,
    bytes: u64,
}

#[derive(Default)]
struct Stats {
    kinds: Mutex<BTreeMap<&'static str, KindStats>>,
    error_samples: Mutex<Vec<String>>,
    errors: AtomicU64,
}

impl Stats {
    fn record(&self, kind: &'static str, started: Instant, outcome: Outcome) {
        let micros = started.elapsed().as_micros() as u64;
        let mut kinds = self.kinds.lock().unwrap();
        let k = kinds.entry(kind).or_default();
        let hist = k
            .hist
            .get_or_insert_with(|| Histogram::new_with_bounds(1, 600_000_000, 2).unwrap());
        let _ = hist.record(micros.max(1));
        match outcome {
            Outcome::Ok { items, bytes } => {
                k.ok += 1;
                k.items += items;
                k.bytes += bytes;
            }
            Outcome::Expected => k.expected += 1,
            Outcome::Error(e) => {
                k.errors += 1;
                drop(kinds);
                self.error(format!("{kind}: {e}"));
            }
        }
    }

    fn error(&self, what: String) {
        self.errors.fetch_add(1, Relaxed);
        let mut s = self.error_samples.lock().unwrap();
        if s.len() < 20 {
            eprintln!("soak error: {what}");
            s.push(what);
        }
    }
}

enum Outcome {
    Ok { items: u64, bytes: u64 },
    Expected,
    Error(String),
}

/// What the load needs to know about the data.
#[derive(Clone)]
struct World {
    base: String,
    stores: Vec<i64>,
    /// (year, month) pairs that hold data.
    months: Vec<(i32, i32)>,
    ids: Vec<i64>,
    /// Record ids by store (a manager asks for records of its stores).
    ids_by_store: HashMap<i64, Vec<i64>>,
    admin: String,
    /// (token, its stores) for managers.
    managers: Vec<(String, Vec<i64>)>,
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .build()
        .expect("http client")
}

async fn reader(w: World, stats: Arc<Stats>, stop: Arc<AtomicBool>, seed: u64) {
    let http = http_client();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut etags: HashMap<String, String> = HashMap::new();
    const FIELDS: &[&str] = &[
        "id,storeId,year,month,totalSales",
        "storeId,totalSales,totalCustomers,daysReported",
        "id,dailyData.1.sales,store.name",
        "storeId,year,month,version,updatedAt",
    ];
    while !stop.load(Relaxed) {
        let (token, scope) = if rng.gen_bool(0.7) {
            (&w.admin, None)
        } else {
            let (t, s) = &w.managers[rng.gen_range(0..w.managers.len())];
            (t, Some(s))
        };
        let store = match scope {
            Some(s) => s[rng.gen_range(0..s.len())],
            None => w.stores[rng.gen_range(0..w.stores.len())],
        };
        let (y, m) = w.months[rng.gen_range(0..w.months.len())];
        let pick = rng.gen_range(0..100);
        let (kind, path, expect): (&'static str, String, &[u16]) = match pick {
            0..=39 => {
                let filter = match rng.gen_range(0..3) {
                    0 => format!("storeId={store}"),
                    1 => format!("year={y}&month={m}"),
                    _ => format!("storeId={store}&year={y}"),
                };
                let fields = FIELDS[rng.gen_range(0..FIELDS.len())];
                let limit = [10, 50, 100, 200][rng.gen_range(0..4)];
                (
                    "list",
                    format!("/api/v2/sales?{filter}&fields={fields}&limit={limit}"),
                    &[200],
                )
            }
            40..=64 => {
                let pool = match scope {
                    Some(_) => w.ids_by_store.get(&store).unwrap_or(&w.ids),
                    None => &w.ids,
                };
                let id = pool[rng.gen_range(0..pool.len())];
                let path = if rng.gen_bool(0.5) {
                    format!("/api/v2/sales/{id}?fields=id,storeId,totalSales,dailyData")
                } else {
                    format!("/api/v2/sales/{id}")
                };
                // A manager may ask for a record outside their stores: 404 is the answer.
                (
                    "get",
                    path,
                    if scope.is_some() { &[200, 404] } else { &[200] },
                )
            }
            65..=84 => {
                let by = ["store", "region", "month"][rng.gen_range(0..3)];
                let filter = if rng.gen_bool(0.5) {
                    format!("&year={y}")
                } else {
                    String::new()
                };
                (
                    "summary",
                    format!("/api/v2/sales/summary?groupBy={by}{filter}"),
                    &[200],
                )
            }
            85..=94 => (
                "conditional",
                format!("/api/v2/sales?storeId={store}&year={y}&month={m}&fields=id,totalSales"),
                &[200, 304],
            ),
            _ => (
                "not-found",
                format!("/api/v2/sales/{}", i64::MAX - rng.gen_range(0..1000)),
                &[404],
            ),
        };
        let mut req = http.get(format!("{}{path}", w.base)).bearer_auth(token);
        let etag_key = format!("{token}{path}");
        if kind == "conditional" {
            if let Some(e) = etags.get(&etag_key) {
                req = req.header("if-none-match", e);
            }
        }
        let started = Instant::now();
        let outcome = match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                if let Some(e) = r.headers().get("etag").and_then(|v| v.to_str().ok()) {
                    if kind == "conditional" {
                        etags.insert(etag_key, e.to_string());
                    }
                }
                match r.bytes().await {
                    Ok(b) if expect.contains(&status) => {
                        if status == 200 {
                            Outcome::Ok {
                                items: 1,
                                bytes: b.len() as u64,
                            }
                        } else {
                            Outcome::Expected
                        }
                    }
                    Ok(b) => Outcome::Error(format!(
                        "{path}: {status} {}",
                        String::from_utf8_lossy(&b[..b.len().min(300)])
                    )),
                    Err(e) => Outcome::Error(format!("{path}: body: {e}")),
                }
            }
            Err(e) => Outcome::Error(format!("{path}: {e}")),
        };
        stats.record(kind, started, outcome);
        if etags.len() > 10_000 {
            etags.clear();
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(5..25))).await;
    }
}

fn day_data(rng: &mut StdRng, days: usize, in_month: u32) -> Value {
    let mut m = serde_json::Map::new();
    for _ in 0..days {
        let d = rng.gen_range(1..=in_month);
        m.insert(
            d.to_string(),
            json!({"sales": (rng.gen_range(10_000..500_000) as f64) / 100.0, "customers": rng.gen_range(1..400)}),
        );
    }
    Value::Object(m)
}

async fn writer(w: World, stats: Arc<Stats>, stop: Arc<AtomicBool>, n: usize) {
    let http = http_client();
    let mut rng = StdRng::seed_from_u64(1000 + n as u64);
    // New months go to a year of this writer's own, and are deleted again.
    let year = (w.months[0].0 - 1 - n as i32).max(2000);
    let mut created: Vec<(i64, i32)> = Vec::new();
    let mut k = 0u64;
    while !stop.load(Relaxed) {
        k += 1;
        let started = Instant::now();
        let (kind, req, records) = if k.is_multiple_of(10) && !created.is_empty() {
            let keys: Vec<Value> = created
                .drain(..)
                .map(|(s, m)| json!({"storeId": s, "year": year, "month": m}))
                .collect();
            let n = keys.len() as u64;
            (
                "delete",
                http.delete(format!("{}/api/v2/sales/batch", w.base))
                    .json(&json!({"keys": keys})),
                n,
            )
        } else {
            let mut recs = Vec::new();
            let mut seen = HashSet::new();
            for _ in 0..10 {
                let s = w.stores[rng.gen_range(0..w.stores.len())];
                let (y, m) = if k % 10 == 5 {
                    let m = rng.gen_range(1..=12);
                    if !created.contains(&(s, m)) {
                        created.push((s, m));
                    }
                    (year, m)
                } else {
                    w.months[rng.gen_range(0..w.months.len())]
                };
                if !seen.insert((s, y, m)) {
                    continue;
                }
                recs.push(json!({"storeId": s, "year": y, "month": m, "dailyData": day_data(&mut rng, 3, 28)}));
            }
            let n = recs.len() as u64;
            (
                "batch",
                http.post(format!("{}/api/v2/sales/batch", w.base))
                    .json(&json!({"salesDataArray": recs})),
                n,
            )
        };
        let outcome = match req.bearer_auth(&w.admin).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                if status == 200 && body["failed"].as_i64() == Some(0) {
                    Outcome::Ok {
                        items: records,
                        bytes: 0,
                    }
                } else {
                    Outcome::Error(format!("{status} {body}"))
                }
            }
            Err(e) => Outcome::Error(e.to_string()),
        };
        stats.record(kind, started, outcome);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..300))).await;
    }
}

async fn exporter(w: World, stats: Arc<Stats>, stop: Arc<AtomicBool>, n: usize) {
    let http = http_client();
    let mut rng = StdRng::seed_from_u64(2000 + n as u64);
    while !stop.load(Relaxed) {
        let store = w.stores[rng.gen_range(0..w.stores.len())];
        let path = format!("/api/v2/sales/export?format=csv&shape=daily&storeId={store}");
        let started = Instant::now();
        let outcome = match http
            .get(format!("{}{path}", w.base))
            .bearer_auth(&w.admin)
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => {
                let mut body = r.bytes_stream();
                let (mut bytes, mut lines, mut failed) = (0u64, 0u64, None);
                while let Some(chunk) = body.next().await {
                    match chunk {
                        Ok(c) => {
                            bytes += c.len() as u64;
                            lines += c.iter().filter(|b| **b == b'\n').count() as u64;
                        }
                        Err(e) => {
                            failed = Some(e.to_string());
                            break;
                        }
                    }
                }
                match failed {
                    Some(e) => Outcome::Error(format!("{path}: stream: {e}")),
                    // A header and at least one day per seeded month.
                    None if lines < 2 => Outcome::Error(format!("{path}: {lines} lines")),
                    None => Outcome::Ok {
                        items: lines - 1,
                        bytes,
                    },
                }
            }
            Ok(r) => {
                let st = r.status();
                Outcome::Error(format!(
                    "{path}: {st} {}",
                    r.text().await.unwrap_or_default()
                ))
            }
            Err(e) => Outcome::Error(format!("{path}: {e}")),
        };
        stats.record("export", started, outcome);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..1500))).await;
    }
}

/// The soak's database: on the shared cluster (DATABASE_URL), or alone in a
/// private cluster; dropped (or removed with its cluster) at the end.
struct Db {
    name: String,
    url: String,
    pool: sqlx::PgPool,
    _shared: Option<TestDb>,
    _private: Option<PrivatePg>,
}

impl Db {
    async fn shared() -> Db {
        let t = TestDb::new().await;
        Db {
            name: t.name.clone(),
            url: t.url.clone(),
            pool: t.pool.clone(),
            _shared: Some(t),
            _private: None,
        }
    }

    async fn private() -> Db {
        let pg = tokio::task::spawn_blocking(PrivatePg::start)
            .await
            .expect("initdb");
        let name = format!("pgs_soak_{}", std::process::id());
        let (url, pool) = pg.create_database(&name).await;
        Db {
            name,
            url,
            pool,
            _shared: None,
            _private: Some(pg),
        }
    }
}

/// One WebSocket's record, read by the main thread for the completeness check.
#[derive(Default)]
struct Socket {
    stores: Vec<i64>,
    /// The hub position at the first connection: every later event of its
    /// stores is owed to it.
    baseline: Option<i64>,
    ids: Vec<i64>,
}

#[derive(Default)]
struct WsStats {
    open: AtomicU64,
    connects: AtomicU64,
    reconnects: AtomicU64,
    messages: AtomicU64,
    events: AtomicU64,
    sales_events: AtomicU64,
    lag: Mutex<Option<Histogram<u64>>>,
    /// Worst lag per 10 s of the run.
    lag_windows: Mutex<BTreeMap<u64, u64>>,
    started: Option<Instant>,
}

async fn ws_client(
    addr: SocketAddr,
    token: String,
    me: Arc<Mutex<Socket>>,
    ws: Arc<WsStats>,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) {
    let url = format!("ws://{addr}/ws?token={token}");
    let channels: Vec<String> = me
        .lock()
        .unwrap()
        .stores
        .iter()
        .map(|s| format!("sales-data-{s}"))
        .collect();
    let mut last: Option<i64> = None;
    let mut first = true;
    let mut lags: Vec<u64> = Vec::new();
    while !*stop.borrow() {
        if !first {
            ws.reconnects.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        first = false;
        let socket = match tokio::time::timeout(
            Duration::from_secs(20),
            tokio_tungstenite::connect_async(&url),
        )
        .await
        {
            Ok(Ok((s, _))) => s,
            Ok(Err(e)) => {
                stats.error(format!("websocket connect: {e}"));
                continue;
            }
            Err(_) => {
                stats.error("websocket connect: timed out".into());
                continue;
            }
        };
        ws.connects.fetch_add(1, Relaxed);
        ws.open.fetch_add(1, Relaxed);
        let (mut tx, mut rx) = socket.split();
        let mut alive = true;
        while alive {
            let msg = tokio::select! {
                _ = stop.changed() => {
                    let _ = tx.send(Message::Close(None)).await;
                    let _ = tokio::time::timeout(Duration::from_secs(2), async { while let Some(Ok(_)) = rx.next().await {} }).await;
                    break;
                }
                m = rx.next() => m,
            };
            match msg {
                Some(Ok(Message::Text(t))) => {
                    ws.messages.fetch_add(1, Relaxed);
                    let v: Value = match serde_json::from_str(&t) {
                        Ok(v) => v,
                        Err(e) => {
                            stats.error(format!("websocket: bad frame {e}: {t}"));
                            continue;
                        }
                    };
                    match v["type"].as_str() {
                        Some("ready") => {
                            let at = v["lastEventId"].as_i64().unwrap_or(0);
                            let from = *last.get_or_insert(at);
                            me.lock().unwrap().baseline.get_or_insert(at);
                            // Subscribing inside the resume keeps events in delivery
                            // order, so the last id received is a safe resume point.
                            let resume =
                                json!({"type": "resume", "lastEventId": from, "events": channels});
                            alive = tx.send(Message::text(resume.to_string())).await.is_ok();
                        }
                        Some("error") => stats.error(format!("websocket error reply: {v}")),
                        Some(_) => {}
                        None => {
                            let Some(id) = v["id"].as_i64() else { continue };
                            ws.events.fetch_add(1, Relaxed);
                            last = Some(id);
                            if v["event"]
                                .as_str()
                                .is_some_and(|e| e.starts_with("sales-data-"))
                            {
                                ws.sales_events.fetch_add(1, Relaxed);
                                me.lock().unwrap().ids.push(id);
                            }
                            if let Some(ts) = v["ts"]
                                .as_str()
                                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                            {
                                let ms = (chrono::Utc::now() - ts.with_timezone(&chrono::Utc))
                                    .num_milliseconds();
                                lags.push(ms.max(0) as u64);
                                if let Some(t0) = ws.started {
                                    let win = t0.elapsed().as_secs() / 10;
                                    let mut w = ws.lag_windows.lock().unwrap();
                                    let e = w.entry(win).or_default();
                                    *e = (*e).max(ms.max(0) as u64);
                                }
                                if lags.len() >= 256 {
                                    flush_lags(&ws, &mut lags);
                                }
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    if !*stop.borrow() {
                        stats.error(format!("websocket closed by the server: {frame:?}"));
                    }
                    break;
                }
                None => {
                    if !*stop.borrow() {
                        stats.error("websocket ended without a close frame".into());
                    }
                    break;
                }
                Some(Err(e)) => {
                    if !*stop.borrow() {
                        stats.error(format!("websocket read: {e}"));
                    }
                    break;
                }
                Some(Ok(_)) => {}
            }
        }
        ws.open.fetch_sub(1, Relaxed);
    }
    flush_lags(&ws, &mut lags);
}

fn flush_lags(ws: &WsStats, lags: &mut Vec<u64>) {
    let mut h = ws.lag.lock().unwrap();
    let h = h.get_or_insert_with(|| Histogram::new_with_bounds(1, 3_600_000, 2).unwrap());
    for l in lags.drain(..) {
        let _ = h.record(l.max(1));
    }
}

fn pct(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Events each socket should have received and did not, and duplicates.
async fn completeness(pool: &sqlx::PgPool, sockets: &[Arc<Mutex<Socket>>]) -> (u64, u64, u64) {
    let rows: Vec<(i64, i64, Option<i64>, String)> =
        sqlx::query_as("SELECT id, seq, store_id, kind FROM sales.events")
            .fetch_all(pool)
            .await
            .expect("read the event log");
    let pos: HashMap<i64, (i64, i64)> = rows
        .iter()
        .map(|(id, seq, _, _)| (*id, (*seq, *id)))
        .collect();
    let mut by_store: HashMap<i64, Vec<(i64, i64)>> = HashMap::new();
    for (id, seq, store, kind) in &rows {
        if let (Some(s), true) = (store, kind.starts_with("sales-data-")) {
            by_store.entry(*s).or_default().push((*seq, *id));
        }
    }
    for v in by_store.values_mut() {
        v.sort_unstable();
    }
    let (mut owed, mut missing, mut dups) = (0u64, 0u64, 0u64);
    for s in sockets {
        let s = s.lock().unwrap();
        let Some(b) = s.baseline else { continue };
        let from = pos.get(&b).copied().unwrap_or((0, b));
        let got: HashSet<i64> = s.ids.iter().copied().collect();
        dups += (s.ids.len() - got.len()) as u64;
        for store in &s.stores {
            let evs = by_store.get(store).map(Vec::as_slice).unwrap_or(&[]);
            let start = evs.partition_point(|p| *p <= from);
            for (_, id) in &evs[start..] {
                owed += 1;
                if !got.contains(id) {
                    missing += 1;
                }
            }
        }
    }
    (owed, missing, dups)
}

fn main() -> ExitCode {
    let o = match opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(run(o)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(o: Opts) -> Result<bool, String> {
    if !o.server.exists() {
        return Err(format!(
            "{} is missing: build it first (cargo build --release -p sales-server)",
            o.server.display()
        ));
    }
    let warmup = o
        .warmup
        .unwrap_or(o.seconds / 5)
        .min(o.seconds.saturating_sub(3));
    println!(
        "soak: {} s ({} s warm-up), {} WebSockets in {} groups, {} readers, {} writers, {} exporters, server {}",
        o.seconds, warmup, o.websockets, o.groups, o.readers, o.writers, o.exporters, o.server.display()
    );

    // A database of its own, seeded by the server's own seed command.
    let db = if o.private_cluster {
        Db::private().await
    } else {
        Db::shared().await
    };
    println!(
        "database {} on {}",
        db.name,
        if o.private_cluster {
            "a private cluster"
        } else {
            "the shared cluster (DATABASE_URL)"
        }
    );
    let seeded = Command::new(&o.server)
        .args([
            "seed",
            "--stores",
            &o.stores.to_string(),
            "--months",
            &o.months.to_string(),
        ])
        .env("DATABASE_URL", &db.url)
        .env("JWT_SECRET", TEST_JWT_SECRET)
        .env("LOG_LEVEL", "warn")
        .output()
        .map_err(|e| e.to_string())?;
    if !seeded.status.success() {
        return Err(format!("seed: {}", String::from_utf8_lossy(&seeded.stderr)));
    }
    print!("{}", String::from_utf8_lossy(&seeded.stdout));
    let stores: Vec<i64> = sqlx::query_scalar("SELECT id FROM sales.stores ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .map_err(|e| e.to_string())?;
    let months: Vec<(i32, i32)> =
        sqlx::query_as("SELECT DISTINCT year, month FROM sales.monthly_sales ORDER BY 1, 2")
            .fetch_all(&db.pool)
            .await
            .map_err(|e| e.to_string())?;
    let rows: Vec<(i64, i64)> =
        sqlx::query_as("SELECT id, store_id FROM sales.monthly_sales ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .map_err(|e| e.to_string())?;
    let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let mut ids_by_store: HashMap<i64, Vec<i64>> = HashMap::new();
    for (id, store) in &rows {
        ids_by_store.entry(*store).or_default().push(*id);
    }
    let (admin_id, _) = sales_server::users::upsert_user(
        &db.pool,
        "soak-admin@example.test",
        "admin",
        &[],
        "soak-password-1",
    )
    .await
    .map_err(|e| e.to_string())?;

    let env: Vec<(&str, String)> = vec![
        ("DATABASE_URL", db.url.clone()),
        ("JWT_SECRET", TEST_JWT_SECRET.to_string()),
        ("REDIS_URL", redis_url()),
        ("CACHE_PREFIX", db.name.clone()),
        ("PORT", "0".into()),
        ("LOG_LEVEL", "warn".into()),
        ("LOG_FORMAT", "json".into()),
        ("RATE_LIMIT_PER_MINUTE", "10000000".into()),
    ];
    let mut server = ServerProc::start(&o.server, &env)?;
    println!(
        "server pid {} on {}, log {}",
        server.pid(),
        server.addr,
        server.log.display()
    );

    let managers: Vec<(String, Vec<i64>)> = (0..20)
        .map(|i| {
            let mine = vec![stores[i % stores.len()], stores[(i * 7 + 3) % stores.len()]];
            (sign(100_000 + i as i64, "manager", &mine, o.seconds), mine)
        })
        .collect();
    let world = World {
        base: format!("http://{}", server.addr),
        stores: stores.clone(),
        months,
        ids,
        ids_by_store,
        admin: sign(admin_id, "admin", &[], o.seconds),
        managers,
    };
    let stats = Arc::new(Stats::default());
    let started = Instant::now();
    let wss = Arc::new(WsStats {
        started: Some(started),
        ..Default::default()
    });

    // WebSockets first, spread over groups with a runtime (and thread) each.
    let (ws_stop_tx, ws_stop_rx) = watch::channel(false);
    let mut sockets: Vec<Arc<Mutex<Socket>>> = Vec::new();
    let mut groups = Vec::new();
    for g in 0..o.groups {
        let mut mine = Vec::new();
        for i in (g..o.websockets).step_by(o.groups) {
            let n = if i % 5 == 0 { 2 } else { 1 };
            let socket_stores: Vec<i64> = (0..n)
                .map(|k| stores[(i * 3 + k * 11) % stores.len()])
                .collect();
            let token = if i % 10 == 0 {
                sign(admin_id, "admin", &[], o.seconds)
            } else {
                sign(
                    200_000 + i as i64,
                    if i % 2 == 0 { "manager" } else { "staff" },
                    &socket_stores,
                    o.seconds,
                )
            };
            let s = Arc::new(Mutex::new(Socket {
                stores: socket_stores,
                ..Default::default()
            }));
            sockets.push(s.clone());
            mine.push((token, s));
        }
        let (addr, wss, stats, stop) =
            (server.addr, wss.clone(), stats.clone(), ws_stop_rx.clone());
        let ramp = Duration::from_secs_f64((o.websockets as f64 / 200.0).min(10.0));
        groups.push(
            std::thread::Builder::new()
                .name(format!("ws-group-{g}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async move {
                        let n = mine.len().max(1);
                        let mut tasks = Vec::new();
                        for (k, (token, s)) in mine.into_iter().enumerate() {
                            let (wss, stats, stop) = (wss.clone(), stats.clone(), stop.clone());
                            let delay = ramp.mul_f64(k as f64 / n as f64);
                            tasks.push(tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                ws_client(addr, token, s, wss, stats, stop).await
                            }));
                        }
                        for t in tasks {
                            let _ = t.await;
                        }
                    })
                })
                .map_err(|e| e.to_string())?,
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for i in 0..o.readers {
        load.push(tokio::spawn(reader(
            world.clone(),
            stats.clone(),
            stop.clone(),
            i as u64,
        )));
    }
    for i in 0..o.writers {
        load.push(tokio::spawn(writer(
            world.clone(),
            stats.clone(),
            stop.clone(),
            i,
        )));
    }
    for i in 0..o.exporters {
        load.push(tokio::spawn(exporter(
            world.clone(),
            stats.clone(),
            stop.clone(),
            i,
        )));
    }

    if o.scrape > 0 {
        let (w, stats, stop, every) = (world.clone(), stats.clone(), stop.clone(), o.scrape);
        load.push(tokio::spawn(async move {
            let http = http_client();
            while !stop.load(Relaxed) {
                tokio::time::sleep(Duration::from_secs(every)).await;
                let started = Instant::now();
                let outcome = match http.get(format!("{}/metrics", w.base)).send().await {
                    Ok(r) if r.status() == 200 => match r.bytes().await {
                        Ok(b) => Outcome::Ok {
                            items: 1,
                            bytes: b.len() as u64,
                        },
                        Err(e) => Outcome::Error(format!("/metrics: {e}")),
                    },
                    Ok(r) => Outcome::Error(format!("/metrics: {}", r.status())),
                    Err(e) => Outcome::Error(format!("/metrics: {e}")),
                };
                stats.record("metrics", started, outcome);
            }
        }));
    }
    // How long the event delivery horizon stood still: the relay delivers
    // only events of transactions below it (sales.events_horizon(): the
    // oldest transaction that may still write to this database; the
    // cluster's xmin with older extensions), so a long write transaction
    // delays every event for as long as it runs.
    let xmin_hold = Arc::new(Mutex::new((0.0f64, String::new())));
    {
        let (pool, stop, hold) = (db.pool.clone(), stop.clone(), xmin_hold.clone());
        load.push(tokio::spawn(async move {
            let per_db: bool =
                sqlx::query_scalar("SELECT to_regproc('sales.events_horizon') IS NOT NULL")
                    .fetch_one(&pool)
                    .await
                    .unwrap_or(false);
            let horizon_sql = if per_db {
                "SELECT sales.events_horizon()::text"
            } else {
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text"
            };
            let mut since: Option<(String, Instant)> = None;
            while !stop.load(Relaxed) {
                let xmin: Option<String> =
                    sqlx::query_scalar(horizon_sql).fetch_one(&pool).await.ok();
                let (Some(xmin), Ok(running)) = (
                    xmin,
                    // Holders' databases, where this role may see them.
                    sqlx::query_scalar::<_, i64>(
                        "SELECT count(*) FROM pg_stat_activity WHERE backend_xid IS NOT NULL",
                    )
                    .fetch_one(&pool)
                    .await,
                ) else {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                };
                match &since {
                    Some((x, at)) if *x == xmin => {
                        let held = at.elapsed().as_secs_f64();
                        let record = running > 0 && held > hold.lock().unwrap().0;
                        if record {
                            let who: Vec<String> = sqlx::query_scalar(
                                "SELECT DISTINCT coalesce(datname, '?') FROM pg_stat_activity
                                 WHERE backend_xid::text = (($1::text)::bigint % 4294967296)::text",
                            )
                            .bind(&xmin)
                            .fetch_all(&pool)
                            .await
                            .unwrap_or_default();
                            let who = if who.is_empty() {
                                "? (not visible to this role)".into()
                            } else {
                                who.join(", ")
                            };
                            *hold.lock().unwrap() = (held, who);
                        }
                    }
                    _ => since = Some((xmin, Instant::now())),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }));
    }

    // Sample RSS while the load runs.
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let end = started + Duration::from_secs(o.seconds);
    let mut next = started;
    let mut last_print = started;
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next {
            if let Some(rss) = procfs::rss_kb(server.pid()).map(|kb| kb as f64 / 1024.0) {
                samples.push(((now - started).as_secs_f64(), rss));
            }
            next += Duration::from_secs(o.sample);
        }
        if now.duration_since(last_print) >= Duration::from_secs(30) {
            last_print = now;
            let reqs: u64 = stats
                .kinds
                .lock()
                .unwrap()
                .values()
                .map(|k| k.ok + k.expected + k.errors)
                .sum();
            println!(
                "  t={:>4.0}s rss={:.1} MiB requests={reqs} websockets open={} messages={} errors={}",
                (now - started).as_secs_f64(),
                samples.last().map(|s| s.1).unwrap_or(0.0),
                wss.open.load(Relaxed),
                wss.messages.load(Relaxed),
                stats.errors.load(Relaxed)
            );
        }
        if let Ok(Some(st)) = server.child.try_wait() {
            return Err(format!("the server exited during the soak: {st}"));
        }
        tokio::time::sleep(
            Duration::from_millis(200).min(end.saturating_duration_since(Instant::now())),
        )
        .await;
    }
    let ws_open_at_end = wss.open.load(Relaxed);
    let server_ws: Value = match reqwest::Client::new()
        .get(format!("{}/api/admin/websocket/stats", world.base))
        .bearer_auth(&world.admin)
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let open_files = procfs::open_files(server.pid());
    stop.store(true, Relaxed);
    for t in load {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();

    // Every socket must get every event of its stores: wait for the tail.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (owed, missing, dups) = loop {
        let r = completeness(&db.pool, &sockets).await;
        if r.1 == 0 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let _ = ws_stop_tx.send(true);
    for g in groups {
        let _ = tokio::task::spawn_blocking(move || g.join()).await;
    }

    // A clean exit on SIGTERM.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(server.pid().to_string())
        .status();
    let exit_deadline = Instant::now() + Duration::from_secs(40);
    let exit = loop {
        if let Ok(Some(st)) = server.child.try_wait() {
            break Some(st);
        }
        if Instant::now() > exit_deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    let warn_lines = log
        .lines()
        .filter(|l| l.contains("\"WARN\"") || l.contains(" WARN "))
        .count();
    let error_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"ERROR\"") || l.contains(" ERROR "))
        .collect();

    // The report.
    let mut pass = true;
    println!("\n=== soak report ({elapsed:.0} s) ===");
    println!("requests (ok / deliberate non-2xx / errors; latency p50 / p99 / max ms; volume):");
    let kinds = stats.kinds.lock().unwrap();
    let mut total = 0;
    for (kind, k) in kinds.iter() {
        let h = k.hist.as_ref().unwrap();
        total += k.ok + k.expected + k.errors;
        let volume = match *kind {
            "batch" => format!("{} records upserted", k.items),
            "delete" => format!("{} records deleted", k.items),
            "export" => format!("{} rows, {:.1} MiB", k.items, k.bytes as f64 / 1048576.0),
            _ => format!("{:.1} MiB", k.bytes as f64 / 1048576.0),
        };
        println!(
            "  {kind:<12} {:>7} / {:>5} / {:>3}   {:>7.1} / {:>7.1} / {:>8.1}   {volume}",
            k.ok,
            k.expected,
            k.errors,
            pct(h, 0.5),
            pct(h, 0.99),
            h.max() as f64 / 1000.0
        );
    }
    println!(
        "  total        {total} requests, {:.0}/s",
        total as f64 / elapsed
    );
    drop(kinds);
    let lag = wss.lag.lock().unwrap();
    println!(
        "websockets: {} sockets, {} open at the end (server counted {}), {} connections, {} reconnects",
        o.websockets,
        ws_open_at_end,
        server_ws["connections"]["total"].as_u64().map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
        wss.connects.load(Relaxed),
        wss.reconnects.load(Relaxed)
    );
    println!(
        "  messages received {}, events {}, sales events {}; owed {owed}, missing {missing}, duplicates {dups}",
        wss.messages.load(Relaxed),
        wss.events.load(Relaxed),
        wss.sales_events.load(Relaxed)
    );
    println!(
        "  server: {} messages sent, {} dropped, {} slow-consumer closes, {} resumes",
        server_ws["messages"]["sent"],
        server_ws["messages"]["dropped"],
        server_ws["closed"]["slowConsumer"],
        server_ws["resumes"]
    );
    if let Some(h) = lag.as_ref() {
        println!(
            "  event lag (ts to receipt) p50 {} ms, p99 {} ms, max {} ms",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max()
        );
        let windows: Vec<String> = wss
            .lag_windows
            .lock()
            .unwrap()
            .iter()
            .map(|(w, ms)| format!("{}s:{ms}", w * 10))
            .collect();
        println!("  worst lag per 10 s (ms): {}", windows.join(" "));
    }
    drop(lag);
    let (hold, who) = xmin_hold.lock().unwrap().clone();
    if hold > 0.0 {
        println!(
            "  the event delivery horizon stood still for up to {hold:.1} s (held by a transaction in database {who})"
        );
    }
    println!(
        "server: {open_files} open files at the end, {warn_lines} warning and {} error log lines",
        error_lines.len()
    );
    for l in error_lines.iter().take(5) {
        println!("  {l}");
    }
    let rss: Vec<String> = samples
        .iter()
        .map(|(t, r)| format!("{t:.0}s:{r:.1}"))
        .collect();
    println!("rss MiB every {} s: {}", o.sample, rss.join(" "));
    let after: Vec<f64> = samples
        .iter()
        .filter(|(t, _)| *t >= warmup as f64)
        .map(|s| s.1)
        .collect();
    let third = after.len() / 3;
    if third >= 1 {
        let first = mean(&after[..third]);
        let last = mean(&after[after.len() - third..]);
        let growth = (last / first - 1.0) * 100.0;
        let peak = samples.iter().map(|s| s.1).fold(0.0, f64::max);
        println!(
            "rss after warm-up: first third {first:.1} MiB, last third {last:.1} MiB, growth {growth:+.1}% (limit {:.0}%), peak {peak:.1} MiB",
            o.max_rss_growth
        );
        if growth > o.max_rss_growth {
            println!(
                "FAIL: memory grew {growth:.1}% (over {:.0}%)",
                o.max_rss_growth
            );
            pass = false;
        }
    } else {
        println!("FAIL: too few RSS samples after warm-up ({})", after.len());
        pass = false;
    }
    let errors = stats.errors.load(Relaxed);
    println!("errors: {errors}");
    for e in stats.error_samples.lock().unwrap().iter() {
        println!("  {e}");
    }
    if errors > 0 {
        println!("FAIL: {errors} errors");
        pass = false;
    }
    if missing > 0 || dups > 0 {
        println!("FAIL: {missing} events missing, {dups} duplicated");
        pass = false;
    }
    if owed == 0 {
        println!("FAIL: no events were owed to any socket (did the writers run?)");
        pass = false;
    }
    if ws_open_at_end < o.websockets as u64 {
        println!(
            "FAIL: only {ws_open_at_end} of {} WebSockets open at the end",
            o.websockets
        );
        pass = false;
    }
    match exit {
        Some(st) if st.success() => println!("server exited cleanly on SIGTERM"),
        Some(st) => {
            println!("FAIL: server exit status {st} after SIGTERM");
            pass = false;
        }
        None => {
            println!("FAIL: server still running 40 s after SIGTERM");
            pass = false;
        }
    }
    println!("{}", if pass { "PASS" } else { "FAIL" });
    if pass {
        let _ = std::fs::remove_file(&server.log);
    } else {
        println!("server log kept at {}", server.log.display());
    }
    drop(server);
    drop(db);
    Ok(pass)
}
