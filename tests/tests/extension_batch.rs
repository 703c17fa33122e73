//! `sales.batch_upsert` and `sales.batch_delete` through SQL: validation
//! reports (PS422 with JSON DETAIL), merge/replace, atomic/best-effort, store
//! scope, duplicates, versions, large and concurrent batches.

mod extension_support;

use extension_support::*;
use rand::seq::SliceRandom;
use sales_e2e::TestDb;
use serde_json::{json, Value};
use std::collections::HashSet;

fn errors_of(report: &Value) -> Vec<(i64, String, String)> {
    report["errors"]
        .as_array()
        .expect("errors array")
        .iter()
        .map(|e| {
            (
                e["index"].as_i64().unwrap(),
                e["field"].as_str().unwrap().to_string(),
                e["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn has_error(report: &Value, index: i64, field: &str, reason_part: &str) -> bool {
    errors_of(report)
        .iter()
        .any(|(i, f, r)| *i == index && f == field && r.contains(reason_part))
}

#[tokio::test]
async fn upsert_inserts_updates_and_counts_unchanged() {
    let db = TestDb::new().await;
    let s = db.stores(2).await;
    let batch = json!([
        record(s[0], 2024, 1, days(1, 31, 100.0, 5)),
        // storeId as a numeric string, snake_case keys
        {"store_id": s[1].to_string(), "year": 2024, "month": 2, "daily_data": days(1, 29, 10.5, 1)},
    ]);
    let r = upsert_ok(&db, &batch).await;
    assert_eq!(
        (
            r["total"].as_i64(),
            r["inserted"].as_i64(),
            r["updated"].as_i64()
        ),
        (Some(2), Some(2), Some(0))
    );
    assert_eq!(
        (
            r["unchanged"].as_i64(),
            r["failed"].as_i64(),
            r["merged"].as_i64()
        ),
        (Some(0), Some(0), Some(0))
    );
    let event_id = r["eventId"].as_i64().expect("eventId");
    let kind: String = sqlx::query_scalar("SELECT kind FROM sales.events WHERE id = $1")
        .bind(event_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(kind, "batch-completed");

    let (total, customers, days_reported, version): (String, i64, i32, i64) = sqlx::query_as(
        "SELECT total_sales::text, total_customers, days_reported, version FROM sales.monthly_sales
         WHERE store_id = $1 AND year = 2024 AND month = 2",
    )
    .bind(s[1])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (total.as_str(), customers, days_reported, version),
        ("304.5", 29, 29, 1)
    );

    // The same batch again changes nothing: unchanged, no new version.
    let r = upsert_ok(&db, &batch).await;
    assert_eq!(
        (
            r["inserted"].as_i64(),
            r["updated"].as_i64(),
            r["unchanged"].as_i64()
        ),
        (Some(0), Some(0), Some(2))
    );
    assert_eq!(
        scalar_i64(&db, "SELECT max(version) FROM sales.monthly_sales").await,
        1
    );

    // One changed record, one not: 1 updated, 1 unchanged; the version moves by one.
    let r = upsert_ok(
        &db,
        &json!([
            record(s[0], 2024, 1, json!({"3": {"sales": 7}})),
            batch[1].clone()
        ]),
    )
    .await;
    assert_eq!(
        (
            r["inserted"].as_i64(),
            r["updated"].as_i64(),
            r["unchanged"].as_i64()
        ),
        (Some(0), Some(1), Some(1))
    );
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM sales.monthly_sales ORDER BY store_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(versions, vec![2, 1]);
    let r = upsert_ok(
        &db,
        &json!([record(s[0], 2024, 1, json!({"3": {"sales": 8}}))]),
    )
    .await;
    assert_eq!(r["updated"], 1);
    assert_eq!(
        scalar_i64(
            &db,
            &format!(
                "SELECT version FROM sales.monthly_sales WHERE store_id = {}",
                s[0]
            )
        )
        .await,
        3
    );
}

#[tokio::test]
async fn merge_and_replace_modes() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    upsert_ok(
        &db,
        &json!([record(
            s,
            2024,
            3,
            json!({"1": {"sales": 1, "customers": 1}, "2": {"sales": 2}})
        )]),
    )
    .await;

    // merge (default): days in the record replace those days; other days stay.
    upsert_ok(
        &db,
        &json!([record(
            s,
            2024,
            3,
            json!({"2": {"sales": 20}, "3": {"sales": 30}})
        )]),
    )
    .await;
    let d: Value = sqlx::query_scalar("SELECT daily_data FROM sales.monthly_sales")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        d,
        json!({"1": {"sales": 1, "customers": 1}, "2": {"sales": 20}, "3": {"sales": 30}})
    );

    // replace: the record's daily data is the month's.
    let r = upsert(
        &db,
        &json!([record(s, 2024, 3, json!({"5": {"sales": 5}}))]),
        "replace",
        true,
    )
    .await
    .unwrap();
    assert_eq!(r["updated"], 1);
    let (d, total, days): (Value, String, i32) = sqlx::query_as(
        "SELECT daily_data, total_sales::text, days_reported FROM sales.monthly_sales",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(d, json!({"5": {"sales": 5}}));
    assert_eq!((total.as_str(), days), ("5", 1));

    // Replacing with the same data is 'unchanged'; merging a subset of equal days too.
    let r = upsert(
        &db,
        &json!([record(s, 2024, 3, json!({"5": {"sales": 5}}))]),
        "replace",
        true,
    )
    .await
    .unwrap();
    assert_eq!(r["unchanged"], 1);
    let r = upsert(
        &db,
        &json!([record(s, 2024, 3, json!({"5": {"sales": 5}}))]),
        "merge",
        true,
    )
    .await
    .unwrap();
    assert_eq!(r["unchanged"], 1);
    // Replacing with an empty month empties it.
    let r = upsert(
        &db,
        &json!([record(s, 2024, 3, json!({}))]),
        "replace",
        true,
    )
    .await
    .unwrap();
    assert_eq!(r["updated"], 1);
    assert_eq!(
        scalar_i64(&db, "SELECT days_reported::bigint FROM sales.monthly_sales").await,
        0
    );

    let msg = expect_code(upsert(&db, &json!([]), "overwrite", true).await, "22023");
    assert!(msg.contains("merge or replace"), "{msg}");
}

#[tokio::test]
async fn every_bad_record_is_reported_and_nothing_is_written() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    let batch = json!([
        record(s, 2024, 1, days(1, 31, 1.0, 1)),                             // 0 valid
        record(s, 2024, 13, json!({"1": {"sales": 1}})),                     // 1 month 13
        record(s, 2024, 4, json!({"31": {"sales": 1}})),                     // 2 day 31 in April
        record(s, 2024, 2, json!({"30": {"sales": 1}})),                     // 3 day 30 in February (leap year)
        record(s, 2023, 2, json!({"29": {"sales": 1}})),                     // 4 day 29 in February 2023
        record(s, 2024, 5, json!({"1": {"sales": -5}})),                     // 5 negative sales
        record(s, 2024, 6, json!({"1": {"sales": "100"}})),                  // 6 string sales
        {"storeId": s, "year": 2024, "month": 7, "dailyData": {}, "color": "red"}, // 7 unknown key
        {"year": 2024, "month": 8, "dailyData": {}},                         // 8 missing storeId
        record(999_999, 2024, 9, json!({})),                                 // 9 store does not exist
        null,                                                                // 10 null record
        record(s, 2024, 10, json!({"1": {"sales": 1, "profit": 2}})),        // 11 unknown metric
        {"storeId": "12a", "year": 1999, "month": 0, "dailyData": []},       // 12 several problems
        record(s, 2024, 11, json!({"01": {"sales": 1}})),                    // 13 non-canonical day key
        record(s, 2024, 12, json!({"1": {"customers": 1.5}})),               // 14 fractional customers
    ]);
    let e = upsert(&db, &batch, "merge", true).await.unwrap_err();
    let report = ps422_report(&e);
    assert_eq!(report["total"], 15);
    assert_eq!(report["failed"], 14, "{report}");
    assert_eq!(report["inserted"], 0);
    assert!(has_error(&report, 1, "month", "outside 1..12"), "{report}");
    assert!(
        has_error(&report, 2, "dailyData.31", "does not exist"),
        "{report}"
    );
    assert!(
        has_error(&report, 3, "dailyData.30", "does not exist"),
        "{report}"
    );
    assert!(
        has_error(&report, 4, "dailyData.29", "does not exist"),
        "{report}"
    );
    assert!(
        has_error(&report, 5, "dailyData.1.sales", "negative"),
        "{report}"
    );
    assert!(
        has_error(&report, 6, "dailyData.1.sales", "must be a number"),
        "{report}"
    );
    assert!(has_error(&report, 7, "color", "unknown field"), "{report}");
    assert!(has_error(&report, 8, "storeId", "is required"), "{report}");
    assert!(
        has_error(&report, 9, "storeId", "does not exist"),
        "{report}"
    );
    assert!(has_error(&report, 10, "", "must be an object"), "{report}");
    assert!(
        has_error(&report, 11, "dailyData.1.profit", "unknown metric"),
        "{report}"
    );
    assert!(has_error(&report, 12, "storeId", "numeric"), "{report}");
    assert!(
        has_error(&report, 12, "year", "outside 2000..2100"),
        "{report}"
    );
    assert!(has_error(&report, 12, "month", "outside 1..12"), "{report}");
    assert!(
        has_error(&report, 13, "dailyData.01", "day key"),
        "{report}"
    );
    assert!(
        has_error(&report, 14, "dailyData.1.customers", "whole number"),
        "{report}"
    );
    assert!(
        !errors_of(&report).iter().any(|(i, _, _)| *i == 0),
        "record 0 is valid: {report}"
    );
    // Reported in index order.
    let indexes: Vec<i64> = errors_of(&report).iter().map(|e| e.0).collect();
    let mut sorted = indexes.clone();
    sorted.sort();
    assert_eq!(indexes, sorted);

    let (_, message, _) = pg_error(&e);
    assert!(message.contains("14 of 15"), "{message}");
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.monthly_sales").await,
        0
    );
    assert_eq!(
        scalar_i64(
            &db,
            "SELECT count(*) FROM sales.events WHERE kind <> 'store-created'"
        )
        .await,
        0
    );

    // 29 February exists in 2024.
    let r = upsert_ok(
        &db,
        &json!([record(s, 2024, 2, json!({"29": {"sales": 1}}))]),
    )
    .await;
    assert_eq!(r["inserted"], 1);
}

#[tokio::test]
async fn best_effort_writes_the_valid_records_and_reports_the_rest() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    let batch = json!([
        record(s, 2024, 1, days(1, 31, 1.0, 1)),
        record(s, 2024, 4, json!({"31": {"sales": 1}})),
        record(s, 2024, 5, days(1, 31, 2.0, 2)),
        record(424_242, 2024, 5, json!({})),
    ]);
    let r = upsert(&db, &batch, "merge", false)
        .await
        .expect("best effort does not raise");
    assert_eq!(
        (r["inserted"].as_i64(), r["failed"].as_i64()),
        (Some(2), Some(2)),
        "{r}"
    );
    assert!(has_error(&r, 1, "dailyData.31", "does not exist"));
    assert!(has_error(&r, 3, "storeId", "does not exist"));
    let months: Vec<i32> =
        sqlx::query_scalar("SELECT month FROM sales.monthly_sales ORDER BY month")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(months, vec![1, 5]);
    let payload: Value = sqlx::query_scalar("SELECT payload FROM sales.events WHERE id = $1")
        .bind(r["eventId"].as_i64().unwrap())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(payload["failed"], 2);
    assert_eq!(payload["storeIds"], json!([s]));

    // All invalid, best effort: a report, no write, no batch event.
    let r = upsert(
        &db,
        &json!([record(s, 2024, 13, json!({}))]),
        "merge",
        false,
    )
    .await
    .unwrap();
    assert_eq!(
        (r["failed"].as_i64(), r["inserted"].as_i64()),
        (Some(1), Some(0))
    );
    assert!(r["eventId"].is_null());
}

