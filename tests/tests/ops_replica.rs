//! Read replicas: with DATABASE_REPLICA_URL, list and summary reads run on a
//! real streaming replica (made by pg_basebackup on this machine), writes on
//! the primary; when the replica stops, reads fall back to the primary.

use sales_e2e::{eventually, month, user_token, Api, PgReplica, TestDb};
use serde_json::json;
use sqlx::Connection;
use std::time::Duration;

async fn scans(url: &str) -> i64 {
    let mut c = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::query_scalar(
        "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables
         WHERE schemaname = 'sales' AND relname = 'monthly_sales'",
    )
    .fetch_one(&mut c)
    .await
    .expect("scan counters")
}

/// The primary's scan counter once the writes before have reached it: a
/// backend that goes idle less than a second after its last report holds
/// its counts back for up to 10 s (PGSTAT_IDLE_INTERVAL), so the batch's own
/// scans may land late. Waits until the counter has not moved for longer
/// than that (bounded).
async fn settled_scans(url: &str) -> i64 {
    let mut last = scans(url).await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(10_500)).await;
        let now = scans(url).await;
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the primary's scan counter kept moving for a minute");
}

#[tokio::test]
async fn reads_go_to_the_replica_and_fall_back() {
    let db = TestDb::new().await;
    let stores = db.stores(2).await;
    let replica = PgReplica::start();
    let replica_url = replica.url_for(&db);
    let server = db
        .server(&[("DATABASE_REPLICA_URL", replica_url.as_str())])
        .await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));

    let (st, body) = api.post("/api/v2/sales/batch", &json!({"salesDataArray": [month(stores[0], 2024, 1, 10, 5.0), month(stores[1], 2024, 1, 10, 7.0)]})).await;
    assert_eq!(st, 200, "{body}");
    // The replica replays the write.
    eventually(Duration::from_secs(30), "replica has the rows", || async {
        let mut c = match sqlx::PgConnection::connect(&replica_url).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("replica not reachable yet: {e}");
                return None;
            }
        };
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.monthly_sales")
            .fetch_one(&mut c)
            .await
            .ok()?;
        (n == 2).then_some(())
    })
    .await;

    // Reads (distinct queries, so none is a cache hit) scan on the replica, not the primary.
    let primary_before = settled_scans(&db.url).await;
    let replica_before = scans(&replica_url).await;
    for limit in 1..=5 {
        let (st, body) = api
            .get(&format!(
                "/api/v2/sales?limit={limit}&fields=storeId,totalSales"
            ))
            .await;
        assert_eq!(st, 200, "{body}");
    }
    let (st, _) = api.get("/api/v2/sales/summary?groupBy=region").await;
    assert_eq!(st, 200);
    // A backend idle after its reads reports them within
    // PGSTAT_IDLE_INTERVAL (10 s): waited for on both sides.
    eventually(
        Duration::from_secs(30),
        "replica scan counters move",
        || async { (scans(&replica_url).await >= replica_before + 6).then_some(()) },
    )
    .await;
    assert_eq!(
        settled_scans(&db.url).await,
        primary_before,
        "no read scanned the primary"
    );

    // A write goes to the primary and is read back at once (the read waits for
    // the replica to catch up, or is served by the primary).
    let (st, _) = api.post("/api/v2/sales/batch", &json!({"mode": "replace", "salesDataArray": [{"storeId": stores[0], "year": 2024, "month": 1, "dailyData": {"1": {"sales": 1}}}]})).await;
    assert_eq!(st, 200);
    let (_, body) = api
        .get(&format!(
            "/api/v2/sales?storeId={}&fields=totalSales",
            stores[0]
        ))
        .await;
    assert_eq!(body["data"][0]["totalSales"], 1);

    // Replica down: reads still succeed, from the primary.
    replica.stop();
    let primary_before = scans(&db.url).await;
    eventually(
        Duration::from_secs(10),
        "reads served by the primary",
        || async {
            let (st, body) = api
                .get(&format!(
                    "/api/v2/sales?limit=7&fields=id&sort=-id&offset={}",
                    rand_offset()
                ))
                .await;
            assert_eq!(st, 200, "{body}");
            (scans(&db.url).await > primary_before).then_some(())
        },
    )
    .await;
    for i in 0..5 {
        let (st, _) = api.get(&format!("/api/v2/sales?limit={}", 10 + i)).await;
        assert_eq!(st, 200);
    }
    let (_, metrics) = (
        200,
        reqwest::get(server.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert!(
        metrics.contains("db_replica_up 0"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("replica"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    server.stop().await;
}

fn rand_offset() -> u32 {
    use rand::Rng;
    rand::thread_rng().gen_range(0..1000)
}

/// A `DATABASE_REPLICA_URL` that names a server not in recovery (a
/// promoted or detached replica, or another primary) does not follow this
/// primary's writes: reads go to the primary. (It counted as always caught
/// up, so a write read back through it was answered from the other
/// database: the old version, or nothing.)
#[tokio::test]
async fn a_replica_url_that_is_not_in_recovery_is_not_read_from() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let other = TestDb::new().await;
    let server = db
        .server(&[("DATABASE_REPLICA_URL", other.url.as_str())])
        .await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let (st, body) = api
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [month(stores[0], 2024, 1, 28, 2.0)]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    // Given a moment to be taken for a replica: it never is.
    for i in 0..5 {
        // A query of its own each time: read from a database, not the cache.
        let (st, body) = api
            .get(&format!(
                "/api/v2/sales?storeId={}&fields=totalSales&maxTotalSales={}",
                stores[0],
                1_000_000_000 + i
            ))
            .await;
        assert_eq!(st, 200, "{body}");
        assert_eq!(body["data"].as_array().map(Vec::len), Some(1), "{body}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let state = server.state.replica.as_ref().expect("a replica configured");
    assert!(!state.up.load(std::sync::atomic::Ordering::Relaxed));
    server.stop().await;
}

/// A connection to the replica, once it answers (bounded).
async fn standby(replica_url: &str) -> sqlx::PgConnection {
    eventually(Duration::from_secs(30), "the replica answers", || async {
        sqlx::PgConnection::connect(replica_url).await.ok()
    })
    .await
}

/// Pauses the standby's replay and waits (bounded) until it is paused.
async fn pause_replay(standby: &mut sqlx::PgConnection, replica_url: &str) {
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&mut *standby)
        .await
        .unwrap();
    replay_paused(replica_url).await;
}

/// Waits (bounded) until the replica's replay is paused (a pause is asked
/// for, and takes effect at the next record).
async fn replay_paused(replica_url: &str) {
    eventually(Duration::from_secs(10), "replay paused", || async {
        let mut c = sqlx::PgConnection::connect(replica_url).await.ok()?;
        let state: String = sqlx::query_scalar("SELECT pg_get_wal_replay_pause_state()")
            .fetch_one(&mut c)
            .await
            .ok()?;
        (state == "paused").then_some(())
    })
    .await;
}

/// Nothing a read could miss is read from the replica: what was committed
/// before the server started (its floor began at 0, so a paused replica
/// was read from and its answer cached), what a cache clear is for (a
/// change by hand, with no event: the refill came from the replica), and a
/// write committed asynchronously (`synchronous_commit = off`: the floor
/// was the primary's WAL write position, which can be short of the commit).
#[tokio::test]
async fn nothing_the_replica_has_not_replayed_is_read_from_it() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    sqlx::query(&format!(
        "ALTER DATABASE {} SET synchronous_commit = off",
        db.name
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let replica = PgReplica::start();
    let replica_url = replica.url_for(&db);
    let mut standby = standby(&replica_url).await;
    pause_replay(&mut standby, &replica_url).await;
    // Written before the server starts; the replica does not have it.
    let batch = json!([month(s, 2024, 1, 10, 10.0)]);
    sqlx::query("SELECT sales.batch_upsert($1)")
        .bind(&batch)
        .execute(&db.pool)
        .await
        .unwrap();

    let server = db
        .server(&[("DATABASE_REPLICA_URL", replica_url.as_str())])
        .await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let path = format!("/api/v2/sales?storeId={s}&year=2024&month=1&fields=totalSales");
    for _ in 0..2 {
        let (st, body) = api.get(&path).await;
        assert_eq!(st, 200, "{body}");
        assert_eq!(
            body["data"][0]["totalSales"].as_f64(),
            Some(100.0),
            "{body}"
        );
    }

    // The replica catches up, and stops replaying again.
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&mut standby)
        .await
        .unwrap();
    let primary_lsn: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the replica caught up", || async {
        let mut c = sqlx::PgConnection::connect(&replica_url).await.ok()?;
        let done: bool = sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
            .bind(&primary_lsn)
            .fetch_one(&mut c)
            .await
            .ok()?;
        done.then_some(())
    })
    .await;
    pause_replay(&mut standby, &replica_url).await;
    // Read from the replica now (caught up), then changed by hand with no
    // event, and the cache cleared.
    sqlx::raw_sql(&format!(
        "BEGIN; SET LOCAL session_replication_role = replica;
         UPDATE sales.monthly_sales SET daily_data = '{{\"1\": {{\"sales\": 7}}}}', total_sales = 7
         WHERE store_id = {s};
         COMMIT;"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let (st, body) = api.post("/api/admin/cache/clear", &json!({})).await;
    assert_eq!(st, 200, "{body}");
    for _ in 0..2 {
        let (_, body) = api.get(&path).await;
        assert_eq!(body["data"][0]["totalSales"].as_f64(), Some(7.0), "{body}");
    }
    // Once the replica has replayed the change, the clear is applied again
    // (what another instance filled from the replica before it heard of
    // the clear is made stale): the tag every entry carries moves again.
    let all_tag = || async {
        let out = tokio::process::Command::new("redis-cli")
            .args([
                "-u",
                &sales_e2e::redis_url(),
                "GET",
                &format!("{}:t:all", db.name),
            ])
            .output()
            .await
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<i64>()
            .ok()
    };
    let cleared = all_tag().await.expect("the clear's bump");

    // Replaying again: each asynchronous write is read back at once.
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&mut standby)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(40),
        "the clear applied again",
        || async { (all_tag().await? > cleared).then_some(()) },
    )
    .await;
    for v in 1..=10 {
        let (st, body) = api
            .post(
                "/api/v2/sales/batch",
                &json!({"mode": "replace", "salesDataArray": [
                    {"storeId": s, "year": 2024, "month": 1, "dailyData": {"1": {"sales": v}}}]}),
            )
            .await;
        assert_eq!(st, 200, "{body}");
        let (_, body) = api.get(&path).await;
        assert_eq!(
            body["data"][0]["totalSales"].as_f64(),
            Some(v as f64),
            "write {v}: {body}"
        );
    }
    server.stop().await;
}

/// The replica's processes stopped (SIGSTOP: a hung host) and continued
/// again on drop, whatever the test's outcome.
struct Frozen(Vec<String>);

impl Frozen {
    fn replica(replica: &PgReplica) -> Self {
        let pid = std::fs::read_to_string(replica.dir.join("postmaster.pid"))
            .expect("postmaster.pid")
            .lines()
            .next()
            .expect("pid line")
            .trim()
            .to_string();
        let children = std::process::Command::new("pgrep")
            .args(["-P", &pid])
            .output()
            .expect("pgrep");
        let mut pids = vec![pid];
        pids.extend(
            String::from_utf8_lossy(&children.stdout)
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty()),
        );
        let ok = std::process::Command::new("kill")
            .arg("-STOP")
            .args(&pids)
            .status()
            .expect("kill")
            .success();
        assert!(ok, "could not stop {pids:?}");
        Frozen(pids)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-CONT")
            .args(&self.0)
            .status();
    }
}

/// A replica that stops answering without closing its connections (a hung
/// host) sends reads to the primary: asking whether it has replayed far
/// enough is bounded. The read waited for as long as the client did.
#[tokio::test]
async fn a_replica_that_stops_answering_sends_reads_to_the_primary() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    let replica = PgReplica::start();
    let replica_url = replica.url_for(&db);
    let server = db
        .server(&[("DATABASE_REPLICA_URL", replica_url.as_str())])
        .await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let (st, body) = api
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [month(s, 2024, 1, 10, 10.0)]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    // A read served by the replica: its pool keeps the connection.
    eventually(
        Duration::from_secs(30),
        "a read from the replica",
        || async {
            let (st, _) = api
                .get(&format!(
                    "/api/v2/sales?storeId={s}&limit={}",
                    1 + rand_offset() % 100
                ))
                .await;
            assert_eq!(st, 200);
            (metric(&server, "db_replica_reads_total").await? >= 1.0).then_some(())
        },
    )
    .await;

    let frozen = Frozen::replica(&replica);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    for limit in [3, 4] {
        let r = client
            .get(server.url(&format!(
                "/api/v2/sales?storeId={s}&limit={limit}&fields=totalSales"
            )))
            .bearer_auth(&token)
            .send()
            .await
            .expect("answered while the replica hangs");
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            body["data"][0]["totalSales"].as_f64(),
            Some(100.0),
            "{body}"
        );
    }
    drop(frozen);
    server.stop().await;
}

