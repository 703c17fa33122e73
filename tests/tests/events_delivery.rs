//! The event log's delivery guarantees (extension/src/delivery.rs):
//! a transaction that writes no events never holds delivery back; a reader
//! long-polling `sales.events_next` wakes for every commit (and for an abort
//! that stopped holding others back) without relying on NOTIFY; coalesced
//! NOTIFYs with many writers lose nothing; a row's versions come in order;
//! and the order survives a Postgres restart.

use sales_e2e::private_pg::PrivatePg;
use sales_e2e::{eventually, TestDb};
use serde_json::json;
use sqlx::{Connection, Row};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// One long poll: events after `after`, waiting up to `wait_ms`.
async fn next(c: &mut sqlx::PgConnection, after: i64, wait_ms: i32) -> Vec<(i64, i64)> {
    sqlx::query("SELECT id, seq FROM sales.events_next($1, 1000, $2)")
        .bind(after)
        .bind(wait_ms)
        .fetch_all(c)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("id"), r.get("seq")))
        .collect()
}

async fn head(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT sales.events_head()")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn announce<'e>(on: impl sqlx::PgExecutor<'e>, msg: &str) -> i64 {
    sqlx::query_scalar("SELECT sales.announce($1)")
        .bind(msg)
        .fetch_one(on)
        .await
        .unwrap()
}

/// The stall case, shortened: an idle transaction that holds a
/// transaction id (and one that has written to an unrelated table) stays
/// open while writes go on; every write's event is delivered to a
/// long-polling reader while it is open.
#[tokio::test]
async fn a_transaction_without_events_never_holds_delivery_back() {
    let db = TestDb::new().await;
    db.stores(1).await;
    sqlx::query("CREATE TABLE scratch (x int)")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut idle = db.connect().await;
    sqlx::query("BEGIN").execute(&mut idle).await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut idle)
        .await
        .unwrap();
    let mut report = db.connect().await;
    sqlx::query("BEGIN").execute(&mut report).await.unwrap();
    sqlx::query("INSERT INTO scratch SELECT generate_series(1, 1000)")
        .execute(&mut report)
        .await
        .unwrap();

    let mut reader = db.connect().await;
    let mut pos = head(&db.pool).await;
    for i in 0..10 {
        let id = announce(&db.pool, &format!("write {i}")).await;
        // Bounded: the long poll returns as soon as the event is deliverable.
        let got = next(&mut reader, pos, 30_000).await;
        assert_eq!(
            got.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![id],
            "write {i} delivered while the two transactions stay open"
        );
        pos = id;
    }
    let holders: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.event_holders()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(holders, 0, "neither open transaction holds delivery back");
    sqlx::query("ROLLBACK").execute(&mut idle).await.unwrap();
    sqlx::query("ROLLBACK").execute(&mut report).await.unwrap();
}

/// An event-writing transaction holds back later events only while it runs,
/// is named by `sales.event_holders()`, and its rollback wakes the reader.
#[tokio::test]
async fn an_open_event_writer_holds_back_until_it_ends_and_is_named() {
    let db = TestDb::new().await;
    let mut reader = db.connect().await;
    let pos = head(&db.pool).await;

    let mut writer = db.connect().await;
    sqlx::query("BEGIN").execute(&mut writer).await.unwrap();
    sqlx::query("SELECT sales.announce('rolled back')")
        .execute(&mut writer)
        .await
        .unwrap();
    let writer_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut writer)
        .await
        .unwrap();
    let later = announce(&db.pool, "later").await;
    assert!(
        next(&mut reader, pos, 0).await.is_empty(),
        "held back by the open writer"
    );
    let holders = sqlx::query("SELECT pid, since, query_start FROM sales.event_holders()")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0].get::<i32, _>("pid"), writer_pid);
    let (holder, held, oldest): (Option<i32>, i64, Option<i64>) =
        sqlx::query_as("SELECT holder_pid, held_back, oldest_held_id FROM sales.event_delivery")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (holder, held, oldest),
        (Some(writer_pid), 1, Some(later)),
        "the committed event is held back by the open writer"
    );

    // The reader long-polls; the rollback (no NOTIFY) wakes it.
    let url = db.url.clone();
    let poll = tokio::spawn(async move {
        let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
        next(&mut c, pos, 60_000).await
    });
    // Give the poll a chance to be waiting (not needed for correctness).
    eventually(Duration::from_secs(30), "reader waiting", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT id, seq FROM sales.events_next%' AND state = 'active'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        (n > 0).then_some(())
    })
    .await;
    sqlx::query("ROLLBACK").execute(&mut writer).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), poll)
        .await
        .expect("the rollback woke the reader")
        .unwrap();
    assert_eq!(got.iter().map(|e| e.0).collect::<Vec<_>>(), vec![later]);
}