/// A store deleted by a transaction still running when a best-effort
/// batch names it: the batch waits for that transaction, then reports the
/// store's record as naming no store and writes the others. The store was
/// found (the delete not yet committed), and the foreign key then failed
/// the whole statement: the valid records were lost with it.
#[tokio::test]
async fn a_store_deleted_meanwhile_fails_its_records_only() {
    use sqlx::Connection;
    let db = TestDb::new().await;
    let s = db.stores(2).await;
    let mut deleter = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut deleter).await.unwrap();
    sqlx::query("DELETE FROM sales.stores WHERE id = $1")
        .bind(s[1])
        .execute(&mut deleter)
        .await
        .unwrap();
    let batch = json!([
        record(s[0], 2024, 1, days(1, 3, 1.0, 1)),
        record(s[1], 2024, 1, days(1, 3, 2.0, 1)),
    ]);
    let mut writer = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut writer)
        .await
        .unwrap();
    let write = tokio::spawn(async move {
        sqlx::query_scalar::<_, Value>("SELECT sales.batch_upsert($1, 'merge', false)")
            .bind(batch)
            .fetch_one(&mut writer)
            .await
    });
    sales_e2e::eventually(
        std::time::Duration::from_secs(30),
        "the batch waiting for the delete",
        || async {
            let waiting: bool = sqlx::query_scalar(
                "SELECT coalesce(wait_event_type = 'Lock', false) FROM pg_stat_activity WHERE pid = $1",
            )
            .bind(pid)
            .fetch_one(&db.pool)
            .await
            .unwrap();
            waiting.then_some(())
        },
    )
    .await;
    sqlx::query("COMMIT").execute(&mut deleter).await.unwrap();
    let r = write.await.unwrap().expect("best effort does not raise");
    assert_eq!(
        (r["inserted"].as_i64(), r["failed"].as_i64()),
        (Some(1), Some(1)),
        "{r}"
    );
    assert!(has_error(&r, 1, "storeId", "does not exist"), "{r}");
    let stores: Vec<i64> = sqlx::query_scalar("SELECT store_id FROM sales.monthly_sales")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(stores, vec![s[0]]);
}

