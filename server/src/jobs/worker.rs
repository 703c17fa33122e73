//! JOB_WORKERS tasks per instance, each taking one job at a time.

use super::{import, Claimed};
use crate::state::AppState;
use std::sync::Arc;
use std::time::Duration;

/// Idle workers look for jobs queued by other instances this often (this
/// instance's own jobs wake them at once).
const POLL: Duration = Duration::from_millis(500);

pub struct Workers {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Workers {
    pub fn spawn(state: Arc<AppState>) -> Self {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let name = format!(
            "{}:{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "sales-server".into()),
            std::process::id()
        );
        let last_prune: LastPrune = Default::default();
        let tasks = (0..state.config.job_workers)
            .map(|i| {
                let (state, rx, name) = (state.clone(), rx.clone(), format!("{name}/{i}"));
                let last_prune = last_prune.clone();
                tokio::spawn(async move { work(state, rx, name, last_prune).await })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Workers finish their current chunk and give their jobs back.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn work(
    state: Arc<AppState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    name: String,
    last_prune: LastPrune,
) {
    let mut failures = 0u32;
    while !*stop.borrow() {
        match once(&state, &stop, &name, &last_prune).await {
            Ok(true) => {
                failures = 0;
                continue;
            }
            Ok(false) => failures = 0,
            Err(e) => {
                failures = (failures + 1).min(6);
                tracing::warn!(worker = %name, error = %e, "job worker: database error");
            }
        }
        let wait = POLL * (1 << failures.min(4));
        tokio::select! {
            _ = super::WAKE.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Finished jobs are kept as long as events (EVENT_RETENTION), then removed
/// by whichever worker comes by first after a minute since the last time.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
type LastPrune = Arc<std::sync::Mutex<PruneState>>;

/// The workers' last prune: when, and the job ids whose staged rows its
/// sweep found without a job row (see [`sweep_staged_rows`]).
#[derive(Default)]
struct PruneState {
    at: Option<std::time::Instant>,
    absent: std::collections::HashSet<i64>,
}

async fn prune(state: &Arc<AppState>, last: &LastPrune) -> Result<(), sqlx::Error> {
    let mut absent = {
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        if last.at.is_some_and(|t| t.elapsed() < PRUNE_EVERY) {
            return Ok(());
        }
        last.at = Some(std::time::Instant::now());
        std::mem::take(&mut last.absent)
    };
    let n = sqlx::query(
        "DELETE FROM jobs.jobs
         WHERE state IN ('completed', 'failed', 'cancelled')
           AND finished_at < now() - $1 * interval '1 second'",
    )
    .bind(state.config.event_retention.as_secs() as f64)
    .execute(&state.pool)
    .await?
    .rows_affected();
    if n > 0 {
        tracing::info!(jobs = n, "finished jobs past EVENT_RETENTION removed");
    }
    let swept = sweep_staged_rows(&state.pool, &mut absent).await;
    last.lock().unwrap_or_else(|e| e.into_inner()).absent = absent;
    swept?;
    Ok(())
}

/// Deletes the staged rows of jobs that are over, and of job ids with no
/// job row that `absent` (this worker's last sweep) found absent already. A
/// job's end commits first and purges its staged rows after, as a step of
/// its own (a cancel in the background): a server that dies, or a purge
/// that fails, in between left them for good. Rows of an id with no job
/// row get a sweep's grace (a minute), for whatever stages rows before it
/// queues their job. The job ids staged rows belong to are read by skipping
/// along the staged rows' index (a few index probes per job, not a scan of
/// every row). Returns how many jobs' rows went.
pub async fn sweep_staged_rows(
    pool: &sqlx::PgPool,
    absent: &mut std::collections::HashSet<i64>,
) -> Result<u64, sqlx::Error> {
    let found: Vec<(i64, bool)> = sqlx::query_as(
        "WITH RECURSIVE staged(id) AS (
             (SELECT job_id FROM jobs.import_rows ORDER BY job_id LIMIT 1)
             UNION ALL
             SELECT (SELECT r.job_id FROM jobs.import_rows r WHERE r.job_id > s.id
                     ORDER BY r.job_id LIMIT 1)
             FROM staged s WHERE s.id IS NOT NULL)
         SELECT s.id, j.id IS NULL FROM staged s LEFT JOIN jobs.jobs j ON j.id = s.id
         WHERE s.id IS NOT NULL
           AND (j.id IS NULL OR j.state NOT IN ('uploading', 'queued', 'running'))",
    )
    .fetch_all(pool)
    .await?;
    let mut over = Vec::new();
    let mut now_absent = std::collections::HashSet::new();
    for (id, missing) in found {
        if !missing || absent.contains(&id) {
            over.push(id);
        } else {
            now_absent.insert(id);
        }
    }
    *absent = now_absent;
    if over.is_empty() {
        return Ok(0);
    }
    // A bounded slice per statement, as a job's own purge deletes them.
    for id in &over {
        super::purge_rows(pool, *id).await?;
    }
    tracing::info!(jobs = ?over, "staged rows of ended jobs removed");
    Ok(over.len() as u64)
}

/// Takes and runs one job; false when there was none.
async fn once(
    state: &Arc<AppState>,
    stop: &tokio::sync::watch::Receiver<bool>,
    name: &str,
    last_prune: &LastPrune,
) -> Result<bool, sqlx::Error> {
    super::reap_uploads(&state.pool).await?;
    prune(state, last_prune).await?;
    // The job's connection stays with it: its session is the lease.
    let mut conn = state.pool.acquire().await?;
    let lease = state.config.job_lease;
    let Some(job) = super::claim(&mut conn, name, lease, None).await? else {
        return Ok(false);
    };
    if job.user_gone {
        tracing::info!(
            job = job.id,
            "job not run: its user was deleted or disabled"
        );
        drop(conn);
        super::fail(
            &state.pool,
            &job,
            "the user who queued this job was deleted or disabled",
        )
        .await?;
        return Ok(true);
    }
    tracing::info!(job = job.id, kind = %job.kind, attempt = job.attempts, worker = name, "job started");
    let beat = heartbeat(state.pool.clone(), job.id, job.token.clone(), lease);
    let outcome = run_claimed(&mut conn, state, &job, stop).await;
    drop(beat);
    match outcome {
        Ok(end) => tracing::info!(job = job.id, end = %end, "job ended"),
        Err(e) => {
            tracing::warn!(job = job.id, error = %e, "job failed; given back");
            // A connection lost (Postgres restarted, the backend ended):
            // the pool checks every connection before handing it out for a
            // while, so the give-back and the next attempt do not take
            // another dead one that was idle less than a second.
            crate::db::broken_connection(&e);
            drop(conn);
            release_retried(state, &job, &e.to_string()).await?;
        }
    }
    Ok(true)
}

/// Gives a failed job back, trying again (up to three more times, on a
/// fresh connection) when the give-back itself meets a lost connection or
/// a conflict: left undone, the job would stay `running` until its lease
/// ran out. Trying again is safe: the give-back changes the job only while
/// it still holds this run's lease token.
async fn release_retried(
    state: &Arc<AppState>,
    job: &super::Claimed,
    error: &str,
) -> Result<(), sqlx::Error> {
    let mut wait = std::time::Duration::from_millis(50);
    let mut tries = 1;
    loop {
        match super::release(&state.pool, job, Some(error)).await {
            Err(e) if tries <= 3 && crate::db::is_transient(&e, true) => {
                crate::db::broken_connection(&e);
                tracing::warn!(job = job.id, error = %e, "could not give the job back; trying again");
                tokio::time::sleep(wait).await;
                wait *= 2;
                tries += 1;
            }
            other => return other,
        }
    }
}

/// Renews the job's lease every third of it while this process runs the
/// job, from a connection of its own: a chunk that waits (for a row lock a
/// writer holds, for its turn, for a connection) is not a lost worker, and
/// taking its job over would only have it fail as one after three
/// attempts. A process that dies stops renewing, and its job is taken
/// again once the lease runs out. The renewal skips a job row locked at
/// that moment (by the chunk committing, which renews it itself).
pub(crate) fn heartbeat(
    pool: sqlx::PgPool,
    id: i64,
    token: String,
    lease: std::time::Duration,
) -> Heartbeat {
    Heartbeat(tokio::spawn(async move {
        let mut every =
            tokio::time::interval((lease / 3).max(std::time::Duration::from_millis(10)));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            every.tick().await;
            let renewed = sqlx::query(
                "UPDATE jobs.jobs SET lease_until = now() + $3 * interval '1 millisecond'
                 WHERE id = (SELECT id FROM jobs.jobs
                             WHERE id = $1 AND lease_token = $2::uuid AND state = 'running'
                             FOR UPDATE SKIP LOCKED)",
            )
            .bind(id)
            .bind(&token)
            .bind(lease.as_millis() as i64)
            .execute(&pool)
            .await;
            if let Err(e) = renewed {
                tracing::warn!(job = id, error = %e, "could not renew the job's lease");
            }
        }
    }))
}

/// The renewing task of [`heartbeat`], stopped when this is dropped: also
/// when the job's run panics, which would otherwise leave its lease renewed
/// for as long as the process lives.
pub(crate) struct Heartbeat(tokio::task::JoinHandle<()>);

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs a claimed job to its end on `conn`.
pub async fn run_claimed(
    conn: &mut sqlx::PgConnection,
    state: &Arc<AppState>,
    job: &Claimed,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<String, sqlx::Error> {
    match job.kind.as_str() {
        "batch" => Ok(super::batch::run(conn, job, Some(state))
            .await?
            .unwrap_or_else(|| "taken by another worker".into())),
        _ => {
            let ended = import::run(
                conn,
                &state.pool,
                job,
                Some(state),
                state.config.import_chunk_lines,
                state.config.import_parallelism,
                state.config.job_lease,
                stop,
                |_| {},
            )
            .await?;
            Ok(match ended {
                import::Ended::Finished(s) => s,
                import::Ended::LostLease => "taken by another worker".into(),
                import::Ended::Stopped => {
                    super::release(&state.pool, job, None).await?;
                    "given back at shutdown".into()
                }
                import::Ended::AccessChanged => {
                    super::release(&state.pool, job, None).await?;
                    "given back: its user's access changed".into()
                }
            })
        }
    }
}
