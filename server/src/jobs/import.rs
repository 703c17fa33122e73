//! Imports: the file is parsed while it streams in and its rows are COPYed
//! into `jobs.import_rows` (committed every COPY_ROWS rows, so no upload
//! holds a transaction open for long); then the job is queued, and a worker
//! merges it chunk by chunk through `sales.batch_upsert_impl`, the function
//! behind `sales.batch_upsert` and the batch endpoint: the same validation,
//! scope, versions and events.
//!
//! Chunks walk the staged rows in month and store order (the table's key),
//! not in file order, and each takes whole store-months: a month is written
//! once however its days are spread over the file.
//!
//! One chunk is one transaction: one statement deletes the chunk's staged
//! rows (`DELETE ... RETURNING` feeds the merge, so a committed chunk's rows
//! are gone and can never be merged again), folds them into one record per
//! (store, year, month) and calls the merge with the job's store scope; then
//! it locks the job row (the lease token fences out a worker that lost the
//! job) and records the progress (counts, rejected rows) before COMMIT. A
//! restarted job merges what is still staged.
//!
//! IMPORT_PARALLELISM connections merge a job's chunks side by side, each
//! over a range of store-months no other chunk takes, and commit them in
//! key order (a chunk merged ahead of its turn waits for it), so a job ends
//! as it would on one connection: the same chunk is the one that passes
//! maxErrors, and `lastLine` only grows. A chunk that waits longer than
//! TURN_WAIT rolls back and merges again once its turn has come, so it never
//! waits holding row locks that an earlier chunk may be waiting for through
//! another writer (a circle Postgres could not see).
//! Numbers go from the staged text straight to `numeric`, so they reach the
//! table exactly as the file wrote them.

use super::parse::{self, FileError, Item, Rejected, Requested, Shape};
use super::Claimed;
use crate::state::AppState;
use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool, Row};
use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Staged rows per COPY statement (each commits on its own), and the bytes
/// of their values at most (a row's values, its metrics written out to
/// 16383 digits after the point, may be far larger than usual); with the
/// channel's two batches in flight this bounds the upload's memory.
const COPY_ROWS: usize = 10_000;
const COPY_BYTES: usize = 8 << 20;

/// How an import was asked for.
#[derive(Debug, Clone)]
pub struct ImportRequest {
    pub requested: Requested,
    pub dry_run: bool,
    pub max_errors: i64,
    pub user_id: Option<i64>,
    pub scope: Option<Vec<i64>>,
    pub file_name: Option<String>,
    pub lease: Duration,
    /// Unfinished jobs the user may have (JOBS_MAX_PER_USER); none from
    /// the command line.
    pub max_jobs: Option<i64>,
    /// The job's id when the caller took it beforehand (the command line,
    /// which cancels the upload by it on Ctrl-C); None: taken here.
    pub job_id: Option<i64>,
}

