//! Name resolution inside the extension's SQL and PL/pgSQL functions: none
//! of them runs a function or operator of a schema in its caller's search
//! path. A function or operator taking the exact argument types is chosen
//! over a polymorphic or "any" built-in (`cardinality(anyarray)`,
//! `jsonb_build_object(VARIADIC "any")`, `anyarray || anyelement`) even with
//! pg_catalog searched first, and over any built-in when the caller puts its
//! schema before pg_catalog; it then runs with the caller's rights. Every
//! such function runs with `search_path = pg_catalog, pg_temp`, except the
//! few inlined into their callers' queries, which name every function and
//! operator with its schema.

mod extension_support;

use extension_support::*;
use sales_e2e::TestDb;
use serde_json::json;

/// Functions, aggregates and operators that take the exact argument types
/// the extension's bodies call built-ins with; each raises an error naming
/// itself when it runs.
fn shadows(schema: &str) -> String {
    let s = schema;
    let boom = |what: &str| {
        format!("BEGIN RAISE EXCEPTION 'a shadowing {what} ran as %', current_user; END")
    };
    let mut sql = format!("CREATE SCHEMA {s};\n");
    for (signature, returns, what) in [
        // Polymorphic or "any" built-ins: these win with pg_catalog first.
        ("cardinality(text[])", "integer", "cardinality"),
        ("unnest(bigint[])", "SETOF bigint", "unnest"),
        ("array_to_string(text[], text)", "text", "array_to_string"),
        ("format(text, text, text[], text[])", "text", "format"),
        ("make_interval(secs numeric)", "interval", "make_interval"),
        (
            "jsonb_build_object(text, bigint, text, text, text, text, text, text, text, text, \
             text, bigint, text, timestamptz, text, timestamptz)",
            "jsonb",
            "jsonb_build_object (a store)",
        ),
        (
            "jsonb_build_object(text, bigint, text, bigint, text, integer, text, integer, text, jsonb, \
             text, numeric, text, bigint, text, integer, text, bigint, text, timestamptz, text, timestamptz)",
            "jsonb",
            "jsonb_build_object (a month)",
        ),
        ("jsonb_build_object(text, jsonb)", "jsonb", "jsonb_build_object (text, jsonb)"),
        ("jsonb_build_object(text, bigint, text, bigint)", "jsonb", "jsonb_build_object (counts)"),
        // A built-in reached through an implicit cast (oid to regclass).
        ("pg_relation_size(oid)", "bigint", "pg_relation_size"),
        // Exact copies of built-ins: these win only before pg_catalog.
        ("current_setting(text, boolean)", "text", "current_setting"),
    ] {
        sql.push_str(&format!(
            "CREATE FUNCTION {s}.{signature} RETURNS {returns} LANGUAGE plpgsql AS $f${}$f$;\n",
            boom(what)
        ));
    }
    for (name, arg, state, what) in [
        ("array_agg", "bigint", "bigint[]", "array_agg"),
        ("jsonb_agg", "jsonb", "jsonb", "jsonb_agg"),
        ("count", "bigint", "bigint", "count"),
    ] {
        sql.push_str(&format!(
            "CREATE FUNCTION {s}.{name}_step({state}, {arg}) RETURNS {state} LANGUAGE plpgsql AS $f${}$f$;
             CREATE AGGREGATE {s}.{name}({arg}) (SFUNC = {s}.{name}_step, STYPE = {state});\n",
            boom(what)
        ));
    }
    sql.push_str(&format!(
        "CREATE FUNCTION {s}.jsonb_object_agg_step(jsonb, text, jsonb) RETURNS jsonb LANGUAGE plpgsql AS $f${}$f$;
         CREATE AGGREGATE {s}.jsonb_object_agg(text, jsonb) (SFUNC = {s}.jsonb_object_agg_step, STYPE = jsonb);\n",
        boom("jsonb_object_agg")
    ));
    for (op, left, right, what) in [
        ("||", "text[]", "text", "operator text[] || text"),
        ("||", "jsonb", "jsonb", "operator jsonb || jsonb"),
        ("<>", "text", "text", "operator text <> text"),
        ("=", "text", "text", "operator text = text"),
    ] {
        let f = format!("op_{}", rand::random::<u32>());
        sql.push_str(&format!(
            "CREATE FUNCTION {s}.{f}({left}, {right}) RETURNS {ret} LANGUAGE plpgsql AS $f${}$f$;
             CREATE OPERATOR {s}.{op} (LEFTARG = {left}, RIGHTARG = {right}, FUNCTION = {s}.{f});\n",
            boom(what),
            ret = if op == "||" { left } else { "boolean" },
        ));
    }
    sql
}

