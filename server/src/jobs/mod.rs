//! The durable job queue (`jobs.jobs`, migration 0009) and what runs on it:
//! imports of POS and export files, and asynchronous batches.
//!
//! * A job is a row. Workers of every server instance (JOB_WORKERS each)
//!   take the oldest runnable one with `FOR UPDATE SKIP LOCKED`, so two
//!   workers never take the same row, and stamp it with a lease: a fresh
//!   token, their backend (pid and start time) and an expiry.
//! * A running job is runnable again when its lease expired or its worker's
//!   database session is gone (a killed server's connections close, so its
//!   jobs are taken again within a poll, not after the lease).
//! * Every chunk's transaction does its work, then locks the job row, checks
//!   the token and records its progress (last input line, counts) before it
//!   commits: a worker that lost its job writes nothing more, and a job taken
//!   again continues after the last committed chunk, never writing a line
//!   twice.
//! * Cancellation is a flag the worker reads before each chunk, so a
//!   cancelled job stops between chunks; what committed stays.

pub mod batch;
pub mod cli;
pub mod import;
pub mod parse;
pub mod worker;

use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool, Row};
use std::time::Duration;

pub use worker::Workers;

/// At most this many rejected rows are kept per job (all are counted).
pub const ERRORS_KEPT: i64 = 1000;
/// A job that failed this many times (not counting rejected rows) stays failed.
pub const MAX_ATTEMPTS: i32 = 3;

/// Wakes this instance's idle workers at once when it queues a job (other
/// instances find it at their next poll).
pub static WAKE: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Why a job was not created for a user.
#[derive(Debug, thiserror::Error)]
pub enum TooManyJobs {
    /// The user has as many unfinished jobs as `JOBS_MAX_PER_USER` allows.
    #[error("you have {0} unfinished jobs (uploading, queued or running), the most JOBS_MAX_PER_USER allows; wait for one to end, or cancel one")]
    Full(i64),
    /// The user's job lock stayed taken for [`ADMIT_WAIT`] (another of their
    /// requests creating a job for that long, or a session holding the lock).
    #[error("another request is creating a job for this user; retry")]
    Busy,
}

/// How long a job's creation waits for the user's job lock.
const ADMIT_WAIT: Duration = Duration::from_secs(2);

/// First key of the per-user lock under which a job is admitted (the
/// second is the user id's hash).
pub const JOBS_LOCK: i32 = 0x5A1E_5004;

/// Unfinished jobs of a user: uploading, queued or running.
pub async fn unfinished<'c, E: sqlx::PgExecutor<'c>>(
    e: E,
    user_id: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM jobs.jobs WHERE user_id = $1 AND state IN ('uploading', 'queued', 'running')",
    )
    .bind(user_id)
    .fetch_one(e)
    .await
}

