//! Foundation: schema constraints enforced by Postgres, configuration errors,
//! the CLI (migrate, seed, user add) and /health.

use sales_e2e::{server_bin, sqlstate, TestDb};
use serde_json::Value;
use std::process::Command;

#[tokio::test]
async fn tables_exist_in_schema_sales() {
    let db = TestDb::new().await;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'sales' AND table_type = 'BASE TABLE' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        tables,
        vec![
            "event_history",
            "event_log_identity",
            "events",
            "monthly_sales",
            "stores",
            "users"
        ]
    );
}

async fn insert_month(
    db: &TestDb,
    store: i64,
    year: i32,
    month: i32,
    daily: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO sales.monthly_sales (store_id, year, month, daily_data) VALUES ($1, $2, $3, $4::jsonb)")
        .bind(store)
        .bind(year)
        .bind(month)
        .bind(daily)
        .execute(&db.pool)
        .await
        .map(|_| ())
}

fn constraint(e: &sqlx::Error) -> String {
    e.as_database_error()
        .and_then(|d| d.constraint())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn postgres_refuses_bad_rows() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];

    let e = insert_month(&db, s, 2024, 13, "{}").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("23514"));
    assert_eq!(constraint(&e), "monthly_sales_month_check");

    let e = insert_month(&db, s, 2024, 0, "{}").await.unwrap_err();
    assert_eq!(constraint(&e), "monthly_sales_month_check");

    let e = insert_month(&db, s, 1999, 1, "{}").await.unwrap_err();
    assert_eq!(constraint(&e), "monthly_sales_year_check");

    let e = insert_month(&db, s, 2024, 4, r#"{"31": {"sales": 1}}"#)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("23514"));
    assert_eq!(constraint(&e), "monthly_sales_daily_data_check");

    let e = insert_month(&db, s, 2023, 2, r#"{"29": {"sales": 1}}"#)
        .await
        .unwrap_err();
    assert_eq!(constraint(&e), "monthly_sales_daily_data_check");
    insert_month(&db, s, 2024, 2, r#"{"29": {"sales": 1}}"#)
        .await
        .expect("29 February 2024 exists");

    let e = insert_month(&db, s, 2024, 5, r#"{"3": {"sales": -1}}"#)
        .await
        .unwrap_err();
    assert_eq!(constraint(&e), "monthly_sales_daily_data_check");
    let e = insert_month(&db, s, 2024, 5, r#"{"3": {"sales": "12"}}"#)
        .await
        .unwrap_err();
    assert_eq!(constraint(&e), "monthly_sales_daily_data_check");
    let e = insert_month(&db, s, 2024, 5, r#"{"3": {"customers": -2}}"#)
        .await
        .unwrap_err();
    assert_eq!(constraint(&e), "monthly_sales_daily_data_check");

    insert_month(
        &db,
        s,
        2024,
        4,
        r#"{"30": {"sales": 10.5, "customers": 3}}"#,
    )
    .await
    .expect("valid row");

    // The same rules hold for a plain UPDATE.
    let e = sqlx::query(
        "UPDATE sales.monthly_sales SET daily_data = '{\"31\": {\"sales\": 1}}' WHERE month = 4",
    )
    .execute(&db.pool)
    .await
    .unwrap_err();
    assert_eq!(constraint(&e), "monthly_sales_daily_data_check");

    // Derived totals follow daily_data.
    let (total, customers, days): (String, i64, i32) = sqlx::query_as(
        "SELECT total_sales::text, total_customers, days_reported FROM sales.monthly_sales WHERE month = 4",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(total.to_string(), "10.5");
    assert_eq!((customers, days), (3, 1));

    let e = sqlx::query(
        "INSERT INTO sales.stores (code, name, region, status) VALUES ('X1', 'x', 'North', 'gone')",
    )
    .execute(&db.pool)
    .await
    .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("23514"));
}

#[tokio::test]
async fn bad_configuration_exits_naming_the_variable() {
    let out = Command::new(server_bin())
        .arg("migrate")
        .env("DB_POOL_MAX", "abc")
        .output()
        .expect("run server binary");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("DB_POOL_MAX"), "stderr: {stderr}");

    let out = Command::new(server_bin())
        .arg("serve")
        .env("LOG_FORMAT", "xml")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("LOG_FORMAT"));

    // Every wrong setting exits 2 with `configuration error:` naming it,
    // including one found wrong only by the command that needs it.
    for (args, set, remove, var) in [
        (
            &["migrate"][..],
            vec![("DB_POOL_MAX", "abc")],
            vec![],
            "DB_POOL_MAX",
        ),
        (&["serve"][..], vec![], vec!["JWT_SECRET"], "JWT_SECRET"),
        (
            &["migrate"][..],
            vec![(
                "DATABASE_URL",
                "postgres://u:secret-pw@127.0.0.1:notaport/db",
            )],
            vec![],
            "DATABASE_URL",
        ),
        (
            &["migrate"][..],
            vec![("REDIS_URL", "redis://:secret-pw@127.0.0.1:99999")],
            vec![],
            "REDIS_URL",
        ),
        (
            &["serve"][..],
            vec![("BIND_ADDR", "nowhere")],
            vec![],
            "BIND_ADDR",
        ),
        (
            &["serve"][..],
            vec![("CORS_ORIGINS", "https://a.example/")],
            vec![],
            "CORS_ORIGINS",
        ),
    ] {
        let mut cmd = Command::new(server_bin());
        cmd.args(args).envs(set.iter().copied());
        for v in remove {
            cmd.env_remove(v);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {stderr}");
        assert!(
            stderr.starts_with(&format!("configuration error: {var}")),
            "{var}: {stderr}"
        );
        assert!(!stderr.contains("secret-pw"), "{stderr}");
    }
}

#[tokio::test]
async fn cli_seed_and_user_add() {
    let db = TestDb::new().await;
    let run = |args: &[&str], stdin: Option<&str>| {
        let mut cmd = Command::new(server_bin());
        cmd.args(args).envs(db.env());
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        } else {
            drop(child.stdin.take());
        }
        child.wait_with_output().unwrap()
    };

    let out = run(
        &[
            "seed",
            "--stores",
            "12",
            "--regions",
            "3",
            "--months",
            "3",
            "--end",
            "2024-03",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (stores, months, regions): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM sales.stores), (SELECT count(*) FROM sales.monthly_sales),
                (SELECT count(DISTINCT region) FROM sales.stores)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((stores, months, regions), (12, 36, 3));
    let full: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sales.monthly_sales WHERE month = 2 AND days_reported = 29",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(full, 12, "February 2024 has 29 days of data per store");

    // --if-empty leaves a seeded database alone.
    let out = run(&["seed", "--if-empty", "--stores", "5"], None);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing seeded"));

    // Password from stdin; the same email again updates the user.
    let out = run(
        &[
            "user",
            "add",
            "--email",
            "m@example.com",
            "--role",
            "manager",
            "--store",
            "1",
            "--store",
            "2",
        ],
        Some("first-password\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        &[
            "user",
            "add",
            "--email",
            "M@example.com",
            "--role",
            "staff",
            "--store",
            "3",
            "--password",
            "second-password",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("updated"));
    let (n, role, stores, hash): (i64, String, Vec<i64>, String) =
        sqlx::query_as("SELECT count(*) OVER (), role, store_ids, password_hash FROM sales.users")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((n, role.as_str(), stores), (1, "staff", vec![3]));
    assert!(sales_server::users::verify_password(
        "second-password",
        &hash
    ));

    // Bad input is refused with the flag named.
    let out = run(
        &[
            "user",
            "add",
            "--email",
            "x@example.com",
            "--role",
            "boss",
            "--password",
            "long-enough",
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--role"));
    let out = run(
        &[
            "user",
            "add",
            "--email",
            "x@example.com",
            "--role",
            "staff",
            "--store",
            "999",
            "--password",
            "long-enough",
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--store"));
    let out = run(
        &[
            "user",
            "add",
            "--email",
            "x@example.com",
            "--role",
            "admin",
            "--password",
            "short",
        ],
        None,
    );
    assert!(!out.status.success());
}

#[tokio::test]
async fn health_reports_postgres_and_redis() {
    let db = TestDb::new().await;
    let server = db.server(&[]).await;
    let body: Value = reqwest::get(server.url("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["postgres"]["up"], true);
    assert_eq!(body["redis"]["up"], true);
    assert_eq!(body["version"], sales_server::VERSION);

    // Ready once the event relay listens (it connects right after start).
    let body: Value =
        sales_e2e::eventually(std::time::Duration::from_secs(30), "ready", || async {
            let r = reqwest::get(server.url("/health/ready")).await.ok()?;
            let ok = r.status() == 200;
            let body: Value = r.json().await.ok()?;
            ok.then_some(body)
        })
        .await;
    assert_eq!(body["ready"], true, "{body}");
    assert_eq!(body["migrationsApplied"], body["migrationsExpected"]);

    let r = reqwest::get(server.url("/health/live")).await.unwrap();
    assert_eq!(r.status(), 200);
    server.stop().await;

    // Redis configured but unreachable: still serving, reported degraded.
    let server = db.server(&[("REDIS_URL", "redis://127.0.0.1:1")]).await;
    let r = reqwest::get(server.url("/health")).await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["redis"]["up"], false);
    server.stop().await;
}

/// A TCP proxy to Postgres that `cut` closes: its connections end and new
/// ones are refused, as when Postgres goes away.
async fn postgres_proxy(upstream: &str) -> (u16, tokio::sync::watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (cut, on_cut) = tokio::sync::watch::channel(false);
    let upstream = upstream.to_string();
    tokio::spawn(async move {
        loop {
            let mut stop = on_cut.clone();
            tokio::select! {
                _ = stop.changed() => return,
                accepted = listener.accept() => {
                    let Ok((mut client, _)) = accepted else { return };
                    let mut stop = on_cut.clone();
                    let upstream = upstream.clone();
                    tokio::spawn(async move {
                        let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = stop.changed() => {}
                        }
                    });
                }
            }
        }
    });
    (port, cut)
}

/// With Postgres gone, `/health` tells an admin why, as the driver said it
/// (here: the connection was refused), not only that its probe's pool
/// found no connection in time.
#[tokio::test]
async fn health_tells_an_admin_why_postgres_is_unreachable() {
    let db = TestDb::new().await;
    let (port, cut) = postgres_proxy("127.0.0.1:5432").await;
    let url = db.url.replacen(":5432/", &format!(":{port}/"), 1);
    assert_ne!(url, db.url, "the test database is on 127.0.0.1:5432");
    let server = db.server(&[("DATABASE_URL", url.as_str())]).await;
    let admin = sales_e2e::token(999, "admin", &[]);
    let health = || async {
        reqwest::Client::new()
            .get(server.url("/health"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
    };
    assert_eq!(health().await.status(), 200);
    cut.send(true).unwrap();
    let body: Value = sales_e2e::eventually(
        std::time::Duration::from_secs(30),
        "health to see Postgres gone",
        || async {
            let r = health().await;
            let body: Value = r.json().await.ok()?;
            (body["postgres"]["up"] == false).then_some(body)
        },
    )
    .await;
    let error = body["postgres"]["error"].as_str().unwrap_or_default();
    assert!(
        error.to_ascii_lowercase().contains("refused"),
        "the cause, not the pool's timeout: {body}"
    );
    server.stop().await;
}

/// The OpenAPI document a server serves.
async fn served_spec(server: &sales_e2e::RunningServer) -> Value {
    reqwest::get(server.url("/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn openapi_file_matches_the_server() {
    let db = TestDb::new().await;
    let server = db.server(&[]).await;
    let served: Value = served_spec(&server).await;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../openapi/openapi.json");
    let committed: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("openapi/openapi.json exists"))
            .expect("openapi/openapi.json is JSON");
    assert!(
        served == committed,
        "openapi/openapi.json is out of date: run `make openapi` and commit the result"
    );
    server.stop().await;
}

/// Every media type the OpenAPI document lists for the import's body is
/// taken (a dry run of one line), one it does not list is 415, and the
/// 415's description names the listed ones.
#[tokio::test]
async fn the_import_takes_every_media_type_its_document_lists() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let server = db.server(&[]).await;
    let (_, token) = sales_e2e::user_token(&db, &server, "a@x.test", "admin", &[]).await;
    let spec: Value = served_spec(&server).await;
    let op = &spec["paths"]["/api/v2/imports"]["post"];
    let listed: Vec<String> = op["requestBody"]["content"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert!(listed.len() >= 6, "{listed:?}");
    let code: String = sqlx::query_scalar("SELECT code FROM sales.stores WHERE id = $1")
        .bind(stores[0])
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let post = |media: String| {
        let body = if media.contains("json") {
            format!("{{\"storeCode\": \"{code}\", \"date\": \"2024-01-05\", \"sales\": 1}}\n")
        } else {
            format!("store_code,date,sales\n{code},2024-01-05,1\n")
        };
        client
            .post(server.url("/api/v2/imports?dryRun=true"))
            .bearer_auth(&token)
            .header("content-type", media)
            .body(body)
            .send()
    };
    for media in &listed {
        let r = post(media.clone()).await.unwrap();
        assert_eq!(r.status().as_u16(), 202, "{media}");
    }
    let r = post("application/json".into()).await.unwrap();
    assert_eq!(r.status().as_u16(), 415);
    let described = op["responses"]["415"]["description"].as_str().unwrap();
    for media in &listed {
        assert!(described.contains(media.as_str()), "{described}");
    }
    server.stop().await;
}

/// Commands check their arguments before they connect (a database that
/// cannot be reached shows it: the error is the argument's), and
/// `seed --if-empty` completes a seed that was cut off part-way.
#[tokio::test]
async fn cli_checks_arguments_first_and_completes_an_interrupted_seed() {
    let nowhere = format!(
        "postgres://nobody:pw@127.0.0.1:{}/nothing",
        sales_e2e::free_port()
    );
    let run = |args: &[&str], db_url: &str, stdin: &[u8]| {
        let mut cmd = Command::new(server_bin());
        cmd.args(args)
            .env("DATABASE_URL", db_url)
            .env("LOG_LEVEL", "warn")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        {
            use std::io::Write;
            // The command may stop reading early (a password past its bound).
            let _ = child.stdin.take().unwrap().write_all(stdin);
        }
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    for (args, stdin, expected) in [
        (
            &["seed", "--months", "400", "--end", "2024-03"][..],
            &b""[..],
            "--months: 400 months ending 2024-03 would start in 1990-12; records start in 2000 (at most 291 months end there)",
        ),
        (&["seed", "--end", "2024-13"][..], &b""[..], "--end: month must be 1..12"),
        (
            &["seed", "--end", "1990-01", "--months", "1"][..],
            &b""[..],
            "--end: 1990-01 is before 2000",
        ),
        (
            // A file piped in by mistake: its first line is not a password.
            &["user", "set-password", "--email", "a@example.com"][..],
            &b"# pg_sales\nA Postgres-native backend\n"[..],
            "password: standard input holds more than one line",
        ),
        (
            // The email is checked before any password is read (this one
            // would be refused as a password too).
            &["user", "add", "--email", "not-an-email", "--role", "staff", "--store", "1"][..],
            &[b'x'; 100_000][..],
            "--email",
        ),
        (
            &["user", "link", "--email", "a@example.com", "--issuer", " ", "--subject", "s"][..],
            &b""[..],
            "--issuer",
        ),
        (
            &["user", "add", "--email", "a@example.com", "--role", "boss"][..],
            &b"long-enough-1\n"[..],
            "--role",
        ),
        (
            &["user", "add", "--email", "a@example.com", "--role", "staff", "--store", "1"][..],
            &[b'x'; 100_000][..],
            "password: must be at most 1024 bytes",
        ),
        (
            &["user", "set-password", "--email", "a@example.com"][..],
            &b"abc\n"[..],
            "password: must be at least",
        ),
        (
            &["user", "add", "--email", "not-an-email", "--role", "staff", "--password", "long-enough-1"][..],
            &b""[..],
            "email",
        ),
        (
            &["import", "/nonexistent/sales.csv"][..],
            &b""[..],
            "/nonexistent/sales.csv: No such file",
        ),
        (&["import", "/tmp"][..], &b""[..], "/tmp: is a directory"),
        (
            &["user", "add", "--email", "a@example.com", "--role", "staff", "--password", "long-enough-1"][..],
            &b""[..],
            "--store: a staff needs at least one store",
        ),
        (
            &["import", "--max-errors=-1", "/tmp"][..],
            &b""[..],
            "--max-errors",
        ),
    ] {
        let (ok, text) = run(args, &nowhere, stdin);
        assert!(!ok, "{args:?}: {text}");
        assert!(text.contains(expected), "{args:?}: {text}");
        assert!(!text.contains("connect"), "{args:?} connected first: {text}");
    }

    // A password line on a stdin left open (a program that writes it and
    // waits, or `ssh host ...` without a terminal) is read without waiting
    // for the input's end: the command goes on (here to the unreachable
    // database) instead of hanging.
    {
        use std::io::Write;
        let mut child = Command::new(server_bin())
            .args(["user", "set-password", "--email", "a@example.com"])
            .env("DATABASE_URL", &nowhere)
            .env("DB_CONNECTION_TIMEOUT", "1s")
            .env("LOG_LEVEL", "warn")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"a-long-enough-password-1\n").unwrap();
        stdin.flush().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("set-password waited for the end of an open stdin");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!status.success(), "{text}");
        assert!(text.contains("cannot connect to Postgres"), "{text}");
    }

    // A database that cannot be reached: where, and why (not only that
    // the pool timed out).
    let out = Command::new(server_bin())
        .arg("migrate")
        .env("DATABASE_URL", &nowhere)
        .env("DB_CONNECTION_TIMEOUT", "1s")
        .env("LOG_LEVEL", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    let port = nowhere
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    assert!(
        text.contains(&format!(
            "cannot connect to Postgres at 127.0.0.1:{port}/nothing (DATABASE_URL)"
        )) && text.contains("refused"),
        "{text}"
    );
    // Output read only in part (`| head`): the command still ends well.
    let mut child = Command::new(server_bin())
        .arg("openapi")
        .env("JWT_SECRET", "a-secret-of-at-least-thirty-two-bytes-0123")
        .env("LOG_LEVEL", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Read;
        let mut head = [0u8; 16];
        child.stdout.take().unwrap().read_exact(&mut head).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    let db = TestDb::new().await;
    let seed = [
        "seed",
        "--if-empty",
        "--stores",
        "6",
        "--months",
        "2",
        "--end",
        "2024-03",
    ];
    let (ok, text) = run(&seed, &db.url, b"");
    assert!(ok, "{text}");
    let full: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT s.id, m.year::int8, m.month::int8 FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id ORDER BY 1, 2, 3",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(full.len(), 12);
    let digest = "SELECT md5(string_agg(store_id || ':' || year || ':' || month || ':' || daily_data::text, ',' ORDER BY store_id, year, month)) FROM sales.monthly_sales";
    let before: String = sqlx::query_scalar(digest)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // Cut off after the fourth store: the last two have no months.
    sqlx::query("DELETE FROM sales.monthly_sales WHERE store_id IN (SELECT id FROM sales.stores ORDER BY id OFFSET 4)")
        .execute(&db.pool)
        .await
        .unwrap();
    let (ok, text) = run(&seed, &db.url, b"");
    assert!(ok, "{text}");
    assert!(!text.contains("nothing seeded"), "{text}");
    assert!(
        text.contains("4 new, 0 updated"),
        "only the missing months: {text}"
    );
    let after: String = sqlx::query_scalar(digest)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(after, before, "the completed seed is the one cut off");
    // A month the seed wrote and someone changed since is kept as it is
    // when a cut-off seed is completed.
    sqlx::query(
        "UPDATE sales.monthly_sales SET daily_data = '{\"1\": {\"sales\": 1}}'
         WHERE store_id = (SELECT min(id) FROM sales.stores) AND month = 3",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "DELETE FROM sales.monthly_sales WHERE store_id = (SELECT max(id) FROM sales.stores)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let (ok, text) = run(&seed, &db.url, b"");
    assert!(ok && text.contains("2 new, 0 updated"), "{text}");
    let kept: String = sqlx::query_scalar(
        "SELECT daily_data::text FROM sales.monthly_sales
         WHERE store_id = (SELECT min(id) FROM sales.stores) AND month = 3",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(kept, r#"{"1": {"sales": 1}}"#);
    // Complete now: left alone.
    let (ok, text) = run(&seed, &db.url, b"");
    assert!(ok && text.contains("nothing seeded"), "{text}");
    // Stores of someone else's, without months, are not a cut-off seed.
    sqlx::query(
        "DELETE FROM sales.monthly_sales WHERE store_id = (SELECT max(id) FROM sales.stores)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO sales.stores (code, name, region) VALUES ('MINE-1', 'Mine', 'North')")
        .execute(&db.pool)
        .await
        .unwrap();
    let (ok, text) = run(&seed, &db.url, b"");
    assert!(ok && text.contains("nothing seeded"), "{text}");
}

/// The statuses the layers around every operation give (a 304 or 412 to a
/// conditional GET, a 415 to a body-bearing method with a Content-Encoding,
/// a 501 to a transfer coding the server does not undo, a 400 to an
/// undeclared parameter of a health check, a 401 from `/metrics` with
/// `METRICS_TOKEN` set) are listed in the OpenAPI document for the
/// operation that gave them.
#[tokio::test]
async fn statuses_given_around_the_handlers_are_in_the_document() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::new().await;
    let server = db
        .server(&[
            ("METRICS_TOKEN", "scrape-me-0123456789"),
            ("CORS_ORIGINS", "https://app.example"),
        ])
        .await;
    let (_, token) = sales_e2e::user_token(&db, &server, "a@x.test", "admin", &[]).await;
    let spec: Value = served_spec(&server).await;
    let listed = |path: &str, method: &str, status: u16| {
        spec["paths"][path][method]["responses"]
            .get(status.to_string())
            .is_some()
    };
    let client = reqwest::Client::new();
    let mut seen = Vec::new();
    // Conditional GETs: the ETag of a first answer, then If-None-Match
    // (304) and an If-Match that names nothing current (412).
    for (path, template) in [
        ("/health/live", "/health/live"),
        ("/api/v2/stores", "/api/v2/stores"),
        ("/api/v2/auth/me", "/api/v2/auth/me"),
    ] {
        let first = client
            .get(server.url(path))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(first.status().as_u16(), 200, "{path}");
        let etag = first.headers()["etag"].to_str().unwrap().to_string();
        for (name, value, status) in [
            ("if-none-match", etag.as_str(), 304),
            ("if-match", "\"not-this-one\"", 412),
        ] {
            let r = client
                .get(server.url(path))
                .bearer_auth(&token)
                .header(name, value)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), status, "{path} {name}");
            seen.push((template, "get", status));
        }
    }
    // A body-bearing method with a Content-Encoding, on an operation that
    // takes no body.
    let r = client
        .delete(server.url("/api/v2/imports/999999"))
        .bearer_auth(&token)
        .header("content-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    seen.push(("/api/v2/imports/{id}", "delete", 415));
    // Undeclared parameters beside the API, and /metrics without its token.
    for path in ["/health", "/health/live", "/health/ready", "/metrics"] {
        let r = client
            .get(server.url(&format!("{path}?verbose=1")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{path}");
        seen.push((path, "get", 400));
    }
    let r = client.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    seen.push(("/metrics", "get", 401));
    // Beside the API too: a body past BODY_LIMIT, an Origin not listed.
    for path in ["/health", "/health/live", "/health/ready", "/metrics"] {
        let r = client
            .get(server.url(path))
            .body(vec![b'x'; 300_000])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 413, "{path}");
        seen.push((path, "get", 413));
        let r = client
            .get(server.url(path))
            .header("origin", "https://elsewhere.example")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "{path}");
        seen.push((path, "get", 403));
    }
    // A transfer coding other than chunked, on a GET and on a POST.
    for (method, path, template, lower) in [
        ("GET", "/api/v2/stores", "/api/v2/stores", "get"),
        ("POST", "/api/v2/auth/login", "/api/v2/auth/login", "post"),
    ] {
        let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\
             Connection: close\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"
        );
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(30), s.read_to_end(&mut out)).await;
        let answer = String::from_utf8_lossy(&out);
        assert!(
            answer.starts_with("HTTP/1.1 501"),
            "{method} {path}: {answer}"
        );
        seen.push((template, lower, 501));
    }
    let missing: Vec<_> = seen
        .iter()
        .filter(|(path, method, status)| !listed(path, method, *status))
        .collect();
    assert!(missing.is_empty(), "not in the document: {missing:?}");
    server.stop().await;
}