#[tokio::test]
async fn null_non_array_and_empty_input() {
    let db = TestDb::new().await;
    // SQL NULL, JSON null, an object, a string: not a batch (22023).
    let r = sqlx::query_scalar::<_, Value>("SELECT sales.batch_upsert(NULL)")
        .fetch_one(&db.pool)
        .await;
    assert!(expect_code(r, "22023").contains("JSON array"));
    for bad in [
        json!(null),
        json!({"storeId": 1}),
        json!("records"),
        json!(42),
    ] {
        expect_code(upsert(&db, &bad, "merge", true).await, "22023");
    }
    // An empty array is a no-op: nothing written, no event.
    let r = upsert_ok(&db, &json!([])).await;
    assert_eq!(r["total"], 0);
    assert!(r["eventId"].is_null());
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.events").await,
        0
    );
    // Elements that are not records are reported by index.
    let s = db.stores(1).await[0];
    let e = upsert(
        &db,
        &json!([record(s, 2024, 1, json!({})), [], "x", 3]),
        "merge",
        true,
    )
    .await
    .unwrap_err();
    let report = ps422_report(&e);
    assert_eq!(report["failed"], 3);
    for i in 1..=3 {
        assert!(has_error(&report, i, "", "must be an object"), "{report}");
    }
    // dailyData missing, null, or not an object.
    let e = upsert(
        &db,
        &json!([
            {"storeId": s, "year": 2024, "month": 1},
            {"storeId": s, "year": 2024, "month": 1, "dailyData": null},
            {"storeId": s, "year": 2024, "month": 1, "dailyData": [1]},
            {"storeId": s, "year": 2024, "month": 1, "dailyData": {"1": 5}},
        ]),
        "merge",
        true,
    )
    .await
    .unwrap_err();
    let report = ps422_report(&e);
    assert!(has_error(&report, 0, "dailyData", "required"), "{report}");
    assert!(has_error(&report, 1, "dailyData", "required"), "{report}");
    assert!(has_error(&report, 2, "dailyData", "object"), "{report}");
    assert!(has_error(&report, 3, "dailyData.1", "object"), "{report}");
}

#[tokio::test]
async fn the_same_record_twice_last_wins_and_is_reported() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    // merge: folded day by day in input order.
    let batch = json!([
        record(s, 2024, 1, json!({"1": {"sales": 1}, "2": {"sales": 2}})),
        record(s, 2024, 2, json!({"1": {"sales": 9}})),
        record(s, 2024, 1, json!({"1": {"sales": 10}})),
        record(s, 2024, 1, json!({"3": {"sales": 30}})),
    ]);
    let r = upsert_ok(&db, &batch).await;
    assert_eq!(
        (r["inserted"].as_i64(), r["merged"].as_i64()),
        (Some(2), Some(2)),
        "{r}"
    );
    assert_eq!(
        r["duplicates"],
        json!([{"index": 0, "supersededBy": 2}, {"index": 2, "supersededBy": 3}])
    );
    let d: Value = sqlx::query_scalar("SELECT daily_data FROM sales.monthly_sales WHERE month = 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        d,
        json!({"1": {"sales": 10}, "2": {"sales": 2}, "3": {"sales": 30}})
    );
    // One row written once: version 1, one created event.
    assert_eq!(
        scalar_i64(
            &db,
            "SELECT version FROM sales.monthly_sales WHERE month = 1"
        )
        .await,
        1
    );
    assert_eq!(
        scalar_i64(
            &db,
            "SELECT count(*) FROM sales.events WHERE kind = 'sales-data-created'"
        )
        .await,
        2
    );

    // replace: the last record wins whole.
    let batch = json!([
        record(s, 2024, 1, json!({"7": {"sales": 7}})),
        record(s, 2024, 1, json!({"8": {"sales": 8}})),
    ]);
    let r = upsert(&db, &batch, "replace", true).await.unwrap();
    assert_eq!(
        (r["updated"].as_i64(), r["merged"].as_i64()),
        (Some(1), Some(1))
    );
    let d: Value = sqlx::query_scalar("SELECT daily_data FROM sales.monthly_sales WHERE month = 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(d, json!({"8": {"sales": 8}}));
    // total = inserted + updated + unchanged + merged + failed
    let sum = ["inserted", "updated", "unchanged", "merged", "failed"]
        .iter()
        .map(|k| r[k].as_i64().unwrap())
        .sum::<i64>();
    assert_eq!(sum, r["total"].as_i64().unwrap());
}

#[tokio::test]
async fn ten_thousand_records_in_one_batch() {
    let db = TestDb::new().await;
    let stores = db.stores(50).await;
    let mut batch = Vec::new();
    for &s in &stores {
        for k in 0..200 {
            let (y, m) = (2005 + k / 12, 1 + k % 12);
            batch.push(record(s, y, m, days(1, 28, 10.0 + k as f64, 3)));
        }
    }
    assert_eq!(batch.len(), 10_000);
    let r = upsert_ok(&db, &Value::Array(batch.clone())).await;
    assert_eq!(
        (r["inserted"].as_i64(), r["failed"].as_i64()),
        (Some(10_000), Some(0))
    );
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.monthly_sales").await,
        10_000
    );
    assert_eq!(
        scalar_i64(
            &db,
            "SELECT count(*) FROM sales.events WHERE kind = 'sales-data-created'"
        )
        .await,
        10_000
    );
    // Again, with one bad record at the end: atomic rejects all 10,000.
    batch.push(record(stores[0], 2024, 4, json!({"31": {"sales": 1}})));
    let e = upsert(&db, &Value::Array(batch), "replace", true)
        .await
        .unwrap_err();
    let report = ps422_report(&e);
    assert_eq!(
        (report["total"].as_i64(), report["failed"].as_i64()),
        (Some(10_001), Some(1))
    );
    assert!(has_error(&report, 10_000, "dailyData.31", "does not exist"));
    assert_eq!(
        scalar_i64(&db, "SELECT max(version) FROM sales.monthly_sales").await,
        1
    );
}