/// A staged import.
#[derive(Debug, Clone)]
pub struct Staged {
    pub job_id: i64,
    /// None for an upload cancelled before its file was read to the end.
    pub shape: Option<Shape>,
    pub lines: u64,
    pub rows: u64,
    pub rejected: u64,
    /// Queued (false: failed with more rejected rows than allowed, or
    /// cancelled while it was read).
    pub queued: bool,
    /// `queued`, `failed` or `cancelled`.
    pub state: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    TooManyJobs(#[from] super::TooManyJobs),
}

enum Msg {
    /// The first data line was read: the header passed.
    Started,
    /// COPY text (CSV) of `n` rows.
    Rows(Vec<u8>, usize),
    Rejected(Vec<Rejected>),
    /// Data lines, and how many of them were rejected.
    Lines(u64, u64),
}

/// Parses `input` on a blocking thread and stages its rows for a new job.
/// A file refused whole (empty, binary, wrong header) queues nothing.
/// (The command line counts the bytes its reader hands out for its
/// progress bar.)
pub async fn stage<R: Read + Send + 'static>(
    pool: &PgPool,
    input: R,
    req: &ImportRequest,
) -> Result<Staged, StageError> {
    // The id is taken first so that every staged row can carry it; a file
    // refused whole leaves only a gap in the sequence.
    let id: i64 = match req.job_id {
        Some(id) => id,
        None => {
            sqlx::query_scalar("SELECT nextval('jobs.jobs_id_seq')")
                .fetch_one(pool)
                .await?
        }
    };
    // Store codes as the stores have them now: a line naming its store by
    // code is staged with that store's id as well, so its rows share the
    // staged key (and chunk) with lines naming the same store by id. The
    // merge still resolves the code itself; a code unknown here is staged
    // without an id.
    let codes: HashMap<String, i64> =
        sqlx::query_as::<_, (String, i64)>("SELECT code, id FROM sales.stores")
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Msg>(2);
    // Data lines read so far, for the job's `rowsRead` while it uploads.
    let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let read_by_parser = read.clone();
    let requested = req.requested;
    let scope = req.scope.clone();
    let parser = tokio::task::spawn_blocking(move || {
        let mut rejected: Vec<Rejected> = Vec::new();
        let mut lines = 0u64;
        let mut rejected_lines = 0u64;
        let mut line_rejected = false;
        let gone = || FileError::Read("the import was abandoned".into());
        let writer = || {
            csv::WriterBuilder::new()
                .has_headers(false)
                .from_writer(Vec::with_capacity(1 << 20))
        };
        let job = id.to_string();
        // The store a row is staged under: its id, or the id its code has now.
        let store_of = |r: &parse::Row| {
            r.store_id
                .or_else(|| r.store_code.as_ref().and_then(|c| codes.get(c).copied()))
        };
        let write_row = |r: &parse::Row, sid: Option<i64>, w: &mut csv::Writer<Vec<u8>>| {
            let mut n = itoa::Buffer::new();
            fn opt(v: &Option<String>) -> &str {
                v.as_deref().unwrap_or_default()
            }
            let _ = w.write_field(&job);
            let _ = w.write_field(n.format(r.line));
            let _ = w.write_field(n.format(r.day));
            let _ = w.write_field(opt(&r.store_code));
            let _ = match sid {
                Some(i) => w.write_field(n.format(i)),
                None => w.write_field(""),
            };
            let _ = w.write_field(n.format(r.year));
            let _ = w.write_field(n.format(r.month));
            let _ = w.write_field(opt(&r.sales));
            let _ = w.write_field(opt(&r.customers));
            let _ = w.write_field(opt(&r.transactions));
            let _ = w.write_field(opt(&r.col));
            let _ = w.write_record(None::<&[u8]>);
        };
        // Each COPY's rows go in the order of the staged key (month, then
        // store), not the file's: a file in date order interleaves every
        // store's rows, and inserting them so scatters the key index's
        // inserts and a store-month's rows over the heap. Sorted, a
        // store-month's rows of one COPY are adjacent (README, "Staged rows
        // in key order": `psql \copy` of 1M staged rows 15-25% faster, a
        // whole upload about 8%).
        let mut batch: Vec<(Option<i64>, parse::Row)> = Vec::with_capacity(COPY_ROWS);
        let mut batch_bytes = 0usize;
        let flush = |batch: &mut Vec<(Option<i64>, parse::Row)>| -> Result<Vec<u8>, FileError> {
            batch.sort_unstable_by(|(a_sid, a), (b_sid, b)| {
                (
                    a.year,
                    a.month,
                    a_sid.unwrap_or(i64::MAX),
                    &a.store_code,
                    a.line,
                    a.day,
                )
                    .cmp(&(
                        b.year,
                        b.month,
                        b_sid.unwrap_or(i64::MAX),
                        &b.store_code,
                        b.line,
                        b.day,
                    ))
            });
            let mut w = writer();
            for (sid, r) in batch.drain(..) {
                write_row(&r, sid, &mut w);
            }
            w.into_inner().map_err(|e| FileError::Read(e.to_string()))
        };
        // A line whose store code and id name different stores: its rows
        // are not staged.
        let mut refused_line = None;
        let shape = parse::parse(input, requested, |item| {
            match item {
                Item::Row(r) if refused_line == Some(r.line) => {}
                Item::Row(r) => {
                    if let Some(why) = code_and_id_differ(&r, &codes, scope.as_deref()) {
                        refused_line = Some(r.line);
                        line_rejected = true;
                        rejected.push(Rejected {
                            line: r.line,
                            column: Some("storeId".into()),
                            reason: why,
                        });
                        return Ok(());
                    }
                    let len = |v: &Option<String>| v.as_ref().map_or(0, String::len);
                    batch_bytes += 64
                        + len(&r.store_code)
                        + len(&r.sales)
                        + len(&r.customers)
                        + len(&r.transactions)
                        + len(&r.col);
                    batch.push((store_of(&r), r));
                    if batch.len() >= COPY_ROWS || batch_bytes >= COPY_BYTES {
                        let n = batch.len();
                        let chunk = flush(&mut batch)?;
                        batch_bytes = 0;
                        tx.blocking_send(Msg::Rows(chunk, n)).map_err(|_| gone())?;
                    }
                }
                Item::Rejected(mut r) => {
                    line_rejected = true;
                    // A column named after the file's own text (a JSON
                    // member, a day key) is quoted like a value: cut short.
                    if let Some(c) = r.column.as_mut() {
                        if let Some(i) = c.char_indices().nth(60).map(|(i, _)| i) {
                            c.truncate(i);
                            c.push_str("...");
                        }
                    }
                    // A code no store can have reads, to a caller with a
                    // scope, as the merge tells it any unknown code.
                    if scope.is_some() && r.reason.starts_with(parse::UNKNOWN_STORE) {
                        r.reason.push_str(", or not one of your stores");
                    }
                    rejected.push(r);
                    if rejected.len() >= 1000 {
                        tx.blocking_send(Msg::Rejected(std::mem::take(&mut rejected)))
                            .map_err(|_| gone())?;
                    }
                }
                Item::LineDone => {
                    // Cancelled (or the upload ended otherwise): the
                    // reader stopped listening; stop at this line rather
                    // than at the next batch of rows, which a slow client
                    // may take long to send.
                    if tx.is_closed() {
                        return Err(gone());
                    }
                    lines += 1;
                    read_by_parser.store(lines, std::sync::atomic::Ordering::Relaxed);
                    rejected_lines += u64::from(std::mem::take(&mut line_rejected));
                    if lines == 1 {
                        // The header passed: the job may be created.
                        tx.blocking_send(Msg::Started).map_err(|_| gone())?;
                    }
                }
            }
            Ok(())
        });
        if !batch.is_empty() {
            let n = batch.len();
            let chunk = flush(&mut batch)?;
            tx.blocking_send(Msg::Rows(chunk, n)).map_err(|_| gone())?;
        }
        if !rejected.is_empty() {
            tx.blocking_send(Msg::Rejected(rejected))
                .map_err(|_| gone())?;
        }
        tx.blocking_send(Msg::Lines(lines, rejected_lines))
            .map_err(|_| gone())?;
        shape
    });

    let mut conn = pool.acquire().await?;
    let mut job: Option<i64> = None;
    let mut rows = 0u64;
    let mut rejected = 0u64;
    let mut lines = 0u64;
    let mut cancelled = false;
    let result: Result<(), StageError> = async {
        // The upload's lease is renewed while the body keeps coming, however
        // slowly and whatever its lines turn out to be: only an uploader
        // that is gone lets it run out (see reap_uploads).
        let mut renew = tokio::time::interval((req.lease / 3).max(Duration::from_millis(10)));
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await;
        loop {
            let msg = tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
                _ = renew.tick() => {
                    let so_far = read.load(std::sync::atomic::Ordering::Relaxed) as i64;
                    if job.is_some() && !renew_upload(&mut conn, id, req.lease, so_far).await? {
                        cancelled = true;
                        break;
                    }
                    continue;
                }
            };
            match (job, &msg) {
                (Some(_), _) | (None, Msg::Lines(..)) => {}
                (None, _) => {
                    create_uploading(&mut conn, id, req).await?;
                    job = Some(id);
                }
            }
            match msg {
                Msg::Started => {}
                Msg::Rows(text, n) => {
                    copy_rows(&mut conn, text).await?;
                    rows += n as u64;
                    let so_far = read.load(std::sync::atomic::Ordering::Relaxed) as i64;
                    if !renew_upload(&mut conn, id, req.lease, so_far).await? {
                        cancelled = true;
                        break;
                    }
                }
                Msg::Rejected(errs) => {
                    super::record_errors(&mut conn, id, &errs).await?;
                }
                Msg::Lines(n, r) => {
                    lines = n;
                    rejected = r;
                }
            }
        }
        Ok(())
    }
    .await;
    drop(rx);
    // A parser that panicked ends the upload as a refused file does: the
    // partial upload goes (below), rather than waiting for the lease.
    let parsed = parser
        .await
        .unwrap_or_else(|e| Err(FileError::Read(format!("parser stopped: {e}"))));
    if cancelled && result.is_ok() {
        // Cancelled while it was read: the parser stopped at its next
        // batch (its channel closed) and the rest of the body is left.
        drop(conn);
        super::purge_rows(pool, id).await?;
        let state = job_state(pool, id).await?;
        return Ok(Staged {
            job_id: id,
            shape: parsed.ok(),
            lines,
            rows,
            rejected,
            queued: false,
            state: state.unwrap_or_else(|| "cancelled".into()),
        });
    }
    let outcome = match (result, parsed) {
        (Err(e), _) => Err(e),
        (Ok(()), Err(e)) => Err(StageError::File(e)),
        (Ok(()), Ok(shape)) => Ok(shape),
    };
    let shape = match outcome {
        Ok(s) => s,
        Err(e) => {
            if let Some(id) = job {
                // Nothing was queued: the partial upload goes. A job the
                // user cancelled meanwhile stays, cancelled, as its
                // `import-completed` event told them.
                drop(conn);
                let _ = super::purge_rows(pool, id).await;
                let _ = sqlx::query("DELETE FROM jobs.jobs WHERE id = $1 AND state = 'uploading'")
                    .bind(id)
                    .execute(pool)
                    .await;
            }
            return Err(e);
        }
    };
    if job.is_none() {
        return Err(FileError::NoData.into());
    }
    let too_many = rejected as i64 > req.max_errors;
    // A job failed here ends as any job does: its `import-completed` goes
    // out with the failure.
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let moved: Option<(Option<i64>, Option<Value>)> = sqlx::query_as(&format!(
        "UPDATE jobs.jobs
         SET state = CASE WHEN $5 THEN 'failed' ELSE 'queued' END,
             finished_at = CASE WHEN $5 THEN now() END,
             last_error = CASE WHEN $5 THEN $6 END,
             rows_read = $2, rows_rejected = $3,
             params = params || jsonb_build_object('format', $4::text),
             lease_token = NULL, lease_until = NULL, worker_pid = NULL, updated_at = now()
         WHERE id = $1 AND state = 'uploading'
         RETURNING user_id, CASE WHEN state = 'failed' THEN {} END",
        super::END_DATA
    ))
    .bind(id)
    .bind(lines as i64)
    .bind(rejected as i64)
    .bind(shape.name())
    .bind(too_many)
    .bind(format!(
        "{rejected} rejected rows, more than the {} allowed (maxErrors)",
        req.max_errors
    ))
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((user, Some(data))) = &moved {
        super::announce_end(&mut tx, *user, data.clone()).await?;
    }
    tx.commit().await?;
    // Not moved: no longer 'uploading' (cancelled while it was read, or
    // reaped); the answer says what the row says.
    let now_state: Option<String> = match &moved {
        Some(_) => None,
        None => job_state(&mut *conn, id).await?,
    };
    let moved = u64::from(moved.is_some());
    drop(conn);
    let queued = !too_many && moved == 1;
    if queued {
        super::WAKE.notify_waiters();
    } else {
        super::purge_rows(pool, id).await?;
    }
    Ok(Staged {
        job_id: id,
        shape: Some(shape),
        lines,
        rows,
        rejected,
        queued,
        state: match now_state {
            Some(s) => s,
            None if queued => "queued".into(),
            None if too_many => "failed".into(),
            None => "cancelled".into(),
        },
    })
}

