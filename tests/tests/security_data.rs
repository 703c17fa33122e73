//! Issue 13, data: no silent loss in batches, cache keys that cannot be
//! forged, bad input as 400, scope that tells nothing, reports that stay
//! small, retries that never repeat a commit, dependency errors kept from
//! strangers, store reads that see the caller's write.

use base64::Engine;
use reqwest::Method;
use sales_e2e::{eventually, month, user_token, Api, Fixture, PgReplica, TestDb};
use serde_json::{json, Value};
use sqlx::postgres::PgConnectOptions;
use sqlx::ConnectOptions;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn fixture(overrides: &[(&str, &str)]) -> Fixture {
    Fixture::start(3, overrides).await
}

fn days(from: u32, to: u32) -> Value {
    (from..=to)
        .map(|d| (d.to_string(), json!({"sales": 100.0, "customers": 5})))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

async fn stored_days(db: &TestDb, store: i64, year: i32, month: i32) -> Option<Vec<String>> {
    let doc: Option<Value> = sqlx::query_scalar(
        "SELECT daily_data FROM sales.monthly_sales WHERE store_id = $1 AND year = $2 AND month = $3",
    )
    .bind(store)
    .bind(year)
    .bind(month)
    .fetch_optional(&db.pool)
    .await
    .unwrap();
    doc.map(|d| {
        let mut k: Vec<String> = d.as_object().unwrap().keys().cloned().collect();
        k.sort_by_key(|d| d.parse::<u32>().unwrap_or(0));
        k
    })
}

/// Item 3: near-miss spellings of `dailyData` / `storeId` are unknown
/// fields, reported by index, never read as the real member or lost.
#[tokio::test]
async fn misspelled_members_are_reported_not_lost() {
    let f = fixture(&[]).await;
    let s = f.stores[0];
    // Alone, non-atomic: a per-record error with its index, not a failed batch.
    let (st, body) = f
        .admin
        .post(
            "/api/v2/sales/batch",
            &json!({"atomic": false, "salesDataArray": [
                {"storeId": s, "year": 2024, "month": 1, "dailyData_": days(1, 3)},
                month(s, 2024, 3, 2, 10.0),
            ]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["failed"], 1, "{body}");
    assert_eq!(body["inserted"], 1, "{body}");
    assert!(
        body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["index"] == 0 && e["field"] == "dailyData_"),
        "{body}"
    );
    assert_eq!(stored_days(&f.db, s, 2024, 1).await, None);
    // Twice the same store-month, one aliased: the alias is refused by
    // index; the other record is written whole.
    let (st, body) = f
        .admin
        .post(
            "/api/v2/sales/batch",
            &json!({"atomic": false, "salesDataArray": [
                {"storeId": s, "year": 2024, "month": 2, "dailyData": days(1, 3)},
                {"storeId": s, "year": 2024, "month": 2, "daily__data": days(10, 12)},
            ]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["failed"], 1, "{body}");
    assert_eq!(body["errors"][0]["index"], 1, "{body}");
    assert_eq!(body["errors"][0]["field"], "daily__data", "{body}");
    assert_eq!(
        stored_days(&f.db, s, 2024, 2).await.unwrap(),
        vec!["1", "2", "3"]
    );
    // Atomic: nothing written, the report names the record.
    let (st, body) = f
        .admin
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [
                month(s, 2024, 5, 2, 10.0),
                {"storeId": s, "year": 2024, "month": 6, "_dailyData": days(1, 2)},
            ]}),
        )
        .await;
    assert_eq!(st, 422, "{body}");
    assert_eq!(body["error"]["details"]["errors"][0]["index"], 1, "{body}");
    assert_eq!(stored_days(&f.db, s, 2024, 5).await, None, "atomic");
    // A store named by a variant of `storeId` is not a store id at all.
    let (_, staff) = user_token(&f.db, &f.server, "staff@example.com", "staff", &[s]).await;
    let other = f.stores[1];
    let (st, body) = Api::new(&f.server, Some(&staff))
        .post(
            "/api/v2/sales/batch",
            &json!({"atomic": false, "salesDataArray": [
                {"store_id_": other, "year": 2024, "month": 1, "dailyData": days(1, 2)},
            ]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert!(
        body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["field"] == "store_id_"),
        "{body}"
    );
    assert_eq!(stored_days(&f.db, other, 2024, 1).await, None);
    f.server.stop().await;
}

/// Item 4: a parameter the operation does not declare is a 400, so a
/// forged query cannot plant an entry that a colleague's request hits;
/// two spellings of one request share an entry.
#[tokio::test]
async fn forged_queries_cannot_poison_the_cache() {
    let f = fixture(&[]).await;
    let s = f.stores[0];
    let recs: Vec<Value> = (1..=3)
        .flat_map(|m| [month(s, 2024, m, 2, 1.0), month(s, 2025, m, 2, 1.0)])
        .collect();
    let (st, body) = f
        .admin
        .post("/api/v2/sales/batch", &json!({"salesDataArray": recs}))
        .await;
    assert_eq!(st, 200, "{body}");
    // The relay has applied the batch's invalidation once it has read the
    // batch's events and another request with the same tags is served from
    // the cache after that.
    sales_e2e::relay_caught_up(&f.db, &f.server).await;
    sales_e2e::warm(&f.admin, "/api/v2/sales?fields=year&limit=50&year=2025").await;
    let (st, body) = f
        .admin
        .get("/api/v2/sales?fields=year,month&limit%0150%00year=2025")
        .await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(
        body["error"]["details"]["parameter"], "limit\u{1}50\u{0}year",
        "{body}"
    );
    let r = f
        .admin
        .req(
            Method::GET,
            "/api/v2/sales?fields=year,month&limit=50&year=2025",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache"], "miss");
    let body: Value = r.json().await.unwrap();
    let years: Vec<i64> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["year"].as_i64().unwrap())
        .collect();
    assert_eq!(years, vec![2025; 3], "{body}");
    let r = f
        .admin
        .req(
            Method::GET,
            "/api/v2/sales?year=2025&limit=50&fields=year,%20month",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache"], "hit", "same parsed request");
    f.server.stop().await;
}

/// Items 5 and 6: bad input is a 400 naming the parameter, never a 500.
#[tokio::test]
async fn tampered_cursors_and_nul_are_400() {
    let f = fixture(&[]).await;
    let s = f.stores[0];
    let recs: Vec<Value> = (1..=4).map(|m| month(s, 2024, m, 2, m as f64)).collect();
    let (st, body) = f
        .admin
        .post("/api/v2/sales/batch", &json!({"salesDataArray": recs}))
        .await;
    assert_eq!(st, 200, "{body}");
    for (sort, bad) in [
        ("-updatedAt", "2024-99-99 00:00:00+00"),
        ("totalSales", "1e999999"),
    ] {
        let (st, body) = f
            .admin
            .get(&format!("/api/v2/sales?sort={sort}&limit=1"))
            .await;
        assert_eq!(st, 200, "{body}");
        let cursor = body["meta"]["nextCursor"].as_str().unwrap();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut c: Value = serde_json::from_slice(&b64.decode(cursor).unwrap()).unwrap();
        c["v"][0] = json!(bad);
        let forged = b64.encode(c.to_string());
        let (st, body) = f
            .admin
            .get(&format!(
                "/api/v2/sales?sort={sort}&limit=1&cursor={forged}"
            ))
            .await;
        assert_eq!(st, 400, "{sort}: {body}");
        assert_eq!(body["error"]["details"]["parameter"], "cursor", "{body}");
    }
    let (st, body) = f
        .admin
        .post(
            "/api/v2/stores",
            &json!({"code": "NUL1", "name": ".\u{0}3", "region": "North"}),
        )
        .await;
    assert_eq!(st, 400, "{body}");
    let (st, body) = f.admin.get("/api/v2/stores?region=a%00b").await;
    assert_eq!(st, 400, "{body}");
    f.server.stop().await;
}

/// Item 12: a record outside the caller's scope is answered as a missing
/// one, by id and in a delete by id: the store that owns it is not told.
#[tokio::test]
async fn records_outside_the_scope_are_missing() {
    let f = fixture(&[]).await;
    let (mine, theirs) = (f.stores[0], f.stores[1]);
    let (st, body) = f
        .admin
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [month(theirs, 2024, 1, 2, 1.0)]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let id: i64 = sqlx::query_scalar("SELECT id FROM sales.monthly_sales WHERE store_id = $1")
        .bind(theirs)
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    let (_, token) = user_token(&f.db, &f.server, "staff@example.com", "staff", &[mine]).await;
    let staff = Api::new(&f.server, Some(&token));
    let (st, body) = staff.get(&format!("/api/v2/sales/{id}")).await;
    assert_eq!(st, 404, "{body}");
    let (st, missing) = staff.get("/api/v2/sales/99999999").await;
    assert_eq!(st, 404);
    assert_eq!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .replace(&id.to_string(), "N"),
        missing["error"]["message"]
            .as_str()
            .unwrap()
            .replace("99999999", "N")
    );
    let (st, body) = staff
        .send_json(
            Method::DELETE,
            "/api/v2/sales/batch",
            &json!({"ids": [id], "atomic": false}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        body["errors"][0]["reason"], "no such sales record",
        "{body}"
    );
    assert!(
        !body.to_string().contains(&format!("store {theirs}")),
        "{body}"
    );
    f.server.stop().await;
}

/// Item 13: a report is capped, and says how many errors it left out.
#[tokio::test]
async fn error_reports_are_capped() {
    let f = fixture(&[]).await;
    let records: Vec<Value> = (0..3)
        .map(|r| {
            let mut rec = serde_json::Map::new();
            for k in 0..2000 {
                rec.insert(format!("junk{r}_{k}"), json!(0));
            }
            Value::Object(rec)
        })
        .collect();
    let (st, body) = f
        .admin
        .post("/api/v2/sales/batch", &json!({"salesDataArray": records}))
        .await;
    assert_eq!(st, 422);
    let report = &body["error"]["details"];
    let listed = report["errors"].as_array().unwrap().len();
    assert!(listed <= 100, "{listed} errors listed");
    assert!(report["errorsOmitted"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["failed"], 3);
    f.server.stop().await;
}

/// A TCP proxy in front of Postgres that can lose a connection right after
/// Postgres has committed (the COMMIT reply is dropped), or go down.
struct PgProxy {
    port: u16,
    cut_after_commit: Arc<AtomicBool>,
    down: tokio::sync::watch::Sender<bool>,
}

impl PgProxy {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream_port = PgConnectOptions::from_str(&sales_e2e::base_url())
            .unwrap()
            .get_port();
        let cut_after_commit = Arc::new(AtomicBool::new(false));
        let (down, down_rx) = tokio::sync::watch::channel(false);
        let cut = cut_after_commit.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if *down_rx.borrow() {
                    continue;
                }
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await
                else {
                    continue;
                };
                let (cut, mut down_rx) = (cut.clone(), down_rx.clone());
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let committed = Arc::new(tokio::sync::Notify::new());
                    let saw_commit = committed.clone();
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            let commit = buf[..n].windows(7).any(|w| w == b"COMMIT\0")
                                && cut.swap(false, Ordering::SeqCst);
                            if sw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                            if commit {
                                saw_commit.notify_one();
                                std::future::pending::<()>().await;
                            }
                        }
                    };
                    let downstream = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            tokio::select! {
                                r = sr.read(&mut buf) => {
                                    let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                                    if cw.write_all(&buf[..n]).await.is_err() { return; }
                                }
                                // Postgres has the COMMIT: its reply is lost with the connection.
                                _ = committed.notified() => {
                                    let _ = sr.read(&mut buf).await;
                                    return;
                                }
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = downstream => {}
                        _ = down_rx.wait_for(|d| *d) => {}
                    }
                });
            }
        });
        Self {
            port,
            cut_after_commit,
            down,
        }
    }

    fn url_for(&self, db: &TestDb) -> String {
        let opts = PgConnectOptions::from_str(&db.url).unwrap().port(self.port);
        format!("{}", opts.to_url_lossy())
    }
}