/// In a transaction about to create a job for `user_id`: takes the user's
/// job lock (held to the end of the transaction, so that two requests of
/// one user cannot both pass the count), then counts the user's unfinished
/// jobs against `max`. The lock is tried, not waited for, for at most
/// [`ADMIT_WAIT`]: any session may take an advisory lock, and one holding
/// this one must not hold the request (and its connection) with it.
pub async fn admit(
    tx: &mut PgConnection,
    user_id: i64,
    max: i64,
) -> Result<Result<(), TooManyJobs>, sqlx::Error> {
    let started = std::time::Instant::now();
    while !sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_xact_lock($1, hashint8($2))")
        .bind(JOBS_LOCK)
        .bind(user_id)
        .fetch_one(&mut *tx)
        .await?
    {
        if started.elapsed() >= ADMIT_WAIT {
            return Ok(Err(TooManyJobs::Busy));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let active = unfinished(&mut *tx, user_id).await?;
    Ok(if active >= max {
        Err(TooManyJobs::Full(active))
    } else {
        Ok(())
    })
}

/// A job as a worker took it.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub kind: String,
    pub token: String,
    pub user_id: Option<i64>,
    pub scope: Option<Vec<i64>>,
    pub params: Value,
    pub attempts: i32,
    /// The user who queued the job was deleted or disabled since: the job
    /// must not run (see [`claim`]).
    pub user_gone: bool,
}

/// Takes the oldest runnable job (or job `only`), on the connection that
/// will run it: its backend is the session whose end frees the job.
pub async fn claim(
    conn: &mut PgConnection,
    worker: &str,
    lease: Duration,
    only: Option<i64>,
) -> Result<Option<Claimed>, sqlx::Error> {
    fail_lost(conn, only).await?;
    let row = sqlx::query(&format!(
        "WITH c AS (
             SELECT j.id, j.user_id FROM jobs.jobs j
             WHERE j.state IN ('queued', 'running')
               AND ($3::bigint IS NULL OR j.id = $3)
               AND (j.state = 'queued' OR {WORKER_GONE})
               -- A lost job on its last attempt is failed (fail_lost), not taken.
               AND (j.state = 'queued' OR j.attempts < $4)
             ORDER BY j.id
             LIMIT 1
             FOR UPDATE OF j SKIP LOCKED
         )
         UPDATE jobs.jobs j
         SET state = 'running',
             attempts = j.attempts + 1,
             last_error = CASE WHEN j.state = 'running'
                               THEN 'its worker was lost; taken again' ELSE j.last_error END,
             lease_token = gen_random_uuid(),
             lease_until = now() + $1 * interval '1 millisecond',
             worker = $2,
             worker_pid = pg_backend_pid(),
             worker_backend_start = (SELECT backend_start FROM pg_stat_activity
                                     WHERE pid = pg_backend_pid()),
             started_at = coalesce(j.started_at, now()),
             updated_at = now()
         FROM c LEFT JOIN sales.users u ON u.id = c.user_id
                LEFT JOIN auth.user_state st ON st.user_id = u.id
         WHERE j.id = c.id
         RETURNING j.id, j.kind, j.lease_token::text, j.user_id,
             -- The scope is the one the job was queued with, narrowed to
             -- the user's stores as they are now (an admin's is unchanged);
             -- a user no longer there has none.
             CASE WHEN j.user_id IS NULL THEN j.scope
                  WHEN u.id IS NULL THEN '{{}}'
                  WHEN u.role = 'admin' THEN j.scope
                  WHEN j.scope IS NULL THEN u.store_ids
                  ELSE ARRAY(SELECT x FROM unnest(j.scope) x WHERE x = ANY (u.store_ids) ORDER BY x)
             END,
             j.params, j.attempts,
             j.user_id IS NOT NULL AND (u.id IS NULL OR coalesce(st.disabled, false))",
    ))
    .bind(lease.as_millis() as i64)
    .bind(worker)
    .bind(only)
    .bind(MAX_ATTEMPTS)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|r| Claimed {
        id: r.get(0),
        kind: r.get(1),
        token: r.get(2),
        user_id: r.get(3),
        scope: r.get(4),
        params: r.get(5),
        attempts: r.get(6),
        user_gone: r.get(7),
    }))
}

/// A running job whose worker is gone (its session ended, or its lease ran
/// out) on its last attempt is failed, not taken again: a job that takes
/// its server down with it (or lands on servers that keep dying) would
/// otherwise be retried for ever. It ends as any failed job does: its
/// `import-completed` goes out and its staged rows are removed.
async fn fail_lost(conn: &mut PgConnection, only: Option<i64>) -> Result<(), sqlx::Error> {
    let lost = format!(
        "j.state = 'running' AND j.attempts >= $1 AND ($2::bigint IS NULL OR j.id = $2) AND {WORKER_GONE}"
    );
    // Every poll of every worker comes by here: a plain read first, and a
    // transaction only when there is a job to fail.
    let any: bool = sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM jobs.jobs j WHERE {lost})"
    ))
    .bind(MAX_ATTEMPTS)
    .bind(only)
    .fetch_one(&mut *conn)
    .await?;
    if !any {
        return Ok(());
    }
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let ended: Vec<(i64, Option<i64>, Value)> = sqlx::query_as(&format!(
        "UPDATE jobs.jobs u
         SET state = 'failed', finished_at = now(), updated_at = now(),
             last_error = format('its worker was lost (the server running it stopped or was killed) '
                                 'on its last attempt (%s of %s); not taken again', u.attempts, $1::int),
             lease_token = NULL, lease_until = NULL, worker_pid = NULL,
             input = CASE WHEN u.kind = 'batch' THEN NULL ELSE u.input END
         WHERE u.id IN (SELECT j.id FROM jobs.jobs j WHERE {lost} FOR UPDATE OF j SKIP LOCKED)
         RETURNING u.id, u.user_id, {END_DATA}"
    ))
    .bind(MAX_ATTEMPTS)
    .bind(only)
    .fetch_all(&mut *tx)
    .await?;
    for (_, user, data) in &ended {
        announce_end(&mut tx, *user, data.clone()).await?;
    }
    tx.commit().await?;
    for (id, ..) in ended {
        tracing::warn!(
            job = id,
            "job failed: its worker was lost on its last attempt"
        );
        purge_rows_on(conn, id).await?;
    }
    Ok(())
}

