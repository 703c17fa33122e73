//! The SQL surface answers what the HTTP API answers: sales.list_sales,
//! sales.get_sales, sales.sales_summary, sales.summary, sales.list_stores and the COPY-ready
//! sales.export_monthly / sales.export_daily are compared with the same
//! requests over HTTP (an admin's, so no scope is added), byte for byte for
//! the CSV exports (up to line endings).

use futures_util::StreamExt;
use sales_e2e::{month, user_token, Api, TestDb};
use serde_json::Value;
use sqlx::Connection;

async fn seed(db: &TestDb) -> Vec<i64> {
    let stores = db.stores(4).await;
    let mut records = Vec::new();
    for (i, s) in stores.iter().enumerate() {
        for m in 1..=6 {
            if (i + m as usize).is_multiple_of(5) {
                continue; // holes, so filters and keys are not trivially dense
            }
            records.push(month(
                *s,
                2024,
                m,
                (m as u32 % 4) + 1,
                10.0 * f64::from(m) + i as f64,
            ));
        }
        records.push(month(*s, 2025, 1, 2, 1.5));
    }
    let r: Value = sqlx::query_scalar("SELECT sales.batch_upsert($1)")
        .bind(Value::Array(records))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(r["failed"], 0, "{r}");
    sqlx::query("UPDATE sales.stores SET status = 'closed' WHERE id = $1")
        .bind(stores[3])
        .execute(&db.pool)
        .await
        .unwrap();
    stores
}

async fn sql_docs(db: &TestDb, sql: &str) -> Vec<Value> {
    sqlx::query_scalar(sql)
        .fetch_all(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn copy_out(db: &TestDb, sql: &str) -> String {
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut stream = conn
        .copy_out_raw(&format!(
            "COPY ({sql}) TO STDOUT WITH (FORMAT csv, HEADER true)"
        ))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    String::from_utf8(out).unwrap()
}

async fn http_text(api: &Api, path: &str) -> String {
    let r = api.req(reqwest::Method::GET, path).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "{path}");
    r.text().await.unwrap()
}

#[tokio::test]
async fn sql_functions_answer_what_http_answers() {
    let db = TestDb::new().await;
    let stores = seed(&db).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "sql-surface@example.com", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let (s1, s2) = (stores[0], stores[1]);

    // Lists: filters, sort, projection, paging.
    let cases = [
        (
            format!("storeId={s1},{s2}&from=2024-02&to=2024-06&sort=-totalSales,storeId&fields=storeId,year,month,totalSales,dailyData.*.sales,store.code&limit=200"),
            format!("SELECT sales.list_sales(store_ids => '{{{s1},{s2}}}', from_period => '2024-02', to_period => '2024-06', sort => '-totalSales,storeId', fields => '{{storeId,year,month,totalSales,dailyData.*.sales,store.code}}', max_rows => 200)"),
        ),
        (
            "region=North&year=2024&exclude=dailyData,createdAt,updatedAt&sort=-period&limit=3&offset=2".to_string(),
            "SELECT sales.list_sales(region => 'North', year => 2024, exclude => '{dailyData,createdAt,updatedAt}', sort => '-period', max_rows => 3, skip_rows => 2)".to_string(),
        ),
        (
            "minTotalSales=100&maxTotalSales=122.5&month=3&limit=200".to_string(),
            "SELECT sales.list_sales(min_total_sales => 100, max_total_sales => 122.5, month => 3, max_rows => 200)".to_string(),
        ),
    ];
    for (query, sql) in &cases {
        let (status, body) = api.get(&format!("/api/v2/sales?{query}")).await;
        assert_eq!(status, 200, "{query}: {body}");
        let via_sql = sql_docs(&db, sql).await;
        assert!(
            !via_sql.is_empty(),
            "{sql} returned nothing; the case tests nothing"
        );
        assert_eq!(body["data"], Value::Array(via_sql), "{query} vs {sql}");
    }

    // One record.
    let id: i64 = sqlx::query_scalar("SELECT min(id) FROM sales.monthly_sales")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    for fields in ["", "&fields=id,store.name,dailyData.1"] {
        let (status, body) = api.get(&format!("/api/v2/sales/{id}?{fields}")).await;
        assert_eq!(status, 200);
        let f = fields.strip_prefix("&fields=").unwrap_or("");
        let doc: Value = sqlx::query_scalar("SELECT sales.get_sales($1, nullif($2, '')::text[])")
            .bind(id)
            .bind(if f.is_empty() {
                String::new()
            } else {
                format!("{{{f}}}")
            })
            .fetch_one(&db.pool)
            .await
            .unwrap();
        let http_doc = body.get("data").cloned().unwrap_or(body);
        assert_eq!(http_doc, doc, "record {id} {fields}");
    }
    let none: Option<Value> = sqlx::query_scalar("SELECT sales.get_sales(-1)")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(none, None);

    // Summaries.
    for group in ["store", "region", "month"] {
        let (status, body) = api
            .get(&format!(
                "/api/v2/sales/summary?groupBy={group}&from=2024-01&to=2024-12"
            ))
            .await;
        assert_eq!(status, 200, "{body}");
        let rows: Vec<Value> = sql_docs(
            &db,
            &format!(
                "SELECT jsonb_strip_nulls(jsonb_build_object('key', key, 'totalSales', total_sales,
                        'totalCustomers', total_customers, 'months', months, 'stores', stores,
                        'storeCode', store_code, 'storeName', store_name))
                 FROM sales.sales_summary('{group}', from_period => '2024-01', to_period => '2024-12')"
            ),
        )
        .await;
        // The legacy sales.sales_summary: the API's rows without the dimension member.
        let dim = if group == "store" { "storeId" } else { group };
        let legacy: Vec<Value> = body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.as_object_mut().unwrap().remove(dim);
                r
            })
            .collect();
        assert_eq!(Value::Array(legacy), Value::Array(rows), "groupBy={group}");
        // sales.summary: the same rows, dimensions included.
        let doc: Value = sqlx::query_scalar(&format!(
            "SELECT sales.summary('{group}', from_period => '2024-01', to_period => '2024-12')"
        ))
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(doc["rows"], body["data"], "groupBy={group}");
    }

    // Stores.
    let (status, body) = api
        .get("/api/v2/stores?status=open&fields=id,code,region")
        .await;
    assert_eq!(status, 200);
    let rows = sql_docs(
        &db,
        "SELECT sales.list_stores(status => 'open', fields => '{id,code,region}')",
    )
    .await;
    assert_eq!(rows.len(), 3);
    assert_eq!(body["data"], Value::Array(rows));
    // A region is trimmed as the API trims it.
    let (status, body) = api
        .get("/api/v2/stores?region=%20North%20&fields=id,region")
        .await;
    assert_eq!(status, 200);
    let rows = sql_docs(
        &db,
        "SELECT sales.list_stores(region => ' North ', fields => '{id,region}')",
    )
    .await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(body["data"], Value::Array(rows));

    // Exports: the same CSV bytes, also when resuming after a key.
    let after_month = format!("{s2}:2024-03");
    let after_day = format!("{s1}:2024-04-02");
    let exports = [
        (
            format!("format=csv&shape=monthly&storeId={s1},{s2}&from=2024-02"),
            format!("SELECT * FROM sales.export_monthly(store_ids => '{{{s1},{s2}}}', from_period => '2024-02')"),
        ),
        (
            format!("format=csv&shape=monthly&after={after_month}"),
            format!("SELECT * FROM sales.export_monthly(after_key => '{after_month}')"),
        ),
        (
            "format=csv&shape=daily&year=2024&minTotalSales=30".to_string(),
            "SELECT * FROM sales.export_daily(year => 2024, min_total_sales => 30)".to_string(),
        ),
        (
            format!("format=csv&shape=daily&after={after_day}"),
            format!("SELECT * FROM sales.export_daily(after_key => '{after_day}')"),
        ),
    ];
    for (query, sql) in &exports {
        let http = http_text(&api, &format!("/api/v2/sales/export?{query}")).await;
        let copied = copy_out(&db, sql).await;
        assert!(copied.lines().count() > 2, "{sql}: too few rows to compare");
        // The server ends CSV lines with CRLF (RFC 4180); COPY with LF.
        assert_eq!(http.replace("\r\n", "\n"), copied, "{query} vs {sql}");
    }
    server.stop().await;
}

