//! Batch upsert benchmark (issue 3, "Benchmark"): rows/s of `sales.batch_upsert`
//! against the best hand-written set-based SQL, per-row upserts, batches of
//! 50 per transaction, and COPY into an unlogged staging table (the floor).
//! Commits/s with events on and off are in `bench_events`.
//!
//! Each method writes its own slice of keys into the same `sales.monthly_sales`
//! table, which holds `--preload` rows before the first method runs: half of a
//! method's records update preloaded rows (with new values), half insert new
//! ones. Every record has 31 days. The database is created for the run (like
//! the tests' `TestDb`) and dropped afterwards.
//!
//! Run with `scripts/bench_upsert.sh [flags]` (release build, release extension).
//! Flags (defaults in brackets): --records [100000] --batch [1000]
//! --preload [200000] --per-row [5000] --batch50 [20000]
//! --stores-per-method [500]; --with-gin creates a GIN index on
//! daily_data first (to show its share of the write cost); --growth
//! [1,10,100,1000,10000] sizes the growth table (records per call of
//! `batch_upsert` against COPY in chunks of the same size).

use clap::Parser;
use sales_e2e::fixtures::procfs;
use sales_e2e::TestDb;
use sqlx::{Executor, PgConnection};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// Batch upsert benchmark (see the header of tests/src/bin/bench_upsert.rs).
#[derive(Debug, Clone, Parser)]
struct Opts {
    /// Records each method writes.
    #[arg(long, default_value_t = 100_000)]
    records: usize,
    /// Records per `sales.batch_upsert` call.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Rows in the table before the first method runs.
    #[arg(long, default_value_t = 200_000)]
    preload: usize,
    /// Records written one upsert at a time.
    #[arg(long, default_value_t = 5_000)]
    per_row: usize,
    /// Records written 50 per transaction.
    #[arg(long, default_value_t = 20_000)]
    batch50: usize,
    #[arg(long, default_value_t = 500)]
    stores_per_method: usize,
    /// Create a GIN index on daily_data first (the one migration 0008
    /// dropped), to show what it would cost.
    #[arg(long)]
    with_gin: bool,
    /// Records per call for the growth table (comma-separated; empty: none).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000,10000")]
    growth: Vec<usize>,
}

fn opts() -> Opts {
    let o = Opts::parse();
    assert!(o.batch >= 1 && o.records >= 2 && o.stores_per_method >= 1);
    o
}

/// Months with 31 days, so every record carries 31 days.
const LONG_MONTHS: [i32; 7] = [1, 3, 5, 7, 8, 10, 12];

/// The k-th (year, month) of a store's key space.
fn period(k: usize) -> (i32, i32) {
    (2000 + (k / 7) as i32, LONG_MONTHS[k % 7])
}

/// A method's keys: `stores` stores, `per_store` months each. The first half
/// of each store's months is preloaded; the method updates some and inserts
/// the rest.
#[derive(Clone)]
struct Slice {
    stores: Vec<i64>,
    per_store: usize,
}

impl Slice {
    /// Record keys for `n` records: alternately an update (preloaded month)
    /// and an insert (new month), spread over the slice's stores.
    fn keys(&self, n: usize) -> Vec<(i64, i32, i32)> {
        let half = self.per_store / 2;
        (0..n)
            .map(|i| {
                let store = self.stores[(i / 2) % self.stores.len()];
                let j = (i / 2) / self.stores.len();
                assert!(j < half, "slice too small: raise --stores-per-method");
                let k = if i % 2 == 0 { j } else { half + j };
                let (y, m) = period(k);
                (store, y, m)
            })
            .collect()
    }
}

fn daily_json(seed: usize) -> String {
    let mut s = String::with_capacity(31 * 40);
    s.push('{');
    for d in 1..=31 {
        if d > 1 {
            s.push(',');
        }
        let sales = ((seed * 7919 + d * 104_729) % 1_000_000) as f64 / 100.0;
        let customers = (seed * 31 + d * 17) % 400;
        let _ = write!(s, "\"{d}\":{{\"sales\":{sales},\"customers\":{customers}}}");
    }
    s.push('}');
    s
}

fn batch_json(keys: &[(i64, i32, i32)], seed: usize) -> String {
    let mut s = String::with_capacity(keys.len() * 1300);
    s.push('[');
    for (i, (store, y, m)) in keys.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(
            s,
            "{{\"storeId\":{store},\"year\":{y},\"month\":{m},\"dailyData\":{}}}",
            daily_json(seed + i)
        );
    }
    s.push(']');
    s
}

