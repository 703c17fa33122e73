//! Import benchmark (issue 15): a daily POS CSV of `--rows` lines (1M by
//! default) imported through `POST /api/v2/imports`, from the first byte
//! sent until the job has completed (staging COPY plus the chunked merge
//! through sales.batch_upsert_impl, with versions and events), in rows/s,
//! against `psql -c "\copy staging FROM file CSV HEADER"` of the same file
//! into a plain staging table in the same run (the floor: the cost of
//! getting the rows into Postgres at all). Also the server's peak RSS
//! growth (VmRSS sampled every 50 ms) while it imports.
//!
//! A database of its own (dropped at the end) with `--stores` stores; the
//! file holds one line per store and day, in date order (the shape of a
//! chain's daily files concatenated). The server runs as a child process
//! (`--server`, release build by default) on a free loopback port.
//!
//! Run with `scripts/bench_import.sh [flags]`.
//! Flags (defaults in brackets): --rows [1000000] --stores [1000]
//! --server [target/release/sales-server] --chunk [20000]
//! --redis [none: the server's in-process cache]
//! --growth [1,1000,100000]: after the main run, files of these sizes (in
//! years of their own, so every import writes new store-months), each
//! against `psql \copy` of the same file; medians of 5 runs below 100,000
//! lines. An empty list skips it.

use sales_e2e::fixtures::procfs;
use sales_e2e::{ServerProc, TestDb, TEST_JWT_SECRET};
use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Opts {
    rows: usize,
    stores: usize,
    server: String,
    chunk: usize,
    /// Redis for the server's cache (none: the in-process cache).
    redis: Option<String>,
    /// File sizes (lines) imported after the main run, each against its own
    /// floor, to show the fixed cost per import.
    growth: Vec<usize>,
}

fn opts() -> Opts {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let mut o = Opts {
        rows: 1_000_000,
        stores: 1000,
        server: format!("{target}/release/sales-server"),
        chunk: 20_000,
        redis: None,
        growth: vec![1, 1_000, 100_000],
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let (flag, value) = (pair[0].as_str(), pair.get(1).cloned().unwrap_or_default());
        let num = || {
            value
                .parse::<usize>()
                .unwrap_or_else(|_| panic!("{flag} needs a number"))
        };
        match flag {
            "--rows" => o.rows = num(),
            "--stores" => o.stores = num().max(1),
            "--server" => o.server = value.clone(),
            "--chunk" => o.chunk = num().max(1),
            "--growth" => {
                o.growth = value
                    .split(',')
                    .filter(|v| !v.trim().is_empty())
                    .map(|v| v.trim().parse().expect("--growth takes sizes like 1,1000"))
                    .collect()
            }
            "--redis" => o.redis = Some(value.clone()),
            _ => panic!("unknown flag {flag} (see the header of bench_import.rs)"),
        }
    }
    o
}

fn write_file(path: &std::path::Path, rows: usize, stores: usize, year: i32) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(f, "store_code,date,sales,customers,transactions").unwrap();
    let mut date = chrono::NaiveDate::from_ymd_opt(year, 1, 1).unwrap();
    let mut i = 0usize;
    'out: loop {
        for s in 1..=stores {
            if i == rows {
                break 'out;
            }
            writeln!(
                f,
                "B{s:05},{date},{}.{:02},{},{}",
                (i * 7919) % 90_000 + 500,
                i % 100,
                i % 300 + 20,
                i % 400 + 25
            )
            .unwrap();
            i += 1;
        }
        date = date.succ_opt().unwrap();
    }
    f.flush().unwrap();
}