#[tokio::test]
async fn sql_surface_rejects_bad_arguments_naming_them() {
    let db = TestDb::new().await;
    let cases = [
        (
            "SELECT sales.list_sales(from_period => '2024-13')",
            "from_period: \"2024-13\" is not a month like 2024-06",
        ),
        (
            "SELECT sales.list_sales(year => 1999)",
            "year: 1999 is outside 2000..2100",
        ),
        (
            "SELECT sales.list_sales(sort => 'colour')",
            "sort: cannot sort by \"colour\"",
        ),
        ("SELECT sales.list_sales(fields => '{colour}')", "colour"),
        (
            "SELECT sales.list_sales(max_rows => 0)",
            "max_rows: 0 is not a page size",
        ),
        (
            "SELECT * FROM sales.sales_summary('week')",
            "group_by must be store, region or month, not week",
        ),
        (
            "SELECT * FROM sales.export_daily(after_key => '1:2024-03')",
            "after_key: \"1:2024-03\" is not a daily row key like 12:2024-03-05",
        ),
        (
            "SELECT * FROM sales.list_stores(status => 'gone')",
            "status must be open, closed or renovating, not gone",
        ),
        (
            "SELECT * FROM sales.list_stores(region => ' ')",
            "region: must not be empty (NULL for every region)",
        ),
        (
            "SELECT * FROM sales.list_stores(region => E'North\\n')",
            "region: must not contain control characters",
        ),
        (
            "SELECT * FROM sales.list_stores(region => repeat('n', 101))",
            "region: at most 100 characters",
        ),
    ];
    for (sql, message) in cases {
        let e = sqlx::query(sql).execute(&db.pool).await.unwrap_err();
        assert_eq!(
            sales_e2e::sqlstate(&e).as_deref(),
            Some("22023"),
            "{sql}: {e}"
        );
        assert!(e.to_string().contains(message), "{sql}: {e}");
    }
}
