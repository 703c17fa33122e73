//! `sales-server maintain`: applies the fixes `sales.index_report()` proposes.
//!
//! `REINDEX ... CONCURRENTLY` and `DROP INDEX CONCURRENTLY` cannot run inside
//! a function or a transaction block, so they run here, one statement at a
//! time on a plain connection, without blocking writes.

use sqlx::{Connection, PgPool, Row};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Finding {
    pub index_name: String,
    pub table_name: String,
    pub size_bytes: i64,
    pub reason: String,
    pub detail: String,
    pub fix: String,
}

/// Key of the advisory lock a `maintain` run holds from start to end.
pub const MAINTAIN_LOCK: i64 = 0x5A1E_5003;

/// Held for a whole `maintain` run: a session advisory lock on a
/// connection of its own, which holds no snapshot (so the run's own
/// `CONCURRENTLY` builds do not wait for it). Two runs at once would
/// rebuild the same indexes, and one's clean-up of a failed rebuild would
/// drop the copy the other is still building.
pub struct RunLock {
    conn: sqlx::PgConnection,
}

impl RunLock {
    /// Takes the lock; `Ok(Err(why))` when another run holds it, naming
    /// that run's Postgres pid.
    pub async fn take(database_url: &str) -> Result<Result<RunLock, String>, sqlx::Error> {
        let mut conn = sqlx::PgConnection::connect(database_url).await?;
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(MAINTAIN_LOCK)
            .fetch_one(&mut conn)
            .await?;
        if taken {
            return Ok(Ok(RunLock { conn }));
        }
        let holder: Option<(i32, Option<f64>)> = sqlx::query_as(
            "SELECT l.pid, extract(epoch FROM now() - a.backend_start)::float8
             FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND (l.classid::bigint << 32) | l.objid::bigint = $1
             LIMIT 1",
        )
        .bind(MAINTAIN_LOCK)
        .fetch_optional(&mut conn)
        .await?;
        let _ = conn.close().await;
        let who = match holder {
            Some((pid, Some(age))) => format!(" (Postgres pid {pid}, connected {age:.0}s ago)"),
            Some((pid, None)) => format!(" (Postgres pid {pid})"),
            None => String::new(),
        };
        Ok(Err(format!(
            "another maintain run is in progress{who}; run again when it has ended"
        )))
    }

    /// Ends the run: the lock goes with its connection.
    pub async fn release(self) {
        let _ = self.conn.close().await;
    }
}

/// Leaves out the rebuild of an index that is being built right now (an
/// index is invalid while `CREATE INDEX CONCURRENTLY` or a `REINDEX ...
/// CONCURRENTLY` builds it): rebuilding it would only wait for that build
/// and then do it again. Returns what was left out, with the pid building it.
pub async fn skip_building(
    pool: &PgPool,
    findings: &mut Vec<Finding>,
) -> Result<Vec<(String, i32)>, sqlx::Error> {
    let building: Vec<(String, i32)> = sqlx::query_as(
        "SELECT format('sales.%I', c.relname), p.pid
         FROM pg_stat_progress_create_index p
         JOIN pg_class c ON c.oid = p.index_relid
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'sales' AND p.datid = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_all(pool)
    .await?;
    let mut skipped = Vec::new();
    findings.retain(
        |f| match building.iter().find(|(name, _)| *name == f.index_name) {
            Some((name, pid)) if f.reason == "invalid" => {
                skipped.push((name.clone(), *pid));
                false
            }
            _ => true,
        },
    );
    Ok(skipped)
}

#[derive(Debug, Clone)]
pub struct Action {
    pub statement: String,
    pub outcome: Result<(), String>,
    pub elapsed: Duration,
}

pub async fn report(pool: &PgPool) -> Result<Vec<Finding>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT index_name, table_name, size_bytes, reason, detail, fix FROM sales.index_report()",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Finding {
            index_name: r.get(0),
            table_name: r.get(1),
            size_bytes: r.get(2),
            reason: r.get(3),
            detail: r.get(4),
            fix: r.get(5),
        })
        .collect())
}

/// The statements a run would execute, in order: drops first (they are
/// cheap and leave less to rebuild), then rebuilds, each statement once,
/// then `ANALYZE` of every table. Unused indexes are dropped only when
/// `drop_unused` is set.
pub fn plan(findings: &[Finding], drop_unused: bool) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let wanted = findings
        .iter()
        .filter(|f| f.reason != "unused" || drop_unused);
    let (drops, others): (Vec<&Finding>, Vec<&Finding>) =
        wanted.partition(|f| f.fix.starts_with("DROP "));
    for f in drops.into_iter().chain(others) {
        if !out.contains(&f.fix) {
            out.push(f.fix.clone());
        }
    }
    for t in [
        "sales.stores",
        "sales.monthly_sales",
        "sales.users",
        "sales.events",
    ] {
        out.push(format!("ANALYZE {t}"));
    }
    out
}

