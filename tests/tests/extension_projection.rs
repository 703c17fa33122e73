//! `sales.project`, `sales.project_store`, `sales.project_each` and
//! `sales.check_fields` through SQL: nested paths, camelCase and snake_case,
//! wildcard days, exclude after fields, unknown and hostile names.

mod extension_support;

use extension_support::*;
use sales_e2e::TestDb;
use serde_json::{json, Value};

async fn project(
    db: &TestDb,
    doc: &Value,
    fields: &[&str],
    exclude: &[&str],
) -> Result<Value, sqlx::Error> {
    sqlx::query_scalar("SELECT sales.project($1, $2, $3)")
        .bind(doc)
        .bind(fields)
        .bind(exclude)
        .fetch_one(&db.pool)
        .await
}

/// A real document: `sales.sales_doc(m, s)` of one stored month.
async fn sample(db: &TestDb) -> Value {
    let s = db.stores(1).await[0];
    upsert_ok(
        db,
        &json!([record(
            s,
            2024,
            1,
            json!({"1": {"sales": 10, "customers": 2}, "2": {"sales": 20, "customers": 3}})
        )]),
    )
    .await;
    sqlx::query_scalar(
        "SELECT sales.sales_doc(m, s) FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn fields_nested_paths_and_both_spellings() {
    let db = TestDb::new().await;
    let doc = sample(&db).await;
    assert_eq!(doc["store"]["code"], "T001");

    let out = project(&db, &doc, &["id", "store_id", "total_sales"], &[])
        .await
        .unwrap();
    assert_eq!(
        out,
        json!({"id": doc["id"], "storeId": doc["storeId"], "totalSales": 30})
    );
    let out = project(
        &db,
        &doc,
        &["dailyData.1.sales", "store.name", "daily_data.2.customers"],
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        out,
        json!({"dailyData": {"1": {"sales": 10}, "2": {"customers": 3}}, "store": {"name": "Store T001"}})
    );
    // Wildcard days.
    let out = project(&db, &doc, &["dailyData.*.sales"], &[])
        .await
        .unwrap();
    assert_eq!(
        out,
        json!({"dailyData": {"1": {"sales": 10}, "2": {"sales": 20}}})
    );
    // exclude applies after fields.
    let out = project(
        &db,
        &doc,
        &["year", "month", "dailyData"],
        &["dailyData.2", "daily_data.*.customers"],
    )
    .await
    .unwrap();
    assert_eq!(
        out,
        json!({"year": 2024, "month": 1, "dailyData": {"1": {"sales": 10}}})
    );
    // exclude alone keeps everything else.
    let out = project(
        &db,
        &doc,
        &[],
        &["dailyData", "store", "createdAt", "updated_at"],
    )
    .await
    .unwrap();
    let mut keys: Vec<&str> = out
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "daysReported",
            "id",
            "month",
            "storeId",
            "totalCustomers",
            "totalSales",
            "version",
            "year"
        ]
    );
    // NULL or empty lists: the document as it is; a NULL document stays NULL.
    let out: Value = sqlx::query_scalar("SELECT sales.project($1)")
        .bind(&doc)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(out, doc);
    assert_eq!(project(&db, &doc, &[], &[]).await.unwrap(), doc);
    let out: Option<Value> = sqlx::query_scalar("SELECT sales.project(NULL, ARRAY['id'])")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(out, None);
}

