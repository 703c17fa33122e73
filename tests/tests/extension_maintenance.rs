//! Index maintenance: `sales.index_report()` finds invalid, duplicate, unused
//! and bloated indexes with the statement that fixes each; the
//! `sales-server maintain` binary applies the fixes (and `--dry-run` does not).

mod extension_support;

use extension_support::*;
use sales_e2e::{server_bin, TestDb};
use serde_json::json;
use std::process::{Command, Output};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct Finding {
    index_name: String,
    table_name: String,
    size_bytes: i64,
    reason: String,
    detail: String,
    fix: String,
}

async fn report(db: &TestDb, args: &str) -> Vec<Finding> {
    sqlx::query_as(&format!("SELECT * FROM sales.index_report({args})"))
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

fn find<'a>(findings: &'a [Finding], index: &str, reason: &str) -> Option<&'a Finding> {
    findings
        .iter()
        .find(|f| f.index_name == index && f.reason == reason)
}

fn maintain(db: &TestDb, args: &[&str]) -> (Output, String) {
    let out = Command::new(server_bin())
        .arg("maintain")
        .args(args)
        .envs(db.env())
        .output()
        .expect("run sales-server maintain (build it with `cargo build -p sales-server`)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// (name, valid) of every index on the sales tables.
async fn indexes(db: &TestDb) -> Vec<(String, bool)> {
    sqlx::query_as(
        "SELECT c.relname::text, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'sales' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

async fn exec(db: &TestDb, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

#[tokio::test]
async fn maintain_fixes_invalid_and_duplicate_indexes() {
    let db = TestDb::new().await;
    let s = db.stores(4).await; // regions North, South, East, North
    upsert_ok(
        &db,
        &json!([
            record(s[0], 2024, 1, days(1, 31, 1.0, 1)),
            record(s[1], 2024, 1, days(1, 31, 1.0, 1))
        ]),
    )
    .await;
    // Nothing to report on a fresh database.
    assert_eq!(report(&db, "").await, vec![]);

    // A duplicate of a migration's covering index, and one of the unique constraint's.
    exec(&db, "CREATE INDEX monthly_sales_period_twin ON sales.monthly_sales (year, month, store_id) INCLUDE (total_sales, total_customers, days_reported, version)").await;
    exec(
        &db,
        "CREATE INDEX monthly_sales_key_twin ON sales.monthly_sales (store_id, year, month)",
    )
    .await;
    // An index made invalid (as a crashed concurrent build leaves it).
    exec(&db, "CREATE INDEX stores_name_idx ON sales.stores (name)").await;
    exec(&db, "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'sales.stores_name_idx'::regclass").await;
    // A unique index whose concurrent build failed on duplicate keys.
    let e =
        sqlx::query("CREATE UNIQUE INDEX CONCURRENTLY stores_region_key ON sales.stores (region)")
            .execute(&db.pool)
            .await
            .unwrap_err();
    assert_eq!(pg_error(&e).0, "23505");

    let found = report(&db, "").await;
    let twin = find(&found, "sales.monthly_sales_period_twin", "duplicate").expect("period twin");
    assert!(twin.detail.contains("monthly_sales_period_idx"), "{twin:?}");
    assert_eq!(
        twin.fix,
        "DROP INDEX CONCURRENTLY sales.monthly_sales_period_twin"
    );
    assert_eq!(twin.table_name, "sales.monthly_sales");
    assert!(twin.size_bytes > 0);
    let key_twin = find(&found, "sales.monthly_sales_key_twin", "duplicate").expect("key twin");
    assert!(
        key_twin
            .detail
            .contains("monthly_sales_store_year_month_key"),
        "{key_twin:?}"
    );
    let invalid = find(&found, "sales.stores_name_idx", "invalid").expect("invalid index");
    assert_eq!(
        invalid.fix,
        "REINDEX INDEX CONCURRENTLY sales.stores_name_idx"
    );
    let failed = find(&found, "sales.stores_region_key", "invalid").expect("failed unique build");
    assert!(failed.detail.contains("duplicate keys"), "{failed:?}");
    assert_eq!(found.len(), 4, "{found:#?}");

    // --dry-run prints the plan and changes nothing.
    let before = indexes(&db).await;
    let (out, text) = maintain(&db, &["--dry-run"]);
    assert!(out.status.success(), "{text}");
    for f in &found {
        assert!(text.contains(&format!("would run: {}", f.fix)), "{text}");
        assert!(text.contains(&f.index_name), "{text}");
    }
    assert!(
        text.contains("would run: ANALYZE sales.monthly_sales"),
        "{text}"
    );
    assert_eq!(indexes(&db).await, before);
    assert_eq!(report(&db, "").await, found);

    // A real run fixes what it can. The unique index cannot be rebuilt while
    // the duplicate regions exist: that statement fails, the run says so and
    // exits non-zero, and the copy the failed REINDEX left is dropped.
    let (out, text) = maintain(&db, &[]);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("ran: DROP INDEX CONCURRENTLY sales.monthly_sales_period_twin"),
        "{text}"
    );
    assert!(
        text.contains("ran: DROP INDEX CONCURRENTLY sales.monthly_sales_key_twin"),
        "{text}"
    );
    assert!(
        text.contains("ran: REINDEX INDEX CONCURRENTLY sales.stores_name_idx"),
        "{text}"
    );
    assert!(
        text.contains("failed: REINDEX INDEX CONCURRENTLY sales.stores_region_key"),
        "{text}"
    );
    assert!(
        text.contains("ran: DROP INDEX CONCURRENTLY sales.stores_region_key_ccnew"),
        "{text}"
    );
    assert!(text.contains("ran: ANALYZE sales.stores"), "{text}");
    let after = indexes(&db).await;
    let names: Vec<&str> = after.iter().map(|(n, _)| n.as_str()).collect();
    assert!(!names.contains(&"monthly_sales_period_twin"));
    assert!(!names.contains(&"monthly_sales_key_twin"));
    assert!(!names.iter().any(|n| n.contains("_ccnew")), "{names:?}");
    assert!(after.contains(&("stores_name_idx".to_string(), true)));
    assert!(after.contains(&("stores_region_key".to_string(), false)));
    let left = report(&db, "").await;
    assert_eq!(left.len(), 1, "{left:#?}");
    assert_eq!(left[0].index_name, "sales.stores_region_key");

    // Once the duplicates are gone, the next run rebuilds it, and the report is empty.
    exec(
        &db,
        &format!(
            "UPDATE sales.stores SET region = 'West' WHERE id = {}",
            s[3]
        ),
    )
    .await;
    let (out, text) = maintain(&db, &[]);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("ran: REINDEX INDEX CONCURRENTLY sales.stores_region_key"),
        "{text}"
    );
    assert!(indexes(&db)
        .await
        .contains(&("stores_region_key".to_string(), true)));
    assert_eq!(report(&db, "").await, vec![]);
    let (out, text) = maintain(&db, &[]);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("nothing to fix"), "{text}");
}

#[tokio::test]
async fn sort_order_and_include_variants_are_not_duplicates() {
    let db = TestDb::new().await;
    exec(
        &db,
        "CREATE INDEX ms_a ON sales.monthly_sales (store_id, year, month DESC)",
    )
    .await;
    exec(&db, "CREATE INDEX st_a ON sales.stores (region, name)").await;
    exec(
        &db,
        "CREATE INDEX st_b ON sales.stores (region) INCLUDE (name)",
    )
    .await;
    exec(&db, "CREATE INDEX st_c ON sales.stores (lower(name))").await;
    exec(&db, "CREATE INDEX st_d ON sales.stores (lower(code))").await;
    exec(
        &db,
        "CREATE INDEX st_e ON sales.stores (name) WHERE status = 'open'",
    )
    .await;
    exec(
        &db,
        "CREATE INDEX st_f ON sales.stores (name) WHERE status = 'closed'",
    )
    .await;
    exec(&db, "CREATE INDEX st_g ON sales.stores USING hash (name)").await;
    exec(&db, "CREATE INDEX st_h ON sales.stores (name)").await;
    let found = report(&db, "").await;
    assert_eq!(found, vec![], "{found:#?}");
    // Real twins of those are found.
    exec(
        &db,
        "CREATE INDEX st_e2 ON sales.stores (name) WHERE status = 'open'",
    )
    .await;
    exec(&db, "CREATE INDEX st_c2 ON sales.stores (lower(name))").await;
    let found = report(&db, "").await;
    let names: Vec<&str> = found.iter().map(|f| f.index_name.as_str()).collect();
    assert_eq!(names, vec!["sales.st_c2", "sales.st_e2"], "{found:#?}");
}

#[tokio::test]
async fn unused_and_bloated_indexes_are_reported() {
    let db = TestDb::new().await;
    exec(&db, "CREATE INDEX events_kind_idx ON sales.events (kind)").await;
    exec(
        &db,
        "INSERT INTO sales.events (kind) SELECT 'kind-' || (g % 1000) FROM generate_series(1, 100000) g",
    )
    .await;
    exec(&db, "DELETE FROM sales.events WHERE id % 50 <> 0").await;
    exec(&db, "VACUUM ANALYZE sales.events").await;

    let found = report(&db, "0, 0").await;
    let unused = find(&found, "sales.events_kind_idx", "unused").expect("unused");
    assert_eq!(unused.fix, "DROP INDEX CONCURRENTLY sales.events_kind_idx");
    let bloated = find(&found, "sales.events_kind_idx", "bloated").expect("bloated");
    assert_eq!(
        bloated.fix,
        "REINDEX INDEX CONCURRENTLY sales.events_kind_idx"
    );
    // The extension's own indexes are never proposed for dropping.
    assert!(
        !found
            .iter()
            .any(|f| f.index_name == "sales.events_seq_idx" && f.fix.starts_with("DROP")),
        "{found:#?}"
    );

    // Applying the fix shrinks it below the estimate.
    exec(&db, &bloated.fix).await;
    let found = report(&db, "0, 0").await;
    assert!(
        find(&found, "sales.events_kind_idx", "bloated").is_none(),
        "{found:#?}"
    );

    // maintain leaves unused indexes alone unless asked.
    let (out, text) = maintain(&db, &[]);
    assert!(out.status.success(), "{text}");
    assert!(indexes(&db)
        .await
        .iter()
        .any(|(n, _)| n == "events_kind_idx"));
}

/// Of two identical indexes the planner may use either; the copy that is
/// kept is not "unused" while its twin was scanned (its scans move to the
/// kept copy once the twin is dropped), so `maintain --drop-unused` keeps
/// one of them. The product's own indexes are never proposed for dropping,
/// however little they were scanned.
#[tokio::test]
async fn a_scanned_twin_keeps_its_kept_copy_and_required_indexes_stay() {
    let db = TestDb::new().await;
    db.stores(3).await;
    exec(
        &db,
        "ALTER TABLE sales.monthly_sales DISABLE TRIGGER monthly_sales_events;
         INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
             SELECT s.id, 2000 + m / 12, 1 + m % 12, jsonb_build_object('1', jsonb_build_object('sales', m))
             FROM sales.stores s, generate_series(0, 1199) m;
         ALTER TABLE sales.monthly_sales ENABLE TRIGGER monthly_sales_events;
         CREATE INDEX twin_kept ON sales.monthly_sales (total_sales, store_id);
         CREATE INDEX twin_used ON sales.monthly_sales (total_sales, store_id);
         ANALYZE sales.monthly_sales;",
    )
    .await;
    // Only the newer copy is scanned (the older is hidden from the planner
    // for the query).
    exec(
        &db,
        "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'sales.twin_kept'::regclass",
    )
    .await;
    let mut conn = db.connect().await;
    sqlx::raw_sql(
        "SET enable_seqscan = off; SET enable_bitmapscan = off;
         SELECT count(*) FROM sales.monthly_sales WHERE total_sales = 7",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    drop(conn);
    exec(
        &db,
        "UPDATE pg_index SET indisvalid = true WHERE indexrelid = 'sales.twin_kept'::regclass",
    )
    .await;
    let scans = || async {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT indexrelname::text, idx_scan FROM pg_stat_all_indexes
             WHERE schemaname = 'sales' AND indexrelname IN ('twin_kept', 'twin_used') ORDER BY 1",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap()
    };
    // Statistics reach the view within a second (stats_fetch_consistency).
    let seen = sales_e2e::eventually(
        std::time::Duration::from_secs(10),
        "the twin's scan in the statistics",
        || async {
            let s = scans().await;
            (s.iter().any(|(n, c)| n == "twin_used" && *c > 0)).then_some(s)
        },
    )
    .await;
    assert_eq!(seen[0], ("twin_kept".to_string(), 0), "{seen:?}");

    let found = report(&db, "0, 0").await;
    assert!(
        find(&found, "sales.twin_used", "duplicate").is_some(),
        "{found:#?}"
    );
    assert!(
        find(&found, "sales.twin_kept", "unused").is_none(),
        "{found:#?}"
    );
    for required in [
        "sales.monthly_sales_period_idx",
        "sales.stores_region_status_idx",
    ] {
        assert!(
            !found
                .iter()
                .any(|f| f.index_name == required && f.fix.starts_with("DROP")),
            "{required}: {found:#?}"
        );
    }
    // Maintenance is not held to a request's DB_QUERY_TIMEOUT (the report
    // over the catalogs alone takes longer than 10 ms).
    let out = Command::new(server_bin())
        .args(["maintain", "--drop-unused"])
        .envs(db.env())
        .env("DB_QUERY_TIMEOUT", "10ms")
        .output()
        .expect("run sales-server maintain");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let left: Vec<String> = indexes(&db).await.into_iter().map(|(n, _)| n).collect();
    assert!(left.contains(&"twin_kept".to_string()), "{left:?}\n{text}");
    assert!(!left.contains(&"twin_used".to_string()), "{left:?}\n{text}");
    for required in ["monthly_sales_period_idx", "stores_region_status_idx"] {
        assert!(left.contains(&required.to_string()), "{left:?}\n{text}");
    }
}

/// Migration 0020 on a database where an earlier `maintain --drop-unused`
/// dropped the period index: the migration goes through, and the start
/// makes the index again with its `required` comment.
#[tokio::test]
async fn the_required_marks_go_on_even_where_an_index_was_dropped() {
    let db = TestDb::new().await;
    exec(
        &db,
        "DROP INDEX sales.monthly_sales_period_idx;
         DELETE FROM _sqlx_migrations WHERE version = 20;",
    )
    .await;
    let out = Command::new(server_bin())
        .arg("migrate")
        .envs(db.env())
        .output()
        .expect("run sales-server migrate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let marks: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT c.relname::text, obj_description(c.oid, 'pg_class') FROM pg_class c
         WHERE c.relname IN ('monthly_sales_period_idx', 'stores_region_status_idx') ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(marks.len(), 2, "{marks:?}");
    for (name, comment) in marks {
        assert!(
            comment.is_some_and(|c| c.starts_with("pg_sales: required")),
            "{name}"
        );
    }
}

/// Putting back an index at start waits a bounded time for its table's
/// lock: behind a long transaction writing the table, the start fails
/// after 10 s, saying why, and changes nothing (it waited for the
/// transaction, and every query on the table queued behind it); once the
/// transaction ends, the next start puts the index back.
#[tokio::test]
async fn putting_an_index_back_does_not_queue_behind_a_long_transaction() {
    let db = TestDb::new().await;
    exec(&db, "DROP INDEX sales.monthly_sales_period_idx").await;
    let mut writer = db.connect().await;
    // As a long write (an import's chunk, a bulk update) holds it.
    sqlx::raw_sql("BEGIN; LOCK TABLE sales.monthly_sales IN ROW EXCLUSIVE MODE")
        .execute(&mut writer)
        .await
        .unwrap();
    let migrate = || {
        tokio::process::Command::new(server_bin())
            .arg("migrate")
            .envs(db.env())
            .kill_on_drop(true)
            .output()
    };
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), migrate())
        .await
        .expect("the start waits a bounded time")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("waited 10 s for a lock"), "{stderr}");
    let back: bool =
        sqlx::query_scalar("SELECT to_regclass('sales.monthly_sales_period_idx') IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(!back, "nothing changed");
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut writer)
        .await
        .unwrap();
    let out = migrate().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back: bool =
        sqlx::query_scalar("SELECT to_regclass('sales.monthly_sales_period_idx') IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(back, "put back once the transaction ended");
}

/// `maintain` changes nothing on a database that lacks this release's
/// migrations, runs one at a time (a second run is refused, naming the
/// first's Postgres pid), and leaves alone an index that another session
/// is building (invalid until its `CREATE INDEX CONCURRENTLY` ends).
#[tokio::test]
async fn maintain_refuses_an_unmigrated_database_a_second_run_and_a_build_in_progress() {
    let bare = sales_e2e::BareDb::new().await;
    let out = Command::new(server_bin())
        .arg("maintain")
        .env("DATABASE_URL", &bare.url)
        .env("LOG_LEVEL", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("lacks") && text.contains("run `sales-server migrate` first"),
        "{text}"
    );
    let objects: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_extension WHERE extname = 'pg_sales')
              + (SELECT count(*) FROM pg_namespace WHERE nspname IN ('sales', 'auth'))",
    )
    .fetch_one(&bare.pool)
    .await
    .unwrap();
    assert_eq!(objects, 0, "maintain changed an unmigrated database");

    let db = TestDb::new().await;
    let mut holder = db.connect().await;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await
        .unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(sales_server::maintain::MAINTAIN_LOCK)
        .execute(&mut holder)
        .await
        .unwrap();
    let (out, text) = maintain(&db, &[]);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "another maintain run is in progress (Postgres pid {pid}"
        )),
        "{text}"
    );
    // A dry run changes nothing, so it runs beside another.
    let (out, text) = maintain(&db, &["--dry-run"]);
    assert!(out.status.success(), "{text}");
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(sales_server::maintain::MAINTAIN_LOCK)
        .execute(&mut holder)
        .await
        .unwrap();
    let (out, text) = maintain(&db, &[]);
    assert!(out.status.success(), "{text}");

    // A build waits for a transaction that writes to the table; meanwhile
    // its index exists, invalid.
    let mut writer = db.connect().await;
    sqlx::raw_sql("BEGIN; LOCK TABLE sales.monthly_sales IN ROW EXCLUSIVE MODE")
        .execute(&mut writer)
        .await
        .unwrap();
    let mut builder = db.connect().await;
    let builder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut builder)
        .await
        .unwrap();
    let build = tokio::spawn(async move {
        let statement =
            "CREATE INDEX CONCURRENTLY monthly_sales_building ON sales.monthly_sales (year)";
        sqlx::Executor::execute(&mut builder, statement)
            .await
            .map(|_| ())
    });
    sales_e2e::eventually(
        std::time::Duration::from_secs(30),
        "the build to wait with its index invalid",
        || async {
            report(&db, "")
                .await
                .iter()
                .any(|f| f.index_name == "sales.monthly_sales_building" && f.reason == "invalid")
                .then_some(())
        },
    )
    .await;
    let (out, text) = maintain(&db, &["--dry-run"]);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "sales.monthly_sales_building: being built by Postgres pid {builder_pid}; left alone"
        )),
        "{text}"
    );
    assert!(
        !text.contains("REINDEX INDEX CONCURRENTLY sales.monthly_sales_building"),
        "{text}"
    );
    sqlx::raw_sql("COMMIT").execute(&mut writer).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(60), build)
        .await
        .expect("the build ends once the writer commits")
        .unwrap()
        .unwrap();
    assert!(indexes(&db)
        .await
        .contains(&("monthly_sales_building".to_string(), true)));
}