/// A job (a row of `jobs.jobs` named `j`) whose worker is gone: its lease
/// ran out, or the session that holds it (its backend, named by pid and
/// start time) has ended. Another role's session shows no start time
/// without `pg_read_all_stats`: then its pid alone says it lives (a pid
/// taken again by a new session is caught when the lease runs out), or an
/// instance or command-line import under another role would take every
/// job it saw running.
const WORKER_GONE: &str = "(j.lease_until < now()
     OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                    WHERE a.pid = j.worker_pid
                      AND (a.backend_start = j.worker_backend_start OR a.backend_start IS NULL)))";

/// A finished job's `import-completed` data, from its row (in an `UPDATE
/// ... RETURNING`: as the statement leaves it).
pub(crate) const END_DATA: &str = "jsonb_build_object(
    'jobId', id, 'kind', kind, 'state', state,
    'rowsRead', rows_read, 'rowsWritten', rows_written, 'rowsRejected', rows_rejected,
    'lastLine', last_line,
    'percent', CASE WHEN rows_read > 0
                    THEN least(100, round((rows_written + rows_rejected) * 1000.0 / rows_read) / 10)
                    ELSE 100 END,
    'done', true, 'error', last_error)";

/// Gives a job back (shutdown, or a transient failure): queued again for
/// any worker, or failed for good after MAX_ATTEMPTS. Given back without an
/// error (the server stopping, or its user's access changing under it), the
/// run does not count as an attempt: only failures use up MAX_ATTEMPTS. A job that fails for
/// good ends as any other: its `import-completed` (state `failed`, with the
/// error) goes out in the same transaction, and its staged rows are
/// removed.
pub async fn release(pool: &PgPool, job: &Claimed, error: Option<&str>) -> Result<(), sqlx::Error> {
    release_with(pool, job, error, MAX_ATTEMPTS).await
}

/// Fails a job for good with `error`, as [`release`] does after the last
/// attempt.
pub async fn fail(pool: &PgPool, job: &Claimed, error: &str) -> Result<(), sqlx::Error> {
    release_with(pool, job, Some(error), 0).await
}

async fn release_with(
    pool: &PgPool,
    job: &Claimed,
    error: Option<&str>,
    max_attempts: i32,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let failed: Option<Value> = sqlx::query_scalar(&format!(
        "UPDATE jobs.jobs
         SET state = CASE WHEN $3::text IS NOT NULL AND attempts >= $4 THEN 'failed' ELSE 'queued' END,
             attempts = CASE WHEN $3::text IS NULL THEN greatest(attempts - 1, 0) ELSE attempts END,
             finished_at = CASE WHEN $3::text IS NOT NULL AND attempts >= $4 THEN now() END,
             input = CASE WHEN $3::text IS NOT NULL AND attempts >= $4 AND kind = 'batch'
                          THEN NULL ELSE input END,
             last_error = coalesce($3, last_error),
             lease_token = NULL, lease_until = NULL, worker_pid = NULL, updated_at = now()
         WHERE id = $1 AND lease_token = $2::uuid
         RETURNING CASE WHEN state = 'failed' THEN {END_DATA} END"
    ))
    .bind(job.id)
    .bind(&job.token)
    .bind(error)
    .bind(max_attempts)
    .fetch_optional(&mut *tx)
    .await?
    .flatten();
    if let Some(data) = &failed {
        announce_end(&mut tx, job.user_id, data.clone()).await?;
    }
    tx.commit().await?;
    if failed.is_some() {
        purge_rows(pool, job.id).await?;
    }
    Ok(())
}