#[tokio::test]
async fn store_scope_refuses_other_stores() {
    let db = TestDb::new().await;
    let s = db.stores(3).await;
    let batch = json!([
        record(s[0], 2024, 1, json!({})),
        record(s[1], 2024, 1, json!({})),
        record(s[2], 2024, 1, json!({}))
    ]);
    let e = sqlx::query_scalar::<_, Value>("SELECT sales.batch_upsert($1, 'merge', true, $2)")
        .bind(&batch)
        .bind(vec![s[0], s[2]])
        .fetch_one(&db.pool)
        .await
        .unwrap_err();
    let report = ps422_report(&e);
    assert_eq!(report["failed"], 1);
    assert!(
        has_error(&report, 1, "storeId", "outside the caller's scope"),
        "{report}"
    );
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.monthly_sales").await,
        0
    );

    let r: Value = sqlx::query_scalar("SELECT sales.batch_upsert($1, 'merge', false, $2)")
        .bind(&batch)
        .bind(vec![s[0], s[2]])
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        (r["inserted"].as_i64(), r["failed"].as_i64()),
        (Some(2), Some(1))
    );
    // An empty scope allows nothing; NULL allows everything.
    let r: Value = sqlx::query_scalar("SELECT sales.batch_upsert($1, 'merge', false, '{}')")
        .bind(&batch)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(r["failed"], 3);
    let r: Value = sqlx::query_scalar("SELECT sales.batch_upsert($1, 'merge', true, NULL)")
        .bind(&batch)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        (r["inserted"].as_i64(), r["unchanged"].as_i64()),
        (Some(1), Some(2))
    );

    // The same scope applies to deletes.
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM sales.monthly_sales ORDER BY store_id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let e = sqlx::query_scalar::<_, Value>("SELECT sales.batch_delete($1, NULL, true, $2)")
        .bind(&ids)
        .bind(vec![s[0]])
        .fetch_one(&db.pool)
        .await
        .unwrap_err();
    let report = ps422_report(&e);
    // An id of another store is answered as a missing one: the report does
    // not say which store owns it.
    for i in [1, 2] {
        assert!(
            has_error(&report, i, &format!("ids[{i}]"), "no such sales record"),
            "{report}"
        );
    }
    assert!(!report.to_string().contains("scope"), "{report}");
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.monthly_sales").await,
        3
    );
    // Nor are its rows locked: while a scoped, non-atomic delete of every
    // id is open, another session takes the other stores' rows at once.
    let mut tx = db.pool.begin().await.unwrap();
    let r: Value = sqlx::query_scalar("SELECT sales.batch_delete($1, NULL, false, $2)")
        .bind(&ids)
        .bind(vec![s[0]])
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(
        (r["deleted"].as_i64(), r["failed"].as_i64()),
        (Some(1), Some(2)),
        "{r}"
    );
    let mut other = db.connect().await;
    let free: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM sales.monthly_sales WHERE id = ANY($1) AND store_id <> $2 ORDER BY id FOR UPDATE NOWAIT",
    )
    .bind(&ids)
    .bind(s[0])
    .fetch_all(&mut other)
    .await
    .expect("rows outside the scope are not locked by the delete");
    assert_eq!(free.len(), 2);
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn batch_delete_by_ids_and_keys() {
    let db = TestDb::new().await;
    let s = db.stores(2).await;
    let batch: Vec<Value> = (1..=6)
        .map(|m| record(s[(m % 2) as usize], 2024, m, days(1, 3, 1.0, 1)))
        .collect();
    upsert_ok(&db, &Value::Array(batch)).await;
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM sales.monthly_sales ORDER BY month")
        .fetch_all(&db.pool)
        .await
        .unwrap();

    // Atomic with one unknown id and one malformed key: nothing deleted; report by item.
    let keys =
        json!([{"storeId": s[0], "year": 2024, "month": 2}, {"storeId": s[0], "year": 2024}]);
    let e = sqlx::query_scalar::<_, Value>("SELECT sales.batch_delete($1, $2)")
        .bind(vec![ids[0], 987_654])
        .bind(&keys)
        .fetch_one(&db.pool)
        .await
        .unwrap_err();
    let report = ps422_report(&e);
    assert_eq!(
        (report["total"].as_i64(), report["failed"].as_i64()),
        (Some(4), Some(2)),
        "{report}"
    );
    assert!(
        has_error(&report, 1, "ids[1]", "no such sales record"),
        "{report}"
    );
    assert!(
        has_error(&report, 3, "keys[1].month", "required"),
        "{report}"
    );
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.monthly_sales").await,
        6
    );

    // Best effort: the found ones go, the rest are reported.
    let r: Value = sqlx::query_scalar("SELECT sales.batch_delete($1, $2, false)")
        .bind(vec![ids[0], 987_654])
        .bind(&keys)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        (r["deleted"].as_i64(), r["failed"].as_i64()),
        (Some(2), Some(2)),
        "{r}"
    );
    assert!(r["eventId"].as_i64().is_some());
    let left: Vec<i32> = sqlx::query_scalar("SELECT month FROM sales.monthly_sales ORDER BY month")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, vec![3, 4, 5, 6]);

    // Atomic success, by keys (snake_case too) and ids at once; the same row
    // named twice is deleted once.
    let r: Value = sqlx::query_scalar("SELECT sales.batch_delete($1, $2)")
        .bind(vec![ids[2], ids[2]])
        .bind(json!([{"store_id": s[0].to_string(), "year": 2024, "month": 4}, {"storeId": s[1], "year": 2024, "month": 3}]))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        (
            r["total"].as_i64(),
            r["deleted"].as_i64(),
            r["failed"].as_i64()
        ),
        (Some(4), Some(2), Some(0)),
        "{r}"
    );
    let payload: Value = sqlx::query_scalar("SELECT payload FROM sales.events WHERE id = $1")
        .bind(r["eventId"].as_i64().unwrap())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(payload["operation"], "delete");
    assert_eq!(payload["deleted"], 2);
    assert_eq!(
        scalar_i64(
            &db,
            "SELECT count(*) FROM sales.events WHERE kind = 'sales-data-deleted'"
        )
        .await,
        4
    );

    // Bad calls.
    let msg = expect_code(
        sqlx::query_scalar::<_, Value>("SELECT sales.batch_delete()")
            .fetch_one(&db.pool)
            .await,
        "22023",
    );
    assert!(msg.contains("ids or keys"), "{msg}");
    expect_code(
        sqlx::query_scalar::<_, Value>("SELECT sales.batch_delete(NULL, '{\"storeId\": 1}')")
            .fetch_one(&db.pool)
            .await,
        "22023",
    );
    let e = sqlx::query_scalar::<_, Value>("SELECT sales.batch_delete(ARRAY[NULL, -1]::bigint[])")
        .fetch_one(&db.pool)
        .await
        .unwrap_err();
    let report = ps422_report(&e);
    assert!(has_error(&report, 0, "ids[0]", "null"), "{report}");
    assert!(has_error(&report, 1, "ids[1]", "positive"), "{report}");
    // Empty arrays: nothing to do.
    let r: Value = sqlx::query_scalar("SELECT sales.batch_delete('{}'::bigint[], '[]')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        (r["total"].as_i64(), r["deleted"].as_i64()),
        (Some(0), Some(0))
    );
    assert!(r["eventId"].is_null());
}