const HAND_SQL: &str = r#"
INSERT INTO sales.monthly_sales AS t (store_id, year, month, daily_data)
SELECT r."storeId", r.year, r.month, r."dailyData"
FROM jsonb_to_recordset($1::jsonb) AS r("storeId" bigint, year integer, month integer, "dailyData" jsonb)
ON CONFLICT (store_id, year, month) DO UPDATE SET daily_data = t.daily_data || EXCLUDED.daily_data
"#;

const ROW_SQL: &str = r#"
INSERT INTO sales.monthly_sales AS t (store_id, year, month, daily_data)
VALUES ($1, $2, $3, $4::jsonb)
ON CONFLICT (store_id, year, month) DO UPDATE SET daily_data = t.daily_data || EXCLUDED.daily_data
"#;

struct Measured {
    name: &'static str,
    records: usize,
    elapsed: Duration,
    cpu: Duration,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64()
    }

    fn cpu_rate(&self) -> f64 {
        self.records as f64 / self.cpu.as_secs_f64().max(0.01)
    }
}

async fn batches_via(
    conn: &mut PgConnection,
    sql: &str,
    keys: &[(i64, i32, i32)],
    batch: usize,
    seed: usize,
) -> Duration {
    // JSON text is built before timing: the clock measures the database.
    let bodies: Vec<String> = keys
        .chunks(batch)
        .enumerate()
        .map(|(i, c)| batch_json(c, seed + i * batch))
        .collect();
    let started = Instant::now();
    for b in &bodies {
        sqlx::query(sql)
            .bind(b.as_str())
            .execute(&mut *conn)
            .await
            .expect(sql);
    }
    started.elapsed()
}

async fn per_row(
    conn: &mut PgConnection,
    keys: &[(i64, i32, i32)],
    per_txn: usize,
    seed: usize,
) -> Duration {
    let days: Vec<String> = (0..keys.len()).map(|i| daily_json(seed + i)).collect();
    let started = Instant::now();
    for (chunk_keys, chunk_days) in keys.chunks(per_txn).zip(days.chunks(per_txn)) {
        if per_txn > 1 {
            conn.execute("BEGIN").await.unwrap();
        }
        for ((s, y, m), d) in chunk_keys.iter().zip(chunk_days) {
            sqlx::query(ROW_SQL)
                .bind(s)
                .bind(y)
                .bind(m)
                .bind(d.as_str())
                .execute(&mut *conn)
                .await
                .expect("row");
        }
        if per_txn > 1 {
            conn.execute("COMMIT").await.unwrap();
        }
    }
    started.elapsed()
}

async fn copy_floor(
    conn: &mut PgConnection,
    keys: &[(i64, i32, i32)],
    batch: usize,
    seed: usize,
) -> Duration {
    conn.execute(
        "CREATE UNLOGGED TABLE IF NOT EXISTS public.bench_stage (store_id bigint, year integer, month integer, daily_data jsonb)",
    )
    .await
    .unwrap();
    let chunks: Vec<String> = keys
        .chunks(batch)
        .enumerate()
        .map(|(c, ks)| {
            let mut s = String::with_capacity(ks.len() * 1300);
            for (i, (st, y, m)) in ks.iter().enumerate() {
                let _ = writeln!(s, "{st}\t{y}\t{m}\t{}", daily_json(seed + c * batch + i));
            }
            s
        })
        .collect();
    let started = Instant::now();
    for c in &chunks {
        let mut copy = conn
            .copy_in_raw("COPY public.bench_stage (store_id, year, month, daily_data) FROM STDIN")
            .await
            .unwrap();
        copy.send(c.as_bytes()).await.unwrap();
        copy.finish().await.unwrap();
    }
    started.elapsed()
}

/// Preloads the first `per_store` months of every store of `slices`,
/// generated inside Postgres.
async fn preload(conn: &mut PgConnection, slices: &[Slice], per_store: usize) {
    let periods: Vec<(i32, i32)> = (0..per_store).map(period).collect();
    let years: Vec<i32> = periods.iter().map(|p| p.0).collect();
    let months: Vec<i32> = periods.iter().map(|p| p.1).collect();
    for sl in slices {
        for chunk in sl.stores.chunks(20) {
            sqlx::query(
                "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
                 SELECT s, p.y, p.m,
                        (SELECT jsonb_object_agg(d::text, jsonb_build_object(
                                    'sales', round((random() * 10000)::numeric, 2),
                                    'customers', (random() * 400)::int))
                         FROM generate_series(1, 31) d)
                 FROM unnest($1::bigint[]) s, unnest($2::int[], $3::int[]) AS p(y, m)",
            )
            .bind(chunk)
            .bind(&years)
            .bind(&months)
            .execute(&mut *conn)
            .await
            .expect("preload");
        }
    }
}

