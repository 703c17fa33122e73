//! `sales-server import FILE`: stages the file as a job and runs it in this
//! process with a progress bar. Interrupted (Ctrl-C), the job is given back
//! to the queue and any server's workers finish it.

use super::import::{self, ImportRequest};
use super::parse::Requested;
use crate::config::Config;
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The file: an export CSV (daily or monthly shape), a POS daily CSV, or NDJSON records.
    pub file: std::path::PathBuf,
    /// auto (from the header), daily, monthly or ndjson.
    #[arg(long, default_value = "auto", value_parser = ["auto", "daily", "monthly", "ndjson"])]
    pub format: String,
    /// Check and count every row; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Fail the job once more rows than this are rejected (0 to 100,000,000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(0..=100_000_000))]
    pub max_errors: i64,
}

/// Counts the bytes read, for the progress bar.
struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Checks the arguments before the command touches the database: the file
/// exists and is not a directory, and a regular file can be opened. A pipe
/// (`<(zcat sales.csv.gz)`, `/dev/stdin`, a named pipe) is not opened
/// here: opening it twice would give what its writer sends to this check,
/// and leave the import waiting for a writer that already left.
pub fn check(args: &ImportArgs) -> anyhow::Result<()> {
    let shown = |e: std::io::Error| anyhow::anyhow!("{}: {e}", args.file.display());
    let meta = std::fs::metadata(&args.file).map_err(shown)?;
    if meta.is_dir() {
        anyhow::bail!("{}: is a directory, not a file", args.file.display());
    }
    if meta.is_file() {
        std::fs::File::open(&args.file).map_err(shown)?;
    }
    Ok(())
}

