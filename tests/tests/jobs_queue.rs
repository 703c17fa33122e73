//! The job queue's claim against real Postgres: concurrent workers never
//! take the same job, a job stays its worker's while that worker's session
//! lives, and is taken again (attempt 2) once the session is gone.

use sales_e2e::TestDb;
use sales_server::jobs;
use sqlx::Connection;
use std::collections::HashSet;
use std::time::Duration;

async fn queue_batches(db: &TestDb, n: usize) -> Vec<i64> {
    sqlx::query_scalar(
        "INSERT INTO jobs.jobs (kind, params, input)
         SELECT 'batch', '{}', '{\"records\": []}' FROM generate_series(1, $1) RETURNING id",
    )
    .bind(n as i32)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn concurrent_claims_never_take_the_same_job() {
    let db = TestDb::new().await;
    let ids = queue_batches(&db, 40).await;
    let mut tasks = Vec::new();
    for w in 0..4 {
        let url = db.url.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            let mut mine = Vec::new();
            while let Some(job) =
                jobs::claim(&mut conn, &format!("w{w}"), Duration::from_secs(60), None)
                    .await
                    .unwrap()
            {
                mine.push(job.id);
            }
            // Held by this live session: nobody takes them again.
            (mine, conn)
        }));
    }
    let mut all = Vec::new();
    let mut conns = Vec::new();
    for t in tasks {
        let (mine, conn) = t.await.unwrap();
        all.extend(mine);
        conns.push(conn);
    }
    let distinct: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(all.len(), 40, "every job taken once");
    assert_eq!(distinct, ids.into_iter().collect());
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT DISTINCT attempts FROM jobs.jobs")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(attempts, vec![1]);
}

