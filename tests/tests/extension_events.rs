//! Events: one row per changed row from every write path, one NOTIFY per
//! transaction (so one per statement or batch), nothing from rolled-back
//! work, `events_since` never skipping a late-committing event, announcements,
//! user notifications, `events_head`, `prune_events` and PS410.

mod extension_support;

use extension_support::*;
use rand::{Rng, SeedableRng};
use sales_e2e::{eventually, TestDb};
use serde_json::{json, Value};
use sqlx::{Connection, Row};
use std::collections::HashSet;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
struct Ev {
    id: i64,
    kind: String,
    store_id: Option<i64>,
    user_id: Option<i64>,
    actor_id: Option<i64>,
    row_id: Option<i64>,
    row_version: Option<i64>,
    payload: Value,
}

fn ev(r: &sqlx::postgres::PgRow) -> Ev {
    Ev {
        id: r.get("id"),
        kind: r.get("kind"),
        store_id: r.get("store_id"),
        user_id: r.get("user_id"),
        actor_id: r.get("actor_id"),
        row_id: r.get("row_id"),
        row_version: r.get("row_version"),
        payload: r.get("payload"),
    }
}

/// Events with id > `after`, in id order, read from the table itself.
async fn events_after(db: &TestDb, after: i64) -> Vec<Ev> {
    sqlx::query("SELECT * FROM sales.events WHERE id > $1 ORDER BY id")
        .bind(after)
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .iter()
        .map(ev)
        .collect()
}

async fn max_event(db: &TestDb) -> i64 {
    scalar_i64(db, "SELECT coalesce(max(id), 0) FROM sales.events").await
}

async fn exec(db: &TestDb, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn since(db: &TestDb, after: i64, max: i32) -> Result<Vec<(i64, i64)>, sqlx::Error> {
    let rows = sqlx::query("SELECT id, seq FROM sales.events_since($1, $2)")
        .bind(after)
        .bind(max)
        .fetch_all(&db.pool)
        .await?;
    Ok(rows.iter().map(|r| (r.get("id"), r.get("seq"))).collect())
}

#[tokio::test]
async fn every_write_path_appends_events() {
    let db = TestDb::new().await;
    let s = db.stores(2).await;
    let created = events_after(&db, 0).await;
    assert_eq!(created.len(), 2);
    assert!(created
        .iter()
        .all(|e| e.kind == "store-created" && e.row_version == Some(1)));
    assert_eq!(created[0].payload["code"], "T001");
    assert_eq!(created[0].store_id, Some(s[0]));

    // A batch through the function, with the actor set as the server does.
    let mut last = max_event(&db).await;
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SELECT set_config('sales.user_id', '42', true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let r: Value = sqlx::query_scalar("SELECT sales.batch_upsert($1)")
        .bind(json!([
            record(s[0], 2024, 1, days(1, 2, 10.0, 1)),
            record(s[1], 2024, 1, days(1, 1, 5.0, 1))
        ]))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let evs = events_after(&db, last).await;
    let kinds: Vec<&str> = evs.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        vec![
            "sales-data-created",
            "sales-data-created",
            "batch-completed"
        ]
    );
    assert_eq!(evs[2].id, r["eventId"].as_i64().unwrap());
    for e in &evs {
        assert_eq!(e.actor_id, Some(42), "{e:?}");
        assert_eq!(
            e.user_id, None,
            "only user notifications have a user_id: {e:?}"
        );
    }
    assert_eq!(evs[0].store_id, Some(s[0]));
    assert_eq!(evs[0].row_version, Some(1));
    assert_eq!(evs[0].payload["totalSales"], json!(20.0));
    assert_eq!(evs[0].payload["changedDays"], json!(["1", "2"]));
    assert_eq!(evs[2].payload["storeIds"], json!([s[0], s[1]]));
    let row_id = evs[0].row_id.unwrap();

    // Plain SQL UPDATE by anyone: an event with the new version and the changed days.
    last = max_event(&db).await;
    exec(
        &db,
        &format!(
            "UPDATE sales.monthly_sales SET daily_data = daily_data - '2' || '{{\"9\": {{\"sales\": 1}}}}' WHERE id = {row_id}"
        ),
    )
    .await;
    let evs = events_after(&db, last).await;
    assert_eq!(evs.len(), 1);
    assert_eq!(
        (evs[0].kind.as_str(), evs[0].row_id, evs[0].row_version),
        ("sales-data-updated", Some(row_id), Some(2))
    );
    assert_eq!(evs[0].payload["changedDays"], json!(["2", "9"]));
    assert_eq!(evs[0].payload["version"], 2);
    assert_eq!(evs[0].actor_id, None);

    // A no-op UPDATE changes no version and makes no event.
    last = max_event(&db).await;
    exec(
        &db,
        "UPDATE sales.monthly_sales SET daily_data = daily_data, version = 99",
    )
    .await;
    assert!(events_after(&db, last).await.is_empty());
    assert_eq!(
        scalar_i64(
            &db,
            &format!("SELECT version FROM sales.monthly_sales WHERE id = {row_id}")
        )
        .await,
        2
    );

    // Plain INSERT, and INSERT ... ON CONFLICT DO UPDATE.
    exec(
        &db,
        &format!(
            "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data) VALUES ({0}, 2024, 2, '{{}}'), ({0}, 2024, 1, '{{\"3\": {{\"sales\": 3}}}}')
             ON CONFLICT (store_id, year, month) DO UPDATE SET daily_data = EXCLUDED.daily_data",
            s[0]
        ),
    )
    .await;
    let evs = events_after(&db, last).await;
    let kinds: HashSet<&str> = evs.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(evs.len(), 2);
    assert_eq!(
        kinds,
        HashSet::from(["sales-data-created", "sales-data-updated"])
    );
    let upd = evs.iter().find(|e| e.kind == "sales-data-updated").unwrap();
    assert_eq!(upd.row_version, Some(3));

    // Plain DELETE: the event carries the version after the row's last one.
    last = max_event(&db).await;
    exec(
        &db,
        &format!("DELETE FROM sales.monthly_sales WHERE id = {row_id}"),
    )
    .await;
    let evs = events_after(&db, last).await;
    assert_eq!(evs.len(), 1);
    assert_eq!(
        (evs[0].kind.as_str(), evs[0].row_id, evs[0].row_version),
        ("sales-data-deleted", Some(row_id), Some(4))
    );
    assert_eq!(evs[0].payload["month"], 1);

    // Stores: status change, other change, delete (cascading to its months).
    last = max_event(&db).await;
    exec(
        &db,
        &format!(
            "UPDATE sales.stores SET status = 'renovating' WHERE id = {}",
            s[1]
        ),
    )
    .await;
    exec(
        &db,
        &format!(
            "UPDATE sales.stores SET name = 'Renamed' WHERE id = {}",
            s[1]
        ),
    )
    .await;
    exec(
        &db,
        &format!("UPDATE sales.stores SET name = name WHERE id = {}", s[1]),
    )
    .await;
    let evs = events_after(&db, last).await;
    let kinds: Vec<&str> = evs.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, vec!["store-status-changed", "store-updated"]);
    assert_eq!(evs[0].payload["status"], "renovating");
    assert_eq!(evs[0].payload["previousStatus"], "open");
    // The region it had: a region's follower sees a store leave it.
    assert_eq!(evs[1].payload["previousRegion"], evs[1].payload["region"]);
    assert_eq!((evs[0].row_version, evs[1].row_version), (Some(2), Some(3)));
    assert_eq!(evs[1].payload["name"], "Renamed");

    last = max_event(&db).await;
    exec(
        &db,
        &format!("DELETE FROM sales.stores WHERE id = {}", s[1]),
    )
    .await;
    let evs = events_after(&db, last).await;
    let kinds: HashSet<&str> = evs.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        HashSet::from(["store-deleted", "sales-data-deleted"])
    );
    assert!(evs.iter().all(|e| e.store_id == Some(s[1])));

    // Ids cannot change (events join old and new rows by id).
    let e = sqlx::query("UPDATE sales.stores SET id = id + 1000")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert_eq!(pg_error(&e).0, "22023");
}

#[tokio::test]
async fn one_notify_per_statement_batch_and_transaction() {
    let db = TestDb::new().await;
    let s = db.stores(10).await;
    let mut notes = Notifications::listen(&db).await;
    assert_eq!(
        notes.drain(&db).await.len(),
        0,
        "nothing before the first write"
    );

    // A 5,000-record batch: one NOTIFY, carrying the batch event id (the highest).
    let batch: Vec<Value> = (0..5000)
        .map(|k| {
            record(
                s[k % 10],
                2000 + (k / 120) as i32,
                1 + (k / 10 % 12) as i32,
                days(1, 28, 1.0, 1),
            )
        })
        .collect();
    let r = upsert_ok(&db, &Value::Array(batch)).await;
    assert_eq!(r["inserted"], 5000);
    let ids = notes.drain(&db).await;
    assert_eq!(ids, vec![r["eventId"].as_i64().unwrap()]);
    assert_eq!(ids[0], max_event(&db).await);

    // A plain UPDATE of 5,000 rows: one.
    exec(
        &db,
        "UPDATE sales.monthly_sales SET daily_data = daily_data || '{\"1\": {\"sales\": 2}}'",
    )
    .await;
    assert_eq!(notes.drain(&db).await, vec![max_event(&db).await]);
    // INSERT ... ON CONFLICT that both inserts and updates: one.
    exec(
        &db,
        &format!(
            "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data) VALUES ({0}, 2000, 1, '{{}}'), ({0}, 2099, 1, '{{}}')
             ON CONFLICT (store_id, year, month) DO UPDATE SET daily_data = EXCLUDED.daily_data",
            s[0]
        ),
    )
    .await;
    assert_eq!(notes.drain(&db).await, vec![max_event(&db).await]);
    // A store delete that cascades to its months: one.
    exec(
        &db,
        &format!("DELETE FROM sales.stores WHERE id = {}", s[2]),
    )
    .await;
    assert_eq!(notes.drain(&db).await, vec![max_event(&db).await]);
    // batch_delete: one.
    let r: Value = sqlx::query_scalar("SELECT sales.batch_delete(NULL, $1)")
        .bind(json!([{"storeId": s[0], "year": 2099, "month": 1}]))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(notes.drain(&db).await, vec![r["eventId"].as_i64().unwrap()]);
    // Statements that change nothing: none.
    exec(
        &db,
        "UPDATE sales.monthly_sales SET daily_data = daily_data WHERE month = 1",
    )
    .await;
    exec(&db, "UPDATE sales.stores SET status = 'open' WHERE false").await;
    exec(&db, "DELETE FROM sales.monthly_sales WHERE year = 1999").await;
    let r = upsert_ok(&db, &json!([])).await;
    assert!(r["eventId"].is_null());
    assert!(notes.drain(&db).await.is_empty());
    // Several statements in one transaction: one, at commit, with the highest id.
    let mut tx = db.pool.begin().await.unwrap();
    for m in 1..=3 {
        sqlx::query("UPDATE sales.monthly_sales SET daily_data = daily_data || '{\"5\": {\"sales\": 5}}' WHERE month = $1")
            .bind(m)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::query("SELECT sales.announce('done')")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(notes.drain(&db).await, vec![max_event(&db).await]);
}

#[tokio::test]
async fn rolled_back_work_leaves_no_events_and_no_notify() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    let mut notes = Notifications::listen(&db).await;
    notes.drain(&db).await;
    let before = max_event(&db).await;

    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SELECT sales.batch_upsert($1)")
        .bind(json!([record(s, 2024, 1, days(1, 31, 1.0, 1))]))
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SELECT sales.announce('never')")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(events_after(&db, before).await.is_empty());
    assert!(notes.drain(&db).await.is_empty());

    // A failed statement (CHECK violation) rolls its events back too.
    let e = sqlx::query("INSERT INTO sales.monthly_sales (store_id, year, month, daily_data) VALUES ($1, 2024, 4, '{\"31\": {\"sales\": 1}}')")
        .bind(s)
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert_eq!(pg_error(&e).0, "23514");
    assert!(events_after(&db, before).await.is_empty());
    assert!(notes.drain(&db).await.is_empty());

    // A rolled-back savepoint takes its events (and its claim on the NOTIFY)
    // with it; the transaction's later write still wakes listeners, once.
    let mut conn = db.connect().await;
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("SAVEPOINT a").execute(&mut *tx).await.unwrap();
    sqlx::query("SELECT sales.batch_upsert($1)")
        .bind(json!([record(s, 2024, 2, days(1, 3, 1.0, 1))]))
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("ROLLBACK TO SAVEPOINT a")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SELECT sales.batch_upsert($1)")
        .bind(json!([record(s, 2024, 3, days(1, 3, 1.0, 1))]))
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let evs = events_after(&db, before).await;
    assert_eq!(evs.len(), 2, "{evs:?}");
    assert_eq!(evs[0].payload["month"], 3);
    assert_eq!(notes.drain(&db).await, vec![evs[1].id]);

    // A savepoint rolled back after the transaction's last write: the
    // NOTIFY names the newest event that survived, not the newest written.
    let before = evs[1].id;
    let insert = "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data) \
                  VALUES ($1, 2024, $2, '{\"1\": {\"sales\": 1}}')";
    let mut tx = conn.begin().await.unwrap();
    sqlx::query(insert)
        .bind(s)
        .bind(5)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SAVEPOINT b").execute(&mut *tx).await.unwrap();
    sqlx::query(insert)
        .bind(s)
        .bind(6)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("ROLLBACK TO SAVEPOINT b")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let evs = events_after(&db, before).await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0].payload["month"], 5);
    assert_eq!(notes.drain(&db).await, vec![evs[0].id]);
}

