//! Asynchronous batches (`POST /api/v2/sales/batch?async=true`): the
//! request is checked as a synchronous one is (size, scope, each record with
//! the extension's rules), queued with its records, and written by a worker
//! in one transaction through the same `sales.batch_upsert_impl` call. The
//! job's result is the report the synchronous call would have answered.

use super::Claimed;
use crate::state::AppState;
use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool};
use std::sync::Arc;

/// Queues a checked batch. `kept` are the indexes (in the request) of
/// `records`; `rejected` the records refused before the extension.
/// `Ok(Err(..))`: the user has `max_jobs` unfinished jobs already.
#[allow(clippy::too_many_arguments)]
pub async fn enqueue(
    pool: &PgPool,
    max_jobs: i64,
    user_id: i64,
    scope: Option<Vec<i64>>,
    records: &serde_json::value::RawValue,
    kept: &[usize],
    rejected: &[(usize, Vec<sales_core::FieldError>)],
    total: usize,
    replace: bool,
    atomic: bool,
) -> Result<Result<i64, super::TooManyJobs>, sqlx::Error> {
    let rejected: Vec<Value> = rejected
        .iter()
        .map(|(i, errs)| {
            json!([
                i,
                errs.iter()
                    .map(|e| json!({"field": storable(&e.field), "reason": storable(&e.reason)}))
                    .collect::<Vec<_>>()
            ])
        })
        .collect();
    // The records go as the text they arrived in, made jsonb by Postgres:
    // numbers keep every digit (a serde `Value` would carry them as f64).
    let rest = json!({"kept": kept, "rejected": rejected, "total": total}).to_string();
    let input = format!("{{\"records\":{},{}", records.get(), &rest[1..]);
    let mut tx = pool.begin().await?;
    if let Err(full) = super::admit(&mut tx, user_id, max_jobs).await? {
        return Ok(Err(full));
    }
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO jobs.jobs (kind, user_id, scope, params, input, rows_read)
         VALUES ('batch', $1, $2, $3, $4::jsonb, $5) RETURNING id",
    )
    .bind(user_id)
    .bind(&scope)
    .bind(json!({"mode": if replace { "replace" } else { "merge" }, "atomic": atomic}))
    .bind(input)
    .bind(total as i64)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    super::WAKE.notify_waiters();
    Ok(Ok(id))
}

/// A report's text as jsonb can hold it: a NUL (a refused record's field
/// named `"\u0000"`) written as the six characters `\u0000`, as a JSON
/// answer shows it, since jsonb refuses the character itself (the whole
/// job was refused with a 400 naming nothing).
fn storable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        text.replace('\0', "\\u0000").into()
    } else {
        text.into()
    }
}

