//! WebSocket fan-out benchmark (issue 5, "Benchmark"): connections held,
//! server memory per idle connection, messages/s delivered, and latency from
//! the write to each client's receipt (p50 / p99), for N clients spread over
//! S stores.
//!
//! `bench_ws run` is the coordinator. It starts `bench_ws clients` processes
//! (at most --per-proc clients each, each process from its own loopback
//! source address), reads the server's VmRSS before and after they connect,
//! then drives writes through the REST batch endpoint
//! (`POST /api/v2/sales/batch`, one record per store per batch, so one batch
//! fans out to every client once). Latency is the receipt time minus the
//! event's `ts` (the writing transaction's start, `created_at`), measured on
//! the same machine clock. Phase 1 writes at a fixed rate; phase 2 writes as
//! fast as --writers concurrent writers can (saturation).
//!
//! The probe phase (issue 12): one one-record batch every --probe-ms [300]
//! ms, to the stores in turn, so each write reaches the clients of one
//! store; its latency runs from sending the write to each client's receipt
//! (the record's day-1 sales carry the send time in microseconds, which the
//! event's `totalSales` echoes). The probe replaces the fixed-rate phase
//! unless --probe-ms 0.
//!
//! Run with `scripts/bench_ws.sh`, which starts a release server per size.
//! Flags of `run` (defaults in brackets): --url [http://127.0.0.1:3101]
//! --server-pid (required) --clients [1000] --stores [10] --per-proc [4000]
//! --rate [4] batches/s --seconds [10] --saturate-seconds [10] --writers [4]
//! Environment: DATABASE_URL (store ids), JWT_SECRET (tokens).

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use sales_e2e::fixtures::procfs;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// WebSocket fan-out benchmark (see the header of tests/src/bin/bench_ws.rs).
#[derive(Parser)]
enum Cmd {
    /// The coordinator: starts client processes, drives writes, reports.
    Run(RunArgs),
    /// A client process (started by `run`): holds connections, records latencies.
    Clients(ClientArgs),
}

#[derive(clap::Args)]
struct ClientArgs {
    #[arg(long, default_value = "ws://127.0.0.1:3101/ws")]
    url: String,
    #[arg(long, default_value_t = 1000)]
    count: usize,
    #[arg(long, default_value_t = 1_000_000)]
    first_user: i64,
    /// Store ids, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    stores: Vec<i64>,
    /// The loopback address to connect from.
    #[arg(long, default_value = "127.0.0.1")]
    source_ip: std::net::Ipv4Addr,
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long, default_value = "http://127.0.0.1:3101")]
    url: String,
    /// The server's process id (for its RSS and CPU time).
    #[arg(long)]
    server_pid: u32,
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    #[arg(long, default_value_t = 10)]
    stores: usize,
    /// Clients per client process.
    #[arg(long, default_value_t = 4000)]
    per_proc: usize,
    /// Batches per second of the fixed-rate phase (run with the probe only when given).
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 10)]
    saturate_seconds: u64,
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Milliseconds between probe writes (0: no probe phase).
    #[arg(long, default_value_t = 300)]
    probe_ms: u64,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn sign(user: i64, role: &str, stores: &[i64]) -> String {
    let secret = std::env::var("JWT_SECRET").expect("JWT_SECRET");
    let exp = chrono::Utc::now().timestamp() + 86400;
    sales_e2e::fixtures::token::sign(&secret, user, role, stores, exp)
}

fn main() {
    match Cmd::parse() {
        Cmd::Clients(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(clients(args));
        }
        Cmd::Run(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(run(args));
        }
    }
}

// ---------------------------------------------------------------------------
// Client process
// ---------------------------------------------------------------------------

struct Shared {
    hist: Mutex<Histogram<u64>>,
    received: AtomicU64,
    closed: AtomicU64,
    first_us: AtomicU64,
    last_us: AtomicU64,
    recording: AtomicBool,
}