/// Returns the job's end state.
pub async fn import(pool: &PgPool, config: &Config, args: &ImportArgs) -> anyhow::Result<String> {
    let started = Instant::now();
    let file = std::fs::File::open(&args.file)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let read = Arc::new(AtomicU64::new(0));
    let bar = ProgressBar::new(size);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message("reading");
    let ticker = {
        let (bar, read) = (bar.clone(), read.clone());
        tokio::spawn(async move {
            loop {
                bar.set_position(read.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let job_id: i64 = sqlx::query_scalar("SELECT nextval('jobs.jobs_id_seq')")
        .fetch_one(pool)
        .await?;
    let req = ImportRequest {
        requested: Requested::parse(&args.format).unwrap_or(Requested::Auto),
        dry_run: args.dry_run,
        max_errors: args.max_errors,
        user_id: None,
        scope: None,
        file_name: args
            .file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned()),
        lease: config.job_lease,
        max_jobs: None,
        job_id: Some(job_id),
    };
    let stage = import::stage(
        pool,
        Counting {
            inner: file,
            read: read.clone(),
        },
        &req,
    );
    tokio::pin!(stage);
    // Ctrl-C while the file is read: the upload is cancelled (the reader
    // stops at its next line, its staged rows go) and nothing is written. A
    // reader blocked on a pipe whose writer sends nothing stops only when
    // the writer does: a second Ctrl-C leaves at once.
    let mut interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut interrupted = false;
    let staged = loop {
        tokio::select! {
            staged = &mut stage => break Some(staged),
            _ = interrupts.recv() => {
                if interrupted {
                    break None;
                }
                interrupted = true;
                bar.set_message("stopping");
                crate::say!("stopping: job {job_id} is cancelled (Ctrl-C again to leave at once)");
                let _ = super::cancel(pool, job_id, None).await;
            }
        }
    };
    ticker.abort();
    if interrupted {
        bar.abandon();
        // A Ctrl-C before the job's row existed found nothing to cancel,
        // and the file may have been staged whole: cancelled now, and its
        // staged rows removed (also when the reader was left behind), when
        // no job can use them: the job is cancelled, or has no row. A job
        // a server's worker holds, or one the cancel could not reach, keeps
        // them: its run (or its end) purges them.
        let unused = match super::cancel(pool, job_id, None).await {
            Ok(None) => true,
            Ok(Some(state)) => state == "cancelled",
            Err(_) => false,
        };
        if unused {
            let _ = super::purge_rows(pool, job_id).await;
        }
        // A server's worker may have claimed the job in the moment it was
        // queued: say what it wrote, if anything.
        let written: i64 =
            sqlx::query_scalar("SELECT coalesce(rows_written, 0) FROM jobs.jobs WHERE id = $1")
                .bind(job_id)
                .fetch_optional(pool)
                .await
                .ok()
                .flatten()
                .unwrap_or(0);
        let what = if written == 0 {
            "nothing written".to_string()
        } else {
            format!("{} written before the cancel", counted(written, "row"))
        };
        let message = format!(
            "interrupted while reading {}: job {job_id} cancelled, {what}",
            args.file.display()
        );
        if staged.is_none() {
            // The reader is left blocked on the pipe; the runtime would wait
            // for it at exit, so the process ends here (as main would end an
            // interrupted command).
            eprintln!("error: {message}");
            std::process::exit(130);
        }
        return Err(crate::cli::Interrupted(message).into());
    }
    let staged = staged.expect("the stage ended");
    let staged = match staged {
        Ok(s) => s,
        Err(e) => {
            bar.abandon();
            anyhow::bail!("{}: {e}", args.file.display());
        }
    };
    bar.finish_and_clear();
    crate::say!(
        "read {} ({} shape) as job {}; {} rejected while reading",
        counted(staged.lines, "line"),
        staged.shape.map_or("unknown", |s| s.name()),
        staged.job_id,
        staged.rejected
    );
    let mut end = staged.state.to_string();
    if staged.queued {
        let bar = ProgressBar::new(staged.lines);
        bar.set_style(
            ProgressStyle::with_template("{msg:10} [{bar:40}] {pos}/{len} lines {per_sec} {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(if args.dry_run { "checking" } else { "merging" });
        let mut conn = pool.acquire().await?;
        let claimed = super::claim(
            &mut conn,
            "sales-server import",
            config.job_lease,
            Some(staged.job_id),
        )
        .await?;
        end = match claimed {
            Some(job) => {
                let (stop_tx, stop) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        let _ = stop_tx.send(true);
                    }
                });
                let beat = super::worker::heartbeat(
                    pool.clone(),
                    job.id,
                    job.token.clone(),
                    config.job_lease,
                );
                let ended = import::run(
                    &mut conn,
                    pool,
                    &job,
                    None,
                    config.import_chunk_lines,
                    config.import_parallelism,
                    config.job_lease,
                    &stop,
                    |p| bar.set_position((p.rows_written + p.rows_rejected).max(0) as u64),
                )
                .await;
                drop(beat);
                let ended = match ended {
                    Ok(ended) => ended,
                    Err(e) => {
                        // Given back with the error (counted as an attempt),
                        // not left running until this process exits.
                        drop(conn);
                        super::release(pool, &job, Some(&e.to_string())).await?;
                        return Err(e.into());
                    }
                };
                match ended {
                    import::Ended::Finished(s) => s,
                    // A server's worker runs it on: followed there.
                    import::Ended::LostLease => {
                        follow(pool, staged.job_id, &bar, &mut interrupts).await?
                    }
                    import::Ended::Stopped => {
                        super::release(pool, &job, None).await?;
                        "interrupted; queued for the servers' workers".into()
                    }
                    import::Ended::AccessChanged => {
                        super::release(pool, &job, None).await?;
                        "its user's access changed; given back to the servers' workers".into()
                    }
                }
            }
            // A server's worker took the job first: follow it there.
            None => follow(pool, staged.job_id, &bar, &mut interrupts).await?,
        };
        bar.finish_and_clear();
    }
    let doc = super::status(pool, staged.job_id, None).await?;
    if let Some(doc) = &doc {
        crate::say!(
            "job {}: {end}{}: {}, {} {}, {} rejected in {:.1}s",
            staged.job_id,
            if args.dry_run {
                " (dry run, nothing written)"
            } else {
                ""
            },
            counted(doc["rowsRead"].as_i64().unwrap_or(0), "line"),
            counted(doc["rowsWritten"].as_i64().unwrap_or(0), "row"),
            if args.dry_run {
                "would be written"
            } else {
                "written"
            },
            doc["rowsRejected"],
            started.elapsed().as_secs_f64()
        );
        if let Some(e) = doc["lastError"].as_str() {
            crate::say!("last error: {e}");
        }
        for e in doc["errors"].as_array().into_iter().flatten().take(20) {
            crate::say!(
                "  line {}{}: {}",
                e["line"],
                e["column"]
                    .as_str()
                    .map(|c| format!(", column {c}"))
                    .unwrap_or_default(),
                e["reason"].as_str().unwrap_or_default()
            );
        }
        // Counted in lines, as `rowsRejected` is (a line can be rejected
        // for several columns).
        let printed = doc["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .take(20)
            .filter_map(|e| e["line"].as_i64())
            .collect::<std::collections::BTreeSet<_>>()
            .len() as i64;
        let omitted = doc["rowsRejected"].as_i64().unwrap_or(0) - printed;
        if omitted > 0 {
            crate::say!("  ... and {}", counted(omitted, "more rejected line"));
        }
        // A job that ends with every line rejected and nothing written
        // (a file read in the wrong format) is no success for a script.
        if end == "completed"
            && doc["rowsWritten"].as_i64() == Some(0)
            && doc["rowsRejected"].as_i64().unwrap_or(0) > 0
        {
            return Ok(ALL_REJECTED.into());
        }
    }
    Ok(end)
}

/// Follows a job a server's worker runs until it ends; returns its state
/// (`gone` when its row is). Ctrl-C stops following, not the job: the
/// command then ends as interrupted (exit 130), saying so.
async fn follow(
    pool: &PgPool,
    job_id: i64,
    bar: &ProgressBar,
    interrupts: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<String> {
    loop {
        let Some(doc) = super::status(pool, job_id, None).await? else {
            return Ok("gone".into());
        };
        let done =
            doc["rowsWritten"].as_i64().unwrap_or(0) + doc["rowsRejected"].as_i64().unwrap_or(0);
        bar.set_position(done.max(0) as u64);
        match doc["state"].as_str().unwrap_or_default() {
            "queued" | "running" | "uploading" => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = interrupts.recv() => {
                        bar.abandon();
                        return Err(crate::cli::Interrupted(format!(
                            "interrupted while following job {job_id}, which a server's worker runs on \
                             (GET /api/v2/imports/{job_id} says how it ends)"
                        ))
                        .into());
                    }
                }
            }
            s => return Ok(s.to_string()),
        }
    }
}

/// `1 line`, `2 lines`: a count and its noun, singular for one.
fn counted(n: impl Into<i128>, noun: &str) -> String {
    match n.into() {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

/// What [`import`] returns for a completed job that rejected every line.
pub const ALL_REJECTED: &str = "completed with every line rejected";

#[cfg(test)]
mod tests {
    #[test]
    fn counts_are_singular_for_one() {
        assert_eq!(super::counted(1i64, "row"), "1 row");
        assert_eq!(super::counted(0i64, "row"), "0 rows");
        assert_eq!(super::counted(2u64, "line"), "2 lines");
    }
}
