//! `scripts/setup.sh database` (what `make run` and `make test` run): an
//! existing database is never dropped; an older pg_sales in it is moved to
//! the installed version with ALTER EXTENSION ... UPDATE, keeping its rows;
//! a second run changes nothing. Runs the script itself, as root with sudo
//! (as `make` does), on the test cluster's default socket.

use sales_e2e::BareDb;
use std::process::Command;

fn setup_database(name: &str) -> (bool, String) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/setup.sh"))
        .arg("database")
        .env("PG_SALES_DB_NAME", name)
        .output()
        .expect("run scripts/setup.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn state(db: &BareDb) -> (String, String) {
    sqlx::query_as(
        "SELECT (SELECT extversion::text FROM pg_extension WHERE extname = 'pg_sales'),
                (SELECT coalesce(jsonb_agg(to_jsonb(m) ORDER BY m.id), '[]')::text FROM sales.monthly_sales m)",
    )
    .fetch_one(&db.pool)
    .await
    .expect("database still there")
}

#[tokio::test]
async fn setup_upgrades_the_extension_in_place_and_never_drops_the_database() {
    let db = BareDb::new().await;
    let oldest = "0.1.0";
    sqlx::raw_sql(&format!(
        "CREATE EXTENSION pg_sales VERSION '{oldest}';
         INSERT INTO sales.stores (code, name, region) VALUES ('MINE', 'A user''s store', 'Home');
         SELECT sales.batch_upsert('[{{\"storeId\": 1, \"year\": 2024, \"month\": 5, \"dailyData\": {{\"1\": {{\"sales\": 42}}}}}}]');
         -- what the previous set-up left: a build stamp that no longer matches
         COMMENT ON DATABASE {} IS 'pg_sales build of another day';",
        db.name
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let (_, rows_before) = state(&db).await;
    assert!(rows_before.contains("\"total_sales\": 42"), "{rows_before}");

    let (ok, out) = setup_database(&db.name);
    assert!(ok, "setup failed:\n{out}");
    assert!(
        out.contains(&format!("upgrading extension pg_sales {oldest} -> ")),
        "{out}"
    );
    let (version, rows) = state(&db).await;
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    assert_eq!(rows, rows_before, "rows changed by setup");

    let (ok, out) = setup_database(&db.name);
    assert!(ok, "second setup failed:\n{out}");
    assert!(!out.contains("upgrading"), "{out}");
    assert_eq!(state(&db).await, (version, rows_before));
}