/// Thirty-two writers committing small transactions at once (NOTIFYs
/// coalesced, the default), one reader using only the long poll: every
/// event arrives once, in seq order, and the reader catches up.
#[tokio::test]
async fn coalesced_wakeups_lose_nothing_with_32_writers() {
    let db = TestDb::new().await;
    let stores = db.stores(32).await;
    let start = head(&db.pool).await;
    const WRITERS: usize = 32;
    const TXNS: usize = 15;
    let mut tasks = Vec::new();
    for (w, &store) in stores.iter().enumerate() {
        let url = db.url.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
            for t in 0..TXNS {
                sqlx::query("SELECT sales.batch_upsert($1)")
                    .bind(
                        json!([{"storeId": store, "year": 2024, "month": 1 + (t % 12),
                                  "dailyData": {"1": {"sales": (w * 100 + t) as f64}}}]),
                    )
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
        }));
    }
    let url = db.url.clone();
    let expected = WRITERS * TXNS * 2; // a row event and a batch-completed each
    let reader = tokio::spawn(async move {
        let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
        let mut seen = Vec::new();
        let mut pos = start;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while seen.len() < expected {
            assert!(
                tokio::time::Instant::now() < deadline,
                "reader stuck at {} of {expected}",
                seen.len()
            );
            for (id, seq) in next(&mut c, pos, 5_000).await {
                seen.push((seq, id));
                pos = id;
            }
        }
        seen
    });
    for t in tasks {
        t.await.unwrap();
    }
    let seen = reader.await.unwrap();
    let ids: HashSet<i64> = seen.iter().map(|e| e.1).collect();
    assert_eq!(ids.len(), seen.len(), "an event was delivered twice");
    let all: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM sales.events WHERE id > $1 ORDER BY seq")
            .bind(start)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(seen.iter().map(|e| e.1).collect::<Vec<_>>(), all);
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "seq order");
}

