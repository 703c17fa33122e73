//! Export benchmark (issues 7 and 14): `GET /api/v2/sales/export` in CSV,
//! NDJSON and JSON (plus CSV with zstd at the top) against `psql -c "\copy
//! (same query) TO STDOUT ..."` in the same run, on a ladder of sizes from one
//! row to every row, and the server's peak RSS growth while it streams (VmRSS
//! sampled every 50 ms from /proc). The one-row export is also timed against
//! the list endpoint for the same store-month.
//!
//! A database of its own (like the tests' `TestDb`) is loaded with
//! `--stores` x `--months` store-months of full daily data (14,000 x 24 is
//! about 10M store-days) through `generate_series`, with the event triggers
//! disabled during the load. The ladder: one store-month (monthly shape),
//! then store-days of 3 stores and of 274 stores for 2024 (about 1,100 and
//! 100k), of every store for 2024-10..12 (about 1.3M), and all of them. The
//! release server (`target/release/sales-server serve`, LOG_LEVEL=warn) runs
//! as a child process on a free loopback port. Each cell is repeated,
//! alternating psql and server, and medians are compared. Everything stops by
//! itself; the database is dropped at the end.
//!
//! Run with `scripts/bench_export.sh [flags]`.
//! Flags (defaults in brackets): --stores [14000] --months [24] --runs [3]
//! --small-runs [15] --rungs [one,1k,100k,1m,all] --server [target/release/sales-server]
//! --formats [csv,ndjson,json,csv+zstd]

use clap::Parser;
use sales_e2e::fixtures::procfs;
use sales_e2e::{ServerProc, TestDb, TEST_JWT_SECRET};
use sales_server::auth::{Principal, Role};
use sales_server::http::export::{build_sql, ExportFormat, ExportShape, ExportSpec};
use sales_server::http::filters::{RawFilter, SalesFilter};
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Export benchmark (see the header of tests/src/bin/bench_export.rs).
#[derive(Debug, Clone, Parser)]
struct Opts {
    #[arg(long, default_value_t = 14000)]
    stores: usize,
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u16).range(1..=120))]
    months: u16,
    /// Repetitions of each measurement of 100k rows or more (medians are compared).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    runs: u16,
    /// Repetitions of each measurement under 100k rows.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u16).range(1..))]
    small_runs: u16,
    #[arg(long, default_value_t = release_server())]
    server: String,
    /// Which rungs of the ladder to measure: one, 1k, 100k, 1m, all.
    #[arg(long, value_delimiter = ',', default_value = "one,1k,100k,1m,all")]
    rungs: Vec<String>,
    /// Which of csv, ndjson, json, csv+zstd to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "csv,ndjson,json,csv+zstd"
    )]
    formats: Vec<String>,
}

fn opts() -> Opts {
    let o = Opts::parse();
    assert!(o.stores >= 1);
    o
}

fn release_server() -> String {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    format!("{target}/release/sales-server")
}

