//! Imports and asynchronous batches against real Postgres, Redis and an
//! in-process server: POS files with every kind of bad row, export round
//! trips, whole-file refusals, scope, cancellation, `?async=true`, and the
//! command line.

use sales_e2e::{eventually, user_token, Api, TestDb};
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

/// POSTs a file; (status, body, Location).
async fn post_file(
    api: &Api,
    query: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value, Option<String>) {
    let r = api
        .req(reqwest::Method::POST, &format!("/api/v2/imports{query}"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("upload");
    let status = r.status().as_u16();
    let location = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    assert!(status < 500, "upload answered {status}");
    (status, r.json().await.unwrap_or(Value::Null), location)
}

/// Waits until the job is in one of `states`.
async fn wait_job(api: &Api, id: i64, states: &[&str]) -> Value {
    eventually(WAIT, &format!("job {id} to reach {states:?}"), || async {
        let (status, doc) = api.get(&format!("/api/v2/imports/{id}")).await;
        assert_eq!(status, 200, "{doc}");
        states
            .contains(&doc["state"].as_str().unwrap_or_default())
            .then_some(doc)
    })
    .await
}

/// (line, column) of each rejected row a job reports ("-" for no column).
fn error_lines(doc: &Value) -> Vec<(i64, String)> {
    doc["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["line"].as_i64().unwrap(),
                e["column"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect()
}

async fn scalar_i64(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

#[tokio::test]
async fn a_pos_file_with_every_kind_of_bad_row() {
    let db = TestDb::new().await;
    let stores = db.stores(2).await; // T001, T002
    let server = db.server(&[]).await;
    let (user, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    // BOM, `;`, CRLF, columns in another order, a decimal comma, an optional
    // column left out (customers), and one bad row of each kind.
    let file = "\u{feff}Transactions;Sales;Date;Store_Code\r\n\
                12;1234,50;2024-02-29;T001\r\n\
                3;10;2024-02-28;T002\r\n\
                1;1;2023-02-29;T001\r\n\
                1;1;2024-02-30;T001\r\n\
                1;-5;2024-02-01;T001\r\n\
                1;abc;2024-02-01;T001\r\n\
                1;1;someday;T001\r\n\
                1;1;2024-02-01;NOPE\r\n\
                1;1;2024-02-01\r\n\
                2.5;1;2024-02-02;T001\r\n\
                ;7;2024-03-01;T001\r\n";
    let (status, body, location) = post_file(&api, "", "text/csv; charset=utf-8", file).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_i64().unwrap();
    assert_eq!(
        location.as_deref(),
        Some(format!("/api/v2/imports/{id}").as_str())
    );
    assert_eq!(body["format"], "daily");
    let doc = wait_job(&api, id, &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(doc["rowsRead"], 11);
    assert_eq!(doc["rowsWritten"], 3);
    assert_eq!(doc["rowsRejected"], 8);
    assert_eq!(
        doc["lastLine"], 12,
        "the file's last line, not the chunk's end"
    );
    let errors = error_lines(&doc);
    assert_eq!(
        errors,
        vec![
            (4, "date".into()),
            (5, "date".into()),
            (6, "sales".into()),
            (7, "sales".into()),
            (8, "date".into()),
            (9, "store_code".into()),
            (10, "-".into()),
            (11, "transactions".into()),
        ]
    );
    let reasons: Vec<&str> = doc["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons[0].contains("day 29 does not exist in 2023-02"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("day 30 does not exist in 2024-02"));
    assert_eq!(reasons[2], "must not be negative");
    assert!(reasons[3].contains("not a number"));
    assert!(
        reasons[5].contains("unknown store 'NOPE'"),
        "{}",
        reasons[5]
    );
    assert!(reasons[6].contains("malformed line"));
    assert_eq!(reasons[7], "must be a whole number");

    // Numbers arrive exactly as written; the optional column is absent.
    let feb: Value = sqlx::query_scalar(
        "SELECT daily_data FROM sales.monthly_sales WHERE store_id = $1 AND year = 2024 AND month = 2",
    )
    .bind(stores[0])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(feb, json!({"29": {"sales": 1234.50, "transactions": 12}}));
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.monthly_sales").await,
        3
    );
    // Events as the batch path makes them, the completion to the importer.
    assert_eq!(
        scalar_i64(
            &db,
            "SELECT count(*) FROM sales.events WHERE kind = 'sales-data-created'"
        )
        .await,
        3
    );
    let done: (Option<i64>, Option<i64>, Value) = sqlx::query_as(
        "SELECT user_id, actor_id, payload FROM sales.events WHERE kind = 'import-completed'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((done.0, done.1), (Some(user), Some(user)));
    assert_eq!(done.2["rowsWritten"], 3);
    assert_eq!(done.2["state"], "completed");
    // Every event of the import names the importer as its actor (the
    // fixtures' store and user events are not the import's).
    assert_eq!(
        scalar_i64(
            &db,
            &format!("SELECT count(*) FROM sales.events WHERE kind NOT LIKE 'store-%' AND kind NOT LIKE 'user-%' AND actor_id IS DISTINCT FROM {user}")
        )
        .await,
        0
    );
    // Staged rows are gone.
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM jobs.import_rows").await,
        0
    );
    let (status, list) = api.get("/api/v2/imports").await;
    assert_eq!(status, 200);
    assert_eq!(list["data"][0]["id"], id);
    server.stop().await;
}

#[tokio::test]
async fn empty_binary_and_wrong_header_files_are_refused_before_queueing() {
    let db = TestDb::new().await;
    db.stores(1).await;
    let server = db.server(&[("IMPORT_MAX_BYTES", "2000")]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    for (what, body, ct) in [
        ("empty", b"".to_vec(), "text/csv"),
        ("blank", b"\r\n\r\n".to_vec(), "text/csv"),
        (
            "binary",
            b"PK\x03\x04\x00\x00binary\xff\xfe".to_vec(),
            "text/csv",
        ),
        ("wrong header", b"foo,bar\n1,2\n".to_vec(), "text/csv"),
        ("no header", b"T001,2024-01-01,5\n".to_vec(), "text/csv"),
        (
            "header only",
            b"store_code,date,sales\n".to_vec(),
            "text/csv",
        ),
        ("empty ndjson", b"\n".to_vec(), "application/x-ndjson"),
    ] {
        let (status, body, _) = post_file(&api, "", ct, body).await;
        assert_eq!(status, 400, "{what}: {body}");
        assert_eq!(body["error"]["code"], "bad_parameter", "{what}: {body}");
    }
    let big = format!(
        "store_code,date,sales\n{}",
        "T001,2024-01-01,5\n".repeat(200)
    );
    let (status, body, _) = post_file(&api, "", "text/csv", big).await;
    assert_eq!(status, 413, "{body}");
    let (status, _, _) = post_file(&api, "", "application/pdf", "x").await;
    assert_eq!(status, 415);
    // A CSV shape asked of an NDJSON body.
    let line = r#"{"storeCode":"T001","year":2024,"month":1,"dailyData":{"1":{"sales":5}}}"#;
    let (status, body, _) = post_file(&api, "?format=monthly", "application/x-ndjson", line).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["details"]["parameter"], "format", "{body}");
    assert_eq!(scalar_i64(&db, "SELECT count(*) FROM jobs.jobs").await, 0);
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM jobs.import_rows").await,
        0
    );
    server.stop().await;
}

/// Exports of one database imported into another that has the same stores
/// and no sales: exporting again gives the same bytes.
#[tokio::test]
async fn an_export_imported_into_an_empty_database_gives_identical_data() {
    let source = TestDb::new().await;
    let stores = source.stores(3).await;
    let server = source.server(&[]).await;
    let (_, token) = user_token(&source, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let mut records = Vec::new();
    for (i, s) in stores.iter().enumerate() {
        for m in 1..=3 {
            let mut daily = serde_json::Map::new();
            for d in 1..=(10 + i as u32 * 5) {
                let mut day = json!({"sales": 100.25 * d as f64 + m as f64, "customers": d + 3});
                if d % 3 == 0 {
                    day["transactions"] = json!(d * 2);
                }
                if d % 7 == 0 {
                    day = json!({"sales": 0.5});
                }
                daily.insert(d.to_string(), day);
            }
            records.push(json!({"storeId": s, "year": 2024, "month": m, "dailyData": daily}));
        }
    }
    let (status, body) = api
        .post("/api/v2/sales/batch", &json!({"salesDataArray": records}))
        .await;
    assert_eq!(status, 200, "{body}");
    let export = |api: Api, shape: &'static str| async move {
        let r = api
            .req(
                reqwest::Method::GET,
                &format!("/api/v2/sales/export?format=csv&shape={shape}"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.text().await.unwrap()
    };
    let daily = export(api.clone(), "daily").await;
    let monthly = export(api.clone(), "monthly").await;
    server.stop().await;

    for (shape, file) in [("daily", &daily), ("monthly", &monthly)] {
        let target = TestDb::new().await;
        target.stores(3).await;
        let server = target.server(&[("IMPORT_CHUNK_LINES", "7")]).await;
        let (_, token) = user_token(&target, &server, "admin@x.test", "admin", &[]).await;
        let api = Api::new(&server, Some(&token));
        let (status, body, _) = post_file(&api, "", "text/csv", file.clone()).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["format"], shape);
        let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
        assert_eq!(doc["state"], "completed", "{doc}");
        assert_eq!(doc["rowsRejected"], 0, "{doc}");
        assert!(doc["chunks"].as_i64().unwrap() >= 2, "{doc}");
        let again = export(api.clone(), shape).await;
        assert_eq!(&again, file, "{shape} export after import");
        if shape == "daily" {
            // The daily shape carries every metric: the months are equal.
            let q = "SELECT jsonb_agg(jsonb_build_object('s', store_id, 'y', year, 'm', month, 'd', daily_data)
                     ORDER BY store_id, year, month) FROM sales.monthly_sales";
            let a: Value = sqlx::query_scalar(q).fetch_one(&source.pool).await.unwrap();
            let b: Value = sqlx::query_scalar(q).fetch_one(&target.pool).await.unwrap();
            assert_eq!(a, b);
        }
        server.stop().await;
    }
}

#[tokio::test]
async fn a_manager_imports_only_their_stores() {
    let db = TestDb::new().await;
    let stores = db.stores(3).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "m@x.test", "manager", &stores[..1]).await;
    let api = Api::new(&server, Some(&token));
    let file = "store_id,date,sales\n\
                1,2024-05-01,10\n\
                2,2024-05-01,20\n\
                1,2024-05-02,11\n";
    let file = file
        .replace("1,", &format!("{},", stores[0]))
        .replace("\n2,", &format!("\n{},", stores[1]));
    let (status, body, _) = post_file(&api, "", "text/csv", file).await;
    assert_eq!(status, 202, "{body}");
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(doc["rowsWritten"], 2);
    assert_eq!(doc["rowsRejected"], 1);
    assert_eq!(doc["errors"][0]["line"], 3);
    assert_eq!(doc["errors"][0]["column"], "store_id");
    // Said as of a store that does not exist: the file cannot tell which
    // stores exist outside the caller's scope.
    assert_eq!(
        doc["errors"][0]["reason"],
        format!("unknown store {}, or not one of your stores", stores[1])
    );
    let file = format!("store_id,date,sales\n{},2024-05-03,10\n", i64::MAX / 2);
    let (status, body, _) = post_file(&api, "", "text/csv", file).await;
    assert_eq!(status, 202, "{body}");
    let none = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(
        none["errors"][0]["reason"],
        format!("unknown store {}, or not one of your stores", i64::MAX / 2)
    );
    // A code no store can have, refused as the file is read, reads the
    // same as one the merge finds unknown.
    let file = "store_code,date,sales\nNOPE,2024-05-03,10\nNO PE,2024-05-03,10\n";
    let (status, body, _) = post_file(&api, "", "text/csv", file.to_string()).await;
    assert_eq!(status, 202, "{body}");
    let codes = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    let reasons: Vec<&str> = codes["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        vec![
            "unknown store 'NOPE', or not one of your stores",
            "unknown store 'NO PE', or not one of your stores"
        ],
        "{codes}"
    );
    assert_eq!(
        scalar_i64(
            &db,
            &format!(
                "SELECT count(*) FROM sales.monthly_sales WHERE store_id <> {}",
                stores[0]
            )
        )
        .await,
        0
    );
    // Another user's job is not found; admins see it.
    let (_, other) = user_token(&db, &server, "o@x.test", "manager", &stores[1..2]).await;
    let (status, _) = Api::new(&server, Some(&other))
        .get(&format!("/api/v2/imports/{}", body["id"]))
        .await;
    assert_eq!(status, 404);
    let (_, admin) = user_token(&db, &server, "a@x.test", "admin", &[]).await;
    let (status, _) = Api::new(&server, Some(&admin))
        .get(&format!("/api/v2/imports/{}", body["id"]))
        .await;
    assert_eq!(status, 200);
    server.stop().await;
}

/// A file of `n` daily lines over `stores` stores, one day each.
fn big_file(codes: &[String], n: usize) -> String {
    let mut s = String::from("store_code,date,sales,customers\n");
    let mut i = 0;
    'out: for y in 2001..2100 {
        for m in 1..=12 {
            for d in 1..=28 {
                for c in codes {
                    if i == n {
                        break 'out;
                    }
                    s.push_str(&format!(
                        "{c},{y}-{m:02}-{d:02},{}.5,{}\n",
                        i % 1000,
                        i % 50
                    ));
                    i += 1;
                }
            }
        }
    }
    s
}

#[tokio::test]
async fn cancelling_stops_between_chunks_and_keeps_what_committed() {
    let db = TestDb::new().await;
    db.stores(4).await;
    let server = db
        .server(&[("IMPORT_CHUNK_LINES", "50"), ("JOB_WORKERS", "1")])
        .await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let codes: Vec<String> = (1..=4).map(|i| format!("T{i:03}")).collect();
    let (status, body, _) = post_file(&api, "", "text/csv", big_file(&codes, 20_000)).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_i64().unwrap();
    eventually(WAIT, "a first chunk", || async {
        let (_, doc) = api.get(&format!("/api/v2/imports/{id}")).await;
        (doc["rowsWritten"].as_i64().unwrap_or(0) > 0).then_some(())
    })
    .await;
    let r = api
        .req(reqwest::Method::DELETE, &format!("/api/v2/imports/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let doc = wait_job(&api, id, &["cancelled", "completed"]).await;
    assert_eq!(doc["state"], "cancelled", "{doc}");
    let written = doc["rowsWritten"].as_i64().unwrap();
    assert!(written > 0 && written < 20_000, "{doc}");
    // Exactly the committed chunks' days are in the table.
    let days = scalar_i64(
        &db,
        "SELECT coalesce(sum(days_reported), 0)::bigint FROM sales.monthly_sales",
    )
    .await;
    assert_eq!(days, written);
    eventually(WAIT, "the staged rows to go", || async {
        (scalar_i64(&db, "SELECT count(*) FROM jobs.import_rows").await == 0).then_some(())
    })
    .await;
    // A queued job is cancelled at once.
    let (_, body, _) = post_file(
        &api,
        "?dryRun=true",
        "text/csv",
        "store_code,date,sales\nT001,2024-01-01,1\n",
    )
    .await;
    let _ = api
        .req(
            reqwest::Method::DELETE,
            &format!("/api/v2/imports/{}", body["id"]),
        )
        .send()
        .await
        .unwrap();
    let doc = wait_job(
        &api,
        body["id"].as_i64().unwrap(),
        &["cancelled", "completed"],
    )
    .await;
    assert!(
        doc["state"] == "cancelled" || doc["rowsWritten"] == 1,
        "{doc}"
    );
    server.stop().await;
}

#[tokio::test]
async fn dry_run_and_max_errors() {
    let db = TestDb::new().await;
    db.stores(1).await;
    let server = db.server(&[("IMPORT_CHUNK_LINES", "2")]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let file = "store_code,date,sales\nT001,2024-01-01,1\nT001,2024-01-02,2\nX,2024-01-03,3\n";
    let (_, body, _) = post_file(&api, "?dryRun=true", "text/csv", file).await;
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(doc["dryRun"], true);
    assert_eq!(
        (doc["rowsWritten"].as_i64(), doc["rowsRejected"].as_i64()),
        (Some(2), Some(1))
    );
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.monthly_sales").await,
        0
    );
    assert_eq!(
        scalar_i64(
            &db,
            "SELECT count(*) FROM sales.events WHERE kind LIKE 'sales-data-%'"
        )
        .await,
        0
    );
    // More rejected rows than allowed: the job fails, and the chunk with
    // the extra one writes nothing. Chunks go in month and store order and
    // take whole store-months; at two rows each: January's two days of
    // T001 (lines 2 and 7), then February's X (unknown: the first rejected
    // row, allowed) with March's T001, then April's T001 with May's Y
    // (unknown: the second rejected row), which writes nothing.
    let file = "store_code,date,sales\nT001,2024-01-01,1\nX,2024-02-03,3\nT001,2024-04-04,4\nT001,2024-03-06,6\nY,2024-05-05,5\nT001,2024-01-02,2\n";
    let (_, body, _) = post_file(&api, "?maxErrors=1", "text/csv", file).await;
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(doc["state"], "failed", "{doc}");
    assert!(
        doc["lastError"].as_str().unwrap().contains("maxErrors"),
        "{doc}"
    );
    assert_eq!(doc["rowsRejected"], 2);
    let days = scalar_i64(
        &db,
        "SELECT coalesce(sum(days_reported), 0)::bigint FROM sales.monthly_sales",
    )
    .await;
    assert_eq!(days, doc["rowsWritten"].as_i64().unwrap());
    assert_eq!(days, 3, "{doc}");
    let months: Vec<(i32, Value)> =
        sqlx::query_as("SELECT month, daily_data FROM sales.monthly_sales ORDER BY month")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        months,
        vec![
            (1, json!({"1": {"sales": 1}, "2": {"sales": 2}})),
            (3, json!({"6": {"sales": 6}})),
        ],
        "January whole, March, and nothing of the failing chunk's April"
    );
    server.stop().await;
}

/// A file that names one store by code on some lines and by id on others:
/// the rows are staged under the store's id either way, so its month is
/// one chunk's, written once, and a day given both ways keeps the later
/// line's value, as in file order.
#[tokio::test]
async fn a_store_named_by_code_and_by_id_is_one_store_month() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    // One staged row per chunk: in key order, each store-month is a chunk.
    let server = db.server(&[("IMPORT_CHUNK_LINES", "1")]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let s = stores[0];
    let file = format!(
        "store_code,store_id,date,sales\n\
         ,{s},2024-01-05,100\n\
         T001,,2024-01-05,200\n\
         ,{s},2024-01-06,7\n\
         T001,,2024-01-07,8\n\
         T001,,2024-01-05,250\n\
         ,{s},2024-01-07,9\n"
    );
    let (st, body, _) = post_file(&api, "", "text/csv", file).await;
    assert_eq!(st, 202, "{body}");
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(doc["rowsWritten"], 6, "{doc}");
    let rows: Vec<(i64, Value, i64)> = sqlx::query_as(
        "SELECT store_id, daily_data, version FROM sales.monthly_sales ORDER BY year, month",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![(
            s,
            json!({"5": {"sales": 250}, "6": {"sales": 7}, "7": {"sales": 9}}),
            1
        )],
        "one version, the later line of each day"
    );
    assert_eq!(
        scalar_i64(
            &db,
            "SELECT count(*) FROM sales.events WHERE kind LIKE 'sales-data-%'"
        )
        .await,
        1
    );
    server.stop().await;
}

#[tokio::test]
async fn ndjson_records_import() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let body = format!(
        "{}\n{}\n{}\n",
        json!({"storeId": stores[0], "year": 2024, "month": 4, "dailyData": {"1": {"sales": 5.25}, "2": {"customers": 3}}}),
        json!({"storeId": stores[0], "year": 2024, "month": 4, "dailyData": {"31": {"sales": 1}}}),
        json!({"storeCode": "T001", "date": "2024-05-03", "sales": 7}),
    );
    let (status, body, _) = post_file(&api, "", "application/x-ndjson", body).await;
    assert_eq!(status, 202, "{body}");
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(
        (doc["rowsWritten"].as_i64(), doc["rowsRejected"].as_i64()),
        (Some(2), Some(1)),
        "{doc}"
    );
    assert_eq!(doc["errors"][0]["column"], "dailyData.31");
    let d: Value = sqlx::query_scalar("SELECT daily_data FROM sales.monthly_sales WHERE month = 4")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(d, json!({"1": {"sales": 5.25}, "2": {"customers": 3}}));
    server.stop().await;
}

#[tokio::test]
async fn an_async_batch_answers_202_and_reports_through_the_job() {
    let db = TestDb::new().await;
    let stores = db.stores(2).await;
    let server = db.server(&[]).await;
    let (user, token) = user_token(&db, &server, "s@x.test", "staff", &stores[..1]).await;
    let api = Api::new(&server, Some(&token));
    let records = json!({"salesDataArray": [
        sales_e2e::month(stores[0], 2024, 1, 3, 10.0),
        sales_e2e::month(stores[0], 2024, 2, 2, 10.0),
    ]});
    let r = api
        .req(reqwest::Method::POST, "/api/v2/sales/batch?async=true")
        .json(&records)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["kind"], "batch");
    assert_eq!(location, format!("/api/v2/imports/{}", body["id"]));
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(doc["result"]["inserted"], 2);
    assert!(doc["result"]["eventId"].as_i64().is_some());
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.monthly_sales").await,
        2
    );
    let actor: Option<i64> =
        sqlx::query_scalar("SELECT actor_id FROM sales.events WHERE kind = 'batch-completed'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(actor, Some(user));
    // Atomic with a bad record: nothing written, the report in the job.
    let bad = json!({"salesDataArray": [
        sales_e2e::month(stores[0], 2024, 3, 2, 10.0),
        {"storeId": stores[0], "year": 2024, "month": 4, "dailyData": {"31": {"sales": 1}}},
    ]});
    let (status, body) = api.post("/api/v2/sales/batch?async=true", &bad).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        (body["rowsRead"].as_i64(), body["rowsRejected"].as_i64()),
        (Some(2), Some(1)),
        "the record refused before queueing is counted: {body}"
    );
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(doc["state"], "failed", "{doc}");
    assert_eq!(doc["result"]["failed"], 1);
    assert_eq!(doc["result"]["errors"][0]["field"], "dailyData.31");
    // The report is in `result`: nothing is said to be omitted.
    assert_eq!(doc["errorsOmitted"], 0, "{doc}");
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.monthly_sales").await,
        2
    );
    // Scope is checked before queueing, as for a synchronous batch.
    let (status, _) = api
        .post(
            "/api/v2/sales/batch?async=true",
            &json!({"salesDataArray": [sales_e2e::month(stores[1], 2024, 1, 1, 1.0)]}),
        )
        .await;
    assert_eq!(status, 403);
    // Numbers reach the table as written, as a synchronous batch writes
    // them: the job keeps the request's text, not floats.
    let body = format!(
        r#"{{"salesDataArray": [{{"storeId": {}, "year": 2024, "month": 5,
             "dailyData": {{"1": {{"sales": 12345678.123456789012}}}}}}]}}"#,
        stores[0]
    );
    let r = api
        .req(reqwest::Method::POST, "/api/v2/sales/batch?async=true")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let body: Value = r.json().await.unwrap();
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    let sales: String = sqlx::query_scalar(
        "SELECT daily_data->'1'->>'sales' FROM sales.monthly_sales WHERE month = 5",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(sales, "12345678.123456789012");
    server.stop().await;
}