/// Probe records are written to this year; their day-1 sales are the
/// time the write was sent, in microseconds modulo [`PROBE_MODULUS`] (sales
/// stay below 1e12).
const PROBE_YEAR: i64 = 2031;
const PROBE_MODULUS: u64 = 100_000_000_000;

/// When the write behind an event frame started: the send time for a probe
/// write, else the event's `ts` (the writing transaction's start), as
/// microseconds since the epoch.
fn event_ts_us(frame: &str) -> Option<u64> {
    if !frame.starts_with("{\"id\":") {
        return None;
    }
    if frame.contains(&format!("\"year\":{PROBE_YEAR}")) {
        let at = frame.find("\"totalSales\":")? + 13;
        let end = at + frame[at..].find([',', '}'])?;
        let v = frame[at..end].parse::<f64>().ok()? as u64;
        let now = now_us();
        let t = now - now % PROBE_MODULUS + v;
        return Some(if t > now { t - PROBE_MODULUS } else { t });
    }
    let at = frame.rfind("\"ts\":\"")? + 6;
    let end = at + frame[at..].find('"')?;
    let t = chrono::DateTime::parse_from_rfc3339(&frame[at..end]).ok()?;
    Some(t.timestamp_micros() as u64)
}

async fn clients(args: ClientArgs) {
    let url = args.url;
    let count = args.count;
    let first_user = args.first_user;
    let stores = args.stores;
    let source = args.source_ip;
    let concurrency = args.connect_concurrency;
    let server: std::net::SocketAddr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .expect("--url must be ws://ip:port/ws");

    let shared = Arc::new(Shared {
        hist: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3).unwrap()),
        received: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        first_us: AtomicU64::new(u64::MAX),
        last_us: AtomicU64::new(0),
        recording: AtomicBool::new(true),
    });
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let failed = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::with_capacity(count);
    for i in 0..count {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let store = stores[i % stores.len()];
        let token = sign(first_user + i as i64, "staff", &[store]);
        let (url, shared, failed) = (url.clone(), shared.clone(), failed.clone());
        handles.push(tokio::spawn(async move {
            let connected = async {
                let sock = tokio::net::TcpSocket::new_v4().ok()?;
                sock.bind((source, 0).into()).ok()?;
                let stream = sock.connect(server).await.ok()?;
                stream.set_nodelay(true).ok()?;
                let (mut ws, _) = tokio_tungstenite::client_async_with_config(
                    format!("{url}?token={token}"),
                    stream,
                    Some(config),
                )
                .await
                .ok()?;
                ws.send(Message::text(
                    json!({"type": "subscribe", "event": format!("sales-data-{store}")})
                        .to_string(),
                ))
                .await
                .ok()?;
                loop {
                    match ws.next().await? {
                        Ok(Message::Text(t)) if t.as_str().contains("\"subscribed\"") => break,
                        Ok(Message::Text(t)) if t.as_str().contains("\"error\"") => return None,
                        Ok(_) => {}
                        Err(_) => return None,
                    }
                }
                Some(ws)
            };
            let ws = tokio::time::timeout(Duration::from_secs(60), connected)
                .await
                .ok()
                .flatten();
            drop(permit);
            let Some(mut ws) = ws else {
                failed.fetch_add(1, Relaxed);
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if let Message::Text(t) = msg {
                    if let Some(ts) = event_ts_us(t.as_str()) {
                        if shared.recording.load(Relaxed) {
                            let now = now_us();
                            shared
                                .hist
                                .lock()
                                .unwrap()
                                .saturating_record(now.saturating_sub(ts).max(1));
                            shared.received.fetch_add(1, Relaxed);
                            shared.first_us.fetch_min(now, Relaxed);
                            shared.last_us.fetch_max(now, Relaxed);
                        }
                    }
                }
            }
            shared.closed.fetch_add(1, Relaxed);
        }));
    }
    // Wait until every client has subscribed (or failed).
    let _ = sem.acquire_many(concurrency as u32).await.unwrap();
    let mut out = tokio::io::stdout();
    let line =
        json!({"connected": count as u64 - failed.load(Relaxed), "failed": failed.load(Relaxed)});
    out.write_all(format!("{line}\n").as_bytes()).await.unwrap();
    out.flush().await.unwrap();

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(cmd)) = lines.next_line().await {
        match cmd.trim() {
            "reset" => {
                shared.hist.lock().unwrap().reset();
                shared.received.store(0, Relaxed);
                shared.first_us.store(u64::MAX, Relaxed);
                shared.last_us.store(0, Relaxed);
                shared.recording.store(true, Relaxed);
                out.write_all(b"{\"reset\":true}\n").await.unwrap();
            }
            "report" => {
                let mut buf = Vec::new();
                V2Serializer::new()
                    .serialize(&*shared.hist.lock().unwrap(), &mut buf)
                    .unwrap();
                use base64::Engine;
                let line = json!({
                    "received": shared.received.load(Relaxed),
                    "closed": shared.closed.load(Relaxed),
                    "open": count as u64 - failed.load(Relaxed) - shared.closed.load(Relaxed),
                    "first_us": shared.first_us.load(Relaxed),
                    "last_us": shared.last_us.load(Relaxed),
                    "hist": base64::engine::general_purpose::STANDARD.encode(&buf),
                });
                out.write_all(format!("{line}\n").as_bytes()).await.unwrap();
            }
            "quit" => break,
            _ => {}
        }
        out.flush().await.unwrap();
    }
    for h in handles {
        h.abort();
    }
}

