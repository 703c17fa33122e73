//! Export benchmark (issue 7, "Benchmark"): throughput of
//! `GET /api/v2/sales/export?shape=daily` in rows/s and MB/s for CSV, NDJSON
//! and JSON (plus CSV with zstd), against `psql -c "\copy (same query) TO
//! STDOUT ..."` in the same run, and the server's peak RSS growth while it
//! streams (VmRSS sampled every 50 ms from /proc).
//!
//! A database of its own (like the tests' `TestDb`) is loaded with
//! `--stores` x `--months` store-months of full daily data (1,400 x 24 is
//! about 1M store-days; 14,000 x 24 about 10M) through `generate_series`,
//! with the event triggers disabled during the load. The release server
//! (`target/release/sales-server serve`, LOG_LEVEL=warn) runs as a child
//! process on a free loopback port. Each measurement is repeated `--runs`
//! times, alternating server and psql, and the best run of each is reported.
//! Everything stops by itself; the database is dropped at the end.
//!
//! Run with `scripts/bench_export.sh [flags]`.
//! Flags (defaults in brackets): --stores [1400] --months [24] --runs [5]
//! --server [target/release/sales-server] --formats [csv,ndjson,json,csv+zstd]

use clap::Parser;
use sales_e2e::fixtures::procfs;
use sales_e2e::{ServerProc, TestDb, TEST_JWT_SECRET};
use sales_server::auth::{Principal, Role};
use sales_server::http::export::{build_sql, ExportFormat, ExportShape, ExportSpec};
use sales_server::http::filters::SalesFilter;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Export benchmark (see the header of tests/src/bin/bench_export.rs).
#[derive(Debug, Clone, Parser)]
struct Opts {
    #[arg(long, default_value_t = 1400)]
    stores: usize,
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u16).range(1..=120))]
    months: u16,
    /// Repetitions of each measurement (the best is reported).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..))]
    runs: u16,
    #[arg(long, default_value_t = release_server())]
    server: String,
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

/// Loads stores and months of full daily data with the triggers off.
async fn load(db: &TestDb, o: &Opts) -> u64 {
    let started = Instant::now();
    let mut tx = db.pool.begin().await.expect("begin");
    for sql in [
        "ALTER TABLE sales.monthly_sales DISABLE TRIGGER USER",
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

impl Run {
    fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.secs
    }
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.secs
    }
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

async fn server_run(server: &ServerProc, token: &str, format: ExportFormat, zstd: bool) -> Run {
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
            "{}/api/v2/sales/export?format={fmt}&shape=daily",
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

fn best(runs: &[Run]) -> Run {
    runs.iter()
        .copied()
        .max_by(|a, b| a.rows_per_s().total_cmp(&b.rows_per_s()))
        .unwrap_or_default()
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
    };
    let filter = SalesFilter::default();
    let select_of = |format| {
        build_sql(&ExportSpec {
            format,
            shape: ExportShape::Daily,
            filter: &filter,
            who: &admin,
            after: None,
            projection: None,
            header: true,
        })
        .select
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
    let cfg = db.config(&[]);
    let auth = sales_server::auth::Auth::from_config(&cfg).expect("auth");
    let (token, _) = auth
        .issue(id, "bench@example.com", Role::Admin, vec![])
        .expect("token");
    let pid = server.pid();
    let idle_rss = procfs::rss_kb(pid).unwrap_or(0);
    // Warm-up: pool connections, caches.
    let _ = server_run(&server, &token, ExportFormat::Csv, false).await;
    let warm_rss = procfs::rss_kb(pid).unwrap_or(0);
    println!(
        "server pid {pid}: RSS {:.1} MB idle, {:.1} MB after a warm-up export",
        idle_rss as f64 / 1024.0,
        warm_rss as f64 / 1024.0
    );

    println!(
        "\n{:<12} {:>9} {:>11} {:>7} {:>11} {:>9} {:>7} {:>8} {:>8} {:>10}",
        "format",
        "rows",
        "server r/s",
        "MB/s",
        "psql r/s",
        "psql MB/s",
        "ratio",
        "med. r.",
        "CPU s",
        "RSS +MB"
    );
    let mut csv_ratio = 0.0;
    let mut max_growth = 0u64;
    for name in &o.formats {
        let (format, zstd) = match name.as_str() {
            "csv" => (ExportFormat::Csv, false),
            "ndjson" => (ExportFormat::Ndjson, false),
            "json" => (ExportFormat::Json, false),
            "csv+zstd" => (ExportFormat::Csv, true),
            other => panic!("unknown format {other} (csv, ndjson, json, csv+zstd)"),
        };
        let select = select_of(format);
        let mut srv = Vec::new();
        let mut ps = Vec::new();
        for _ in 0..o.runs {
            let (url, sql) = (db.url.clone(), select.clone());
            let run = tokio::task::spawn_blocking(move || psql_run(&url, &sql, format));
            ps.push(run.await.expect("psql run"));
            srv.push(server_run(&server, &token, format, zstd).await);
        }
        for r in srv.iter().chain(&ps) {
            assert_eq!(r.rows, total, "every run exports every row ({format:?})");
        }
        let (s, p) = (best(&srv), best(&ps));
        let growth = srv.iter().map(|r| r.rss_growth_kb).max().unwrap_or(0);
        max_growth = max_growth.max(growth);
        let ratio = s.rows_per_s() / p.rows_per_s();
        // Ratios of the runs paired in time (each psql run just before its server run).
        let paired = median(
            srv.iter()
                .zip(&ps)
                .map(|(a, b)| a.rows_per_s() / b.rows_per_s())
                .collect(),
        );
        let cpu = median(srv.iter().map(|r| r.cpu).collect());
        if format == ExportFormat::Csv && !zstd {
            csv_ratio = ratio;
        }
        println!(
            "{:<12} {:>9} {:>11.0} {:>7.1} {:>11.0} {:>9.1} {:>6.2}x {:>7.2}x {:>8.2} {:>10.1}",
            name,
            s.rows,
            s.rows_per_s(),
            s.mb_per_s(),
            p.rows_per_s(),
            p.mb_per_s(),
            ratio,
            paired,
            cpu,
            growth as f64 / 1024.0
        );
    }
    println!(
        "\n(psql runs the same query with the same COPY options; MB/s of the server counts bytes on \
         the wire, compressed for +zstd; best of {} runs each; `med. r.` is the median ratio of \
         runs paired in time; `CPU s` the server's CPU seconds per export)",
        o.runs
    );
    println!(
        "csv ratio {csv_ratio:.2}x (target >= 0.85x); peak RSS growth {:.1} MB (target <= 64 MB); total {:.0} s",
        max_growth as f64 / 1024.0,
        overall.elapsed().as_secs_f64()
    );
    drop(server);
}