/// Calls every read, write and event function of the extension in the
/// search path `path` (one statement each, simple protocol); returns the
/// errors, each with its statement.
async fn call_everything(
    conn: &mut sqlx::PgConnection,
    path: &str,
    id: i64,
    store: i64,
) -> Vec<String> {
    let calls = [
        "SELECT sales.list_sales(fields => '{id,storeId,store.name}')".to_string(),
        "SELECT sales.list_sales(sort => '-period,storeId', exclude => '{dailyData}')".to_string(),
        format!("SELECT sales.get_sales({id}, '{{store.name,totalSales}}')"),
        "SELECT * FROM sales.sales_summary('store')".to_string(),
        "SELECT sales.summary(group_by => 'store,month')".to_string(),
        "SELECT sales.list_stores(fields => '{id,code}')".to_string(),
        "SELECT * FROM sales.export_monthly()".to_string(),
        format!("SELECT * FROM sales.export_daily(after_key => '{store}:2024-01-01')"),
        format!("SELECT sales.record_stores({id})"),
        format!("SELECT sales.history({id})"),
        format!("SELECT * FROM sales.record_versions({id})"),
        format!("SELECT sales.get_sales_as_of({id}, now(), '{{dailyData,store.code}}')"),
        "SELECT sales.sales_doc(m) FROM sales.monthly_sales m".to_string(),
        "SELECT sales.sales_doc(m, s) FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id"
            .to_string(),
        "SELECT sales.store_doc(s) FROM sales.stores s".to_string(),
        "SELECT sales.current_actor()".to_string(),
        "SELECT * FROM sales.events_since(0, 5)".to_string(),
        "SELECT * FROM sales.events_next(0, 5, 1)".to_string(),
        "SELECT sales.events_head()".to_string(),
        "SELECT * FROM sales.event_holders()".to_string(),
        "SELECT * FROM sales.event_delivery".to_string(),
        "SELECT * FROM sales.transaction_events()".to_string(),
        "SELECT sales.announce('from a shadowed search path')".to_string(),
        format!("UPDATE sales.stores SET status = 'renovating' WHERE id = {store}"),
        format!("UPDATE sales.stores SET status = 'open' WHERE id = {store}"),
        format!(
            r#"SELECT sales.batch_upsert('[{{"storeId": {store}, "year": 2024, "month": 3, "dailyData": {{"1": {{"sales": 1}}}}}}]')"#
        ),
        format!(
            r#"SELECT sales.batch_delete(keys => '[{{"storeId": {store}, "year": 2024, "month": 3}}]')"#
        ),
        "SELECT * FROM sales.index_report(0, 0)".to_string(),
        "SELECT * FROM sales.statement_stats()".to_string(),
        // The migrations' users triggers (schema auth), as an operator's
        // hand-written changes fire them.
        "INSERT INTO sales.users (id, email, password_hash, role) \
         VALUES (990001, 'shadow@example.test', '$argon2id$x', 'staff')"
            .to_string(),
        "UPDATE sales.users SET email = 'shadow2@example.test', role = 'manager', \
         store_ids = '{1}', password_hash = '$argon2id$y' WHERE id = 990001"
            .to_string(),
        "INSERT INTO auth.identities (user_id, issuer, subject) VALUES (990001, 'https://idp.test', 's1')"
            .to_string(),
        "UPDATE auth.identities SET subject = 's2' WHERE user_id = 990001".to_string(),
        "DELETE FROM auth.identities WHERE user_id = 990001".to_string(),
        "DELETE FROM sales.users WHERE id = 990001".to_string(),
    ];
    sqlx::raw_sql(&format!("SET search_path = {path}"))
        .execute(&mut *conn)
        .await
        .unwrap();
    let mut failures = Vec::new();
    for call in calls {
        if let Err(e) = sqlx::raw_sql(&call).execute(&mut *conn).await {
            failures.push(format!("{call}\n    {}", pg_error(&e).1));
        }
    }
    failures
}