/// Four writers upsert the same 500 keys, each in its own shuffled order,
/// several rounds: no deadlock, no lost update.
#[tokio::test]
async fn concurrent_batches_on_the_same_rows_do_not_deadlock() {
    let db = TestDb::new().await;
    let stores = db.stores(25).await;
    let keys: Vec<(i64, i32, i32)> = stores
        .iter()
        .flat_map(|&s| (1..=20).map(move |m| (s, 2020 + (m - 1) / 12, 1 + (m - 1) % 12)))
        .collect();
    assert_eq!(keys.len(), 500);
    const WRITERS: usize = 4;
    const ROUNDS: usize = 5;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let pool = db.pool.clone();
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..ROUNDS {
                let mut order = keys.clone();
                order.shuffle(&mut rand::thread_rng());
                // Distinct values per writer and round: every write changes every row.
                let v = (w * 1000 + round) as f64;
                let batch: Vec<Value> = order
                    .iter()
                    .map(|&(s, y, m)| {
                        record(s, y, m, json!({"1": {"sales": v}, "2": {"sales": v}}))
                    })
                    .collect();
                let r: Value = sqlx::query_scalar("SELECT sales.batch_upsert($1)")
                    .bind(Value::Array(batch))
                    .fetch_one(&pool)
                    .await
                    .unwrap_or_else(|e| panic!("writer {w} round {round}: {e}"));
                assert_eq!(
                    r["inserted"].as_i64().unwrap() + r["updated"].as_i64().unwrap(),
                    500,
                    "{r}"
                );
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let n = (WRITERS * ROUNDS) as i64;
    // Every write was applied once: each row's version is the number of writes.
    let (rows, min_v, max_v): (i64, i64, i64) =
        sqlx::query_as("SELECT count(*), min(version), max(version) FROM sales.monthly_sales")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((rows, min_v, max_v), (500, n, n));
    // And each made one event per row, whose versions are 1..n without gaps.
    let (events, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (row_id, row_version)) FROM sales.events WHERE kind LIKE 'sales-data-%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((events, distinct), (500 * n, 500 * n));
}

/// Upserts and deletes over the same rows at once lock in the same order.
#[tokio::test]
async fn concurrent_upserts_and_deletes_do_not_deadlock() {
    let db = TestDb::new().await;
    let stores = db.stores(10).await;
    let keys: Vec<(i64, i32, i32)> = stores
        .iter()
        .flat_map(|&s| (1..=12).map(move |m| (s, 2024, m)))
        .collect();
    let mut tasks = Vec::new();
    for w in 0..4 {
        let pool = db.pool.clone();
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..6 {
                let mut order = keys.clone();
                order.shuffle(&mut rand::thread_rng());
                if (w + round) % 2 == 0 {
                    let batch: Vec<Value> = order
                        .iter()
                        .map(|&(s, y, m)| record(s, y, m, json!({"1": {"sales": w}})))
                        .collect();
                    sqlx::query("SELECT sales.batch_upsert($1)")
                        .bind(Value::Array(batch))
                        .execute(&pool)
                        .await
                } else {
                    let keys: Vec<Value> = order
                        .iter()
                        .map(|&(s, y, m)| json!({"storeId": s, "year": y, "month": m}))
                        .collect();
                    sqlx::query("SELECT sales.batch_delete(NULL, $1, false)")
                        .bind(Value::Array(keys))
                        .execute(&pool)
                        .await
                }
                .unwrap_or_else(|e| panic!("writer {w} round {round}: {e}"));
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
}

#[tokio::test]
async fn daily_data_errors_lists_every_problem() {
    let db = TestDb::new().await;
    let errs: Value = sqlx::query_scalar("SELECT sales.daily_data_errors(2023, 2, $1)")
        .bind(json!({"29": {"sales": 1}, "3": {"sales": -1}, "x": {}}))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let fields: HashSet<String> = errs
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        fields,
        HashSet::from([
            "dailyData.29".to_string(),
            "dailyData.3.sales".into(),
            "dailyData.x".into()
        ])
    );
    let errs: Value = sqlx::query_scalar("SELECT sales.daily_data_errors(2024, 13, '{}')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(errs[0]["field"], "month");
    let ok: bool =
        sqlx::query_scalar("SELECT sales.daily_data_valid(2024, 2, '{\"29\": {\"sales\": 1}}')")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(ok);
}

/// `daily_data_valid` is false exactly when `daily_data_errors` reports
/// something, a year outside 2000..2100 or a month outside 1..12 included
/// (it was true for those: 1900-02 with a 29th, month 13 with a 31st). The
/// CHECK constraint leaves those to the year's and the month's own
/// constraints (`daily_data_check`), so a bad year or month is still
/// refused naming its column.
#[tokio::test]
async fn daily_data_valid_agrees_with_its_report() {
    let db = TestDb::new().await;
    let docs = [
        json!({}),
        json!({"29": {"sales": 1}}),
        json!({"31": {"sales": 1}}),
        json!({"1": {"sales": -1}}),
        json!([]),
    ];
    let mut seen_false = 0;
    for year in [1900, 1999, 2000, 2023, 2024, 2100, 2101] {
        for month in [-1, 0, 1, 2, 4, 12, 13] {
            for doc in &docs {
                let (valid, errors, check): (bool, Value, bool) = sqlx::query_as(
                    "SELECT sales.daily_data_valid($1, $2, $3), sales.daily_data_errors($1, $2, $3),
                            sales.daily_data_check($1, $2, $3)",
                )
                .bind(year)
                .bind(month)
                .bind(doc)
                .fetch_one(&db.pool)
                .await
                .unwrap();
                let reported = !errors.as_array().unwrap().is_empty();
                assert_eq!(valid, !reported, "{year}-{month} {doc}: {errors}");
                let in_range = (2000..=2100).contains(&year) && (1..=12).contains(&month);
                assert_eq!(check, valid || !in_range, "{year}-{month} {doc}");
                seen_false += usize::from(!valid);
            }
        }
    }
    assert!(seen_false > 0);
    let s = db.stores(1).await[0];
    for (year, month, constraint) in [
        (1999, 1, "monthly_sales_year_check"),
        (1900, 2, "monthly_sales_year_check"),
        (2024, 13, "monthly_sales_month_check"),
    ] {
        let e = sqlx::query(
            "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data) VALUES ($1, $2, $3, $4)",
        )
        .bind(s)
        .bind(year)
        .bind(month)
        .bind(json!({"29": {"sales": 1}, "31": {"sales": 1}}))
        .execute(&db.pool)
        .await
        .expect_err("a bad year or month");
        let named = e
            .as_database_error()
            .and_then(|d| d.constraint())
            .unwrap_or_default();
        assert_eq!(named, constraint, "{year}-{month}");
    }
}

/// Numbers reach the table exactly as sent (no float round trip), and totals
/// are exact numeric sums.
#[tokio::test]
async fn numbers_are_stored_and_summed_exactly() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    let text = format!(
        r#"[{{"storeId": {s}, "year": 2024, "month": 1,
             "dailyData": {{"1": {{"sales": 100.10, "customers": 3}}, "2": {{"sales": 0.1}}, "3": {{"sales": 0.2}},
                            "4": {{"sales": 123456789.123456789}}, "5": {{"sales": 1e12}}}}}}]"#
    );
    let r: Value = sqlx::query_scalar("SELECT sales.batch_upsert($1::jsonb)")
        .bind(&text)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(r["inserted"], 1, "{r}");
    let (day1, day4, total): (String, String, String) = sqlx::query_as(
        "SELECT daily_data -> '1' ->> 'sales', daily_data -> '4' ->> 'sales', total_sales::text FROM sales.monthly_sales",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(day1, "100.10");
    assert_eq!(day4, "123456789.123456789");
    assert_eq!(total, "1000123456889.523456789");
    // Just above the limit, and a fraction where a whole number is needed.
    let text = format!(
        r#"[{{"storeId": {s}, "year": 2024, "month": 2, "dailyData": {{"1": {{"sales": 1000000000000.5}}, "2": {{"customers": 2.5}}, "3": {{"customers": 2.0}}}}}}]"#
    );
    let e = sqlx::query_scalar::<_, Value>("SELECT sales.batch_upsert($1::jsonb)")
        .bind(&text)
        .fetch_one(&db.pool)
        .await
        .unwrap_err();
    let report = ps422_report(&e);
    assert!(
        has_error(&report, 0, "dailyData.1.sales", "larger than 1e12"),
        "{report}"
    );
    assert!(
        has_error(&report, 0, "dailyData.2.customers", "whole number"),
        "{report}"
    );
    assert_eq!(report["failed"], 1);
    assert_eq!(
        errors_of(&report).len(),
        2,
        "2.0 is a whole number: {report}"
    );
}

