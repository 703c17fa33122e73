//! Extended statistics on sales.monthly_sales (migration 0007): with a data
//! window that does not start in January, year and month are correlated, and
//! the planner's estimates for a period filter and a per-period GROUP BY are
//! right only with them. A copy of the same rows without extended statistics
//! shows the estimates they correct. `maintain` (its ANALYZE) keeps them
//! current when new months arrive.

use sales_e2e::TestDb;
use serde_json::Value;

const STORES: i64 = 40;

async fn estimate(db: &TestDb, query: &str) -> f64 {
    let plan: Value = sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) {query}"))
        .fetch_one(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{query}: {e}"));
    plan[0]["Plan"]["Plan Rows"].as_f64().expect("Plan Rows")
}

async fn exec(db: &TestDb, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Every store reports every month from `from` to `to` (first days of months).
async fn months(db: &TestDb, from: &str, to: &str) {
    exec(
        db,
        &format!(
            r#"INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
               SELECT s.id, extract(year FROM d)::int, extract(month FROM d)::int, '{{"1": {{"sales": 10}}}}'
               FROM sales.stores s, generate_series('{from}'::date, '{to}'::date, interval '1 month') d"#
        ),
    )
    .await;
}

fn near(estimate: f64, actual: f64) -> bool {
    (estimate - actual).abs() <= actual * 0.2
}

#[tokio::test]
async fn correlated_period_columns_are_estimated_right_and_maintain_keeps_them() {
    let db = TestDb::new().await;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT stxname::text FROM pg_statistic_ext WHERE stxnamespace = 'sales'::regnamespace ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        names,
        ["monthly_sales_period", "monthly_sales_store_period"]
    );

    db.stores(STORES as usize).await;
    // 24 months from July 2024: year 2024 holds only July..December.
    months(&db, "2024-07-01", "2026-06-01").await;
    exec(
        &db,
        "ANALYZE sales.monthly_sales;
         CREATE TABLE public.no_ext_stats AS SELECT store_id, year, month FROM sales.monthly_sales;
         ANALYZE public.no_ext_stats;",
    )
    .await;

    let filter = "WHERE year = 2024 AND month = 9";
    let with = estimate(&db, &format!("SELECT * FROM sales.monthly_sales {filter}")).await;
    let without = estimate(&db, &format!("SELECT * FROM public.no_ext_stats {filter}")).await;
    assert!(
        near(with, STORES as f64),
        "period filter: estimated {with}, actual {STORES}"
    );
    assert!(
        without < STORES as f64 * 0.75,
        "without extended statistics the estimate should be off (was {without}); the data no longer shows the correlation"
    );

    let group = "SELECT year, month, count(*) FROM {} GROUP BY year, month";
    let with = estimate(&db, &group.replace("{}", "sales.monthly_sales")).await;
    let without = estimate(&db, &group.replace("{}", "public.no_ext_stats")).await;
    assert!(near(with, 24.0), "groups: estimated {with}, actual 24");
    assert!(
        without >= 30.0,
        "groups without extended statistics: {without}"
    );

    // Three more months arrive; maintain's ANALYZE rebuilds the statistics.
    months(&db, "2026-07-01", "2026-09-01").await;
    let plan = sales_server::maintain::plan(
        &sales_server::maintain::report(&db.pool).await.unwrap(),
        false,
    );
    assert!(
        plan.iter().any(|s| s == "ANALYZE sales.monthly_sales"),
        "{plan:?}"
    );
    sales_server::maintain::apply(&db.url, &plan).await.unwrap();
    let with = estimate(
        &db,
        "SELECT * FROM sales.monthly_sales WHERE year = 2026 AND month = 8",
    )
    .await;
    assert!(
        near(with, STORES as f64),
        "after maintain: estimated {with}, actual {STORES}"
    );
    let with = estimate(&db, &group.replace("{}", "sales.monthly_sales")).await;
    assert!(
        near(with, 27.0),
        "groups after maintain: estimated {with}, actual 27"
    );
}

/// The event log's statistics (migration 0011): ANALYZE samples a tenth of
/// the default and builds none for the payload, while the row lookup
/// history uses is still estimated from them.
#[tokio::test]
async fn the_event_log_is_analyzed_lightly() {
    let db = TestDb::new().await;
    exec(
        &db,
        "INSERT INTO sales.stores (code, name, region) SELECT 'E' || g, 'E' || g, 'North' FROM generate_series(1, 20) g;
         INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         SELECT s.id, 2024, m, jsonb_build_object('1', jsonb_build_object('sales', m))
         FROM sales.stores s, generate_series(1, 12) m;
         ANALYZE sales.events;",
    )
    .await;
    let payload_stats: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stats WHERE schemaname = 'sales' AND tablename = 'events' AND attname = 'payload'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(payload_stats, 0, "no statistics are built for the payload");
    let targets: Vec<(String, i32)> = sqlx::query_as(
        "SELECT attname::text, attstattarget::int FROM pg_attribute
         WHERE attrelid = 'sales.events'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for (name, target) in &targets {
        let want = if name == "payload" { 0 } else { 10 };
        assert_eq!(*target, want, "statistics target of sales.events.{name}");
    }
    let row_stats: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stats WHERE schemaname = 'sales' AND tablename = 'events' AND attname = 'row_id'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(row_stats, 1);
    let rows = estimate(&db, "SELECT * FROM sales.events WHERE row_id = 5").await;
    assert!(rows < 10.0, "one record's events estimated at {rows} rows");
}

/// An update event carries the old value of every changed day, so replacing
/// a whole month writes a payload over the size at which Postgres compresses
/// a row. The log stores it with lz4 (migration 0012), as daily_data is, and
/// reads it back whole.
#[tokio::test]
async fn large_event_payloads_are_compressed_with_lz4() {
    let db = TestDb::new().await;
    let lz4: bool = sqlx::query_scalar(
        "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(lz4, "this Postgres was built without lz4");
    let month = |k: i32| {
        format!(
            "(SELECT jsonb_object_agg(d::text, jsonb_build_object('sales', d * 100.25 + {k}, 'customers', d + {k}, 'transactions', d + {k} + 1))
              FROM generate_series(1, 31) d)"
        )
    };
    exec(
        &db,
        &format!(
            "INSERT INTO sales.stores (code, name, region) VALUES ('Z1', 'Z1', 'North');
             INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
             SELECT id, 2024, 1, {} FROM sales.stores;
             UPDATE sales.monthly_sales SET daily_data = {};",
            month(1),
            month(2)
        ),
    )
    .await;
    let (compression, size, changed, old_31): (Option<String>, i32, i64, String) = sqlx::query_as(
        "SELECT pg_column_compression(payload), pg_column_size(payload),
                jsonb_array_length(payload->'changedDays')::int8, payload->'previousDays'->'31'->>'sales'
         FROM sales.events WHERE kind = 'sales-data-updated'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        compression.as_deref(),
        Some("lz4"),
        "payload of {size} bytes"
    );
    assert_eq!(changed, 31);
    assert_eq!(old_31, "3108.75");
}