/// Loads stores and months of full daily data with the event triggers off
/// (the row trigger that derives a month's totals stays on).
async fn load(db: &TestDb, o: &Opts) -> u64 {
    let started = Instant::now();
    let mut tx = db.pool.begin().await.expect("begin");
    for sql in [
        "ALTER TABLE sales.monthly_sales DISABLE TRIGGER monthly_sales_events",
        "ALTER TABLE sales.stores DISABLE TRIGGER USER",
    ] {
        sqlx::query(sql).execute(&mut *tx).await.expect(sql);
    }
    sqlx::query(
        "INSERT INTO sales.stores (code, name, region)
         SELECT 'B' || lpad(i::text, 6, '0'), 'Bench store ' || i,
                (ARRAY['North', 'South', 'East', 'West'])[1 + i % 4]
         FROM generate_series(1, $1) i",
    )
    .bind(o.stores as i32)
    .execute(&mut *tx)
    .await
    .expect("stores");
    // Months end at 2024-12 and go back `months`.
    sqlx::query(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         SELECT s.id, p.y, p.m,
                (SELECT jsonb_object_agg(d::text, jsonb_build_object(
                     'sales', round((random() * 5000)::numeric, 2),
                     'customers', (random() * 200)::int,
                     'transactions', (random() * 250)::int))
                 FROM generate_series(1, extract(day FROM make_date(p.y, p.m, 1) + interval '1 month - 1 day')::int) d)
         FROM sales.stores s,
              (SELECT extract(year FROM t)::int AS y, extract(month FROM t)::int AS m
               FROM generate_series(make_date(2025, 1, 1) - make_interval(months => $1), make_date(2024, 12, 1), interval '1 month') t) p",
    )
    .bind(o.months as i32)
    .execute(&mut *tx)
    .await
    .expect("months");
    for sql in [
        "ALTER TABLE sales.monthly_sales ENABLE TRIGGER USER",
        "ALTER TABLE sales.stores ENABLE TRIGGER USER",
    ] {
        sqlx::query(sql).execute(&mut *tx).await.expect(sql);
    }
    tx.commit().await.expect("commit");
    sqlx::query("VACUUM ANALYZE sales.monthly_sales")
        .execute(&db.pool)
        .await
        .expect("vacuum");
    sqlx::query("ANALYZE sales.stores")
        .execute(&db.pool)
        .await
        .expect("analyze");
    let days: i64 =
        sqlx::query_scalar("SELECT sum(days_reported)::bigint FROM sales.monthly_sales")
            .fetch_one(&db.pool)
            .await
            .expect("count");
    println!(
        "loaded {} stores x {} months = {days} store-days in {:.1} s",
        o.stores,
        o.months,
        started.elapsed().as_secs_f64()
    );
    days as u64
}

fn start_server(db: &TestDb, o: &Opts) -> ServerProc {
    let server = o.server.as_str();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("JWT_SECRET", TEST_JWT_SECRET),
        ("BIND_ADDR", "127.0.0.1"),
        ("LOG_LEVEL", "warn"),
        ("RATE_LIMIT_PER_MINUTE", "100000"),
        // One token for the whole run, which takes longer than the default
        // lifetime of 15 minutes at 10M rows.
        ("JWT_EXPIRY", "24h"),
    ];
    ServerProc::start(std::path::Path::new(server), &env).unwrap_or_else(|e| {
        panic!("starting {server}: {e} (build it with cargo build --release -p sales-server)")
    })
}

/// User + system CPU time of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    procfs::cpu_time(pid).as_secs_f64()
}