/// Counts written with a scale (`2.0`, `1.0e3`, `30.00`), whole numbers the
/// rules accept, are stored as the integers they are (the OpenAPI document
/// types them as integers), by a batch and by plain SQL alike; sales keep
/// their digits as written; writing the same values again changes nothing.
#[tokio::test]
async fn whole_counts_written_with_a_scale_are_stored_as_integers() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    let text = format!(
        r#"[{{"storeId": {s}, "year": 2024, "month": 3,
             "dailyData": {{"1": {{"sales": 10.50, "customers": 2.0, "transactions": 1.0e3}},
                            "2": {{"sales": 1.0, "customers": 7}}}}}}]"#
    );
    let r: Value = sqlx::query_scalar("SELECT sales.batch_upsert($1::jsonb)")
        .bind(&text)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(r["inserted"], 1, "{r}");
    let stored = || async {
        sqlx::query_as::<_, (String, i64, i64)>(
            "SELECT daily_data::text, total_customers, version FROM sales.monthly_sales
             WHERE store_id = $1 AND year = 2024 AND month = 3",
        )
        .bind(s)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let (doc, customers, v1) = stored().await;
    assert_eq!(
        doc,
        r#"{"1": {"sales": 10.50, "customers": 2, "transactions": 1000}, "2": {"sales": 1.0, "customers": 7}}"#
    );
    assert_eq!(customers, 9);
    // The same values again, in either form: unchanged, no new version.
    let r: Value = sqlx::query_scalar("SELECT sales.batch_upsert($1::jsonb)")
        .bind(&text)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        (r["unchanged"].as_i64(), r["updated"].as_i64()),
        (Some(1), Some(0)),
        "{r}"
    );
    assert_eq!(stored().await.2, v1);
    // Merged into, and written by plain SQL: the new days' counts too.
    let text = format!(
        r#"[{{"storeId": {s}, "year": 2024, "month": 3, "dailyData": {{"3": {{"customers": 4.00}}}}}}]"#
    );
    let r: Value = sqlx::query_scalar("SELECT sales.batch_upsert($1::jsonb)")
        .bind(&text)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(r["updated"], 1, "{r}");
    sqlx::query(
        r#"UPDATE sales.monthly_sales SET daily_data = daily_data || '{"4": {"transactions": 5.0, "sales": 2.50}}'
           WHERE store_id = $1 AND year = 2024 AND month = 3"#,
    )
    .bind(s)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        r#"INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
           VALUES ($1, 2024, 4, '{"1": {"customers": 3.0}}')"#,
    )
    .bind(s)
    .execute(&db.pool)
    .await
    .unwrap();
    let (doc, customers, _) = stored().await;
    assert_eq!(
        doc,
        r#"{"1": {"sales": 10.50, "customers": 2, "transactions": 1000}, "2": {"sales": 1.0, "customers": 7}, "3": {"customers": 4}, "4": {"sales": 2.50, "transactions": 5}}"#
    );
    assert_eq!(customers, 13);
    let april: String = sqlx::query_scalar(
        "SELECT daily_data::text FROM sales.monthly_sales WHERE store_id = $1 AND month = 4",
    )
    .bind(s)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(april, r#"{"1": {"customers": 3}}"#);
}

/// Duplicates spelled differently (`dailyData` / `daily_data`) fold too.
#[tokio::test]
async fn duplicates_fold_across_spellings() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    let batch = json!([
        {"store_id": s, "year": 2024, "month": 6, "daily_data": {"1": {"sales": 1}, "2": {"sales": 2}}},
        {"storeId": s, "year": 2024, "month": 6, "dailyData": {"2": {"sales": 20}}},
        {"storeId": s, "year": 2024, "month": 6, "dailyData": {}},
    ]);
    let r = upsert_ok(&db, &batch).await;
    assert_eq!(
        (r["inserted"].as_i64(), r["merged"].as_i64()),
        (Some(1), Some(2)),
        "{r}"
    );
    let d: Value = sqlx::query_scalar("SELECT daily_data FROM sales.monthly_sales")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(d, json!({"1": {"sales": 1}, "2": {"sales": 20}}));
    // All empty: an empty month, not NULL.
    let r = upsert_ok(
        &db,
        &json!([record(s, 2024, 7, json!({})), record(s, 2024, 7, json!({}))]),
    )
    .await;
    assert_eq!(r["inserted"], 1);
    let days: i32 =
        sqlx::query_scalar("SELECT days_reported FROM sales.monthly_sales WHERE month = 7")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(days, 0);
}

/// What counts as unchanged when merging: every day of the record equal (as
/// jsonb: 1.0 = 1) to the stored day. A day replaced by a smaller one changes.
#[tokio::test]
async fn merge_unchanged_is_judged_day_by_day() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    upsert_ok(
        &db,
        &json!([record(
            s,
            2024,
            1,
            json!({"1": {"sales": 1, "customers": 2}, "2": {"sales": 5}})
        )]),
    )
    .await;
    let merge = |text: String| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, Value>("SELECT sales.batch_upsert($1::jsonb)")
                .bind(text)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let r = merge(format!(
        r#"[{{"storeId": {s}, "year": 2024, "month": 1, "dailyData": {{"2": {{"sales": 5.0}}}}}}]"#
    ))
    .await;
    assert_eq!(r["unchanged"], 1, "{r}");
    let r = merge(format!(
        r#"[{{"storeId": {s}, "year": 2024, "month": 1, "dailyData": {{}}}}]"#
    ))
    .await;
    assert_eq!(r["unchanged"], 1, "{r}");
    let r = merge(format!(
        r#"[{{"storeId": {s}, "year": 2024, "month": 1, "dailyData": {{"1": {{"sales": 1}}}}}}]"#
    ))
    .await;
    assert_eq!(r["updated"], 1, "the day loses its customers: {r}");
    let r = merge(format!(
        r#"[{{"storeId": {s}, "year": 2024, "month": 1, "dailyData": {{"3": {{"sales": 0}}}}}}]"#
    ))
    .await;
    assert_eq!(r["updated"], 1, "a new day: {r}");
    assert_eq!(
        scalar_i64(&db, "SELECT version FROM sales.monthly_sales").await,
        3
    );
}