/// Overlapping transactions on the same rows: in delivery order, each row's
/// version only goes up, whatever order the transactions took their ids in.
#[tokio::test]
async fn a_rows_versions_are_delivered_in_order() {
    let db = TestDb::new().await;
    let stores = db.stores(2).await;
    let mut rows = Vec::new();
    for &s in &stores {
        for m in 1..=3 {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO sales.monthly_sales (store_id, year, month) VALUES ($1, 2024, $2) RETURNING id",
            )
            .bind(s)
            .bind(m)
            .fetch_one(&db.pool)
            .await
            .unwrap();
            rows.push(id);
        }
    }
    let start = head(&db.pool).await;
    let mut tasks = Vec::new();
    for w in 0..8usize {
        let url = db.url.clone();
        let rows = rows.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
            // Deadlock victims are found quickly.
            sqlx::query("SET deadlock_timeout = '20ms'")
                .execute(&mut c)
                .await
                .unwrap();
            for t in 0..10usize {
                // Each transaction first writes a row of its own choosing
                // (taking its first seq early), pauses, then updates a
                // contended row: it may wait for that row's lock behind a
                // transaction that started later. Lock cycles are possible
                // (the rows are taken in no fixed order): a deadlock victim
                // is retried, as an application would.
                let first = rows[(w + t) % rows.len()];
                let contended = rows[(w * 7 + t * 3) % rows.len()];
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    assert!(attempts < 50, "too many deadlocks");
                    let mut tx = c.begin().await.unwrap();
                    let mut failed = false;
                    for (i, row) in [first, contended].into_iter().enumerate() {
                        let r = sqlx::query(
                            "UPDATE sales.monthly_sales SET daily_data = daily_data || jsonb_build_object('1', jsonb_build_object('sales', $2::int)) WHERE id = $1",
                        )
                        .bind(row)
                        .bind((w * 1000 + t * 10 + i) as i32)
                        .execute(&mut *tx)
                        .await;
                        match r {
                            Ok(_) => {}
                            Err(e) if sales_e2e::sqlstate(&e).as_deref() == Some("40P01") => {
                                failed = true;
                                break;
                            }
                            Err(e) => panic!("{e}"),
                        }
                        if i == 0 {
                            tokio::time::sleep(Duration::from_millis((w as u64 * 3 + t as u64) % 15)).await;
                        }
                    }
                    if failed {
                        tx.rollback().await.unwrap();
                        continue;
                    }
                    tx.commit().await.unwrap();
                    break;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every writer has committed: nothing of this database is held back.
    let delivered: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT row_id, row_version FROM sales.events_since($1, 100000) WHERE kind = 'sales-data-updated'",
    )
    .bind(start)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(delivered.len(), 8 * 10 * 2);
    let mut last: HashMap<i64, i64> = HashMap::new();
    for (row, version) in delivered {
        let prev = last.insert(row, version);
        assert!(
            prev.is_none_or(|p| p < version),
            "row {row}: version {version} after {prev:?}"
        );
    }
}

/// The clock lives in shared memory: after a crash restart it continues past the
/// log, so positions keep increasing and a reader resumes without a gap.
#[tokio::test]
async fn delivery_order_survives_a_restart() {
    let pg = tokio::task::spawn_blocking(PrivatePg::start).await.unwrap();
    let (url, pool) = pg.create_database("restart_order").await;
    let before = announce(&pool, "before").await;
    let seq_before: i64 = sqlx::query_scalar("SELECT seq FROM sales.events WHERE id = $1")
        .bind(before)
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    // A crash (immediate stop): shared memory starts over.
    let pg = tokio::task::spawn_blocking(move || {
        pg.stop_server("immediate").unwrap();
        pg.start_server().unwrap();
        pg
    })
    .await
    .unwrap();
    let pool = pg.pool(&url, 2).await;
    // Before anyone writes again, the log is readable to its end.
    let got: Vec<i64> = sqlx::query_scalar("SELECT id FROM sales.events_since(0, 1000)")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        got.last(),
        Some(&before),
        "the old events are final after the restart"
    );
    let after = announce(&pool, "after").await;
    let seq_after: i64 = sqlx::query_scalar("SELECT seq FROM sales.events WHERE id = $1")
        .bind(after)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(seq_after > seq_before, "{seq_after} > {seq_before}");
    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
    let got = next(&mut c, before, 10_000).await;
    assert_eq!(got.iter().map(|e| e.0).collect::<Vec<_>>(), vec![after]);
}