#[tokio::test]
async fn unknown_and_hostile_field_names_are_refused_by_name() {
    let db = TestDb::new().await;
    let doc = sample(&db).await;
    for (fields, exclude, named) in [
        (vec!["id", "colour"], vec![], "colour"),
        (vec!["dailyData.32"], vec![], "dailyData.32"),
        (vec!["dailyData.01"], vec![], "dailyData.01"),
        (vec!["dailyData.1.profit"], vec![], "dailyData.1.profit"),
        (vec!["store.secret"], vec![], "store.secret"),
        (vec!["year.value"], vec![], "year.value"),
        (vec!["id"], vec!["nope"], "nope"),
        (vec!["store__id"], vec![], "store__id"),
        (vec!["STOREID"], vec![], "STOREID"),
        (
            vec!["id; DROP TABLE sales.stores; --"],
            vec![],
            "id; DROP TABLE sales.stores; --",
        ),
        (
            vec!["id\") FROM pg_user --"],
            vec![],
            "id\") FROM pg_user --",
        ),
        (vec!["daily_data->>'1'"], vec![], "daily_data->>'1'"),
        (vec!["(select 1)"], vec![], "(select 1)"),
        (vec![""], vec![], "empty field name"),
    ] {
        let e = project(&db, &doc, &fields, &exclude).await.unwrap_err();
        let (code, message, _) = pg_error(&e);
        assert_eq!(code, "22023", "{fields:?}: {message}");
        assert!(
            message.contains(named),
            "{fields:?}: message {message:?} should name {named:?}"
        );
    }
    // Still there.
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.stores").await,
        1
    );
    // Too many paths.
    let many: Vec<String> = (0..201).map(|_| "id".to_string()).collect();
    let r = sqlx::query_scalar::<_, Value>("SELECT sales.project($1, $2)")
        .bind(&doc)
        .bind(&many)
        .fetch_one(&db.pool)
        .await;
    assert!(expect_code(r, "22023").contains("at most 200"));
    // A list of NULLs names nothing: refused (it read as every field, the
    // whole document); a NULL beside a path is passed over.
    for sql in [
        "SELECT sales.project($1, ARRAY[NULL]::text[])",
        "SELECT sales.project($1, ARRAY[NULL, NULL]::text[])",
    ] {
        let r = sqlx::query_scalar::<_, Value>(sql)
            .bind(&doc)
            .fetch_one(&db.pool)
            .await;
        assert!(expect_code(r, "22004").contains("names nothing"), "{sql}");
    }
    let r = sqlx::query_scalar::<_, Value>(
        "SELECT count(*)::int FROM sales.list_sales(fields => ARRAY[NULL]::text[])",
    )
    .fetch_one(&db.pool)
    .await;
    assert!(expect_code(r, "22004").contains("names nothing"));
    let kept: Value = sqlx::query_scalar("SELECT sales.project($1, ARRAY['id', NULL])")
        .bind(&doc)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(kept, json!({"id": doc["id"]}));
}

#[tokio::test]
async fn project_store_project_each_and_check_fields() {
    let db = TestDb::new().await;
    let doc = sample(&db).await;

    let out: Value = sqlx::query_scalar(
        "SELECT sales.project_store(sales.store_doc(s), ARRAY['id', 'name', 'status'], ARRAY['status']) FROM sales.stores s",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(out, json!({"id": doc["storeId"], "name": "Store T001"}));
    // A store document has no dailyData.
    let r = sqlx::query_scalar::<_, Value>(
        "SELECT sales.project_store(sales.store_doc(s), ARRAY['dailyData']) FROM sales.stores s",
    )
    .fetch_one(&db.pool)
    .await;
    assert!(expect_code(r, "22023").contains("dailyData"));

    // project_each: one row per document, paths checked once.
    let docs = json!([doc.clone(), {"id": 2, "year": 2023, "dailyData": {"5": {"sales": 1}}}]);
    let out: Vec<Value> =
        sqlx::query_scalar("SELECT sales.project_each($1, ARRAY['id', 'dailyData.*.sales'])")
            .bind(&docs)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        out,
        vec![
            json!({"id": doc["id"], "dailyData": {"1": {"sales": 10}, "2": {"sales": 20}}}),
            json!({"id": 2, "dailyData": {"5": {"sales": 1}}})
        ]
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.project_each('[]', ARRAY['id'])")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
    expect_code(
        sqlx::query_scalar::<_, Value>("SELECT sales.project_each('{}')")
            .fetch_one(&db.pool)
            .await,
        "22023",
    );
    expect_code(
        sqlx::query_scalar::<_, Value>("SELECT sales.project_each('[]', ARRAY['nope'])")
            .fetch_one(&db.pool)
            .await,
        "22023",
    );

    // Inside a query: the server asks Postgres for already-projected rows.
    let out: Vec<Value> = sqlx::query_scalar(
        "SELECT sales.project(sales.sales_doc(m), $1) FROM sales.monthly_sales m ORDER BY m.id",
    )
    .bind(vec!["month", "total_customers"])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(out, vec![json!({"month": 1, "totalCustomers": 5})]);

    // check_fields: canonical camelCase paths, or 22023 naming the bad one.
    let canon: Vec<String> = sqlx::query_scalar(
        "SELECT sales.check_fields(ARRAY['store_id', 'daily_data.*.sales', 'store.created_at'])",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        canon,
        vec!["storeId", "dailyData.*.sales", "store.createdAt"]
    );
    let msg = expect_code(
        sqlx::query_scalar::<_, Vec<String>>("SELECT sales.check_fields(ARRAY['id', 'price'])")
            .fetch_one(&db.pool)
            .await,
        "22023",
    );
    assert!(msg.contains("price"), "{msg}");
    let none: Option<Vec<String>> = sqlx::query_scalar("SELECT sales.check_fields(NULL)")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(none, None);
}

/// Projection copies values as the document stores them: a number keeps
/// its digits and its scale (`10.50`, not `10.5`; no rounding through a
/// float), whichever fields are picked, and the result is what the
/// projection rules of `sales_core` give for every field list tried.
#[tokio::test]
async fn projected_values_are_copied_as_stored() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    // As text: a JSON value built in Rust would hold 10.50 as the float 10.5.
    sqlx::query(
        r#"INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
           VALUES ($1, 2024, 3, '{"1": {"sales": 10.50, "customers": 2}, "2": {"sales": 123456789012.05, "customers": 3}}')"#,
    )
    .bind(s)
    .execute(&db.pool)
    .await
    .unwrap();
    // The stored document as text, and projections of it as text.
    let text = |fields: &[&str], exclude: &[&str]| {
        let fields: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
        let exclude: Vec<String> = exclude.iter().map(|f| f.to_string()).collect();
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT sales.project(sales.sales_doc(m, st), $1, $2)::text
                 FROM sales.monthly_sales m JOIN sales.stores st ON st.id = m.store_id",
            )
            .bind(fields)
            .bind(exclude)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let days = text(&["dailyData"], &[]).await;
    assert_eq!(
        days,
        r#"{"dailyData": {"1": {"sales": 10.50, "customers": 2}, "2": {"sales": 123456789012.05, "customers": 3}}}"#
    );
    let total = text(&["totalSales", "dailyData.1.sales"], &[]).await;
    assert_eq!(
        total,
        r#"{"dailyData": {"1": {"sales": 10.50}}, "totalSales": 123456789022.55}"#
    );

    let full: Value = serde_json::from_str(&text(&[], &[]).await).unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (&["id", "storeId", "year", "month"], &[]),
        (&["dailyData.*.sales"], &[]),
        (
            &["dailyData.2", "dailyData.*.customers"],
            &["dailyData.2.sales"],
        ),
        (&["dailyData.9"], &[]),
        (&[], &["dailyData", "store.region"]),
        (&["store"], &["store.name"]),
        (&["store.code", "version", "updated_at"], &["version"]),
    ];
    for (fields, exclude) in cases {
        let expected = sales_core::projection::Projection::new(
            &sales_core::projection::SALES_DOC,
            fields,
            exclude,
        )
        .unwrap()
        .apply(&full);
        let got: Value = serde_json::from_str(&text(fields, exclude).await).unwrap();
        assert_eq!(got, expected, "{fields:?} / {exclude:?}");
    }
}