/// Runs each statement on one dedicated connection (outside any transaction).
/// A failing statement is reported and the rest still run. A failed
/// `REINDEX INDEX CONCURRENTLY` leaves an invalid `<index>_ccnew` copy
/// behind; it is dropped right away (and reported), so a failed run does not
/// leave more to clean up than it found.
pub async fn apply(database_url: &str, statements: &[String]) -> Result<Vec<Action>, sqlx::Error> {
    let mut conn = sqlx::PgConnection::connect(database_url).await?;
    // Index builds may take long; the server-wide statement timeout does not apply here.
    sqlx::query("SET statement_timeout = 0")
        .execute(&mut conn)
        .await?;
    let mut actions = Vec::new();
    for s in statements {
        let action = run(&mut conn, s).await;
        let failed_reindex = action.outcome.is_err();
        actions.push(action);
        if !failed_reindex {
            continue;
        }
        let Some(index) = s.strip_prefix("REINDEX INDEX CONCURRENTLY sales.") else {
            continue;
        };
        let leftovers: Vec<String> = sqlx::query_scalar(
            "SELECT format('DROP INDEX CONCURRENTLY sales.%I', c.relname)
             FROM pg_index i
             JOIN pg_class c ON c.oid = i.indexrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'sales' AND NOT i.indisvalid
               AND left(c.relname, length($1)) = $1
               AND substr(c.relname, length($1) + 1) ~ '^_ccnew[0-9]*$'",
        )
        .bind(index.trim_matches('"'))
        .fetch_all(&mut conn)
        .await?;
        for drop in leftovers {
            actions.push(run(&mut conn, &drop).await);
        }
    }
    Ok(actions)
}

async fn run(conn: &mut sqlx::PgConnection, statement: &str) -> Action {
    let started = std::time::Instant::now();
    // Simple query protocol: one statement, no transaction block.
    let outcome = sqlx::Executor::execute(&mut *conn, statement)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    Action {
        statement: statement.to_string(),
        outcome,
        elapsed: started.elapsed(),
    }
}

/// Deletes events older than `retention`; returns how many. Sales events
/// younger than `history_retention` move to `sales.event_history`, where the
/// records' history still reads them.
pub async fn prune_events(
    pool: &PgPool,
    retention: Duration,
    history_retention: Duration,
) -> Result<i64, sqlx::Error> {
    // A run that deletes anything also writes an `events-pruned` event
    // (sales.prune_events does), which makes every cached history and past
    // version stale.
    sqlx::query_scalar(
        "SELECT sales.prune_events(make_interval(secs => $1), make_interval(secs => $2))",
    )
    .bind(retention.as_secs_f64())
    .bind(history_retention.as_secs_f64())
    .fetch_one(pool)
    .await
}

/// A session (`auth.sessions`) that may go: over (revoked, or past its
/// refresh window) and a minute past the expiry of the last access token
/// issued for it (`access_until`, recorded at login and refresh). Its row
/// is what tells a starting instance that the session's tokens are
/// refused, so it stays while one may still be presented, whatever
/// JWT_EXPIRY the process deleting it runs with. A row from before that
/// column (NULL) is judged by the parameter `lifetime` names (seconds: the
/// caller's JWT_EXPIRY) or 30 days (the longest JWT_EXPIRY allows),
/// whichever is longer.
pub fn session_gone(lifetime: &str) -> String {
    format!(
        "least(expires_at, coalesce(revoked_at, expires_at)) < now()
         AND coalesce(access_until,
                      least(expires_at, coalesce(revoked_at, expires_at))
                      + make_interval(secs => greatest({lifetime}, {longest})))
             < now() - interval '1 minute'",
        longest = crate::auth::LONGEST_TOKEN_SECS
    )
}

/// What [`prune_sessions`] deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionsPruned {
    pub sessions: u64,
    pub used_tokens: u64,
}

/// Deletes what sessions leave behind: sessions over (expired, or
/// revoked) and past the last access token issued for them (see
/// [`session_gone`]; `token_lifetime` only for rows from before it was
/// recorded), with their refresh tokens;
/// and refresh tokens used longer ago than `refresh_ttl`
/// (REFRESH_TOKEN_TTL). A used token is kept so that presenting it again
/// ends its session as stolen; past `refresh_ttl` it would have expired
/// unused anyway, so it proves nothing more. A login already deletes its
/// own user's ended sessions; this covers users who stay logged in, whose
/// sessions each keep a used token per refresh.
pub async fn prune_sessions(
    pool: &PgPool,
    token_lifetime: Duration,
    refresh_ttl: Duration,
) -> Result<SessionsPruned, sqlx::Error> {
    let sessions = sqlx::query(&format!(
        "DELETE FROM auth.sessions WHERE {}",
        session_gone("$1")
    ))
    .bind(token_lifetime.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected();
    let used_tokens = sqlx::query(
        "DELETE FROM auth.refresh_tokens WHERE used_at < now() - make_interval(secs => $1)",
    )
    .bind(refresh_ttl.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected();
    Ok(SessionsPruned {
        sessions,
        used_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(name: &str, reason: &str, fix: &str) -> Finding {
        Finding {
            index_name: name.into(),
            table_name: "sales.stores".into(),
            size_bytes: 0,
            reason: reason.into(),
            detail: String::new(),
            fix: fix.into(),
        }
    }

    #[test]
    fn plan_orders_drops_first_and_skips_unused_unless_asked() {
        let f = vec![
            finding("a", "invalid", "REINDEX INDEX CONCURRENTLY sales.a"),
            finding("b", "duplicate", "DROP INDEX CONCURRENTLY sales.b"),
            finding("c", "unused", "DROP INDEX CONCURRENTLY sales.c"),
            finding("a", "bloated", "REINDEX INDEX CONCURRENTLY sales.a"),
        ];
        let p = plan(&f, false);
        assert_eq!(
            &p[..2],
            &[
                "DROP INDEX CONCURRENTLY sales.b",
                "REINDEX INDEX CONCURRENTLY sales.a"
            ]
        );
        assert_eq!(p.len(), 2 + 4);
        assert!(p[2..].iter().all(|s| s.starts_with("ANALYZE ")));
        let p = plan(&f, true);
        assert_eq!(p[1], "DROP INDEX CONCURRENTLY sales.c");
    }
}
