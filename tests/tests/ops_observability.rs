//! Operations: Prometheus metrics, JSON logs with request and user ids,
//! slow-query logs, query statistics, readiness, surviving killed database
//! connections, and graceful shutdown.

use sales_e2e::{
    eventually, ids_and_seqs_apart, month, server_bin, user_token, Api, Fixture, ServerProc, TestDb,
};
use serde_json::{json, Value};
use std::time::Duration;

/// Terminates every database connection of the servers on `db` (the
/// test's own stays).
async fn kill_server_connections(db: &TestDb) {
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'sales-server' AND pid <> pg_backend_pid()")
        .execute(&db.pool)
        .await
        .unwrap();
}

/// A server with one store and one month written through the API.
async fn one_month() -> Fixture {
    let f = Fixture::start(1, &[]).await;
    let one = month(f.stores[0], 2024, 1, 5, 1.0);
    f.admin
        .post("/api/v2/sales/batch", &json!({"salesDataArray": [one]}))
        .await;
    f
}

/// `events_relay_lag_events` counts the events past the relay's position
/// up to a bound, so a scrape during a large backlog costs no more than one
/// during a small one: exact below the bound, the bound above it.
#[tokio::test]
async fn relay_lag_is_exact_below_its_bound_and_the_bound_above() {
    use sales_server::metrics::{relay_lag, RELAY_LAG_COUNTED};
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO sales.events (kind, payload) SELECT 'test-filler', '{}' FROM generate_series(1, $1)",
    )
    .bind(RELAY_LAG_COUNTED as i32 + 5)
    .execute(&db.pool)
    .await
    .unwrap();
    let head: i64 = sqlx::query_scalar("SELECT max(seq) FROM sales.events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(relay_lag(&db.pool, head).await.unwrap(), 0);
    assert_eq!(relay_lag(&db.pool, head - 3).await.unwrap(), 3);
    let below = head - RELAY_LAG_COUNTED + 1;
    assert_eq!(
        relay_lag(&db.pool, below).await.unwrap(),
        RELAY_LAG_COUNTED - 1
    );
    assert_eq!(relay_lag(&db.pool, 0).await.unwrap(), RELAY_LAG_COUNTED);

    // Two writers can take their events' ids and seqs in opposite orders:
    // the event with the higher id is delivered first. Once the relay has
    // passed both (its position is the later seq, the lower id), nothing
    // is behind; it used to count the higher id as lag until another event.
    let [(_, later), (_, earlier)] = ids_and_seqs_apart(&db).await;
    assert_eq!(relay_lag(&db.pool, earlier).await.unwrap(), 1);
    assert_eq!(relay_lag(&db.pool, later).await.unwrap(), 0);
}

/// Once the relay has passed two events whose ids and seqs were taken in
/// opposite orders (two writers interleaving), the metric says nothing is
/// behind: the lag is counted by seq, the order the relay delivers in. (By
/// id, the event relayed first, with the higher id, stayed counted as lag
/// until another event came.)
#[tokio::test]
async fn the_relay_lag_is_counted_in_delivery_order() {
    let db = TestDb::new().await;
    let server = db.server(&[]).await;
    let ids = ids_and_seqs_apart(&db).await;
    sales_e2e::relay_caught_up(&db, &server).await;
    // Delivered last: the lower id, with the higher seq.
    assert_eq!(server.state.hub.position().id, ids[0].0);
    let text = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lag = text
        .lines()
        .find_map(|l| l.strip_prefix("events_relay_lag_events "))
        .unwrap_or_else(|| panic!("no lag in\n{text}"));
    assert_eq!(lag.trim(), "0", "ids {ids:?}");
    server.stop().await;
}