/// The outbox gap: a transaction that took a smaller event id (and an older
/// transaction id) commits after one with a larger id. `events_since` must
/// not hand out the later event before the earlier one is visible, or a
/// reader resuming from the later id would skip the earlier one for good.
#[tokio::test]
async fn events_since_never_skips_a_late_committing_event() {
    let db = TestDb::new().await;
    let s = db.stores(2).await;
    let reader_start = max_event(&db).await;
    // Wait until the setup events are readable (other tests' transactions may delay that).
    eventually(Duration::from_secs(60), "setup events readable", || async {
        let got = since(&db, 0, 1000).await.unwrap();
        (got.last().map(|e| e.0) == Some(reader_start)).then_some(())
    })
    .await;

    // T1 writes first (smaller id, older xid) and stays open.
    let mut c1 = db.connect().await;
    let mut t1 = c1.begin().await.unwrap();
    sqlx::query("SELECT sales.batch_upsert($1)")
        .bind(json!([record(s[0], 2024, 1, days(1, 1, 1.0, 1))]))
        .execute(&mut *t1)
        .await
        .unwrap();
    let t1_ids: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM sales.events WHERE xid = pg_current_xact_id() ORDER BY id",
    )
    .fetch_all(&mut *t1)
    .await
    .unwrap();
    // T2 writes later (larger id) and commits first.
    let r = upsert_ok(&db, &json!([record(s[1], 2024, 1, days(1, 1, 1.0, 1))])).await;
    let t2_last = r["eventId"].as_i64().unwrap();
    let t2_ids: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM sales.events WHERE id > $1 ORDER BY id")
            .bind(reader_start)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(
        t1_ids.iter().max() < t2_ids.iter().min(),
        "T1 took the smaller ids"
    );

    // While T1 is open, T2's committed events are held back.
    for _ in 0..5 {
        assert!(since(&db, reader_start, 1000).await.unwrap().is_empty());
        assert_eq!(
            scalar_i64(&db, "SELECT sales.events_head()").await,
            reader_start
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t1.commit().await.unwrap();

    // Now both, T1's first, each exactly once.
    let got = eventually(
        Duration::from_secs(60),
        "both transactions' events",
        || async {
            let got = since(&db, reader_start, 1000).await.unwrap();
            (got.len() == t1_ids.len() + t2_ids.len()).then_some(got)
        },
    )
    .await;
    let ids: Vec<i64> = got.iter().map(|e| e.0).collect();
    assert_eq!(ids, [t1_ids.clone(), t2_ids.clone()].concat());
    // Resuming from T1's last event yields T2's; from T2's last, nothing.
    let from_t1: Vec<i64> = since(&db, *t1_ids.last().unwrap(), 1000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(from_t1, t2_ids);
    assert!(since(&db, t2_last, 1000).await.unwrap().is_empty());

    // A transaction that holds a transaction id but has written no event
    // holds nothing back: T3 takes an xid, T4 writes and commits, and T4's
    // events are delivered while T3 is still open. When T3 then appends an
    // event, it is ordered after T4's, so a reader at T4's id misses nothing.
    let mut c3 = db.connect().await;
    let mut t3 = c3.begin().await.unwrap();
    let _: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(&mut *t3)
        .await
        .unwrap();
    let r4 = upsert_ok(&db, &json!([record(s[1], 2024, 2, days(1, 1, 1.0, 1))])).await;
    let t4_last = r4["eventId"].as_i64().unwrap();
    let got = since(&db, t2_last, 1000).await.unwrap();
    assert_eq!(
        got.last().map(|e| e.0),
        Some(t4_last),
        "T4 delivered while T3 (no events) is open: {got:?}"
    );
    sqlx::query("SELECT sales.announce('late')")
        .execute(&mut *t3)
        .await
        .unwrap();
    let t3_id: i64 = sqlx::query_scalar("SELECT max(id) FROM sales.events")
        .fetch_one(&mut *t3)
        .await
        .unwrap();
    assert!(t3_id > t4_last);
    assert!(
        since(&db, t4_last, 1000).await.unwrap().is_empty(),
        "T3's event is not readable before T3 commits"
    );
    t3.commit().await.unwrap();
    let got = since(&db, t4_last, 1000).await.unwrap();
    assert_eq!(got.iter().map(|e| e.0).collect::<Vec<_>>(), vec![t3_id]);
    assert!(since(&db, t3_id, 1000).await.unwrap().is_empty());
}

/// Eight writers with transactions that overlap and commit out of id order,
/// and a reader polling `events_since` in small pages: the reader ends up
/// with every event exactly once, in delivery (seq) order.
#[tokio::test]
async fn concurrent_writers_and_a_polling_reader_see_every_event_once() {
    let db = TestDb::new().await;
    let stores = db.stores(8).await;
    const WRITERS: usize = 8;
    const TXNS: usize = 12;
    // Read before any writer starts: a writer may commit while a read made
    // after spawning them is still running.
    let start = max_event(&db).await;
    let mut writers = Vec::new();
    for (w, &store) in stores.iter().enumerate().take(WRITERS) {
        let url = db.url.clone();
        writers.push(tokio::spawn(async move {
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            for t in 0..TXNS {
                let mut tx = conn.begin().await.unwrap();
                let pause = rand::thread_rng().gen_range(0..40);
                match t % 3 {
                    0 => {
                        let batch: Vec<Value> =
                            (1..=3).map(|m| record(store, 2024, m, json!({"1": {"sales": t * 10 + m as usize}}))).collect();
                        sqlx::query("SELECT sales.batch_upsert($1)").bind(Value::Array(batch)).execute(&mut *tx).await
                    }
                    1 => sqlx::query("UPDATE sales.monthly_sales SET daily_data = daily_data || jsonb_build_object('2', jsonb_build_object('sales', $2::int)) WHERE store_id = $1")
                        .bind(store)
                        .bind(t as i32)
                        .execute(&mut *tx)
                        .await,
                    _ => sqlx::query("SELECT sales.announce($1)").bind(format!("w{w} t{t}")).execute(&mut *tx).await,
                }
                .unwrap();
                // Hold the transaction open a little, so commits interleave.
                tokio::time::sleep(Duration::from_millis(pause)).await;
                tx.commit().await.unwrap();
            }
        }));
    }
    let pool = db.pool.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_reader = stop.clone();
    // The reader starts from 0 (the setup events may be held back by other
    // tests' transactions too) and stops once the writers are done and it
    // has read as many events as the table holds.
    let reader = tokio::spawn(async move {
        let mut last = 0i64;
        let mut seen: Vec<(i64, i64)> = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let rows = sqlx::query("SELECT id, seq AS x FROM sales.events_since($1, 7)")
                .bind(last)
                .fetch_all(&pool)
                .await
                .unwrap();
            for r in &rows {
                seen.push((r.get("x"), r.get("id")));
            }
            if let Some(r) = rows.last() {
                last = r.get("id");
                continue;
            }
            if stop_reader.load(std::sync::atomic::Ordering::SeqCst) {
                let total: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.events")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                if seen.len() as i64 >= total {
                    return seen;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "reader timed out with {} events",
                seen.len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    for w in writers {
        w.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = reader.await.unwrap();
    let all: Vec<i64> = sqlx::query_scalar("SELECT id FROM sales.events ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let seen_ids: Vec<i64> = seen.iter().map(|e| e.1).collect();
    let unique: HashSet<i64> = seen_ids.iter().copied().collect();
    assert_eq!(unique.len(), seen_ids.len(), "an event was delivered twice");
    assert_eq!(seen_ids, all, "every event, once, in seq order");
    // Per writer: 4 batches x (3 rows + 1 summary) + 4 updates x 3 rows + 4 announcements.
    assert_eq!(all.len() - start as usize, WRITERS * (4 * 4 + 4 * 3 + 4));
    // The reader saw strictly increasing positions.
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, seen);
}

#[tokio::test]
async fn announcements_and_user_notifications() {
    let db = TestDb::new().await;
    let user: i64 = sqlx::query_scalar(
        "INSERT INTO sales.users (email, password_hash, role) VALUES ('u@example.com', '$argon2id$x', 'staff') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let mut notes = Notifications::listen(&db).await;
    notes.drain(&db).await;

    let id: i64 = sqlx::query_scalar(
        "SELECT sales.announce('Maintenance at 22:00', 'warning', '{\"minutes\": 15}')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(notes.drain(&db).await, vec![id]);
    let e = &events_after(&db, id - 1).await[0];
    assert_eq!(
        (e.kind.as_str(), e.user_id, e.store_id),
        ("system-announcement", None, None)
    );
    assert_eq!(e.payload["message"], "Maintenance at 22:00");
    assert_eq!(e.payload["level"], "warning");
    assert_eq!(e.payload["data"], json!({"minutes": 15}));
    let id: i64 = sqlx::query_scalar("SELECT sales.announce('hello')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(events_after(&db, id - 1).await[0].payload["level"], "info");

    for bad in [
        "SELECT sales.announce('')",
        "SELECT sales.announce('   ')",
        "SELECT sales.announce(NULL)",
        "SELECT sales.announce('x', 'loud')",
        "SELECT sales.announce('x', NULL)",
    ] {
        expect_code(
            sqlx::query_scalar::<_, i64>(bad).fetch_one(&db.pool).await,
            "22023",
        );
    }

    let id: i64 = sqlx::query_scalar(
        "SELECT sales.notify_user($1, 'Your export is ready', '{\"url\": \"/x\"}')",
    )
    .bind(user)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let e = &events_after(&db, id - 1).await[0];
    assert_eq!(
        (e.kind.as_str(), e.user_id),
        ("user-notification", Some(user))
    );
    assert_eq!(e.payload["message"], "Your export is ready");
    assert_eq!(e.payload["data"]["url"], "/x");
    let msg = expect_code(
        sqlx::query_scalar::<_, i64>("SELECT sales.notify_user(987654, 'hi')")
            .fetch_one(&db.pool)
            .await,
        "22023",
    );
    assert!(msg.contains("987654"), "{msg}");
    expect_code(
        sqlx::query_scalar::<_, i64>("SELECT sales.notify_user(NULL, 'hi')")
            .fetch_one(&db.pool)
            .await,
        "22023",
    );
    expect_code(
        sqlx::query_scalar::<_, i64>("SELECT sales.notify_user($1, '')")
            .bind(user)
            .fetch_one(&db.pool)
            .await,
        "22023",
    );
    // Two successful calls, two NOTIFYs; failed calls none.
    assert_eq!(notes.drain(&db).await.len(), 2);
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.events").await,
        3
    );
}

#[tokio::test]
async fn events_head_prune_and_resync() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    for m in 1..=6 {
        upsert_ok(&db, &json!([record(s, 2024, m, days(1, 1, 1.0, 1))])).await;
    }
    // 1 store event + 6 x (row + batch) events, each batch its own transaction.
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM sales.events ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(ids.len(), 13);
    let head = eventually(Duration::from_secs(60), "events_head", || async {
        let h = scalar_i64(&db, "SELECT sales.events_head()").await;
        (h == *ids.last().unwrap()).then_some(h)
    })
    .await;
    assert_eq!(head, *ids.last().unwrap());
    assert_eq!(
        since(&db, 0, 3)
            .await
            .unwrap()
            .iter()
            .map(|e| e.0)
            .collect::<Vec<_>>(),
        ids[..3].to_vec()
    );

    // Nothing is old enough: nothing pruned.
    assert_eq!(
        scalar_i64(&db, "SELECT sales.prune_events('1 day')").await,
        0
    );

    // Only event 6 (a middle one) is old: deleting it alone would let a
    // reader at event 5 skip it silently, and the events before it are
    // younger than the retention, so nothing goes.
    exec(
        &db,
        &format!(
            "UPDATE sales.events SET created_at = now() - interval '30 days' WHERE id = {}",
            ids[5]
        ),
    )
    .await;
    assert_eq!(
        scalar_i64(&db, "SELECT sales.prune_events('7 days')").await,
        0
    );
    // Events 1-6 are old: that prefix goes.
    exec(
        &db,
        &format!(
            "UPDATE sales.events SET created_at = now() - interval '30 days' WHERE id = ANY('{{{}}}')",
            ids[..6].iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
        ),
    )
    .await;
    assert_eq!(
        scalar_i64(&db, "SELECT sales.prune_events('7 days')").await,
        6
    );
    // What remains, and then the pruning's own event: the run deleted
    // something, so it says so (cached histories are now too long).
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM sales.events ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(left.len(), ids.len() - 6 + 1, "{left:?}");
    assert_eq!(&left[..left.len() - 1], &ids[6..]);
    let marker = *left.last().unwrap();
    let (kind, payload): (String, Value) =
        sqlx::query_as("SELECT kind, payload FROM sales.events WHERE id = $1")
            .bind(marker)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(kind, "events-pruned");
    assert_eq!(payload, json!({"pruned": 6, "expired": 0}));
    for gone in &ids[..6] {
        let (code, message, _) = pg_error(&since(&db, *gone, 10).await.unwrap_err());
        assert_eq!(code, "PS410", "{message}");
        assert!(message.contains("resync"), "{message}");
    }
    // (Read once the pruning's event is final, as a reader would.)
    let want = left[1..].to_vec();
    eventually(
        Duration::from_secs(60),
        "the rest after a kept event",
        || async {
            let rest: Vec<i64> = since(&db, ids[6], 100)
                .await
                .unwrap()
                .iter()
                .map(|e| e.0)
                .collect();
            (rest == want).then_some(())
        },
    )
    .await;

    // Everything old: all but the newest go (the first run's own event), so
    // an up-to-date reader never has to resync; this run writes its own.
    exec(
        &db,
        "UPDATE sales.events SET created_at = now() - interval '30 days'",
    )
    .await;
    assert_eq!(
        scalar_i64(&db, "SELECT sales.prune_events('7 days')").await,
        (ids.len() - 6) as i64
    );
    let second: i64 = scalar_i64(&db, "SELECT max(id) FROM sales.events").await;
    assert_ne!(second, marker);
    let head = eventually(Duration::from_secs(60), "events_head", || async {
        let h = scalar_i64(&db, "SELECT sales.events_head()").await;
        (h == second).then_some(h)
    })
    .await;
    assert_eq!(head, second);
    let after: Vec<i64> = since(&db, marker, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(after, vec![second], "only the second run's own event");
    // A run that deletes nothing writes nothing (the first run's event is
    // 30 days old, younger than this retention).
    assert_eq!(
        scalar_i64(&db, "SELECT sales.prune_events('100 days')").await,
        0
    );
    assert!(since(&db, after[0], 10).await.unwrap().is_empty());

    // Bad arguments.
    expect_code(since(&db, -1, 10).await, "22023");
    expect_code(since(&db, 0, 0).await, "22023");
    expect_code(since(&db, 0, 100_001).await, "22023");
    expect_code(
        sqlx::query_scalar::<_, i64>("SELECT sales.prune_events('-1 day')")
            .fetch_one(&db.pool)
            .await,
        "22023",
    );
    let (code, _, _) = pg_error(&since(&db, 10_000_000, 10).await.unwrap_err());
    assert_eq!(code, "PS410", "an id that never existed");
}

/// A retention that reaches back past the earliest time a timestamp holds
/// (a million years) keeps everything, as a long retention does: it failed
/// with 22008 (timestamp out of range), for the log's retention and for
/// the history's alike.
#[tokio::test]
async fn retentions_past_the_earliest_timestamp_keep_everything() {
    let db = TestDb::new().await;
    let s = db.stores(1).await;
    upsert_ok(&db, &json!([record(s[0], 2024, 1, days(1, 2, 1.0, 1))])).await;
    upsert_ok(&db, &json!([record(s[0], 2024, 1, days(2, 3, 2.0, 1))])).await;
    exec(
        &db,
        "UPDATE sales.events SET created_at = created_at - interval '4000 years'",
    )
    .await;
    let events = scalar_i64(&db, "SELECT count(*) FROM sales.events").await;
    for call in [
        "SELECT sales.prune_events('1000000 years')",
        "SELECT sales.prune_events('1000000 years', '2000000 years')",
    ] {
        assert_eq!(scalar_i64(&db, call).await, 0, "{call}");
    }
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.events").await,
        events
    );
    // A short retention of the log with such a history retention moves the
    // sales events it prunes to the history, and keeps them there.
    let moved = scalar_i64(
        &db,
        "SELECT count(*) FROM sales.events
         WHERE kind LIKE 'sales-data-%' AND seq < (SELECT max(seq) FROM sales.events)",
    )
    .await;
    assert!(moved >= 2, "{moved}");
    let pruned = scalar_i64(&db, "SELECT sales.prune_events('1 day', '1000000 years')").await;
    assert_eq!(pruned, events - 1, "all but the newest event");
    let kept = "SELECT count(*) FROM sales.event_history";
    assert_eq!(scalar_i64(&db, kept).await, moved);
    exec(
        &db,
        "UPDATE sales.event_history SET created_at = created_at - interval '1000 years'",
    )
    .await;
    scalar_i64(&db, "SELECT sales.prune_events('1 day', '1000000 years')").await;
    assert_eq!(scalar_i64(&db, kept).await, moved, "the history keeps them");
}

/// `PREPARE TRANSACTION` of a transaction that wrote events is refused as
/// a feature not supported (0A000), as Postgres refuses one that sent a
/// NOTIFY, rather than as an internal error.
#[tokio::test]
async fn an_event_writing_transaction_cannot_be_prepared() {
    let db = TestDb::new().await;
    let mut conn = db.connect().await;
    let e = sqlx::raw_sql(
        "BEGIN;
         INSERT INTO sales.stores (code, name, region) VALUES ('P1', 'Prepared', 'North');
         PREPARE TRANSACTION 'pgs_prepared_events'",
    )
    .execute(&mut conn)
    .await
    .expect_err("an event writer is prepared");
    let (code, message, _) = pg_error(&e);
    assert_eq!(code, "0A000", "{message}");
    assert!(message.contains("cannot be prepared"), "{message}");
    drop(conn);
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.stores").await,
        0,
        "nothing was written"
    );
}

/// Coalescing (the default): a transaction that commits while another is
/// committing its NOTIFY sends none of its own, yet a reader waiting in
/// `events_next` still wakes for it at once. `sales.notify_coalesce = off`
/// restores one NOTIFY per transaction.
#[tokio::test]
async fn coalesced_notify_skips_while_another_is_committing() {
    let db = TestDb::new().await;
    let s = db.stores(2).await;
    let mut notes = Notifications::listen(&db).await;
    notes.drain(&db).await;
    let start = max_event(&db).await;

    // T1 has written events and holds the "NOTIFY being committed" lock
    // (sales.take_notify_lock(): the lock no SQL advisory function reaches),
    // as it would while committing its NOTIFY.
    let mut c1 = db.connect().await;
    let mut t1 = c1.begin().await.unwrap();
    sqlx::query("SELECT sales.batch_upsert($1)")
        .bind(json!([record(s[0], 2024, 1, days(1, 1, 1.0, 1))]))
        .execute(&mut *t1)
        .await
        .unwrap();
    let taken: bool = sqlx::query_scalar("SELECT sales.take_notify_lock()")
        .fetch_one(&mut *t1)
        .await
        .unwrap();
    assert!(taken);
    let t1_max: i64 =
        sqlx::query_scalar("SELECT max(id) FROM sales.events WHERE xid = pg_current_xact_id()")
            .fetch_one(&mut *t1)
            .await
            .unwrap();
    // T1 is still running, so T2's events (ordered after T1's first) are
    // held back; a reader long-polls meanwhile.
    let url = db.url.clone();
    let reader = tokio::spawn(async move {
        let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
        let rows: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM sales.events_next($1, 1000, 60000)")
                .bind(start)
                .fetch_all(&mut c)
                .await
                .unwrap();
        rows
    });

    // T2 commits meanwhile: no NOTIFY of its own.
    let r2 = upsert_ok(&db, &json!([record(s[1], 2024, 1, days(1, 1, 1.0, 1))])).await;
    let t2_max = r2["eventId"].as_i64().unwrap();
    assert!(
        notes.drain(&db).await.is_empty(),
        "T2 relied on T1's NOTIFY"
    );
    t1.commit().await.unwrap();
    assert_eq!(notes.drain(&db).await, vec![t1_max]);
    // The long poll returned as soon as T1 ended, with both transactions' events.
    let got = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("events_next woke up")
        .unwrap();
    assert_eq!(got.last(), Some(&t2_max), "{got:?}");
    assert!(got.contains(&t1_max));

    // With coalescing off, a writing transaction notifies even while
    // another holds the lock.
    let mut c3 = db.connect().await;
    let mut t3 = c3.begin().await.unwrap();
    sqlx::query("SELECT sales.take_notify_lock()")
        .execute(&mut *t3)
        .await
        .unwrap();
    let mut c4 = db.connect().await;
    sqlx::query("SET sales.notify_coalesce = off")
        .execute(&mut c4)
        .await
        .unwrap();
    let id: i64 = sqlx::query_scalar("SELECT sales.announce('two')")
        .fetch_one(&mut c4)
        .await
        .unwrap();
    assert_eq!(notes.drain(&db).await, vec![id]);
    t3.commit().await.unwrap();
    assert!(notes.drain(&db).await.is_empty(), "t3 wrote no events");
}

/// Transaction ids are cluster-wide, but a transaction runs in one database:
/// an open writing transaction elsewhere holds nothing back here.
#[tokio::test]
async fn a_transaction_in_another_database_does_not_hold_events_back() {
    let db = TestDb::new().await;
    let other = TestDb::new().await;
    let s = db.stores(1).await[0];
    let mut c = other.connect().await;
    let mut t = c.begin().await.unwrap();
    sqlx::query("SELECT sales.announce('elsewhere')")
        .execute(&mut *t)
        .await
        .unwrap();

    let r = upsert_ok(&db, &json!([record(s, 2024, 1, days(1, 1, 1.0, 1))])).await;
    let id = r["eventId"].as_i64().unwrap();
    let got = since(&db, 0, 1000).await.unwrap();
    assert_eq!(
        got.last().map(|e| e.0),
        Some(id),
        "not held back by the other database: {got:?}"
    );
    assert_eq!(scalar_i64(&db, "SELECT sales.events_head()").await, id);
    t.rollback().await.unwrap();
}

/// `changedDays` against an independent reference: random months (days
/// added, removed, changed, left alone; numbers written as `5` or `5.0`,
/// which jsonb holds as equal; one- and two-digit keys, which jsonb orders
/// by length) replacing each other through plain UPDATEs.
#[tokio::test]
async fn changed_days_match_a_reference() {
    let db = TestDb::new().await;
    let s = db.stores(1).await;
    let row_id = scalar_i64(
        &db,
        &format!(
            "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data) VALUES ({}, 2024, 1, '{{}}') RETURNING id",
            s[0]
        ),
    )
    .await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // day -> (sales, customers, written with a decimal point)
    let mut current: std::collections::BTreeMap<u32, (u32, Option<u32>, bool)> = Default::default();
    let render = |m: &std::collections::BTreeMap<u32, (u32, Option<u32>, bool)>| {
        let mut o = serde_json::Map::new();
        for (d, (sales, customers, dotted)) in m {
            let mut day = format!("{{\"sales\": {sales}{}", if *dotted { ".0" } else { "" });
            if let Some(c) = customers {
                day.push_str(&format!(", \"customers\": {c}"));
            }
            day.push('}');
            o.insert(d.to_string(), serde_json::from_str(&day).unwrap());
        }
        Value::Object(o).to_string()
    };
    let mut checked = 0;
    for _ in 0..150 {
        let mut next = current.clone();
        for _ in 0..rng.gen_range(0..6) {
            let day = rng.gen_range(1..=31);
            match rng.gen_range(0..4) {
                0 => {
                    next.remove(&day);
                }
                1 => {
                    // Same values, other spelling: not a change.
                    if let Some(v) = next.get_mut(&day) {
                        v.2 = !v.2;
                    }
                }
                _ => {
                    let customers = rng.gen_bool(0.5).then(|| rng.gen_range(0..3));
                    next.insert(day, (rng.gen_range(0..4), customers, rng.gen_bool(0.5)));
                }
            }
        }
        let mut expected: Vec<String> = current
            .keys()
            .chain(next.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter(|d| current.get(d).map(|v| (v.0, v.1)) != next.get(d).map(|v| (v.0, v.1)))
            .map(|d| d.to_string())
            .collect();
        expected.sort_by_key(|d| d.parse::<u32>().unwrap());
        let last = max_event(&db).await;
        exec(
            &db,
            &format!(
                "UPDATE sales.monthly_sales SET daily_data = '{}' WHERE id = {row_id}",
                render(&next)
            ),
        )
        .await;
        let evs = events_after(&db, last).await;
        if expected.is_empty() {
            assert!(evs.is_empty(), "no change, yet {evs:?}");
        } else {
            assert_eq!(evs.len(), 1, "{evs:?}");
            assert_eq!(evs[0].payload["changedDays"], json!(expected), "{evs:?}");
            checked += 1;
        }
        current = next;
    }
    assert!(checked > 50, "only {checked} updates changed something");
}

/// An upsert of store `store`'s March 2024 that merges in day `day`
/// (`sales` = the day), one event per call.
fn merge_day(store: i64, day: u32) -> String {
    format!(
        "INSERT INTO sales.monthly_sales AS t (store_id, year, month, daily_data) VALUES ({store}, 2024, 3, '{{\"{day}\": {{\"sales\": {day}}}}}')
         ON CONFLICT (store_id, year, month) DO UPDATE SET daily_data = t.daily_data || EXCLUDED.daily_data"
    )
}

/// The sales trigger writes its event rows straight into the table and its
/// indexes, with the indexes described once per backend: an index added
/// (or dropped) by another session afterwards is seen at the next write,
/// whether it is a plain one or an expression or partial index.
#[tokio::test]
async fn event_indexes_added_later_are_maintained() {
    let db = TestDb::new().await;
    let s = db.stores(1).await;
    let mut writer = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let write = |day: u32| merge_day(s[0], day);
    exec(&db, "CREATE EXTENSION IF NOT EXISTS amcheck").await;
    // heapallindexed: every heap row has its entry in the index.
    let check = |index: &str| format!("SELECT bt_index_check('sales.{index}', true)");
    sqlx::raw_sql(&write(1)).execute(&mut writer).await.unwrap();
    exec(
        &db,
        "CREATE INDEX events_kind_test ON sales.events (kind, row_version)",
    )
    .await;
    sqlx::raw_sql(&write(2)).execute(&mut writer).await.unwrap();
    exec(&db, &check("events_kind_test")).await;
    exec(
        &db,
        "CREATE INDEX events_expr_test ON sales.events ((payload->>'month')) WHERE row_id IS NOT NULL",
    )
    .await;
    sqlx::raw_sql(&write(3)).execute(&mut writer).await.unwrap();
    exec(&db, &check("events_kind_test")).await;
    exec(&db, &check("events_expr_test")).await;
    exec(&db, "DROP INDEX sales.events_kind_test").await;
    sqlx::raw_sql(&write(4)).execute(&mut writer).await.unwrap();
    exec(&db, &check("events_expr_test")).await;
    exec(&db, "DROP INDEX sales.events_expr_test").await;
    sqlx::raw_sql(&write(5)).execute(&mut writer).await.unwrap();
    for index in ["events_pkey", "events_seq_idx", "events_row_idx"] {
        exec(&db, &check(index)).await;
    }
    let versions: Vec<i64> = sqlx::query_scalar(
        "SELECT row_version FROM sales.events WHERE kind LIKE 'sales-data-%' ORDER BY seq",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(versions, vec![1, 2, 3, 4, 5]);
}

/// An index built `CONCURRENTLY` on the log is first listed as not ready
/// for inserts, then marked ready by an update of its own catalog row. A
/// backend that described the log's indexes while the build was waiting
/// must write every later event into the index once it is ready. (The
/// trigger reads readiness from the index as opened; Postgres also happens
/// to invalidate the table when the build updates its statistics.)
#[tokio::test]
async fn an_index_built_concurrently_gets_every_later_event() {
    let db = TestDb::new().await;
    let s = db.stores(1).await;
    let mut writer = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let write = |day: u32| merge_day(s[0], day);
    exec(&db, "CREATE EXTENSION IF NOT EXISTS amcheck").await;
    sqlx::raw_sql(&write(1)).execute(&mut writer).await.unwrap();
    // A transaction that has written to the log holds the build at its
    // wait for earlier writers, after the index is in the catalog.
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("BEGIN; SELECT sales.emit('test-hold', '{}')")
        .execute(&mut holder)
        .await
        .unwrap();
    let pool = db.pool.clone();
    let build = tokio::spawn(async move {
        sqlx::raw_sql(
            "CREATE INDEX CONCURRENTLY events_cic_test ON sales.events (kind, row_version)",
        )
        .execute(&pool)
        .await
        .map(|_| ())
    });
    eventually(Duration::from_secs(30), "the index listed, not yet ready", || async {
        let ready: Option<bool> = sqlx::query_scalar(
            "SELECT indisready FROM pg_index WHERE indexrelid = to_regclass('sales.events_cic_test')",
        )
        .fetch_optional(&db.pool)
        .await
        .ok()?;
        (ready == Some(false)).then_some(())
    })
    .await;
    // The writer describes the log's indexes now, with the new one not ready.
    sqlx::raw_sql(&write(2)).execute(&mut writer).await.unwrap();
    // An older snapshot holds the build again after it has marked the index
    // ready and filled it (its wait for older snapshots, before it marks the
    // index valid and invalidates the table): events written meanwhile must
    // go into the index.
    let mut reader = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM sales.stores")
        .execute(&mut reader)
        .await
        .unwrap();
    sqlx::raw_sql("COMMIT").execute(&mut holder).await.unwrap();
    eventually(Duration::from_secs(30), "the index ready, not yet valid", || async {
        let (ready, valid): (bool, bool) = sqlx::query_as(
            "SELECT indisready, indisvalid FROM pg_index WHERE indexrelid = 'sales.events_cic_test'::regclass",
        )
        .fetch_one(&db.pool)
        .await
        .ok()?;
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_progress_create_index \
             WHERE phase LIKE 'waiting for old snapshots%')",
        )
        .fetch_one(&db.pool)
        .await
        .ok()?;
        (ready && !valid && waiting).then_some(())
    })
    .await;
    for day in 3..=5 {
        sqlx::raw_sql(&write(day))
            .execute(&mut writer)
            .await
            .unwrap();
    }
    sqlx::raw_sql("COMMIT").execute(&mut reader).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), build)
        .await
        .expect("the build ends once the older snapshot is gone")
        .unwrap()
        .unwrap();
    exec(&db, "SELECT bt_index_check('sales.events_cic_test', true)").await;
    let indexed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sales.events WHERE kind LIKE 'sales-data-%' AND row_version >= 3",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(indexed, 3);
}

/// An update's event is written by the row trigger, an insert's by
/// `monthly_sales_events`; disabling that one trigger still turns both off
/// (README: "to load without events, disable only monthly_sales_events"),
/// and enabling it again brings both back, versions continuing.
#[tokio::test]
async fn disabling_monthly_sales_events_stops_insert_and_update_events() {
    let db = TestDb::new().await;
    let store = db.stores(1).await[0];
    let write = |month: i32, day: i32| {
        format!(
            "INSERT INTO sales.monthly_sales AS t (store_id, year, month, daily_data)
             VALUES ({store}, 2024, {month}, '{{\"{day}\": {{\"sales\": {day}}}}}')
             ON CONFLICT (store_id, year, month) DO UPDATE SET daily_data = t.daily_data || EXCLUDED.daily_data"
        )
    };
    let kinds = |evs: &[Ev]| -> Vec<(String, i64)> {
        evs.iter()
            .map(|e| (e.kind.clone(), e.row_version.unwrap_or(0)))
            .collect()
    };
    let start = max_event(&db).await;
    exec(&db, &write(1, 1)).await;
    exec(&db, &write(1, 2)).await;
    let on = events_after(&db, start).await;
    assert_eq!(
        kinds(&on),
        vec![
            ("sales-data-created".into(), 1),
            ("sales-data-updated".into(), 2)
        ]
    );
    assert_eq!(on[1].payload["changedDays"], json!(["2"]));
    assert_eq!(on[1].payload["previousDays"], json!({"2": null}));

    exec(
        &db,
        "ALTER TABLE sales.monthly_sales DISABLE TRIGGER monthly_sales_events",
    )
    .await;
    let off_start = max_event(&db).await;
    exec(&db, &write(1, 3)).await;
    exec(&db, &write(2, 1)).await;
    exec(
        &db,
        &format!(
            "UPDATE sales.monthly_sales SET daily_data = daily_data - '1' WHERE store_id = {store}"
        ),
    )
    .await;
    assert_eq!(
        events_after(&db, off_start).await,
        vec![],
        "no event while it is disabled"
    );

    exec(
        &db,
        "ALTER TABLE sales.monthly_sales ENABLE TRIGGER monthly_sales_events",
    )
    .await;
    let again = max_event(&db).await;
    exec(&db, &write(1, 4)).await;
    exec(&db, &write(3, 1)).await;
    let back = events_after(&db, again).await;
    assert_eq!(
        kinds(&back),
        vec![
            ("sales-data-updated".into(), 5),
            ("sales-data-created".into(), 1)
        ],
        "{back:?}"
    );
    assert_eq!(back[0].payload["previousDays"], json!({"4": null}));
}

/// A library newer than the installed SQL: with `monthly_sales_events`
/// still defined as in 0.6.0 (after inserts and updates), the row trigger
/// leaves updates' events to it, so each version has exactly one event.
#[tokio::test]
async fn an_older_trigger_definition_gets_one_event_per_update() {
    let db = TestDb::new().await;
    let store = db.stores(1).await[0];
    exec(
        &db,
        "DROP TRIGGER monthly_sales_events ON sales.monthly_sales;
         CREATE TRIGGER monthly_sales_events AFTER INSERT OR UPDATE ON sales.monthly_sales
             FOR EACH ROW EXECUTE FUNCTION sales.tg_sales_changed();",
    )
    .await;
    let start = max_event(&db).await;
    upsert_ok(&db, &json!([record(store, 2024, 1, days(1, 3, 10.0, 1))])).await;
    upsert_ok(&db, &json!([record(store, 2024, 1, days(2, 5, 20.0, 2))])).await;
    exec(
        &db,
        &format!("UPDATE sales.monthly_sales SET month = 2 WHERE store_id = {store}"),
    )
    .await;
    let evs = events_after(&db, start).await;
    let versions: Vec<(String, i64)> = evs
        .iter()
        .filter(|e| e.kind.starts_with("sales-data-"))
        .map(|e| (e.kind.clone(), e.row_version.unwrap_or(0)))
        .collect();
    assert_eq!(
        versions,
        vec![
            ("sales-data-created".into(), 1),
            ("sales-data-updated".into(), 2),
            ("sales-data-updated".into(), 3)
        ],
        "{evs:?}"
    );
    let moved = evs
        .iter()
        .rfind(|e| e.kind == "sales-data-updated")
        .unwrap();
    assert_eq!(moved.payload["previousMonth"], 1, "{moved:?}");
}

/// Logical replication applies rows with `session_replication_role =
/// replica`, where the row trigger that writes updates' events does not
/// fire, nor any statement trigger (deletes' events). A subscriber that
/// sets up the replica-mode triggers README gives gets every applied
/// insert's, update's and delete's event, each once; one that leaves them
/// as shipped gets none; ordinary sessions are unaffected.
#[tokio::test]
async fn updates_applied_in_replica_mode_get_their_events() {
    let db = TestDb::new().await;
    let store = db.stores(1).await[0];
    let kinds = |evs: &[Ev]| -> Vec<(String, i64)> {
        evs.iter()
            .map(|e| (e.kind.clone(), e.row_version.unwrap_or(0)))
            .collect()
    };
    // An ordinary session: one event per write, as ever.
    let start = max_event(&db).await;
    exec(
        &db,
        &format!(
            "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
             VALUES ({store}, 2024, 1, '{{\"1\": {{\"sales\": 1}}}}');
             UPDATE sales.monthly_sales SET daily_data = daily_data || '{{\"2\": {{\"sales\": 2}}}}'
             WHERE store_id = {store}"
        ),
    )
    .await;
    assert_eq!(
        kinds(&events_after(&db, start).await),
        vec![
            ("sales-data-created".into(), 1),
            ("sales-data-updated".into(), 2)
        ]
    );
    // As the apply writes them: the publisher's columns, versions included.
    let apply = |version: i64, day: i64| {
        format!(
            "BEGIN; SET LOCAL session_replication_role = replica;
             UPDATE sales.monthly_sales SET version = {version},
                 daily_data = daily_data || '{{\"{day}\": {{\"sales\": {day}}}}}'
             WHERE store_id = {store} AND month = 1;
             INSERT INTO sales.monthly_sales (store_id, year, month, daily_data, version)
             VALUES ({store}, 2024, {version}, '{{\"1\": {{\"sales\": 1}}}}', 1);
             COMMIT;"
        )
    };
    // Shipped state (monthly_sales_events fires in origin mode only): none.
    let start = max_event(&db).await;
    exec(&db, &apply(3, 3)).await;
    assert_eq!(events_after(&db, start).await.len(), 0);

    // A subscriber that wants events, as README says to set one up.
    exec(
        &db,
        "ALTER TABLE sales.monthly_sales ENABLE ALWAYS TRIGGER monthly_sales_events;
         CREATE TRIGGER monthly_sales_replica_updates AFTER UPDATE ON sales.monthly_sales
             FOR EACH ROW EXECUTE FUNCTION sales.tg_sales_changed();
         ALTER TABLE sales.monthly_sales ENABLE REPLICA TRIGGER monthly_sales_replica_updates;",
    )
    .await;
    // Ordinary sessions still get one event per update.
    let start = max_event(&db).await;
    exec(
        &db,
        &format!(
            "UPDATE sales.monthly_sales SET daily_data = daily_data || '{{\"9\": {{\"sales\": 9}}}}'
             WHERE store_id = {store} AND month = 1"
        ),
    )
    .await;
    assert_eq!(
        kinds(&events_after(&db, start).await),
        vec![("sales-data-updated".into(), 4)]
    );
    let start = max_event(&db).await;
    exec(&db, &apply(5, 4)).await;
    let got = events_after(&db, start).await;
    assert_eq!(
        kinds(&got),
        vec![
            ("sales-data-updated".into(), 5),
            ("sales-data-created".into(), 1)
        ]
    );
    assert_eq!(got[0].payload["changedDays"], json!(["4"]));
    assert_eq!(got[0].payload["previousDays"], json!({"4": null}));

    // The row trigger enabled for replica mode too writes the update's event
    // itself: still one.
    exec(
        &db,
        "ALTER TABLE sales.monthly_sales ENABLE ALWAYS TRIGGER monthly_sales_row",
    )
    .await;
    let start = max_event(&db).await;
    exec(&db, &apply(6, 5)).await;
    let got = events_after(&db, start).await;
    let updates = got
        .iter()
        .filter(|e| e.kind == "sales-data-updated")
        .count();
    assert_eq!(updates, 1, "{:?}", kinds(&got));

    // Deletes: their events come from a statement trigger, which the apply
    // never fires; as shipped, an applied delete gets none.
    let delete = |month: i64, replica: bool| {
        format!(
            "BEGIN; {} DELETE FROM sales.monthly_sales WHERE store_id = {store} AND month = {month}; COMMIT;",
            if replica { "SET LOCAL session_replication_role = replica;" } else { "" }
        )
    };
    let start = max_event(&db).await;
    exec(&db, &delete(3, true)).await;
    assert_eq!(events_after(&db, start).await.len(), 0);
    // With the replica-mode delete trigger README gives: one each.
    exec(
        &db,
        "CREATE TRIGGER monthly_sales_replica_deletes AFTER DELETE ON sales.monthly_sales
             FOR EACH ROW EXECUTE FUNCTION sales.tg_sales_deleted();
         ALTER TABLE sales.monthly_sales ENABLE REPLICA TRIGGER monthly_sales_replica_deletes;",
    )
    .await;
    let start = max_event(&db).await;
    exec(&db, &delete(5, true)).await;
    let got = events_after(&db, start).await;
    assert_eq!(kinds(&got), vec![("sales-data-deleted".into(), 2)]);
    assert_eq!(got[0].payload["month"], 5);
    assert_eq!(got[0].payload["previousDays"], json!({"1": {"sales": 1}}));
    // An ordinary session's delete still gets exactly one.
    let start = max_event(&db).await;
    exec(&db, &delete(6, false)).await;
    let got = events_after(&db, start).await;
    assert_eq!(kinds(&got), vec![("sales-data-deleted".into(), 2)]);
    assert_eq!(got[0].payload["month"], 6);
}

/// `TRUNCATE ... RESTART IDENTITY` sets the id sequence back, but new
/// records still never take an id the event log holds: a new record's
/// history is its own, not a truncated record's. A plain TRUNCATE leaves
/// the sequence as it was.
#[tokio::test]
async fn ids_are_not_given_twice_after_truncate_restart_identity() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let s = stores[0];
    let insert = format!(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         VALUES ({s}, 2024, 1, '{{\"1\": {{\"sales\": 10}}}}') RETURNING id"
    );
    let first = scalar_i64(&db, &insert).await;
    exec(
        &db,
        &format!(
            "UPDATE sales.monthly_sales SET daily_data = '{{\"1\": {{\"sales\": 20}}}}' WHERE id = {first}"
        ),
    )
    .await;
    let second = scalar_i64(&db, &insert.replace("2024, 1,", "2024, 2,")).await;
    assert!(second > first);
    exec(&db, "TRUNCATE sales.monthly_sales RESTART IDENTITY").await;
    let third = scalar_i64(&db, &insert).await;
    assert!(
        third > second,
        "a new record took id {third}, which the log holds for an earlier record (up to {second})"
    );
    let history: Value = sqlx::query_scalar("SELECT sales.history($1)")
        .bind(third)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        history["versions"].as_array().map(Vec::len),
        Some(1),
        "only the new record's own version: {history}"
    );
    // A plain TRUNCATE does not move the sequence.
    exec(&db, "TRUNCATE sales.monthly_sales").await;
    let fourth = scalar_i64(&db, &insert).await;
    assert_eq!(fourth, third + 1);
    // A truncated record's last state is kept for its history
    // (sales.event_history): its id is not given again either, even when
    // its events are gone.
    exec(
        &db,
        "DELETE FROM sales.event_history; DELETE FROM sales.events",
    )
    .await;
    exec(&db, "TRUNCATE sales.monthly_sales RESTART IDENTITY").await;
    assert_eq!(scalar_i64(&db, &insert).await, fourth + 1);
    // RESTART IDENTITY sets it back when the logs hold no record's id.
    exec(&db, "TRUNCATE sales.monthly_sales").await;
    exec(
        &db,
        "DELETE FROM sales.event_history; DELETE FROM sales.events",
    )
    .await;
    exec(&db, "TRUNCATE sales.monthly_sales RESTART IDENTITY").await;
    assert_eq!(scalar_i64(&db, &insert).await, 1);
}

/// The row triggers act on `sales.monthly_sales` only. Attached to another
/// table with look-alike columns (any role may make a temporary one), they
/// refuse: with a column of another type they would read its values as
/// pointers (a crash of the server process, and so of every session), and
/// with the same types they would write events about rows that never were.
#[tokio::test]
async fn row_triggers_refuse_other_tables() {
    let db = TestDb::new().await;
    let before = max_event(&db).await;
    let mut conn = db.pool.acquire().await.unwrap();
    let table = |name: &str, daily: &str| {
        format!(
            "CREATE TEMP TABLE {name} (id bigint, store_id bigint, year int, month int,
               daily_data {daily}, total_sales numeric, total_customers bigint,
               days_reported int, version bigint, created_at timestamptz,
               updated_at timestamptz)"
        )
    };
    for (name, daily, timing, function) in [
        ("wrong_types", "bigint", "BEFORE", "tg_sales_row"),
        ("look_alike", "jsonb", "BEFORE", "tg_sales_row"),
        ("look_alike_after", "jsonb", "AFTER", "tg_sales_changed"),
    ] {
        sqlx::raw_sql(&table(name, daily))
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::raw_sql(&format!(
            "CREATE TRIGGER t {timing} INSERT ON {name} FOR EACH ROW
             EXECUTE FUNCTION sales.{function}()"
        ))
        .execute(&mut *conn)
        .await
        .unwrap();
        let daily_value = if daily == "bigint" {
            "16"
        } else {
            r#"'{"1": {"sales": 999999}}'"#
        };
        let err = sqlx::raw_sql(&format!(
            "INSERT INTO {name} VALUES (1, 2, 2024, 1, {daily_value}, 999999, 0, 1, 77, now(), now())"
        ))
        .execute(&mut *conn)
        .await
        .expect_err(name);
        let (code, message, _) = pg_error(&err);
        assert!(message.contains("sales.monthly_sales"), "{name}: {message}");
        assert_eq!(code, "39P01", "{name}: {message}");
    }
    // The connection (and its server process) lives on; no event was written.
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    assert_eq!(max_event(&db).await, before);
    // The table itself still gets its events, inserts and updates.
    let s = db.stores(1).await;
    let before = max_event(&db).await;
    upsert_ok(&db, &json!([record(s[0], 2024, 1, days(1, 2, 10.0, 1))])).await;
    upsert_ok(&db, &json!([record(s[0], 2024, 1, days(1, 3, 11.0, 1))])).await;
    let kinds: Vec<String> = events_after(&db, before)
        .await
        .into_iter()
        .filter(|e| e.kind.starts_with("sales-data"))
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["sales-data-created", "sales-data-updated"]);
}