/// Why a line that names its store both by code and by id (`id_too`) is
/// refused, when the two are not one store. The codes are those the stores
/// had at upload. A caller with a scope learns nothing of stores outside
/// it: a code it cannot see is left to the merge, which refuses it as any
/// unknown store, and an id it cannot see beside a code it can is refused
/// as an unknown store would be.
fn code_and_id_differ(
    r: &parse::Row,
    codes: &HashMap<String, i64>,
    scope: Option<&[i64]>,
) -> Option<String> {
    let (Some(code), Some(id)) = (r.store_code.as_deref(), r.id_too) else {
        return None;
    };
    let visible = |s: i64| scope.is_none_or(|sc| sc.contains(&s));
    let of_code = codes.get(code).copied().filter(|s| visible(*s))?;
    if of_code == id {
        return None;
    }
    Some(if visible(id) {
        format!(
            "storeCode {} is store {of_code}, not storeId {id}",
            parse::shown(code)
        )
    } else {
        format!("unknown store {id}, or not one of your stores")
    })
}

async fn create_uploading(
    conn: &mut PgConnection,
    id: i64,
    req: &ImportRequest,
) -> Result<(), StageError> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    if let (Some(user), Some(max)) = (req.user_id, req.max_jobs) {
        super::admit(&mut tx, user, max).await??;
    }
    sqlx::query(
        "INSERT INTO jobs.jobs (id, kind, state, user_id, scope, params, lease_token, lease_until,
                                worker_pid, worker_backend_start)
         VALUES ($5, 'import', 'uploading', $1, $2, $3, gen_random_uuid(),
                 now() + $4 * interval '1 millisecond', pg_backend_pid(),
                 (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()))",
    )
    .bind(req.user_id)
    .bind(&req.scope)
    .bind(json!({"dryRun": req.dry_run, "maxErrors": req.max_errors, "fileName": req.file_name}))
    .bind(req.lease.as_millis() as i64)
    .bind(id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The job's state as its row holds it now (None: no such job).
async fn job_state<'c, E>(e: E, id: i64) -> Result<Option<String>, sqlx::Error>
where
    E: sqlx::PgExecutor<'c>,
{
    sqlx::query_scalar("SELECT state FROM jobs.jobs WHERE id = $1")
        .bind(id)
        .fetch_optional(e)
        .await
}

/// Renews an upload's lease; false when the job is no longer uploading
/// (its user cancelled it, or it was reaped): the rest of the body is not
/// read.
async fn renew_upload(
    conn: &mut PgConnection,
    id: i64,
    lease: Duration,
    read: i64,
) -> Result<bool, sqlx::Error> {
    // The lines read so far show as the job's `rowsRead` while it uploads
    // (it was 0 until the upload ended).
    let renewed = sqlx::query(
        "UPDATE jobs.jobs SET lease_until = clock_timestamp() + $2 * interval '1 millisecond', updated_at = now(),
                              rows_read = greatest(rows_read, $3)
         WHERE id = $1 AND state = 'uploading'",
    )
    .bind(id)
    .bind(lease.as_millis() as i64)
    .bind(read)
    .execute(&mut *conn)
    .await?;
    Ok(renewed.rows_affected() > 0)
}

/// One COPY of staged rows (CSV), committed on its own.
async fn copy_rows(conn: &mut PgConnection, text: Vec<u8>) -> Result<(), sqlx::Error> {
    let mut copy = conn
        .copy_in_raw(
            "COPY jobs.import_rows (job_id, line, day, store_code, store_id, year, month, sales,
                                    customers, transactions, col)
             FROM STDIN WITH (FORMAT csv)",
        )
        .await?;
    copy.send(text).await?;
    copy.finish().await?;
    Ok(())
}