#[tokio::test]
async fn a_job_is_taken_again_only_when_its_worker_is_gone() {
    let db = TestDb::new().await;
    let id = queue_batches(&db, 1).await[0];
    let mut first = db.connect().await;
    let job = jobs::claim(&mut first, "first", Duration::from_secs(3600), None)
        .await
        .unwrap()
        .expect("a job");
    assert_eq!((job.id, job.attempts), (id, 1));
    let mut second = db.connect().await;
    assert!(
        jobs::claim(&mut second, "second", Duration::from_secs(3600), None)
            .await
            .unwrap()
            .is_none(),
        "a live worker's job is not taken"
    );
    // The first worker's session ends (its process died): the lease is
    // long, but the job is free at once.
    first.close().await.unwrap();
    let again = sales_e2e::eventually(Duration::from_secs(30), "the job to be free", || async {
        let mut c = db.connect().await;
        jobs::claim(&mut c, "second", Duration::from_secs(3600), None)
            .await
            .unwrap()
            .map(|j| (j, c))
    })
    .await;
    assert_eq!((again.0.id, again.0.attempts), (id, 2));
    assert_ne!(again.0.token, job.token);
    // The old token is fenced out.
    let n = sqlx::query(
        "UPDATE jobs.jobs SET rows_written = 1 WHERE id = $1 AND lease_token = $2::uuid",
    )
    .bind(id)
    .bind(&job.token)
    .execute(&db.pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(n, 0);
    // An expired lease frees a job whose session still lives.
    sqlx::query("UPDATE jobs.jobs SET lease_until = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await
        .unwrap();
    let mut third = db.connect().await;
    let j = jobs::claim(&mut third, "third", Duration::from_secs(60), None)
        .await
        .unwrap()
        .expect("expired lease");
    assert_eq!(j.attempts, 3);
    drop(again);
}

/// Finished jobs (and their rejected rows) go after EVENT_RETENTION; open
/// ones stay whatever their age.
#[tokio::test]
async fn finished_jobs_are_removed_after_the_retention() {
    let db = TestDb::new().await;
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO jobs.jobs (kind, state, finished_at, created_at)
         VALUES ('import', 'completed', now() - interval '8 days', now() - interval '8 days'),
                ('import', 'failed', now() - interval '1 day', now() - interval '1 day'),
                ('import', 'queued', NULL, now() - interval '9 days')
         RETURNING id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO jobs.job_errors (job_id, line, reason) VALUES ($1, 2, 'x')")
        .bind(ids[0])
        .execute(&db.pool)
        .await
        .unwrap();
    // The queued one is a batch with no records: it runs and completes.
    sqlx::query("UPDATE jobs.jobs SET kind = 'batch', input = '{\"records\": []}' WHERE id = $1")
        .bind(ids[2])
        .execute(&db.pool)
        .await
        .unwrap();
    let server = db.server(&[("EVENT_RETENTION", "7d")]).await;
    let left: Vec<i64> =
        sales_e2e::eventually(Duration::from_secs(30), "the old job to go", || async {
            let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM jobs.jobs ORDER BY id")
                .fetch_all(&db.pool)
                .await
                .unwrap();
            (!left.contains(&ids[0])).then_some(left)
        })
        .await;
    assert_eq!(left, vec![ids[1], ids[2]]);
    let errors: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs.job_errors")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(errors, 0);
    server.stop().await;
}

/// Imports, exports and uploads whose connections could take the whole
/// pool (`JOB_WORKERS x IMPORT_PARALLELISM + EXPORT_MAX_CONCURRENT +
/// IMPORT_MAX_UPLOADS >= DB_POOL_MAX`) are named in the log before the
/// server listens; the defaults (2 x 2 + 4 + 4 of 20) are not.
#[tokio::test]
async fn imports_that_could_hold_the_whole_pool_are_named_at_start() {
    let db = TestDb::new().await;
    let start = |extra: &[(&str, &str)]| {
        let mut env = db.env();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        sales_e2e::ServerProc::start(&sales_e2e::server_bin(), &env).expect("server")
    };
    const WARNING: &str = "imports, exports and uploads may hold";

    let crowded = start(&[
        ("JOB_WORKERS", "4"),
        ("IMPORT_PARALLELISM", "3"),
        ("DB_POOL_MAX", "20"),
    ]);
    let log = crowded.log();
    let line = log
        .lines()
        .find(|l| l.contains(WARNING))
        .unwrap_or_else(|| panic!("no warning before listening: {log}"));
    assert!(line.contains("may hold 20 connections"), "{line}");
    assert!(line.contains("DB_POOL_MAX (20)"), "{line}");
    drop(crowded);
    // Imports alone within the pool, exports and uploads beside them not.
    let shared = start(&[("DB_POOL_MAX", "10")]);
    let log = shared.log();
    assert!(
        log.lines().any(|l| l.contains("may hold 12 connections")),
        "{log}"
    );
    drop(shared);

    let roomy = start(&[]);
    assert!(!roomy.log().contains(WARNING), "{}", roomy.log());
}

/// A job given back with an error is queued again until its last attempt;
/// then it fails for good as a job that ends does: its `import-completed`
/// (state `failed`, with the error) is written, and its staged rows go.
#[tokio::test]
async fn a_job_that_fails_for_good_announces_it_and_leaves_no_rows() {
    let db = TestDb::new().await;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO jobs.jobs (kind, state, params, rows_read) VALUES ('import', 'queued', '{}', 2) RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO jobs.import_rows (job_id, line, day, store_code, year, month, sales)
         VALUES ($1, 2, 1, 'S1', 2024, 1, '5'), ($1, 3, 2, 'S1', 2024, 1, '6')",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();
    let staged = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs.import_rows WHERE job_id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    let announced = || async {
        sqlx::query_scalar::<_, serde_json::Value>(
            "SELECT payload FROM sales.events WHERE kind = 'import-completed' AND (payload->>'jobId')::bigint = $1",
        )
        .bind(id)
        .fetch_all(&db.pool)
        .await
        .unwrap()
    };
    let mut conn = db.connect().await;
    // Given back without an error (a server stopping, its user's access
    // changing) as often as it may fail: no attempt is used up.
    for _ in 0..=jobs::MAX_ATTEMPTS {
        let job = take(&mut conn).await;
        assert_eq!(job.attempts, 1, "a run given back is not an attempt");
        jobs::release(&db.pool, &job, None).await.unwrap();
        assert_eq!(staged().await, 2);
    }
    for attempt in 1..jobs::MAX_ATTEMPTS {
        let job = take(&mut conn).await;
        assert_eq!(job.attempts, attempt);
        jobs::release(&db.pool, &job, Some("the merge failed"))
            .await
            .unwrap();
        assert_eq!(staged().await, 2, "kept for the next attempt");
        assert!(announced().await.is_empty());
    }
    let job = take(&mut conn).await;
    jobs::release(&db.pool, &job, Some("the merge failed"))
        .await
        .unwrap();
    let state: String = sqlx::query_scalar("SELECT state FROM jobs.jobs WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(state, "failed");
    assert_eq!(staged().await, 0);
    let events = announced().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["state"], "failed");
    assert_eq!(events[0]["error"], "the merge failed");
    assert_eq!(events[0]["done"], true);
}

/// A job keeps at most ERRORS_KEPT rejected rows, counted in the table
/// (a line can be rejected for several reasons), however they arrive.
#[tokio::test]
async fn rejected_rows_kept_stop_at_the_limit() {
    let db = TestDb::new().await;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO jobs.jobs (kind, params) VALUES ('import', '{}') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let mut conn = db.connect().await;
    for batch in 0..3i64 {
        // 600 errors on 300 lines: two for each.
        let errors: Vec<sales_server::jobs::parse::Rejected> = (0..600)
            .map(|i| sales_server::jobs::parse::Rejected {
                line: (batch * 300 + i / 2 + 2) as u64,
                column: Some(if i % 2 == 0 { "date" } else { "sales" }.into()),
                reason: "bad".into(),
            })
            .collect();
        jobs::record_errors(&mut conn, id, &errors).await.unwrap();
    }
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs.job_errors WHERE job_id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(kept, jobs::ERRORS_KEPT);
    let last: i64 = sqlx::query_scalar("SELECT max(line) FROM jobs.job_errors WHERE job_id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(last, 2 + 300 + 199, "the first 1,000 as they came");
}

async fn take(conn: &mut sqlx::PgConnection) -> jobs::Claimed {
    jobs::claim(conn, "w", Duration::from_secs(60), None)
        .await
        .unwrap()
        .expect("a job")
}

/// A job runs with the scope it was queued with, narrowed to its user's
/// stores as they are when it is taken; a job whose user was disabled or
/// deleted since is taken only to be failed.
#[tokio::test]
async fn a_job_runs_with_its_users_current_scope() {
    let db = TestDb::new().await;
    let user: i64 = sqlx::query_scalar(
        "INSERT INTO sales.users (email, password_hash, role, store_ids)
         VALUES ('m@x.test', '$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA', 'manager', '{1,2,3}') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let queue = || async {
        sqlx::query_scalar::<_, i64>(
            "INSERT INTO jobs.jobs (kind, params, input, user_id, scope)
             VALUES ('batch', '{}', '{\"records\": []}', $1, '{1,2}') RETURNING id",
        )
        .bind(user)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let mut conn = db.connect().await;
    // An admin's job keeps the scope it was queued with (none: every store).
    let admin: i64 = sqlx::query_scalar(
        "INSERT INTO sales.users (email, password_hash, role)
         VALUES ('a@x.test', '$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA', 'admin') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO jobs.jobs (kind, params, input, user_id) VALUES ('batch', '{}', '{\"records\": []}', $1)",
    )
    .bind(admin)
    .execute(&db.pool)
    .await
    .unwrap();
    let j = take(&mut conn).await;
    assert_eq!((j.scope.clone(), j.user_gone), (None, false));
    queue().await;
    let j = take(&mut conn).await;
    assert_eq!((j.scope.clone(), j.user_gone), (Some(vec![1, 2]), false));
    // The manager loses store 1: a job queued before runs without it.
    sqlx::query("UPDATE sales.users SET store_ids = '{2,3}' WHERE id = $1")
        .bind(user)
        .execute(&db.pool)
        .await
        .unwrap();
    queue().await;
    let j = take(&mut conn).await;
    assert_eq!((j.scope.clone(), j.user_gone), (Some(vec![2]), false));
    // Disabled: not run.
    sqlx::query(
        "INSERT INTO auth.user_state (user_id, disabled) VALUES ($1, true)
         ON CONFLICT (user_id) DO UPDATE SET disabled = true",
    )
    .bind(user)
    .execute(&db.pool)
    .await
    .unwrap();
    queue().await;
    let j = take(&mut conn).await;
    assert!(j.user_gone);
    // Deleted: not run, and no scope left to run with.
    let id = queue().await;
    sqlx::query("DELETE FROM sales.users WHERE id = $1")
        .bind(user)
        .execute(&db.pool)
        .await
        .unwrap();
    let j = take(&mut conn).await;
    assert_eq!(j.id, id);
    assert_eq!((j.scope.clone(), j.user_gone), (Some(vec![]), true));
}

/// A running job whose worker is gone is taken again only while it has
/// attempts left: on its last one (a job whose server keeps dying under
/// it) it is failed instead, with a clear error, announced, and its staged
/// rows removed.
#[tokio::test]
async fn a_job_whose_worker_keeps_dying_fails_after_its_last_attempt() {
    let db = TestDb::new().await;
    // As a killed server leaves it: running, its worker's session gone
    // (no such backend), on its last attempt.
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO jobs.jobs (kind, state, params, rows_read, attempts, lease_token, lease_until,
                                worker_pid, started_at)
         VALUES ('import', 'running', '{}', 1, $1, gen_random_uuid(), now() + interval '1 hour',
                 NULL, now())
         RETURNING id",
    )
    .bind(jobs::MAX_ATTEMPTS)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO jobs.import_rows (job_id, line, day, store_code, year, month, sales)
         VALUES ($1, 2, 1, 'S1', 2024, 1, '5')",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();
    let mut conn = db.connect().await;
    let taken = jobs::claim(&mut conn, "w", Duration::from_secs(60), None)
        .await
        .unwrap();
    assert!(
        taken.is_none(),
        "taken again past its last attempt: {taken:?}"
    );
    let (state, attempts, error): (String, i32, Option<String>) =
        sqlx::query_as("SELECT state, attempts, last_error FROM jobs.jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), attempts), ("failed", jobs::MAX_ATTEMPTS));
    let error = error.unwrap_or_default();
    assert!(
        error.contains("worker was lost") && error.contains("last attempt"),
        "{error}"
    );
    let events: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT payload FROM sales.events
         WHERE kind = 'import-completed' AND (payload->>'jobId')::bigint = $1",
    )
    .bind(id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["state"], "failed");
    assert_eq!(events[0]["error"], error.as_str());
    let staged: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs.import_rows WHERE job_id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(staged, 0);
    // One attempt short of the limit, a lost job is still taken again.
    sqlx::query(
        "UPDATE jobs.jobs SET state = 'running', attempts = $2, finished_at = NULL,
                lease_token = gen_random_uuid() WHERE id = $1",
    )
    .bind(id)
    .bind(jobs::MAX_ATTEMPTS - 1)
    .execute(&db.pool)
    .await
    .unwrap();
    let j = take(&mut conn).await;
    assert_eq!((j.id, j.attempts), (id, jobs::MAX_ATTEMPTS));
}

/// A job taken again after its worker was lost, that then completes,
/// shows no stale `lastError` (its `attempts` tells it was taken again).
#[tokio::test]
async fn a_job_completed_after_a_lost_worker_shows_no_stale_error() {
    let db = TestDb::new().await;
    let store = db.stores(1).await[0];
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO jobs.jobs (kind, state, params, rows_read, attempts, lease_token, lease_until,
                                worker_pid, started_at)
         VALUES ('import', 'running', '{\"dryRun\": false, \"maxErrors\": 10, \"format\": \"daily\"}',
                 1, 1, gen_random_uuid(), now() + interval '1 hour', NULL, now())
         RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO jobs.import_rows (job_id, line, day, store_id, year, month, sales)
         VALUES ($1, 2, 1, $2, 2024, 1, '5')",
    )
    .bind(id)
    .bind(store)
    .execute(&db.pool)
    .await
    .unwrap();
    let server = db.server(&[]).await;
    let (state, attempts, error, written): (String, i32, Option<String>, i64) =
        sales_e2e::eventually(Duration::from_secs(60), "the job to end", || async {
            let j: (String, i32, Option<String>, i64) = sqlx::query_as(
                "SELECT state, attempts, last_error, rows_written FROM jobs.jobs WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
            (j.0 != "running" && j.0 != "queued").then_some(j)
        })
        .await;
    assert_eq!((state.as_str(), attempts, written), ("completed", 2, 1));
    assert_eq!(error, None, "a completed job keeps no stale error");
    server.stop().await;
}

/// Staged rows of a job that is over (cancelled, failed, completed) or
/// gone (after a sweep's grace) are swept by the workers' periodic prune: a job's end commits
/// before its staged rows are purged, so a server that died in between, or
/// a purge that failed, left them for good. The staged rows of live jobs
/// (uploading, queued, running) stay.
#[tokio::test]
async fn staged_rows_of_ended_or_gone_jobs_are_swept() {
    let db = TestDb::new().await;
    let mut ids = Vec::new();
    for state in [
        "cancelled",
        "failed",
        "completed",
        "uploading",
        "queued",
        "running",
    ] {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO jobs.jobs (kind, state, params) VALUES ('import', $1, '{}') RETURNING id",
        )
        .bind(state)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        ids.push((state, id));
    }
    let gone = ids.iter().map(|(_, id)| id).max().unwrap() + 1000;
    let staged: Vec<i64> = ids.iter().map(|(_, id)| *id).chain([gone]).collect();
    sqlx::query(
        "INSERT INTO jobs.import_rows (job_id, line, day, store_code, year, month, sales)
         SELECT j, l, 1, 'S1', 2024, 1, '5' FROM unnest($1::bigint[]) j, generate_series(2, 301) l",
    )
    .bind(&staged)
    .execute(&db.pool)
    .await
    .unwrap();
    let mut absent = HashSet::new();
    let swept = jobs::worker::sweep_staged_rows(&db.pool, &mut absent)
        .await
        .unwrap();
    assert_eq!(swept, 3, "cancelled, failed and completed jobs'");
    // Rows of an id with no job get one sweep's grace (whatever stages
    // rows before it queues their job), then go.
    assert_eq!(absent, HashSet::from([gone]));
    let swept = jobs::worker::sweep_staged_rows(&db.pool, &mut absent)
        .await
        .unwrap();
    assert_eq!(swept, 1, "the gone job's");
    let left: Vec<i64> = sqlx::query_scalar(
        "SELECT DISTINCT job_id FROM jobs.import_rows WHERE job_id = ANY($1) ORDER BY job_id",
    )
    .bind(&staged)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let live: Vec<i64> = ids
        .iter()
        .filter(|(s, _)| matches!(*s, "uploading" | "queued" | "running"))
        .map(|(_, id)| *id)
        .collect();
    assert_eq!(left, live);
    assert_eq!(
        jobs::worker::sweep_staged_rows(&db.pool, &mut absent)
            .await
            .unwrap(),
        0
    );
}

/// The job list says of each job what the job's own page says: an
/// asynchronous batch's refused records are in its `result`, so none is
/// omitted; and cancelling a job that has ended changes nothing, not even
/// its `updatedAt` or ETag.
#[tokio::test]
async fn the_list_agrees_with_the_job_and_cancelling_an_ended_job_changes_nothing() {
    use sales_e2e::{eventually, user_token, Api};
    use serde_json::{json, Value};
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "s@x.test", "staff", &stores).await;
    let api = Api::new(&server, Some(&token));
    let bad = json!({"atomic": false, "salesDataArray": [
        sales_e2e::month(stores[0], 2024, 3, 2, 10.0),
        {"storeId": stores[0], "year": 2024, "month": 4, "dailyData": {"31": {"sales": 1}}},
    ]});
    let (status, body) = api.post("/api/v2/sales/batch?async=true", &bad).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_i64().unwrap();
    let path = format!("/api/v2/imports/{id}");
    let doc: Value = eventually(Duration::from_secs(90), "the batch to end", || async {
        let (_, doc) = api.get(&path).await;
        ["completed", "failed"]
            .contains(&doc["state"].as_str().unwrap_or_default())
            .then_some(doc)
    })
    .await;
    assert_eq!(doc["rowsRejected"], 1, "{doc}");
    assert_eq!(doc["errorsOmitted"], 0, "{doc}");
    let (status, list) = api.get("/api/v2/imports").await;
    assert_eq!(status, 200, "{list}");
    let listed = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .unwrap_or_else(|| panic!("job {id} listed: {list}"));
    assert_eq!(listed["rowsRejected"], 1, "{listed}");
    assert_eq!(listed["errorsOmitted"], 0, "{listed}");

    let etag = api.etag(&path).await;
    let r = api
        .req(reqwest::Method::DELETE, &path)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let (_, after) = api.get(&path).await;
    assert_eq!(after["state"], doc["state"], "{after}");
    assert_eq!(after["updatedAt"], doc["updatedAt"], "{after}");
    assert_eq!(api.etag(&path).await, etag);
    server.stop().await;
}

/// An asynchronous batch run by another instance, while a transaction
/// writing events holds every relay's delivery back: a client that sees
/// the job completed through this instance then reads the new values
/// here. This instance's first level held the old entry (its relay had not
/// read the batch's events) until `CACHE_L1_TTL`, and Redis did until the
/// running instance invalidated, just after the commit that made the end
/// visible.
#[tokio::test]
async fn a_batch_seen_completed_through_another_instance_is_read_there() {
    use sales_e2e::{eventually, month, relay_caught_up, user_token, Api};
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    // This instance runs no job; the other runs them all.
    let here = db
        .server(&[("JOB_WORKERS", "0"), ("CACHE_L1_TTL", "60s")])
        .await;
    let worker = db.server(&[]).await;
    let (_, token) = user_token(&db, &here, "a@example.com", "admin", &[]).await;
    let (api, other) = (
        Api::new(&here, Some(&token)),
        Api::new(&worker, Some(&token)),
    );
    let (st, body) = api
        .post(
            "/api/v2/sales/batch",
            &serde_json::json!({"salesDataArray": [month(s, 2024, 1, 3, 1.0)]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    relay_caught_up(&db, &here).await;
    let path = format!("/api/v2/sales?storeId={s}&year=2024&month=1&fields=totalSales");
    sales_e2e::warm(&api, &path).await;

    let mut holder = db.connect().await;
    sqlx::raw_sql("BEGIN; SELECT sales.emit('held-open', '{}')")
        .execute(&mut holder)
        .await
        .unwrap();
    let (st, body) = other
        .post(
            "/api/v2/sales/batch?async=true",
            &serde_json::json!({"salesDataArray": [month(s, 2024, 1, 3, 2.0)]}),
        )
        .await;
    assert_eq!(st, 202, "{body}");
    let id = body["id"].as_i64().expect("job id");
    eventually(Duration::from_secs(60), "the batch completed", || async {
        let (_, job) = api.get(&format!("/api/v2/imports/{id}")).await;
        (job["state"] == "completed").then_some(())
    })
    .await;
    let (_, body) = api.get(&path).await;
    assert_eq!(body["data"][0]["totalSales"].as_f64(), Some(6.0), "{body}");
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    here.stop().await;
    worker.stop().await;
}
