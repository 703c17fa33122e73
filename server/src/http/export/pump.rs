//! The export task: one COPY on a read connection, rows framed and
//! coalesced into chunks, compressed on the fly and handed to the response
//! through a bounded channel; cancelled and cleaned up however it ends.

use super::format::{ExportFormat, ExportShape};
use super::progress::{notify_progress, RunState, Snapshot};
use super::sql::ExportSql;
use super::{CHUNK, EXPORT_STALL_TIMEOUT};
use crate::http::compress::{Compressor, Encoding};
use crate::http::error::ApiError;
use crate::state::AppState;
use bytes::Bytes;
use futures_util::StreamExt;
use sqlx::pool::PoolConnection;
use sqlx::{Executor, Postgres};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

pub(super) struct Job {
    pub(super) sql: ExportSql,
    pub(super) format: ExportFormat,
    pub(super) shape: ExportShape,
    pub(super) encoding: Encoding,
    pub(super) level: u32,
    pub(super) header: bool,
    pub(super) state: Arc<AppState>,
    pub(super) user_id: i64,
    /// The caller, checked against revocations as the export goes on.
    pub(super) principal: crate::auth::Principal,
    pub(super) export_id: String,
    /// The HTTP/1.1 connection to break if the export fails mid-stream.
    pub(super) break_on_failure: Option<(poem::web::LocalAddr, poem::web::RemoteAddr)>,
    /// Set once every row was sent: until then the body ends in an error
    /// (see [`body`]).
    pub(super) complete: Arc<AtomicBool>,
}

/// The response body: what the pump sends, then, unless the pump marked
/// the export complete, an error, so that a body that ends early is a
/// broken transfer (HTTP/2 resets the stream), never a short file, even
/// when the pump could not queue its own error (a client that stopped
/// reading has a full queue).
pub(super) fn body(rx: mpsc::Receiver<io::Result<Bytes>>, complete: Arc<AtomicBool>) -> poem::Body {
    let end = futures_util::stream::once(async move {
        (!complete.load(Ordering::Acquire)).then(|| Err(io::Error::other("export cut short")))
    })
    .filter_map(|e| async move { e });
    poem::Body::from_bytes_stream(tokio_stream::wrappers::ReceiverStream::new(rx).chain(end))
}

/// Why an export stopped early.
pub(super) enum Stop {
    /// The client went away.
    Cancelled(&'static str),
    /// The client stopped reading for EXPORT_STALL_TIMEOUT: its connection
    /// is still open, so the transfer is cut like a failed one.
    Stalled,
    /// The caller's access ended while the export ran (disabled, deleted,
    /// scope or session changed): the transfer is cut.
    Revoked(crate::access::Revoked),
    Db(sqlx::Error),
    Io(io::Error),
    /// EXPORT_MAX_DURATION reached (a client reading just fast enough to
    /// escape the stall timeout would otherwise hold a slot and a snapshot
    /// for as long as it likes).
    Expired,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Cancelled(why) => f.write_str(why),
            Stop::Stalled => f.write_str("client stopped reading"),
            Stop::Revoked(why) => write!(f, "access ended: {}", why.message()),
            Stop::Db(e) => write!(f, "database: {e}"),
            Stop::Io(e) => write!(f, "encoding: {e}"),
            Stop::Expired => f.write_str("EXPORT_MAX_DURATION reached"),
        }
    }
}

impl From<sqlx::Error> for Stop {
    fn from(e: sqlx::Error) -> Self {
        Stop::Db(e)
    }
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Stop::Io(e)
    }
}

pub(super) type Started = oneshot::Sender<Result<u64, ApiError>>;

/// The export task: owns the connection, streams, and always leaves the
/// connection clean (committed and pooled, or cancelled and closed).
/// Held for as long as the export runs (EXPORT_MAX_CONCURRENT,
/// EXPORT_MAX_PER_USER), and released before the body ends: a client that
/// has read the whole export may start the next one at once.
pub(super) struct Slots {
    pub(super) _slot: crate::http::slots::Slot,
}