/// The generated totals (`sales.daily_sum`) and the validation
/// (`sales.daily_data_valid`, whose rules the CHECK's `daily_data_check`
/// applies for a year and month in range) read jsonb's binary layout directly: compared here, on random months,
/// with sums computed by Postgres from `jsonb_each` and with validity known
/// from how each month was made.
#[tokio::test]
async fn totals_and_validity_match_a_reference() {
    use rand::{Rng, SeedableRng};
    let db = TestDb::new().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for _ in 0..300 {
        let mut days = serde_json::Map::new();
        let mut valid = true;
        for d in 1..=rng.gen_range(0..=31u32) {
            if rng.gen_bool(0.3) {
                continue;
            }
            let mut day = serde_json::Map::new();
            if rng.gen_bool(0.8) {
                let cents: u64 = rng.gen_range(0..1_000_000);
                day.insert(
                    "sales".into(),
                    serde_json::from_str(&format!("{}.{:02}", cents / 100, cents % 100)).unwrap(),
                );
            }
            if rng.gen_bool(0.7) {
                day.insert("customers".into(), json!(rng.gen_range(0..500)));
            }
            if rng.gen_bool(0.3) {
                day.insert("transactions".into(), json!(rng.gen_range(0..900)));
            }
            match rng.gen_range(0..40) {
                0 => {
                    day.insert("customers".into(), json!(1.5));
                    valid = false;
                }
                1 => {
                    day.insert("sales".into(), json!(-1));
                    valid = false;
                }
                2 => {
                    day.insert("refunds".into(), json!(1));
                    valid = false;
                }
                3 => {
                    day.insert("sales".into(), json!("12"));
                    valid = false;
                }
                _ => {}
            }
            if day.is_empty() {
                valid = false;
            }
            days.insert(d.to_string(), Value::Object(day));
        }
        if rng.gen_bool(0.02) {
            days.insert("32".into(), json!({"sales": 1}));
            valid = false;
        }
        let month = Value::Object(days);
        let row: (bool, Option<String>, Option<String>, Option<String>, Option<String>) = sqlx::query_as(
            "SELECT sales.daily_data_valid(2024, 1, $1),
                    sales.daily_sum($1, 'sales')::text,
                    (SELECT coalesce(sum((v->>'sales')::numeric) FILTER (WHERE jsonb_typeof(v->'sales') = 'number'), 0) FROM jsonb_each($1) e(k, v))::text,
                    sales.daily_sum($1, 'customers')::text,
                    (SELECT coalesce(sum((v->>'customers')::numeric) FILTER (WHERE jsonb_typeof(v->'customers') = 'number'), 0) FROM jsonb_each($1) e(k, v))::text",
        )
        .bind(&month)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(row.0, valid, "validity of {month}");
        assert_eq!(row.1, row.2, "sales total of {month}");
        assert_eq!(row.3, row.4, "customers total of {month}");
    }
}

/// A backend keeps the plans of the statements every batch runs; they
/// follow the objects they name. The extension dropped and created again
/// under the same connection, a batch there writes its rows and its event.
#[tokio::test]
async fn kept_plans_follow_a_recreated_extension() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    for round in 0..2 {
        let store = db.stores(1).await[0];
        let report: Value = sqlx::query_scalar("SELECT sales.batch_upsert($1)")
            .bind(json!([record(store, 2024, 1, days(1, 3, 5.0, 1))]))
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(report["inserted"], 1, "round {round}: {report}");
        let event: i64 = report["eventId"].as_i64().expect("an event id");
        let kind: String = sqlx::query_scalar("SELECT kind FROM sales.events WHERE id = $1")
            .bind(event)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(kind, "batch-completed");
        if round == 0 {
            sqlx::query("DROP EXTENSION pg_sales CASCADE")
                .execute(&mut *conn)
                .await
                .unwrap();
            sqlx::query("CREATE EXTENSION pg_sales")
                .execute(&mut *conn)
                .await
                .unwrap();
        }
    }
}