// ---------------------------------------------------------------------------
// Coordinator
// ---------------------------------------------------------------------------

struct Child {
    proc: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Child {
    async fn ask(&mut self, cmd: &str) -> Value {
        self.stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
        let line = self
            .lines
            .next_line()
            .await
            .unwrap()
            .expect("client process answered");
        serde_json::from_str(&line).unwrap()
    }
}

fn rss_kb(pid: u32) -> u64 {
    procfs::rss_kb(pid).expect("server /proc status")
}

/// CPU time (user + system) of a process so far, in milliseconds.
fn cpu_ms(pid: u32) -> f64 {
    procfs::cpu_time(pid).as_secs_f64() * 1000.0
}

struct Cpu {
    server: f64,
    clients: f64,
}

fn cpu_now(server: u32, children: &[Child]) -> Cpu {
    Cpu {
        server: cpu_ms(server),
        clients: children
            .iter()
            .filter_map(|c| c.proc.id())
            .map(cpu_ms)
            .sum(),
    }
}

fn report_cpu(before: &Cpu, after: &Cpu, messages: u64) {
    let n = messages.max(1) as f64;
    println!(
        "    CPU: server {:.0} ms ({:.2} us per message delivered), client processes {:.0} ms ({:.2} us per message)",
        after.server - before.server,
        (after.server - before.server) * 1000.0 / n,
        after.clients - before.clients,
        (after.clients - before.clients) * 1000.0 / n,
    );
}

struct Phase {
    received: u64,
    hist: Histogram<u64>,
    first_us: u64,
    last_us: u64,
    open: u64,
}

async fn collect(children: &mut [Child]) -> Phase {
    let mut p = Phase {
        received: 0,
        hist: Histogram::new_with_bounds(1, 120_000_000, 3).unwrap(),
        first_us: u64::MAX,
        last_us: 0,
        open: 0,
    };
    for c in children.iter_mut() {
        let r = c.ask("report").await;
        p.received += r["received"].as_u64().unwrap();
        p.open += r["open"].as_u64().unwrap();
        p.first_us = p.first_us.min(r["first_us"].as_u64().unwrap());
        p.last_us = p.last_us.max(r["last_us"].as_u64().unwrap());
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(r["hist"].as_str().unwrap())
            .unwrap();
        let h: Histogram<u64> = Deserializer::new().deserialize(&mut &bytes[..]).unwrap();
        p.hist.add(h).unwrap();
    }
    p
}

/// Waits until the clients have received `expected` messages or nothing new
/// arrived for `quiet`.
async fn settle(children: &mut [Child], expected: u64, quiet: Duration) -> Phase {
    let mut last = 0;
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let p = collect(children).await;
        if p.received >= expected {
            return p;
        }
        if p.received != last {
            last = p.received;
            since = Instant::now();
        } else if since.elapsed() > quiet {
            return p;
        }
    }
}