/// With functions, aggregates and operators of the caller's search path
/// taking the exact argument types the extension's bodies call built-ins
/// with, nothing of theirs runs: not with pg_catalog searched first (where
/// a polymorphic or "any" built-in loses to them), and not with their
/// schema put before pg_catalog (where every built-in does). The caller is
/// a superuser, as an administrator reading the SQL API would be.
#[tokio::test]
async fn no_function_of_the_callers_search_path_runs() {
    let db = TestDb::new().await;
    let s = db.stores(2).await;
    upsert_ok(
        &db,
        &json!([
            record(s[0], 2024, 1, days(1, 3, 10.0, 2)),
            record(s[1], 2024, 1, days(1, 2, 5.0, 1))
        ]),
    )
    .await;
    upsert_ok(&db, &json!([record(s[0], 2024, 1, days(2, 4, 11.0, 3))])).await;
    let id = scalar_i64(
        &db,
        &format!(
            "SELECT id FROM sales.monthly_sales WHERE store_id = {} AND month = 1",
            s[0]
        ),
    )
    .await;
    let schema = format!("shadow_{}", rand::random::<u32>());
    sqlx::raw_sql(&shadows(&schema))
        .execute(&db.pool)
        .await
        .expect("shadowing functions");

    let mut conn = db.connect().await;
    sqlx::raw_sql("SELECT set_config('sales.user_id', '42', false)")
        .execute(&mut conn)
        .await
        .unwrap();
    let mut failures = Vec::new();
    for path in [
        format!("\"$user\", {schema}"),
        format!("{schema}, pg_catalog"),
    ] {
        for f in call_everything(&mut conn, &path, id, s[0]).await {
            failures.push(format!("search_path {path}: {f}"));
        }
    }
    // Retention, last (it empties the log): its report of what it pruned.
    sqlx::raw_sql(&format!("SET search_path = \"$user\", {schema}"))
        .execute(&mut conn)
        .await
        .unwrap();
    match sqlx::query_scalar::<_, i64>("SELECT sales.prune_events('0')")
        .fetch_one(&mut conn)
        .await
    {
        Ok(n) => assert!(n > 0, "something to prune"),
        Err(e) => failures.push(format!("sales.prune_events('0'): {}", pg_error(&e).1)),
    }
    assert!(
        failures.is_empty(),
        "the caller's functions ran:\n{}",
        failures.join("\n")
    );
}

/// The rule as the catalog shows it: every SQL and PL/pgSQL function of the
/// extension runs with `search_path = pg_catalog, pg_temp`, except the
/// document functions and `sales.current_actor()`, which stay without a SET
/// clause so that the planner inlines them into the queries that call them
/// (a document per row of a list, the actor per event row).
#[tokio::test]
async fn every_sql_function_has_a_fixed_search_path_or_is_inlined() {
    let db = TestDb::new().await;
    let unpinned: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text
         FROM pg_depend d
         JOIN pg_extension x ON x.oid = d.refobjid AND x.extname = 'pg_sales'
         JOIN pg_proc p ON p.oid = d.objid
         JOIN pg_language l ON l.oid = p.prolang
         WHERE d.classid = 'pg_proc'::regclass AND d.deptype = 'e' AND l.lanname IN ('sql', 'plpgsql')
           AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false)
         ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        unpinned,
        [
            "sales.current_actor()",
            "sales.sales_doc(sales.monthly_sales)",
            "sales.sales_doc(sales.monthly_sales,sales.stores)",
            "sales.store_doc(sales.stores)",
        ],
        "SQL and PL/pgSQL functions without search_path = pg_catalog, pg_temp"
    );
    // The migrations' own functions (the users triggers in `auth`) run as
    // whoever writes those tables by hand: pinned the same way.
    let outside: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text
         FROM pg_proc p
         JOIN pg_namespace n ON n.oid = p.pronamespace
         JOIN pg_language l ON l.oid = p.prolang
         WHERE n.nspname IN ('sales', 'auth') AND l.lanname IN ('sql', 'plpgsql')
           AND NOT EXISTS (SELECT FROM pg_depend d
                           WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
           AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false)
         ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        outside,
        Vec::<String>::new(),
        "the migrations' functions without search_path = pg_catalog, pg_temp"
    );
    let owned: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'auth' AND p.proname LIKE 'tg\\_%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        owned, 4,
        "the users triggers' functions (and the access announcement's) are where this test looks"
    );
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN (VERBOSE, COSTS OFF)
         SELECT sales.sales_doc(m, s), sales.store_doc(s), sales.current_actor()
         FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("jsonb_build_object")
            && plan.contains("current_setting")
            && !plan.contains("sales_doc")
            && !plan.contains("store_doc")
            && !plan.contains("current_actor"),
        "the documents and the actor are inlined:\n{plan}"
    );
}