pub(super) async fn run(
    job: Job,
    slots: Slots,
    tx: mpsc::Sender<io::Result<Bytes>>,
    started: Started,
) {
    let mut slots = Some(slots);
    let begun = Instant::now();
    metrics::gauge!("exports_running").increment(1.0);
    let _running = scopeguard(|| metrics::gauge!("exports_running").decrement(1.0));
    let (progress_tx, progress_rx) = watch::channel(Snapshot::default());
    let notifier = tokio::spawn(
        notify_progress(
            job.state.pool.clone(),
            job.user_id,
            job.export_id.clone(),
            job.format,
            job.shape,
            progress_rx,
        )
        .instrument(tracing::Span::current()),
    );
    let mut pid: Option<Backend> = None;
    let mut started = Some(started);
    let mut bytes_out: u64 = 0;
    let mut attempt = 0u32;
    let (conn, outcome) = loop {
        // A replica when one is configured and has caught up, else the primary.
        let mut conn = match job.state.read_conn().await {
            Ok(c) => c,
            Err(e) => {
                if let Some(s) = started.take() {
                    let _ = s.send(Err(ApiError::from(e)));
                }
                progress_tx
                    .send_modify(|s| s.state = RunState::Failed("database unavailable".into()));
                drop(progress_tx);
                let _ = notifier.await;
                return;
            }
        };
        let outcome = {
            let work = stream(
                &mut conn,
                &job,
                &tx,
                &mut started,
                &mut pid,
                &progress_tx,
                &mut bytes_out,
            );
            tokio::select! {
                r = work => r,
                _ = tx.closed() => Err(Stop::Cancelled("client disconnected")),
                _ = tokio::time::sleep(job.state.config.export_max_duration) => Err(Stop::Expired),
            }
        };
        // A connection lost before the response started (Postgres restarted,
        // the backend terminated) is tried again on another: nothing has
        // reached the client yet, and the export reads in a snapshot of its
        // own, so starting over gives the same answer a first try would.
        if let Err(Stop::Db(e)) = &outcome {
            crate::db::broken_connection(e);
            if started.is_some() && attempt < 3 && crate::db::is_broken_connection(e) {
                tracing::warn!(export_id = %job.export_id, attempt = attempt + 1, error = %e,
                    "export lost its database connection before starting; retrying");
                discard(conn, pid.take(), &job.state).await;
                tokio::time::sleep(Duration::from_millis(25 << attempt)).await;
                attempt += 1;
                continue;
            }
        }
        break (conn, outcome);
    };
    let rows = progress_tx.borrow().rows;
    let status = match &outcome {
        Ok(()) => "completed",
        Err(Stop::Cancelled(_) | Stop::Stalled) => "cancelled",
        Err(_) => "failed",
    };
    metrics::counter!("exports_total", "format" => job.format.name(), "shape" => job.shape.name(), "status" => status)
        .increment(1);
    metrics::counter!("export_rows_total", "format" => job.format.name()).increment(rows);
    metrics::counter!("export_bytes_total", "format" => job.format.name()).increment(bytes_out);
    match outcome {
        Ok(()) => {
            job.complete.store(true, Ordering::Release);
            // Committed: the connection goes back to the pool.
            drop(conn);
            progress_tx.send_modify(|s| s.state = RunState::Completed);
            tracing::info!(
                export_id = %job.export_id, rows, bytes = bytes_out,
                elapsed_ms = begun.elapsed().as_millis() as u64, "export completed"
            );
        }
        Err(stop) => {
            discard(conn, pid, &job.state).await;
            let state = match &stop {
                Stop::Cancelled(why) => {
                    // The connection closed during a shutdown: the server cut
                    // it (SHUTDOWN_TIMEOUT), not the client.
                    let why = if *why == "client disconnected" && job.state.hub.is_shutting_down() {
                        "the server shut down (SHUTDOWN_TIMEOUT ran out)"
                    } else {
                        why
                    };
                    tracing::info!(export_id = %job.export_id, rows, reason = why, "export cancelled");
                    RunState::Cancelled
                }
                Stop::Stalled => {
                    tracing::info!(export_id = %job.export_id, rows, reason = "client stopped reading", "export cancelled");
                    RunState::Cancelled
                }
                Stop::Revoked(why) => {
                    tracing::info!(export_id = %job.export_id, rows, reason = why.message(), "export stopped: access ended");
                    RunState::Failed(format!("access ended: {}", why.message()))
                }
                Stop::Expired => {
                    tracing::warn!(export_id = %job.export_id, rows, "export stopped at EXPORT_MAX_DURATION");
                    RunState::Failed("the export took longer than EXPORT_MAX_DURATION".into())
                }
                other => {
                    tracing::error!(export_id = %job.export_id, rows, error = %other, "export failed");
                    RunState::Failed("the export failed; see the server log".into())
                }
            };
            match started.take() {
                // Nothing sent yet: the handler answers with an error status.
                Some(s) => {
                    let err = match stop {
                        Stop::Db(e) => ApiError::from(e),
                        Stop::Expired => ApiError::unavailable(
                            "the export did not start within EXPORT_MAX_DURATION",
                        ),
                        other => ApiError::internal(other),
                    };
                    let _ = s.send(Err(err));
                }
                // Mid-stream: end the body with an error, so the client sees
                // a broken transfer rather than a short file.
                None => {
                    // The slots go now: a client that does not read must
                    // not hold them while the abort waits for room.
                    drop(slots.take());
                    if !matches!(stop, Stop::Cancelled(_)) {
                        // Nothing more reaches the client, not even the
                        // last chunk: the transfer is cut, never short.
                        if let Some((local, remote)) = &job.break_on_failure {
                            crate::listener::break_connection(local, remote);
                        }
                        let abort = tx.send(Err(io::Error::other("export failed")));
                        let _ = tokio::time::timeout(EXPORT_STALL_TIMEOUT, abort).await;
                    }
                }
            }
            progress_tx.send_modify(|s| s.state = state);
        }
    }
    drop(progress_tx);
    drop(slots.take());
    // The response ends now; the last progress NOTIFY follows on its own.
    drop(tx);
    let _ = notifier.await;
}