/// Item 11: a batch whose connection is lost at COMMIT is not run again
/// (its outcome is unknown: here it did commit); the caller is told so.
#[tokio::test]
async fn a_batch_lost_at_commit_is_not_repeated() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let proxy = PgProxy::start().await;
    let url = proxy.url_for(&db);
    let server = db
        .server(&[("DATABASE_URL", url.as_str()), ("DB_POOL_MIN", "0")])
        .await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    proxy.cut_after_commit.store(true, Ordering::SeqCst);
    let r = api
        .req(Method::POST, "/api/v2/sales/batch")
        .json(&json!({"salesDataArray": [month(stores[0], 2024, 1, 3, 10.0)]}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "outcome_unknown", "{body}");
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sales.events WHERE kind = 'batch-completed'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(events, 1, "the batch ran once");
    server.stop().await;
}

/// Item 17: /health shows a dependency's error text to admins only.
#[tokio::test]
async fn health_keeps_dependency_errors_for_admins() {
    let db = TestDb::new().await;
    let proxy = PgProxy::start().await;
    let url = proxy.url_for(&db);
    let server = db
        .server(&[
            ("DATABASE_URL", url.as_str()),
            ("DB_POOL_MIN", "0"),
            ("DB_CONNECTION_TIMEOUT", "1s"),
        ])
        .await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    proxy.down.send_replace(true);
    let anonymous = Api::new(&server, None);
    let body = eventually(Duration::from_secs(30), "postgres seen down", || async {
        let r = anonymous.req(Method::GET, "/health").send().await.ok()?;
        let body: Value = r.json().await.ok()?;
        (body["postgres"]["up"] == false).then_some(body)
    })
    .await;
    assert_eq!(body["postgres"]["error"], "unreachable", "{body}");
    let r = Api::new(&server, Some(&token))
        .req(Method::GET, "/health")
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    let detail = body["postgres"]["error"].as_str().unwrap_or_default();
    assert!(!detail.is_empty() && detail != "unreachable", "{body}");
    server.stop().await;

    // Redis the same way: a port nothing listens on.
    let closed = sales_e2e::free_port();
    let redis_url = format!("redis://127.0.0.1:{closed}");
    let server = db
        .server(&[
            ("REDIS_URL", redis_url.as_str()),
            ("REDIS_TIMEOUT", "200ms"),
        ])
        .await;
    let (_, token) = user_token(&db, &server, "a2@example.com", "admin", &[]).await;
    let r = Api::new(&server, None)
        .req(Method::GET, "/health")
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["redis"]["up"], false, "{body}");
    assert_eq!(body["redis"]["error"], "unreachable", "{body}");
    let body = eventually(
        Duration::from_secs(30),
        "redis's error for an admin",
        || async {
            let r = Api::new(&server, Some(&token))
                .req(Method::GET, "/health")
                .send()
                .await
                .ok()?;
            let body: Value = r.json().await.ok()?;
            let detail = body["redis"]["error"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            (!detail.is_empty() && detail != "unreachable").then_some(body)
        },
    )
    .await;
    assert_eq!(body["redis"]["up"], false, "{body}");
    server.stop().await;
}

