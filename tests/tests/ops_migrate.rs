//! `sales-server migrate` on databases in the states operations leave them
//! in: several instances starting at once, an index build cut short, id
//! sequences a restored dump left behind their tables, and the keys
//! `DROP EXTENSION pg_sales CASCADE` takes from the server's own tables.

use sales_e2e::{redis_url, server_bin, BareDb, TestDb, TEST_JWT_SECRET};

fn migrate_cmd(url: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(server_bin());
    cmd.arg("migrate")
        .env("DATABASE_URL", url)
        .env("JWT_SECRET", TEST_JWT_SECRET)
        .env("REDIS_URL", redis_url())
        .env("LOG_LEVEL", "warn")
        .kill_on_drop(true);
    cmd
}

/// Two instances migrating one new database at once both succeed. sqlx's
/// own lock was waited for inside a statement, whose snapshot an index
/// built concurrently by the other instance waited for: Postgres found a
/// deadlock and one of them failed (in two of three tries).
#[tokio::test]
async fn instances_migrating_together_take_turns() {
    for round in 0..3 {
        let db = BareDb::new().await;
        let (a, b) = tokio::join!(migrate_cmd(&db.url).output(), migrate_cmd(&db.url).output());
        for out in [a.unwrap(), b.unwrap()] {
            assert!(
                out.status.success(),
                "round {round}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let applied: i64 =
            sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(applied, sales_server::db::MIGRATOR.iter().count() as i64);
    }
}

/// What a restore or a recreated extension leaves is put back by the next
/// `migrate`: an index left invalid by a build cut short is built again, an
/// id sequence behind its table's ids moves past them, and the keys from
/// the `auth` tables to `sales.users` come back, without the rows of users
/// that are gone (which would otherwise pass to whoever gets the id next).
#[tokio::test]
async fn migrate_puts_back_what_a_restore_or_a_dropped_extension_lost() {
    let db = TestDb::new().await;
    let stores = db.stores(3).await;
    let user: i64 = sqlx::query_scalar(
        "INSERT INTO sales.users (email, role, password_hash) VALUES ('a@x.test', 'admin', '$argon2id$x')
         RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let sql = |q: &'static str| {
        let pool = db.pool.clone();
        async move { sqlx::query(q).execute(&pool).await.unwrap() }
    };
    // A build cut short: the index is there, but invalid.
    sql("UPDATE pg_index SET indisvalid = false
         WHERE indexrelid = 'sales.monthly_sales_period_idx'::regclass")
    .await;
    // Sequences as a dump from before extension 0.8.0 restored them.
    sql("SELECT setval('sales.stores_id_seq', 1, false)").await;
    sql("SELECT setval('sales.users_id_seq', 1, false)").await;
    // DROP EXTENSION ... CASCADE took the key; a row of a user now gone.
    sql("ALTER TABLE auth.identities DROP CONSTRAINT identities_user_id_fkey").await;
    sqlx::query(
        "INSERT INTO auth.identities (user_id, issuer, subject) VALUES ($1, 'https://idp', 'kept'),
                                                                      ($1 + 1000, 'https://idp', 'orphan')",
    )
    .bind(user)
    .execute(&db.pool)
    .await
    .unwrap();

    sales_server::db::migrate(&db.pool).await.expect("migrate");

    let valid: bool = sqlx::query_scalar(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'sales.monthly_sales_period_idx'::regclass",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(valid, "the invalid index is built again");
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO sales.stores (code, name, region) VALUES ('NEW', 'New', 'North') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .expect("a write after the restore");
    assert!(id > *stores.iter().max().unwrap(), "{id} {stores:?}");
    let next_user: i64 = sqlx::query_scalar(
        "INSERT INTO sales.users (email, role, password_hash) VALUES ('b@x.test', 'staff', '$argon2id$x')
         RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .expect("a new user after the restore");
    assert!(next_user > user);
    let identities: Vec<String> =
        sqlx::query_scalar("SELECT subject FROM auth.identities ORDER BY subject")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(identities, ["kept"]);
    let key: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'identities_user_id_fkey')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(key, "the key is made again");

    // Nothing left to do: a second run changes nothing.
    let mut conn = db.pool.acquire().await.unwrap();
    assert!(sales_server::db::restore_sequences(&mut conn)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        sales_server::db::restore_user_keys(&mut conn)
            .await
            .unwrap(),
        0
    );
}

/// The commands that work on a migrated database without migrating it
/// (`user add` here) put back what a recreated extension lost first, as
/// `migrate` does: the new user does not take the id of a user whose
/// identity link was still there.
#[tokio::test]
async fn a_command_puts_back_what_a_dropped_extension_lost() {
    let db = TestDb::new().await;
    let user: i64 = sqlx::query_scalar(
        "INSERT INTO sales.users (email, role, password_hash) VALUES ('a@x.test', 'admin', '$argon2id$x')
         RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::raw_sql(
        "SELECT setval('sales.users_id_seq', 1, false);
         ALTER TABLE auth.identities DROP CONSTRAINT identities_user_id_fkey",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO auth.identities (user_id, issuer, subject) VALUES ($1, 'https://idp', 'kept'),
                                                                      ($1 + 1000, 'https://idp', 'orphan')",
    )
    .bind(user)
    .execute(&db.pool)
    .await
    .unwrap();
    let out = std::process::Command::new(sales_e2e::server_bin())
        .args(["user", "add", "--email", "b@x.test", "--role", "admin"])
        .args(["--password", "a long enough passphrase 42"])
        .envs(db.env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let next_user: i64 = sqlx::query_scalar("SELECT id FROM sales.users WHERE email = 'b@x.test'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(next_user > user, "{next_user} took an id already used");
    let identities: Vec<String> =
        sqlx::query_scalar("SELECT subject FROM auth.identities ORDER BY subject")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(identities, ["kept"]);
}

/// Ids that other tables still name are not given out again. A record
/// deleted (its versions stay in the event log) and a user gone (their job
/// and tombstone stay), with the id sequences as a dump from before
/// extension 0.8.0, or the extension dropped and created again, leaves
/// them: after `migrate` a new record's history is its own (it used to
/// be empty, "older than the retained history") and a new user does not
/// take over the old one's jobs.
#[tokio::test]
async fn ids_other_tables_still_name_are_not_given_again() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let sql = |q: String| {
        let pool = db.pool.clone();
        async move { sqlx::query(&q).execute(&pool).await.unwrap() }
    };
    let old_record: i64 = sqlx::query_scalar(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         VALUES ($1, 2024, 1, '{\"1\": {\"sales\": 5}}') RETURNING id",
    )
    .bind(stores[0])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sql(format!(
        "DELETE FROM sales.monthly_sales WHERE id = {old_record}"
    ))
    .await;
    let old_user: i64 = sqlx::query_scalar(
        "INSERT INTO sales.users (email, role, password_hash) VALUES ('a@x.test', 'staff', '$argon2id$x')
         RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sql(format!(
        "INSERT INTO jobs.jobs (kind, state, user_id, scope) VALUES ('batch', 'completed', {old_user}, '{{}}')"
    ))
    .await;
    sql(format!("DELETE FROM sales.users WHERE id = {old_user}")).await;
    let tombstones: i64 = sqlx::query_scalar("SELECT count(*) FROM auth.deleted_users")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(tombstones, 1, "the user's tombstone");
    // A store deleted before the dump: only the event log names its id.
    let gone_store: i64 = sqlx::query_scalar(
        "INSERT INTO sales.stores (code, name, region) VALUES ('GONE', 'Gone', 'North') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sql(format!("DELETE FROM sales.stores WHERE id = {gone_store}")).await;
    // A record restored without its totals (a dump from 0.4.0 or older,
    // whose totals were generated columns pg_dump leaves out).
    sqlx::raw_sql(&format!(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
             VALUES ({s}, 2024, 3, '{{\"1\": {{\"sales\": 9, \"customers\": 2}}}}');
         SET session_replication_role = replica;
         UPDATE sales.monthly_sales SET total_sales = NULL, total_customers = NULL, days_reported = NULL
             WHERE store_id = {s} AND year = 2024 AND month = 3;
         SET session_replication_role = origin;",
        s = stores[0]
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    sql("SELECT setval('sales.monthly_sales_id_seq', 1, false)".into()).await;
    sql("SELECT setval('sales.users_id_seq', 1, false)".into()).await;
    sql("SELECT setval('sales.stores_id_seq', 1, false)".into()).await;

    sales_server::db::migrate(&db.pool).await.expect("migrate");

    let store: i64 = sqlx::query_scalar(
        "INSERT INTO sales.stores (code, name, region) VALUES ('NEW', 'New', 'North') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        store > gone_store,
        "store {store} after the deleted {gone_store}"
    );
    let totals: (Option<f64>, Option<i64>, Option<i32>) = sqlx::query_as(
        "SELECT total_sales::float8, total_customers, days_reported FROM sales.monthly_sales
         WHERE store_id = $1 AND year = 2024 AND month = 3",
    )
    .bind(stores[0])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(totals, (Some(9.0), Some(2), Some(1)), "totals computed");

    let record: i64 = sqlx::query_scalar(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         VALUES ($1, 2024, 2, '{\"1\": {\"sales\": 7}}') RETURNING id",
    )
    .bind(stores[0])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(record > old_record, "{record} after {old_record}");
    let history: serde_json::Value = sqlx::query_scalar("SELECT sales.history($1)")
        .bind(record)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(history["complete"], serde_json::json!(true), "{history}");
    assert_eq!(
        history["versions"].as_array().unwrap().len(),
        1,
        "{history}"
    );
    let user: i64 = sqlx::query_scalar(
        "INSERT INTO sales.users (email, role, password_hash) VALUES ('b@x.test', 'staff', '$argon2id$x')
         RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(user > old_user, "{user} after {old_user}");
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs.jobs WHERE user_id = $1")
        .bind(user)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 0, "the new user has no jobs of the old one");
}

/// `migrate` on a database whose extension was dropped (its migrations
/// still recorded) says so and what to do, instead of failing on a
/// missing table; after `CREATE EXTENSION pg_sales` it migrates.
#[tokio::test]
async fn a_dropped_extension_is_named_not_failed_on() {
    let db = TestDb::new().await;
    sqlx::query("DROP EXTENSION pg_sales CASCADE")
        .execute(&db.pool)
        .await
        .unwrap();
    let out = migrate_cmd(&db.url).output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("extension pg_sales is not installed in this database")
            && err.contains("CREATE EXTENSION pg_sales"),
        "{err}"
    );
    assert!(!err.contains("does not exist"), "{err}");
    // `maintain`, which does not migrate, says the same (it failed on
    // "function sales.index_report() does not exist").
    for args in [&["maintain"][..], &["maintain", "--dry-run"][..]] {
        let out = tokio::process::Command::new(server_bin())
            .args(args)
            .env("DATABASE_URL", &db.url)
            .env("LOG_LEVEL", "warn")
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(
            err.contains("extension pg_sales is not installed in this database"),
            "{args:?}: {err}"
        );
    }
    sqlx::query("CREATE EXTENSION pg_sales")
        .execute(&db.pool)
        .await
        .unwrap();
    let out = migrate_cmd(&db.url).output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A database whose extension is newer than the files installed here
/// (another server updated it) is left as it is: `migrate` succeeds with
/// a warning instead of failing on an update with no way down.
#[tokio::test]
async fn an_extension_newer_than_the_installed_files_is_left_alone() {
    let db = TestDb::new().await;
    sqlx::query("UPDATE pg_extension SET extversion = '99.0.0' WHERE extname = 'pg_sales'")
        .execute(&db.pool)
        .await
        .unwrap();
    let out = migrate_cmd(&db.url).output().await.unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let version: String =
        sqlx::query_scalar("SELECT extversion::text FROM pg_extension WHERE extname = 'pg_sales'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(version, "99.0.0");
}

/// A database a newer release migrated (a migration this binary does not
/// have) is left as it is, as a newer extension is: `migrate` (and so
/// `serve` and every command that migrates first) goes on. sqlx refused
/// ("migration … was previously applied but is missing"), so a rollback or
/// a rolling deploy's old instances could not start.
#[tokio::test]
async fn migrations_of_a_newer_release_are_left_alone() {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (99990101000000, 'from a newer release', true, '\\x00', 1)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let out = migrate_cmd(&db.url).output().await.unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
