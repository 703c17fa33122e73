//! The write ritual, written once: begin, set the acting user, the caller's
//! statements, collect the cache tags of the events the transaction wrote,
//! commit; then raise the replica read floor and invalidate the cache.

use super::TxFailure;
use crate::cache::Cache;
use crate::events::model::Payload;
use crate::events::{Event, Kind};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use std::sync::atomic::{AtomicU64, Ordering};

/// A write transaction acting for one user: the events its statements
/// write name that user as their actor.
pub struct Write {
    tx: Transaction<'static, Postgres>,
}

impl Write {
    pub async fn begin(pool: &PgPool, actor: i64) -> Result<Self, sqlx::Error> {
        let mut tx = pool.begin().await?;
        set_actor(&mut *tx, actor).await?;
        Ok(Self { tx })
    }

    /// The connection to run the write's statements on.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Commits, returning what the write changed (to [`Changes::publish`]).
    /// A failure at COMMIT itself is `TxFailure::AtCommit`: after a lost
    /// connection its outcome is unknown.
    pub async fn commit(mut self) -> Result<Changes, TxFailure> {
        // Read inside the transaction: the events it wrote are visible only here.
        let tags = tx_cache_tags(&mut self.tx).await?;
        self.tx.commit().await.map_err(TxFailure::AtCommit)?;
        Ok(Changes { tags })
    }

    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

/// Sets the acting user for event rows written in this transaction.
pub async fn set_actor<'c, E>(conn: E, user_id: i64) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'c, Database = Postgres>,
{
    sqlx::query("SELECT set_config('sales.user_id', $1, true)")
        .bind(user_id.to_string())
        .execute(conn)
        .await?;
    Ok(())
}

/// Names the job (import or asynchronous batch) whose writes this
/// transaction makes: their events carry it as `jobId` (history shows it).
pub async fn set_job<'c, E>(conn: E, job_id: i64) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'c, Database = Postgres>,
{
    sqlx::query("SELECT set_config('sales.job_id', $1, true)")
        .bind(job_id.to_string())
        .execute(conn)
        .await?;
    Ok(())
}

/// What a committed write changed: the cache tags of its events.
#[derive(Debug, Default)]
pub struct Changes {
    tags: Vec<String>,
}

impl Changes {
    /// Nothing was written (a rolled-back attempt).
    pub fn none() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// The changes a transaction committed elsewhere (a job's chunk) made,
    /// by the cache tags read before its COMMIT.
    pub fn from_tags(tags: Vec<String>) -> Self {
        Self { tags }
    }

    /// Raises `read_floor` (with a replica) to the primary's WAL position,
    /// and, with a cache other instances share, theirs too (each reads it
    /// before it reads from its replica), so that no read cached from now
    /// on comes from a replica that has not replayed the write; then
    /// invalidates the entries the events name. An instance without a
    /// replica reads no WAL position (it cost a one-record write about
    /// 0.4 ms): instances that share a cache are expected to be configured
    /// alike (README, "Read replicas").
    pub async fn publish(self, pool: &PgPool, read_floor: Option<&AtomicU64>, cache: &Cache) {
        if let Some(floor) = read_floor {
            if let Some(lsn) = raise_read_floor(pool, floor).await {
                cache.share_read_floor(lsn).await;
            }
        }
        cache.invalidate(&self.tags).await;
    }
}

/// The primary's current WAL insert position ([`READ_FLOOR_EXPR`]); None,
/// with a warning, when it cannot be read.
async fn primary_read_floor(pool: &PgPool) -> Option<u64> {
    match sqlx::query_scalar::<_, i64>(&read_floor_sql())
        .fetch_one(pool)
        .await
    {
        Ok(v) => Some(v.max(0) as u64),
        Err(e) => {
            tracing::warn!(error = %e, "could not read the primary's WAL position for the replica read floor");
            None
        }
    }
}

/// Moves `floor` up to the primary's current WAL insert position: past
/// every commit made so far, an asynchronous one (`synchronous_commit =
/// off`) included, whose commit record may not be written out yet (the
/// write position, `pg_current_wal_lsn()`, can be short of it, and a
/// replica that had replayed that far was read from without the change).
/// Returns the position read (None, with a warning, when it could not be).
pub async fn raise_read_floor(pool: &PgPool, floor: &AtomicU64) -> Option<u64> {
    let Some(lsn) = primary_read_floor(pool).await else {
        // A write this instance made or learned of may be past every
        // position known: until one is read again, no read may come from
        // the replica ([`settle_unknown_floor`]).
        floor.store(FLOOR_UNKNOWN, Ordering::Relaxed);
        return None;
    };
    floor.fetch_max(lsn, Ordering::Relaxed);
    Some(lsn)
}

/// The read floor when the primary's position could not be read as it
/// should have been: reads go to the primary until it is.
pub const FLOOR_UNKNOWN: u64 = u64::MAX;

/// Whether `floor` is known: when it is [`FLOOR_UNKNOWN`], the primary's
/// position is read now and taken in its place (read after the failure
/// that set it, so past the write that could not raise it). False while
/// it cannot be read.
pub async fn settle_unknown_floor(pool: &PgPool, floor: &AtomicU64) -> bool {
    if floor.load(Ordering::Relaxed) != FLOOR_UNKNOWN {
        return true;
    }
    match primary_read_floor(pool).await {
        Some(lsn) => {
            let _ =
                floor.compare_exchange(FLOOR_UNKNOWN, lsn, Ordering::Relaxed, Ordering::Relaxed);
            floor.load(Ordering::Relaxed) != FLOOR_UNKNOWN
        }
        None => false,
    }
}

/// The primary's WAL insert position as a byte number, as a standby that
/// has replayed everything inserted so far reports it: where the insert
/// position sits just past a page header (a page or segment begun, nothing
/// in it yet: after a WAL switch, or a record that ended at the page's
/// end), the header is not counted, since `pg_last_wal_replay_lsn()`
/// stops at the end of the last record. Counted, the floor was out of a
/// standby's reach until the next write, and an idle system never read
/// from its replica. (24 and 40 bytes: the short and long page headers of
/// a 64-bit build.)
pub const READ_FLOOR_EXPR: &str = "(SELECT CASE
        WHEN x.i % pg_size_bytes(current_setting('wal_segment_size')) = 40 THEN x.i - 40
        WHEN x.i % current_setting('wal_block_size')::bigint = 24 THEN x.i - 24
        ELSE x.i END
    FROM (SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint AS i) x)";