/// `seq` is a column default, so a role allowed to insert event rows can
/// write one by hand. A value at the end of the range must not reach its
/// database's delivery clock: its next values would wrap below every
/// horizon and no event would be delivered again. The database holding
/// such a row refuses event writes, naming the row, until it is deleted;
/// other databases go on.
#[tokio::test]
async fn a_seq_written_by_hand_cannot_stop_the_clock() {
    let db = TestDb::new().await;
    let other = TestDb::new().await;
    let s = db.stores(1).await;
    let o = other.stores(1).await;
    // The end of the range, and just past what a log may hold (2^61): a
    // value just under the point where the clock stops giving (2^62) would
    // otherwise bring every database to that point.
    for forged in [i64::MAX, (1i64 << 62) - 1, (1i64 << 61) + 1] {
        sqlx::query("DELETE FROM sales.events WHERE kind = 'forged'")
            .execute(&db.pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO sales.events (kind, payload, seq) VALUES ('forged', '{}', $1)")
            .bind(forged)
            .execute(&db.pool)
            .await
            .unwrap();
        // A backend that has not read the clock yet (each reads it once).
        let mut fresh = sqlx::PgConnection::connect(&db.url).await.unwrap();
        let err = sqlx::query("SELECT sales.batch_upsert($1)")
            .bind(json!([record(s[0], 2024, 1, days(1, 1, 1.0, 1))]))
            .fetch_one(&mut fresh)
            .await
            .expect_err("an event write in the database holding the row");
        let (_, message, _) = pg_error(&err);
        assert!(
            message.contains("written by hand") && message.contains("delete the event rows above"),
            "{forged}: {message}"
        );
    }
    // Another database's events go on, in order and deliverable.
    let mut elsewhere = sqlx::PgConnection::connect(&other.url).await.unwrap();
    let head: i64 = sqlx::query_scalar("SELECT sales.events_head()")
        .fetch_one(&mut elsewhere)
        .await
        .unwrap();
    sqlx::query("SELECT sales.batch_upsert($1)")
        .bind(json!([record(o[0], 2024, 1, days(1, 1, 1.0, 1))]))
        .fetch_one(&mut elsewhere)
        .await
        .unwrap();
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM sales.events_since($1, 100)")
        .bind(head)
        .fetch_all(&mut elsewhere)
        .await
        .unwrap();
    assert!(!seqs.is_empty() && seqs.iter().all(|&q| q > 0), "{seqs:?}");
    // Deleted, the database writes again.
    sqlx::query("DELETE FROM sales.events WHERE kind = 'forged'")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut again = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("SELECT sales.batch_upsert($1)")
        .bind(json!([record(s[0], 2024, 1, days(1, 1, 1.0, 1))]))
        .fetch_one(&mut again)
        .await
        .unwrap();
}

/// `sales.event_seq()` registers its transaction as an event writer, whose
/// events the delivery horizon waits for while it runs: only a role that
/// may insert event rows may call it, so one that may only read cannot
/// hold every later event back by leaving such a transaction open. The
/// refusal, like that of `sales.take_notify_lock()` to any role but a
/// superuser, is a privilege error (42501), not an internal one.
#[tokio::test]
async fn only_event_writers_take_a_seq() {
    let db = TestDb::new().await;
    let role = format!("pgs_reader_{}", rand::random::<u32>());
    exec(
        &db,
        &format!(
            "CREATE ROLE {role}; GRANT USAGE ON SCHEMA sales TO {role};
             GRANT SELECT ON sales.events TO {role}"
        ),
    )
    .await;
    let mut conn = db.pool.acquire().await.unwrap();
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    sqlx::raw_sql(&format!("SET LOCAL ROLE {role}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    let err = sqlx::query_scalar::<_, i64>("SELECT sales.event_seq()")
        .fetch_one(&mut *tx)
        .await
        .expect_err("a reader takes no seq");
    let (code, message, _) = pg_error(&err);
    assert!(message.contains("permission denied"), "{message}");
    assert_eq!(code, "42501", "{message}");
    tx.rollback().await.unwrap();
    // Nor the NOTIFY lock, which is a superuser's.
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    sqlx::raw_sql(&format!("SET LOCAL ROLE {role}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    let err = sqlx::query_scalar::<_, bool>("SELECT sales.take_notify_lock()")
        .fetch_one(&mut *tx)
        .await
        .expect_err("a reader takes the NOTIFY lock");
    let (code, message, _) = pg_error(&err);
    assert_eq!(code, "42501", "{message}");
    assert!(message.contains("permission denied"), "{message}");
    tx.rollback().await.unwrap();
    // Given INSERT on the log, it may.
    exec(&db, &format!("GRANT INSERT ON sales.events TO {role}")).await;
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    sqlx::raw_sql(&format!("SET LOCAL ROLE {role}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    let seq: i64 = sqlx::query_scalar("SELECT sales.event_seq()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert!(seq > 0);
    tx.rollback().await.unwrap();
    drop(conn);
    exec(&db, &format!("DROP OWNED BY {role}; DROP ROLE {role}")).await;
}

/// A role that may write sales rows and stores needs no privilege on the
/// event log (which holds every user's events) to have its changes'
/// events written: inserts, updates, deletes, batches, store changes and
/// a truncate, all as a role that cannot read the log, each with its event
/// and the commit's NOTIFY; and the role still cannot read the log
/// afterwards in the same transaction (the extension reads and writes it
/// as its owner only for those moments).
#[tokio::test]
async fn a_writer_needs_no_privilege_on_the_event_log() {
    let db = TestDb::new().await;
    let s = db.stores(1).await;
    let role = format!("pgs_writer_{}", rand::random::<u32>());
    exec(
        &db,
        &format!(
            "CREATE ROLE {role}; GRANT USAGE ON SCHEMA sales TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON sales.monthly_sales, sales.stores TO {role};
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA sales TO {role}"
        ),
    )
    .await;
    // Functions of the writer's own schema that shadow built-ins the log's
    // reads and writes call, placed before pg_catalog in its search path:
    // run as anyone but the writer (the log's owner), they fail the write.
    let schema = format!("{role}_own");
    let guard = |name: &str, args: &str, returns: &str, body: &str| {
        format!(
            "CREATE FUNCTION {schema}.{name}({args}) RETURNS {returns} LANGUAGE plpgsql AS $f$
             BEGIN
                 IF current_user <> '{role}' THEN
                     RAISE EXCEPTION 'a function of the writer''s schema ran as %', current_user;
                 END IF;
                 {body}
             END $f$;"
        )
    };
    exec(
        &db,
        &[
            format!("CREATE SCHEMA {schema} AUTHORIZATION {role};"),
            guard("btrim", "t text", "text", "RETURN pg_catalog.btrim(t);"),
            guard("length", "t text", "integer", "RETURN pg_catalog.length(t);"),
            guard("pg_current_xact_id", "", "xid8", "RETURN pg_catalog.pg_current_xact_id();"),
            guard("pg_notify", "c text, p text", "void", "PERFORM pg_catalog.pg_notify(c, p);"),
            guard("max_step", "a bigint, b bigint", "bigint", "RETURN greatest(a, b);"),
            format!("CREATE AGGREGATE {schema}.max(bigint) (SFUNC = {schema}.max_step, STYPE = bigint);"),
            format!("GRANT ALL ON ALL FUNCTIONS IN SCHEMA {schema} TO {role};"),
        ]
        .concat(),
    )
    .await;
    let set_role = format!("SET LOCAL ROLE {role}; SET LOCAL search_path = {schema}, pg_catalog");
    let mut notifications = Notifications::listen(&db).await;
    notifications.drain(&db).await;
    let before = max_event(&db).await;
    // A fresh session, so that the delivery clock's first read is this role's.
    let mut conn = db.connect().await;
    let mut tx = sqlx::Connection::begin(&mut conn).await.unwrap();
    sqlx::raw_sql(&set_role).execute(&mut *tx).await.unwrap();
    let denied = |e: sqlx::Error| {
        let (_, message, _) = pg_error(&e);
        assert!(message.contains("permission denied"), "{message}");
    };
    let mut sp = sqlx::Connection::begin(&mut *tx).await.unwrap();
    denied(
        sqlx::query("SELECT count(*) FROM sales.events")
            .execute(&mut *sp)
            .await
            .unwrap_err(),
    );
    sp.rollback().await.unwrap();
    let statements = [
        "INSERT INTO sales.stores (code, name, region) VALUES ('W1', 'Writer', 'North')".to_string(),
        "UPDATE sales.stores SET name = 'Writer 2' WHERE code = 'W1'".to_string(),
        format!(
            "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
             VALUES ({}, 2024, 1, '{{\"1\": {{\"sales\": 5}}}}')",
            s[0]
        ),
        "UPDATE sales.monthly_sales SET daily_data = '{\"1\": {\"sales\": 6}}'".to_string(),
        format!(
            "SELECT sales.batch_upsert('[{{\"storeId\": {}, \"year\": 2024, \"month\": 2, \"dailyData\": {{\"1\": {{\"sales\": 1}}}}}}]')",
            s[0]
        ),
        format!(
            "SELECT sales.batch_delete(NULL, '[{{\"storeId\": {}, \"year\": 2024, \"month\": 2}}]')",
            s[0]
        ),
        "DELETE FROM sales.monthly_sales".to_string(),
        "DELETE FROM sales.stores WHERE code = 'W1'".to_string(),
        "TRUNCATE sales.monthly_sales".to_string(),
    ];
    for sql in &statements {
        sqlx::raw_sql(sql)
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    // Still the writer, still without the log.
    let who: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(who, role);
    denied(
        sqlx::query("SELECT count(*) FROM sales.events")
            .execute(&mut *tx)
            .await
            .unwrap_err(),
    );
    tx.rollback().await.unwrap();
    // The same, committed this time (the error above ended the first).
    let mut tx = sqlx::Connection::begin(&mut conn).await.unwrap();
    sqlx::raw_sql(&set_role).execute(&mut *tx).await.unwrap();
    for sql in &statements {
        sqlx::raw_sql(sql)
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    tx.commit().await.unwrap();
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT kind FROM sales.events WHERE id > $1 ORDER BY id")
            .bind(before)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        kinds,
        [
            "store-created",
            "store-updated",
            "sales-data-created",
            "sales-data-updated",
            "sales-data-created",
            "batch-completed",
            "sales-data-deleted",
            "batch-completed",
            "sales-data-deleted",
            "store-deleted",
            "table-truncated",
        ]
    );
    assert_eq!(notifications.drain(&db).await, vec![max_event(&db).await]);
    drop(conn);
    exec(
        &db,
        &format!("DROP OWNED BY {role} CASCADE; DROP ROLE {role}"),
    )
    .await;
}

/// `sales.user_id` and `sales.job_id` hold ids: a value that is not a whole
/// number from 1 up is refused when it is set (22023, naming the setting),
/// wherever it is set, instead of failing the writes that record it with an
/// error that names nothing (`abc`) or being recorded as an actor (`-3`).
/// Empty clears it.
#[tokio::test]
async fn actor_and_job_settings_take_ids_only() {
    let db = TestDb::new().await;
    let s = db.stores(1).await;
    let mut conn = db.connect().await;
    for setting in ["sales.user_id", "sales.job_id"] {
        for bad in ["abc", "-3", "0", "+5", " 5", "1.5", "9223372036854775808"] {
            for sql in [
                format!("SET {setting} = '{bad}'"),
                format!("SELECT set_config('{setting}', '{bad}', true)"),
                format!("ALTER DATABASE {} SET {setting} = '{bad}'", db.name),
            ] {
                let e = sqlx::raw_sql(&sql)
                    .execute(&mut conn)
                    .await
                    .expect_err(&sql);
                let (code, message, _) = pg_error(&e);
                assert_eq!(code, "22023", "{sql}: {message}");
                assert!(message.contains(setting), "{sql}: {message}");
            }
        }
        for good in ["7", "9223372036854775807", ""] {
            sqlx::raw_sql(&format!("SET {setting} = '{good}'"))
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{setting} = '{good}': {e}"));
        }
    }
    // Refused, the setting keeps its value: the writes go on with it.
    sqlx::raw_sql("SET sales.user_id = '42'; SET sales.job_id = '9'")
        .execute(&mut conn)
        .await
        .unwrap();
    for bad in ["abc", "-3"] {
        sqlx::raw_sql(&format!("SET sales.user_id = '{bad}'"))
            .execute(&mut conn)
            .await
            .expect_err(bad);
    }
    let before = max_event(&db).await;
    sqlx::query("SELECT sales.batch_upsert($1)")
        .bind(json!([record(s[0], 2024, 1, days(1, 2, 1.0, 1))]))
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "UPDATE sales.stores SET status = 'closed' WHERE id = {}",
        s[0]
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let written: Vec<(String, Option<i64>, Value)> = sqlx::query_as(
        "SELECT kind, actor_id, payload FROM sales.events WHERE id > $1 ORDER BY id",
    )
    .bind(before)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let kinds: Vec<&str> = written.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "sales-data-created",
            "batch-completed",
            "store-status-changed"
        ]
    );
    assert!(
        written.iter().all(|(_, actor, _)| *actor == Some(42)),
        "{written:?}"
    );
    assert_eq!(written[0].2["jobId"], 9, "{:?}", written[0]);
}

/// The acting user and job a transaction names (`sales.user_id`,
/// `sales.job_id`), which events and a record's history record as fact,
/// may be set only by a role that may write the event log (the server's):
/// another writer is refused (42501) and its writes carry no actor.
#[tokio::test]
async fn only_event_log_writers_name_the_actor() {
    let db = TestDb::new().await;
    let s = db.stores(1).await;
    let role = format!("pgs_claim_{}", rand::random::<u32>());
    exec(
        &db,
        &format!(
            "CREATE ROLE {role}; GRANT USAGE ON SCHEMA sales TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON sales.monthly_sales, sales.stores TO {role};
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA sales TO {role}"
        ),
    )
    .await;
    let mut conn = db.connect().await;
    let mut tx = sqlx::Connection::begin(&mut conn).await.unwrap();
    sqlx::raw_sql(&format!("SET LOCAL ROLE {role}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    for (setting, value) in [("sales.user_id", "1"), ("sales.job_id", "7")] {
        let mut sp = sqlx::Connection::begin(&mut *tx).await.unwrap();
        let e = sqlx::query("SELECT set_config($1, $2, true)")
            .bind(setting)
            .bind(value)
            .execute(&mut *sp)
            .await
            .expect_err("a writer names the actor");
        let (code, message, _) = pg_error(&e);
        assert_eq!(code, "42501", "{setting}: {message}");
        sp.rollback().await.unwrap();
        // Clearing a claim is always allowed.
        sqlx::query("SELECT set_config($1, '', true)")
            .bind(setting)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    let mut sp = sqlx::Connection::begin(&mut *tx).await.unwrap();
    let e = sqlx::raw_sql(&format!("ALTER ROLE {role} SET sales.user_id = '1'"))
        .execute(&mut *sp)
        .await
        .expect_err("a writer makes the claim a setting of its own");
    let (code, message, _) = pg_error(&e);
    assert_eq!(code, "42501", "{message}");
    sp.rollback().await.unwrap();
    sqlx::query(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         VALUES ($1, 2024, 1, '{\"1\": {\"sales\": 5}}')",
    )
    .bind(s[0])
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let actor: Option<i64> =
        sqlx::query_scalar("SELECT actor_id FROM sales.events WHERE kind = 'sales-data-created'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(actor, None);
    // The log's writers (the server's role) name it as before.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SELECT set_config('sales.user_id', '42', true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE sales.monthly_sales SET daily_data = '{\"1\": {\"sales\": 6}}'")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let actor: Option<i64> =
        sqlx::query_scalar("SELECT actor_id FROM sales.events WHERE kind = 'sales-data-updated'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(actor, Some(42));
    drop(conn);
    exec(
        &db,
        &format!("DROP OWNED BY {role} CASCADE; DROP ROLE {role}"),
    )
    .await;
}

/// A version is below 2^62: a writer choosing one on insert cannot plant a
/// row whose later updates write no event (its version could not grow) and
/// which nobody can delete (the delete event's version + 1 overflowed).
/// And the batch functions name their polymorphic built-ins with their
/// schema: an exact-type `unnest(bigint[])` of a schema in a privileged
/// caller's search path is not run.
#[tokio::test]
async fn planted_versions_and_shadowed_builtins_are_refused() {
    let db = TestDb::new().await;
    let s = db.stores(1).await;
    for sql in [
        format!(
            "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data, version)
             VALUES ({}, 2030, 1, '{{}}', 9223372036854775807)",
            s[0]
        ),
        "INSERT INTO sales.stores (code, name, region, version) VALUES ('V1', 'v', 'North', 9223372036854775807)".to_string(),
        "INSERT INTO sales.stores (code, name, region, version) VALUES ('V2', 'v', 'North', 0)".to_string(),
    ] {
        let e = sqlx::raw_sql(&sql).execute(&db.pool).await.expect_err(&sql);
        let (code, message, _) = pg_error(&e);
        assert_eq!(code, "23514", "{sql}: {message}");
        assert!(
            message.contains("version_check") || message.contains("at most 2305843009213693952"),
            "{message}"
        );
    }
    // Within the CHECK but at its ceiling, a sales row's next version
    // would break it, and every statement touching the row (a whole
    // best-effort batch) would fail: a version above 2^61 is refused on
    // insert; 2^61 itself is taken and updated.
    let insert = |version: i64, month: i32| {
        format!(
            "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data, version)
             VALUES ({}, 2030, {month}, '{{}}', {version})",
            s[0]
        )
    };
    let sql = insert(4611686018427387903, 2);
    let e = sqlx::raw_sql(&sql).execute(&db.pool).await.expect_err(&sql);
    let (code, message, _) = pg_error(&e);
    assert_eq!(code, "23514", "{message}");
    assert!(message.contains("at most 2305843009213693952"), "{message}");
    exec(&db, &insert(1 << 61, 3)).await;
    // A store the same way: above 2^61 refused on insert, 2^61 taken and
    // updated.
    let sql = "INSERT INTO sales.stores (code, name, region, version) VALUES ('V3', 'v', 'North', 4611686018427387903)";
    let e = sqlx::raw_sql(sql).execute(&db.pool).await.expect_err(sql);
    let (code, message, _) = pg_error(&e);
    assert_eq!(code, "23514", "{message}");
    assert!(
        message.contains("version of a new store is at most 2305843009213693952"),
        "{message}"
    );
    exec(
        &db,
        "INSERT INTO sales.stores (code, name, region, version) VALUES ('V4', 'v', 'North', 2305843009213693952);
         UPDATE sales.stores SET name = 'w' WHERE code = 'V4'",
    )
    .await;
    let version: i64 = sqlx::query_scalar("SELECT version FROM sales.stores WHERE code = 'V4'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(version, (1 << 61) + 1);
    let summary: serde_json::Value = sqlx::query_scalar(
        "SELECT sales.batch_upsert(jsonb_build_array(jsonb_build_object('storeId', $1::bigint, 'year', 2030, 'month', 3, 'dailyData', '{\"1\": {\"sales\": 5}}'::jsonb)), atomic => false)",
    )
    .bind(s[0])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(summary["updated"], 1, "{summary}");
    let version: i64 = sqlx::query_scalar(
        "SELECT version FROM sales.monthly_sales WHERE year = 2030 AND month = 3",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(version, (1 << 61) + 1);
    let schema = format!("shadow_{}", rand::random::<u32>());
    exec(
        &db,
        &format!(
            "CREATE SCHEMA {schema};
             CREATE FUNCTION {schema}.unnest(a bigint[]) RETURNS SETOF bigint LANGUAGE plpgsql AS $f$
             BEGIN RAISE EXCEPTION 'a shadowing unnest ran as %', current_user; END $f$;
             CREATE FUNCTION {schema}.array_agg(bigint) RETURNS bigint[] LANGUAGE sql AS 'SELECT NULL::bigint[]';"
        ),
    )
    .await;
    let mut conn = db.connect().await;
    sqlx::raw_sql(&format!("SET search_path = {schema}, public"))
        .execute(&mut conn)
        .await
        .unwrap();
    let r: Value = sqlx::query_scalar("SELECT sales.batch_upsert($1)")
        .bind(json!([record(s[0], 2024, 1, days(1, 2, 1.0, 1))]))
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(r["inserted"], 1, "{r}");
    let id: i64 = sqlx::query_scalar("SELECT id FROM sales.monthly_sales")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let r: Value = sqlx::query_scalar("SELECT sales.batch_delete($1, NULL, false)")
        .bind(vec![id])
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(r["deleted"], 1, "{r}");
}

/// The plpgsql event triggers run as their owner: nobody else may attach
/// them to a table (EXECUTE is the owner's), and attached to another table
/// even by a superuser they refuse to run, so a temporary look-alike table
/// cannot write forged events with the owner's rights.
#[tokio::test]
async fn the_owners_triggers_refuse_other_tables() {
    let db = TestDb::new().await;
    let role = format!("pgs_plain_{}", rand::random::<u32>());
    exec(
        &db,
        &format!("CREATE ROLE {role}; GRANT USAGE ON SCHEMA sales TO {role}; GRANT TEMPORARY ON DATABASE {} TO {role}", db.name),
    )
    .await;
    let look_alike = "CREATE TEMP TABLE monthly_sales (id bigint, store_id bigint, version bigint,
                          year int, month int, daily_data jsonb)";
    let mut conn = db.connect().await;
    let mut tx = sqlx::Connection::begin(&mut conn).await.unwrap();
    sqlx::raw_sql(&format!("SET LOCAL ROLE {role}; {look_alike}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    for f in [
        "tg_sales_deleted",
        "tg_stores_changed",
        "tg_truncated",
        "tg_sales_truncating",
    ] {
        let mut sp = sqlx::Connection::begin(&mut *tx).await.unwrap();
        let e = sqlx::raw_sql(&format!(
            "CREATE TRIGGER t_{f} AFTER DELETE ON pg_temp.monthly_sales FOR EACH ROW EXECUTE FUNCTION sales.{f}()"
        ))
        .execute(&mut *sp)
        .await
        .expect_err("a plain role attaches the owner's trigger");
        let (code, message, _) = pg_error(&e);
        assert_eq!(code, "42501", "{f}: {message}");
        sp.rollback().await.unwrap();
    }
    tx.rollback().await.unwrap();
    // Attached by a superuser, it refuses to run for that table.
    let before = max_event(&db).await;
    let mut tx = sqlx::Connection::begin(&mut conn).await.unwrap();
    sqlx::raw_sql(&format!(
        "{look_alike};
         CREATE TRIGGER t AFTER DELETE ON pg_temp.monthly_sales FOR EACH ROW EXECUTE FUNCTION sales.tg_sales_deleted();
         INSERT INTO pg_temp.monthly_sales VALUES (1, 1, 1, 2024, 1, '{{}}')"
    ))
    .execute(&mut *tx)
    .await
    .unwrap();
    let e = sqlx::query("DELETE FROM pg_temp.monthly_sales")
        .execute(&mut *tx)
        .await
        .expect_err("the owner's trigger on another table");
    let (code, message, _) = pg_error(&e);
    assert_eq!(code, "42501", "{message}");
    assert!(
        message.contains("is a trigger of sales.monthly_sales only"),
        "{message}"
    );
    tx.rollback().await.unwrap();
    assert_eq!(max_event(&db).await, before, "no event written");
    drop(conn);
    exec(
        &db,
        &format!("DROP OWNED BY {role} CASCADE; DROP ROLE {role}"),
    )
    .await;
}

/// The lock that coalesces commit NOTIFYs cannot be taken from SQL: a
/// session holding `pg_advisory_lock(369125)` (the key's value) no longer
/// makes every commit leave its NOTIFY to it, which sent none.
#[tokio::test]
async fn no_sql_session_can_silence_the_commit_notify() {
    let db = TestDb::new().await;
    let s = db.stores(1).await;
    let mut notifications = Notifications::listen(&db).await;
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(369125)")
        .execute(&mut holder)
        .await
        .unwrap();
    notifications.drain(&db).await;
    upsert_ok(&db, &json!([record(s[0], 2024, 1, days(1, 1, 1.0, 1))])).await;
    let newest = max_event(&db).await;
    assert_eq!(notifications.drain(&db).await, vec![newest]);
}

/// A value equal to the stored one keeps its stored bytes, by plain SQL as
/// by `sales.batch_upsert`: `10.500` over `10.5` is the same number, so
/// the record does not change (no version, no event) and stays `10.5`.
/// Before, an UPDATE stored the new bytes without a version or an event,
/// so readers keyed on versions and events kept serving `10.5` while an
/// export showed `10.500`. Within a month that changes elsewhere, such a
/// day keeps its stored value too (the event names only the days that
/// changed, and history rebuilds the rest from the row), whichever path
/// writes.
#[tokio::test]
async fn an_equal_value_written_with_another_scale_changes_nothing() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    let id = scalar_i64(
        &db,
        &format!(
            "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
             VALUES ({s}, 2024, 1, '{{\"1\": {{\"sales\": 10.5}}}}') RETURNING id"
        ),
    )
    .await;
    let row = |db: &TestDb| {
        let sql = format!(
            "SELECT daily_data::text || ' ' || total_sales::text || ' v' || version
             FROM sales.monthly_sales WHERE id = {id}"
        );
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(&sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(row(&db).await, r#"{"1": {"sales": 10.5}} 10.5 v1"#);
    let start = max_event(&db).await;

    // Plain SQL.
    exec(
        &db,
        &format!("UPDATE sales.monthly_sales SET daily_data = '{{\"1\": {{\"sales\": 10.500}}}}' WHERE id = {id}"),
    )
    .await;
    assert_eq!(row(&db).await, r#"{"1": {"sales": 10.5}} 10.5 v1"#);
    assert!(events_after(&db, start).await.is_empty());

    // The batch function, both modes: unchanged, nothing stored. The
    // records go as text: through serde_json's `Value` the number would
    // reach Postgres as `10.5`, the bytes already stored.
    let upsert_text = |text: String, mode: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, Value>("SELECT sales.batch_upsert($1::text::jsonb, $2, true)")
                .bind(text)
                .bind(mode)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    for mode in ["merge", "replace"] {
        let summary = upsert_text(
            format!(
                r#"[{{"storeId": {s}, "year": 2024, "month": 1, "dailyData": {{"1": {{"sales": 10.500}}}}}}]"#
            ),
            mode,
        )
        .await;
        assert_eq!(summary["unchanged"], 1, "{mode}: {summary}");
        assert_eq!(
            row(&db).await,
            r#"{"1": {"sales": 10.5}} 10.5 v1"#,
            "{mode}"
        );
    }
    let kinds_after = |evs: &[Ev]| {
        evs.iter()
            .filter(|e| e.kind.starts_with("sales-data"))
            .count()
    };
    assert_eq!(kinds_after(&events_after(&db, start).await), 0);

    // A month that changes elsewhere: day 1 keeps 10.5, the event names day 2.
    let start = max_event(&db).await;
    exec(
        &db,
        &format!(
            "UPDATE sales.monthly_sales SET daily_data = '{{\"1\": {{\"sales\": 10.500}}, \"2\": {{\"sales\": 1}}}}' WHERE id = {id}"
        ),
    )
    .await;
    assert_eq!(
        row(&db).await,
        r#"{"1": {"sales": 10.5}, "2": {"sales": 1}} 11.5 v2"#
    );
    let evs = events_after(&db, start).await;
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].payload["changedDays"], json!(["2"]));
    // The batch too, in merge mode: day 1 as stored, day 3 added.
    let summary = upsert_text(
        format!(
            r#"[{{"storeId": {s}, "year": 2024, "month": 1,
                 "dailyData": {{"1": {{"sales": 10.50}}, "3": {{"sales": 2}}}}}}]"#
        ),
        "merge",
    )
    .await;
    assert_eq!(summary["updated"], 1, "{summary}");
    assert_eq!(
        row(&db).await,
        r#"{"1": {"sales": 10.5}, "2": {"sales": 1}, "3": {"sales": 2}} 13.5 v3"#
    );
    // And the history shows version 1 as it was stored.
    let v1: String = sqlx::query_scalar(
        "SELECT (sales.get_sales_as_of($1, (SELECT created_at FROM sales.events
                 WHERE row_id = $1 AND kind = 'sales-data-created')) -> 'dailyData')::text",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(v1, r#"{"1": {"sales": 10.5}}"#);
}

/// A transaction whose every event went with a rolled-back savepoint holds
/// delivery back no longer: its registration goes with them (it held every
/// later event of the database back until it ended). One whose first event
/// survives (released into the transaction before another savepoint rolls
/// back) still holds it while it runs.
#[tokio::test]
async fn a_savepoint_that_takes_every_event_back_stops_holding_delivery() {
    async fn run(c: &mut sqlx::PgConnection, q: &str) {
        sqlx::query(q).execute(c).await.unwrap();
    }
    let db = TestDb::new().await;
    let s = db.stores(2).await;
    let holders = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM sales.event_holders()")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    let insert = "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data) \
                  VALUES ($1, 2024, $2, '{\"1\": {\"sales\": 1}}')";
    let mut a = db.connect().await;
    run(&mut a, "BEGIN").await;
    run(&mut a, "SAVEPOINT one").await;
    sqlx::query(insert)
        .bind(s[0])
        .bind(1)
        .execute(&mut a)
        .await
        .unwrap();
    assert_eq!(holders().await, 1, "an event written: delivery held");
    run(&mut a, "ROLLBACK TO SAVEPOINT one").await;
    assert_eq!(holders().await, 0, "every event rolled back: nothing held");
    let first: Option<i64> = sqlx::query_scalar("SELECT sales.transaction_first_seq()")
        .fetch_one(&mut a)
        .await
        .unwrap();
    assert_eq!(first, None);

    // Another transaction's event is delivered while this one stays open.
    let before = max_event(&db).await;
    let other = upsert_ok(&db, &json!([record(s[1], 2024, 1, days(1, 1, 1.0, 1))])).await;
    let other = other["eventId"].as_i64().unwrap();
    let got: Vec<i64> = sqlx::query_scalar("SELECT id FROM sales.events_next($1, 1000, 30000)")
        .bind(before)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        got.last(),
        Some(&other),
        "delivered while the transaction is open: {got:?}"
    );

    // An event released into the transaction survives a later savepoint's
    // rollback, and so does the hold.
    run(&mut a, "SAVEPOINT two").await;
    sqlx::query(insert)
        .bind(s[0])
        .bind(2)
        .execute(&mut a)
        .await
        .unwrap();
    run(&mut a, "RELEASE SAVEPOINT two").await;
    run(&mut a, "SAVEPOINT three").await;
    sqlx::query(insert)
        .bind(s[0])
        .bind(3)
        .execute(&mut a)
        .await
        .unwrap();
    run(&mut a, "ROLLBACK TO SAVEPOINT three").await;
    assert_eq!(
        holders().await,
        1,
        "the released event still holds delivery"
    );
    run(&mut a, "COMMIT").await;
    assert_eq!(holders().await, 0);
    let months: Vec<i32> = sqlx::query_scalar(
        "SELECT (payload->>'month')::int FROM sales.events WHERE id > $1 AND kind = 'sales-data-created' ORDER BY id",
    )
    .bind(other)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(months, vec![2], "the released event, committed");
}

/// The sales trigger writes its event rows straight into `sales.events`
/// and its indexes. What the executor would also do for such a row and
/// that insert does not is refused, naming it, rather than skipped: a CHECK
/// constraint, a NOT NULL on a column the trigger leaves empty, a trigger
/// on the log's inserts (a foreign key from it is one), a deferrable
/// unique constraint that finds a duplicate, a column changed to another
/// type (its values would be misread: an integer taken for a pointer).
/// Indexes of other access methods than btree and hash (GIN here) are
/// maintained, also after the index alone changes (a rename).
#[tokio::test]
async fn what_the_direct_event_insert_cannot_do_is_refused() {
    let db = TestDb::new().await;
    let s = db.stores(1).await;
    let mut day = 0;
    let mut write = |db: &TestDb| {
        day += 1;
        let sql = merge_day(s[0], day);
        let url = db.url.clone();
        async move {
            // A backend of its own each time: the log's description is
            // built afresh, as in a new session.
            let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::raw_sql(&sql).execute(&mut c).await.map(|_| ())
        }
    };
    let refused = |r: Result<(), sqlx::Error>, code: &str, names: &str| {
        let message = expect_code(r, code);
        assert!(message.contains(names), "{message}");
    };
    write(&db).await.unwrap();

    // GIN: maintained, before and after a rename of the index alone.
    exec(
        &db,
        "CREATE INDEX events_gin_test ON sales.events USING gin (payload jsonb_path_ops)",
    )
    .await;
    write(&db).await.unwrap();
    let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(&merge_day(s[0], 20))
        .execute(&mut c)
        .await
        .unwrap();
    exec(
        &db,
        "ALTER INDEX sales.events_gin_test RENAME TO events_gin_renamed",
    )
    .await;
    sqlx::raw_sql(&merge_day(s[0], 21))
        .execute(&mut c)
        .await
        .unwrap();
    write(&db).await.unwrap();
    let by_scan = scalar_i64(
        &db,
        "SELECT count(*) FROM sales.events WHERE payload @> '{\"month\": 3}'",
    )
    .await;
    let mut ix = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("SET enable_seqscan = off")
        .execute(&mut ix)
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT count(*) FROM sales.events WHERE payload @> '{\"month\": 3}'",
    )
    .fetch_all(&mut ix)
    .await
    .unwrap();
    assert!(
        plan.iter().any(|l| l.contains("events_gin_renamed")),
        "{plan:?}"
    );
    let by_index: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sales.events WHERE payload @> '{\"month\": 3}'")
            .fetch_one(&mut ix)
            .await
            .unwrap();
    assert!(by_scan >= 4, "{by_scan}");
    assert_eq!(by_index, by_scan);
    exec(&db, "DROP INDEX sales.events_gin_renamed").await;

    // A CHECK constraint.
    exec(
        &db,
        "ALTER TABLE sales.events ADD CONSTRAINT events_check_test CHECK (store_id > 0) NOT VALID",
    )
    .await;
    refused(write(&db).await, "55000", "events_check_test");
    exec(
        &db,
        "ALTER TABLE sales.events DROP CONSTRAINT events_check_test",
    )
    .await;
    write(&db).await.unwrap();

    // NOT NULL on a column the trigger leaves empty (user_id).
    exec(
        &db,
        "UPDATE sales.events SET user_id = 0 WHERE user_id IS NULL",
    )
    .await;
    exec(
        &db,
        "ALTER TABLE sales.events ALTER COLUMN user_id SET NOT NULL",
    )
    .await;
    refused(write(&db).await, "55000", "user_id");
    exec(
        &db,
        "ALTER TABLE sales.events ALTER COLUMN user_id DROP NOT NULL",
    )
    .await;
    write(&db).await.unwrap();

    // A rule on the log's inserts.
    exec(
        &db,
        "CREATE TABLE sales.events_copy_test (id bigint);
         CREATE RULE events_rule_test AS ON INSERT TO sales.events DO ALSO INSERT INTO sales.events_copy_test VALUES (NEW.id)",
    )
    .await;
    refused(write(&db).await, "55000", "rule");
    exec(&db, "DROP RULE events_rule_test ON sales.events").await;
    write(&db).await.unwrap();

    // A trigger on the log's inserts; disabled, it is not in the way.
    exec(
        &db,
        "CREATE FUNCTION sales.events_spy_test() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
         CREATE TRIGGER events_spy_test AFTER INSERT ON sales.events FOR EACH ROW EXECUTE FUNCTION sales.events_spy_test()",
    )
    .await;
    refused(write(&db).await, "55000", "events_spy_test");
    exec(
        &db,
        "ALTER TABLE sales.events DISABLE TRIGGER events_spy_test",
    )
    .await;
    write(&db).await.unwrap();
    exec(&db, "DROP TRIGGER events_spy_test ON sales.events").await;

    // A deferrable unique constraint: rows it accepts go in, a duplicate
    // it would only find at commit is refused at once.
    exec(&db, "DELETE FROM sales.events WHERE row_id IS NOT NULL").await;
    exec(&db, "ALTER TABLE sales.events ADD CONSTRAINT events_unique_test UNIQUE (row_id) DEFERRABLE INITIALLY DEFERRED").await;
    write(&db).await.unwrap();
    refused(write(&db).await, "23505", "deferrable unique");
    exec(
        &db,
        "ALTER TABLE sales.events DROP CONSTRAINT events_unique_test",
    )
    .await;
    write(&db).await.unwrap();

    // A column of another type: refused, and the server is still up.
    exec(
        &db,
        "ALTER TABLE sales.events ALTER COLUMN store_id TYPE text",
    )
    .await;
    refused(write(&db).await, "55000", "store_id");
    assert_eq!(scalar_i64(&db, "SELECT 1::bigint").await, 1);
    exec(
        &db,
        "ALTER TABLE sales.events ALTER COLUMN store_id TYPE bigint USING store_id::bigint",
    )
    .await;
    write(&db).await.unwrap();
}

/// An update's event is written inside `monthly_sales_row`, with the row as
/// it leaves it. A `BEFORE UPDATE` row trigger that fires after it (a name
/// that sorts later) could still change or skip the update: refused,
/// naming it. One that fires before it is the row's own business, and its
/// change is what the event carries.
#[tokio::test]
async fn a_before_update_trigger_after_the_row_trigger_is_refused() {
    let db = TestDb::new().await;
    let s = db.stores(1).await;
    exec(&db, &merge_day(s[0], 1)).await;
    exec(
        &db,
        "CREATE FUNCTION sales.skip_test() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
         CREATE TRIGGER zz_skip_test BEFORE UPDATE ON sales.monthly_sales FOR EACH ROW EXECUTE FUNCTION sales.skip_test()",
    )
    .await;
    let before = max_event(&db).await;
    let message = expect_code(
        sqlx::raw_sql(&merge_day(s[0], 2)).execute(&db.pool).await,
        "55000",
    );
    assert!(message.contains("zz_skip_test"), "{message}");
    assert_eq!(
        max_event(&db).await,
        before,
        "no event for the refused update"
    );
    exec(&db, "DROP TRIGGER zz_skip_test ON sales.monthly_sales").await;

    // Sorting first, it runs before the row trigger: its change is in the
    // stored row and in the event.
    exec(
        &db,
        r#"CREATE FUNCTION sales.add_day_test() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN NEW.daily_data = NEW.daily_data || '{"9": {"sales": 9}}'; RETURN NEW; END $$;
           CREATE TRIGGER aa_add_day_test BEFORE UPDATE ON sales.monthly_sales FOR EACH ROW EXECUTE FUNCTION sales.add_day_test()"#,
    )
    .await;
    exec(&db, &merge_day(s[0], 3)).await;
    let days: Vec<String> = sqlx::query_scalar(
        "SELECT jsonb_object_keys(daily_data) FROM sales.monthly_sales WHERE store_id = $1",
    )
    .bind(s[0])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(days.contains(&"9".to_string()), "{days:?}");
    let ev = events_after(&db, before).await;
    let last = ev.last().expect("the update's event");
    assert!(
        last.payload.to_string().contains("\"9\""),
        "{:?}",
        last.payload
    );
}

/// Each database has a delivery clock of its own: a `seq` written by hand
/// in one database, which its clock takes (any value up to 2^61), moves no
/// other database's. With one clock for the cluster, every database's
/// events went on from that value, and once they passed 2^61 a new session
/// of any database refused to write or read events (it took them for
/// values written by hand) until they were deleted everywhere. The database
/// that holds the value goes on from it.
#[tokio::test]
async fn a_seq_written_by_hand_moves_only_its_own_databases_clock() {
    let db = TestDb::new().await;
    let other = TestDb::new().await;
    let s = db.stores(1).await;
    let o = other.stores(1).await;
    let write = |url: String, store: i64, day: u32| async move {
        // A session of its own: each reads its database's log once.
        let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query("SELECT sales.batch_upsert($1)")
            .bind(json!([record(store, 2024, 1, days(day, day, 1.0, 1))]))
            .fetch_one(&mut c)
            .await
            .map(|_| ())
    };
    let last_seq = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT max(seq) FROM sales.events")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    write(other.url.clone(), o[0], 1).await.unwrap();
    let forged = 1i64 << 61;
    sqlx::query("INSERT INTO sales.events (kind, payload, seq) VALUES ('forged', '{}', $1)")
        .bind(forged)
        .execute(&db.pool)
        .await
        .unwrap();
    // The database holding it goes on from it, session after session.
    for day in 1..=3 {
        write(db.url.clone(), s[0], day).await.unwrap();
        assert!(last_seq(db.pool.clone()).await > forged);
    }
    // The other database's clock did not move.
    for day in 2..=4 {
        write(other.url.clone(), o[0], day).await.unwrap();
        let seq = last_seq(other.pool.clone()).await;
        assert!(seq < 1 << 40, "another database's event took seq {seq}");
    }
    let mut reader = sqlx::PgConnection::connect(&other.url).await.unwrap();
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM sales.events_since(0, 100)")
        .fetch_all(&mut reader)
        .await
        .unwrap();
    assert!(
        seqs.len() >= 4 && seqs.iter().all(|&q| q < 1 << 40),
        "{seqs:?}"
    );
}

/// Every reader of the delivery horizon needs READ COMMITTED: it reads the
/// horizon, then the log with a snapshot taken after it. Under REPEATABLE
/// READ or SERIALIZABLE the transaction's snapshot predates the horizon, so
/// `events_head`, `events_after_seq` and the `event_delivery` view refuse
/// them (25000, naming the level) rather than answer from an older log.
/// READ UNCOMMITTED, which Postgres runs as READ COMMITTED, is taken (it
/// was refused by `events_after_seq`).
#[tokio::test]
async fn readers_of_the_horizon_refuse_repeatable_read() {
    let db = TestDb::new().await;
    let id = scalar_i64(&db, "SELECT sales.announce('there')").await;
    let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
    for sql in [
        "SELECT sales.events_head()",
        "SELECT count(*) FROM sales.events_after_seq(0)",
        "SELECT count(*) FROM sales.events_since(0)",
        "SELECT count(*) FROM sales.event_delivery",
    ] {
        for level in ["REPEATABLE READ", "SERIALIZABLE"] {
            sqlx::raw_sql(&format!("BEGIN ISOLATION LEVEL {level}"))
                .execute(&mut c)
                .await
                .unwrap();
            let err = sqlx::raw_sql(sql).execute(&mut c).await.expect_err(sql);
            let (code, message, _) = pg_error(&err);
            assert_eq!(code, "25000", "{sql}: {message}");
            let named = format!("needs READ COMMITTED, not {}", level.to_lowercase());
            assert!(message.contains(&named), "{sql}: {message}");
            sqlx::raw_sql("ROLLBACK").execute(&mut c).await.unwrap();
        }
        for begin in ["BEGIN ISOLATION LEVEL READ UNCOMMITTED", "BEGIN"] {
            sqlx::raw_sql(begin).execute(&mut c).await.unwrap();
            sqlx::raw_sql(sql)
                .execute(&mut c)
                .await
                .unwrap_or_else(|e| panic!("{begin}: {sql}: {e}"));
            sqlx::raw_sql("COMMIT").execute(&mut c).await.unwrap();
        }
    }
    assert_eq!(scalar_i64(&db, "SELECT sales.events_head()").await, id);
}

/// `event_delivery` reads its head and its newest event with one snapshot,
/// taken after its horizon, and its newest event is the last in delivery
/// order: two writers that took their events' ids and seqs in opposite
/// orders show the one with the higher seq (the lower id) as both the head
/// and the newest. (The newest was the highest id, read with an older
/// snapshot than the head's.)
#[tokio::test]
async fn event_delivery_shows_the_newest_event_in_delivery_order() {
    let db = TestDb::new().await;
    let (a, [(id_b, _), _]) = sales_e2e::ids_and_seqs_apart_holding(&db).await;
    let delivery = || async {
        sqlx::query_as::<_, (i64, Option<i64>, i64, Option<i64>)>(
            "SELECT head_id, newest_id, held_back, oldest_held_id FROM sales.event_delivery",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    // `a` holds `b`'s event back.
    let (head, newest, held, oldest) = delivery().await;
    assert_eq!((newest, held, oldest), (Some(id_b), 1, Some(id_b)));
    assert!(head < id_b, "{head} {id_b}");
    a.commit().await.unwrap();
    assert_eq!(delivery().await, (id_b, Some(id_b), 0, None));
}
