//! Issue 13, bounds: every limit holds on every protocol and for every
//! caller, against a real server, Postgres and Redis.

use reqwest::Method;
use sales_e2e::{eventually, month, user_token, Api, TestDb};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An `Upgrade` header does not take a request past BODY_LIMIT: only the
/// WebSocket endpoint's GET upgrades, and every other request's body is
/// read within the limit (here refused by its Content-Length at once).
#[tokio::test]
async fn an_upgrade_header_does_not_lift_the_body_limit() {
    let db = TestDb::new().await;
    let server = db.server(&[("BODY_LIMIT", "1048576")]).await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /api/v2/auth/login HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Upgrade: x\r\nConnection: upgrade\r\nContent-Length: {}\r\n\r\n{{\"email\": \"a@b.c\", \"password\": \"",
        server.addr,
        8 << 20
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "no answer without the whole body");
    let status = String::from_utf8_lossy(&got);
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");
    server.stop().await;
}

/// Item 1: over h2c (HTTP/2 with prior knowledge, no Content-Length) a body
/// above BODY_LIMIT is refused while it is read: 413, not a 401 after
/// reading all of it.
#[tokio::test]
async fn h2c_body_above_the_limit_is_413() {
    let db = TestDb::new().await;
    let server = db.server(&[("BODY_LIMIT", "1048576")]).await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.expect("h2c handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .method("POST")
        .uri(server.url("/api/v2/auth/login"))
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let (resp, mut body) = client.send_request(req, false).unwrap();
    const TOTAL: usize = 8 << 20;
    // Sends only what flow control allows, so `sent` is what the server took in.
    let sender = tokio::spawn(async move {
        let mut sent = 0usize;
        let _ = body.send_data(
            bytes::Bytes::from_static(b"{\"email\": \"a@b.c\", \"password\": \""),
            false,
        );
        while sent < TOTAL {
            body.reserve_capacity(64 * 1024);
            match std::future::poll_fn(|cx| body.poll_capacity(cx)).await {
                Some(Ok(n)) if n > 0 => {
                    if body
                        .send_data(bytes::Bytes::from(vec![b'x'; n]), false)
                        .is_err()
                    {
                        break;
                    }
                    sent += n;
                }
                Some(Ok(_)) => continue,
                _ => break,
            }
        }
        sent
    });
    let resp = tokio::time::timeout(Duration::from_secs(60), resp)
        .await
        .expect("an answer")
        .expect("a response");
    assert_eq!(resp.status(), 413, "h2c body over BODY_LIMIT");
    let sent = tokio::time::timeout(Duration::from_secs(60), sender)
        .await
        .expect("sender stops")
        .unwrap();
    assert!(
        sent < TOTAL,
        "the server stopped reading early ({sent} bytes sent)"
    );
    server.stop().await;
}

/// Item 2: a junk bearer token gets no budget of its own; the per-IP budget
/// applies to every request, so rotating tokens does not evade it.
#[tokio::test]
async fn rotating_junk_tokens_hit_the_ip_budget() {
    let db = TestDb::new().await;
    let server = db
        .server(&[
            ("RATE_LIMIT_PER_MINUTE", "5"),
            ("RATE_LIMIT_PER_IP_PER_MINUTE", "10"),
        ])
        .await;
    let mut statuses = Vec::new();
    for i in 0..12 {
        let api = Api::new(&server, Some(&format!("junk-token-{i}")));
        let r = api.req(Method::GET, "/api/v2/stores").send().await.unwrap();
        statuses.push(r.status().as_u16());
    }
    // Logins (each an Argon2 hash) come from the same budget.
    let r = Api::new(&server, Some("junk-token-login"))
        .req(Method::POST, "/api/v2/auth/login")
        .json(&json!({"email": "x@example.com", "password": "guess"}))
        .send()
        .await
        .unwrap();
    statuses.push(r.status().as_u16());
    assert!(
        statuses[..10].iter().all(|s| *s == 401),
        "first ten are answered: {statuses:?}"
    );
    assert_eq!(&statuses[10..], &[429, 429, 429], "{statuses:?}");
    server.stop().await;
}

/// Item 2: failed logins for one account are throttled with a growing
/// delay, whatever the address; a correct password waits too.
#[tokio::test]
async fn failed_logins_back_off_per_account() {
    let db = TestDb::new().await;
    let server = db.server(&[("LOGIN_ATTEMPTS_PER_MINUTE", "3")]).await;
    sales_server::users::upsert_user(
        &db.pool,
        "victim@example.com",
        "admin",
        &[],
        "right-password-1",
    )
    .await
    .unwrap();
    let api = Api::new(&server, None);
    let login = |password: &'static str| {
        let api = api.clone();
        async move {
            let r = api
                .req(Method::POST, "/api/v2/auth/login")
                .json(&json!({"email": "Victim@example.com", "password": password}))
                .send()
                .await
                .unwrap();
            let retry = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            (r.status().as_u16(), retry)
        }
    };
    for _ in 0..3 {
        assert_eq!(login("wrong").await.0, 401);
    }
    let (st, retry) = login("wrong").await;
    assert_eq!(st, 429, "fourth attempt waits");
    assert!(retry.unwrap() >= 1);
    let (st, _) = login("right-password-1").await;
    assert_eq!(st, 429, "the right password waits as well");
    // Another spelling that finds the same account (Postgres' `lower` maps
    // `İ` to `i` in this database's locale, Rust's `to_lowercase` to `i̇`)
    // shares its wait; where the locale keeps them apart (C, ICU), it is
    // another address, and its first failure is answered.
    let folds: bool =
        sqlx::query_scalar("SELECT lower('VİCTİM@example.com') = 'victim@example.com'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let shared = if folds { 429 } else { 401 };
    let (st, body) = api
        .post(
            "/api/v2/auth/login",
            &json!({"email": "VİCTİM@example.com", "password": "wrong"}),
        )
        .await;
    assert_eq!(st, shared, "{body}");
    // Another account is not affected.
    let (st, _) = api
        .post(
            "/api/v2/auth/login",
            &json!({"email": "other@example.com", "password": "wrong"}),
        )
        .await;
    assert_eq!(st, 401);
    // An unknown address is counted alike, other spellings included, so
    // the wait tells nothing about which addresses have accounts.
    for _ in 0..3 {
        let (st, _) = api
            .post(
                "/api/v2/auth/login",
                &json!({"email": "Nobody-victim@example.com", "password": "wrong"}),
            )
            .await;
        assert_eq!(st, 401);
    }
    let (st, body) = api
        .post(
            "/api/v2/auth/login",
            &json!({"email": "NOBODY-VİCTİM@example.com", "password": "wrong"}),
        )
        .await;
    assert_eq!(st, shared, "{body}");
    server.stop().await;
}

/// Item 2: WebSocket upgrades have a per-IP budget (checked before the
/// upgrade is handled).
#[tokio::test]
async fn ws_upgrades_are_limited_per_ip() {
    let db = TestDb::new().await;
    let server = db.server(&[("WS_UPGRADES_PER_MINUTE", "2")]).await;
    let api = Api::new(&server, None);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(
            api.req(Method::GET, "/ws")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, vec![401, 401, 429]);
    server.stop().await;
}

/// Item 7: unknown paths and methods share one metrics label.
#[tokio::test]
async fn unknown_routes_share_one_metrics_label() {
    let db = TestDb::new().await;
    let server = db.server(&[]).await;
    let api = Api::new(&server, None);
    let junk = format!("/nothing-here-{}", uuid::Uuid::new_v4().simple());
    api.req(Method::GET, &junk).send().await.unwrap();
    api.req(Method::from_bytes(b"BREWCOFFEE").unwrap(), "/health")
        .send()
        .await
        .unwrap();
    let metrics = api
        .req(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains(&junk), "a path became a series");
    assert!(!metrics.contains("BREWCOFFEE"), "a method became a series");
    assert!(metrics.contains("route=\"unmatched\""), "{metrics}");
    server.stop().await;
}

/// Item 10: the JWT secrets published in the repository are refused unless
/// development mode is explicit.
#[tokio::test]
async fn published_secrets_are_refused_outside_development() {
    let db = TestDb::new().await;
    // The Makefile's and the compose file's.
    let published = [
        "pg-sales-development-secret-change-me-in-production",
        "change-me-change-me-change-me-change-me",
    ];
    for secret in published {
        let err = sales_server::Server::bind(db.config(&[("JWT_SECRET", secret)]))
            .await
            .err()
            .unwrap_or_else(|| panic!("{secret} accepted"));
        assert!(format!("{err:#}").contains("JWT_SECRET"), "{err:#}");
    }
    let dev = sales_server::Server::bind(
        db.config(&[("JWT_SECRET", published[0]), ("PG_SALES_DEV", "1")]),
    )
    .await
    .expect("development mode accepts it")
    .spawn();
    dev.stop().await;
}

/// Configuration as the seed writes it starts the server with the seed's
/// meaning (bare DB_* timeouts are milliseconds).
#[tokio::test]
async fn the_seed_environment_starts_the_server() {
    let db = TestDb::new().await;
    let server = db
        .server(&[
            ("DB_IDLE_TIMEOUT", "30000"),
            ("DB_CONNECTION_TIMEOUT", "10000"),
            ("DB_QUERY_TIMEOUT", "30000"),
            ("CACHE_TTL", "300"),
            ("COMPRESSION_LEVEL", "6"),
            ("NODE_ENV", "production"),
        ])
        .await;
    let c = &server.state.config;
    assert_eq!(c.db_idle_timeout, Duration::from_secs(30));
    assert_eq!(c.db_connection_timeout, Duration::from_secs(10));
    assert_eq!(c.db_query_timeout, Duration::from_secs(30));
    assert_eq!(c.cache_ttl, Duration::from_secs(300));
    assert_eq!(c.compression_level, 6);
    let mut conn = server.state.pool.acquire().await.unwrap();
    let timeout: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(timeout, "30s");
    drop(conn);
    server.stop().await;
}

/// Item 9: one user cannot hold every export slot, and an export that is
/// not read ends at EXPORT_MAX_DURATION (with a broken body, not a short
/// file), freeing its slot.
#[tokio::test]
async fn exports_are_limited_per_user_and_in_time() {
    let db = TestDb::new().await;
    let stores = db.stores(200).await;
    let server = db
        .server(&[
            ("EXPORT_MAX_CONCURRENT", "4"),
            ("EXPORT_MAX_PER_USER", "1"),
            ("EXPORT_MAX_DURATION", "3s"),
        ])
        .await;
    let (_, admin) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let (_, other) = user_token(&db, &server, "m@example.com", "manager", &stores).await;
    let admin = Api::new(&server, Some(&admin));
    // 200 stores x 36 months of 28 days: ~9 MB of NDJSON, more than
    // the socket buffers hold (the reader's is made small), so an unread
    // export stays open.
    for chunk in stores.chunks(20) {
        let recs: Vec<Value> = chunk
            .iter()
            .flat_map(|&s| (0..36).map(move |i| month(s, 2021 + i / 12, 1 + i % 12, 28, 1234.5)))
            .collect();
        let (st, body) = admin
            .post("/api/v2/sales/batch", &json!({"salesDataArray": recs}))
            .await;
        assert_eq!(st, 200, "{body}");
    }
    let path = "/api/v2/sales/export?format=ndjson";
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut held = socket.connect(server.addr).await.unwrap();
    held.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {}\r\n\r\n",
            admin.token.as_deref().unwrap()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    held.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200", "the first export starts");
    // The same user again: refused while the first runs.
    let r = admin.req(Method::GET, path).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["error"]["details"]["limit"], "EXPORT_MAX_PER_USER",
        "{body}"
    );
    // Another user still gets a slot.
    let r = Api::new(&server, Some(&other))
        .req(Method::GET, "/api/v2/sales/export?format=csv")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(r);
    // The held export is stopped at EXPORT_MAX_DURATION, which frees the
    // user's slot (a probe that gets a slot is dropped at once)...
    eventually(Duration::from_secs(30), "the slot is released", || async {
        let r = admin
            .req(Method::GET, "/api/v2/sales/export?format=csv")
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    // ... and its body is cut (no last chunk), never a complete short file.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), held.read_to_end(&mut rest))
        .await
        .expect("the server ends the held export")
        .ok();
    let records = rest
        .split(|b| *b == b'\n')
        .filter(|l| l.starts_with(b"{"))
        .count();
    assert!(
        records < 7200,
        "the held export was stopped ({records} records)"
    );
    assert!(
        !rest.ends_with(b"\r\n0\r\n\r\n"),
        "the stopped export looked complete ({} bytes)",
        rest.len()
    );
    server.stop().await;
}

/// Bodies of every operation but the batches are small: a 300 KiB login is
/// 413 under the default BODY_LIMIT (16 MiB), and a body the parser refuses
/// is not quoted back whole in the error.
#[tokio::test]
async fn only_batches_take_large_bodies_and_errors_do_not_echo_them() {
    let db = TestDb::new().await;
    let server = db.server(&[]).await;
    let api = Api::new(&server, None);
    let pad = "x".repeat(300 << 10);
    let (st, body) = api
        .post(
            "/api/v2/auth/login",
            &json!({"email": "a@b.c", "password": pad}),
        )
        .await;
    assert_eq!(st, 413, "{body}");
    // An array where an object belongs, about 200 KiB.
    let wrong: Vec<Value> = (0..15_000).map(|i| json!({"n": i})).collect();
    let r = api
        .req(Method::POST, "/api/v2/auth/login")
        .json(&wrong)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let text = r.text().await.unwrap();
    assert!(text.len() < 2_000, "{} bytes back", text.len());
    // A batch may still be large.
    let (_, token) = user_token(&db, &server, "big@x.test", "admin", &[]).await;
    let admin = Api::new(&server, Some(&token));
    let r = admin
        .req(Method::DELETE, "/api/v2/sales/batch")
        .json(&json!({"keys": [], "pad": "x".repeat(300 << 10)}))
        .send()
        .await
        .unwrap();
    assert_ne!(r.status().as_u16(), 413);
    // ... but not a body of nothing but empty objects, which would parse
    // into a tree dozens of times its size (about 1 MiB of `{}` here).
    let empties = vec!["{}"; 350_000].join(",");
    let r = admin
        .req(Method::DELETE, "/api/v2/sales/batch")
        .header("content-type", "application/json")
        .body(format!("{{\"keys\": [{empties}]}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    server.stop().await;
}