/// The value of a metric line `name value` on `/metrics`.
async fn metric(server: &sales_server::RunningServer, name: &str) -> Option<f64> {
    let m = reqwest::get(server.url("/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A standby whose event log is not the primary's is not read from: its
/// epoch (`sales.event_log_epoch()`, the log's identity and the WAL
/// timeline) differs after a promotion it follows (another timeline) or in
/// a copy of another database; here the primary's log is given a new
/// identity while the standby does not replay. It was read from whenever it
/// was in recovery and had replayed past the floor, comparing positions of
/// unrelated WAL histories.
#[tokio::test]
async fn a_standby_of_another_log_is_not_read_from() {
    let db = TestDb::new().await;
    db.stores(1).await;
    let replica = PgReplica::start();
    let replica_url = replica.url_for(&db);
    let server = db
        .server(&[("DATABASE_REPLICA_URL", replica_url.as_str())])
        .await;
    eventually(Duration::from_secs(30), "the replica is up", || async {
        (metric(&server, "db_replica_up").await? == 1.0).then_some(())
    })
    .await;
    let mut standby = sqlx::PgConnection::connect(&replica_url).await.unwrap();
    pause_replay(&mut standby, &replica_url).await;
    sqlx::query("UPDATE sales.event_log_identity SET epoch = gen_random_uuid()")
        .execute(&db.pool)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the replica is not read from",
        || async { (metric(&server, "db_replica_up").await? == 0.0).then_some(()) },
    )
    .await;
    // Once it has replayed the new identity, it is the primary's log again.
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&mut standby)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the replica is up again",
        || async { (metric(&server, "db_replica_up").await? == 1.0).then_some(()) },
    )
    .await;
    server.stop().await;
}

