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

/// The statements a run would execute, in order.
pub fn plan(findings: &[Finding], drop_unused: bool) -> Vec<String> {
    let mut out: Vec<String> = findings
        .iter()
        .filter(|f| f.reason != "unused" || drop_unused)
        .map(|f| f.fix.clone())
        .collect();
    out.dedup();
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
/// A failing statement is reported and the rest still run.
pub async fn apply(database_url: &str, statements: &[String]) -> Result<Vec<Action>, sqlx::Error> {
    let mut conn = sqlx::PgConnection::connect(database_url).await?;
    // Index builds may take long; the server-wide statement timeout does not apply here.
    sqlx::query("SET statement_timeout = 0")
        .execute(&mut conn)
        .await?;
    let mut actions = Vec::new();
    for s in statements {
        let started = std::time::Instant::now();
        let outcome = sqlx::Executor::execute(&mut conn, s.as_str())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        actions.push(Action {
            statement: s.clone(),
            outcome,
            elapsed: started.elapsed(),
        });
    }
    Ok(actions)
}

/// Deletes events older than `retention`; returns how many.
pub async fn prune_events(pool: &PgPool, retention: Duration) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT sales.prune_events(make_interval(secs => $1))")
        .bind(retention.as_secs_f64())
        .fetch_one(pool)
        .await
}