/// A commit that does not wait for its flush (`synchronous_commit = off`)
/// is visible before it is durable, and a crash can take it back. A reader
/// is handed its event only once it is durable: after a crash the event is
/// still in the log, so the clock does not give its seq again to a new
/// event, which a reader already past that seq would skip.
#[tokio::test]
async fn an_event_read_after_an_asynchronous_commit_survives_a_crash() {
    let pg = tokio::task::spawn_blocking(PrivatePg::start).await.unwrap();
    let (url, pool) = pg.create_database("async_commit").await;
    // The WAL writer writes an asynchronous commit out only every 10 s
    // here (its longest wait), or at once when it was idle (hibernating);
    // nothing else writes WAL out in this cluster.
    for sql in [
        "ALTER SYSTEM SET wal_writer_delay = '10s'",
        "ALTER SYSTEM SET autovacuum = off",
        "SELECT pg_reload_conf()",
    ] {
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
    }
    eventually(Duration::from_secs(30), "the new settings", || async {
        let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
        let delay: String = sqlx::query_scalar("SHOW wal_writer_delay")
            .fetch_one(&mut c)
            .await
            .unwrap();
        (delay == "10s").then_some(())
    })
    .await;
    let mut writer = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("SET synchronous_commit = off")
        .execute(&mut writer)
        .await
        .unwrap();
    // A first asynchronous commit wakes an idle WAL writer, which writes
    // it out and then sleeps its 10 s.
    announce(&mut writer, "wakes the WAL writer").await;
    let written: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the first commit flushed",
        || async {
            sqlx::query_scalar::<_, bool>("SELECT pg_current_wal_flush_lsn() >= $1::pg_lsn")
                .bind(&written)
                .fetch_one(&pool)
                .await
                .unwrap()
                .then_some(())
        },
    )
    .await;
    // The event the test reads: one whose commit is not written out yet
    // (the WAL write position short of the commit). A WAL writer that was
    // idle before the first commit may write the next one out too, at
    // once; it is idle no more after that.
    let mut id = 0;
    for _ in 0..20 {
        id = announce(&mut writer, "asynchronous").await;
        let unwritten: bool =
            sqlx::query_scalar("SELECT pg_current_wal_lsn() < pg_current_wal_insert_lsn()")
                .fetch_one(&mut writer)
                .await
                .unwrap();
        if unwritten {
            break;
        }
        id = 0;
    }
    assert_ne!(
        id,
        0,
        "every commit was written out at once: {}",
        pg.log_tail()
    );
    let seq: i64 = sqlx::query_scalar("SELECT seq FROM sales.events WHERE id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    let read: Vec<i64> = sqlx::query_scalar("SELECT id FROM sales.events_since(0, 1000)")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(read.last(), Some(&id), "the event is read");
    drop(writer);
    pool.close().await;
    let pg = tokio::task::spawn_blocking(move || {
        pg.stop_server("immediate").unwrap();
        pg.start_server().unwrap();
        pg
    })
    .await
    .unwrap();
    let pool = pg.pool(&url, 2).await;
    let kept: Option<i64> = sqlx::query_scalar("SELECT seq FROM sales.events WHERE id = $1")
        .bind(id)
        .fetch_optional(&pool)
        .await
        .unwrap();
    assert_eq!(kept, Some(seq), "the event read before the crash is kept");
    let next = announce(&pool, "after the crash").await;
    let next_seq: i64 = sqlx::query_scalar("SELECT seq FROM sales.events WHERE id = $1")
        .bind(next)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(next_seq > seq, "{next_seq} > {seq}");
}

/// A row moved to another store or month by plain SQL names the key it left,
/// so consumers can clear the old store-month (the cache) and tell the old
/// store's subscribers.
#[tokio::test]
async fn a_moved_row_names_the_key_it_left() {
    let db = TestDb::new().await;
    let s = db.stores(2).await;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data) VALUES ($1, 2024, 3, '{\"1\": {\"sales\": 5}}') RETURNING id",
    )
    .bind(s[0])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let payload_of_last = || async {
        sqlx::query_scalar::<_, serde_json::Value>(
            "SELECT payload FROM sales.events WHERE row_id = $1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    sqlx::query("UPDATE sales.monthly_sales SET month = 4 WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    let p = payload_of_last().await;
    assert_eq!(
        (
            &p["month"],
            &p["previousYear"],
            &p["previousMonth"],
            p.get("previousStoreId")
        ),
        (&json!(4), &json!(2024), &json!(3), None),
        "{p}"
    );
    sqlx::query("UPDATE sales.monthly_sales SET store_id = $2 WHERE id = $1")
        .bind(id)
        .bind(s[1])
        .execute(&db.pool)
        .await
        .unwrap();
    let p = payload_of_last().await;
    assert_eq!(p["previousStoreId"], json!(s[0]), "{p}");
    assert!(p.get("previousMonth").is_none(), "{p}");
}