/// Two instances sharing Redis, each reading from the replica, while a
/// transaction writing events stays open (so neither relay delivers the
/// events committed after it): a write through one instance is read
/// through the other at once, and the writer then reads its own write.
/// The other instance read from the replica, which had not replayed the
/// write (its own floor knew nothing of it), and cached that answer under
/// the tag versions the write had already moved: the writer then served
/// the old answer as a cache hit until the open transaction ended.
#[tokio::test]
async fn another_instances_write_is_read_while_delivery_is_held_back() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    let replica = PgReplica::start();
    let replica_url = replica.url_for(&db);
    let mut standby = standby(&replica_url).await;
    let a = db
        .server(&[("DATABASE_REPLICA_URL", replica_url.as_str())])
        .await;
    let b = db
        .server(&[("DATABASE_REPLICA_URL", replica_url.as_str())])
        .await;
    let (_, token) = user_token(&db, &a, "a@example.com", "admin", &[]).await;
    let (api_a, api_b) = (Api::new(&a, Some(&token)), Api::new(&b, Some(&token)));

    // An event-writing transaction left open: delivery waits for it.
    let mut holder = db.connect().await;
    sqlx::raw_sql("BEGIN; SELECT sales.emit('held-open', '{}')")
        .execute(&mut holder)
        .await
        .unwrap();
    let holders: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.event_holders()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(holders, 1, "the open transaction holds delivery back");
    pause_replay(&mut standby, &replica_url).await;

    for (round, month_no) in (1..=3).enumerate() {
        let (st, body) = api_b
            .post(
                "/api/v2/sales/batch",
                &json!({"salesDataArray": [month(s, 2024, month_no, 3, 10.0 + round as f64)]}),
            )
            .await;
        assert_eq!(st, 200, "{body}");
        let path =
            format!("/api/v2/sales?storeId={s}&year=2024&month={month_no}&fields=totalSales");
        let want = Some(30.0 + 3.0 * round as f64);
        let (st, body) = api_a.get(&path).await;
        assert_eq!(st, 200, "{body}");
        assert_eq!(
            body["data"][0]["totalSales"].as_f64(),
            want,
            "the other instance: {body}"
        );
        let (_, body) = api_b.get(&path).await;
        assert_eq!(
            body["data"][0]["totalSales"].as_f64(),
            want,
            "the writer: {body}"
        );
    }
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&mut standby)
        .await
        .unwrap();
    a.stop().await;
    b.stop().await;
}

