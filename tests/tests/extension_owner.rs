//! The production set-up: a superuser creates the extension, and the
//! server runs as a role that is not one. The extension's functions that
//! run as their owner (the plpgsql event triggers, `sales.event_log_epoch`)
//! never run code that a less privileged owner of one of the schema's
//! tables attached to it: with a table given to another role alone, they
//! refuse (42501, naming `sales.hand_over`); after `sales.hand_over` they
//! run as that role. The server then migrates and serves as that role.

use reqwest::Method;
use sales_e2e::fixtures::db::create_database;
use sales_e2e::{base_url, month, relay_caught_up, sqlstate, user_token, Api, TestDb};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Executor};
use std::str::FromStr;

async fn exec(pool: &sqlx::PgPool, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// As `role`, in a schema of its own: a trigger on `sales.events` that
/// records the role it runs as and whether it could create a superuser.
fn spy_sql(role: &str) -> String {
    format!(
        "CREATE SCHEMA {role}_spy AUTHORIZATION {role};
         SET ROLE {role};
         CREATE TABLE {role}_spy.seen (ran_as text, made_superuser boolean);
         CREATE FUNCTION {role}_spy.spy() RETURNS trigger LANGUAGE plpgsql AS $f$
         DECLARE made boolean := true;
         BEGIN
             BEGIN
                 EXECUTE 'CREATE ROLE {role}_pwned SUPERUSER';
             EXCEPTION WHEN insufficient_privilege THEN made := false;
             END;
             INSERT INTO {role}_spy.seen VALUES (current_user, made);
             RETURN NULL;
         END $f$;
         CREATE TRIGGER spy AFTER INSERT ON sales.events
             FOR EACH ROW EXECUTE FUNCTION {role}_spy.spy();
         RESET ROLE;"
    )
}

async fn seen(pool: &sqlx::PgPool, role: &str) -> Vec<(String, bool)> {
    sqlx::query_as(&format!(
        "SELECT ran_as, made_superuser FROM {role}_spy.seen"
    ))
    .fetch_all(pool)
    .await
    .expect("spy rows")
}

async fn role_exists(pool: &sqlx::PgPool, role: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(role)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The event log given to a role alone (as `ALTER TABLE ... OWNER` does):
/// a store change, a delete, a truncate and the log's epoch are refused
/// with a message naming the remedy, and the role's trigger on the log
/// never runs as the superuser. After `sales.hand_over` they work, and the
/// same trigger runs as the role, which cannot make itself a superuser.
#[tokio::test]
async fn a_table_given_alone_is_refused_until_handed_over() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    sqlx::query("SELECT sales.batch_upsert($1)")
        .bind(json!([
            month(s, 2024, 1, 3, 10.0),
            month(s, 2024, 2, 3, 10.0)
        ]))
        .execute(&db.pool)
        .await
        .expect("batch");
    let role = format!("pgs_owner_{}", rand::random::<u32>());
    exec(
        &db.pool,
        &format!(
            "CREATE ROLE {role}; GRANT USAGE ON SCHEMA sales TO {role};
             ALTER TABLE sales.events OWNER TO {role};"
        ),
    )
    .await;
    exec(&db.pool, &spy_sql(&role)).await;

    for sql in [
        format!("UPDATE sales.stores SET name = 'Renamed' WHERE id = {s}"),
        format!("DELETE FROM sales.monthly_sales WHERE store_id = {s} AND month = 1"),
        "TRUNCATE sales.monthly_sales".to_string(),
        "SELECT sales.event_log_epoch()".to_string(),
    ] {
        let err = sqlx::raw_sql(&sql).execute(&db.pool).await.expect_err(&sql);
        assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{sql}: {err}");
        let text = format!("{err:?}");
        assert!(
            text.contains(&format!("is owned by {role}")) && text.contains("sales.hand_over"),
            "{sql}: {text}"
        );
    }
    assert!(seen(&db.pool, &role).await.is_empty());
    assert!(!role_exists(&db.pool, &format!("{role}_pwned")).await);

    let given: i32 = sqlx::query_scalar(&format!("SELECT sales.hand_over('{role}')"))
        .fetch_one(&db.pool)
        .await
        .expect("hand over");
    assert!(given > 5, "{given} objects given");
    let foreign: i64 = sqlx::query_scalar(&format!(
        "SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = 'sales'::regnamespace
                   AND relkind IN ('r', 'S', 'c') AND relowner <> '{role}'::regrole)
              + (SELECT count(*) FROM pg_proc WHERE pronamespace = 'sales'::regnamespace
                   AND prosecdef AND proowner <> '{role}'::regrole)"
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(foreign, 0, "every table and definer function is the role's");
    // The views stay the superuser's (their owner could redefine one to
    // run a function as whoever reads it); the role may read them.
    let views: Vec<(String, bool, bool)> = sqlx::query_as(&format!(
        "SELECT c.oid::regclass::text, c.relowner = '{role}'::regrole,
                has_table_privilege('{role}', c.oid, 'SELECT')
         FROM pg_class c WHERE c.relnamespace = 'sales'::regnamespace AND c.relkind = 'v'"
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(!views.is_empty());
    for (view, owned, readable) in views {
        assert!(
            !owned && readable,
            "{view}: owned {owned}, readable {readable}"
        );
    }

    // The superuser's delete now writes its event as the role.
    exec(
        &db.pool,
        &format!("DELETE FROM sales.monthly_sales WHERE store_id = {s} AND month = 1"),
    )
    .await;
    let deleted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sales.events WHERE kind = 'sales-data-deleted' AND store_id = $1",
    )
    .bind(s)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(deleted, 1);
    let epoch: Option<String> = sqlx::query_scalar("SELECT sales.event_log_epoch()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(epoch.is_some());
    assert_eq!(seen(&db.pool, &role).await, vec![(role.clone(), false)]);
    assert!(!role_exists(&db.pool, &format!("{role}_pwned")).await);

    // Handing over is a superuser's.
    let mut tx = db.pool.begin().await.unwrap();
    tx.execute(format!("SET LOCAL ROLE {role}").as_str())
        .await
        .unwrap();
    let err = sqlx::query(&format!("SELECT sales.hand_over('{role}')"))
        .execute(&mut *tx)
        .await
        .expect_err("a role hands itself the schema");
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err}");
    tx.rollback().await.unwrap();

    exec(
        &db.pool,
        &format!(
            "ALTER TABLE sales.events OWNER TO CURRENT_USER;
             SELECT sales.hand_over(current_user::regrole);
             DROP OWNED BY {role} CASCADE; DROP ROLE {role}"
        ),
    )
    .await;
}

/// The server migrates and serves as the role the tables were handed to:
/// writes, deletes, store changes and their events, readiness, the
/// monitoring views behind the admin index report.
#[tokio::test]
async fn the_server_migrates_and_serves_as_the_role_handed_the_tables() {
    let (db, role) = handed_over_database().await;
    let store: i64 = sqlx::query_scalar(
        "INSERT INTO sales.stores (code, name, region) VALUES ('OWN1', 'Own', 'North') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .expect("a store, as the role");
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "owner-admin@example.com", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));

    let (st, body) = api
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [month(store, 2024, 1, 3, 5.0), month(store, 2024, 2, 3, 6.0)]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM sales.monthly_sales WHERE month = 1")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let (st, body) = api
        .send_json(Method::DELETE, "/api/v2/sales/batch", &json!({"ids": ids}))
        .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = api
        .send_json(
            Method::PATCH,
            &format!("/api/v2/stores/{store}"),
            &json!({"name": "Own, renamed"}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let kinds: Vec<String> = sqlx::query_scalar("SELECT kind FROM sales.events ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    for kind in [
        "store-created",
        "sales-data-created",
        "sales-data-deleted",
        "store-updated",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }
    relay_caught_up(&db, &server).await;
    let ready = reqwest::get(server.url("/health/ready")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let (st, body) = api.get("/api/admin/indexes").await;
    assert_eq!(st, 200, "{body}");

    drop(server);
    drop_with_role(db, &role).await;
}

/// An extension older than the server's own version that the server's
/// role may not update stops the start with what to do (it failed at the
/// first function the older version lacked, naming that function).
#[tokio::test]
async fn an_older_extension_the_role_may_not_update_stops_the_start_saying_why() {
    let (db, role) = handed_over_database().await;
    let admin = superuser_pool(&db.name).await;
    exec(
        &admin,
        "UPDATE pg_extension SET extversion = '0.11.0' WHERE extname = 'pg_sales'",
    )
    .await;
    admin.close().await;
    let err = match sales_server::Server::bind(db.config(&[])).await {
        Ok(_) => panic!("a server started on an older extension"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("extension pg_sales in the database is 0.11.0 and this server needs")
            && err.contains("ALTER EXTENSION pg_sales UPDATE"),
        "{err}"
    );
    drop_with_role(db, &role).await;
}

/// One connection to database `name` as the tests' (superuser) role.
async fn superuser_pool(name: &str) -> sqlx::PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .connect_with(
            PgConnectOptions::from_str(&base_url())
                .unwrap()
                .database(name),
        )
        .await
        .unwrap_or_else(|e| panic!("connect to {name}: {e}"))
}

/// README's production recipe: a login role that owns the database, the
/// extension created by a superuser and handed over to that role, then
/// the migrations run as that role. Returns the database (its pool as the
/// role) and the role's name.
async fn handed_over_database() -> (TestDb, String) {
    let (name, _, admin) = create_database("pgs_test", 2).await;
    let role = format!("pgs_server_{}", rand::random::<u32>());
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    exec(
        &admin,
        &format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{password}';
             ALTER DATABASE {name} OWNER TO {role};
             CREATE EXTENSION pg_sales;
             SELECT sales.hand_over('{role}');"
        ),
    )
    .await;
    admin.close().await;
    let opts = PgConnectOptions::from_str(&base_url())
        .unwrap()
        .database(&name)
        .username(&role)
        .password(&password);
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .connect_with(opts.clone())
        .await
        .expect("connect as the server's role");
    let is_super: bool =
        sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(!is_super);
    sales_server::db::migrate(&pool)
        .await
        .expect("migrations as the server's role");
    let db = TestDb {
        name,
        url: opts.to_url_lossy().to_string(),
        pool,
    };
    (db, role)
}

/// Drops `db`, then `role` once the database is gone.
async fn drop_with_role(db: TestDb, role: &str) {
    let db_name = db.name.clone();
    drop(db);
    // The database goes with `db`; then the role, which owns nothing else.
    let postgres = superuser_pool("postgres").await;
    sales_e2e::eventually(
        std::time::Duration::from_secs(60),
        "the test database dropped",
        || {
            let (postgres, db_name) = (postgres.clone(), db_name.clone());
            async move {
                let left: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
                )
                .bind(&db_name)
                .fetch_one(&postgres)
                .await
                .unwrap();
                (!left).then_some(())
            }
        },
    )
    .await;
    exec(&postgres, &format!("DROP ROLE {role}")).await;
}
