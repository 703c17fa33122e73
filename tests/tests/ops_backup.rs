//! Backups: a logical dump restored by the steps README gives (Operations,
//! Backups) gives back every row, event and id sequence as it was, and the
//! server's migrate puts back what `pg_dump` leaves out on the extension's
//! tables; numbering and events go on after the restored ones.

use sales_e2e::{BareDb, TestDb};
use std::process::Command;

fn run(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Everything a restore must give back, one text per row, sorted.
async fn snapshot(pool: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT x FROM (
             SELECT 'store ' || s::text AS x FROM sales.stores s
             UNION ALL SELECT 'sales ' || m::text FROM sales.monthly_sales m
             UNION ALL SELECT 'event ' || e::text FROM sales.events e
             UNION ALL SELECT 'user ' || u.id || ' ' || u.email || ' ' || u.role FROM sales.users u
             UNION ALL SELECT 'index ' || indexname || ' ' || indexdef FROM pg_indexes
                 WHERE schemaname IN ('sales', 'auth', 'jobs')
             UNION ALL SELECT 'trigger ' || tgrelid::regclass || ' ' || tgname || ' ' || tgenabled::text
                 FROM pg_trigger WHERE NOT tgisinternal
             UNION ALL SELECT 'statistics ' || stxname FROM pg_statistic_ext
             UNION ALL SELECT 'target ' || attname || ' ' || attstattarget FROM pg_attribute
                 WHERE attrelid = 'sales.events'::regclass AND attnum > 0
         ) t ORDER BY x",
    )
    .fetch_all(pool)
    .await
    .expect("snapshot")
}

#[tokio::test]
async fn a_dump_restored_by_the_documented_steps_gives_everything_back() {
    let db = TestDb::new().await;
    let stores = db.stores(3).await;
    for sql in [
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         SELECT s, 2024, mo, jsonb_build_object('1', jsonb_build_object('sales', s * 10 + mo))
         FROM unnest($1::bigint[]) s, generate_series(1, 4) mo",
        "UPDATE sales.monthly_sales SET daily_data = daily_data || '{\"2\": {\"sales\": 7}}'
         WHERE month <= 2 AND store_id = ANY ($1)",
        "DELETE FROM sales.monthly_sales WHERE month = 4 AND store_id = ANY ($1)",
    ] {
        sqlx::query(sql)
            .bind(&stores)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    sales_server::users::upsert_user(&db.pool, "keeper@x.test", "admin", &[], "right-password-1")
        .await
        .unwrap();
    let before = snapshot(&db.pool).await;

    let file = format!("/tmp/{}.dump", db.name);
    run(&format!(
        "sudo -u postgres pg_dump -Fc -d {} -f {file}",
        db.name
    ));
    let target = BareDb::new().await;
    for step in [
        "--section=pre-data",
        "--data-only --disable-triggers",
        "--section=post-data",
    ] {
        run(&format!(
            "sudo -u postgres pg_restore {step} -d {} {file}",
            target.name
        ));
        if step != "--section=post-data" {
            // A server started between the steps refuses to migrate: it
            // recorded every migration in the still keyless table, and the
            // last step then failed on the duplicates the data step added.
            let e = sales_server::db::migrate(&target.pool)
                .await
                .expect_err("migrate between pg_restore's steps");
            assert!(
                e.to_string().contains("being restored") && e.to_string().contains("post-data"),
                "{step}: {e}"
            );
        }
    }
    let _ = std::fs::remove_file(&file);
    // Instances starting together put back what the dump lacked one at a
    // time (two making the same index at once would fail one of them): a
    // migrate waits while another holds the restore lock.
    let mut holder = target.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(sales_server::db::RESTORE_LOCK)
        .execute(&mut *holder)
        .await
        .unwrap();
    let pool = target.pool.clone();
    let migrating = tokio::spawn(async move { sales_server::db::migrate(&pool).await });
    sales_e2e::eventually(
        std::time::Duration::from_secs(60),
        "migrate waiting for the restore lock",
        || async {
            let waiting: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                                AND objid::text::bigint = $1 AND classid = 0
                                AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
            )
            .bind(sales_server::db::RESTORE_LOCK)
            .fetch_one(&target.pool)
            .await
            .unwrap();
            waiting.then_some(())
        },
    )
    .await;
    assert!(
        !migrating.is_finished(),
        "migrate went on under another's restore lock"
    );
    holder.commit().await.unwrap();
    migrating.await.unwrap().expect("migrate");
    let after = snapshot(&target.pool).await;
    let missing: Vec<&String> = before.iter().filter(|x| !after.contains(x)).collect();
    let extra: Vec<&String> = after.iter().filter(|x| !before.contains(x)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing after the restore: {missing:#?}\nnot there before: {extra:#?}"
    );

    // The restored log is another epoch of it: ids after its newest are
    // given again, so a client's id of the old log must not resume here.
    let epoch = "SELECT sales.event_log_epoch()";
    let (was, now): (String, String) = (
        sqlx::query_scalar(epoch).fetch_one(&db.pool).await.unwrap(),
        sqlx::query_scalar(epoch)
            .fetch_one(&target.pool)
            .await
            .unwrap(),
    );
    assert_ne!(was, now, "a restored log keeps the dumped log's epoch");

    // Numbering goes on after the restored rows, and writes make events.
    let (max_event, max_seq): (i64, i64) =
        sqlx::query_as("SELECT max(id), max(seq) FROM sales.events")
            .fetch_one(&target.pool)
            .await
            .unwrap();
    let store: i64 = sqlx::query_scalar(
        "INSERT INTO sales.stores (code, name, region) VALUES ('AFTER', 'After', 'North') RETURNING id",
    )
    .fetch_one(&target.pool)
    .await
    .expect("a new store after the restore");
    assert!(stores.iter().all(|s| *s < store));
    sqlx::query(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         VALUES ($1, 2024, 1, '{\"1\": {\"sales\": 1}}')",
    )
    .bind(store)
    .execute(&target.pool)
    .await
    .expect("a new month after the restore");
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT kind FROM sales.events WHERE id > $1 ORDER BY id")
            .bind(max_event)
            .fetch_all(&target.pool)
            .await
            .unwrap();
    assert_eq!(kinds, vec!["store-created", "sales-data-created"]);
    let first_new_seq: i64 = sqlx::query_scalar("SELECT min(seq) FROM sales.events WHERE id > $1")
        .bind(max_event)
        .fetch_one(&target.pool)
        .await
        .unwrap();
    assert!(
        first_new_seq > max_seq,
        "delivery order goes on after the restored events"
    );
}