/// On a standby the delivery horizon is refused, saying why: a standby
/// knows nothing of the primary's running transactions, so a horizon
/// computed there could pass an event one of them may still commit below
/// it (the call failed before with "cannot assign TransactionIds during
/// recovery"), and so is an event seq (25006). A session opened on the
/// standby that outlives its promotion (a pooled connection after a
/// failover) then writes its events after every event the standby
/// replayed.
#[tokio::test]
async fn a_session_that_outlives_a_promotion_writes_after_every_replayed_event() {
    let db = TestDb::new().await;
    let s = db.stores(1).await;
    let write = |day: u32| {
        format!(
            "INSERT INTO sales.monthly_sales AS t (store_id, year, month, daily_data) VALUES ({}, 2024, 3, '{{\"{day}\": {{\"sales\": {day}}}}}')
             ON CONFLICT (store_id, year, month) DO UPDATE SET daily_data = t.daily_data || EXCLUDED.daily_data",
            s[0]
        )
    };
    sqlx::raw_sql(&write(1)).execute(&db.pool).await.unwrap();
    let replica = PgReplica::start();
    let replica_url = replica.url_for(&db);
    let mut session = standby(&replica_url).await;
    let max_seq = "SELECT coalesce(max(seq), 0) FROM sales.events";
    let first: i64 = sqlx::query_scalar(max_seq)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the standby has the first event",
        || async {
            let n: i64 = sqlx::query_scalar(max_seq).fetch_one(&db.pool).await.ok()?;
            let mut c = sqlx::PgConnection::connect(&replica_url).await.ok()?;
            let m: i64 = sqlx::query_scalar(max_seq).fetch_one(&mut c).await.ok()?;
            (m == n && n == first).then_some(())
        },
    )
    .await;
    // The session asks for the horizon while the server is a standby.
    let refused = sqlx::query_scalar::<_, i64>("SELECT sales.events_horizon()")
        .fetch_one(&mut session)
        .await
        .expect_err("no horizon on a standby");
    let message = refused.to_string();
    assert!(message.contains("primary only"), "{message}");
    // So is an event seq, refused before the session's clock reads the
    // log: read here, it would miss the events replayed after it.
    let refused = sqlx::query_scalar::<_, i64>("SELECT sales.event_seq()")
        .fetch_one(&mut session)
        .await
        .expect_err("no event seq on a standby");
    let code = refused
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("25006"), "{refused}");
    let message = refused.to_string();
    assert!(message.contains("primary only"), "{message}");
    // The primary writes on; the standby replays it.
    for day in 2..=6 {
        sqlx::raw_sql(&write(day)).execute(&db.pool).await.unwrap();
    }
    let last: i64 = sqlx::query_scalar(max_seq)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(last > first);
    eventually(
        Duration::from_secs(30),
        "the standby has every event",
        || async {
            let mut c = sqlx::PgConnection::connect(&replica_url).await.ok()?;
            let m: i64 = sqlx::query_scalar(max_seq).fetch_one(&mut c).await.ok()?;
            (m == last).then_some(())
        },
    )
    .await;
    // Promoted, the same session writes: its event comes after them all.
    let promoted: bool = sqlx::query_scalar("SELECT pg_promote(true, 60)")
        .fetch_one(&mut session)
        .await
        .unwrap();
    assert!(promoted);
    sqlx::raw_sql(&write(7))
        .execute(&mut session)
        .await
        .unwrap();
    let (seq, version): (i64, i64) = sqlx::query_as(
        "SELECT seq, row_version FROM sales.events WHERE row_id IS NOT NULL ORDER BY row_version DESC LIMIT 1",
    )
    .fetch_one(&mut session)
    .await
    .unwrap();
    assert_eq!(version, 7);
    assert!(
        seq > last,
        "the promoted session's event seq {seq}, the last replayed {last}"
    );
}