/// Item 15: a store just created or changed is read back even while the
/// replica lags (here: replay paused).
#[tokio::test]
async fn store_reads_see_the_callers_write_despite_replica_lag() {
    let db = TestDb::new().await;
    let replica = PgReplica::start();
    let replica_url = replica.url_for(&db);
    let server = db
        .server(&[("DATABASE_REPLICA_URL", replica_url.as_str())])
        .await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    eventually(Duration::from_secs(30), "replica in use", || async {
        server
            .state
            .replica
            .as_ref()?
            .up
            .load(Ordering::Relaxed)
            .then_some(())
    })
    .await;
    let mut standby = sqlx::PgConnection::connect(&replica_url).await.unwrap();
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&mut standby)
        .await
        .unwrap();
    let (st, body) = api
        .post(
            "/api/v2/stores",
            &json!({"code": "LAG1", "name": "Lagging", "region": "North"}),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    let id = body["data"]["id"].as_i64().unwrap();
    let (st, body) = api.get(&format!("/api/v2/stores/{id}")).await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = api
        .send_json(
            Method::PATCH,
            &format!("/api/v2/stores/{id}"),
            &json!({"status": "closed"}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = api.get("/api/v2/stores?status=closed").await;
    assert_eq!(st, 200);
    assert!(
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == id),
        "{body}"
    );
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&mut standby)
        .await
        .unwrap();
    server.stop().await;
}