/// Why a cancel was not made.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// A batch is running: one transaction, it cannot be stopped part way.
    #[error("the batch is running")]
    RunningBatch,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Requests cancellation. A queued job is cancelled at once (and announced:
/// its `import-completed`, state `cancelled`); a running one stops before
/// its next chunk. Returns the state after the request, or None when no
/// such job is visible to the caller.
pub async fn cancel(
    pool: &PgPool,
    id: i64,
    user: Option<i64>,
) -> Result<Option<String>, CancelError> {
    let mut tx = pool.begin().await?;
    // A batch runs in one transaction that holds its job's row to the end:
    // waiting for the row would wait for the whole batch, to change
    // nothing. Its row held means it runs; a batch whose worker is gone
    // (its row free, `running` until it is claimed again) is cancelled as
    // any job is.
    let kind: Option<String> = sqlx::query_scalar(
        "SELECT kind FROM jobs.jobs WHERE id = $1 AND ($2::bigint IS NULL OR user_id = $2)",
    )
    .bind(id)
    .bind(user)
    .fetch_optional(&mut *tx)
    .await?;
    if kind.as_deref() == Some("batch") {
        if let Err(e) = sqlx::query("SELECT 1 FROM jobs.jobs WHERE id = $1 FOR UPDATE NOWAIT")
            .bind(id)
            .execute(&mut *tx)
            .await
        {
            if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("55P03") {
                return Err(CancelError::RunningBatch);
            }
            return Err(e.into());
        }
    }
    let row: Option<(String, Option<i64>, Option<Value>)> = sqlx::query_as(&format!(
        "WITH old AS (
             SELECT id AS old_id, state AS was FROM jobs.jobs
             WHERE id = $1 AND ($2::bigint IS NULL OR user_id = $2)
             FOR UPDATE
         )
         UPDATE jobs.jobs j
         SET cancel_requested = cancel_requested OR state IN ('uploading', 'queued', 'running'),
             state = CASE WHEN state IN ('uploading', 'queued') THEN 'cancelled' ELSE state END,
             finished_at = CASE WHEN state IN ('uploading', 'queued') THEN now() ELSE finished_at END,
             -- A queued batch's records (up to BODY_LIMIT) are of no use any more.
             input = CASE WHEN state = 'queued' AND kind = 'batch' THEN NULL ELSE input END,
             -- Cancelling a finished job, or one already asked to stop,
             -- changes nothing (its ETag stays).
             updated_at = CASE WHEN state IN ('uploading', 'queued')
                                    OR (state = 'running' AND NOT cancel_requested)
                               THEN now() ELSE updated_at END
         FROM old WHERE j.id = old.old_id
         RETURNING j.state, j.user_id,
                   CASE WHEN old.was IN ('uploading', 'queued') THEN {END_DATA} END"
    ))
    .bind(id)
    .bind(user)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((_, owner, Some(data))) = &row {
        announce_end(&mut tx, *owner, data.clone()).await?;
    }
    tx.commit().await?;
    let state = row.map(|r| r.0);
    if state.as_deref() == Some("cancelled") {
        let pool = pool.clone();
        tokio::spawn(async move {
            if let Err(e) = purge_rows(&pool, id).await {
                tracing::warn!(job = id, error = %e, "could not remove a cancelled import's rows");
            }
        });
    }
    Ok(state)
}

/// Removes a finished job's staged rows, a bounded slice per statement.
pub async fn purge_rows(pool: &PgPool, id: i64) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    purge_rows_on(&mut conn, id).await
}

async fn purge_rows_on(conn: &mut PgConnection, id: i64) -> Result<(), sqlx::Error> {
    loop {
        let n = sqlx::query(
            "DELETE FROM jobs.import_rows
             WHERE ctid = ANY (ARRAY(SELECT ctid FROM jobs.import_rows WHERE job_id = $1 LIMIT 20000))",
        )
        .bind(id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if n == 0 {
            return Ok(());
        }
    }
}

/// Uploads whose uploader is gone never become jobs: failed (and
/// announced, as every end of a job is), rows removed.
pub async fn reap_uploads(pool: &PgPool) -> Result<(), sqlx::Error> {
    let gone = format!("j.state = 'uploading' AND {WORKER_GONE}");
    // Every poll of every worker comes by here: a plain read first, and a
    // transaction only when there is an upload to end.
    let any: bool = sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM jobs.jobs j WHERE {gone})"
    ))
    .fetch_one(pool)
    .await?;
    if !any {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    let ended: Vec<(i64, Option<i64>, Value)> = sqlx::query_as(&format!(
        "UPDATE jobs.jobs j
         SET state = 'failed', finished_at = now(), updated_at = now(),
             last_error = 'the upload was interrupted', lease_token = NULL
         WHERE {gone}
         RETURNING j.id, j.user_id, {END_DATA}"
    ))
    .fetch_all(&mut *tx)
    .await?;
    for (_, user, data) in &ended {
        announce_end(&mut tx, *user, data.clone()).await?;
    }
    tx.commit().await?;
    for (id, ..) in ended {
        purge_rows(pool, id).await?;
    }
    Ok(())
}