/// What the chunk loop reports after each chunk.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub rows_read: i64,
    pub last_line: i64,
    pub rows_written: i64,
    pub rows_rejected: i64,
    pub chunks: i64,
    pub done: bool,
    pub state: String,
}

/// How a run ended.
#[derive(Debug)]
pub enum Ended {
    /// completed, cancelled or failed (rejected rows past maxErrors).
    Finished(String),
    /// Another worker holds the job now.
    LostLease,
    /// Asked to stop (server shutdown): the job is given back.
    Stopped,
    /// The user who queued the job was disabled or deleted, or lost stores
    /// of its scope (or the admin role), while it ran: the job is given
    /// back, and its next claim fails it or narrows its scope (see
    /// [`super::claim`]).
    AccessChanged,
}

/// The staged rows of a chunk: job `$1`, store-months after `$2..$4` up to
/// `$5..$7` (keys as `jobs.import_rows_key_idx` has them), for the chunk
/// statement and a dry run's removal of the same rows.
macro_rules! chunk_rows {
    () => {
        "job_id = $1
      AND (year, month, coalesce(store_id, hashtext(store_code), 0)) > ($2, $3, $4)
      AND (year, month, coalesce(store_id, hashtext(store_code), 0)) <= ($5, $6, $7)"
    };
}

/// `sql` with the job and the chunk's key range bound as [`chunk_rows`]
/// expects them.
fn chunk_query<'q>(
    sql: &'q str,
    job: i64,
    after: Key,
    end: Key,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sql)
        .bind(job)
        .bind(after.0)
        .bind(after.1)
        .bind(after.2)
        .bind(end.0)
        .bind(end.1)
        .bind(end.2)
}

/// Folds a chunk's staged rows into records (one per store-month, built by
/// `sales.day_records` from the rows sorted once), merges
/// them through `sales.batch_upsert_impl` and reports, in line order, the
/// rows refused: by store (unknown, or outside the scope) and by the merge
/// (each refused record's lines, with its field and reason). Deleting the
/// staged rows is part of the statement: a committed chunk cannot be merged
/// twice. The records go from the aggregate straight into the merge, never
/// to the server and back. Takes the staged rows of the store-months after
/// `$2..$4` up to `$5..$7` (keys as in [`CHUNK_END_SQL`]), the scope
/// (`$8`) and whether the file was NDJSON (`$9`: a refused store is named
/// by its member, `storeCode` or `storeId`, not by a CSV column). Returns (refused rows, rows written, the chunk's last and first
/// line).
const CHUNK_SQL: &str = concat!(
    r#"
WITH d AS (
    DELETE FROM jobs.import_rows WHERE "#,
    chunk_rows!(),
    r#"
    RETURNING line, day, store_code, store_id, year, month, sales, customers, transactions, col
), r AS (
    SELECT d.*, CASE WHEN d.store_code IS NOT NULL THEN sc.id ELSE si.id END AS sid
    FROM d
    LEFT JOIN sales.stores sc ON sc.code = d.store_code
    LEFT JOIN sales.stores si ON si.id = d.store_id AND d.store_code IS NULL
), bad AS (
    SELECT DISTINCT ON (line) line,
           CASE WHEN store_code IS NOT NULL THEN CASE WHEN $9 THEN 'storeCode' ELSE 'store_code' END
                ELSE CASE WHEN $9 THEN 'storeId' ELSE 'store_id' END END AS col,
           -- A caller with a scope is told the same of a store that does
           -- not exist and of one outside the scope: stores it cannot see
           -- stay unseen, as everywhere else.
           CASE WHEN $8::bigint[] IS NULL
                THEN format('unknown store %s', shown)
                ELSE format('unknown store %s, or not one of your stores', shown) END AS reason
    FROM r, LATERAL (
        -- A code is quoted as every refused value is: 40 characters at most.
        SELECT CASE WHEN store_code IS NULL THEN store_id::text
                    WHEN length(store_code) <= 40 THEN quote_literal(store_code)
                    ELSE format('%s... (%s bytes)', quote_literal(left(store_code, 40)),
                                octet_length(store_code)) END AS shown
    ) s
    WHERE sid IS NULL OR ($8::bigint[] IS NOT NULL AND sid <> ALL($8))
    ORDER BY line
), g AS (
    SELECT sid, year, month, array_agg(DISTINCT line) AS lines,
           (row_number() OVER (ORDER BY sid, year, month) - 1)::int AS idx
    FROM r WHERE sid IS NOT NULL AND ($8::bigint[] IS NULL OR sid = ANY($8))
    GROUP BY sid, year, month
), up AS (
    -- One record per (store, year, month), in g's order; within a month
    -- the later line's day replaces the earlier one's.
    SELECT sales.batch_upsert_impl(
               sales.day_records(array_agg(sid), array_agg(year), array_agg(month), array_agg(day),
                                 array_agg(sales::numeric), array_agg(customers::numeric),
                                 array_agg(transactions::numeric)),
               false, false, $8) AS summary
    FROM (SELECT * FROM r WHERE sid IS NOT NULL AND ($8::bigint[] IS NULL OR sid = ANY($8))
          ORDER BY sid, year, month, line, day) o
    HAVING count(*) > 0
), failed AS (
    SELECT (e->>'index')::int AS idx, e->>'field' AS field, e->>'reason' AS reason
    FROM up, jsonb_array_elements(up.summary->'errors') e
)
SELECT (SELECT coalesce(jsonb_agg(x.j ORDER BY x.line), '[]')
        FROM (SELECT line, jsonb_build_object('line', line, 'column', col, 'reason', reason) AS j FROM bad
              UNION ALL
              SELECT l, jsonb_build_object('line', l, 'column', f.field, 'reason', f.reason)
              FROM failed f JOIN g USING (idx), unnest(g.lines) AS l) x),
       (SELECT coalesce(sum(cardinality(lines)), 0)::int8 FROM g
        WHERE EXISTS (SELECT FROM up) AND idx NOT IN (SELECT idx FROM failed)),
       (SELECT max(line) FROM d),
       (SELECT min(line) FROM d),
       (SELECT coalesce((summary->>'errorsOmitted')::int8, 0) FROM up)
"#
);