/// While Redis does not answer, an instance cannot know how far another
/// instance's write is (the shared read floor lives there): a cached read
/// then comes from the primary, not from a replica that has not replayed
/// the write (before, the replica was read on the floor this instance knew,
/// and the row came back as it was before the other instance's write).
/// Delivery is held back, so the reader's relay has not heard of the write.
#[tokio::test]
async fn with_redis_down_another_instances_write_is_read_from_the_primary() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    let replica = PgReplica::start();
    let replica_url = replica.url_for(&db);
    let mut standby = standby(&replica_url).await;
    let port = sales_e2e::free_port();
    let mut redis = sales_e2e::OwnRedis::start(port);
    let redis_url = format!("redis://127.0.0.1:{port}");
    eventually(Duration::from_secs(30), "private redis up", || async {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| ())
    })
    .await;
    let env = [
        ("DATABASE_REPLICA_URL", replica_url.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("REDIS_TIMEOUT", "500ms"),
    ];
    let a = db.server(&env).await;
    let b = db.server(&env).await;
    let (_, token) = user_token(&db, &a, "a@example.com", "admin", &[]).await;
    let (api_a, api_b) = (Api::new(&a, Some(&token)), Api::new(&b, Some(&token)));

    let mut holder = db.connect().await;
    sqlx::raw_sql("BEGIN; SELECT sales.emit('held-open', '{}')")
        .execute(&mut holder)
        .await
        .unwrap();
    redis.stop();
    for server in [&a, &b] {
        eventually(Duration::from_secs(30), "redis seen down", || async {
            let (_, h) = Api::new(server, None).get("/health").await;
            (h["status"] == "degraded").then_some(())
        })
        .await;
    }
    pause_replay(&mut standby, &replica_url).await;
    let (st, body) = api_b
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [month(s, 2024, 1, 3, 10.0)]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let path = format!("/api/v2/sales?storeId={s}&year=2024&month=1&fields=totalSales");
    let (st, body) = api_a.get(&path).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        body["data"][0]["totalSales"].as_f64(),
        Some(30.0),
        "the other instance: {body}"
    );
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&mut standby)
        .await
        .unwrap();
    a.stop().await;
    b.stop().await;
}