/// The same starting point for every method: no GIN pending list left by the
/// previous one (its merge would be charged to whoever fills the list next),
/// fresh statistics, no dirty buffers from the previous method.
async fn settle(conn: &mut PgConnection) {
    conn.execute("VACUUM ANALYZE sales.monthly_sales")
        .await
        .unwrap();
    conn.execute("VACUUM ANALYZE sales.events").await.unwrap();
    conn.execute("CHECKPOINT").await.unwrap();
}

#[tokio::main]
async fn main() {
    let o = opts();
    let db = TestDb::new().await;
    let mut conn = db.connect().await;
    let settings: (String, String, String) = sqlx::query_as(
        "SELECT current_setting('server_version'), current_setting('synchronous_commit'), current_setting('shared_buffers')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let lib: String =
        sqlx::query_scalar("SELECT extversion FROM pg_extension WHERE extname = 'pg_sales'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    println!(
        "bench_upsert: database {} (Postgres {}, synchronous_commit={}, shared_buffers={}, pg_sales {lib}), {} cores",
        db.name,
        settings.0,
        settings.1,
        settings.2,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!("options: {o:?}");

    // Five slices of stores: four methods upsert into the table, the fifth
    // slice feeds COPY and the commit test. The first four are preloaded.
    let methods = 5;
    let spm = o.stores_per_method;
    let updates_per_store = (o.records / 2).div_ceil(spm);
    let preload_per_store = o.preload.div_ceil(4 * spm);
    let half = updates_per_store.max(preload_per_store);
    assert!(
        2 * half <= 707,
        "more than 707 months per store: raise --stores-per-method"
    );
    if preload_per_store < updates_per_store {
        println!(
            "note: --preload {} covers {preload_per_store} of the {updates_per_store} months per store that the \
             'update' half needs; the rest of that half inserts",
            o.preload
        );
    }
    let n_stores = methods * spm;
    let codes: Vec<String> = (0..n_stores).map(|i| format!("B{i:05}")).collect();
    let store_ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO sales.stores (code, name, region) SELECT c, 'Bench ' || c, 'North' FROM unnest($1::text[]) c RETURNING id",
    )
    .bind(&codes)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let slices: Vec<Slice> = store_ids
        .chunks(spm)
        .map(|c| Slice {
            stores: c.to_vec(),
            per_store: 2 * half,
        })
        .collect();

    if o.with_gin {
        conn.execute(
            "CREATE INDEX monthly_sales_daily_data_gin ON sales.monthly_sales \
             USING gin (daily_data jsonb_path_ops)",
        )
        .await
        .unwrap();
        println!("note: --with-gin: GIN index on daily_data created");
    }
    let t = Instant::now();
    preload(&mut conn, &slices[..4], preload_per_store).await;
    conn.execute("VACUUM ANALYZE sales.monthly_sales")
        .await
        .unwrap();
    conn.execute("CHECKPOINT").await.unwrap();
    let (rows, size): (i64, String) = sqlx::query_as(
        "SELECT count(*), pg_size_pretty(pg_total_relation_size('sales.monthly_sales')) FROM sales.monthly_sales",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    println!(
        "preloaded {rows} rows ({size} with indexes) in {:.1}s\n",
        t.elapsed().as_secs_f64()
    );

    // Wall-clock rows/s is what a client sees; the backend's CPU time per row
    // is what the work costs, and holds up better when other processes share
    // the machine (per-row methods mostly wait for commit flushes instead).
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let mut results: Vec<Measured> = Vec::new();
    let methods: [(&str, usize); 5] = [
        ("sales.batch_upsert", o.records),
        ("hand-written SQL (jsonb_to_recordset)", o.records),
        ("per-row upserts (one statement each)", o.per_row),
        ("batches of 50 per transaction", o.batch50),
        ("COPY into unlogged staging table (floor)", o.records),
    ];
    println!("{:<42} {:>10} {:>14}", "", "rows/s", "rows/CPU-s");
    for (m, (name, n)) in methods.into_iter().enumerate() {
        let keys = slices[m].keys(n);
        settle(&mut conn).await;
        let cpu0 = procfs::cpu_time(pid as u32);
        let seed = m + 1;
        let elapsed = match m {
            0 => {
                batches_via(
                    &mut conn,
                    "SELECT sales.batch_upsert($1::jsonb)",
                    &keys,
                    o.batch,
                    seed,
                )
                .await
            }
            1 => batches_via(&mut conn, HAND_SQL, &keys, o.batch, seed).await,
            2 => per_row(&mut conn, &keys, 1, seed).await,
            3 => per_row(&mut conn, &keys, 50, seed).await,
            _ => copy_floor(&mut conn, &keys, o.batch, seed).await,
        };
        let cpu = procfs::cpu_time(pid as u32) - cpu0;
        let r = Measured {
            name,
            records: n,
            elapsed,
            cpu,
        };
        println!(
            "{:<42} {:>10.0} {:>14.0}  ({n} records in {:.1}s, backend CPU {:.1}s)",
            r.name,
            r.rate(),
            r.cpu_rate(),
            elapsed.as_secs_f64(),
            cpu.as_secs_f64()
        );
        results.push(r);
    }

    let (bu, bu_cpu) = (results[0].rate(), results[0].cpu_rate());
    println!();
    println!("{:<32} {:>8} {:>11}", "ratios", "rows/s", "rows/CPU-s");
    for (label, i, target) in [
        ("batch_upsert / hand-written SQL", 1, "(target >= 0.9)"),
        ("batch_upsert / per-row", 2, "(target >= 30)"),
        ("batch_upsert / batches of 50", 3, ""),
        ("batch_upsert / COPY floor", 4, "(target >= 0.5)"),
    ] {
        println!(
            "{label:<32} {:>7.2}x {:>10.2}x  {target}",
            bu / results[i].rate(),
            bu_cpu / results[i].cpu_rate()
        );
    }

    growth(&mut conn, &o).await;
    drop(conn);
}

/// How the cost of `sales.batch_upsert` grows with the records per call, next
/// to COPY of the same records in chunks of the same size: new months of
/// stores of their own (inserts), at least 2,000 records per size, so a
/// fixed cost per call shows at the small end and a superlinear step at the
/// large end.
async fn growth(conn: &mut PgConnection, o: &Opts) {
    let sizes: Vec<usize> = o.growth.clone();
    if sizes.is_empty() {
        return;
    }
    let totals: Vec<usize> = sizes
        .iter()
        .map(|&n| n.max(1) * (2000 / n.max(1)).max(2))
        .collect();
    let stores_n = 200usize;
    let months_needed = totals.iter().sum::<usize>().div_ceil(stores_n);
    assert!(
        months_needed <= 707,
        "--growth sizes too large for 200 stores"
    );
    let codes: Vec<String> = (0..stores_n).map(|i| format!("G{i:05}")).collect();
    let stores: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO sales.stores (code, name, region) SELECT c, 'Growth ' || c, 'North' FROM unnest($1::text[]) c RETURNING id",
    )
    .bind(&codes)
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    println!();
    println!("Growth with the records per call (inserts of 31-day months; COPY in chunks of the same size):");
    println!(
        "{:>8} {:>7} {:>14} {:>14} {:>14} {:>14} {:>9}",
        "records",
        "calls",
        "batch ms/call",
        "batch us/rec",
        "COPY ms/call",
        "COPY us/rec",
        "vs COPY"
    );
    let mut next = 0usize;
    for (&size, &total) in sizes.iter().zip(&totals) {
        let keys: Vec<(i64, i32, i32)> = (next..next + total)
            .map(|i| {
                let (y, m) = period(i / stores_n);
                (stores[i % stores_n], y, m)
            })
            .collect();
        next += total;
        settle(conn).await;
        let batch = batches_via(conn, "SELECT sales.batch_upsert($1::jsonb)", &keys, size, 7).await;
        conn.execute("TRUNCATE public.bench_stage").await.unwrap();
        let copy = copy_floor(conn, &keys, size, 7).await;
        let calls = total.div_ceil(size);
        let per_call = |d: Duration| d.as_secs_f64() * 1e3 / calls as f64;
        let per_rec = |d: Duration| d.as_secs_f64() * 1e6 / total as f64;
        println!(
            "{size:>8} {calls:>7} {:>14.2} {:>14.1} {:>14.2} {:>14.1} {:>8.2}x",
            per_call(batch),
            per_rec(batch),
            per_call(copy),
            per_rec(copy),
            copy.as_secs_f64() / batch.as_secs_f64()
        );
    }
}