/// The staged rows' key, as `jobs.import_rows_key_idx` has it: a store-month
/// (year, month, and the store id or a hash of its code).
type Key = (i32, i32, i64);

/// Below every staged row's key.
const START: Key = (i32::MIN, i32::MIN, i64::MIN);

/// The store-month that ends the next chunk: the one holding the chunk's
/// last row (`$5` rows past `$2..$4`), or the last staged one when fewer
/// rows are left (`pick` orders the two, rather than the order in which
/// `UNION ALL` happens to return them). Nothing when no row is left.
const CHUNK_END_SQL: &str = r#"
SELECT year, month, k FROM (
    (SELECT 0 AS pick, year, month, coalesce(store_id, hashtext(store_code), 0) AS k
     FROM jobs.import_rows
     WHERE job_id = $1 AND (year, month, coalesce(store_id, hashtext(store_code), 0)) > ($2, $3, $4)
     ORDER BY year, month, coalesce(store_id, hashtext(store_code), 0)
     OFFSET $5 LIMIT 1)
    UNION ALL
    (SELECT 1, year, month, coalesce(store_id, hashtext(store_code), 0)
     FROM jobs.import_rows
     WHERE job_id = $1 AND (year, month, coalesce(store_id, hashtext(store_code), 0)) > ($2, $3, $4)
     ORDER BY year DESC, month DESC, coalesce(store_id, hashtext(store_code), 0) DESC
     LIMIT 1)
) e
ORDER BY pick
LIMIT 1
"#;

/// How one connection's share of a run ended.
enum LaneEnd {
    /// No staged row is left past the ranges already handed out.
    Drained,
    Cancelled,
    LostLease,
    /// Asked to stop (server shutdown).
    Stopped,
    /// The job's user changed under it (see [`Ended::AccessChanged`]).
    AccessChanged,
    /// Another connection of the run ended it (any end but `Drained`).
    Halted,
    /// The chunk whose rejected rows passed maxErrors; it was rolled back.
    TooManyErrors {
        rejected: Vec<Rejected>,
        end: Key,
        first: Option<i64>,
        last: Option<i64>,
    },
}

/// What the connections of one run share.
struct Lanes<'a, F> {
    job: &'a Claimed,
    state: Option<&'a Arc<AppState>>,
    chunk_lines: u32,
    lease: Duration,
    stop: &'a tokio::sync::watch::Receiver<bool>,
    dry_run: bool,
    max_errors: i64,
    /// Where the next chunk starts (None: nothing left) and its number.
    /// Ranges are handed out one after the other under this lock, so no two
    /// chunks overlap.
    cursor: tokio::sync::Mutex<(Option<Key>, u64)>,
    /// The number of the chunk whose turn it is to commit, and whether the
    /// run is ending (a connection lost the lease, failed, or passed
    /// maxErrors): chunks commit in key order, so a run ends exactly as a
    /// run on one connection would.
    turn: tokio::sync::watch::Sender<(u64, bool)>,
    report: std::sync::Mutex<Report<F>>,
}

struct Report<F> {
    progress: Progress,
    last_notify: Option<Instant>,
    on_progress: F,
}

/// Runs an import job until it ends, calling `on_progress` after every
/// chunk. `conn` is the connection that claimed it (its session is the
/// lease); up to `parallelism - 1` more connections from `pool` merge
/// chunks beside it, each chunk one transaction of its own over a range of
/// store-months no other chunk takes. `state` is absent on the command line
/// (no cache to invalidate).
#[allow(clippy::too_many_arguments)]
pub async fn run<F: FnMut(&Progress) + Send>(
    conn: &mut PgConnection,
    pool: &PgPool,
    job: &Claimed,
    state: Option<&Arc<AppState>>,
    chunk_lines: u32,
    parallelism: usize,
    lease: Duration,
    stop: &tokio::sync::watch::Receiver<bool>,
    on_progress: F,
) -> Result<Ended, sqlx::Error> {
    let lanes = Lanes {
        job,
        state,
        chunk_lines,
        lease,
        stop,
        dry_run: job.params["dryRun"].as_bool().unwrap_or(false),
        max_errors: job.params["maxErrors"].as_i64().unwrap_or(i64::MAX),
        // A run that takes the job over starts from the beginning: what
        // earlier runs merged is no longer staged.
        cursor: tokio::sync::Mutex::new((Some(START), 0)),
        turn: tokio::sync::watch::Sender::new((0, false)),
        report: std::sync::Mutex::new(Report {
            progress: Progress::default(),
            last_notify: None,
            on_progress,
        }),
    };
    // The other connections, as many as the pool gives at once (a busy pool
    // leaves the job to fewer).
    let mut extra = Vec::new();
    for _ in 1..parallelism.max(1) {
        match tokio::time::timeout(Duration::from_secs(1), pool.acquire()).await {
            Ok(Ok(c)) => extra.push(c),
            _ => break,
        }
    }
    let mut running = vec![Box::pin(lane(conn, &lanes))];
    for c in extra.iter_mut() {
        running.push(Box::pin(lane(c, &lanes)));
    }
    let ends = futures_util::future::join_all(running).await;
    drop(extra);
    let mut failed = None;
    let mut error = None;
    let mut outcome = LaneEnd::Drained;
    for end in ends {
        // A chunk past maxErrors is only found at its turn to commit, after
        // every earlier chunk committed: an error on another connection
        // came from a later chunk (or none), so the limit decides the run's
        // end, as it would for a run on one connection.
        let end = match end {
            Ok(end) => end,
            Err(e) => {
                error.get_or_insert(e);
                continue;
            }
        };
        let rank = |e: &LaneEnd| match e {
            LaneEnd::Drained | LaneEnd::Halted => 0,
            LaneEnd::Cancelled => 1,
            LaneEnd::Stopped | LaneEnd::AccessChanged => 2,
            LaneEnd::TooManyErrors { .. } => 3,
            LaneEnd::LostLease => 4,
        };
        if let LaneEnd::TooManyErrors { .. } = end {
            if failed.is_none() {
                failed = Some(end);
                continue;
            }
        }
        if rank(&end) > rank(&outcome) {
            outcome = end;
        }
    }
    if let Some(e) = error {
        if failed.is_none() && !matches!(outcome, LaneEnd::LostLease) {
            return Err(e);
        }
    }
    match (outcome, failed) {
        (LaneEnd::LostLease, _) => Ok(Ended::LostLease),
        (
            _,
            Some(LaneEnd::TooManyErrors {
                rejected,
                end,
                first,
                last,
            }),
        ) => too_many_errors(conn, pool, &lanes, rejected, end, first, last).await,
        (LaneEnd::Stopped, _) => Ok(Ended::Stopped),
        (LaneEnd::AccessChanged, _) => Ok(Ended::AccessChanged),
        (LaneEnd::Cancelled, _) => close(conn, pool, &lanes, "cancelled").await,
        _ => close(conn, pool, &lanes, "completed").await,
    }
}