/// Samples VmRSS every 50 ms until stopped; returns the peak in KiB.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(procfs::rss_kb(pid).unwrap_or(0)));
        let (s, p) = (stop.clone(), peak.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(v) = procfs::rss_kb(pid) {
                    p.fetch_max(v, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self {
            stop,
            peak,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Run {
    secs: f64,
    bytes: u64,
    rows: u64,
    rss_growth_kb: u64,
    /// CPU seconds the server spent on the export.
    cpu: f64,
}

/// Rows in a body of this format, from its bytes (bench names hold no newlines).
fn rows_in(format: ExportFormat, newlines: u64, header: bool) -> u64 {
    match format {
        ExportFormat::Csv => newlines - u64::from(header),
        ExportFormat::Ndjson => newlines,
        // `[`, one row per line, `]`.
        ExportFormat::Json => newlines.saturating_sub(2),
    }
}

/// One export through the server: `query` is the export's query string
/// without `format`.
async fn server_run(
    server: &ServerProc,
    token: &str,
    query: &str,
    format: ExportFormat,
    zstd: bool,
) -> Run {
    let http = reqwest::Client::builder()
        .no_gzip()
        .no_brotli()
        .no_zstd()
        .timeout(Duration::from_secs(600))
        .build()
        .expect("client");
    let fmt = match format {
        ExportFormat::Csv => "csv",
        ExportFormat::Json => "json",
        ExportFormat::Ndjson => "ndjson",
    };
    let pid = server.pid();
    let before = procfs::rss_kb(pid).unwrap_or(0);
    let cpu_before = cpu_secs(pid);
    let sampler = RssSampler::start(pid);
    let started = Instant::now();
    let mut req = http
        .get(format!(
            "{}/api/v2/sales/export?format={fmt}&{query}",
            server.url("")
        ))
        .bearer_auth(token);
    if zstd {
        req = req.header("accept-encoding", "zstd");
    }
    let mut resp = req.send().await.expect("export request");
    assert_eq!(resp.status(), 200, "export answered {}", resp.status());
    let mut bytes = 0u64;
    let mut newlines = 0u64;
    let mut dec = zstd.then(|| zstd::stream::raw::Decoder::new().expect("decoder"));
    let mut out = vec![0u8; 1 << 20];
    while let Some(chunk) = resp.chunk().await.expect("body") {
        bytes += chunk.len() as u64;
        match dec.as_mut() {
            None => newlines += chunk.iter().filter(|b| **b == b'\n').count() as u64,
            Some(d) => {
                use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
                let mut input = InBuffer::around(&chunk);
                // Until the input is used up and the decoder has no more to give.
                loop {
                    let mut o = OutBuffer::around(&mut out[..]);
                    d.run(&mut input, &mut o).expect("zstd");
                    let n = o.pos();
                    newlines += out[..n].iter().filter(|b| **b == b'\n').count() as u64;
                    if input.pos() == chunk.len() && n < out.len() {
                        break;
                    }
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let peak = sampler.finish();
    Run {
        secs,
        bytes,
        rows: rows_in(format, newlines, true),
        rss_growth_kb: peak.saturating_sub(before),
        cpu: cpu_secs(pid) - cpu_before,
    }
}

/// Seconds for one `GET /api/v2/sales?<query>` (the list endpoint).
async fn list_run(server: &ServerProc, token: &str, query: &str) -> f64 {
    let http = reqwest::Client::new();
    let started = Instant::now();
    let resp = http
        .get(format!("{}/api/v2/sales?{query}", server.url("")))
        .bearer_auth(token)
        .send()
        .await
        .expect("list request");
    assert_eq!(resp.status(), 200, "list answered {}", resp.status());
    resp.bytes().await.expect("list body");
    started.elapsed().as_secs_f64()
}

/// `psql -c "\copy (<the server's query>) TO STDOUT ..."`, output read and counted here.
fn psql_run(db_url: &str, select: &str, format: ExportFormat) -> Run {
    let options = match format {
        ExportFormat::Csv => "(FORMAT csv, HEADER true)",
        _ => "(FORMAT csv, DELIMITER E'\\x02', QUOTE E'\\x01')",
    };
    let started = Instant::now();
    // sqlx's URL carries options of its own in the query string: psql gets the rest.
    let url = db_url.split('?').next().unwrap_or(db_url);
    let mut child = Command::new("psql")
        .arg(url)
        .arg("-X")
        .arg("-v")
        .arg("ON_ERROR_STOP=1")
        .arg("-c")
        .arg(format!("\\copy ({select}) TO STDOUT WITH {options}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("psql (postgresql-client) in PATH");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut buf = vec![0u8; 1 << 20];
    let (mut bytes, mut newlines) = (0u64, 0u64);
    loop {
        let n = stdout.read(&mut buf).expect("read psql");
        if n == 0 {
            break;
        }
        bytes += n as u64;
        newlines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
    }
    let status = child.wait().expect("psql");
    assert!(status.success(), "psql failed");
    let secs = started.elapsed().as_secs_f64();
    let rows = match format {
        ExportFormat::Csv => newlines - 1,
        _ => newlines,
    };
    Run {
        secs,
        bytes,
        rows,
        rss_growth_kb: 0,
        cpu: 0.0,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let o = opts();
    // On SIGINT or SIGTERM the benchmark future is dropped: the server child
    // is killed and the database dropped by their destructors.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = bench(o) => {}
        _ = tokio::signal::ctrl_c() => eprintln!("interrupted: stopping the server, dropping the database"),
        _ = term.recv() => eprintln!("terminated: stopping the server, dropping the database"),
    }
}

/// One rung of the size ladder: the export's query string (without
/// `format`) and the filter the server parses from it.
struct Rung {
    /// Its name for `--rungs`.
    name: &'static str,
    /// Every row: the last rung.
    top: bool,
    shape: ExportShape,
    query: String,
    raw: RawFilter,
}

/// From one row to every row: a store-month (monthly shape), then store-days
/// of 3 stores, of 274 stores for a year, of every store for a quarter, and
/// all of them. Rungs the loaded data cannot fill (too few stores, or
/// months not reaching into 2024) are left out.
fn ladder(o: &Opts) -> Vec<Rung> {
    let ids = |n: usize| (1..=n).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let mut rungs = Vec::new();
    if o.months >= 12 {
        rungs.push(Rung {
            name: "one",
            top: false,
            shape: ExportShape::Monthly,
            query: "shape=monthly&storeId=1&year=2024&month=12".into(),
            raw: RawFilter {
                store_id: Some("1".into()),
                year: Some(2024),
                month: Some(12),
                ..Default::default()
            },
        });
        for (n, name) in [(3, "1k"), (274, "100k")] {
            if o.stores >= n {
                rungs.push(Rung {
                    name,
                    top: false,
                    shape: ExportShape::Daily,
                    query: format!("shape=daily&storeId={}&year=2024", ids(n)),
                    raw: RawFilter {
                        store_id: Some(ids(n)),
                        year: Some(2024),
                        ..Default::default()
                    },
                });
            }
        }
        if o.stores >= 2000 {
            rungs.push(Rung {
                name: "1m",
                top: false,
                shape: ExportShape::Daily,
                query: "shape=daily&from=2024-10&to=2024-12".into(),
                raw: RawFilter {
                    from: Some("2024-10".into()),
                    to: Some("2024-12".into()),
                    ..Default::default()
                },
            });
        }
    }
    rungs.push(Rung {
        name: "all",
        top: true,
        shape: ExportShape::Daily,
        query: "shape=daily".into(),
        raw: RawFilter::default(),
    });
    rungs.retain(|r| o.rungs.iter().any(|n| n == r.name));
    rungs
}

#[derive(Debug, Default)]
struct Cell {
    rows: u64,
    server_s: f64,
    psql_s: f64,
    paired: f64,
    cpu: f64,
    growth_kb: u64,
    /// Bytes of the server's response (compressed for csv+zstd).
    bytes: u64,
}

impl Cell {
    /// psql's median time over the server's: above 1, the server is faster.
    fn ratio(&self) -> f64 {
        self.psql_s / self.server_s
    }
}

async fn bench(o: Opts) {
    let overall = Instant::now();
    let db = TestDb::new().await;
    let total = load(&db, &o).await;

    // The export's own SQL, as the server builds it for an admin.
    let admin = Principal {
        user_id: 0,
        email: None,
        role: Role::Admin,
        stores: Default::default(),
        exp: None,
        generation: 0,
        session: None,
        outside: false,
        identity: None,
    };

    let server = start_server(&db, &o);
    let (id, _) = sales_server::users::upsert_user(
        &db.pool,
        "bench@example.com",
        "admin",
        &[],
        "bench-password-1",
    )
    .await
    .expect("user");
    let cfg = db.config(&[("JWT_EXPIRY", "24h")]);
    let auth = sales_server::auth::Auth::from_config(&cfg).expect("auth");
    let (token, _) = auth
        .issue(id, "bench@example.com", Role::Admin, vec![])
        .expect("token");
    let pid = server.pid();
    let idle_rss = procfs::rss_kb(pid).unwrap_or(0);
    // Warm-up: pool connections, caches.
    let _ = server_run(&server, &token, "shape=daily", ExportFormat::Csv, false).await;
    let warm_rss = procfs::rss_kb(pid).unwrap_or(0);
    println!(
        "server pid {pid}: RSS {:.1} MB idle, {:.1} MB after a warm-up export",
        idle_rss as f64 / 1024.0,
        warm_rss as f64 / 1024.0
    );

    println!(
        "\n{:>9} {:<9} {:>9} {:>10} {:>10} {:>7} {:>8} {:>12} {:>8} {:>8}",
        "rows",
        "format",
        "MB",
        "server ms",
        "psql ms",
        "ratio",
        "paired",
        "server r/s",
        "CPU s",
        "RSS +MB"
    );
    let mut worst: Vec<(u64, f64)> = Vec::new();
    let mut max_growth = 0u64;
    let mut one_row_export = None;
    for rung in ladder(&o) {
        let filter = SalesFilter::parse(&rung.raw).expect("ladder filter");
        let mut rung_worst = f64::INFINITY;
        let mut rung_rows = 0;
        for name in &o.formats {
            let (format, zstd) = match name.as_str() {
                "csv" => (ExportFormat::Csv, false),
                "ndjson" => (ExportFormat::Ndjson, false),
                "json" => (ExportFormat::Json, false),
                "csv+zstd" => (ExportFormat::Csv, true),
                other => panic!("unknown format {other} (csv, ndjson, json, csv+zstd)"),
            };
            let select = build_sql(&ExportSpec {
                format,
                shape: rung.shape,
                filter: &filter,
                who: &admin,
                after: None,
                projection: None,
                header: true,
            })
            .select;
            // zstd costs CPU on both ends of a loopback: only at the top rung.
            if zstd && !rung.top {
                continue;
            }
            let mut srv = Vec::new();
            let mut ps = Vec::new();
            let mut runs = o.runs;
            let mut i = 0;
            while i < runs {
                let (url, sql) = (db.url.clone(), select.clone());
                let run = tokio::task::spawn_blocking(move || psql_run(&url, &sql, format));
                ps.push(run.await.expect("psql run"));
                srv.push(server_run(&server, &token, &rung.query, format, zstd).await);
                if i == 0 && ps[0].rows < 100_000 {
                    runs = o.small_runs;
                }
                i += 1;
            }
            let rows = ps[0].rows;
            for r in srv.iter().chain(&ps) {
                assert_eq!(r.rows, rows, "every run exports the same rows ({format:?})");
            }
            if rung.top {
                assert_eq!(rows, total, "the top rung exports every row");
            }
            let cell = Cell {
                rows,
                server_s: median(srv.iter().map(|r| r.secs).collect()),
                psql_s: median(ps.iter().map(|r| r.secs).collect()),
                // Ratios of the runs paired in time (each psql run just before its server run).
                paired: median(srv.iter().zip(&ps).map(|(a, b)| b.secs / a.secs).collect()),
                cpu: median(srv.iter().map(|r| r.cpu).collect()),
                growth_kb: srv.iter().map(|r| r.rss_growth_kb).max().unwrap_or(0),
                bytes: srv[0].bytes,
            };
            max_growth = max_growth.max(cell.growth_kb);
            if !zstd {
                rung_worst = rung_worst.min(cell.ratio());
                rung_rows = rows;
            }
            if rows == 1 && format == ExportFormat::Csv && !zstd {
                one_row_export = Some(cell.server_s);
            }
            println!(
                "{:>9} {:<9} {:>9.3} {:>10.2} {:>10.2} {:>6.2}x {:>7.2}x {:>12.0} {:>8.3} {:>8.1}",
                cell.rows,
                name,
                cell.bytes as f64 / 1e6,
                cell.server_s * 1e3,
                cell.psql_s * 1e3,
                cell.ratio(),
                cell.paired,
                cell.rows as f64 / cell.server_s,
                cell.cpu,
                cell.growth_kb as f64 / 1024.0
            );
        }
        if rung_worst.is_finite() {
            worst.push((rung_rows, rung_worst));
        }
    }
    println!(
        "\n(server and psql times are medians of {} runs at 100k rows and more, {} below; psql \
         runs the export's own query with the same COPY options and starts a process and a \
         connection each time, as a user's \\copy does; ratio = psql time / server time; `paired` \
         the median ratio of runs paired in time; csv+zstd counts compressed bytes and is measured \
         at the top rung only; `CPU s` the server's CPU seconds per export)",
        o.runs, o.small_runs
    );
    for (rows, ratio) in &worst {
        println!("rows {rows:>9}: lowest ratio over the formats {ratio:.2}x (target >= 0.85x)");
    }

    // The one-row export against the list endpoint for the same store-month.
    if let Some(export_s) = one_row_export {
        let q = "storeId=1&year=2024&month=12";
        let mut lists = Vec::new();
        for _ in 0..o.small_runs {
            lists.push(list_run(&server, &token, q).await);
        }
        let list_s = median(lists);
        println!(
            "one-row export {:.2} ms, list endpoint for the same store-month {:.2} ms: \
             {:+.2} ms (target within 10 ms)",
            export_s * 1e3,
            list_s * 1e3,
            (export_s - list_s) * 1e3
        );
    }
    println!(
        "peak RSS growth {:.1} MB (target <= 64 MB); total {:.0} s",
        max_growth as f64 / 1024.0,
        overall.elapsed().as_secs_f64()
    );
    drop(server);
}