/// The server writes an unprojected document as text itself
/// (`sales_core::sql::SALES_DOC_TEXT`); it must be `sales.sales_doc(m)::text`
/// byte for byte, in any time zone, for every shape of row.
#[tokio::test]
async fn sales_doc_text_is_sales_doc() {
    let db = TestDb::new().await;
    let s = db.stores(2).await;
    for (i, daily) in [
        "{}",
        r#"{"1": {"sales": 10.50, "customers": 2}}"#,
        r#"{"31": {"sales": 0, "customers": 0, "transactions": 7}, "2": {"sales": 123456789012.05}}"#,
        r#"{"3": {"customers": 12}, "4": {"sales": 0.001}}"#,
    ]
    .iter()
    .enumerate()
    {
        sqlx::query(
            "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data) VALUES ($1, 2024, $2, $3::jsonb)",
        )
        .bind(s[i % 2])
        .bind(i as i32 + 1)
        .bind(daily)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    upsert_ok(
        &db,
        &json!([record(s[1], 2025, 12, days(1, 31, 1234.5, 17))]),
    )
    .await;
    // Totals that are not finite numbers, written past the row trigger.
    sqlx::raw_sql(
        "SET session_replication_role = replica;
         UPDATE sales.monthly_sales m SET total_sales = v.t
         FROM (VALUES (2, 'NaN'::numeric), (3, 'Infinity'), (4, '-Infinity')) v(month, t)
         WHERE m.year = 2024 AND m.month = v.month;
         SET session_replication_role = origin;",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    for zone in ["UTC", "Asia/Kolkata", "America/St_Johns"] {
        sqlx::query(&format!("SET TimeZone = '{zone}'"))
            .execute(&mut *conn)
            .await
            .unwrap();
        let rows: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT sales.sales_doc(m)::text, {} FROM sales.monthly_sales m ORDER BY m.id",
            sales_core::sql::SALES_DOC_TEXT
        ))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        assert_eq!(rows.len(), 5);
        for (doc, text) in rows {
            assert_eq!(text, doc, "{zone}");
            let parsed: Result<serde_json::Value, _> = serde_json::from_str(&text);
            assert!(parsed.is_ok(), "not JSON: {text}");
        }
    }
}