/// The job row's counts, if the job is still this run's (locked until the
/// transaction ends).
async fn job_progress(
    tx: &mut PgConnection,
    job: &Claimed,
) -> Result<Option<Progress>, sqlx::Error> {
    let row: Option<(i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT rows_read, last_line, rows_written, rows_rejected, chunks
         FROM jobs.jobs WHERE id = $1 AND lease_token = $2::uuid FOR UPDATE",
    )
    .bind(job.id)
    .bind(&job.token)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(row.map(|r| Progress {
        rows_read: r.0,
        last_line: r.1,
        rows_written: r.2,
        rows_rejected: r.3,
        chunks: r.4,
        ..Default::default()
    }))
}

/// Ends the job as completed or cancelled.
async fn close<F: FnMut(&Progress)>(
    conn: &mut PgConnection,
    pool: &PgPool,
    l: &Lanes<'_, F>,
    end: &str,
) -> Result<Ended, sqlx::Error> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let Some(mut p) = job_progress(&mut tx, l.job).await? else {
        return Ok(Ended::LostLease);
    };
    if let Some(u) = l.job.user_id {
        crate::db::set_actor(&mut *tx, u).await?;
    }
    crate::db::set_job(&mut *tx, l.job.id).await?;
    finish(&mut tx, l.job, end, None, &p, l.dry_run).await?;
    let tags = crate::db::write::tx_cache_tags(&mut tx).await?;
    tx.commit().await?;
    p.done = true;
    p.state = end.into();
    report(l, &p);
    invalidate(l.state, tags).await;
    if end == "cancelled" {
        super::purge_rows(pool, l.job.id).await.ok();
    }
    Ok(Ended::Finished(end.into()))
}

/// Fails the job whose chunk passed maxErrors: that chunk wrote nothing,
/// and its rejected rows are kept so the report says why the job stopped.
async fn too_many_errors<F: FnMut(&Progress)>(
    conn: &mut PgConnection,
    pool: &PgPool,
    l: &Lanes<'_, F>,
    rejected: Vec<Rejected>,
    end: Key,
    first: Option<i64>,
    last: Option<i64>,
) -> Result<Ended, sqlx::Error> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let Some(mut p) = job_progress(&mut tx, l.job).await? else {
        return Ok(Ended::LostLease);
    };
    super::record_errors(&mut tx, l.job.id, &rejected).await?;
    p.rows_rejected += distinct_lines(&rejected);
    let why = format!(
        "{} rejected rows, more than the {} allowed (maxErrors); \
         the chunk that passed the limit (store-months up to {}-{:02}, lines {} to {}) wrote nothing",
        p.rows_rejected,
        l.max_errors,
        end.0,
        end.1,
        first.unwrap_or(0),
        last.unwrap_or(0),
    );
    if let Some(u) = l.job.user_id {
        crate::db::set_actor(&mut *tx, u).await?;
    }
    finish(&mut tx, l.job, "failed", Some(&why), &p, l.dry_run).await?;
    tx.commit().await?;
    p.done = true;
    p.state = "failed".into();
    report(l, &p);
    super::purge_rows(pool, l.job.id).await.ok();
    Ok(Ended::Finished("failed".into()))
}

fn distinct_lines(rejected: &[Rejected]) -> i64 {
    rejected
        .iter()
        .map(|r| r.line)
        .collect::<std::collections::BTreeSet<_>>()
        .len() as i64
}

/// Hands `p` to the run's progress callback, never going back on a count
/// (connections commit their chunks in any order).
fn report<F: FnMut(&Progress)>(l: &Lanes<'_, F>, p: &Progress) {
    let mut r = l.report.lock().unwrap_or_else(|e| e.into_inner());
    let q = &mut r.progress;
    q.rows_read = q.rows_read.max(p.rows_read);
    q.last_line = q.last_line.max(p.last_line);
    q.rows_written = q.rows_written.max(p.rows_written);
    q.rows_rejected = q.rows_rejected.max(p.rows_rejected);
    q.chunks = q.chunks.max(p.chunks);
    q.done = p.done;
    q.state = p.state.clone();
    let q = q.clone();
    (r.on_progress)(&q);
}

/// Whether an `import-progress` is due (at most one a second per run).
fn notify_due<F>(l: &Lanes<'_, F>) -> bool {
    let mut r = l.report.lock().unwrap_or_else(|e| e.into_inner());
    if r.last_notify
        .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
    {
        r.last_notify = Some(Instant::now());
        true
    } else {
        false
    }
}

/// One connection's chunks until the staged rows run out or the run ends.
/// A connection that fails, loses the lease, passes maxErrors or finds the
/// job cancelled ends the run: the others roll back the chunk they hold.
/// (Shutdown each connection sees for itself before its next chunk.)
async fn lane<F: FnMut(&Progress)>(
    conn: &mut PgConnection,
    l: &Lanes<'_, F>,
) -> Result<LaneEnd, sqlx::Error> {
    let end = chunks(conn, l).await;
    if matches!(
        end,
        Err(_)
            | Ok(LaneEnd::LostLease)
            | Ok(LaneEnd::TooManyErrors { .. })
            | Ok(LaneEnd::Cancelled)
    ) {
        l.turn.send_modify(|t| t.1 = true);
    }
    end
}

