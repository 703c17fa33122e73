//! The event path's cost and delay (issue "Live path"), in one run:
//!
//! 1. Commits/s of concurrent single-row upserts with the event triggers off,
//!    on with the shipped defaults, and on with one NOTIFY per transaction
//!    (`sales.notify_coalesce = off`, the behaviour before coalescing), at 8
//!    and 32 writers, with this machine's commit flush and with a flush made
//!    1 ms slower (`commit_delay = 1000`, which sleeps in the WAL flush like a
//!    slow cloud disk). It also counts the NOTIFYs a listener received per
//!    commit: with coalescing, few commits take the cluster-wide notify lock.
//! 2. The delay an idle transaction that holds a transaction id
//!    (`BEGIN; SELECT pg_current_xact_id();`, held for `--stall-seconds`) adds
//!    to delivery: one event every 100 ms, read by a long-polling reader
//!    (`sales.events_next`), latency from sending the write to the reader
//!    having it, with and without the idle session.
//!
//! Run with `scripts/bench_events.sh [--seconds 5] [--stall-seconds 60]`.
//! The database is created for the run and dropped afterwards.

use clap::Parser;
use sales_e2e::fixtures::procfs;
use sales_e2e::TestDb;
use sqlx::postgres::PgListener;
use sqlx::{Connection, Executor, PgConnection};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The event path's cost and delay (see the header of tests/src/bin/bench_events.rs).
#[derive(Debug, Parser)]
struct Opts {
    /// Seconds per commit-rate measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Seconds the idle transaction is held.
    #[arg(long, default_value_t = 60)]
    stall_seconds: u64,
    /// Off/on pairs per row of the table (their order alternates, so a
    /// drift of the machine over the run weighs on both); the ratio printed
    /// is the median of the pairs'.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn opts() -> Opts {
    Opts::parse()
}

const ROW_SQL: &str = r#"
INSERT INTO sales.monthly_sales AS t (store_id, year, month, daily_data)
VALUES ($1, $2, $3, $4::jsonb)
ON CONFLICT (store_id, year, month) DO UPDATE SET daily_data = t.daily_data || EXCLUDED.daily_data
"#;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Off,
    Defaults,
    NotifyEach,
}

struct Run {
    per_sec: f64,
    notifies_per_commit: f64,
    /// Writers' backend CPU per commit.
    cpu_us: f64,
}

async fn set_event_triggers(conn: &mut PgConnection, enabled: bool) {
    let verb = if enabled { "ENABLE" } else { "DISABLE" };
    for t in ["monthly_sales_events", "monthly_sales_events_del"] {
        conn.execute(format!("ALTER TABLE sales.monthly_sales {verb} TRIGGER {t}").as_str())
            .await
            .unwrap();
    }
}