/// Runs a batch job on the connection that claimed it. Returns the end state.
pub async fn run(
    conn: &mut PgConnection,
    job: &Claimed,
    state: Option<&Arc<AppState>>,
) -> Result<Option<String>, sqlx::Error> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let row: Option<(Value, bool)> = sqlx::query_as(
        // Without the records: the batch reads them from the row itself.
        "SELECT input - 'records', cancel_requested FROM jobs.jobs WHERE id = $1 AND lease_token = $2::uuid FOR UPDATE",
    )
    .bind(job.id)
    .bind(&job.token)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((input, cancelled)) = row else {
        return Ok(None);
    };
    let data = |state: &str, summary: &Value| {
        json!({"jobId": job.id, "kind": "batch", "state": state, "done": true,
               "rowsRead": summary["total"], "rowsWritten":
                   summary["inserted"].as_i64().unwrap_or(0) + summary["updated"].as_i64().unwrap_or(0)
                   + summary["unchanged"].as_i64().unwrap_or(0),
               "rowsRejected": summary["failed"], "percent": 100.0, "eventId": summary["eventId"]})
    };
    if let Some(u) = job.user_id {
        crate::db::set_actor(&mut *tx, u).await?;
    }
    crate::db::set_job(&mut *tx, job.id).await?;
    if cancelled {
        end(
            &mut tx,
            job,
            "cancelled",
            None,
            &Value::Null,
            data("cancelled", &json!({})),
        )
        .await?;
        tx.commit().await?;
        return Ok(Some("cancelled".into()));
    }
    let atomic = job.params["atomic"].as_bool().unwrap_or(true);
    let replace = job.params["mode"] == "replace";
    let kept: Vec<usize> = input["kept"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_u64().map(|v| v as usize))
        .collect();
    let rejected: Vec<(usize, Vec<sales_core::FieldError>)> = input["rejected"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let errs = r[1]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    sales_core::FieldError::new(
                        e["field"].as_str().unwrap_or_default(),
                        e["reason"].as_str().unwrap_or_default(),
                    )
                })
                .collect();
            (r[0].as_u64().unwrap_or(0) as usize, errs)
        })
        .collect();
    let total = input["total"].as_u64().unwrap_or(0) as usize;
    let pre_rejected = !rejected.is_empty();
    // Savepoint: an atomic batch with a refused record writes nothing, but
    // the job's own ending still commits.
    sqlx::query("SAVEPOINT batch").execute(&mut *tx).await?;
    let summary: Value = if kept.is_empty() {
        json!({"total": 0, "inserted": 0, "updated": 0, "unchanged": 0, "failed": 0,
               "merged": 0, "eventId": null, "errors": [], "duplicates": []})
    } else {
        // The records straight from the job row (locked above): not read
        // into the server and parsed by Postgres a second time.
        sqlx::query_scalar(
            "SELECT sales.batch_upsert_impl(
                 (SELECT j.input->'records' FROM jobs.jobs j WHERE j.id = $1), $2, $3, $4)",
        )
        .bind(job.id)
        .bind(replace)
        .bind(atomic)
        .bind(&job.scope)
        .fetch_one(&mut *tx)
        .await?
    };
    let refused = atomic && (pre_rejected || summary["failed"].as_i64().unwrap_or(0) > 0);
    let mut summary = summary;
    if refused {
        sqlx::query("ROLLBACK TO SAVEPOINT batch")
            .execute(&mut *tx)
            .await?;
        for k in ["inserted", "updated", "unchanged"] {
            summary[k] = json!(0);
        }
        summary["eventId"] = Value::Null;
    }
    let mut summary = crate::http::sales::merge_report(summary, &kept, rejected, total);
    crate::http::error::cap_report(&mut summary);
    let failed = summary["failed"].as_i64().unwrap_or(0);
    let (state_name, error) = if refused {
        (
            "failed",
            Some(format!(
                "{failed} of {total} records are invalid; nothing was written"
            )),
        )
    } else {
        ("completed", None)
    };
    let d = data(state_name, &summary);
    end(&mut tx, job, state_name, error.as_deref(), &summary, d).await?;
    let tags = crate::db::write::tx_cache_tags(&mut tx).await?;
    if !tags.is_empty() {
        // For the instances that show the job ended before this one has
        // invalidated (`http::imports`, settle_ended).
        sqlx::query("UPDATE jobs.jobs SET cache_tags = $2 WHERE id = $1")
            .bind(job.id)
            .bind(&tags)
            .execute(&mut *tx)
            .await?;
    }
    // The commit makes the job's end visible together with its writes: until
    // the invalidation is applied, this instance serves none of the entries
    // it touches, so a client that saw the job end reads the new values.
    let held = state
        .filter(|_| !tags.is_empty())
        .map(|s| s.cache.hold(&tags));
    tx.commit().await?;
    if let Some(s) = state {
        if !tags.is_empty() {
            s.publish(crate::db::Changes::from_tags(tags)).await;
        }
    }
    drop(held);
    Ok(Some(state_name.into()))
}

async fn end(
    tx: &mut PgConnection,
    job: &Claimed,
    state: &str,
    error: Option<&str>,
    summary: &Value,
    mut data: Value,
) -> Result<(), sqlx::Error> {
    let written = data["rowsWritten"].as_i64().unwrap_or(0);
    let rejected = data["rowsRejected"].as_i64().unwrap_or(0);
    // The batch's transaction began as it started: `now()` would say it
    // finished then.
    sqlx::query(
        "UPDATE jobs.jobs
         SET state = $3, last_error = $4, result = $5, rows_written = $6, rows_rejected = $7,
             input = NULL, finished_at = clock_timestamp(), updated_at = clock_timestamp(),
             lease_token = NULL, lease_until = NULL, worker_pid = NULL
         WHERE id = $1 AND lease_token = $2::uuid",
    )
    .bind(job.id)
    .bind(&job.token)
    .bind(state)
    .bind(error)
    .bind(summary)
    .bind(written)
    .bind(rejected)
    .execute(&mut *tx)
    .await?;
    data["error"] = json!(error);
    super::announce_end(tx, job.user_id, data).await
}