/// How long a merged chunk waits, with its locks held, for its turn to
/// commit before it rolls back and waits without them.
const TURN_WAIT: Duration = Duration::from_millis(250);

/// How many times one chunk is merged again after a deadlock or a
/// serialization failure before the run gives the job back.
const CHUNK_DEADLOCK_TRIES: u32 = 5;

/// Waits until chunk `number` may commit; false when the run is ending.
async fn turn_of<F>(l: &Lanes<'_, F>, number: u64) -> bool {
    let mut turn = l.turn.subscribe();
    let going_on = match turn.wait_for(|t| t.0 == number || t.1).await {
        Ok(t) => !t.1,
        Err(_) => false,
    };
    going_on
}

/// A chunk's merge, not yet committed.
struct Merged {
    /// Rows refused (by store or by the merge), in line order.
    rejected: Vec<Rejected>,
    written: i64,
    /// The chunk's first and last line.
    first: Option<i64>,
    last: Option<i64>,
}

/// Merges the staged rows of the store-months after `after` up to `end` in
/// `tx` (a dry run: inside a savepoint rolled back, then the rows are taken
/// out as a real run does).
async fn merge<F>(
    tx: &mut PgConnection,
    l: &Lanes<'_, F>,
    after: Key,
    end: Key,
) -> Result<Merged, sqlx::Error> {
    let job = l.job;
    if let Some(u) = job.user_id {
        crate::db::set_actor(&mut *tx, u).await?;
    }
    crate::db::set_job(&mut *tx, job.id).await?;
    if l.dry_run {
        sqlx::query("SAVEPOINT dry_run").execute(&mut *tx).await?;
    }
    let row = chunk_query(CHUNK_SQL, job.id, after, end)
        .bind(&job.scope)
        .bind(job.params["format"] == "ndjson")
        .fetch_one(&mut *tx)
        .await?;
    let refused: Value = row.get(0);
    let written: i64 = row.get(1);
    // Lines are counted as written unless their record is listed as
    // refused, and the merge lists 1,000 refusals at most: past that, the
    // count would take refused lines for written ones. The parser checks
    // every line by the merge's rules first, so a chunk does not come
    // near; should they ever differ, the chunk fails rather than
    // miscounting.
    let omitted: Option<i64> = row.get(4);
    if let Some(n @ 1..) = omitted {
        return Err(sqlx::Error::Protocol(format!(
            "the merge refused {n} more records than it lists; the chunk is not counted"
        )));
    }
    if l.dry_run {
        sqlx::query("ROLLBACK TO SAVEPOINT dry_run")
            .execute(&mut *tx)
            .await?;
        chunk_query(
            concat!("DELETE FROM jobs.import_rows WHERE ", chunk_rows!()),
            job.id,
            after,
            end,
        )
        .execute(&mut *tx)
        .await?;
    }
    let mut rejected: Vec<Rejected> = refused
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| Rejected {
            line: b["line"].as_u64().unwrap_or(0),
            column: b["column"].as_str().map(str::to_string),
            reason: b["reason"].as_str().unwrap_or_default().to_string(),
        })
        .collect();
    rejected.sort_by_key(|r| r.line);
    Ok(Merged {
        rejected,
        written,
        // `lastLine` reports the highest line merged so far.
        first: row.get(3),
        last: row.get(2),
    })
}