/// `sales-server import <args>` against `db`, run to its end.
async fn cli_import<I, A>(db: &TestDb, args: I) -> std::process::Output
where
    I: IntoIterator<Item = A>,
    A: AsRef<std::ffi::OsStr>,
{
    tokio::process::Command::new(sales_e2e::server_bin())
        .arg("import")
        .args(args)
        .envs(db.env())
        .output()
        .await
        .expect("run sales-server import")
}

#[tokio::test]
async fn the_command_line_imports_with_a_report() {
    let db = TestDb::new().await;
    db.stores(2).await;
    let dir = std::env::temp_dir().join(format!("pgs_import_{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pos.csv");
    std::fs::write(
        &file,
        "date,store_code,sales\n2024-06-01,T001,5\n2024-06-31,T001,5\n2024-06-02,T002,7\n",
    )
    .unwrap();
    let run = |args: Vec<String>| cli_import(&db, args);
    let p = file.to_string_lossy().to_string();
    let out = run(vec![p.clone(), "--dry-run".into()]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("dry run"), "{text}");
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.monthly_sales").await,
        0
    );
    // One of each is said in the singular.
    let one = dir.join("one.csv");
    std::fs::write(&one, "date,store_code,sales\n2024-06-01,T001,5\n").unwrap();
    let out = run(vec![one.to_string_lossy().to_string(), "--dry-run".into()]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("read 1 line ("), "{text}");
    assert!(text.contains(": 1 line, 1 row would be written"), "{text}");
    let out = run(vec![p.clone()]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("2 rows written, 1 rejected"), "{text}");
    assert!(
        text.contains("line 3, column date: day 31 does not exist"),
        "{text}"
    );
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.monthly_sales").await,
        2
    );
    let bin = dir.join("x.bin");
    std::fs::write(&bin, [0u8, 1, 2, 3]).unwrap();
    let out = run(vec![bin.to_string_lossy().to_string()]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not text"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// An import run by the command line whose job another worker took over
/// (its lease given a new token, as a worker does with one that ran out)
/// writes nothing more and follows the job where it now runs: the command
/// ends as the job does.
#[tokio::test]
async fn the_command_line_follows_an_import_another_worker_took() {
    let db = TestDb::new().await;
    let store = db.stores(1).await[0];
    sqlx::query("SELECT sales.batch_upsert($1)")
        .bind(
            json!([{"storeId": store, "year": 2024, "month": 1, "dailyData": {"1": {"sales": 1}}}]),
        )
        .execute(&db.pool)
        .await
        .unwrap();
    // The row the import writes is locked: its chunk waits, merging.
    let mut writer = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM sales.monthly_sales WHERE store_id = $1 FOR UPDATE")
        .bind(store)
        .execute(&mut *writer)
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("pgs_import_{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pos.csv");
    let mut csv = String::from("date,store_code,sales\n");
    for d in 1..=28 {
        csv.push_str(&format!("2024-01-{d:02},T001,{d}\n"));
    }
    std::fs::write(&file, csv).unwrap();
    let command = tokio::spawn(
        tokio::process::Command::new(sales_e2e::server_bin())
            .arg("import")
            .arg(&file)
            .envs(db.env())
            .kill_on_drop(true)
            .output(),
    );
    let job: i64 = eventually(WAIT, "the command's chunk waiting for the row", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT j.id FROM jobs.jobs j
             WHERE j.state = 'running'
               AND EXISTS (SELECT 1 FROM pg_stat_activity a
                           WHERE a.datname = current_database() AND a.wait_event_type = 'Lock')",
        )
        .fetch_optional(&db.pool)
        .await
        .unwrap()
    })
    .await;
    // Another worker takes the job over.
    sqlx::query(
        "UPDATE jobs.jobs SET lease_token = gen_random_uuid(), lease_until = now() - interval '1 second'
         WHERE id = $1",
    )
    .bind(job)
    .execute(&db.pool)
    .await
    .unwrap();
    writer.commit().await.unwrap();
    // The command's chunk ends (no transaction of the database writes
    // any more) having written nothing: its rows are still staged, the
    // month lacks them, and the command follows the job, still running
    // under the other token.
    eventually(WAIT, "the command's chunk ended", || async {
        let writing: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND backend_xid IS NOT NULL",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        (writing == 0).then_some(())
    })
    .await;
    assert!(
        !command.is_finished(),
        "the command ended before the job did"
    );
    assert_eq!(
        scalar_i64(&db, "SELECT rows_written FROM jobs.jobs").await,
        0,
        "the fenced-out chunk wrote nothing"
    );
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM jobs.import_rows").await,
        28,
        "the fenced-out chunk left its rows staged"
    );
    assert_eq!(
        scalar_i64(
            &db,
            "SELECT count(*) FROM sales.monthly_sales WHERE daily_data ? '28'"
        )
        .await,
        0
    );
    // A server's worker finds the lease run out and runs the job again.
    let server = db.server(&[]).await;
    let out = tokio::time::timeout(WAIT, command)
        .await
        .expect("the command ends with its job")
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("job {job}: completed")), "{text}");
    assert_eq!(
        scalar_i64(
            &db,
            "SELECT (daily_data->'28'->>'sales')::int8 FROM sales.monthly_sales"
        )
        .await,
        28
    );
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The importing user's WebSocket gets `import-progress` and a final
/// `import-completed` (stored, so it has an id); another user gets neither.
#[tokio::test]
async fn progress_and_completion_reach_the_importer_s_websocket() {
    use futures_util::{SinkExt, StreamExt};
    let db = TestDb::new().await;
    db.stores(2).await;
    let server = db.server(&[("IMPORT_CHUNK_LINES", "20")]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let (_, other) = user_token(&db, &server, "m@x.test", "manager", &[1]).await;
    let connect = |t: String| {
        let url = format!("ws://{}/ws?token={t}", server.addr);
        async move { tokio_tungstenite::connect_async(url).await.expect("ws").0 }
    };
    let mut mine = connect(token.clone()).await;
    let mut theirs = connect(other).await;
    let api = Api::new(&server, Some(&token));
    let codes = vec!["T001".to_string(), "T002".to_string()];
    let (status, body, _) = post_file(&api, "", "text/csv", big_file(&codes, 200)).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_i64().unwrap();
    let mut progress = 0;
    let (mut last_progress, mut stored) = (false, None);
    let completed: Value = tokio::time::timeout(WAIT, async {
        loop {
            let msg = mine.next().await.expect("open").expect("frame");
            let Ok(text) = msg.to_text() else { continue };
            let Ok(v) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            match v["event"].as_str() {
                Some("import-progress") => {
                    assert_eq!(v["data"]["jobId"], id);
                    progress += 1;
                    last_progress = v["data"]["state"] == "completed";
                }
                Some("import-completed") => stored = Some(v),
                _ => {}
            }
            // The end is told twice in one transaction: the stored event
            // and a last live progress message saying `completed`.
            if last_progress {
                if let Some(v) = stored.take() {
                    return v;
                }
            }
        }
    })
    .await
    .expect("import-completed and the last progress within the time");
    assert!(progress >= 1);
    assert!(
        completed["id"].as_i64().is_some(),
        "a stored event: {completed}"
    );
    assert_eq!(completed["data"]["jobId"], id);
    assert_eq!(completed["data"]["state"], "completed");
    assert_eq!(completed["data"]["rowsWritten"], 200);
    // The other user saw none of it: once the relay has dispatched the
    // whole log and the last progress message reached the importer (each
    // message is queued for every connection it goes to at once), a ping's
    // answer comes after anything that was sent to the other user.
    sales_e2e::relay_caught_up(&db, &server).await;
    theirs
        .send(tokio_tungstenite::tungstenite::Message::text(
            json!({"type": "ping"}).to_string(),
        ))
        .await
        .unwrap();
    let seen = tokio::time::timeout(WAIT, async {
        while let Some(Ok(m)) = theirs.next().await {
            let text = m.to_text().unwrap_or_default();
            if text.contains("import-") {
                return Some(text.to_string());
            }
            if text.contains("\"pong\"") {
                return None;
            }
        }
        panic!("the other user's connection closed")
    })
    .await
    .expect("a pong in time");
    assert_eq!(seen, None);
    server.stop().await;
}

/// An upload cut off mid-body (the client goes away) leaves no job and no
/// staged rows.
#[tokio::test]
async fn an_upload_cut_off_leaves_nothing_behind() {
    let db = TestDb::new().await;
    db.stores(2).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let codes = vec!["T001".to_string(), "T002".to_string()];
    // Far more than one COPY batch, then the stream fails.
    let file = big_file(&codes, 30_000);
    let (head, _) = file.split_at(file.len() / 2);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = head
        .as_bytes()
        .chunks(64 * 1024)
        .map(|c| Ok(c.to_vec()))
        .chain(std::iter::once(Err(std::io::Error::other(
            "client went away",
        ))))
        .collect();
    let sent = api
        .req(reqwest::Method::POST, "/api/v2/imports")
        .header("content-type", "text/csv")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await;
    assert!(sent.is_err() || sent.unwrap().status().as_u16() >= 400);
    eventually(WAIT, "nothing left of the upload", || async {
        let jobs = scalar_i64(&db, "SELECT count(*) FROM jobs.jobs").await;
        let rows = scalar_i64(&db, "SELECT count(*) FROM jobs.import_rows").await;
        (jobs == 0 && rows == 0).then_some(())
    })
    .await;
    server.stop().await;
}

/// Rows that pass the parser but that the merge refuses (here staged by
/// hand, as a file cannot get them past the parser) are reported with every
/// line of their record, beside rows refused by store; the chunk's other
/// records are written.
#[tokio::test]
async fn rows_the_merge_refuses_are_reported_by_line() {
    let db = TestDb::new().await;
    let stores = db.stores(2).await;
    let server = db.server(&[]).await;
    let (user, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    // The rows are staged first and the job then queued in one statement,
    // as an upload leaves them.
    let id: i64 = sqlx::query_scalar("SELECT nextval('jobs.jobs_id_seq')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO jobs.import_rows (job_id, line, day, store_code, store_id, year, month, sales)
         VALUES ($1, 2, 1, NULL, $2, 2019, 3, '5'),
                ($1, 3, 2, NULL, $2, 2019, 3, '-7'),
                ($1, 4, 1, NULL, $3, 2019, 3, '8'),
                ($1, 5, 1, 'NOPE', NULL, 2019, 3, '8')",
    )
    .bind(id)
    .bind(stores[0])
    .bind(stores[1])
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO jobs.jobs (id, kind, state, user_id, params, rows_read)
         VALUES ($1, 'import', 'queued', $2, '{\"dryRun\": false, \"maxErrors\": 100, \"format\": \"daily\"}', 4)",
    )
    .bind(id)
    .bind(user)
    .execute(&db.pool)
    .await
    .unwrap();
    let doc = wait_job(&api, id, &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(
        (doc["rowsWritten"].as_i64(), doc["rowsRejected"].as_i64()),
        (Some(1), Some(3)),
        "{doc}"
    );
    let errors = error_lines(&doc);
    assert_eq!(
        errors,
        vec![
            (2, "dailyData.2.sales".into()),
            (3, "dailyData.2.sales".into()),
            (5, "store_code".into()),
        ]
    );
    let written: Vec<(i64, Value)> =
        sqlx::query_as("SELECT store_id, daily_data FROM sales.monthly_sales WHERE year = 2019")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(written, vec![(stores[1], json!({"1": {"sales": 8}}))]);
}

/// A counter of the server's `/metrics` (0 before it first counts).
async fn counter(server: &sales_e2e::RunningServer, name: &str) -> f64 {
    let text = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The counter of chunks that rolled back after waiting for their turn.
async fn chunk_retries(server: &sales_e2e::RunningServer) -> f64 {
    counter(server, "import_chunk_retries_total").await
}

/// A store with one day in January and one in February 2024.
async fn store_with_two_months(db: &TestDb) -> i64 {
    let store = db.stores(1).await[0];
    for month in [1, 2] {
        sqlx::query(
            "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
             VALUES ($1, 2024, $2, '{\"1\": {\"sales\": 1}}')",
        )
        .bind(store)
        .bind(month)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    store
}

/// Locks one of the store's 2024 months (run it in a writer's transaction).
fn lock_month(
    store: i64,
    month: i32,
) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(
        "SELECT 1 FROM sales.monthly_sales WHERE store_id = $1 AND year = 2024 AND month = $2 FOR UPDATE",
    )
    .bind(store)
    .bind(month)
}

/// An import of two chunks (January and February 2024 of one store) while
/// a writer holds January's row: January's chunk waits for the row,
/// February's merges, waits for its turn and rolls back to wait without
/// its rows. Returns once it has (the server, the admin's client, the
/// writer's open transaction, the store and the job's id).
async fn january_held(
    db: &TestDb,
) -> (
    sales_e2e::RunningServer,
    Api,
    sqlx::Transaction<'static, sqlx::Postgres>,
    i64,
    i64,
) {
    let store = store_with_two_months(db).await;
    let server = db
        .server(&[("IMPORT_CHUNK_LINES", "1"), ("IMPORT_PARALLELISM", "2")])
        .await;
    let (_, token) = user_token(db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let retries_before = chunk_retries(&server).await;
    let mut writer = db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL lock_timeout = '30s'")
        .execute(&mut *writer)
        .await
        .unwrap();
    lock_month(store, 1).execute(&mut *writer).await.unwrap();
    let file = "store_code,date,sales\nT001,2024-01-05,10\nT001,2024-02-05,20\n";
    let (status, body, _) = post_file(&api, "", "text/csv", file).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_i64().unwrap();
    eventually(
        WAIT,
        "February's chunk to give up its rows while it waits",
        || async { (chunk_retries(&server).await > retries_before).then_some(()) },
    )
    .await;
    (server, api, writer, store, id)
}

/// Chunks merge side by side but commit in key order, and a chunk merged
/// ahead of its turn does not keep its rows locked while it waits: a
/// writer that holds a row of an earlier chunk and asks for one of a later
/// chunk's would otherwise wait for ever, in a circle Postgres cannot see
/// (earlier chunk → writer → later chunk → earlier chunk's commit).
#[tokio::test]
async fn a_chunk_waiting_for_its_turn_lets_go_of_its_rows() {
    let db = TestDb::new().await;
    let (server, api, mut writer, store, id) = january_held(&db).await;
    // February's row is free again: the writer takes it, and commits.
    lock_month(store, 2)
        .execute(&mut *writer)
        .await
        .expect("February's row, while its merged chunk waits for its turn");
    writer.commit().await.unwrap();
    let doc = wait_job(&api, id, &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(doc["rowsWritten"], 2, "{doc}");
    let months: Vec<(i32, i64, Value)> =
        sqlx::query_as("SELECT month, version, daily_data FROM sales.monthly_sales ORDER BY month")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        months,
        vec![
            (1, 2, json!({"1": {"sales": 1}, "5": {"sales": 10}})),
            (2, 2, json!({"1": {"sales": 1}, "5": {"sales": 20}})),
        ],
        "each month written once"
    );
    server.stop().await;
}

/// A cancel that comes while chunks are still merging (one waits for a
/// row a writer holds, the other for its turn) writes none of them: the
/// job ends `cancelled` with nothing written. A chunk merged again after
/// waiting for its turn used to commit after the cancel, and the job said
/// `cancelled` with the whole file written.
#[tokio::test]
async fn a_cancel_while_chunks_merge_writes_none_of_them() {
    let db = TestDb::new().await;
    let (server, api, writer, _, id) = january_held(&db).await;
    let r = api
        .req(reqwest::Method::DELETE, &format!("/api/v2/imports/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    writer.commit().await.unwrap();
    let doc = wait_job(&api, id, &["cancelled", "completed", "failed"]).await;
    assert_eq!(doc["state"], "cancelled", "{doc}");
    assert_eq!(doc["rowsWritten"], 0, "{doc}");
    let months: Vec<(i32, i64)> =
        sqlx::query_as("SELECT month, version FROM sales.monthly_sales ORDER BY month")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(months, vec![(1, 1), (2, 1)], "neither month written");
    server.stop().await;
}

/// A running batch is one transaction: cancelling it is refused at once
/// (409, saying why), where the request used to wait for the whole batch
/// and then answer `completed`; and the job's `finishedAt` is when it
/// finished, not its transaction's start (it said a few milliseconds after
/// `startedAt` for a batch that ran for seconds).
#[tokio::test]
async fn a_running_batch_refuses_a_cancel_and_says_when_it_finished() {
    let db = TestDb::new().await;
    let store = store_with_two_months(&db).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let mut writer = db.pool.begin().await.unwrap();
    lock_month(store, 1).execute(&mut *writer).await.unwrap();
    let held = std::time::Instant::now();
    let records = json!({"salesDataArray": [sales_e2e::month(store, 2024, 1, 3, 10.0)]});
    let (status, body) = api.post("/api/v2/sales/batch?async=true", &records).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_i64().unwrap();
    eventually(WAIT, "the batch waiting for the row", || async {
        let waiting = scalar_i64(
            &db,
            &format!(
                "SELECT count(*) FROM pg_stat_activity a JOIN jobs.jobs j ON j.worker_pid = a.pid
                 WHERE j.id = {id} AND j.state = 'running' AND a.wait_event_type = 'Lock'"
            ),
        )
        .await;
        (waiting > 0).then_some(())
    })
    .await;
    let r = api
        .req(reqwest::Method::DELETE, &format!("/api/v2/imports/{id}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot be stopped"),
        "{body}"
    );
    // Answered while the batch still waits for the row: the old answer
    // came only once the batch had ended, after the writer let go.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held_for = held.elapsed();
    writer.commit().await.unwrap();
    let doc = wait_job(&api, id, &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(doc["cancelRequested"], false, "{doc}");
    let ran: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM finished_at - started_at)::float8 FROM jobs.jobs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        ran >= 0.3 && ran <= held_for.as_secs_f64() + 60.0,
        "ran {ran} s while the row was held {held_for:?}"
    );
    server.stop().await;
}

/// A chunk that Postgres picks as the victim of a deadlock with another
/// writer is merged again in the same run: the job completes on its first
/// attempt, each row written once, with no error recorded.
#[tokio::test]
async fn a_chunk_that_loses_a_deadlock_is_merged_again() {
    let db = TestDb::new().await;
    let store = store_with_two_months(&db).await;
    // One connection, one chunk of both months: it takes January's row,
    // then waits for February's.
    let server = db
        .server(&[("IMPORT_CHUNK_LINES", "2"), ("IMPORT_PARALLELISM", "1")])
        .await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let deadlocks_before = counter(&server, "import_chunk_deadlock_retries_total").await;
    let mut writer = db.pool.begin().await.unwrap();
    // The chunk starts waiting first, so its deadlock check runs first and
    // picks it as the victim; the writer's own check would come a minute
    // later.
    sqlx::query("SET LOCAL deadlock_timeout = '60s'")
        .execute(&mut *writer)
        .await
        .unwrap();
    let writer_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *writer)
        .await
        .unwrap();
    let lock = |month: i32| lock_month(store, month);
    lock(2).execute(&mut *writer).await.unwrap();
    let file = "store_code,date,sales\nT001,2024-01-05,10\nT001,2024-02-05,20\n";
    let (status, body, _) = post_file(&api, "", "text/csv", file).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_i64().unwrap();
    eventually(WAIT, "the chunk to wait for February's row", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
        )
        .bind(writer_pid)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        (waiting > 0).then_some(())
    })
    .await;
    // January's row is the chunk's: asking for it closes the circle, and
    // the chunk's deadlock check rolls the chunk back.
    lock(1)
        .execute(&mut *writer)
        .await
        .expect("January's row, once the chunk lost the deadlock");
    sqlx::query(
        "UPDATE sales.monthly_sales SET daily_data = daily_data || '{\"2\": {\"sales\": 2}}'
         WHERE store_id = $1 AND year = 2024",
    )
    .bind(store)
    .execute(&mut *writer)
    .await
    .unwrap();
    writer.commit().await.unwrap();
    let doc = wait_job(&api, id, &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(doc["attempts"], 1, "the run went on: {doc}");
    assert_eq!(doc["lastError"], Value::Null, "{doc}");
    assert_eq!(doc["rowsWritten"], 2, "{doc}");
    assert!(
        counter(&server, "import_chunk_deadlock_retries_total").await > deadlocks_before,
        "the chunk was merged again after the deadlock"
    );
    let months: Vec<(i32, i64, Value)> =
        sqlx::query_as("SELECT month, version, daily_data FROM sales.monthly_sales ORDER BY month")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let merged = |n: i64| json!({"1": {"sales": 1}, "2": {"sales": 2}, "5": {"sales": n}});
    assert_eq!(
        months,
        vec![(1, 3, merged(10)), (2, 3, merged(20))],
        "the writer's change and the import's, each once"
    );
    server.stop().await;
}

/// An upload that arrives slowly, with no good row for longer than the
/// job lease, is still an upload in progress: its lease is renewed while
/// the body keeps coming, so it is neither reaped nor reported cancelled.
#[tokio::test]
async fn a_slow_upload_keeps_its_lease() {
    let db = TestDb::new().await;
    db.stores(1).await;
    let server = db.server(&[("JOB_LEASE", "4")]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let code: String = sqlx::query_scalar("SELECT code FROM sales.stores LIMIT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // Good lines past the first 8 KiB (the upload reads that much before
    // parsing; then the job is created), then rejected lines trickling in
    // for two and a half leases, then a last good line.
    let mut first = String::from("store_code,date,sales\n");
    use chrono::Datelike;
    let mut day = chrono::NaiveDate::from_ymd_opt(2024, 1, 1).unwrap();
    while day.year() == 2024 {
        first.push_str(&format!("{code},{day},12345.67\n"));
        day = day.succ_opt().unwrap();
    }
    assert!(first.len() > 8192);
    let mut parts: Vec<String> = vec![first];
    for _ in 0..20 {
        parts.push(format!("{code},not-a-date,5\n").repeat(2));
    }
    parts.push(format!("{code},2025-01-02,6\n"));
    let stream = futures_util::stream::unfold(parts.into_iter(), |mut it| async move {
        let part = it.next()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        Some((Ok::<_, std::io::Error>(part.into_bytes()), it))
    });
    let (status, body, _) = post_file(
        &api,
        "?maxErrors=100",
        "text/csv",
        reqwest::Body::wrap_stream(stream),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_ne!(body["state"], "cancelled", "{body}");
    let doc = wait_job(
        &api,
        body["id"].as_i64().unwrap(),
        &["completed", "failed", "cancelled"],
    )
    .await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(
        (doc["rowsWritten"].as_i64(), doc["rowsRejected"].as_i64()),
        (Some(367), Some(40)),
        "{doc}"
    );
    server.stop().await;
}

/// While a file uploads, its job shows the lines read so far as
/// `rowsRead` (it said 0 until the upload ended).
#[tokio::test]
async fn an_upload_shows_the_lines_read_so_far() {
    let db = TestDb::new().await;
    db.stores(1).await;
    let server = db.server(&[("JOB_LEASE", "4")]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    use chrono::Datelike;
    let mut first = String::from("store_code,date,sales\n");
    let mut day = chrono::NaiveDate::from_ymd_opt(2024, 1, 1).unwrap();
    while day.year() == 2024 {
        first.push_str(&format!("T001,{day},12345.67\n"));
        day = day.succ_opt().unwrap();
    }
    // Past the first 8 KiB, which the upload reads before it parses.
    assert!(first.len() > 8192);
    // The rest of the body waits until the test has seen the progress.
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    use futures_util::StreamExt;
    let parts = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(first.into_bytes())])
        .chain(futures_util::stream::once(async move {
            let _ = wait.await;
            Ok::<_, std::io::Error>(b"T001,2025-01-02,6\n".to_vec())
        }));
    let upload = {
        let api = api.clone();
        tokio::spawn(async move {
            post_file(&api, "", "text/csv", reqwest::Body::wrap_stream(parts)).await
        })
    };
    let id = eventually(WAIT, "the uploading job showing 366 lines read", || async {
        let (_, list) = api.get("/api/v2/imports?limit=1").await;
        let job = &list["data"][0];
        (job["state"] == "uploading" && job["rowsRead"] == 366).then(|| job["id"].as_i64().unwrap())
    })
    .await;
    let _ = go.send(());
    let (status, body, _) = upload.await.unwrap();
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["id"], id);
    let doc = wait_job(&api, id, &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(doc["rowsRead"], 367, "{doc}");
    server.stop().await;
}

/// A job whose user was disabled after queueing it is failed by the worker
/// that takes it, not run: a real server's worker, a queued batch.
#[tokio::test]
async fn a_job_of_a_disabled_user_is_failed_not_run() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let server = db.server(&[]).await;
    let (_, admin_token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let admin = Api::new(&server, Some(&admin_token));
    let (manager, _) = user_token(&db, &server, "m@x.test", "manager", &stores).await;
    sqlx::query(
        "INSERT INTO auth.user_state (user_id, disabled) VALUES ($1, true)
         ON CONFLICT (user_id) DO UPDATE SET disabled = true",
    )
    .bind(manager)
    .execute(&db.pool)
    .await
    .unwrap();
    // As an async batch leaves it (one record, kept), queued for the worker.
    let record = sales_e2e::month(stores[0], 2024, 5, 3, 10.0);
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO jobs.jobs (kind, state, user_id, scope, params, input)
         VALUES ('batch', 'queued', $1, $2, '{}', jsonb_build_object('records', jsonb_build_array($3::jsonb),
                 'kept', '[0]'::jsonb, 'rejected', '[]'::jsonb, 'total', 1)) RETURNING id",
    )
    .bind(manager)
    .bind(&stores)
    .bind(&record)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let doc = wait_job(&admin, id, &["completed", "failed"]).await;
    assert_eq!(doc["state"], "failed", "{doc}");
    assert_eq!(
        doc["lastError"], "the user who queued this job was deleted or disabled",
        "{doc}"
    );
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.monthly_sales").await,
        0
    );
    server.stop().await;
}

/// A user disabled while their import runs writes nothing more after the
/// chunk in flight: the job is given back at its next chunk, and its next
/// claim fails it.
#[tokio::test]
async fn disabling_the_importer_mid_run_stops_the_job() {
    let db = TestDb::new().await;
    let stores = db.stores(4).await;
    let server = db
        .server(&[("IMPORT_CHUNK_LINES", "50"), ("JOB_WORKERS", "1")])
        .await;
    let (_, admin_token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let admin = Api::new(&server, Some(&admin_token));
    let (manager, token) = user_token(&db, &server, "m@x.test", "manager", &stores).await;
    let api = Api::new(&server, Some(&token));
    let codes: Vec<String> = (1..=4).map(|i| format!("T{i:03}")).collect();
    let (status, body, _) = post_file(&api, "", "text/csv", big_file(&codes, 40_000)).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_i64().unwrap();
    eventually(WAIT, "a first chunk", || async {
        let (_, doc) = admin.get(&format!("/api/v2/imports/{id}")).await;
        (doc["rowsWritten"].as_i64().unwrap_or(0) > 0).then_some(())
    })
    .await;
    let r = admin
        .req(reqwest::Method::PATCH, &format!("/api/v2/users/{manager}"))
        .json(&serde_json::json!({"disabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let doc = wait_job(&admin, id, &["failed", "completed", "cancelled"]).await;
    assert_eq!(doc["state"], "failed", "{doc}");
    assert_eq!(
        doc["lastError"], "the user who queued this job was deleted or disabled",
        "{doc}"
    );
    let written = doc["rowsWritten"].as_i64().unwrap();
    assert!(written > 0 && written < 40_000, "{doc}");
    let days = scalar_i64(
        &db,
        "SELECT coalesce(sum(days_reported), 0)::bigint FROM sales.monthly_sales",
    )
    .await;
    assert_eq!(days, written, "only the committed chunks' days");
    server.stop().await;
}

/// Uploads are bounded: a user sends at most IMPORT_MAX_UPLOADS_PER_USER at
/// once (each holds a database connection while its body comes in), and an
/// upload whose body stops sending is dropped after IMPORT_IDLE_TIMEOUT,
/// leaving nothing queued and its slot free again.
#[tokio::test]
async fn uploads_are_bounded_and_an_idle_one_is_dropped() {
    let db = TestDb::new().await;
    db.stores(1).await;
    let server = db
        .server(&[
            ("IMPORT_MAX_UPLOADS_PER_USER", "1"),
            ("IMPORT_IDLE_TIMEOUT", "2"),
        ])
        .await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let code: String = sqlx::query_scalar("SELECT code FROM sales.stores LIMIT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // More than the 8 KiB the upload reads before the job is created, then
    // nothing more.
    let mut first = String::from("store_code,date,sales\n");
    for y in [2022, 2023] {
        for d in 1..=28 {
            for m in 1..=12 {
                first.push_str(&format!("{code},{y}-{m:02}-{d:02},1.5\n"));
            }
        }
    }
    assert!(first.len() > 8192);
    // The body stays open (without sending, once `busy` stops) until
    // `hold` is dropped at the end.
    let (hold, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    hold.send(Ok(first.into_bytes())).await.unwrap();
    let busy = trickle(&hold, format!("{code},2022-01-01,1.5\n"));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item, rx))
    });
    let held = {
        let api = api.clone();
        tokio::spawn(async move {
            api.req(reqwest::Method::POST, "/api/v2/imports")
                .header("content-type", "text/csv")
                .body(reqwest::Body::wrap_stream(stream))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    let uploading = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs.jobs WHERE state = 'uploading'")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    eventually(WAIT, "the held upload to be staging", || async {
        (uploading().await == 1).then_some(())
    })
    .await;
    let small = format!("store_code,date,sales\n{code},2024-01-01,5\n");
    let (status, body, _) = post_file(&api, "", "text/csv", small.clone()).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(
        body["error"]["details"]["limit"],
        "IMPORT_MAX_UPLOADS_PER_USER"
    );
    busy.abort();
    // The held body sends nothing more: it is dropped, and nothing stays
    // queued.
    let ended = tokio::time::timeout(WAIT, held)
        .await
        .expect("the held upload ends");
    if let Ok(status) = ended.unwrap() {
        assert_eq!(status, 400, "an idle body is refused");
    }
    eventually(WAIT, "the dropped upload's job gone", || async {
        (uploading().await == 0).then_some(())
    })
    .await;
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs.jobs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(queued, 0, "nothing was queued");
    // The slot is free again.
    let (status, body, _) = post_file(&api, "", "text/csv", small).await;
    assert_eq!(status, 202, "{body}");
    drop(hold);
    server.stop().await;
}

/// Sends `line` down an upload's body every 100 ms until the returned task
/// is aborted: keeps the body from going idle (IMPORT_IDLE_TIMEOUT) while
/// the test does what must happen during the upload, however slow the
/// machine. The body stays open after the abort as long as `more` lives.
fn trickle(
    more: &tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
    line: String,
) -> tokio::task::JoinHandle<()> {
    let more = more.clone();
    tokio::spawn(async move {
        while more.send(Ok(line.clone().into_bytes())).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// The `import-completed` events of job `id` (their payloads).
async fn completions(db: &TestDb, id: i64) -> Vec<Value> {
    sqlx::query_scalar(
        "SELECT payload FROM sales.events
         WHERE kind = 'import-completed' AND (payload->>'jobId')::bigint = $1",
    )
    .bind(id)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// A store's day as the table holds it (`daily_data -> day`).
async fn day_of(db: &TestDb, store: i64, year: i32, month: i32, day: u32) -> Value {
    sqlx::query_scalar(
        "SELECT coalesce(daily_data -> $4::text, 'null') FROM sales.monthly_sales
         WHERE store_id = $1 AND year = $2 AND month = $3",
    )
    .bind(store)
    .bind(year)
    .bind(month)
    .bind(day.to_string())
    .fetch_optional(&db.pool)
    .await
    .unwrap()
    .unwrap_or(Value::Null)
}

/// A file whose lines end with a lone CR (a spreadsheet's "CSV
/// (Macintosh)"): each line has its own number, so a day given twice keeps
/// the later line's value and a bad line is reported where it is.
#[tokio::test]
async fn a_cr_only_file_numbers_its_lines() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let file = "store_code,date,sales\r\
                T001,2024-05-01,10\r\
                T001,2024-05-02,7\r\
                T001,2024-05-01,20\r\
                T001,2024-05-0x,1\r";
    let (status, body, _) = post_file(&api, "", "text/csv", file).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["rowsRead"], 4, "{body}");
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(error_lines(&doc), vec![(5, "date".to_string())], "{doc}");
    assert_eq!(doc["lastLine"], 4, "{doc}");
    assert_eq!(
        day_of(&db, stores[0], 2024, 5, 1).await,
        json!({"sales": 20}),
        "the later line of the day wins"
    );
    server.stop().await;
}

/// A value `numeric` cannot hold (more than 16383 digits after the point)
/// is a rejected row with its line and column, like any bad value: the job
/// completes and writes the other lines.
#[tokio::test]
async fn a_value_postgres_cannot_store_is_a_rejected_row() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let tiny = format!("0.{}1", "0".repeat(20_000));
    let file = format!(
        "store_code,date,sales\nT001,2024-05-01,5\nT001,2024-05-02,{tiny}\nT001,2024-05-03,6\n"
    );
    let (status, body, _) = post_file(&api, "", "text/csv", file).await;
    assert_eq!(status, 202, "{body}");
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(doc["lastError"], Value::Null, "{doc}");
    assert_eq!(error_lines(&doc), vec![(3, "sales".to_string())], "{doc}");
    let reason = doc["errors"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("Postgres"), "{reason}");
    assert!(reason.len() < 200, "{reason}");
    assert_eq!(doc["rowsWritten"], 2, "{doc}");
    assert_eq!(
        day_of(&db, stores[0], 2024, 5, 3).await,
        json!({"sales": 6})
    );
    server.stop().await;
}

/// Counts must be whole and values at most 1e12, judged on the text as
/// written (not through a float, which rounds `1.00000000000000000001` to
/// 1 and `1000000000000.0000001` to 1e12).
#[tokio::test]
async fn fractional_counts_and_values_above_1e12_are_rejected_exactly() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let file = "store_code,date,sales,customers\n\
                T001,2024-05-01,5,1.00000000000000000001\n\
                T001,2024-05-02,1000000000000.0000001,1\n\
                T001,2024-05-03,1000000000000.000,1.000\n";
    let (status, body, _) = post_file(&api, "", "text/csv", file).await;
    assert_eq!(status, 202, "{body}");
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(
        error_lines(&doc),
        vec![(2, "customers".to_string()), (3, "sales".to_string())],
        "{doc}"
    );
    assert_eq!(doc["errors"][0]["reason"], "must be a whole number");
    assert_eq!(doc["errors"][1]["reason"], "is larger than 1e12");
    assert_eq!(doc["rowsWritten"], 1, "{doc}");
    let text: Option<String> = sqlx::query_scalar(
        "SELECT (daily_data -> '3')::text FROM sales.monthly_sales WHERE store_id = $1",
    )
    .bind(stores[0])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    // Sales as written; a whole count written with a scale as the integer.
    assert_eq!(
        text.as_deref(),
        Some(r#"{"sales": 1000000000000.000, "customers": 1}"#)
    );
    server.stop().await;
}

/// A stray opening quote would make the rest of the file one quoted value:
/// the file is refused, naming the line the quote opened on, and nothing is
/// queued. The same through the command line for a file where the quote
/// runs past the 1 MiB a value may take.
#[tokio::test]
async fn a_stray_quote_refuses_the_file_naming_its_line() {
    let db = TestDb::new().await;
    db.stores(2).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let file = "store_code,date,sales\n\
                T001,2024-05-01,1\n\
                \"T002,2024-05-02,2\n\
                T001,2024-05-03,3\n\
                T002,2024-05-04,4\n";
    let (status, body, _) = post_file(&api, "", "text/csv", file).await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("line 3") && message.contains("never closed"),
        "{body}"
    );
    // Closed again by a later stray quote: the lines between would be one
    // record that does not fit the header.
    let file = "store_code,date,sales\n\
                T001,2024-05-01,1\n\
                \"T002,2024-05-02,2\n\
                T001,2024-05-03,\"3\n\
                T002,2024-05-04,4\n";
    let (status, body, _) = post_file(&api, "", "text/csv", file).await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("line 3"), "{body}");
    assert!(message.contains("to line 4"), "{body}");
    assert_eq!(scalar_i64(&db, "SELECT count(*) FROM jobs.jobs").await, 0);
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM jobs.import_rows").await,
        0
    );
    server.stop().await;

    let dir = std::env::temp_dir().join(format!("pgs_quote_{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("big.csv");
    let mut big = String::from("store_code,date,sales\nT001,2024-05-01,1\n\"T002,2024-05-02,2\n");
    while big.len() < 1_500_000 {
        big.push_str("T001,2024-05-03,3\n");
    }
    std::fs::write(&path, big).unwrap();
    let out = cli_import(&db, [&path]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("line 3: a quoted value starts here"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(scalar_i64(&db, "SELECT count(*) FROM jobs.jobs").await, 0);
}

/// NDJSON numbers reach the table as the line wrote them, digit for digit
/// (not through a float).
#[tokio::test]
async fn ndjson_numbers_keep_every_digit() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let body = format!(
        "{}\n{}\n",
        r#"{"storeCode": "T001", "date": "2024-05-01", "sales": 12345678.123456789012}"#,
        format_args!(
            r#"{{"storeId": {}, "year": 2024, "month": 6, "dailyData": {{"2": {{"sales": 0.1000000000000000000001, "customers": 3}}}}}}"#,
            stores[0]
        ),
    );
    let (status, body, _) = post_file(&api, "", "application/x-ndjson", body).await;
    assert_eq!(status, 202, "{body}");
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(doc["rowsWritten"], 2, "{doc}");
    let texts: Vec<String> = sqlx::query_scalar(
        "SELECT daily_data::text FROM sales.monthly_sales WHERE store_id = $1 ORDER BY month",
    )
    .bind(stores[0])
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        texts,
        vec![
            r#"{"1": {"sales": 12345678.123456789012}}"#.to_string(),
            r#"{"2": {"sales": 0.1000000000000000000001, "customers": 3}}"#.to_string(),
        ]
    );
    server.stop().await;
}

/// Quoted values in error messages are cut to 40 characters: an unknown
/// store code (refused by the merge) and the columns a wrong header lists.
#[tokio::test]
async fn long_values_are_cut_in_error_messages() {
    let db = TestDb::new().await;
    db.stores(1).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let code = "Q".repeat(500_000);
    let file = format!("store_code,date,sales\n{code},2024-05-01,5\nT001,2024-05-02,6\n");
    let (status, body, _) = post_file(&api, "", "text/csv", file).await;
    assert_eq!(status, 202, "{body}");
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(error_lines(&doc), vec![(2, "store_code".to_string())]);
    let reason = doc["errors"][0]["reason"].as_str().unwrap();
    assert!(
        reason.len() < 200,
        "{} bytes: {}...",
        reason.len(),
        &reason[..80]
    );
    assert!(reason.starts_with("unknown store 'QQQQ"), "{reason}");
    assert!(reason.contains("500000 bytes"), "{reason}");
    let long = "x".repeat(300_000);
    let file = format!("{long},date,sales\nT001,2024-05-01,5\n");
    let (status, body, _) = post_file(&api, "", "text/csv", file).await;
    assert_eq!(status, 400);
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("no store column"), "{message:.200}");
    assert!(message.len() < 400, "{} bytes", message.len());
    server.stop().await;
}

/// `errorsOmitted` counts the rejected lines none of whose rows is listed,
/// as `rowsRejected` counts lines: a line rejected in four columns is four
/// rows but one line.
#[tokio::test]
async fn errors_omitted_counts_lines_as_rows_rejected_does() {
    let db = TestDb::new().await;
    db.stores(1).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let mut file = String::from("store_code,date,sales,customers,transactions\n");
    for _ in 0..500 {
        file.push_str("T001,someday,x,y,z\n");
    }
    file.push_str("T001,2024-05-01,1,1,1\n");
    let (status, body, _) = post_file(&api, "", "text/csv", file).await;
    assert_eq!(status, 202, "{body}");
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(doc["rowsRejected"], 500);
    let listed = doc["errors"].as_array().unwrap();
    assert_eq!(listed.len(), 100);
    let lines: std::collections::BTreeSet<i64> =
        listed.iter().map(|e| e["line"].as_i64().unwrap()).collect();
    assert_eq!(lines.len(), 25, "four rows a line");
    assert_eq!(doc["errorsOmitted"], 475, "{}", doc["errorsOmitted"]);
    server.stop().await;
}

/// A line that gives no data is rejected with a reason, not dropped: a
/// monthly line whose day cells are all empty, an NDJSON record with no
/// day, a line with both a date and a month's days.
#[tokio::test]
async fn lines_that_give_no_data_are_rejected() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let file = "store_code,year,month,d1_sales,d2_sales\nT001,2024,9,,\nT001,2024,9,,5\n";
    let (status, body, _) = post_file(&api, "", "text/csv", file).await;
    assert_eq!(status, 202, "{body}");
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(
        (
            doc["rowsRead"].as_i64(),
            doc["rowsWritten"].as_i64(),
            doc["rowsRejected"].as_i64()
        ),
        (Some(2), Some(1), Some(1)),
        "{doc}"
    );
    assert_eq!(error_lines(&doc), vec![(2, "-".to_string())]);
    let s = stores[0];
    let nd = format!(
        "{}\n{}\n{}\n",
        json!({"storeId": s, "year": 2024, "month": 10, "dailyData": {}}),
        json!({"storeId": s, "date": "2024-10-01", "sales": 1, "dailyData": {"2": {"sales": 2}}}),
        json!({"storeId": s, "date": "2024-10-03", "sales": 3}),
    );
    let (status, body, _) = post_file(&api, "", "application/x-ndjson", nd).await;
    assert_eq!(status, 202, "{body}");
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(
        error_lines(&doc),
        vec![(1, "dailyData".to_string()), (2, "dailyData".to_string())],
        "{doc}"
    );
    assert_eq!(doc["rowsWritten"], 1, "{doc}");
    assert_eq!(day_of(&db, s, 2024, 10, 1).await, Value::Null);
    server.stop().await;
}

/// Every end of a job announces it, also those during its upload: more
/// rejected rows than `maxErrors` while the file is read (failed), and a
/// queued job cancelled.
#[tokio::test]
async fn a_job_that_ends_before_it_runs_announces_it() {
    let db = TestDb::new().await;
    db.stores(1).await;
    // No workers: a queued job stays queued.
    let server = db.server(&[("JOB_WORKERS", "0")]).await;
    let (user, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let file = "store_code,date,sales\nT001,x,1\nT001,y,2\nT001,z,3\nT001,2024-05-01,4\n";
    let (status, body, _) = post_file(&api, "?maxErrors=1", "text/csv", file).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["state"], "failed", "{body}");
    let failed = body["id"].as_i64().unwrap();
    let events = completions(&db, failed).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["state"], "failed");
    assert_eq!(events[0]["rowsRejected"], 3);
    assert!(
        events[0]["error"].as_str().unwrap().contains("maxErrors"),
        "{events:?}"
    );
    let owner: Option<i64> = sqlx::query_scalar(
        "SELECT user_id FROM sales.events WHERE kind = 'import-completed' AND (payload->>'jobId')::bigint = $1",
    )
    .bind(failed)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(owner, Some(user));

    let (status, body, _) = post_file(
        &api,
        "",
        "text/csv",
        "store_code,date,sales\nT001,2024-05-01,4\n",
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let queued = body["id"].as_i64().unwrap();
    assert_eq!(body["state"], "queued");
    let r = api
        .req(
            reqwest::Method::DELETE,
            &format!("/api/v2/imports/{queued}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let events = completions(&db, queued).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["state"], "cancelled");
    assert_eq!(events[0]["done"], true);
    // Cancelling again ends nothing more.
    let _ = api
        .req(
            reqwest::Method::DELETE,
            &format!("/api/v2/imports/{queued}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(completions(&db, queued).await.len(), 1);
    server.stop().await;
}

/// Two header columns for one field (`Date` and `Day`, `d1_sales` and
/// `d01_sales`) are refused as a repeated column is.
#[tokio::test]
async fn two_columns_for_one_field_refuse_the_file() {
    let db = TestDb::new().await;
    db.stores(1).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    for file in [
        "store_code,Date,Day,sales\nT001,2024-05-01,2024-05-02,5\n",
        "Store,Code,date,sales\nT001,T001,2024-05-01,5\n",
        "store_code,year,month,d1_sales,d01_sales\nT001,2024,5,1,2\n",
        "store_code,date,sales,sales\nT001,2024-05-01,1,2\n",
    ] {
        let (status, body, _) = post_file(&api, "", "text/csv", file).await;
        assert_eq!(status, 400, "{file}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("wrong header"),
            "{body}"
        );
    }
    assert_eq!(scalar_i64(&db, "SELECT count(*) FROM jobs.jobs").await, 0);
    server.stop().await;
}

/// NDJSON stores: a `storeCode` that is not a string says so; a line with
/// both `storeCode` and `storeId` is written only when they name the same
/// store (a manager learns nothing of stores outside their scope).
#[tokio::test]
async fn ndjson_store_code_and_id_must_agree() {
    let db = TestDb::new().await;
    let stores = db.stores(3).await; // T001, T002, T003
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let (a, b) = (stores[0], stores[1]);
    let nd = format!(
        "{}\n{}\n{}\n{}\n{}\n",
        json!({"storeCode": 10, "date": "2024-05-01", "sales": 1}),
        json!({"storeCode": "T001", "storeId": b, "date": "2024-05-02", "sales": 2}),
        json!({"storeCode": "T001", "storeId": a, "date": "2024-05-03", "sales": 3}),
        json!({"storeCode": "T001", "storeId": b, "year": 2024, "month": 6, "dailyData": {"1": {"sales": 4}, "2": {"sales": 5}}}),
        // One name in both spellings: which store was meant is unknown.
        json!({"storeId": a, "store_id": b, "date": "2024-05-04", "sales": 6}),
    );
    let (status, body, _) = post_file(&api, "", "application/x-ndjson", nd).await;
    assert_eq!(status, 202, "{body}");
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(
        error_lines(&doc),
        vec![
            (1, "storeCode".to_string()),
            (2, "storeId".to_string()),
            (4, "storeId".to_string()),
            (5, "store_id".to_string()),
        ],
        "{doc}"
    );
    assert_eq!(doc["errors"][0]["reason"], "must be a string");
    assert_eq!(doc["errors"][3]["reason"], "storeId given twice", "{doc}");
    assert_eq!(
        doc["errors"][1]["reason"],
        format!("storeCode \"T001\" is store {a}, not storeId {b}")
    );
    assert_eq!(
        (doc["rowsRejected"].as_i64(), doc["rowsWritten"].as_i64()),
        (Some(4), Some(1)),
        "{doc}"
    );
    assert_eq!(day_of(&db, a, 2024, 5, 3).await, json!({"sales": 3}));
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.monthly_sales").await,
        1
    );
    // A manager of T001 only: an id outside the scope beside their code is
    // refused as an unknown store would be.
    let (_, m) = user_token(&db, &server, "m@x.test", "manager", &[a]).await;
    let mapi = Api::new(&server, Some(&m));
    let nd = format!(
        "{}\n",
        json!({"storeCode": "T001", "storeId": stores[2], "date": "2024-07-01", "sales": 1})
    );
    let (status, body, _) = post_file(&mapi, "", "application/x-ndjson", nd).await;
    assert_eq!(status, 202, "{body}");
    let doc = wait_job(
        &mapi,
        body["id"].as_i64().unwrap(),
        &["completed", "failed"],
    )
    .await;
    assert_eq!(
        doc["errors"][0]["reason"],
        format!("unknown store {}, or not one of your stores", stores[2]),
        "{doc}"
    );
    // Named by the member, as in the file (it named the CSV column,
    // `store_id`).
    assert_eq!(doc["errors"][0]["column"], "storeId", "{doc}");
    let nd = format!(
        "{}\n{}\n",
        json!({"storeCode": "NOPE", "date": "2024-07-01", "sales": 1}),
        json!({"storeId": i64::MAX / 2, "date": "2024-07-02", "sales": 1}),
    );
    let (status, body, _) = post_file(&api, "", "application/x-ndjson", nd).await;
    assert_eq!(status, 202, "{body}");
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(
        error_lines(&doc),
        vec![(1, "storeCode".to_string()), (2, "storeId".to_string())],
        "{doc}"
    );
    assert_eq!(doc["errors"][0]["reason"], "unknown store 'NOPE'", "{doc}");
    server.stop().await;
}

/// A CSV file with both a store code and a store id column (as the
/// product's own exports have): the code names the store and the id is not
/// read, since ids belong to the database the file was exported from and
/// codes carry over to another (the stores here are created in another
/// order than the file's ids suggest). A line with no code is read by its id.
#[tokio::test]
async fn csv_store_codes_win_over_ids_from_another_database() {
    let db = TestDb::new().await;
    let stores = db.stores(2).await; // T001, T002
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let (a, b) = (stores[0], stores[1]);
    let csv = format!(
        "key,store_id,store_code,date,sales\n\
         k,{b},T001,2024-05-01,1\n\
         k,{a},T002,2024-05-02,2\n\
         k,{b},,2024-05-03,3\n"
    );
    let (status, body, _) = post_file(&api, "", "text/csv", csv).await;
    assert_eq!(status, 202, "{body}");
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(doc["rowsRejected"], 0, "{doc}");
    assert_eq!(day_of(&db, a, 2024, 5, 1).await, json!({"sales": 1}));
    assert_eq!(day_of(&db, b, 2024, 5, 2).await, json!({"sales": 2}));
    assert_eq!(day_of(&db, b, 2024, 5, 3).await, json!({"sales": 3}));
    server.stop().await;
}

/// A chunk that waits longer than the job lease (here for a row lock a
/// writer holds) keeps its job: the lease is renewed while the worker's
/// process lives, so the job is neither taken again by another worker nor
/// failed as lost after its attempts, and completes once the lock goes.
/// The lease a chunk sets as it commits runs from its commit, not from
/// the start of its transaction: one that began before a long wait set a
/// lease already run out, and another worker could take the job before
/// the next renewal (it did, once, in a loaded CI run: attempts 2).
#[tokio::test]
async fn a_job_waiting_on_a_lock_keeps_its_lease() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    // One store-month a chunk: January, then February.
    let server = db
        .server(&[("JOB_LEASE", "3"), ("IMPORT_CHUNK_LINES", "31")])
        .await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let code: String = sqlx::query_scalar("SELECT code FROM sales.stores WHERE id = $1")
        .bind(stores[0])
        .fetch_one(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        r#"INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
           VALUES ($1, 2001, 1, '{"1": {"sales": 1}}'), ($1, 2001, 2, '{"1": {"sales": 1}}')"#,
    )
    .bind(stores[0])
    .execute(&db.pool)
    .await
    .unwrap();
    // Both months locked, each by a writer of its own.
    let store = stores[0];
    let lock = |month: i32| {
        let pool = db.pool.clone();
        async move {
            let mut writer = pool.begin().await.unwrap();
            sqlx::query(
                "SELECT 1 FROM sales.monthly_sales WHERE store_id = $1 AND year = 2001 AND month = $2 FOR UPDATE",
            )
            .bind(store)
            .bind(month)
            .execute(&mut *writer)
            .await
            .unwrap();
            writer
        }
    };
    let mut january = lock(1).await;
    let february = lock(2).await;
    let mut file = String::from("store_code,date,sales\n");
    for d in 1..=31 {
        file.push_str(&format!("{code},2001-01-{d:02},{d}.5\n"));
    }
    for d in 1..=28 {
        file.push_str(&format!("{code},2001-02-{d:02},{d}.5\n"));
    }
    let (status, body, _) = post_file(&api, "", "text/csv", file).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_i64().unwrap();
    eventually(WAIT, "the job's chunk to wait for the lock", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        (waiting > 0).then_some(())
    })
    .await;
    // Past twice its lease since the job started: without renewals another
    // worker would have taken it (and after three times, failed it).
    eventually(WAIT, "two leases to pass", || async {
        let past: bool = sqlx::query_scalar(
            "SELECT now() > started_at + interval '6.5 seconds' FROM jobs.jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        past.then_some(())
    })
    .await;
    let (attempts, live, error): (i32, bool, Option<String>) = sqlx::query_as(
        "SELECT attempts, lease_until > now(), last_error FROM jobs.jobs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((attempts, live, error), (1, true, None));
    // January's chunk commits; the lease it sets runs past that moment
    // (February's chunk still waits, so the job runs on).
    let released: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut *january)
        .await
        .unwrap();
    january.commit().await.unwrap();
    let (lease_until, chunks): (chrono::DateTime<chrono::Utc>, i64) =
        eventually(WAIT, "January's chunk committed", || async {
            let row: (chrono::DateTime<chrono::Utc>, i64) =
                sqlx::query_as("SELECT lease_until, chunks::int8 FROM jobs.jobs WHERE id = $1")
                    .bind(id)
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            (row.1 >= 1).then_some(row)
        })
        .await;
    assert_eq!(chunks, 1);
    assert!(
        lease_until > released,
        "the chunk's lease ran out before it committed: {lease_until} <= {released}"
    );
    february.commit().await.unwrap();
    let doc = wait_job(&api, id, &["completed", "failed", "cancelled"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(doc["attempts"], 1, "{doc}");
    assert_eq!(doc["rowsWritten"], 59, "{doc}");
    server.stop().await;
}

/// A queued batch cancelled before it ran drops its records at once (up to
/// BODY_LIMIT of them were kept until the job was pruned).
#[tokio::test]
async fn a_cancelled_queued_batch_keeps_no_records() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let server = db.server(&[("JOB_WORKERS", "0")]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let (st, body) = api
        .post(
            "/api/v2/sales/batch?async=true",
            &json!({"salesDataArray": [sales_e2e::month(stores[0], 2024, 5, 3, 10.0)]}),
        )
        .await;
    assert_eq!(st, 202, "{body}");
    let id = body["id"].as_i64().unwrap();
    let kept = |db: &TestDb| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>("SELECT input IS NOT NULL FROM jobs.jobs WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert!(kept(&db).await, "queued with its records");
    let (st, doc) = api
        .req(reqwest::Method::DELETE, &format!("/api/v2/imports/{id}"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map(|s| (s, ()))
        .unwrap();
    assert_eq!(st, 200, "{doc:?}");
    assert!(!kept(&db).await, "cancelled: its records dropped");
    server.stop().await;
}

/// An upload the user cancels, whose body then stops coming (dropped
/// after IMPORT_IDLE_TIMEOUT as a cut upload), stays a cancelled job (its
/// `import-completed` said so); it used to vanish.
#[tokio::test]
async fn an_upload_cancelled_then_cut_off_stays_cancelled() {
    let db = TestDb::new().await;
    db.stores(1).await;
    let server = db.server(&[("IMPORT_IDLE_TIMEOUT", "1")]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let code: String = sqlx::query_scalar("SELECT code FROM sales.stores LIMIT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let mut first = String::from("store_code,date,sales\n");
    for y in [2022, 2023] {
        for d in 1..=28 {
            for m in 1..=12 {
                first.push_str(&format!("{code},{y}-{m:02}-{d:02},{d}.5\n"));
            }
        }
    }
    assert!(first.len() > 8192);
    let (more, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    more.send(Ok(first.into_bytes())).await.unwrap();
    // The body keeps coming until the cancel is answered.
    let busy = trickle(&more, format!("{code},2022-01-01,1.5\n"));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item, rx))
    });
    let upload = tokio::spawn({
        let api = api.clone();
        async move {
            api.req(reqwest::Method::POST, "/api/v2/imports")
                .header("content-type", "text/csv")
                .body(reqwest::Body::wrap_stream(stream))
                .send()
                .await
        }
    });
    let id: i64 = eventually(WAIT, "the upload's job", || async {
        sqlx::query_scalar::<_, i64>("SELECT id FROM jobs.jobs WHERE state = 'uploading'")
            .fetch_optional(&db.pool)
            .await
            .unwrap()
    })
    .await;
    let (st, doc) = api
        .req(reqwest::Method::DELETE, &format!("/api/v2/imports/{id}"))
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(st, 200, "{doc:?}");
    busy.abort();
    // The body sends nothing more: the server drops it as a cut upload
    // (400), unless the rows it still held when the body stopped tell it
    // first that the job was cancelled (202 with `cancelled`): which comes
    // first depends on timing. Either way the job stays cancelled.
    let answer = upload.await.unwrap().unwrap();
    let status = answer.status().as_u16();
    let body: Value = answer.json().await.unwrap_or(Value::Null);
    assert!(
        status == 400 || (status == 202 && body["state"] == "cancelled"),
        "{status} {body}"
    );
    drop(more);
    let state = eventually(WAIT, "the upload to end", || async {
        let staged: i64 =
            sqlx::query_scalar("SELECT count(*) FROM jobs.import_rows WHERE job_id = $1")
                .bind(id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM jobs.jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&db.pool)
            .await
            .unwrap();
        (staged == 0).then_some(state)
    })
    .await;
    assert_eq!(state.as_deref(), Some("cancelled"));
    let (st, doc) = api.get(&format!("/api/v2/imports/{id}")).await;
    assert_eq!(st, 200, "{doc}");
    assert_eq!(doc["state"], "cancelled", "{doc}");
    server.stop().await;
}

/// Cancelling an upload stops it: the server reads no more of its body
/// (it used to go on staging up to IMPORT_MAX_BYTES, holding an upload slot
/// and a connection) and answers with the job cancelled.
#[tokio::test]
async fn a_cancelled_upload_stops_reading_its_body() {
    let db = TestDb::new().await;
    db.stores(1).await;
    let server = db.server(&[("JOB_LEASE", "3")]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let code: String = sqlx::query_scalar("SELECT code FROM sales.stores LIMIT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let part = |y: i32| {
        let mut s = String::new();
        for m in 1..=12 {
            for d in 1..=28 {
                s.push_str(&format!("{code},{y}-{m:02}-{d:02},{d}.5\n"));
            }
        }
        s
    };
    let (more, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    more.send(Ok(format!(
        "store_code,date,sales\n{}{}",
        part(2001),
        part(2002)
    )
    .into_bytes()))
        .await
        .unwrap();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item, rx))
    });
    let upload = tokio::spawn({
        let api = api.clone();
        async move {
            api.req(reqwest::Method::POST, "/api/v2/imports")
                .header("content-type", "text/csv")
                .body(reqwest::Body::wrap_stream(stream))
                .send()
                .await
        }
    });
    let id: i64 = eventually(WAIT, "the upload's job", || async {
        sqlx::query_scalar::<_, i64>("SELECT id FROM jobs.jobs WHERE state = 'uploading'")
            .fetch_optional(&db.pool)
            .await
            .unwrap()
    })
    .await;
    let st = api
        .req(reqwest::Method::DELETE, &format!("/api/v2/imports/{id}"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(st, 200);
    // A slow client goes on sending a year of lines every 200 ms, for up to
    // 60 s; the server answers long before.
    let mut sent = 0;
    for y in 2003..2303 {
        if upload.is_finished() {
            break;
        }
        if more.send(Ok(part(y).into_bytes())).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(more);
    let answer = upload.await.unwrap().unwrap();
    assert_eq!(answer.status().as_u16(), 202);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["state"], "cancelled", "{body}");
    assert!(sent < 300, "the server read the whole body ({sent} parts)");
    let staged: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs.import_rows WHERE job_id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(staged, 0);
    server.stop().await;
}

/// A user has at most JOBS_MAX_PER_USER unfinished jobs (uploading, queued
/// or running): asynchronous batches and imports past it are answered 429
/// with the count, concurrent requests cannot pass it together, other users
/// are not counted against it, and a job that ends makes room.
#[tokio::test]
async fn unfinished_jobs_per_user_are_bounded() {
    let db = TestDb::new().await;
    let stores = db.stores(2).await;
    // No workers: jobs stay queued.
    let server = db
        .server(&[("JOBS_MAX_PER_USER", "3"), ("JOB_WORKERS", "0")])
        .await;
    let (_, token) = user_token(&db, &server, "a@x.test", "admin", &[]).await;
    let (other_id, other_token) = user_token(&db, &server, "b@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let other = Api::new(&server, Some(&other_token));
    let batch = |m: i32| json!({"salesDataArray": [sales_e2e::month(stores[0], 2024, m, 2, 10.0)]});
    // Six at once: exactly three pass.
    let answers = futures_util::future::join_all((1..=6).map(|m| {
        let (api, body) = (api.clone(), batch(m));
        async move {
            let r = api
                .req(reqwest::Method::POST, "/api/v2/sales/batch?async=true")
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            (status, retry, r.json::<Value>().await.unwrap())
        }
    }))
    .await;
    let accepted: Vec<i64> = answers
        .iter()
        .filter(|(s, _, _)| *s == 202)
        .map(|(_, _, b)| b["id"].as_i64().unwrap())
        .collect();
    assert_eq!(accepted.len(), 3, "{answers:?}");
    for (status, retry, body) in answers.iter().filter(|(s, _, _)| *s != 202) {
        assert_eq!(*status, 429, "{body}");
        assert_eq!(body["error"]["code"], "too_many_jobs", "{body}");
        assert_eq!(body["error"]["details"]["unfinishedJobs"], 3, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("JOBS_MAX_PER_USER"),
            "{body}"
        );
        assert!(retry.is_some(), "{body}");
    }
    // An import is refused the same way, before its body is read.
    let (status, body, _) = post_file(
        &api,
        "",
        "text/csv",
        "store_code,date,sales\nT001,2024-01-01,1\n",
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "too_many_jobs", "{body}");
    // Another user's jobs are their own.
    let (status, body) = other
        .post("/api/v2/sales/batch?async=true", &batch(7))
        .await;
    assert_eq!(status, 202, "{body}");
    // A cancelled job makes room.
    let r = api
        .req(
            reqwest::Method::DELETE,
            &format!("/api/v2/imports/{}", accepted[0]),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    wait_job(&api, accepted[0], &["cancelled"]).await;
    let (status, body, _) = post_file(
        &api,
        "",
        "text/csv",
        "store_code,date,sales\nT001,2024-01-01,1\n",
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let unfinished = scalar_i64(
        &db,
        "SELECT count(*) FROM jobs.jobs WHERE state IN ('uploading', 'queued', 'running')",
    )
    .await;
    assert_eq!(
        unfinished, 4,
        "three of the first user's, one of the other's"
    );
    // A session holding the user's job lock (any role may take an advisory
    // lock) delays a job's creation a little, then it is refused (503),
    // not kept waiting.
    let mut holder = db.connect().await;
    let mut held = sqlx::Connection::begin(&mut holder).await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashint8($2))")
        .bind(sales_server::jobs::JOBS_LOCK)
        .bind(other_id)
        .execute(&mut *held)
        .await
        .unwrap();
    let r = other
        .req(reqwest::Method::POST, "/api/v2/sales/batch?async=true")
        .json(&batch(8))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("retry"),
        "{body}"
    );
    held.rollback().await.unwrap();
    let (status, body) = other
        .post("/api/v2/sales/batch?async=true", &batch(8))
        .await;
    assert_eq!(status, 202, "{body}");
    server.stop().await;
}

/// An upload cancelled while its body still comes, a line at a time, is
/// answered (202, `cancelled`) while the client is still sending: the
/// server stops reading at the next line, not after its next 10,000 rows.
#[tokio::test]
async fn a_cancelled_upload_stops_reading_at_the_next_line() {
    let db = TestDb::new().await;
    db.stores(1).await;
    // A short lease: the upload notices the cancel at its next renewal.
    let server = db.server(&[("JOB_LEASE", "3s")]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let code: String = sqlx::query_scalar("SELECT code FROM sales.stores LIMIT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let (more, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item, rx))
    });
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A line every 50 ms, 1,200 of them at most (a minute; far fewer rows
    // than a batch): stops early once the upload is answered.
    let sender = tokio::spawn({
        let (answered, code) = (answered.clone(), code.clone());
        async move {
            let mut sent = 0;
            let _ = more.send(Ok(b"store_code,date,sales\n".to_vec())).await;
            while sent < 1200 && !answered.load(std::sync::atomic::Ordering::SeqCst) {
                let (m, d) = (sent / 28 % 12 + 1, sent % 28 + 1);
                let line = format!("{code},{}-{m:02}-{d:02},1.5\n", 2000 + sent / 336);
                if more.send(Ok(line.into_bytes())).await.is_err() {
                    break;
                }
                sent += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            sent
        }
    });
    let upload = tokio::spawn({
        let (api, answered) = (api.clone(), answered.clone());
        async move {
            let r = api
                .req(reqwest::Method::POST, "/api/v2/imports")
                .header("content-type", "text/csv")
                .body(reqwest::Body::wrap_stream(stream))
                .send()
                .await;
            answered.store(true, std::sync::atomic::Ordering::SeqCst);
            r
        }
    });
    let id: i64 = eventually(WAIT, "the upload's job", || async {
        sqlx::query_scalar::<_, i64>("SELECT id FROM jobs.jobs WHERE state = 'uploading'")
            .fetch_optional(&db.pool)
            .await
            .unwrap()
    })
    .await;
    let r = api
        .req(reqwest::Method::DELETE, &format!("/api/v2/imports/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let answer = upload.await.unwrap().unwrap();
    let status = answer.status().as_u16();
    let body: Value = answer.json().await.unwrap_or(Value::Null);
    let sent = sender.await.unwrap();
    assert_eq!(
        (status, &body["state"]),
        (202, &json!("cancelled")),
        "{body}"
    );
    assert!(
        sent < 1200,
        "answered only once the body ended ({sent} lines)"
    );
    let state: String = sqlx::query_scalar("SELECT state FROM jobs.jobs WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(state, "cancelled");
    server.stop().await;
}

/// Header names match whatever their case: an all-capitals header (a POS
/// system's) is read like its snake_case or camelCase spelling, and a
/// capitalised metric among small names is read rather than dropped. One
/// field in two spellings refuses the file, naming both columns.
#[tokio::test]
async fn header_names_match_whatever_their_case() {
    let db = TestDb::new().await;
    let stores = db.stores(2).await; // T001, T002
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let (a, b) = (stores[0], stores[1]);
    for (file, store, day, want) in [
        (
            "STORE_CODE,DATE,SALES,CUSTOMERS\nT001,2024-07-05,5,1\n".to_string(),
            a,
            5,
            json!({"sales": 5, "customers": 1}),
        ),
        (
            "store_code,date,sales,CUSTOMERS\nT001,2024-07-06,6,2\n".to_string(),
            a,
            6,
            json!({"sales": 6, "customers": 2}),
        ),
        (
            "STORE,YEAR,MONTH,D7_SALES,D7Customers\nT002,2024,7,7,3\n".to_string(),
            b,
            7,
            json!({"sales": 7, "customers": 3}),
        ),
        (
            "STORECODE,BusinessDate,Transactions\nT002,2024-07-08,8\n".to_string(),
            b,
            8,
            json!({"transactions": 8}),
        ),
        (
            format!("storeID,Date,SALES\n{a},2024-07-09,9\n"),
            a,
            9,
            json!({"sales": 9}),
        ),
    ] {
        let (status, body, _) = post_file(&api, "", "text/csv", file.clone()).await;
        assert_eq!(status, 202, "{file}: {body}");
        let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
        assert_eq!(doc["state"], "completed", "{doc}");
        assert_eq!(doc["rowsRejected"], 0, "{file}: {doc}");
        assert_eq!(day_of(&db, store, 2024, 7, day).await, want, "{file}");
    }
    for (file, message) in [
        (
            "store_code,date,Sales,SALES\nT001,2024-07-10,1,2\n",
            "wrong header: columns Sales and SALES are the same field",
        ),
        (
            "STORE_ID,storeId,date,sales\n1,1,2024-07-10,1\n",
            "wrong header: columns STORE_ID and storeId are the same field",
        ),
        (
            "STORE,year,month,D1_SALES,d01Sales\nT001,2024,7,1,2\n",
            "wrong header: columns D1_SALES and d01Sales are the same field",
        ),
        (
            "Shop_Number,DATE,SALES\nT001,2024-07-10,1\n",
            "wrong header: no store column (store_code or store_id); found: Shop_Number, DATE, SALES",
        ),
        // One slip from a field it reads: refused, not ignored with its
        // values.
        (
            "Store_Kode,DATE,SALES\nT001,2024-07-10,1\n",
            "wrong header: column Store_Kode is not one the import reads: did you mean store_code?",
        ),
        (
            "store_code,date,sales,Customer\nT001,2024-07-10,1,2\n",
            "wrong header: column Customer is not one the import reads: did you mean customers?",
        ),
        (
            "store_code,year,month,d1_sales,d32_sales\nT001,2024,7,1,2\n",
            "wrong header: column d32_sales is not one the import reads: \
             day 32 is not a day of a month (d1_sales .. d31_sales)",
        ),
    ] {
        let (status, body, _) = post_file(&api, "", "text/csv", file).await;
        assert_eq!(status, 400, "{file}: {body}");
        assert_eq!(body["error"]["details"]["reason"], message, "{file}: {body}");
    }
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM jobs.jobs").await,
        5,
        "the refused files queued nothing"
    );
    server.stop().await;
}

/// An NDJSON member of the other line shape is a rejected row naming it,
/// not a member dropped: a record's top-level metrics, a daily row's year
/// or month that is not its date's. A null member is one not given, `date`
/// beside `dailyData` included, and a date that is not a string says so.
#[tokio::test]
async fn ndjson_members_of_the_other_shape_are_rejected() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let s = stores[0];
    let nd = [
        json!({"storeId": s, "year": 2024, "month": 6, "sales": 99, "customers": 5, "dailyData": {"1": {"sales": 1}}}),
        json!({"storeCode": "T001", "date": "2024-05-01", "year": 2025, "month": 9, "sales": 1}),
        json!({"storeCode": "T001", "date": "2024-05-02", "year": "junk", "sales": 1}),
        json!({"storeCode": "T001", "date": 20240503, "sales": 1}),
        json!({"storeCode": "T001", "date": "2024-05-04", "year": 2024, "month": 5, "sales": 4}),
        json!({"storeCode": "T001", "date": null, "year": 2024, "month": 6, "dailyData": {"2": {"sales": 2}}}),
    ]
    .iter()
    .map(|l| format!("{l}\n"))
    .collect::<String>();
    let (status, body, _) = post_file(&api, "", "application/x-ndjson", nd).await;
    assert_eq!(status, 202, "{body}");
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    let errors: Vec<(i64, String, String)> = doc["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["line"].as_i64().unwrap(),
                e["column"].as_str().unwrap_or("-").to_string(),
                e["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let daily_member = "belongs to a daily row (with a date); a record's days go in dailyData";
    let e = |line: i64, column: &str, reason: &str| (line, column.to_string(), reason.to_string());
    assert_eq!(
        errors,
        vec![
            e(1, "sales", daily_member),
            e(1, "customers", daily_member),
            e(2, "year", "2025 contradicts date 2024-05-01"),
            e(2, "month", "9 contradicts date 2024-05-01"),
            e(3, "year", "must be a whole number"),
            e(4, "date", "must be a string (YYYY-MM-DD)"),
        ],
        "{doc}"
    );
    assert_eq!(
        (doc["rowsRejected"].as_i64(), doc["rowsWritten"].as_i64()),
        (Some(4), Some(2)),
        "{doc}"
    );
    assert_eq!(day_of(&db, s, 2024, 6, 1).await, Value::Null);
    assert_eq!(day_of(&db, s, 2024, 5, 4).await, json!({"sales": 4}));
    assert_eq!(day_of(&db, s, 2024, 6, 2).await, json!({"sales": 2}));
    server.stop().await;
}

/// The line limit is exact and names the long line: a line of 1 MiB
/// (1048576 bytes before its line break) is read, one byte more refuses
/// the file naming that line, however many lines follow it.
#[tokio::test]
async fn the_line_limit_is_exact_and_names_the_long_line() {
    const MAX: usize = 1 << 20;
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let line = |len: usize| {
        let head = "T001,2024-05-01,5,";
        format!("{head}{}", "x".repeat(len - head.len()))
    };
    let file = |len: usize, after: usize| {
        format!(
            "store_code,date,sales,note\r\nT001,2024-05-02,6,\r\n{}\r\n{}",
            line(len),
            "T001,2024-05-03,7,\r\n".repeat(after)
        )
    };
    for after in [0, 1, 2000] {
        let (status, body, _) = post_file(&api, "", "text/csv", file(MAX + 1, after)).await;
        assert_eq!(status, 400, "{after}: {body}");
        assert_eq!(
            body["error"]["details"]["reason"], "line 3 is longer than 1048576 bytes",
            "{after}: {body}"
        );
    }
    assert_eq!(scalar_i64(&db, "SELECT count(*) FROM jobs.jobs").await, 0);
    let (status, body, _) = post_file(&api, "", "text/csv", file(MAX, 2000)).await;
    assert_eq!(status, 202, "{body}");
    let doc = wait_job(&api, body["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(doc["state"], "completed", "{doc}");
    assert_eq!(
        (doc["rowsRead"].as_i64(), doc["rowsRejected"].as_i64()),
        (Some(2002), Some(0)),
        "{doc}"
    );
    assert_eq!(
        day_of(&db, stores[0], 2024, 5, 1).await,
        json!({"sales": 5})
    );
    // NDJSON: the same limit.
    let nd = |len: usize| {
        let head = r#"{"storeCode": "T001", "date": "2024-05-04", "sales": 8}"#;
        format!("{head}\n{head}{}\n{head}\n", " ".repeat(len - head.len()))
    };
    let (status, body, _) = post_file(&api, "", "application/x-ndjson", nd(MAX + 1)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"]["details"]["reason"], "line 2 is longer than 1048576 bytes",
        "{body}"
    );
    let (status, body, _) = post_file(&api, "", "application/x-ndjson", nd(MAX)).await;
    assert_eq!(status, 202, "{body}");
    server.stop().await;
}

/// The command line fails a job that rejected every line and wrote
/// nothing (a CSV read as NDJSON), dry run or not; a file with some
/// rejected lines and some written still succeeds.
#[tokio::test]
async fn the_command_line_fails_an_import_that_rejected_every_line() {
    let db = TestDb::new().await;
    db.stores(1).await;
    let dir = std::env::temp_dir().join(format!("pgs_rej_{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("pos.csv");
    std::fs::write(
        &csv,
        "store_code,date,sales\nT001,2024-05-01,1\nT001,2024-05-02,2\n",
    )
    .unwrap();
    let some_bad = dir.join("some-bad.csv");
    std::fs::write(
        &some_bad,
        "store_code,date,sales\nT001,2024-05-01,1\nT001,2024-05-32,2\n",
    )
    .unwrap();
    let run = |args: Vec<std::ffi::OsString>| {
        let db = &db;
        async move {
            let out = cli_import(db, args).await;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status.success(), text)
        }
    };
    for dry in [true, false] {
        let mut args: Vec<std::ffi::OsString> = vec!["--format".into(), "ndjson".into()];
        if dry {
            args.push("--dry-run".into());
        }
        args.push(csv.clone().into());
        let (ok, text) = run(args).await;
        assert!(!ok, "dry run {dry}: {text}");
        assert!(text.contains("every line was rejected"), "{text}");
    }
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.monthly_sales").await,
        0
    );
    let (ok, text) = run(vec![some_bad.clone().into()]).await;
    assert!(ok, "{text}");
    assert!(text.contains("1 rejected"), "{text}");
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.monthly_sales").await,
        1
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An asynchronous batch with a record refused for a field named "\u0000"
/// (which jsonb cannot hold) is queued like any: the job reports that
/// record, writes the other, and the name shows as `\u0000`.
#[tokio::test]
async fn an_async_batch_reports_a_field_named_nul() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "admin@x.test", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    let s = stores[0];
    let body = format!(
        r#"{{"atomic": false, "salesDataArray": [
            {{"storeId": {s}, "year": 2024, "month": 12, "dailyData": {{"1": {{"sales": 1}}}}}},
            {{"storeId": {s}, "year": 2024, "month": 11, "dailyData": {{"\u0000": {{"sales": 1}}}}}}]}}"#
    );
    let (st, doc) = api
        .send_text(
            reqwest::Method::POST,
            "/api/v2/sales/batch?async=true",
            &body,
        )
        .await;
    assert_eq!(st, 202, "{doc}");
    let job = wait_job(&api, doc["id"].as_i64().unwrap(), &["completed", "failed"]).await;
    assert_eq!(job["state"], "completed", "{job}");
    let result = &job["result"];
    assert_eq!(result["inserted"], 1, "{job}");
    assert_eq!(result["failed"], 1, "{job}");
    assert_eq!(result["errors"][0]["index"], 1, "{job}");
    assert_eq!(result["errors"][0]["field"], "dailyData.\\u0000", "{job}");
    server.stop().await;
}

/// The newest job's state.
async fn last_job_state(pool: &sqlx::PgPool) -> Option<String> {
    sqlx::query_scalar("SELECT state FROM jobs.jobs ORDER BY id DESC LIMIT 1")
        .fetch_optional(pool)
        .await
        .unwrap()
}

/// `sales-server import` of a named pipe the test writes into (so a signal
/// surely comes while the file is being read): some lines written and the
/// pipe held open, one Ctrl-C sent once the upload's job exists, and back
/// once the job is cancelled. Returns the command, its pid, the pipe's
/// writer and the directory to remove.
async fn import_interrupted_on_a_pipe(
    db: &TestDb,
) -> (
    tokio::process::Child,
    String,
    std::fs::File,
    std::path::PathBuf,
) {
    // More than the 8 KiB read before the first line is parsed.
    let (child, writer, dir) = import_of_a_pipe(db, &[], 4 * 12 * 28).await;
    let pid = child.id().expect("a pid").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    eventually(Duration::from_secs(60), "the upload cancelled", || {
        let pool = db.pool.clone();
        async move { (last_job_state(&pool).await.as_deref() == Some("cancelled")).then_some(()) }
    })
    .await;
    (child, pid, writer, dir)
}

/// Ctrl-C while `sales-server import` still reads its file: the upload is
/// cancelled and nothing is written, and the command says so and exits
/// 130. (The signal's default action ended the process silently there,
/// and the job was later failed as an interrupted upload.) The file is a
/// named pipe the test writes into, so the signal surely comes while the
/// file is being read.
#[tokio::test]
async fn the_command_line_interrupted_while_reading_cancels_its_upload() {
    let db = TestDb::new().await;
    db.stores(1).await;
    let (child, _pid, mut writer, dir) = import_interrupted_on_a_pipe(&db).await;
    // The end of the file: the reader, blocked on the pipe, sees it.
    {
        use std::io::Write;
        writer.write_all(b"T001,2024-02-29,29\n").unwrap();
    }
    drop(writer);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the command ends")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted while reading"), "{stderr}");
    assert!(stderr.contains("nothing written"), "{stderr}");
    assert_eq!(last_job_state(&db.pool).await.as_deref(), Some("cancelled"));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.monthly_sales")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reader blocked on a pipe whose writer sends nothing more stops only
/// when the writer does: a second Ctrl-C leaves at once, the upload
/// cancelled and its staged rows removed.
#[tokio::test]
async fn a_second_ctrl_c_leaves_a_reader_blocked_on_a_pipe() {
    let db = TestDb::new().await;
    db.stores(1).await;
    let (child, pid, writer, dir) = import_interrupted_on_a_pipe(&db).await;
    // The writer stays: the reader is blocked on the pipe.
    let again = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    assert!(again.success());
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the command ends")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted while reading"), "{stderr}");
    assert!(stderr.contains("nothing written"), "{stderr}");
    assert_eq!(last_job_state(&db.pool).await.as_deref(), Some("cancelled"));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.monthly_sales")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    let staged: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs.import_rows")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(staged, 0, "the cancelled upload's staged rows are removed");
    drop(writer);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `sales-server import` of a named pipe: returns the command (output
/// piped), the pipe's writer (holding it open) once the job is uploading,
/// and the directory to remove. `env` is added to the database's.
async fn import_of_a_pipe(
    db: &TestDb,
    env: &[(&str, &str)],
    lines: usize,
) -> (tokio::process::Child, std::fs::File, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("pgs_fifo_{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("pos.csv");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let child = tokio::process::Command::new(sales_e2e::server_bin())
        .arg("import")
        .arg(&fifo)
        .envs(db.env())
        .envs(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run sales-server import");
    let path = fifo.clone();
    let writer = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut w = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        let mut text = String::from("store_code,date,sales\n");
        let mut n = 0;
        'all: for y in 2000..=2099 {
            for m in 1..=12 {
                for d in 1..=28 {
                    if n == lines {
                        break 'all;
                    }
                    text.push_str(&format!("T001,{y}-{m:02}-{d:02},{d}\n"));
                    n += 1;
                }
            }
        }
        w.write_all(text.as_bytes()).unwrap();
        w.flush().unwrap();
        w
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(60), "the upload's job", || {
        let pool = db.pool.clone();
        async move { (last_job_state(&pool).await.as_deref() == Some("uploading")).then_some(()) }
    })
    .await;
    (child, writer, dir)
}

/// Ctrl-C while the command follows a job a server's worker took (here:
/// the job's row held, so the command's own claim skips it) stops the
/// following, not the job: it exits 130 at once, saying the job runs on
/// (it followed on, ignoring the signal, until the job ended).
#[tokio::test]
async fn ctrl_c_while_following_a_servers_worker_leaves_at_once() {
    let db = TestDb::new().await;
    db.stores(1).await;
    let (child, writer, dir) = import_of_a_pipe(&db, &[], 1_000).await;
    let job: i64 = sqlx::query_scalar("SELECT max(id) FROM jobs.jobs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // As a worker holds the job it runs: the command's claim (FOR UPDATE
    // SKIP LOCKED) passes it by; queueing it (an update of no key) does not
    // wait for this lock.
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM jobs.jobs WHERE id = $1 FOR KEY SHARE")
        .bind(job)
        .execute(&mut *holder)
        .await
        .unwrap();
    drop(writer);
    eventually(Duration::from_secs(60), "the job queued", || {
        let pool = db.pool.clone();
        async move { (last_job_state(&pool).await.as_deref() == Some("queued")).then_some(()) }
    })
    .await;
    let pid = child.id().expect("a pid").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the command ends at the Ctrl-C")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains(&format!("interrupted while following job {job}")),
        "{stderr}"
    );
    holder.rollback().await.unwrap();
    assert_eq!(last_job_state(&db.pool).await.as_deref(), Some("queued"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// An import cancelled while the command runs it (`DELETE
/// /api/v2/imports/{id}` from elsewhere) exits non-zero, saying so: what
/// it wrote is only the part before the cancel (it exited 0).
#[tokio::test]
async fn the_command_line_fails_an_import_cancelled_while_it_runs() {
    let db = TestDb::new().await;
    db.stores(1).await;
    // One line per chunk, so that the merge surely runs when cancelled.
    let (child, writer, dir) = import_of_a_pipe(&db, &[("IMPORT_CHUNK_LINES", "1")], 2_000).await;
    drop(writer);
    eventually(Duration::from_secs(60), "the job merging", || {
        let pool = db.pool.clone();
        async move {
            let written: Option<i64> = sqlx::query_scalar(
                "SELECT rows_written FROM jobs.jobs WHERE state = 'running' ORDER BY id DESC LIMIT 1",
            )
            .fetch_optional(&pool)
            .await
            .unwrap()
            .flatten();
            (written.unwrap_or(0) > 0).then_some(())
        }
    })
    .await;
    let job: i64 = sqlx::query_scalar("SELECT max(id) FROM jobs.jobs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let cancelled = sales_server::jobs::cancel(&db.pool, job, None).await;
    assert!(cancelled.is_ok());
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the command ends")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("cancelled before it finished"), "{text}");
    assert_eq!(last_job_state(&db.pool).await.as_deref(), Some("cancelled"));
    let _ = std::fs::remove_dir_all(&dir);
}