/// Commits/s of `writers` connections each merging one day into rows of its
/// own store for `seconds`, and NOTIFYs received per commit meanwhile.
async fn commits(
    db: &TestDb,
    stores: &[i64],
    writers: usize,
    seconds: u64,
    mode: Mode,
    slow_flush: bool,
) -> Run {
    // Every cell starts right after a checkpoint, so each pays the same
    // full-page images (the first change of a page after a checkpoint logs
    // the whole page); otherwise where a cell falls in the checkpoint cycle
    // moves its figure by more than the difference being measured.
    sqlx::query("CHECKPOINT").execute(&db.pool).await.unwrap();
    let mut listener = PgListener::connect(&db.url).await.unwrap();
    listener.listen("sales_events").await.unwrap();
    let notes = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let (n2, c2) = (notes.clone(), counting.clone());
    let listen_task = tokio::spawn(async move {
        while let Ok(Some(_)) = listener.try_recv().await {
            if c2.load(Ordering::Relaxed) {
                n2.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut pids = Vec::new();
    for w in 0..writers {
        let store = stores[w % stores.len()];
        let (stop, count, counting) = (stop.clone(), count.clone(), counting.clone());
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        pids.push(
            sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
                .fetch_one(&mut conn)
                .await
                .unwrap(),
        );
        if slow_flush {
            conn.execute("SET commit_delay = 1000; SET commit_siblings = 0")
                .await
                .unwrap();
        }
        if mode == Mode::NotifyEach {
            conn.execute("SET sales.notify_coalesce = off")
                .await
                .unwrap();
        }
        tasks.push(tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let month = 1 + (i / 31) % 12;
                let day = format!(
                    "{{\"{}\": {{\"sales\": {}, \"customers\": 1}}}}",
                    1 + i % 28,
                    i % 997
                );
                sqlx::query(ROW_SQL)
                    .bind(store)
                    .bind(2024)
                    .bind(month as i32)
                    .bind(day)
                    .execute(&mut conn)
                    .await
                    .expect("commit");
                if counting.load(Ordering::Relaxed) {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // warm-up
    let cpu = || {
        pids.iter()
            .map(|p| procfs::cpu_time(*p as u32))
            .sum::<Duration>()
    };
    let cpu0 = cpu();
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    counting.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let used = cpu() - cpu0;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    // NOTIFYs of the last commits arrive just after them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    listen_task.abort();
    let n = count.load(Ordering::Relaxed);
    Run {
        per_sec: n as f64 / elapsed.as_secs_f64(),
        notifies_per_commit: notes.load(Ordering::Relaxed) as f64 / n.max(1) as f64,
        cpu_us: used.as_secs_f64() * 1e6 / n.max(1) as f64,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Sends one event every 100 ms for `seconds`, read by a long-polling
/// reader; returns each event's delay (ms) from sending the write to the
/// reader having it.
async fn delivery_delays(db: &TestDb, seconds: u64) -> Vec<f64> {
    let sent: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let got: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let mut reader = PgConnection::connect(&db.url).await.unwrap();
    let mut pos: i64 = sqlx::query_scalar("SELECT sales.events_head()")
        .fetch_one(&mut reader)
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (g2, s2) = (got.clone(), stop.clone());
    let read_task = tokio::spawn(async move {
        while !s2.load(Ordering::Relaxed) {
            let ids: Vec<i64> =
                sqlx::query_scalar("SELECT id FROM sales.events_next($1, 1000, 500)")
                    .bind(pos)
                    .fetch_all(&mut reader)
                    .await
                    .unwrap();
            let now = Instant::now();
            for id in ids {
                g2.lock().unwrap().insert(id, now);
                pos = id;
            }
        }
    });
    let mut writer = PgConnection::connect(&db.url).await.unwrap();
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while Instant::now() < until {
        tick.tick().await;
        let t0 = Instant::now();
        let id: i64 = sqlx::query_scalar("SELECT sales.announce('probe')")
            .fetch_one(&mut writer)
            .await
            .unwrap();
        sent.lock().unwrap().insert(id, t0);
    }
    // Bounded wait for the last ones.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let done = {
            let (s, g) = (sent.lock().unwrap(), got.lock().unwrap());
            s.keys().all(|k| g.contains_key(k))
        };
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    read_task.await.unwrap();
    let (s, g) = (sent.lock().unwrap(), got.lock().unwrap());
    let mut d: Vec<f64> = s
        .iter()
        .map(|(id, t0)| match g.get(id) {
            Some(t1) => t1.saturating_duration_since(*t0).as_secs_f64() * 1e3,
            None => f64::INFINITY,
        })
        .collect();
    d.sort_by(|a, b| a.partial_cmp(b).unwrap());
    d
}

#[tokio::main]
async fn main() {
    let o = opts();
    let db = TestDb::new().await;
    let stores = db.stores(64).await;
    let mut admin = db.connect().await;

    println!(
        "Commits/s, single-row upserts (one day merged into the writer's own rows), {} s each",
        o.seconds
    );
    println!(
        "{:<8} {:<13} {:>10} {:>22} {:>22} {:>7} {:>8}   backend CPU/commit off / on",
        "writers",
        "flush",
        "events off",
        "events on (defaults)",
        "on, NOTIFY each",
        "on/off",
        "each/off"
    );
    let mut worst = f64::INFINITY;
    // The middle value; for an even count, the mean of the two middle ones.
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let m = v.len() / 2;
        if v.len().is_multiple_of(2) {
            (v[m - 1] + v[m]) / 2.0
        } else {
            v[m]
        }
    };
    for slow in [false, true] {
        for writers in [8usize, 32] {
            let mut pairs: Vec<(Run, Run)> = Vec::new();
            for round in 0..o.rounds.max(1) {
                let order = if round % 2 == 0 {
                    [Mode::Off, Mode::Defaults]
                } else {
                    [Mode::Defaults, Mode::Off]
                };
                let (mut off, mut on) = (None, None);
                for mode in order {
                    set_event_triggers(&mut admin, mode != Mode::Off).await;
                    let run = commits(&db, &stores, writers, o.seconds, mode, slow).await;
                    *if mode == Mode::Off { &mut off } else { &mut on } = Some(run);
                }
                pairs.push((off.expect("measured"), on.expect("measured")));
            }
            set_event_triggers(&mut admin, true).await;
            let each = commits(&db, &stores, writers, o.seconds, Mode::NotifyEach, slow).await;
            let ratios: Vec<f64> = pairs
                .iter()
                .map(|(off, on)| on.per_sec / off.per_sec)
                .collect();
            let ratio = median(ratios.clone());
            let off_rate = median(pairs.iter().map(|p| p.0.per_sec).collect());
            let on_rate = median(pairs.iter().map(|p| p.1.per_sec).collect());
            let notes = median(pairs.iter().map(|p| p.1.notifies_per_commit).collect());
            worst = worst.min(ratio);
            println!(
                "{:<8} {:<13} {:>10.0} {:>7.0} ({:.2} NOTIFY/c) {:>7.0} ({:.2} NOTIFY/c) {:>6.2}x {:>7.2}x   {:.0} / {:.0} us   pairs: {}",
                writers,
                if slow { "+1 ms" } else { "this machine" },
                off_rate,
                on_rate,
                notes,
                each.per_sec,
                each.notifies_per_commit,
                ratio,
                each.per_sec / off_rate,
                median(pairs.iter().map(|p| p.0.cpu_us).collect()),
                median(pairs.iter().map(|p| p.1.cpu_us).collect()),
                ratios
                    .iter()
                    .map(|r| format!("{r:.2}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
    }
    println!(
        "events on / off (median of {} pairs), lowest of the four: {worst:.2}x (target >= 0.9)",
        o.rounds.max(1)
    );

    println!();
    println!(
        "Delivery delay (send the write -> a long-polling reader has it), one event per 100 ms:"
    );
    let base = delivery_delays(&db, 10).await;
    let mut idle = db.connect().await;
    idle.execute("BEGIN").await.unwrap();
    idle.execute("SELECT pg_current_xact_id()").await.unwrap();
    let stalled = delivery_delays(&db, o.stall_seconds).await;
    idle.execute("ROLLBACK").await.unwrap();
    for (label, d) in [
        ("no other transaction".to_string(), &base),
        (
            format!("idle transaction holding an xid, {} s", o.stall_seconds),
            &stalled,
        ),
    ] {
        println!(
            "  {label:<44} n={:<4} p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>6.2} ms",
            d.len(),
            percentile(d, 0.5),
            percentile(d, 0.99),
            d.last().copied().unwrap_or(f64::NAN)
        );
    }
    println!(
        "  delay the idle transaction adds at p99: {:.2} ms (target: p99 <= 100 ms with it open)",
        percentile(&stalled, 0.99) - percentile(&base, 0.99)
    );
    drop(admin);
}