async fn chunks<F: FnMut(&Progress)>(
    conn: &mut PgConnection,
    l: &Lanes<'_, F>,
) -> Result<LaneEnd, sqlx::Error> {
    let job = l.job;
    let mut size = l.chunk_lines.clamp(1, 2_000) as i64;
    loop {
        if *l.stop.borrow() {
            return Ok(LaneEnd::Stopped);
        }
        if l.turn.borrow().1 {
            return Ok(LaneEnd::Halted);
        }
        // Cancellation and the job's user are read before each chunk; the
        // lease again, under the job row's lock, before the chunk commits.
        let state: Option<(bool, bool)> = sqlx::query_as(
            "SELECT j.cancel_requested,
                    j.user_id IS NOT NULL AND (u.id IS NULL OR coalesce(st.disabled, false)
                        OR (u.role <> 'admin' AND ($3::bigint[] IS NULL OR NOT $3 <@ u.store_ids)))
             FROM jobs.jobs j LEFT JOIN sales.users u ON u.id = j.user_id
                  LEFT JOIN auth.user_state st ON st.user_id = u.id
             WHERE j.id = $1 AND j.lease_token = $2::uuid",
        )
        .bind(job.id)
        .bind(&job.token)
        .bind(&job.scope)
        .fetch_optional(&mut *conn)
        .await?;
        match state {
            None => return Ok(LaneEnd::LostLease),
            Some((true, _)) => return Ok(LaneEnd::Cancelled),
            Some((false, true)) => return Ok(LaneEnd::AccessChanged),
            Some((false, false)) => {}
        }
        let (number, after, end) = {
            let mut cursor = l.cursor.lock().await;
            let (Some(after), number) = *cursor else {
                return Ok(LaneEnd::Drained);
            };
            let end: Option<Key> = sqlx::query_as(CHUNK_END_SQL)
                .bind(job.id)
                .bind(after.0)
                .bind(after.1)
                .bind(after.2)
                .bind(size - 1)
                .fetch_optional(&mut *conn)
                .await?;
            *cursor = (end, number + 1);
            match end {
                Some(end) => (number, after, end),
                None => return Ok(LaneEnd::Drained),
            }
        };
        // Chunks commit in the order their ranges were handed out. Waiting
        // for the turn while holding the chunk's row locks could close a
        // circle Postgres cannot see (a batch that holds a row of an earlier
        // chunk and waits for one of this chunk's), so a chunk that waits
        // long rolls back, waits for its turn without locks, and merges
        // again.
        let mut my_turn = false;
        let mut took;
        let mut deadlocks = 0u32;
        let (mut tx, m) = loop {
            let started = Instant::now();
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            let m = match merge(&mut tx, l, after, end).await {
                Ok(m) => m,
                // A deadlock with another writer (or a serialization
                // failure) rolled the chunk back, and nothing of it is
                // written: merge it again rather than give up the whole run.
                Err(e)
                    if deadlocks < CHUNK_DEADLOCK_TRIES && crate::db::is_transient(&e, false) =>
                {
                    tx.rollback().await?;
                    deadlocks += 1;
                    metrics::counter!("import_chunk_deadlock_retries_total").increment(1);
                    tracing::info!(job = job.id, error = %e, attempt = deadlocks, "import chunk rolled back; merging it again");
                    continue;
                }
                Err(e) => return Err(e),
            };
            took = started.elapsed();
            if my_turn {
                break (tx, m);
            }
            match tokio::time::timeout(TURN_WAIT, turn_of(l, number)).await {
                Ok(true) => break (tx, m),
                Ok(false) => {
                    tx.rollback().await?;
                    return Ok(LaneEnd::Halted);
                }
                Err(_) => {
                    tx.rollback().await?;
                    metrics::counter!("import_chunk_retries_total").increment(1);
                    if !turn_of(l, number).await {
                        return Ok(LaneEnd::Halted);
                    }
                    my_turn = true;
                }
            }
        };
        let Merged {
            rejected,
            written,
            first: chunk_first,
            last: chunk_last,
        } = m;
        let new_rejected = distinct_lines(&rejected);
        // The lease runs from now, not from the start of the chunk's
        // transaction (`now()`), which may lie more than a lease back (a
        // merge that waited for a row): a lease already run out at commit
        // let another worker take the job before the next renewal.
        // The job row is locked from here to COMMIT: the lease token fences
        // out a run that lost the job, and the counts add up whatever order
        // the run's connections commit in. A cancel that committed while
        // the chunk merged (it may wait long for a row another writer
        // holds) is seen here, and nothing of the chunk is written; one
        // that comes later waits for this commit.
        let totals: Option<(i64, i64, i64, i64, i64, bool)> = sqlx::query_as(
            "UPDATE jobs.jobs
             SET last_line = greatest(last_line, $3), rows_written = rows_written + $4,
                 rows_rejected = rows_rejected + $5, chunks = chunks + 1,
                 lease_until = clock_timestamp() + $6 * interval '1 millisecond', updated_at = now()
             WHERE id = $1 AND lease_token = $2::uuid
             RETURNING rows_read, last_line, rows_written, rows_rejected, chunks, cancel_requested",
        )
        .bind(job.id)
        .bind(&job.token)
        .bind(chunk_last.unwrap_or(0))
        .bind(written)
        .bind(new_rejected)
        .bind(l.lease.as_millis() as i64)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(t) = totals else {
            tx.rollback().await?;
            return Ok(LaneEnd::LostLease);
        };
        if t.5 {
            tx.rollback().await?;
            return Ok(LaneEnd::Cancelled);
        }
        if t.3 > l.max_errors {
            // Nothing of this chunk is written.
            tx.rollback().await?;
            return Ok(LaneEnd::TooManyErrors {
                rejected,
                end,
                first: chunk_first,
                last: chunk_last,
            });
        }
        super::record_errors(&mut tx, job.id, &rejected).await?;
        let p = Progress {
            rows_read: t.0,
            last_line: t.1,
            rows_written: t.2,
            rows_rejected: t.3,
            chunks: t.4,
            done: false,
            state: "running".into(),
        };
        if let Some(u) = job.user_id {
            if notify_due(l) {
                super::notify_user(&mut tx, u, "import-progress", progress_data(job, &p)).await?;
            }
        }
        let tags = crate::db::write::tx_cache_tags(&mut tx).await?;
        tx.commit().await?;
        l.turn.send_modify(|t| t.0 += 1);
        report(l, &p);
        invalidate(l.state, tags).await;
        // Merges aim at a few hundred milliseconds: no transaction holds
        // rows, locks or event delivery for much longer than that (plus
        // TURN_WAIT at most).
        if took < Duration::from_millis(250) {
            size = (size * 2).min(l.chunk_lines as i64);
        } else if took > Duration::from_millis(700) {
            size = (size / 2).max(1);
        }
    }
}

async fn invalidate(state: Option<&Arc<AppState>>, tags: Vec<String>) {
    if let Some(s) = state {
        if !tags.is_empty() {
            s.publish(crate::db::Changes::from_tags(tags)).await;
        }
    }
}

pub fn progress_data(job: &Claimed, p: &Progress) -> Value {
    let percent = if p.rows_read > 0 {
        ((p.rows_written + p.rows_rejected) as f64 * 1000.0 / p.rows_read as f64).round() / 10.0
    } else {
        100.0
    };
    json!({
        "jobId": job.id, "kind": job.kind, "state": if p.state.is_empty() { "running" } else { &p.state },
        "rowsRead": p.rows_read, "rowsWritten": p.rows_written, "rowsRejected": p.rows_rejected,
        "lastLine": p.last_line, "percent": percent.min(100.0), "done": p.done,
    })
}

/// Ends the job in the caller's transaction and announces it: a stored
/// `import-completed` event for the importing user (replayed on resume),
/// and a final `import-progress`. `lastError` becomes `error`: a job that
/// completes (or is cancelled) after a lost worker or a failed attempt
/// shows no stale error (`attempts` still tells it was taken again).
async fn finish(
    tx: &mut PgConnection,
    job: &Claimed,
    end: &str,
    error: Option<&str>,
    p: &Progress,
    dry_run: bool,
) -> Result<(), sqlx::Error> {
    let result = json!({
        "rowsRead": p.rows_read, "rowsWritten": p.rows_written, "rowsRejected": p.rows_rejected,
        "dryRun": dry_run,
    });
    sqlx::query(
        "UPDATE jobs.jobs
         SET state = $3, last_error = $4, result = $5,
             rows_written = $6, rows_rejected = $7, finished_at = now(), updated_at = now(),
             lease_token = NULL, lease_until = NULL, worker_pid = NULL
         WHERE id = $1 AND lease_token = $2::uuid",
    )
    .bind(job.id)
    .bind(&job.token)
    .bind(end)
    .bind(error)
    .bind(&result)
    .bind(p.rows_written)
    .bind(p.rows_rejected)
    .execute(&mut *tx)
    .await?;
    let mut done = p.clone();
    done.done = true;
    done.state = end.to_string();
    let mut data = progress_data(job, &done);
    data["error"] = json!(error);
    super::announce_end(tx, job.user_id, data).await
}