/// Runs `f` when dropped (also when the task panics).
pub(super) fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// The server process behind a connection: its pid and start time, which
/// together name it unambiguously on whichever server (primary or replica)
/// it runs.
pub(super) type Backend = (i32, chrono::DateTime<chrono::Utc>);

/// A connection whose COPY may still be running: cancel the query from
/// another connection and close this one (never back to the pool). The
/// session also has `client_connection_check_interval` set, so the server
/// stops on its own once the socket is gone, even mid-sort.
pub(super) async fn discard(
    conn: PoolConnection<Postgres>,
    backend: Option<Backend>,
    state: &AppState,
) {
    let raw = conn.detach();
    if let Some((pid, started)) = backend {
        // The connection came from the replica or the primary: ask both; the
        // start time makes sure only this session is cancelled.
        let mut pools = vec![state.pool.clone()];
        if state.config.database_replica_url.is_some() {
            pools.push(state.read_pool());
        }
        for pool in pools {
            let cancel = sqlx::query(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE pid = $1 AND backend_start = $2",
            )
            .bind(pid)
            .bind(started)
            .execute(&pool);
            if let Err(e) = tokio::time::timeout(Duration::from_secs(5), cancel)
                .await
                .unwrap_or(Err(sqlx::Error::PoolTimedOut))
            {
                tracing::warn!(pid, error = %e, "could not cancel the export query; closing its connection");
            }
        }
    }
    // Closing the session ends (rolls back) its transaction.
    let _ = tokio::time::timeout(Duration::from_secs(5), sqlx::Connection::close(raw)).await;
}