/// The metric rules are judged on the stored number's digits, not on an
/// f64 that rounds it: a tiny negative, a fraction past an f64's precision
/// and a value just above 1e12 are refused by the CHECK constraint,
/// `daily_data_valid` and `batch_upsert` alike.
#[tokio::test]
async fn metrics_are_judged_exactly() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    let cases = [
        (r#"{"sales": -1e-400}"#, "must not be negative"),
        (r#"{"sales": 1000000000000.0001}"#, "is larger than 1e12"),
        (
            r#"{"customers": 999999999999.9999}"#,
            "must be a whole number",
        ),
        (
            r#"{"customers": 1.00000000000000000001}"#,
            "must be a whole number",
        ),
        (r#"{"transactions": 1e-400}"#, "must be a whole number"),
        (r#"{"sales": 1e400}"#, "is larger than 1e12"),
        (r#"{"sales": -1e400}"#, "must not be negative"),
    ];
    for (day, reason) in cases {
        let doc = format!(r#"{{"1": {day}}}"#);
        let valid: bool = sqlx::query_scalar("SELECT sales.daily_data_valid(2024, 1, $1::jsonb)")
            .bind(&doc)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert!(!valid, "{doc}");
        let r = sqlx::query(
            "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data) VALUES ($1, 2024, 1, $2::jsonb)",
        )
        .bind(s)
        .bind(&doc)
        .execute(&db.pool)
        .await;
        expect_code(r, "23514");
        let batch =
            format!(r#"[{{"storeId": {s}, "year": 2024, "month": 2, "dailyData": {doc}}}]"#);
        let e =
            sqlx::query_scalar::<_, Value>("SELECT sales.batch_upsert($1::jsonb, 'merge', true)")
                .bind(&batch)
                .fetch_one(&db.pool)
                .await
                .expect_err(&batch);
        let report = ps422_report(&e);
        assert!(
            errors_of(&report)
                .iter()
                .any(|(i, f, r)| *i == 0 && f.starts_with("dailyData.1.") && r.contains(reason)),
            "{doc}: {report}"
        );
    }
    // Just inside the rules: accepted, stored as written.
    for doc in [
        r#"{"1": {"sales": 1e12}}"#,
        r#"{"1": {"sales": 1e-400, "customers": 999999999999}}"#,
        r#"{"1": {"sales": 0.00000000000000000001, "customers": -0}}"#,
    ] {
        let valid: bool = sqlx::query_scalar("SELECT sales.daily_data_valid(2024, 1, $1::jsonb)")
            .bind(doc)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert!(valid, "{doc}");
    }
    assert_eq!(
        scalar_i64(&db, "SELECT count(*) FROM sales.monthly_sales").await,
        0
    );
}

/// Comparing documents nested thousands deep ends in Postgres' stack depth
/// error, never in a crash of the backend (and of every session with it).
#[tokio::test]
async fn deeply_nested_documents_end_in_an_error_not_a_crash() {
    let db = TestDb::new().await;
    let mut conn = db.connect().await;
    sqlx::raw_sql(
        "CREATE TEMP TABLE deep (a jsonb, b jsonb);
         DO $$ DECLARE a jsonb := '1'; b jsonb := '2'; BEGIN
             FOR i IN 1..14000 LOOP
                 a := jsonb_build_object('k', a); b := jsonb_build_object('k', b);
             END LOOP;
             INSERT INTO deep VALUES (a, b);
         END $$;
         CREATE FUNCTION pg_temp.nest(n int, a jsonb, b jsonb) RETURNS jsonb LANGUAGE plpgsql AS
         $$ BEGIN IF n = 0 THEN RETURN sales.changed_days(a, b); END IF;
                  RETURN pg_temp.nest(n - 1, a, b); END $$;",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let r = sqlx::query_scalar::<_, Value>("SELECT pg_temp.nest(400, a, b) FROM deep")
        .fetch_one(&mut conn)
        .await;
    expect_code(r, "54001");
    // The session (and the cluster) carry on.
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
}

/// Delete keys are read as stored: a number no f64 holds, or a key nested
/// deeper than a JSON parser's recursion limit, is a reported key like any
/// other bad one (it was an internal error, XX000, for the whole call).
#[tokio::test]
async fn delete_keys_with_numbers_beyond_f64_are_reported() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    let deep = format!(
        r#"[{{"storeId": {s}, "year": 2024, "month": 1, "x": {}1{}}}]"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    for keys in [
        r#"[{"storeId": 1e400, "year": 2024, "month": 1}]"#.to_string(),
        r#"[{"storeId": 1, "year": -1e400, "month": 1}]"#.to_string(),
        deep,
    ] {
        let e = sqlx::query_scalar::<_, Value>("SELECT sales.batch_delete(NULL, $1::jsonb)")
            .bind(&keys)
            .fetch_one(&db.pool)
            .await
            .expect_err(&keys);
        let report = ps422_report(&e);
        assert_eq!(report["failed"], 1, "{keys}: {report}");
        assert!(
            errors_of(&report)
                .iter()
                .all(|(i, f, _)| *i == 0 && f.starts_with("keys[0]")),
            "{keys}: {report}"
        );
    }
}

/// `sales.parse_json` in a database of another encoding takes any text the
/// database holds (Postgres' own jsonb input reads it) instead of refusing
/// what is not UTF-8 before it runs.
#[tokio::test]
async fn parse_json_reads_text_in_a_latin1_database() {
    use sqlx::{ConnectOptions, Connection, Executor};
    use std::str::FromStr;
    let name = format!("pgs_latin1_{}", uuid::Uuid::new_v4().simple());
    let base = sqlx::postgres::PgConnectOptions::from_str(&sales_e2e::base_url()).unwrap();
    let mut admin = base.clone().database("postgres").connect().await.unwrap();
    admin
        .execute(
            format!(
                "CREATE DATABASE {name} TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'"
            )
            .as_str(),
        )
        .await
        .unwrap();
    let outcome = async {
        let mut conn = base.clone().database(&name).connect().await?;
        conn.execute("CREATE EXTENSION pg_sales").await?;
        let same: bool = sqlx::query_scalar(
            "SELECT sales.parse_json($1) = $1::jsonb AND sales.parse_json($1)::text = $1::jsonb::text",
        )
        .bind(r#"{"é": 1, "Nörth": ["ü", 2.50]}"#)
        .fetch_one(&mut conn)
        .await?;
        conn.close().await?;
        Ok::<bool, sqlx::Error>(same)
    }
    .await;
    admin
        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await
        .unwrap();
    assert!(outcome.expect("parse_json in a LATIN1 database"));
}

/// `sales.parse_json` hands a text longer than it parses itself (16 MiB)
/// to Postgres' own jsonb input, which fails with an error where memory
/// runs out (the extension's tree, built with Rust's allocator, would abort
/// the process and restart every session): the same value either way.
#[tokio::test]
async fn parse_json_hands_long_texts_to_jsonb_input() {
    let db = TestDb::new().await;
    for n in [1_000_000usize, 9_000_000] {
        // About 2n bytes of text: under, then over the 16 MiB the fast
        // path takes.
        let same: bool = sqlx::query_scalar(
            "SELECT sales.parse_json(t) = t::jsonb
             FROM (SELECT '[' || repeat('1,', $1) || '1]' AS t) s",
        )
        .bind(n as i32)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert!(same, "{n} elements");
    }
}

/// A best-effort batch locks its stores as the tables' owner (a lock needs
/// UPDATE on `sales.stores`): a role that may write sales rows and only read
/// stores writes one, as it did before the lock.
#[tokio::test]
async fn a_best_effort_batch_needs_no_right_to_change_stores() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    let role = format!("pgs_rows_{}", rand::random::<u32>());
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role}; GRANT USAGE ON SCHEMA sales TO {role};
         GRANT SELECT, INSERT, UPDATE ON sales.monthly_sales TO {role};
         GRANT SELECT ON sales.stores TO {role};
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA sales TO {role}"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    sqlx::raw_sql(&format!("SET LOCAL ROLE {role}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    let r: Value = sqlx::query_scalar("SELECT sales.batch_upsert($1, 'merge', false)")
        .bind(json!([
            record(s, 2024, 1, days(1, 2, 1.0, 1)),
            record(424_242, 2024, 1, days(1, 2, 1.0, 1)),
        ]))
        .fetch_one(&mut *tx)
        .await
        .expect("a writer of sales rows, best effort");
    assert_eq!(
        (r["inserted"].as_i64(), r["failed"].as_i64()),
        (Some(1), Some(1)),
        "{r}"
    );
    tx.commit().await.unwrap();
    drop(conn);
    sqlx::raw_sql(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .execute(&db.pool)
        .await
        .unwrap();
}

/// Daily sales summing past what a numeric holds (jsonb takes each day's
/// 9e131071) are refused by the daily data CHECK, naming it, as customers
/// summing past the bigint range are (the row trigger failed first with
/// 22023 "numeric overflow in a daily total", which named neither).
#[tokio::test]
async fn daily_sales_summing_past_numeric_are_refused_by_the_check() {
    let db = TestDb::new().await;
    let s = db.stores(1).await;
    let sql = format!(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         VALUES ({}, 2024, 1, '{{\"1\": {{\"sales\": 9e131071}}, \"2\": {{\"sales\": 9e131071}}}}')",
        s[0]
    );
    let e = sqlx::raw_sql(&sql)
        .execute(&db.pool)
        .await
        .expect_err("refused");
    let (code, message, _) = pg_error(&e);
    assert_eq!(code, "23514", "{message}");
    assert!(
        message.contains("monthly_sales_daily_data_check"),
        "{message}"
    );
}