use sqlx::Connection;

fn redis_cli(args: &[&str]) -> String {
    let url = sales_e2e::redis_url();
    let out = std::process::Command::new("redis-cli")
        .arg("-u")
        .arg(&url)
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Item 16: a tag counter that Redis loses (evicted, expired) does not come
/// back at a value an older entry recorded; counters expire after the
/// entries that depend on them.
#[tokio::test]
async fn lost_tag_counters_never_revive_stale_entries() {
    let f = fixture(&[("CACHE_TTL", "60")]).await;
    let s = f.stores[0];
    let path = format!("/api/v2/sales?storeId={s}&fields=totalSales");
    let (st, body) = f
        .admin
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [month(s, 2024, 1, 1, 1.0)]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    // Cached now, then made stale by a write.
    let (_, before) = f.admin.get(&path).await;
    sales_e2e::warm(&f.admin, &path).await;
    let (st, body) = f
        .admin
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [month(s, 2024, 1, 1, 500.0)], "mode": "replace"}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    // Every counter has an expiry, longer than CACHE_TTL.
    let tags = redis_cli(&["--scan", "--pattern", &format!("{}:t:*", f.db.name)]);
    let tags: Vec<&str> = tags.lines().filter(|l| !l.is_empty()).collect();
    assert!(!tags.is_empty());
    for t in &tags {
        let ttl: i64 = redis_cli(&["pttl", t]).trim().parse().unwrap();
        assert!(ttl > 60_000, "{t}: pttl {ttl}");
    }
    // Redis loses the counters (as eviction would).
    for t in &tags {
        redis_cli(&["del", t]);
    }
    let r = f.admin.req(Method::GET, &path).send().await.unwrap();
    assert_eq!(r.headers()["x-cache"], "miss", "no stale entry revived");
    let after: Value = r.json().await.unwrap();
    assert_ne!(after, before);
    assert_eq!(after["data"][0]["totalSales"], 500.0, "{after}");
    f.server.stop().await;
}