/// Inserts rejected rows, keeping at most ERRORS_KEPT per job (counted in
/// the table: a line can have several).
pub async fn record_errors(
    conn: &mut PgConnection,
    job: i64,
    errors: &[parse::Rejected],
) -> Result<(), sqlx::Error> {
    if errors.is_empty() {
        return Ok(());
    }
    let take = &errors[..errors.len().min(ERRORS_KEPT as usize)];
    let lines: Vec<i64> = take.iter().map(|e| e.line as i64).collect();
    let cols: Vec<Option<String>> = take.iter().map(|e| e.column.clone()).collect();
    let reasons: Vec<String> = take.iter().map(|e| e.reason.clone()).collect();
    sqlx::query(
        "INSERT INTO jobs.job_errors (job_id, line, col, reason)
         SELECT $1, l, c, r FROM unnest($2::bigint[], $3::text[], $4::text[]) WITH ORDINALITY AS t(l, c, r, i)
         WHERE i <= $5 - (SELECT count(*) FROM jobs.job_errors WHERE job_id = $1)",
    )
    .bind(job)
    .bind(&lines)
    .bind(&cols)
    .bind(&reasons)
    .bind(ERRORS_KEPT)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Errors shown in a job's status.
pub const ERRORS_SHOWN: i64 = 100;

/// A job's status document (`GET /api/v2/imports/{id}`), or None when the
/// job does not exist or is not the caller's (`user` None: any job).
pub async fn status(
    pool: &PgPool,
    id: i64,
    user: Option<i64>,
) -> Result<Option<Value>, sqlx::Error> {
    let doc: Option<Value> = sqlx::query_scalar(&format!(
        "SELECT {DOC} FROM jobs.jobs j WHERE j.id = $1 AND ($2::bigint IS NULL OR j.user_id = $2)"
    ))
    .bind(id)
    .bind(user)
    .fetch_optional(pool)
    .await?;
    let Some(mut doc) = doc else { return Ok(None) };
    let errors: Vec<Value> = sqlx::query_scalar(
        "SELECT jsonb_build_object('line', line, 'column', col, 'reason', reason)
         FROM jobs.job_errors WHERE job_id = $1 ORDER BY line, n LIMIT $2",
    )
    .bind(id)
    .bind(ERRORS_SHOWN)
    .fetch_all(pool)
    .await?;
    // `rowsRejected` counts lines (a line rejected for several columns has a
    // row for each): the lines none of whose rows is listed are omitted.
    let listed = errors
        .iter()
        .filter_map(|e| e["line"].as_i64())
        .collect::<std::collections::BTreeSet<_>>()
        .len() as i64;
    // A batch's refused records are in its `result` (the report a
    // synchronous batch answers), not in the job's rows: none is omitted.
    let omitted = if doc["kind"] == "batch" {
        0
    } else {
        (doc["rowsRejected"].as_i64().unwrap_or(0) - listed).max(0)
    };
    doc["errorsOmitted"] = json!(omitted);
    doc["errors"] = Value::Array(errors);
    Ok(Some(doc))
}

/// The caller's jobs, newest first (`user` None: everyone's).
pub async fn list(pool: &PgPool, user: Option<i64>, limit: i64) -> Result<Vec<Value>, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT {DOC} FROM jobs.jobs j WHERE ($1::bigint IS NULL OR j.user_id = $1)
         ORDER BY j.id DESC LIMIT $2"
    ))
    .bind(user)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The status document, built in SQL.
const DOC: &str = "jsonb_build_object(
    'id', j.id, 'kind', j.kind, 'state', j.state, 'userId', j.user_id,
    'format', j.params->'format', 'dryRun', coalesce((j.params->>'dryRun')::boolean, false),
    'maxErrors', j.params->'maxErrors',
    'rowsRead', j.rows_read, 'rowsWritten', j.rows_written, 'rowsRejected', j.rows_rejected,
    'lastLine', j.last_line, 'chunks', j.chunks, 'attempts', j.attempts,
    'lastError', j.last_error, 'cancelRequested', j.cancel_requested, 'result', j.result,
    'createdAt', j.created_at, 'startedAt', j.started_at, 'updatedAt', j.updated_at,
    'finishedAt', j.finished_at)";

/// Announces a job's end in the transaction that ends it: the stored
/// `import-completed` event (to the user who queued it, or the admins'
/// `batch` channel) and, for a user, a last live `import-progress`.
pub async fn announce_end(
    conn: &mut PgConnection,
    user: Option<i64>,
    data: Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT sales.emit('import-completed', $1, NULL, $2)")
        .bind(&data)
        .bind(user)
        .execute(&mut *conn)
        .await?;
    if let Some(u) = user {
        notify_user(conn, u, "import-progress", data).await?;
    }
    Ok(())
}

/// Sends a live-only message to one user's WebSocket (any instance
/// delivers it: it goes through Postgres like export progress).
pub async fn notify_user(
    conn: &mut PgConnection,
    user: i64,
    event: &str,
    data: Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(crate::events::EPHEMERAL_CHANNEL)
        .bind(crate::events::sealed::seal(user, event, data))
        .execute(&mut *conn)
        .await?;
    Ok(())
}