struct Writer {
    http: reqwest::Client,
    url: String,
    token: String,
    stores: Vec<i64>,
    counter: AtomicU64,
    /// HTTP round trip of each batch, in microseconds.
    round_trips: Mutex<Histogram<u64>>,
}

impl Writer {
    /// One probe: one record of one store, stamped with the send time.
    async fn probe(&self, store: i64) -> bool {
        let sent = now_us() % PROBE_MODULUS;
        let record = json!({"storeId": store, "year": PROBE_YEAR, "month": 1,
                            "dailyData": {"1": {"sales": sent, "customers": 1}}});
        self.post("probe", vec![record]).await
    }

    /// One batch: one changed record per store, so one event per store.
    async fn write(&self) -> bool {
        let n = self.counter.fetch_add(1, Relaxed);
        let month = 1 + (n % 12) as i64;
        let day = 1 + ((n / 12) % 28);
        let records: Vec<Value> = self
            .stores
            .iter()
            .map(|s| {
                json!({"storeId": s, "year": 2030, "month": month,
                       "dailyData": {day.to_string(): {"sales": 1000 + n, "customers": 1 + n % 50}}})
            })
            .collect();
        self.post("batch", records).await
    }

    /// Posts one batch, recording its round trip; false when it failed.
    async fn post(&self, what: &str, records: Vec<Value>) -> bool {
        let started = Instant::now();
        let result = self
            .http
            .post(format!("{}/api/v2/sales/batch", self.url))
            .bearer_auth(&self.token)
            .json(&json!({"salesDataArray": records}))
            .send()
            .await;
        self.round_trips
            .lock()
            .unwrap()
            .saturating_record(started.elapsed().as_micros().max(1) as u64);
        match result {
            Ok(r) if r.status().is_success() => true,
            Ok(r) => {
                eprintln!(
                    "{what} refused: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                );
                false
            }
            Err(e) => {
                eprintln!("{what} failed: {e}");
                false
            }
        }
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn report_writes(w: &Writer, oldest: Duration) {
    let mut h = w.round_trips.lock().unwrap();
    println!(
        "    writes: round trip p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; oldest open writing transaction seen in the cluster: {:.0} ms",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
        oldest.as_secs_f64() * 1000.0
    );
    h.reset();
}

/// Samples, until `stop`, the age of the oldest transaction holding an xid in
/// the whole cluster (it holds back event delivery), returning the largest.
fn watch_oldest(pool: sqlx::PgPool, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Duration> {
    tokio::spawn(async move {
        let mut worst = 0f64;
        while !stop.load(Relaxed) {
            let age: Option<f64> = sqlx::query_scalar(
                "SELECT extract(epoch FROM max(now() - xact_start))::float8 FROM pg_stat_activity WHERE backend_xid IS NOT NULL",
            )
            .fetch_one(&pool)
            .await
            .unwrap_or(None);
            worst = worst.max(age.unwrap_or(0.0));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Duration::from_secs_f64(worst)
    })
}

fn report_phase(name: &str, p: &Phase, batches: u64, clients: usize) {
    let expected = batches * clients as u64;
    let span = p.last_us.saturating_sub(p.first_us).max(1);
    let rate = p.received as f64 / (span as f64 / 1e6);
    println!(
        "  {name}: batches {batches}, messages {} of {expected} expected, {:.0} messages/s delivered, latency p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms",
        p.received,
        rate,
        ms(p.hist.value_at_quantile(0.50)),
        ms(p.hist.value_at_quantile(0.99)),
        ms(p.hist.value_at_quantile(0.999)),
        ms(p.hist.max()),
    );
}

async fn run(args: RunArgs) {
    let url = args.url.trim_end_matches('/').to_string();
    let pid = args.server_pid;
    let clients = args.clients;
    let store_count = args.stores;
    let per_proc = args.per_proc;
    let rate = args.rate.unwrap_or(4.0);
    let seconds = args.seconds;
    let saturate_seconds = args.saturate_seconds;
    let writers = args.writers;
    let probe_ms = args.probe_ms;

    let pool = sqlx::PgPool::connect(&std::env::var("DATABASE_URL").expect("DATABASE_URL"))
        .await
        .unwrap();
    let stores: Vec<i64> = sqlx::query_scalar("SELECT id FROM sales.stores ORDER BY id LIMIT $1")
        .bind(store_count as i64)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        stores.len(),
        store_count,
        "the bench database needs {store_count} stores"
    );
    let ws_url = format!("{}/ws", url.replace("http://", "ws://"));

    println!(
        "== {clients} clients over {store_count} stores ({} per store), {} client processes",
        clients / store_count,
        clients.div_ceil(per_proc)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kb(pid);
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let mut children: Vec<Child> = Vec::new();
    let mut left = clients;
    let mut first_store_offset = 0usize;
    while left > 0 {
        let k = children.len();
        let n = left.min(per_proc);
        // Rotate the store list so that stores are evenly covered across processes.
        let mut rotated = stores.clone();
        rotated.rotate_left(first_store_offset % stores.len());
        first_store_offset += n;
        let list = rotated
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut proc = tokio::process::Command::new(&exe)
            .args([
                "clients",
                "--url",
                &ws_url,
                "--count",
                &n.to_string(),
                "--stores",
                &list,
            ])
            .args([
                "--first-user",
                &(1_000_000 + (k * per_proc) as i64).to_string(),
            ])
            .args(["--source-ip", &format!("127.0.0.{}", 10 + k)])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start a client process");
        let stdin = proc.stdin.take().unwrap();
        let lines = BufReader::new(proc.stdout.take().unwrap()).lines();
        children.push(Child { proc, stdin, lines });
        left -= n;
    }
    let mut connected = 0;
    for c in children.iter_mut() {
        let line = tokio::time::timeout(Duration::from_secs(300), c.lines.next_line())
            .await
            .expect("clients connected in time")
            .unwrap()
            .expect("client process output");
        let v: Value = serde_json::from_str(&line).unwrap();
        connected += v["connected"].as_u64().unwrap();
        if v["failed"].as_u64().unwrap() > 0 {
            println!("  client process: {} connections failed", v["failed"]);
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kb(pid);
    let admin = sign(1, "admin", &[]);
    let stats: Value = reqwest::Client::new()
        .get(format!("{url}/api/admin/websocket/stats"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap_or(Value::Null);
    let per_conn = (rss_after.saturating_sub(rss_before) as f64 * 1024.0) / connected.max(1) as f64;
    println!(
        "  connected {connected} in {connect_secs:.1} s; server says {} open; server RSS {:.1} MiB -> {:.1} MiB: {:.0} bytes ({:.2} kB) per idle connection",
        stats["connections"]["total"],
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        per_conn,
        per_conn / 1024.0
    );

    let writer = Arc::new(Writer {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(writers * 2)
            .build()
            .unwrap(),
        url: url.clone(),
        token: sign(1, "admin", &[]),
        stores: stores.clone(),
        counter: AtomicU64::new(now_us() % 1_000_000),
        round_trips: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3).unwrap()),
    });
    // Warm-up batch (not measured).
    writer.write().await;
    settle(&mut children, connected, Duration::from_secs(5)).await;

    writer.round_trips.lock().unwrap().reset();

    if probe_ms > 0 {
        // Warm the probe rows so that every probe is an update of one day.
        for s in &stores {
            writer.probe(*s).await;
        }
        settle(&mut children, connected, Duration::from_secs(5)).await;
        for c in children.iter_mut() {
            c.ask("reset").await;
        }
        writer.round_trips.lock().unwrap().reset();
        let watching = Arc::new(AtomicBool::new(false));
        let watcher = watch_oldest(pool.clone(), watching.clone());
        let cpu_before = cpu_now(pid, &children);
        let mut tick = tokio::time::interval(Duration::from_millis(probe_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let end = Instant::now() + Duration::from_secs(seconds);
        let mut inflight = Vec::new();
        let mut k = 0usize;
        while Instant::now() < end {
            tick.tick().await;
            let (w, store) = (writer.clone(), stores[k % stores.len()]);
            k += 1;
            inflight.push(tokio::spawn(async move { w.probe(store).await }));
        }
        let mut ok = 0;
        for h in inflight {
            ok += h.await.unwrap() as u64;
        }
        let per_store = connected / store_count as u64;
        let p = settle(&mut children, ok * per_store, Duration::from_secs(5)).await;
        watching.store(true, Relaxed);
        let oldest = watcher.await.unwrap();
        let expected = ok * per_store;
        println!(
            "  probe (one one-record batch every {probe_ms} ms, {per_store} clients per write): writes {ok}, messages {} of {expected}, latency from send p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms",
            p.received,
            ms(p.hist.value_at_quantile(0.50)),
            ms(p.hist.value_at_quantile(0.99)),
            ms(p.hist.value_at_quantile(0.999)),
            ms(p.hist.max()),
        );
        report_writes(&writer, oldest);
        report_cpu(&cpu_before, &cpu_now(pid, &children), p.received);
    }

    // Phase 1: a fixed rate (only without the probe, or when asked for with --rate).
    if probe_ms == 0 || args.rate.is_some() {
        for c in children.iter_mut() {
            c.ask("reset").await;
        }
        let watching = Arc::new(AtomicBool::new(false));
        let watcher = watch_oldest(pool.clone(), watching.clone());
        let cpu_before = cpu_now(pid, &children);
        let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let end = Instant::now() + Duration::from_secs(seconds);
        let mut inflight = Vec::new();
        while Instant::now() < end {
            tick.tick().await;
            let w = writer.clone();
            inflight.push(tokio::spawn(async move { w.write().await }));
        }
        let mut ok = 0;
        for h in inflight {
            ok += h.await.unwrap() as u64;
        }
        let fixed = settle(&mut children, ok * connected, Duration::from_secs(5)).await;
        watching.store(true, Relaxed);
        let oldest = watcher.await.unwrap();
        report_phase(
            &format!(
                "fixed rate {rate} batches/s ({} events/s)",
                rate * store_count as f64
            ),
            &fixed,
            ok,
            connected as usize,
        );
        report_writes(&writer, oldest);
        report_cpu(&cpu_before, &cpu_now(pid, &children), fixed.received);
    }

    // Phase 2: saturation.
    if saturate_seconds > 0 {
        for c in children.iter_mut() {
            c.ask("reset").await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let watching = Arc::new(AtomicBool::new(false));
        let watcher = watch_oldest(pool.clone(), watching.clone());
        let cpu_before = cpu_now(pid, &children);
        let mut tasks = Vec::new();
        for _ in 0..writers {
            let (w, stop, done) = (writer.clone(), stop.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Relaxed) {
                    if w.write().await {
                        done.fetch_add(1, Relaxed);
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(saturate_seconds)).await;
        stop.store(true, Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        let n = done.load(Relaxed);
        let sat = settle(&mut children, n * connected, Duration::from_secs(5)).await;
        watching.store(true, Relaxed);
        let oldest = watcher.await.unwrap();
        report_phase(
            &format!("saturation, {writers} writers"),
            &sat,
            n,
            connected as usize,
        );
        report_writes(&writer, oldest);
        report_cpu(&cpu_before, &cpu_now(pid, &children), sat.received);
        println!("  connections held at the end: {} (client side)", sat.open);
    }
    let rss_end = rss_kb(pid);
    println!(
        "  server RSS at the end: {:.1} MiB",
        rss_end as f64 / 1024.0
    );

    for c in children.iter_mut() {
        let _ = c.stdin.write_all(b"quit\n").await;
        let _ = c.stdin.flush().await;
    }
    for mut c in children {
        let _ = tokio::time::timeout(Duration::from_secs(10), c.proc.wait()).await;
        let _ = c.proc.start_kill();
    }
}