#[tokio::test]
async fn metrics_cover_requests_queries_pool_cache_ws_and_process() {
    let Fixture {
        db: _db,
        server,
        admin: api,
        ..
    } = one_month().await;
    for _ in 0..2 {
        api.get("/api/v2/sales?fields=id").await;
    }
    api.get("/api/v2/sales/999999").await;
    api.get("/api/v2/users/1/history").await;
    reqwest::get(server.url("/assets/app.js")).await.unwrap();
    let r = reqwest::get(server.url("/metrics")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = r.text().await.unwrap();
    for needle in [
        "http_request_duration_seconds_bucket{",
        "route=\"/api/v2/sales\"",
        "route=\"/api/v2/sales/{id}\"",
        "route=\"/api/v2/users/{id}/history\"",
        "route=\"/assets/{file}\"",
        "status=\"404\"",
        "http_requests_total{",
        "db_query_duration_seconds_bucket{statement=\"sales_list\"",
        "db_query_duration_seconds_bucket{statement=\"batch_upsert\"",
        "db_pool_connections ",
        "db_pool_idle_connections ",
        "cache_hits_total ",
        "cache_misses_total ",
        "websocket_connections ",
        "events_relayed_total ",
        "events_relay_lag_events ",
        "process_resident_memory_bytes ",
        "exports_running ",
        "events_delivery_holders ",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}\n{text}");
    }
    // Route labels are the document's templates, not poem's `:id` spelling.
    let poem_spelled: Vec<&str> = text
        .split("route=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .filter(|route| route.contains(':'))
        .collect();
    assert!(poem_spelled.is_empty(), "{poem_spelled:?}");
    // No negative zero (an empty sum of subscriptions showed `-0`).
    assert!(
        !text.lines().any(|l| l.ends_with(" -0")),
        "{}",
        text.lines()
            .filter(|l| l.ends_with(" -0"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Every metric says what it is (`# HELP` before its `# TYPE`).
    let typed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert!(typed.len() >= 20, "{text}");
    for name in typed {
        let help = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("# HELP {name} ")));
        assert!(
            help.is_some_and(|h| h.len() > 10),
            "{name} has no # HELP line"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn query_statistics() {
    let db = TestDb::new().await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    api.get("/api/v2/sales?fields=id").await;
    let (st, body) = api.get("/api/admin/queries?limit=5").await;
    assert_eq!(st, 200, "{body}");
    // `make` preloads pg_stat_statements in the cluster it manages.
    assert_eq!(body["enabled"], true, "{body}");
    assert!(body["slowest"].as_array().unwrap().len() <= 5);
    assert!(body["mostFrequent"]
        .as_array()
        .unwrap()
        .iter()
        .all(|q| q["query"].as_str().unwrap().contains("sales.")));
    assert_eq!(api.get("/api/admin/queries?limit=0").await.0, 400);
    // The migrations created the extension; the endpoint only reads. Without
    // it, the answer says how to enable it and the database is left as it was.
    sqlx::query("DROP EXTENSION pg_stat_statements")
        .execute(&db.pool)
        .await
        .unwrap();
    let (st, body) = api.get("/api/admin/queries").await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["enabled"], false, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("CREATE EXTENSION pg_stat_statements"),
        "{body}"
    );
    let created: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(!created, "a GET created pg_stat_statements");
    server.stop().await;
}

#[tokio::test]
async fn reads_survive_killed_database_connections() {
    let Fixture {
        db,
        server,
        admin: api,
        ..
    } = one_month().await;
    let id: i64 = sqlx::query_scalar("SELECT id FROM sales.monthly_sales LIMIT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // Reads of every kind, each right after the connections it would use
    // were killed (so they were handed out moments ago, and come back
    // without a check): the list, one record (uncached: asOf), the stores,
    // one store, a record's history, a summary, an export (retried only
    // before its response starts).
    for i in 0..20 {
        for path in [
            format!("/api/v2/sales?fields=id&limit={}", i + 1),
            format!("/api/v2/sales/{id}?fields=id&asOf=2099-01-0{}", 1 + i % 9),
            format!("/api/v2/stores?limit={}", i + 1),
            "/api/v2/stores/1".to_string(),
            format!("/api/v2/sales/{id}/history?limit={}", 1 + i % 5),
            format!(
                "/api/v2/sales/summary?groupBy=store&year=2024&top={}",
                i + 1
            ),
            format!(
                "/api/v2/sales/export?format=csv&shape={}",
                ["monthly", "daily"][i % 2]
            ),
        ] {
            kill_server_connections(&db).await;
            let (st, body) = api.get(&path).await;
            assert_eq!(st, 200, "{path}: {body}");
        }
    }
    server.stop().await;
}

/// User and admin reads and logins that meet a connection killed after it
/// went back to the pool (handed out again without a check, since it was
/// idle for less than a second) are retried on another connection.
#[tokio::test]
async fn user_reads_and_logins_survive_a_killed_connection() {
    let Fixture {
        db,
        server,
        admin: api,
        admin_id,
        ..
    } = one_month().await;
    let anon = Api::new(&server, None);
    let login = json!({"email": "admin@example.com", "password": "password-123"});
    for path in [
        "/api/v2/users?limit=5".to_string(),
        format!("/api/v2/users/{admin_id}"),
        format!("/api/v2/users/{admin_id}/history"),
        "/api/admin/indexes".to_string(),
        "/api/admin/queries".to_string(),
        "login".to_string(),
    ] {
        let call = || async {
            if path == "login" {
                anon.post("/api/v2/auth/login", &login).await
            } else {
                api.get(&path).await
            }
        };
        // A failure makes the pool check every connection for the next
        // second: let the previous round's window pass, so that this
        // round's connection comes back unchecked. (Were the window still
        // open, the call would pass without a retry: the wait can only make
        // the test stricter, never fail it.)
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (st, body) = call().await;
        assert_eq!(st, 200, "{path}: {body}");
        kill_server_connections(&db).await;
        let (st, body) = call().await;
        assert_eq!(st, 200, "{path} after its connection was killed: {body}");
        if path.ends_with("queries") {
            assert_eq!(body["enabled"], true, "{body}");
        }
    }
    // A refresh and a logout, each on a killed connection: every refresh
    // spends the token the one before gave, so a refresh that had used its
    // token up before failing would make the next one a reuse (401).
    let (st, body) = anon.post("/api/v2/auth/login", &login).await;
    assert_eq!(st, 200, "{body}");
    let mut token = body["refreshToken"].clone();
    for last in ["refresh", "logout"] {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (st, body) = anon
            .post("/api/v2/auth/refresh", &json!({"refreshToken": token}))
            .await;
        assert_eq!(st, 200, "refresh: {body}");
        token = body["refreshToken"].clone();
        kill_server_connections(&db).await;
        let (st, body) = anon
            .post(
                &format!("/api/v2/auth/{last}"),
                &json!({"refreshToken": token}),
            )
            .await;
        let want = if last == "refresh" { 200 } else { 204 };
        assert_eq!(st, want, "{last} after its connection was killed: {body}");
        if last == "refresh" {
            token = body["refreshToken"].clone();
        }
    }
    // The logout ended the session: its last token is refused.
    let (st, body) = anon
        .post("/api/v2/auth/refresh", &json!({"refreshToken": token}))
        .await;
    assert_eq!(st, 401, "{body}");
    // A password change, on a killed connection.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (st, body) = anon.post("/api/v2/auth/login", &login).await;
    assert_eq!(st, 200, "{body}");
    let me = Api::new(&server, body["token"].as_str());
    kill_server_connections(&db).await;
    let (st, body) = me
        .post(
            "/api/v2/auth/password",
            &json!({"currentPassword": "password-123", "newPassword": "another-password-456"}),
        )
        .await;
    assert_eq!(
        st, 200,
        "password change after its connection was killed: {body}"
    );
    let (st, body) = anon
        .post(
            "/api/v2/auth/login",
            &json!({"email": "admin@example.com", "password": "another-password-456"}),
        )
        .await;
    assert_eq!(st, 200, "the new password: {body}");
    server.stop().await;
}

#[tokio::test]
async fn an_export_whose_connection_was_lost_before_it_started_is_retried() {
    let Fixture {
        db,
        server,
        admin: api,
        ..
    } = one_month().await;
    let path = "/api/v2/sales/export?format=csv&shape=monthly";
    // Every pooled connection was returned a moment ago and nothing has
    // failed yet, so the pool hands them out unchecked: the export meets a
    // killed connection and only its own retry answers it.
    let (st, _) = api.get(path).await;
    assert_eq!(st, 200);
    kill_server_connections(&db).await;
    let r = api.req(reqwest::Method::GET, path).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let csv = r.text().await.unwrap();
    assert!(csv.lines().count() > 1, "header and rows: {csv}");
    server.stop().await;
}

/// Runs the server binary with JSON logs at info level.
fn spawn_binary(db: &TestDb, extra: &[(&str, &str)]) -> ServerProc {
    let mut env = db.env();
    env.push(("LOG_FORMAT".into(), "json".into()));
    env.push(("LOG_LEVEL".into(), "info".into()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    ServerProc::start(&server_bin(), &env).unwrap()
}

/// The relay's long poll waits up to 5 s when nothing happens: an idle
/// server must not log each of those waits as a slow statement.
#[tokio::test]
async fn an_idle_relay_logs_no_slow_statements() {
    let db = TestDb::new().await;
    let server = spawn_binary(&db, &[]);
    let started = |db: &TestDb| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
                "SELECT query_start FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = 'sales-server-relay' \
                   AND query LIKE '%events_after_seq%'",
            )
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    };
    let first = eventually(Duration::from_secs(10), "the relay polling", || async {
        started(&db).await
    })
    .await;
    // A poll that found nothing has ended once the next one has started.
    eventually(
        Duration::from_secs(30),
        "the relay's first poll ending",
        || async { started(&db).await.filter(|t| *t > first) },
    )
    .await;
    let log = server.log();
    assert!(
        log.lines().any(|l| l.contains("event relay reading")),
        "the log is read: {log}"
    );
    assert!(
        !log.contains("slow statement"),
        "an idle poll was logged as slow: {log}"
    );
}

#[tokio::test]
async fn json_logs_carry_request_and_user_ids_and_slow_queries() {
    let db = TestDb::new().await;
    let server = spawn_binary(&db, &[("SLOW_QUERY_MS", "1")]);
    let port = server.addr.port();
    let (uid, _) =
        sales_server::users::upsert_user(&db.pool, "log@example.com", "admin", &[], "password-123")
            .await
            .unwrap();
    let http = reqwest::Client::new();
    let login: Value = http
        .post(format!("http://127.0.0.1:{port}/api/v2/auth/login"))
        .header("x-request-id", "log-login-7")
        .json(&json!({"email": "log@example.com", "password": "password-123"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["token"].as_str().unwrap();
    // The list's statement is made slow for sure (past SLOW_QUERY_MS,
    // 1 ms, which a query on an empty table may not reach): it waits on a
    // lock held until the server's backend is seen waiting for it.
    let mut locker = db.connect().await;
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE sales.monthly_sales IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    let request = tokio::spawn({
        let (http, token) = (http.clone(), token.to_string());
        async move {
            http.get(format!("http://127.0.0.1:{port}/api/v2/sales?fields=id"))
                .bearer_auth(token)
                .header("x-request-id", "log-test-42")
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    eventually(
        Duration::from_secs(10),
        "the list waiting on the lock",
        || {
            let pool = db.pool.clone();
            async move {
                let waiting: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                                WHERE wait_event_type = 'Lock' AND query LIKE '%monthly_sales%')",
                )
                .fetch_one(&pool)
                .await
                .ok()?;
                waiting.then_some(())
            }
        },
    )
    .await;
    sqlx::query("COMMIT").execute(&mut locker).await.unwrap();
    assert_eq!(request.await.unwrap(), 200);
    // A statement no `metrics::timed` names (the stores list) is logged as
    // slow too, in its request's span: only the named ones were.
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE sales.stores IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    let stores = tokio::spawn({
        let (http, token) = (http.clone(), token.to_string());
        async move {
            http.get(format!("http://127.0.0.1:{port}/api/v2/stores"))
                .bearer_auth(token)
                .header("x-request-id", "log-test-43")
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    eventually(
        Duration::from_secs(10),
        "the stores list waiting on the lock",
        || {
            let pool = db.pool.clone();
            async move {
                let waiting: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                                WHERE wait_event_type = 'Lock' AND query LIKE '%sales.stores%'
                                  AND pid <> pg_backend_pid())",
                )
                .fetch_one(&pool)
                .await
                .ok()?;
                waiting.then_some(())
            }
        },
    )
    .await;
    sqlx::query("COMMIT").execute(&mut locker).await.unwrap();
    assert_eq!(stores.await.unwrap(), 200);
    let lines: Vec<Value> = eventually(Duration::from_secs(30), "request log lines", || {
        let parsed: Vec<Value> = server
            .log()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
            .collect();
        async move {
            let mine: Vec<Value> = parsed
                .into_iter()
                .filter(|v| v.to_string().contains("log-test-42"))
                .collect();
            (mine.iter().any(|v| v["message"] == "request")).then_some(mine)
        }
    })
    .await;
    eventually(
        Duration::from_secs(30),
        "the stores list's log lines",
        || {
            let done = server.log().contains("log-test-43");
            async move { done.then_some(()) }
        },
    )
    .await;
    let log_lines = server.log();
    drop(server);
    for l in &lines {
        let span = &l["span"];
        assert_eq!(span["request_id"], "log-test-42", "{l}");
    }
    let access = lines.iter().find(|v| v["message"] == "request").unwrap();
    assert_eq!(access["span"]["user_id"], uid, "{access}");
    assert_eq!(access["status"], 200);
    let slow = lines
        .iter()
        .find(|v| v["message"] == "slow query")
        .expect("a slow query line");
    assert_eq!(slow["statement"], "sales_list");
    assert!(slow["duration_ms"].as_f64().unwrap() >= 0.0);
    let parsed: Vec<Value> = log_lines
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let of = |id: &str| -> Vec<&Value> {
        parsed
            .iter()
            .filter(|v| v["span"]["request_id"] == id)
            .collect()
    };
    assert!(
        of("log-test-43")
            .iter()
            .any(|v| v.to_string().contains("slow statement")),
        "the stores list's statement logged as slow: {:?}",
        of("log-test-43")
    );
    // The login's access line names who logged in.
    let login_line = of("log-login-7")
        .into_iter()
        .find(|v| v["message"] == "request")
        .expect("the login's access line");
    assert_eq!(login_line["span"]["user_id"], uid, "{login_line}");
}

#[tokio::test]
async fn sigterm_finishes_requests_and_closes_websockets_with_1001() {
    use futures_util::StreamExt;
    let db = TestDb::new().await;
    let stores = db.stores(3).await;
    let mut server = spawn_binary(&db, &[("SHUTDOWN_TIMEOUT", "20s")]);
    let port = server.addr.port();
    let (uid, _) =
        sales_server::users::upsert_user(&db.pool, "t@example.com", "admin", &[], "password-123")
            .await
            .unwrap();
    let token = sales_e2e::token(uid, "admin", &[]);
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws?token={token}"))
            .await
            .expect("ws connect");

    // A large batch in flight when SIGTERM arrives still completes.
    let recs: Vec<Value> = (0..3000)
        .map(|i| {
            month(
                stores[i / 1200],
                2000 + ((i % 1200) / 12) as i32,
                1 + (i % 12) as i32,
                28,
                1.0,
            )
        })
        .collect();
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/api/v2/sales/batch");
    let t = token.clone();
    let inflight = tokio::spawn(async move {
        http.post(url)
            .bearer_auth(t)
            .json(&json!({"salesDataArray": recs}))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    eventually(Duration::from_secs(10), "batch running in Postgres", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE '%batch_upsert_impl%' AND state = 'active' AND pid <> pg_backend_pid()")
            .fetch_one(&db.pool)
            .await
            .ok()?;
        (n > 0).then_some(())
    })
    .await;
    server.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), inflight)
        .await
        .expect("in-flight request finished")
        .unwrap();
    assert_eq!(
        status.expect("response"),
        200,
        "the in-flight batch completed"
    );

    // The WebSocket is closed with 1001 (going away).
    let close = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f))) => {
                    return Some(u16::from(f.code))
                }
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .expect("close frame in time");
    assert_eq!(close, Some(1001));
    let exit = server
        .exited(Duration::from_secs(30))
        .await
        .expect("exit in time");
    assert!(exit.success(), "clean exit after SIGTERM: {exit:?}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.monthly_sales")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 3000);
}

/// With METRICS_TOKEN set, `/metrics` answers only a scraper bearing it.
#[tokio::test]
async fn metrics_can_require_a_token() {
    let db = sales_e2e::TestDb::new().await;
    let server = db
        .server(&[("METRICS_TOKEN", "scrape-me-0123456789")])
        .await;
    let client = reqwest::Client::new();
    let get = |token: Option<&'static str>| {
        let mut r = client.get(server.url("/metrics"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move { r.send().await.unwrap() }
    };
    assert_eq!(get(None).await.status(), 401);
    assert_eq!(get(Some("wrong")).await.status(), 401);
    let r = get(Some("scrape-me-0123456789")).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("http_requests_total"));
    server.stop().await;
}

/// `/health` and `/health/ready` probe on a connection of their own: with
/// every connection of the request pool taken (requests waiting on a lock),
/// the instance is busy, not down. The probes answered 503 "postgres:
/// unreachable" after DB_CONNECTION_TIMEOUT, so a load peak took every
/// instance out of a load balancer at once.
#[tokio::test]
async fn health_is_up_while_the_request_pool_is_busy() {
    let db = TestDb::new().await;
    db.stores(1).await;
    let server = db
        .server(&[("DB_POOL_MAX", "2"), ("DB_POOL_MIN", "1")])
        .await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let anon = Api::new(&server, None);
    // The relay and the listener connect in the background, later on a busy
    // machine: what is asked below is whether a busy pool makes the server
    // unready, so they are up first (read from the hub, not through
    // /health/ready, whose answer is reused for a second).
    eventually(Duration::from_secs(30), "the relay to connect", || async {
        let r = &server.state.hub.relay;
        (r.connected.load(std::sync::atomic::Ordering::Relaxed)
            && r.listening.load(std::sync::atomic::Ordering::Relaxed))
        .then_some(())
    })
    .await;
    let mut locker = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE sales.stores IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let api = Api::new(&server, Some(&token));
    let waiting: Vec<_> = (0..2)
        .map(|i| {
            let api = api.clone();
            tokio::spawn(async move { api.get(&format!("/api/v2/stores?limit={}", i + 1)).await })
        })
        .collect();
    // Both pooled connections wait on the lock.
    eventually(
        Duration::from_secs(30),
        "the pool's connections to wait",
        || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            (n >= 2).then_some(())
        },
    )
    .await;
    let (st, health) = anon.get("/health").await;
    assert_eq!(st, 200, "{health}");
    assert_eq!(health["postgres"]["up"], true, "{health}");
    let (st, ready) = anon.get("/health/ready").await;
    assert_eq!(st, 200, "{ready}");
    locker.commit().await.unwrap();
    for w in waiting {
        let _ = w.await;
    }
    server.stop().await;
}