#[tokio::main]
async fn main() {
    let o = opts();
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO sales.stores (code, name, region)
         SELECT format('B%s', lpad(i::text, 5, '0')), 'Store ' || i, 'R' || (i % 6)
         FROM generate_series(1, $1) i",
    )
    .bind(o.stores as i64)
    .execute(&db.pool)
    .await
    .unwrap();
    let file = std::env::temp_dir().join(format!(
        "bench_import_{}.csv",
        uuid::Uuid::new_v4().simple()
    ));
    write_file(&file, o.rows, o.stores, 2020);
    let bytes = std::fs::metadata(&file).unwrap().len();
    println!(
        "file: {} lines, {:.1} MB, {} stores",
        o.rows,
        bytes as f64 / 1e6,
        o.stores
    );

    // Floor: psql \copy of the same file into a staging table.
    let floor = psql_copy(&db, &file).await;
    let floor_rate = o.rows as f64 / floor.as_secs_f64();
    println!(
        "psql \\copy into a staging table: {:.2}s, {:.0} rows/s",
        floor.as_secs_f64(),
        floor_rate
    );

    // The server.
    let mut env = vec![
        ("DATABASE_URL".to_string(), db.url.clone()),
        ("JWT_SECRET".to_string(), TEST_JWT_SECRET.to_string()),
        ("LOG_LEVEL".to_string(), "warn".to_string()),
        ("IMPORT_CHUNK_LINES".to_string(), o.chunk.to_string()),
    ];
    if let Some(url) = &o.redis {
        env.push(("REDIS_URL".into(), url.clone()));
        env.push(("CACHE_PREFIX".into(), db.name.clone()));
    }
    let server = ServerProc::start(std::path::Path::new(&o.server), &env)
        .unwrap_or_else(|e| panic!("{}: {e}", o.server));
    let http = reqwest::Client::new();
    let (uid, _) =
        sales_server::users::upsert_user(&db.pool, "bench@x.test", "admin", &[], "password-123")
            .await
            .unwrap();
    let auth = sales_server::auth::Auth::from_config(&db.config(&[])).unwrap();
    let token = auth
        .issue(uid, "bench@x.test", sales_server::auth::Role::Admin, vec![])
        .unwrap()
        .0;
    let pid = server.pid();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base_rss = procfs::rss_kb(pid).unwrap_or(0);
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(base_rss));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(v) = procfs::rss_kb(pid) {
                    peak.fetch_max(v, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let (staged, total, doc) =
        import(&http, &server, &token, &file, Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(doc["rowsWritten"].as_u64(), Some(o.rows as u64), "{doc}");
    let rate = o.rows as f64 / total.as_secs_f64();
    let growth = peak.load(Ordering::Relaxed).saturating_sub(base_rss) as f64 / 1024.0;
    println!(
        "import: upload + staging {:.2}s, total {:.2}s ({} chunks), {:.0} rows/s = {:.2}x psql \\copy (target >= 0.5x)",
        staged.as_secs_f64(),
        total.as_secs_f64(),
        doc["chunks"],
        rate,
        rate / floor_rate
    );
    // Chunks that waited past TURN_WAIT for their turn and merged again.
    let metrics = http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let retries = metrics
        .lines()
        .find_map(|l| l.strip_prefix("import_chunk_retries_total "))
        .unwrap_or("0");
    println!("chunks merged again after waiting for their turn: {retries}");
    println!(
        "server RSS: {:.1} MB before, peak growth {growth:.1} MB (target <= 64 MB)",
        base_rss as f64 / 1024.0
    );
    // Each write of a store-month is a new version: their sum over the rows
    // is how many times the merge wrote one.
    let (months, writes): (i64, i64) =
        sqlx::query_as("SELECT count(*), coalesce(sum(version), 0)::int8 FROM sales.monthly_sales")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    println!(
        "store-months written: {months}, writes: {writes} ({:.2} per store-month)",
        writes as f64 / months.max(1) as f64
    );
    let _ = std::fs::remove_file(&file);

    if !o.growth.is_empty() {
        println!();
        println!("growth: each size in new store-months, against psql \\copy of the same file");
        println!("| lines | runs | psql \\copy | upload + staging (202) | until completed | import / psql | µs per line |");
        println!("|---|---|---|---|---|---|---|");
        let mut year = 2040;
        for &rows in &o.growth {
            let runs = if rows < 100_000 { 5 } else { 1 };
            let mut floors = Vec::new();
            let mut stageds = Vec::new();
            let mut totals = Vec::new();
            for _ in 0..runs {
                let days = rows.div_ceil(o.stores.max(1));
                let years = (days / 365 + 1) as i32;
                write_file(&file, rows, o.stores, year);
                year += years;
                assert!(year <= 2100, "growth sizes too large for distinct years");
                floors.push(psql_copy(&db, &file).await);
                let (staged, total, doc) =
                    import(&http, &server, &token, &file, Duration::from_millis(2)).await;
                assert_eq!(doc["state"], "completed", "{doc}");
                assert_eq!(doc["rowsWritten"].as_u64(), Some(rows as u64), "{doc}");
                stageds.push(staged);
                totals.push(total);
            }
            let (f, st, t) = (
                median(&mut floors),
                median(&mut stageds),
                median(&mut totals),
            );
            println!(
                "| {rows} | {runs} | {:.1} ms | {:.1} ms | {:.1} ms | {:.2}x | {:.1} |",
                ms(f),
                ms(st),
                ms(t),
                f.as_secs_f64() / t.as_secs_f64(),
                t.as_secs_f64() * 1e6 / rows as f64
            );
        }
        let _ = std::fs::remove_file(&file);
    }
    drop(server);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// `psql -c "\copy staging FROM file CSV HEADER"` into a new plain table,
/// dropped afterwards: the floor.
async fn psql_copy(db: &TestDb, file: &std::path::Path) -> Duration {
    sqlx::query(
        "CREATE TABLE bench_staging (store_code text, date date, sales numeric, customers int, transactions int)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let url = db.url.split('?').next().unwrap_or(&db.url).to_string();
    let started = Instant::now();
    let st = Command::new("psql")
        .arg(&url)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c"])
        .arg(format!(
            "\\copy bench_staging FROM '{}' CSV HEADER",
            file.display()
        ))
        .status()
        .expect("psql in PATH");
    assert!(st.success());
    let floor = started.elapsed();
    sqlx::query("DROP TABLE bench_staging")
        .execute(&db.pool)
        .await
        .unwrap();
    floor
}

/// Uploads `file` and polls its job every `poll` until it ends: (time until
/// the `202`, time until the job ended, the job's last status).
async fn import(
    http: &reqwest::Client,
    server: &ServerProc,
    token: &str,
    file: &std::path::Path,
    poll: Duration,
) -> (Duration, Duration, serde_json::Value) {
    let started = Instant::now();
    let body = tokio::fs::File::open(file).await.unwrap();
    let stream = file_stream(body);
    let r = http
        .post(server.url("/api/v2/imports"))
        .bearer_auth(token)
        .header("content-type", "text/csv")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let staged = started.elapsed();
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_i64()
        .unwrap();
    // Bounded: a job that never ends fails the benchmark instead of hanging.
    let deadline = Instant::now() + Duration::from_secs(1200);
    let doc = loop {
        let doc: serde_json::Value = http
            .get(server.url(&format!("/api/v2/imports/{id}")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if doc["state"] != "queued" && doc["state"] != "running" {
            break doc;
        }
        assert!(Instant::now() < deadline, "job {id} did not end: {doc}");
        tokio::time::sleep(poll).await;
    };
    (staged, started.elapsed(), doc)
}

/// The file as a stream of chunks, for a streamed request body.
fn file_stream(f: tokio::fs::File) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    futures_util::stream::unfold(f, |mut f| async move {
        let mut buf = vec![0u8; 1 << 16];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    })
}
