//! Monitoring views: sales.index_usage counts index scans, sales.table_health
//! sees dead rows, vacuums and analyzes, and sales.slow_queries reads
//! pg_stat_statements when it is created and is empty (with a NOTICE, see
//! the SQL regression tests) when it is not, without ever creating it.

use sales_e2e::{eventually, TestDb};
use sqlx::{Connection, Executor};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

async fn i64_of(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Runs `sql` on its own connection and flushes that session's statistics
/// (they are otherwise sent up to a second or more later).
async fn run_and_flush(db: &TestDb, sql: &str) {
    let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(sql)
        .execute(&mut c)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    c.execute("SELECT pg_stat_force_next_flush()")
        .await
        .unwrap();
    c.close().await.unwrap();
}

async fn wait_for(db: &TestDb, what: &str, sql: &str) {
    let pool = db.pool.clone();
    eventually(WAIT, what, || {
        let pool = pool.clone();
        async move {
            let ok: bool = sqlx::query_scalar(sql).fetch_one(&pool).await.ok()?;
            ok.then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn index_usage_and_table_health_follow_the_tables() {
    let db = TestDb::new().await;
    db.stores(5).await;
    // Through run_and_flush: counts written by a pooled connection reach the
    // statistics only when that connection has been idle for a while.
    run_and_flush(
        &db,
        r#"INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
           SELECT s.id, 2024, m, '{"1": {"sales": 1}}' FROM sales.stores s, generate_series(1, 12) m"#,
    )
    .await;

    let key = "sales.monthly_sales_store_year_month_key";
    // Migrations add indexes the planner may prefer: count scans of any of them.
    let total =
        "SELECT sum(scans)::bigint FROM sales.index_usage WHERE table_name = 'sales.monthly_sales'";
    let scans = i64_of(&db, total).await;
    run_and_flush(
        &db,
        "SET enable_seqscan = off; SET enable_bitmapscan = off;
         SELECT * FROM sales.monthly_sales WHERE store_id = 1 AND year = 2024 AND month = 3;
         SELECT * FROM sales.monthly_sales WHERE store_id = 2 AND year = 2024 AND month = 4;",
    )
    .await;
    wait_for(
        &db,
        "index_usage to count two scans",
        &format!("SELECT ({total}) >= {}", scans + 2),
    )
    .await;
    let (method, backs, unique): (String, bool, bool) = sqlx::query_as(&format!(
        "SELECT method, backs_constraint, is_unique FROM sales.index_usage WHERE index_name = '{key}'"
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((method.as_str(), backs, unique), ("btree", true, true));

    // 20 of 60 rows deleted: dead rows show, a VACUUM clears them and is
    // recorded. Autovacuum stays out of it (its analyze or vacuum would
    // recount or remove the dead rows before they are seen).
    run_and_flush(
        &db,
        "ALTER TABLE sales.monthly_sales SET (autovacuum_enabled = off);
         DELETE FROM sales.monthly_sales WHERE month > 8",
    )
    .await;
    wait_for(
        &db,
        "table_health to see 20 dead rows",
        "SELECT dead_rows >= 20 AND live_rows = 40 FROM sales.table_health WHERE table_name = 'sales.monthly_sales'",
    )
    .await;
    run_and_flush(&db, "VACUUM (ANALYZE) sales.monthly_sales").await;
    wait_for(
        &db,
        "table_health to record the vacuum",
        "SELECT dead_rows = 0 AND last_vacuum IS NOT NULL AND last_analyze IS NOT NULL
                AND bloat_bytes_estimate IS NOT NULL AND bloat_pct_estimate BETWEEN 0 AND 100
         FROM sales.table_health WHERE table_name = 'sales.monthly_sales'",
    )
    .await;
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT table_name FROM sales.table_health ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        tables,
        [
            "sales.event_history",
            "sales.event_log_identity",
            "sales.events",
            "sales.monthly_sales",
            "sales.stores",
            "sales.users"
        ]
    );
}

#[tokio::test]
async fn slow_queries_reads_pg_stat_statements_only_when_it_is_there() {
    let db = TestDb::new().await;
    let created = "SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'";
    // The migrations create it (migration 0013); a database without it is
    // what this test reads from first.
    assert_eq!(i64_of(&db, created).await, 1, "migration 0013 creates it");
    sqlx::query("DROP EXTENSION pg_stat_statements")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(i64_of(&db, created).await, 0);
    assert_eq!(
        i64_of(&db, "SELECT count(*) FROM sales.slow_queries").await,
        0
    );
    assert_eq!(
        i64_of(&db, created).await,
        0,
        "a read must not create the extension"
    );

    let preloaded: String = sqlx::query_scalar("SHOW shared_preload_libraries")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        preloaded.contains("pg_stat_statements"),
        "the test cluster preloads pg_stat_statements (make sets it up); got {preloaded:?}"
    );
    sqlx::query("CREATE EXTENSION pg_stat_statements")
        .execute(&db.pool)
        .await
        .unwrap();
    db.stores(2).await;
    sqlx::query(
        "SELECT count(*) FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    wait_for(
        &db,
        "slow_queries to list statements on the sales tables",
        "SELECT count(*) > 0 FROM sales.slow_queries WHERE touches_sales AND calls > 0 AND mean_ms >= 0",
    )
    .await;
    let ordered: bool = sqlx::query_scalar(
        "SELECT coalesce(bool_and(mean_ms >= next), true) FROM
           (SELECT mean_ms, lead(mean_ms) OVER () AS next FROM sales.slow_queries) t WHERE next IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(ordered, "slowest first");
}
