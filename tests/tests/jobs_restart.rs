//! Server processes and the job queue: a server killed (SIGKILL) in the
//! middle of an import leaves a job another instance finishes, with exact
//! counts and no chunk written twice; two instances share a queue without
//! ever running one job twice.

use sales_e2e::{eventually, server_bin, Api, TestDb};
use serde_json::Value;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(180);

/// A `sales-server serve` process of this test.
struct ServerProc {
    child: Child,
    base: String,
}

impl ServerProc {
    fn start(db: &TestDb, extra: &[(&str, &str)]) -> Self {
        let bin = server_bin();
        assert!(bin.exists(), "build it first: cargo build -p sales-server");
        let mut child = Command::new(bin)
            .arg("serve")
            .envs(db.env())
            .envs(extra.iter().copied())
            .env("PORT", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sales-server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let base = loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the server to say where it listens");
            if let Some(url) = line.strip_prefix("listening on ") {
                break url.trim().to_string();
            }
        };
        Self { child, base }
    }

    fn api(&self, token: &str) -> Api {
        Api {
            base: self.base.clone(),
            token: Some(token.to_string()),
            http: reqwest::Client::new(),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn admin_token(db: &TestDb) -> String {
    let (id, _) =
        sales_server::users::upsert_user(&db.pool, "admin@x.test", "admin", &[], "password-123")
            .await
            .unwrap();
    let auth = sales_server::auth::Auth::from_config(&db.config(&[])).unwrap();
    auth.issue(id, "admin@x.test", sales_server::auth::Role::Admin, vec![])
        .unwrap()
        .0
}

/// `n` valid daily lines over stores T001..T0xx, each (store, day) once.
fn daily_file(stores: usize, n: usize, first_year: i32) -> String {
    let mut s = String::from("store_code,date,sales,customers,transactions\n");
    let mut i = 0;
    'out: for y in first_year..2100 {
        for m in 1..=12 {
            for d in 1..=28 {
                for st in 1..=stores {
                    if i == n {
                        break 'out;
                    }
                    s.push_str(&format!(
                        "T{st:03},{y}-{m:02}-{d:02},{}.25,{},{}\n",
                        i % 997,
                        i % 41,
                        i % 13
                    ));
                    i += 1;
                }
            }
        }
    }
    s
}

async fn job(db: &TestDb, id: i64) -> (String, i64, i64, i64, i32) {
    sqlx::query_as(
        "SELECT state, rows_written, rows_rejected, chunks, attempts FROM jobs.jobs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn i64_of(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Every sales row's events: versions 1..n, each once.
async fn assert_no_duplicate_events(db: &TestDb) {
    let dup = i64_of(
        db,
        "SELECT count(*) FROM (SELECT row_id, row_version FROM sales.events
                               WHERE kind LIKE 'sales-data-%' GROUP BY 1, 2 HAVING count(*) > 1) d",
    )
    .await;
    assert_eq!(dup, 0, "a row version was announced twice");
    let off = i64_of(
        db,
        "SELECT count(*) FROM sales.monthly_sales m
         WHERE m.version <> (SELECT count(*) FROM sales.events e
                             WHERE e.row_id = m.id AND e.kind LIKE 'sales-data-%')",
    )
    .await;
    assert_eq!(off, 0, "a row's events do not match its versions");
}

/// Every store-month has version 1: no chunk wrote one twice.
async fn assert_each_store_month_written_once(db: &TestDb) {
    assert_eq!(
        i64_of(
            db,
            "SELECT count(*) FROM sales.monthly_sales WHERE version <> 1"
        )
        .await,
        0,
        "a store-month was written more than once"
    );
}

#[tokio::test]
async fn a_killed_server_s_import_is_finished_by_another_without_writing_twice() {
    let db = TestDb::new().await;
    db.stores(20).await;
    let token = admin_token(&db).await;
    let env = [("IMPORT_CHUNK_LINES", "200"), ("JOB_WORKERS", "1")];
    let mut a = ServerProc::start(&db, &env);
    let api = a.api(&token);
    let n = 40_000;
    let r = api
        .req(reqwest::Method::POST, "/api/v2/imports")
        .header("content-type", "text/csv")
        .body(daily_file(20, n, 2001))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let id = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    eventually(WAIT, "some chunks to commit", || async {
        let (_, written, ..) = job(&db, id).await;
        (written >= 1000).then_some(())
    })
    .await;
    a.kill();
    let (state, written_before, ..) = job(&db, id).await;
    assert_eq!(state, "running", "killed mid-import");
    assert!(
        written_before < n as i64,
        "the import had not finished: {written_before}"
    );

    let b = ServerProc::start(&db, &env);
    let (state, written, rejected, chunks, attempts) =
        eventually(WAIT, "the job to end", || async {
            let j = job(&db, id).await;
            (j.0 != "running" && j.0 != "queued").then_some(j)
        })
        .await;
    assert_eq!(state, "completed");
    assert_eq!((written, rejected), (n as i64, 0));
    assert_eq!(attempts, 2, "taken again once");
    // Every line exactly once, each chunk's batch event once.
    let days = i64_of(
        &db,
        "SELECT sum(days_reported)::bigint FROM sales.monthly_sales",
    )
    .await;
    assert_eq!(days, n as i64);
    // The chunk the killed server had open wrote nothing: every store-month
    // was written once, by one instance or the other.
    assert_each_store_month_written_once(&db).await;
    let batches = i64_of(
        &db,
        "SELECT count(*) FROM sales.events WHERE kind = 'batch-completed'",
    )
    .await;
    assert_eq!(batches, chunks, "one batch-completed per committed chunk");
    assert_no_duplicate_events(&db).await;
    assert_eq!(
        i64_of(
            &db,
            "SELECT count(*) FROM sales.events WHERE kind = 'import-completed'"
        )
        .await,
        1
    );
    drop(b);
}

#[tokio::test]
async fn two_instances_share_the_queue_and_never_run_a_job_twice() {
    let db = TestDb::new().await;
    db.stores(5).await;
    let token = admin_token(&db).await;
    let env = [("IMPORT_CHUNK_LINES", "100"), ("JOB_WORKERS", "2")];
    let a = ServerProc::start(&db, &env);
    let b = ServerProc::start(&db, &env);
    let mut ids = Vec::new();
    let per = 2_000;
    for k in 0..6 {
        // Each file covers its own years, so the jobs touch different rows.
        let api = if k % 2 == 0 {
            a.api(&token)
        } else {
            b.api(&token)
        };
        let r = api
            .req(reqwest::Method::POST, "/api/v2/imports")
            .header("content-type", "text/csv")
            .body(daily_file(5, per, 2001 + 3 * k))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        ids.push(r.json::<Value>().await.unwrap()["id"].as_i64().unwrap());
    }
    let mut chunks = 0;
    for id in &ids {
        let (state, written, _, c, attempts) = eventually(WAIT, "a job to end", || async {
            let j = job(&db, *id).await;
            (j.0 == "completed" || j.0 == "failed").then_some(j)
        })
        .await;
        assert_eq!(
            (state.as_str(), written, attempts),
            ("completed", per as i64, 1)
        );
        chunks += c;
    }
    let workers = i64_of(
        &db,
        "SELECT count(DISTINCT split_part(worker, '/', 1)) FROM jobs.jobs",
    )
    .await;
    eprintln!("jobs ran on {workers} instance(s)");
    assert_eq!(
        i64_of(
            &db,
            "SELECT sum(days_reported)::bigint FROM sales.monthly_sales"
        )
        .await,
        (per * ids.len()) as i64
    );
    // Chunks take whole store-months in month and store order: a month
    // whose days the date-ordered file spreads over two 100-line chunks is
    // still written once.
    assert_each_store_month_written_once(&db).await;
    assert_eq!(
        i64_of(
            &db,
            "SELECT count(*) FROM sales.events WHERE kind = 'batch-completed'"
        )
        .await,
        chunks
    );
    assert_no_duplicate_events(&db).await;
    drop((a, b));
}

/// Every connection of the server ended under a running import (what a
/// Postgres restart does): the job is given back at once and finished by
/// its next attempt, without waiting for its lease to run out (set far
/// beyond the wait here) and without using up a further attempt on a
/// pooled connection that died with the others. The give-back used to take
/// such a connection, fail, and leave the job `running` until the lease
/// freed it.
#[tokio::test]
async fn an_import_whose_connections_all_ended_is_given_back_at_once() {
    let db = TestDb::new().await;
    db.stores(20).await;
    let token = admin_token(&db).await;
    let env = [
        ("IMPORT_CHUNK_LINES", "200"),
        ("JOB_WORKERS", "1"),
        ("JOB_LEASE", "600s"),
    ];
    let server = ServerProc::start(&db, &env);
    let api = server.api(&token);
    let n = 40_000;
    let r = api
        .req(reqwest::Method::POST, "/api/v2/imports")
        .header("content-type", "text/csv")
        .body(daily_file(20, n, 2001))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let id = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    eventually(WAIT, "some chunks to commit", || async {
        let (_, written, ..) = job(&db, id).await;
        (written >= 1000).then_some(())
    })
    .await;
    let ended = i64_of(
        &db,
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                               WHERE datname = current_database()
                                 AND application_name = 'sales-server') t",
    )
    .await;
    assert!(
        ended > 1,
        "the job's connection and idle pooled ones: {ended}"
    );
    let (state, written, rejected, _, attempts) = eventually(
        Duration::from_secs(120),
        "the job to end well before its lease",
        || async {
            let j = job(&db, id).await;
            (j.0 != "running" && j.0 != "queued").then_some(j)
        },
    )
    .await;
    assert_eq!(state, "completed");
    assert_eq!((written, rejected), (n as i64, 0));
    assert_eq!(attempts, 2, "one attempt cut short, one that finished");
    let days = i64_of(
        &db,
        "SELECT sum(days_reported)::bigint FROM sales.monthly_sales",
    )
    .await;
    assert_eq!(days, n as i64);
    assert_each_store_month_written_once(&db).await;
    assert_no_duplicate_events(&db).await;
    drop(server);
}