pub(super) async fn send(
    tx: &mpsc::Sender<io::Result<Bytes>>,
    data: Bytes,
    bytes_out: &mut u64,
) -> Result<(), Stop> {
    if data.is_empty() {
        return Ok(());
    }
    let n = data.len() as u64;
    match tokio::time::timeout(EXPORT_STALL_TIMEOUT, tx.send(Ok(data))).await {
        Ok(Ok(())) => {
            *bytes_out += n;
            Ok(())
        }
        Ok(Err(_)) => Err(Stop::Cancelled("client disconnected")),
        Err(_) => Err(Stop::Stalled),
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn stream(
    conn: &mut PoolConnection<Postgres>,
    job: &Job,
    tx: &mpsc::Sender<io::Result<Bytes>>,
    started: &mut Option<Started>,
    pid: &mut Option<Backend>,
    progress: &watch::Sender<Snapshot>,
    bytes_out: &mut u64,
) -> Result<(), Stop> {
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await?;
    // The backend is known before the count runs: the count may wait on a
    // lock, and an export stopped then must cancel it (`discard`).
    let backend: (i32, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
        "SELECT pg_backend_pid(), \
         (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid())",
    )
    .fetch_one(&mut **conn)
    .await?;
    *pid = Some(backend);
    let total: i64 = sqlx::query_scalar(&job.sql.count)
        .persistent(false)
        .fetch_one(&mut **conn)
        .await?;
    let total = total.max(0) as u64;
    // The COPY may run longer than DB_QUERY_TIMEOUT; the transaction-local
    // settings end with it.
    conn.execute(
        "SET LOCAL statement_timeout = 0; \
         SET LOCAL idle_in_transaction_session_timeout = '60s'; \
         SET LOCAL client_connection_check_interval = '1s'",
    )
    .await?;
    let mut rows = conn.copy_out_raw(&job.sql.copy).await?;
    // The query is planned and running: answer 200 and start the body.
    match started.take() {
        Some(s) => {
            if s.send(Ok(total)).is_err() {
                return Err(Stop::Cancelled("client disconnected"));
            }
        }
        None => return Err(Stop::Cancelled("client disconnected")),
    }
    progress.send_modify(|s| s.total = Some(total));

    let mut enc = Compressor::new(job.encoding, job.level)?;
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK + 4096);
    let mut count: u64 = 0;
    let mut header_pending = job.format == ExportFormat::Csv && job.header;
    if job.format == ExportFormat::Json {
        buf.extend_from_slice(b"[");
    }
    while let Some(msg) = rows.next().await {
        let msg = msg?;
        let line = msg.strip_suffix(b"\n").unwrap_or(&msg);
        match job.format {
            ExportFormat::Csv => {
                buf.extend_from_slice(line);
                buf.extend_from_slice(b"\r\n");
                if header_pending {
                    header_pending = false;
                } else {
                    count += 1;
                }
            }
            ExportFormat::Ndjson => {
                buf.extend_from_slice(line);
                buf.push(b'\n');
                count += 1;
            }
            ExportFormat::Json => {
                buf.extend_from_slice(if count == 0 { b"\n" } else { b",\n" });
                buf.extend_from_slice(line);
                count += 1;
            }
        }
        if buf.len() >= CHUNK {
            still_allowed(job)?;
            let chunk = std::mem::replace(&mut buf, Vec::with_capacity(CHUNK + 4096));
            send(tx, enc.encode(chunk)?, bytes_out).await?;
            progress.send_modify(|s| s.rows = count);
        }
    }
    drop(rows);
    conn.execute("COMMIT").await?;
    if job.format == ExportFormat::Json {
        buf.extend_from_slice(if count == 0 { b"]\n" } else { b"\n]\n" });
    }
    still_allowed(job)?;
    let tail = enc.encode(buf)?;
    send(tx, tail, bytes_out).await?;
    send(tx, enc.finish()?, bytes_out).await?;
    progress.send_modify(|s| s.rows = count);
    Ok(())
}

/// Whether the caller still has access, as a request would be judged now
/// (checked from memory before each chunk): a user disabled, deleted or
/// given another scope while their export runs gets no more of it.
fn still_allowed(job: &Job) -> Result<(), Stop> {
    job.state
        .auth
        .revocations()
        .check_token(&job.principal)
        .map_err(Stop::Revoked)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a body to its end: the bytes, and whether it ended in an error.
    async fn read(body: poem::Body) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut stream = body.into_bytes_stream();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(b) => out.extend_from_slice(&b),
                Err(_) => return (out, true),
            }
        }
        (out, false)
    }

    #[tokio::test]
    async fn a_body_ends_cleanly_only_once_marked_complete() {
        for complete in [false, true] {
            let (tx, rx) = mpsc::channel(4);
            let flag = Arc::new(AtomicBool::new(false));
            let body = body(rx, flag.clone());
            tx.send(Ok(Bytes::from_static(b"a,b\r\n"))).await.unwrap();
            flag.store(complete, Ordering::Release);
            drop(tx);
            let (bytes, failed) = read(body).await;
            assert_eq!(bytes, b"a,b\r\n");
            assert_eq!(failed, !complete, "complete: {complete}");
        }
    }
}
