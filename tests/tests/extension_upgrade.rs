//! Upgrades: every frozen release (extension/sql/releases/pg_sales--V.sql) is
//! installed as it shipped, loaded with data and events, then moved to the
//! current version with `ALTER EXTENSION pg_sales UPDATE`: every row and
//! event is kept, the functions work on the old rows, events continue after
//! the old ones, and the extension ends up defined exactly as a fresh
//! `CREATE EXTENSION pg_sales` would define it (so an upgrade script that
//! forgets a change fails here).

use sales_e2e::eventually;
use sales_e2e::BareDb;
use serde_json::{json, Value};
use std::time::Duration;

/// Versions with a frozen install script, oldest first.
fn released_versions() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../extension/sql/releases");
    let mut versions: Vec<String> = std::fs::read_dir(&dir)
        .expect("extension/sql/releases")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let v = name.strip_prefix("pg_sales--")?.strip_suffix(".sql")?;
            (!v.contains("--")).then(|| v.to_string())
        })
        .collect();
    versions.sort();
    assert!(!versions.is_empty(), "no frozen releases in {dir:?}");
    versions
}

async fn text(db: &BareDb, sql: &str) -> String {
    sqlx::query_scalar(sql)
        .fetch_one(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn json_of(db: &BareDb, sql: &str) -> Value {
    sqlx::query_scalar(sql)
        .fetch_one(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn exec(db: &BareDb, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Every row of every extension table, as JSON, in id order. The event
/// log's delivery bookkeeping is left out: 0.2.0 replaces `wakes` with the
/// delivery position `seq` (checked separately, see `old_events_keep_their_order`).
async fn snapshot(db: &BareDb) -> Value {
    let mut all = serde_json::Map::new();
    for t in ["stores", "monthly_sales", "users", "events"] {
        let row = if t == "events" {
            "to_jsonb(t) - 'wakes' - 'seq'"
        } else {
            "to_jsonb(t)"
        };
        let rows = json_of(
            db,
            &format!("SELECT coalesce(jsonb_agg({row} ORDER BY t.id), '[]') FROM sales.{t} t"),
        )
        .await;
        all.insert(t.to_string(), rows);
    }
    Value::Object(all)
}

/// Events written before 0.2.0 get delivery positions in their old delivery
/// order, (xid, id), and a reader from the start gets every one of them in it.
async fn old_events_keep_their_order(db: &BareDb) {
    let by_seq = json_of(db, "SELECT jsonb_agg(id ORDER BY seq) FROM sales.events").await;
    let by_xid = json_of(
        db,
        "SELECT jsonb_agg(id ORDER BY xid, id) FROM sales.events",
    )
    .await;
    assert_eq!(by_seq, by_xid, "seq follows the old (xid, id) order");
    let delivered = json_of(
        db,
        "SELECT coalesce(jsonb_agg(id), '[]') FROM sales.events_since(0, 100000)",
    )
    .await;
    assert_eq!(
        delivered, by_xid,
        "a reader from the start gets every old event, in order"
    );
}

/// Writes through every path an old release offers: direct inserts, the
/// batch functions, a plain UPDATE and DELETE, announcements and a user
/// notification.
async fn load(db: &BareDb) {
    exec(
        db,
        "INSERT INTO sales.stores (code, name, region) VALUES ('U1', 'Up 1', 'North'), ('U2', 'Up 2', 'South'), ('U3', 'Up 3', 'East');
         INSERT INTO sales.users (email, password_hash, role, store_ids)
         VALUES ('old@example.com', '$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA', 'manager', '{1,2}');",
    )
    .await;
    let records: Vec<Value> = (1..=3)
        .flat_map(|s| {
            (1..=6).map(move |m| {
                json!({"storeId": s, "year": 2025, "month": m,
                       "dailyData": {"1": {"sales": 100.5 * f64::from(m), "customers": 3}, "2": {"sales": 7, "customers": 1, "transactions": 2}}})
            })
        })
        .collect();
    let r: Value = sqlx::query_scalar("SELECT sales.batch_upsert($1)")
        .bind(Value::Array(records))
        .fetch_one(&db.pool)
        .await
        .expect("batch_upsert on the old release");
    assert_eq!(r["inserted"], 18, "{r}");
    exec(
        db,
        r#"SELECT sales.batch_upsert('[{"storeId": 1, "year": 2025, "month": 1, "dailyData": {"3": {"sales": 1}}}]', mode => 'merge');
           UPDATE sales.monthly_sales SET daily_data = daily_data || '{"4": {"sales": 4}}' WHERE store_id = 2 AND month = 2;
           UPDATE sales.stores SET status = 'renovating' WHERE code = 'U3';
           SELECT sales.batch_delete(keys => '[{"storeId": 3, "year": 2025, "month": 6}]');
           SELECT sales.announce('before the upgrade', 'warning');
           SELECT sales.notify_user((SELECT id FROM sales.users), 'hello from the old version');"#,
    )
    .await;
}

async fn upgrade_from(version: &str) {
    let db = BareDb::new().await;
    exec(
        &db,
        &format!("CREATE EXTENSION pg_sales VERSION '{version}'"),
    )
    .await;
    assert_eq!(
        text(
            &db,
            "SELECT extversion::text FROM pg_extension WHERE extname = 'pg_sales'"
        )
        .await,
        version
    );
    load(&db).await;
    let before = snapshot(&db).await;
    let last_old_event: i64 = sqlx::query_scalar("SELECT max(id) FROM sales.events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(before["events"].as_array().unwrap().len() >= 25, "{before}");

    // A listener connected across the upgrade keeps receiving notifications.
    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    listener.listen("sales_events").await.unwrap();

    exec(&db, "ALTER EXTENSION pg_sales UPDATE").await;
    let current = env!("CARGO_PKG_VERSION");
    assert_eq!(
        text(
            &db,
            "SELECT extversion::text FROM pg_extension WHERE extname = 'pg_sales'"
        )
        .await,
        current,
        "the update must reach this build's version"
    );
    assert_eq!(
        text(
            &db,
            "SELECT default_version::text FROM pg_available_extensions WHERE name = 'pg_sales'"
        )
        .await,
        current,
        "the installed extension is not this build (run cargo pgrx install for this tree)"
    );

    // Every row and every event, unchanged (versions, timestamps, payloads, xids).
    assert_eq!(snapshot(&db).await, before, "rows changed by the upgrade");
    old_events_keep_their_order(&db).await;

    // Old rows through the current functions.
    let doc = json_of(
        &db,
        "SELECT sales.project(sales.sales_doc(m, s), '{storeId,month,totalSales,dailyData.*.sales,store.code}', '{}')
         FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id
         WHERE s.code = 'U1' AND m.month = 1",
    )
    .await;
    assert_eq!(
        doc,
        json!({"storeId": 1, "month": 1, "totalSales": 108.5,
               "dailyData": {"1": {"sales": 100.5}, "2": {"sales": 7}, "3": {"sales": 1}},
               "store": {"code": "U1"}})
    );
    let r = json_of(
        &db,
        r#"SELECT sales.batch_upsert('[{"storeId": 1, "year": 2025, "month": 1, "dailyData": {"1": {"sales": 1}}},
                                       {"storeId": 2, "year": 2025, "month": 7, "dailyData": {"1": {"sales": 2}}}]')"#,
    )
    .await;
    assert_eq!(
        (r["inserted"].as_i64(), r["updated"].as_i64()),
        (Some(1), Some(1)),
        "{r}"
    );
    let row_version: i64 = sqlx::query_scalar(
        "SELECT version FROM sales.monthly_sales WHERE store_id = 1 AND year = 2025 AND month = 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        row_version, 3,
        "the row's version continues from the old one"
    );
    let bad = sqlx::query("SELECT sales.batch_upsert('[{\"storeId\": 1, \"year\": 2025, \"month\": 4, \"dailyData\": {\"31\": {\"sales\": 1}}}]')")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert_eq!(sales_e2e::sqlstate(&bad).as_deref(), Some("PS422"));

    // Events continue after the old ones, in one log, and still notify.
    let n = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("a NOTIFY after the upgrade")
        .unwrap();
    let notified: i64 = n.payload().parse().unwrap();
    assert!(notified > last_old_event, "{notified} <= {last_old_event}");
    let old_count = before["events"].as_array().unwrap().len();
    let pool = db.pool.clone();
    let replay: Vec<(i64, String)> = eventually(
        Duration::from_secs(10),
        "events_since after the upgrade",
        || {
            let pool = pool.clone();
            async move {
                let rows: Vec<(i64, String)> =
                    sqlx::query_as("SELECT id, kind FROM sales.events_since(0, 1000)")
                        .fetch_all(&pool)
                        .await
                        .ok()?;
                (rows.len() == old_count + 3).then_some(rows)
            }
        },
    )
    .await;
    let old_ids: Vec<i64> = before["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert!(
        replay
            .iter()
            .take(old_ids.len())
            .map(|(id, _)| *id)
            .eq(old_ids.iter().copied()),
        "the old events come first, in their order"
    );
    let mut new_kinds: Vec<&str> = replay[old_ids.len()..]
        .iter()
        .map(|(_, k)| k.as_str())
        .collect();
    new_kinds.sort();
    assert_eq!(
        new_kinds,
        [
            "batch-completed",
            "sales-data-created",
            "sales-data-updated"
        ]
        .as_slice()
    );
    let resume: Vec<i64> = sqlx::query_scalar("SELECT id FROM sales.events_since($1, 1000)")
        .bind(last_old_event)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        resume.len(),
        3,
        "a reader positioned on an old event resumes"
    );

    // What the new version added works on the upgraded database.
    let indexes: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.index_usage")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(indexes >= 8, "{indexes}");
    sqlx::query("SELECT * FROM sales.slow_queries")
        .fetch_all(&db.pool)
        .await
        .expect("slow_queries");
    sqlx::query("SELECT * FROM sales.table_health")
        .fetch_all(&db.pool)
        .await
        .expect("table_health");

    // The upgraded extension is the one a fresh install creates.
    let fresh = BareDb::new().await;
    exec(&fresh, "CREATE EXTENSION pg_sales").await;
    let upgraded = db.extension_fingerprint().await;
    let created = fresh.extension_fingerprint().await;
    let missing: Vec<&String> = created.iter().filter(|o| !upgraded.contains(o)).collect();
    let extra: Vec<&String> = upgraded.iter().filter(|o| !created.contains(o)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "upgrade from {version} differs from a fresh install.\n\
         only in a fresh install (the upgrade script misses it):\n{}\n\
         only after the upgrade:\n{}",
        missing
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n---\n"),
        extra
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n---\n"),
    );

    // The server's migrations run on top of the upgraded extension.
    sales_server::db::migrate(&db.pool)
        .await
        .expect("migrations after the upgrade");
    assert_eq!(
        snapshot(&db).await["events"].as_array().unwrap().len(),
        old_ids.len() + 3
    );
}

#[tokio::test]
async fn every_release_upgrades_in_place_keeping_rows_and_events() {
    for version in released_versions() {
        upgrade_from(&version).await;
    }
}

#[tokio::test]
async fn the_current_version_is_not_a_frozen_release() {
    // A frozen release is what users installed: it must never change. The
    // current version has no frozen script yet (it is generated by pgrx).
    let current = env!("CARGO_PKG_VERSION");
    for v in released_versions() {
        assert_ne!(
            v, current,
            "pg_sales--{current}.sql is frozen; bump the version before changing the SQL"
        );
    }
}

#[tokio::test]
async fn the_server_migration_updates_an_older_extension_in_place() {
    // What a deployment does: a new server (and new extension files) started
    // on a database created by an earlier release.
    let oldest = released_versions().remove(0);
    let db = BareDb::new().await;
    exec(
        &db,
        &format!("CREATE EXTENSION pg_sales VERSION '{oldest}'"),
    )
    .await;
    load(&db).await;
    let before = snapshot(&db).await;

    sales_server::db::migrate(&db.pool)
        .await
        .expect("migrations on an older extension");
    assert_eq!(
        text(
            &db,
            "SELECT extversion::text FROM pg_extension WHERE extname = 'pg_sales'"
        )
        .await,
        sales_server::VERSION
    );
    assert_eq!(snapshot(&db).await, before, "rows changed by the update");
    assert_eq!(
        sales_server::db::update_extension(&mut db.pool.acquire().await.unwrap())
            .await
            .unwrap(),
        None,
        "a second start has nothing to update"
    );
}

/// 0.13.0 makes `stores_bump_version` run before inserts too: a trigger an
/// operator disabled stays disabled, and one dropped stays dropped (the
/// update does not fail on it).
#[tokio::test]
async fn the_store_version_trigger_keeps_its_state_through_0_13_0() {
    for (prepare, want) in [
        (
            "ALTER TABLE sales.stores DISABLE TRIGGER stores_bump_version",
            Some("D"),
        ),
        (
            "ALTER TABLE sales.stores ENABLE REPLICA TRIGGER stores_bump_version",
            Some("R"),
        ),
        ("DROP TRIGGER stores_bump_version ON sales.stores", None),
    ] {
        let db = BareDb::new().await;
        exec(&db, "CREATE EXTENSION pg_sales VERSION '0.12.0'").await;
        exec(&db, prepare).await;
        exec(&db, "ALTER EXTENSION pg_sales UPDATE TO '0.13.0'").await;
        let state: Option<(String, bool)> = sqlx::query_as(
            "SELECT tgenabled::text, (tgtype & 4) <> 0 FROM pg_trigger
             WHERE tgrelid = 'sales.stores'::regclass AND tgname = 'stores_bump_version'",
        )
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        match want {
            Some(w) => {
                let (enabled, on_insert) = state.expect("the trigger is there");
                assert_eq!(enabled, w, "{prepare}");
                assert!(on_insert, "{prepare}: the trigger runs before inserts");
            }
            None => assert!(state.is_none(), "{prepare}: made again"),
        }
    }
}