/// The query [`raise_read_floor`] raises the floor with.
pub fn read_floor_sql() -> String {
    format!("SELECT {READ_FLOOR_EXPR}")
}

/// What [`tx_cache_tags`] reads of the current transaction's events.
///
/// The transaction's seq range comes from scalar subqueries, which Postgres
/// evaluates once before the scan, so the range is an index condition on
/// `events_seq_idx`. (Called directly in the WHERE clause, the volatile
/// functions would be evaluated per row: a scan of the whole log on every
/// write.) The server reads the log itself rather than through
/// `sales.transaction_events()`, whose body is the same: a database that
/// was already at extension 0.3.0 when that function was fixed kept its
/// earlier body, which scans the whole log, until it moved to 0.4.0.
///
/// No DISTINCT: the tags are deduplicated after they are derived, and
/// sorting the rows to drop repeats (text compared by the database's
/// collation) took 10–15 ms for a batch of 1,000 records, against about
/// 1 ms for reading them.
pub const TX_EVENTS_SQL: &str = "SELECT kind, store_id, row_id,
        jsonb_build_object('year', payload->'year', 'month', payload->'month',
                           'previousStoreId', payload->'previousStoreId',
                           'previousYear', payload->'previousYear',
                           'previousMonth', payload->'previousMonth')::text
 FROM sales.events e
 WHERE e.seq BETWEEN (SELECT sales.transaction_first_seq())
                 AND (SELECT sales.transaction_last_seq())
   AND e.xid = (SELECT pg_current_xact_id_if_assigned())";

/// The cache tags of the events the current transaction has written.
/// Read before COMMIT and invalidated right after, so the
/// writer reads its own writes at once (other instances learn through the
/// relay).
pub(crate) async fn tx_cache_tags(
    conn: &mut sqlx::PgConnection,
) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String, Option<i64>, Option<i64>, String)> =
        sqlx::query_as(TX_EVENTS_SQL).fetch_all(conn).await?;
    tags_of_rows(rows)
}

/// The events of the log after delivery position `after` up to `upto`
/// (at most `limit`), in the same shape as [`TX_EVENTS_SQL`].
pub const RANGE_EVENTS_SQL: &str = "SELECT kind, store_id, row_id,
        jsonb_build_object('year', payload->'year', 'month', payload->'month',
                           'previousStoreId', payload->'previousStoreId',
                           'previousYear', payload->'previousYear',
                           'previousMonth', payload->'previousMonth')::text
 FROM sales.events e
 WHERE e.seq > $1 AND e.seq <= $2
 ORDER BY e.seq
 LIMIT $3";

/// The cache tags of the events delivered after position `after` up to
/// `upto`; None when there are more than `limit` of them, or when the log
/// was pruned in between (what was pruned cannot be read back).
pub(crate) async fn range_cache_tags(
    pool: &sqlx::PgPool,
    after: i64,
    upto: i64,
    limit: i64,
) -> Result<Option<Vec<String>>, sqlx::Error> {
    let rows: Vec<(String, Option<i64>, Option<i64>, String)> = sqlx::query_as(RANGE_EVENTS_SQL)
        .bind(after)
        .bind(upto)
        .bind(limit + 1)
        .fetch_all(pool)
        .await?;
    if rows.len() as i64 > limit || rows.iter().any(|r| r.0 == "events-pruned") {
        return Ok(None);
    }
    tags_of_rows(rows).map(Some)
}

fn tags_of_rows(
    rows: Vec<(String, Option<i64>, Option<i64>, String)>,
) -> Result<Vec<String>, sqlx::Error> {
    let events: Vec<Event> = rows
        .into_iter()
        .map(|(kind_name, store_id, row_id, payload)| {
            let payload =
                Payload::from_json(&payload).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            Ok(Event {
                id: 0,
                seq: 0,
                kind: Kind::parse(&kind_name),
                kind_name,
                store_id,
                user_id: None,
                actor_id: None,
                row_id,
                row_version: None,
                payload,
                created_at: DateTime::<Utc>::MIN_UTC,
                region: None,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok(crate::events::rules::cache_tags(&events))
}
