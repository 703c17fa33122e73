//! A sales record's history and as-of reads, read back from its events:
//! API batches, plain SQL updates, an asynchronous batch and an import (job
//! ids), deletes; paging; scope; what pruning leaves (410 rather than an
//! empty answer) and `sales.event_history` keeping history past the log's
//! retention. Every version is checked against the record as a plain GET
//! returned it at the time.

use sales_e2e::{eventually, user_token, Api, Fixture};
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

async fn wait_job(api: &Api, id: i64) -> Value {
    eventually(WAIT, &format!("job {id} to end"), || async {
        let (status, doc) = api.get(&format!("/api/v2/imports/{id}")).await;
        assert_eq!(status, 200, "{doc}");
        matches!(doc["state"].as_str(), Some("completed" | "failed")).then_some(doc)
    })
    .await
}

async fn current(api: &Api, id: i64) -> Value {
    let (st, body) = api.get(&format!("/api/v2/sales/{id}")).await;
    assert_eq!(st, 200, "{body}");
    body["data"].clone()
}

fn day(sales: f64, customers: i64) -> Value {
    json!({"sales": sales, "customers": customers})
}

/// Numbers as f64, so 100 and 100.0 (jsonb keeps what was written) compare equal.
fn norm(v: &Value) -> Value {
    match v {
        Value::Number(n) => json!(n.as_f64().unwrap()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), norm(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(norm).collect()),
        other => other.clone(),
    }
}

#[tokio::test]
async fn every_write_path_is_in_the_history_with_old_and_new_values() {
    let f = Fixture::start(2, &[]).await;
    let s = f.stores[0];
    let mut seen: Vec<Value> = Vec::new();

    // v1: an API batch inserts days 1..3.
    let (st, body) = f
        .admin
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [{"storeId": s, "year": 2024, "month": 2,
                    "dailyData": {"1": day(100.0, 10), "2": day(100.0, 10), "3": day(100.0, 10)}}]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let id: i64 = sqlx::query_scalar("SELECT id FROM sales.monthly_sales")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    seen.push(current(&f.admin, id).await);

    // v2: a merge changes day 2 and adds day 4.
    let (st, body) = f
        .admin
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [{"storeId": s, "year": 2024, "month": 2,
                    "dailyData": {"2": day(250.5, 12), "4": day(40.0, 4)}}]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    seen.push(current(&f.admin, id).await);

    // v3: plain SQL, naming no user, removes day 1. The server's cache
    // hears of a write it did not make through the event relay, a moment
    // later: wait for the read to show it.
    sqlx::query("UPDATE sales.monthly_sales SET daily_data = daily_data - '1' WHERE id = $1")
        .bind(id)
        .execute(&f.db.pool)
        .await
        .unwrap();
    let v3 = eventually(
        Duration::from_secs(10),
        "the plain SQL write readable",
        || async {
            let r = current(&f.admin, id).await;
            (r["version"] == 3).then_some(r)
        },
    )
    .await;
    seen.push(v3);

    // v4: an asynchronous batch (a job) changes day 3.
    let (st, body) = f
        .admin
        .post(
            "/api/v2/sales/batch?async=true",
            &json!({"salesDataArray": [{"storeId": s, "year": 2024, "month": 2,
                    "dailyData": {"3": day(333.0, 33)}}]}),
        )
        .await;
    assert_eq!(st, 202, "{body}");
    let batch_job = body["id"].as_i64().unwrap();
    assert_eq!(wait_job(&f.admin, batch_job).await["state"], "completed");
    seen.push(current(&f.admin, id).await);

    // v5: an import changes day 5 (a POS file).
    let r = f
        .admin
        .req(reqwest::Method::POST, "/api/v2/imports")
        .header("content-type", "text/csv")
        .body("Store_Code,Date,Sales,Customers\nT001,2024-02-05,55.5,5\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let import_job = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    assert_eq!(wait_job(&f.admin, import_job).await["state"], "completed");
    seen.push(current(&f.admin, id).await);

    let (st, h) = f.admin.get(&format!("/api/v2/sales/{id}/history")).await;
    assert_eq!(st, 200, "{h}");
    let versions = h["data"].as_array().unwrap();
    assert_eq!(
        versions
            .iter()
            .map(|v| v["version"].clone())
            .collect::<Vec<_>>(),
        json!([5, 4, 3, 2, 1]).as_array().unwrap().clone()
    );
    assert_eq!(h["meta"]["complete"], true, "{h}");
    assert!(h["meta"]["gone"].is_null());
    assert_eq!(h["meta"]["currentVersion"], 5);
    assert_eq!(h["meta"]["deleted"], false);
    let v = |n: i64| versions.iter().find(|e| e["version"] == n).unwrap().clone();
    let admin_actor = json!({"type": "user", "userId": f.admin_id, "email": "admin@example.com"});

    assert_eq!(v(1)["operation"], "insert");
    assert_eq!(v(1)["actor"], admin_actor);
    assert!(v(1)["jobId"].is_null());
    assert_eq!(
        norm(&v(1)["changes"]),
        norm(&json!([
            {"day": "1", "old": null, "new": day(100.0, 10)},
            {"day": "2", "old": null, "new": day(100.0, 10)},
            {"day": "3", "old": null, "new": day(100.0, 10)},
        ]))
    );
    assert_eq!(v(2)["operation"], "update");
    assert_eq!(
        norm(&v(2)["changes"]),
        norm(&json!([
            {"day": "2", "old": day(100.0, 10), "new": day(250.5, 12)},
            {"day": "4", "old": null, "new": day(40.0, 4)},
        ]))
    );
    assert_eq!(v(3)["actor"], json!({"type": "sql"}));
    assert_eq!(
        norm(&v(3)["changes"]),
        norm(&json!([{"day": "1", "old": day(100.0, 10), "new": null}]))
    );
    assert_eq!(v(4)["jobId"], batch_job);
    assert_eq!(v(4)["actor"], admin_actor);
    assert_eq!(
        norm(&v(4)["changes"]),
        norm(&json!([{"day": "3", "old": day(100.0, 10), "new": day(333.0, 33)}]))
    );
    assert_eq!(v(5)["jobId"], import_job);
    assert_eq!(v(5)["changes"][0]["day"], "5");
    assert!(v(5)["changes"][0]["old"].is_null());
    for e in versions {
        assert_eq!(e["storeId"], s);
        assert_eq!(
            (e["year"].clone(), e["month"].clone()),
            (json!(2024), json!(2))
        );
        assert_eq!(e["valuesKnown"], true);
    }

    // Paging, newest first.
    let (_, p1) = f
        .admin
        .get(&format!("/api/v2/sales/{id}/history?limit=2"))
        .await;
    assert_eq!(p1["data"].as_array().unwrap().len(), 2);
    assert_eq!(p1["meta"]["nextBeforeVersion"], 4);
    let (_, p2) = f
        .admin
        .get(&format!(
            "/api/v2/sales/{id}/history?limit=2&beforeVersion=4"
        ))
        .await;
    assert_eq!(
        p2["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["version"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![3, 2]
    );
    let (_, p3) = f
        .admin
        .get(&format!(
            "/api/v2/sales/{id}/history?limit=2&beforeVersion=2"
        ))
        .await;
    assert_eq!(p3["data"].as_array().unwrap().len(), 1);
    assert!(p3["meta"]["nextBeforeVersion"].is_null());
    for bad in ["limit=0", "limit=201", "beforeVersion=0", "beforeVersion=x"] {
        let (st, body) = f
            .admin
            .get(&format!("/api/v2/sales/{id}/history?{bad}"))
            .await;
        assert_eq!(st, 400, "{bad}: {body}");
    }

    // As of each version's time: the record exactly as a GET returned it then.
    for (i, snapshot) in seen.iter().enumerate() {
        let at = v(i as i64 + 1)["at"].as_str().unwrap().to_string();
        let q = url_time(&at);
        let (st, body) = f.admin.get(&format!("/api/v2/sales/{id}?asOf={q}")).await;
        assert_eq!(st, 200, "v{} at {at}: {body}", i + 1);
        let got = &body["data"];
        for k in [
            "version",
            "storeId",
            "year",
            "month",
            "daysReported",
            "totalCustomers",
            "createdAt",
        ] {
            assert_eq!(got[k], snapshot[k], "v{} {k}", i + 1);
        }
        assert_eq!(
            norm(&got["dailyData"]),
            norm(&snapshot["dailyData"]),
            "v{}",
            i + 1
        );
        assert_eq!(
            got["totalSales"].as_f64(),
            snapshot["totalSales"].as_f64(),
            "v{}",
            i + 1
        );
    }
    let (st, body) = f
        .admin
        .get(&format!(
            "/api/v2/sales/{id}?asOf=2001-01-01&fields=version,dailyData.2"
        ))
        .await;
    assert_eq!(st, 404, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did not exist yet"),
        "{body}"
    );
    let (st, body) = f
        .admin
        .get(&format!("/api/v2/sales/{id}?asOf=yesterday"))
        .await;
    assert_eq!(st, 400);
    assert_eq!(body["error"]["details"]["parameter"], "asOf");
    // A date's year is four digits, as an RFC 3339 time's: a signed or
    // longer one (out of Postgres' range) is named too (it reached
    // Postgres, whose "timestamp out of range" named nothing).
    for q in ["-5000-01-01", "%2B300000-01-01", "12345-01-01"] {
        let (st, body) = f.admin.get(&format!("/api/v2/sales/{id}?asOf={q}")).await;
        assert_eq!(st, 400, "{q}: {body}");
        assert_eq!(body["error"]["details"]["parameter"], "asOf", "{q}: {body}");
    }
    // A projection applies to the past version too.
    let at2 = url_time(v(2)["at"].as_str().unwrap());
    let (st, body) = f
        .admin
        .get(&format!(
            "/api/v2/sales/{id}?asOf={at2}&fields=version,dailyData.2.sales,store.code"
        ))
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        norm(&body["data"]),
        norm(
            &json!({"version": 2, "dailyData": {"2": {"sales": 250.5}}, "store": {"code": "T001"}})
        )
    );

    // A delete: the last version holds every day's last value.
    let (st, body) = f
        .admin
        .send_json(
            reqwest::Method::DELETE,
            "/api/v2/sales/batch",
            &json!({"ids": [id]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let (st, _) = f.admin.get(&format!("/api/v2/sales/{id}")).await;
    assert_eq!(st, 404);
    let (st, h) = f
        .admin
        .get(&format!("/api/v2/sales/{id}/history?limit=1"))
        .await;
    assert_eq!(st, 200, "{h}");
    assert_eq!(h["meta"]["deleted"], true);
    assert!(h["meta"]["currentVersion"].is_null());
    let del = &h["data"][0];
    assert_eq!(
        (del["version"].clone(), del["operation"].clone()),
        (json!(6), json!("delete"))
    );
    let last = &seen[4]["dailyData"];
    let expected: Vec<Value> = {
        let mut days: Vec<(&String, &Value)> = last.as_object().unwrap().iter().collect();
        days.sort_by_key(|(d, _)| d.parse::<u32>().unwrap());
        days.into_iter()
            .map(|(d, v)| json!({"day": d, "old": v, "new": null}))
            .collect()
    };
    assert_eq!(norm(&del["changes"]), norm(&Value::Array(expected)));
    let (st, body) = f
        .admin
        .get(&format!("/api/v2/sales/{id}?asOf=2100-01-01"))
        .await;
    assert_eq!(st, 404, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("deleted"),
        "{body}"
    );
    // Before the delete it still reads.
    let at5 = url_time(v(5)["at"].as_str().unwrap());
    let (st, body) = f.admin.get(&format!("/api/v2/sales/{id}?asOf={at5}")).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["version"], 5);

    // The same through SQL.
    let doc: Value = sqlx::query_scalar("SELECT sales.history($1, 10)")
        .bind(id)
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(doc["versions"].as_array().unwrap().len(), 6);
    assert_eq!(doc["complete"], true);
    let unknown: Option<Value> = sqlx::query_scalar("SELECT sales.history(987654)")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert!(unknown.is_none());
    let (st, _) = f.admin.get("/api/v2/sales/987654/history").await;
    assert_eq!(st, 404);
}

/// `2024-06-01T10:11:12.123456+00:00` as a query value.
fn url_time(at: &str) -> String {
    at.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test]
async fn scope_and_retention() {
    let f = Fixture::start(2, &[]).await;
    let (a, b) = (f.stores[0], f.stores[1]);
    let recs = json!({"salesDataArray": [
        {"storeId": a, "year": 2024, "month": 1, "dailyData": {"1": day(1.0, 1)}},
        {"storeId": b, "year": 2024, "month": 1, "dailyData": {"1": day(2.0, 2)}}]});
    let (st, body) = f.admin.post("/api/v2/sales/batch", &recs).await;
    assert_eq!(st, 200, "{body}");
    let id_of = |store: i64| {
        let pool = f.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT id FROM sales.monthly_sales WHERE store_id = $1")
                .bind(store)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let (ida, idb) = (id_of(a).await, id_of(b).await);
    let (_, token) = user_token(&f.db, &f.server, "m@example.com", "manager", &[a]).await;
    let manager = Api::new(&f.server, Some(&token));
    let (st, _) = manager.get(&format!("/api/v2/sales/{ida}/history")).await;
    assert_eq!(st, 200);
    for path in [
        format!("/api/v2/sales/{idb}/history"),
        format!("/api/v2/sales/{idb}?asOf=2100-01-01"),
    ] {
        let (st, body) = manager.get(&path).await;
        assert_eq!(st, 404, "{path}: {body}");
    }
    // A record that was moved from a store outside the scope into it is
    // hidden too: its past belongs to the other store.
    sqlx::query("UPDATE sales.monthly_sales SET store_id = $1, month = 2 WHERE id = $2")
        .bind(a)
        .bind(idb)
        .execute(&f.db.pool)
        .await
        .unwrap();
    let (st, _) = manager.get(&format!("/api/v2/sales/{idb}/history")).await;
    assert_eq!(st, 404);
    let (st, h) = f.admin.get(&format!("/api/v2/sales/{idb}/history")).await;
    assert_eq!(st, 200);
    assert_eq!(
        h["data"][0]["previous"],
        json!({"storeId": b, "year": 2024, "month": 1})
    );

    // A second version of `ida`, then pruning with a longer history
    // retention: the log forgets, the history does not.
    let (st, _) = f
        .admin
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [{"storeId": a, "year": 2024, "month": 1, "dailyData": {"2": day(5.0, 1)}}]}),
        )
        .await;
    assert_eq!(st, 200);
    let before_update: String = sqlx::query_scalar(
        "SELECT to_jsonb(created_at - interval '1 microsecond') #>> '{}' FROM sales.events WHERE row_id = $1 AND row_version = 2",
    )
    .bind(ida)
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    // The newest event is not about the record, so pruning to 0 removes all of its events.
    sqlx::query("SELECT sales.announce('after')")
        .execute(&f.db.pool)
        .await
        .unwrap();
    let pruned: i64 = sqlx::query_scalar("SELECT sales.prune_events('0 seconds', '1 day')")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert!(pruned > 0);
    let in_log: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sales.events WHERE row_id = $1 AND kind LIKE 'sales-data-%'",
    )
    .bind(ida)
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(in_log, 0, "the log no longer holds the record's events");
    let clear = || async {
        let (st, body) = f.admin.post("/api/admin/cache/clear", &json!({})).await;
        assert_eq!(st, 200, "{body}");
    };
    clear().await;
    let (st, h) = f.admin.get(&format!("/api/v2/sales/{ida}/history")).await;
    assert_eq!(st, 200, "{h}");
    assert_eq!(h["data"].as_array().unwrap().len(), 2);
    assert_eq!(h["meta"]["complete"], true);
    let q = url_time(&before_update);
    let (st, body) = f.admin.get(&format!("/api/v2/sales/{ida}?asOf={q}")).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["version"], 1);

    // History retention over: gone, and said so (not an empty list).
    sqlx::query("SELECT sales.prune_events('0 seconds', '0 seconds')")
        .execute(&f.db.pool)
        .await
        .unwrap();
    clear().await;
    let (st, body) = f.admin.get(&format!("/api/v2/sales/{ida}/history")).await;
    assert_eq!(st, 410, "{body}");
    assert_eq!(body["error"]["code"], "gone");
    assert_eq!(body["error"]["details"]["throughVersion"], 2);
    let (st, body) = f.admin.get(&format!("/api/v2/sales/{ida}?asOf={q}")).await;
    assert_eq!(st, 410, "{body}");
    // The current version still reads as of now.
    let (st, body) = f
        .admin
        .get(&format!("/api/v2/sales/{ida}?asOf=2100-01-01"))
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["version"], 2);
    // A later write starts a history that says what it lacks.
    let (st, _) = f
        .admin
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [{"storeId": a, "year": 2024, "month": 1, "dailyData": {"3": day(7.0, 1)}}]}),
        )
        .await;
    assert_eq!(st, 200);
    let (st, h) = f.admin.get(&format!("/api/v2/sales/{ida}/history")).await;
    assert_eq!(st, 200, "{h}");
    assert_eq!(h["data"].as_array().unwrap().len(), 1);
    assert_eq!(h["meta"]["complete"], false);
    assert_eq!(h["meta"]["gone"]["throughVersion"], 2);
    let (st, _) = f
        .admin
        .get(&format!("/api/v2/sales/{ida}/history?beforeVersion=3"))
        .await;
    assert_eq!(st, 410);
    // history_retention shorter than retention is refused.
    let e = sqlx::query("SELECT sales.prune_events('2 days', '1 day')")
        .execute(&f.db.pool)
        .await
        .unwrap_err();
    assert_eq!(sales_e2e::sqlstate(&e).as_deref(), Some("22023"));
}

/// A transaction that started first but wrote a record after another one
/// (it waited for the row) gets the later version with the earlier start
/// time: a version's time is then its predecessor's, so times never go
/// backwards, and `asOf` between the two starts gives the version before
/// both, not the one written last.
#[tokio::test]
async fn a_version_written_by_an_older_transaction_is_not_dated_before_its_predecessor() {
    let f = Fixture::start(1, &[]).await;
    let s = f.stores[0];
    let pool = &f.db.pool;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         VALUES ($1, 2024, 1, '{\"1\": {\"sales\": 1}}') RETURNING id",
    )
    .bind(s)
    .fetch_one(pool)
    .await
    .unwrap();
    let mut a = pool.begin().await.unwrap();
    let started_a: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT now() FROM pg_sleep(0.01)")
            .fetch_one(&mut *a)
            .await
            .unwrap();
    let mut b = pool.begin().await.unwrap();
    let started_b: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *b)
        .await
        .unwrap();
    assert!(started_b > started_a);
    let set_day = |day: &'static str| {
        sqlx::query(
            "UPDATE sales.monthly_sales SET daily_data = daily_data || jsonb_build_object($2::text, '{\"sales\": 5}'::jsonb) WHERE id = $1",
        )
        .bind(id)
        .bind(day)
    };
    set_day("2").execute(&mut *b).await.unwrap();
    b.commit().await.unwrap();
    set_day("3").execute(&mut *a).await.unwrap();
    a.commit().await.unwrap();

    let between = started_a + (started_b - started_a) / 2;
    let doc: Value = sqlx::query_scalar("SELECT sales.get_sales_as_of($1, $2)")
        .bind(id)
        .bind(between)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(doc["version"], 1, "{doc}");
    assert_eq!(doc["dailyData"].as_object().unwrap().len(), 1, "{doc}");
    let history: Value = sqlx::query_scalar("SELECT sales.history($1)")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
    let times: Vec<chrono::DateTime<chrono::Utc>> = history["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["at"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(times.len(), 3, "{history}");
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first, never going backwards: {history}"
    );
    // The row's own updatedAt is its newest version's time too (it was
    // the older transaction's start, before version 2's), so `asOf` the
    // record's updatedAt finds the record as it is.
    let updated: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT updated_at FROM sales.monthly_sales WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(updated, times[0], "{history}");
    let doc: Value = sqlx::query_scalar("SELECT sales.get_sales_as_of($1, $2)")
        .bind(id)
        .bind(updated)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(doc["version"], 3, "{doc}");
}

/// An id given again by hand after its record was deleted (a row restored
/// from a backup, an explicit-id insert) starts a record of its own: its
/// history is its versions from 1, complete, and the stores of the record
/// that had the id before are not its stores. (Both lives' events were
/// walked as one chain, which stopped at the old life's delete and
/// answered the new record's history as pruned.)
#[tokio::test]
async fn an_id_given_again_after_a_delete_has_a_history_of_its_own() {
    let db = sales_e2e::TestDb::new().await;
    let stores = db.stores(2).await;
    let (a, b) = (stores[0], stores[1]);
    let exec = |sql: String| {
        let pool = db.pool.clone();
        async move {
            sqlx::raw_sql(&sql).execute(&pool).await.unwrap();
        }
    };
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         VALUES ($1, 2024, 1, '{\"1\": {\"sales\": 1}}') RETURNING id",
    )
    .bind(a)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    exec(format!(
        "UPDATE sales.monthly_sales SET daily_data = '{{\"1\": {{\"sales\": 2}}}}' WHERE id = {id};
         DELETE FROM sales.monthly_sales WHERE id = {id};"
    ))
    .await;
    let history = |pool: sqlx::PgPool| async move {
        let h: Value = sqlx::query_scalar("SELECT sales.history($1)")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
        h
    };
    let old = history(db.pool.clone()).await;
    assert_eq!(old["versions"].as_array().unwrap().len(), 3, "{old}");
    assert_eq!(old["complete"], true, "{old}");
    let before_new: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // Given again, in another store and month, then changed twice.
    exec(format!(
        "INSERT INTO sales.monthly_sales (id, store_id, year, month, daily_data)
         VALUES ({id}, {b}, 2024, 5, '{{\"5\": {{\"sales\": 9}}}}')"
    ))
    .await;
    for v in [10, 11] {
        exec(format!(
            "UPDATE sales.monthly_sales SET daily_data = '{{\"5\": {{\"sales\": {v}}}}}' WHERE id = {id}"
        ))
        .await;
    }
    let h = history(db.pool.clone()).await;
    let versions: Vec<(i64, String)> = h["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_i64().unwrap(),
                v["operation"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        versions,
        [
            (3, "update".into()),
            (2, "update".into()),
            (1, "insert".into())
        ],
        "{h}"
    );
    assert_eq!(
        (h["complete"].clone(), h["gone"].clone()),
        (json!(true), Value::Null),
        "{h}"
    );
    assert_eq!(h["versions"][2]["storeId"], b, "{h}");
    let stores: Vec<i64> = sqlx::query_scalar("SELECT sales.record_stores($1)")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stores, [b], "the old record's store is not this one's");
    // As of now: the record as it is; before it was given again: it did
    // not exist yet (the old record is not its past).
    let now: Value = sqlx::query_scalar("SELECT sales.get_sales_as_of($1, clock_timestamp())")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        (now["version"].clone(), now["storeId"].clone()),
        (json!(3), json!(b)),
        "{now}"
    );
    let err = sqlx::query("SELECT sales.get_sales_as_of($1, $2)")
        .bind(id)
        .bind(before_new)
        .execute(&db.pool)
        .await
        .unwrap_err();
    let code = err
        .as_database_error()
        .and_then(|e| e.code())
        .unwrap_or_default();
    assert_eq!(code, "PS404", "{err}");
    // Deleted again: its history is the second record's, delete included.
    exec(format!("DELETE FROM sales.monthly_sales WHERE id = {id}")).await;
    let h = history(db.pool.clone()).await;
    assert_eq!(h["versions"].as_array().unwrap().len(), 4, "{h}");
    assert_eq!(
        (h["complete"].clone(), h["deleted"].clone()),
        (json!(true), json!(true)),
        "{h}"
    );
}

/// A history names each version's actor by their email as it is now: a
/// cached page follows the user's change of email and their deletion.
#[tokio::test]
async fn a_cached_history_follows_its_actors_changes() {
    // Entries live longer than the waits below: only invalidation can pass.
    let f = Fixture::start(1, &[("CACHE_TTL", "3600s")]).await;
    let s = f.stores[0];
    let (uid, token) = user_token(&f.db, &f.server, "writer@x.test", "manager", &[s]).await;
    let writer = Api::new(&f.server, Some(&token));
    let (st, body) = writer
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [{"storeId": s, "year": 2024, "month": 1, "dailyData": {"1": day(1.0, 1)}}]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let id: i64 = sqlx::query_scalar("SELECT id FROM sales.monthly_sales WHERE store_id = $1")
        .bind(s)
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    let path = format!("/api/v2/sales/{id}/history");
    let email = |b: &Value| b["data"][0]["actor"]["email"].clone();
    eventually(WAIT, "the history cached", || async {
        let r = f.admin.req(reqwest::Method::GET, &path).send().await.ok()?;
        let hit = r.headers().get("x-cache").is_some_and(|v| v == "hit");
        let b: Value = r.json().await.ok()?;
        (hit && email(&b) == "writer@x.test").then_some(())
    })
    .await;
    // An event-writing transaction left open holds delivery back: the
    // user's events wait behind it, so only the requests themselves can
    // have made the page stale (before, it stayed as it was until the
    // transaction ended and the relay delivered them).
    let mut holder = f.db.pool.begin().await.unwrap();
    sqlx::query("SELECT sales.emit('test-holder', '{}')")
        .execute(&mut *holder)
        .await
        .unwrap();
    let r = f
        .admin
        .req(reqwest::Method::PATCH, &format!("/api/v2/users/{uid}"))
        .json(&json!({"email": "renamed@x.test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (_, b) = f.admin.get(&path).await;
    assert_eq!(email(&b), "renamed@x.test", "{b}");
    let r = f
        .admin
        .req(reqwest::Method::DELETE, &format!("/api/v2/users/{uid}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let (_, b) = f.admin.get(&path).await;
    assert!(email(&b).is_null(), "{b}");
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.event_holders()")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(held, 1, "all of it while delivery was held back");
    holder.rollback().await.unwrap();
}

/// Pruning makes cached histories stale, whoever runs it (`sales-server
/// maintain` or a scheduled SQL call): a page cached as complete is not
/// served once its versions were pruned.
#[tokio::test]
async fn a_cached_history_follows_pruning() {
    // Entries live longer than the wait below: only invalidation can pass.
    let f = Fixture::start(1, &[("CACHE_TTL", "3600s")]).await;
    let s = f.stores[0];
    for d in 1..=2 {
        let (st, body) = f
            .admin
            .post(
                "/api/v2/sales/batch",
                &json!({"salesDataArray": [{"storeId": s, "year": 2024, "month": 1, "dailyData": {d.to_string(): day(1.0, 1)}}]}),
            )
            .await;
        assert_eq!(st, 200, "{body}");
    }
    let id: i64 = sqlx::query_scalar("SELECT id FROM sales.monthly_sales WHERE store_id = $1")
        .bind(s)
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    let path = format!("/api/v2/sales/{id}/history");
    eventually(WAIT, "the complete history cached", || async {
        let r = f.admin.req(reqwest::Method::GET, &path).send().await.ok()?;
        let hit = r.headers().get("x-cache").is_some_and(|v| v == "hit");
        let b: Value = r.json().await.ok()?;
        (hit && b["meta"]["complete"] == true).then_some(())
    })
    .await;
    // Pruned by a plain SQL call (as a scheduled job would), not through
    // the server's maintenance.
    let pruned: i64 = sqlx::query_scalar("SELECT sales.prune_events('0 s', '0 s')")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert!(pruned >= 2, "{pruned}");
    eventually(WAIT, "the pruned history", || async {
        let (st, b) = f.admin.get(&path).await;
        (st == 410 || b["meta"]["complete"] == false).then_some(())
    })
    .await;
}

/// A history shows an actor's email only to whoever may look that user up
/// (`/api/v2/users`): admins every one, a manager their staff's and their
/// own, anyone else their own; the others see the actor's id with a null
/// email. One cached page serves them all without passing emails on.
#[tokio::test]
async fn a_history_shows_emails_only_to_who_may_look_the_user_up() {
    let f = Fixture::start(1, &[("CACHE_TTL", "3600s")]).await;
    let s = f.stores[0];
    let (staff_id, staff_token) = user_token(&f.db, &f.server, "a@x.test", "staff", &[s]).await;
    let (_, other_token) = user_token(&f.db, &f.server, "b@x.test", "staff", &[s]).await;
    let (manager_id, manager_token) =
        user_token(&f.db, &f.server, "m@x.test", "manager", &[s]).await;
    let staff = Api::new(&f.server, Some(&staff_token));
    let other = Api::new(&f.server, Some(&other_token));
    let manager = Api::new(&f.server, Some(&manager_token));
    for (api, d) in [(&staff, 1), (&f.admin, 2), (&manager, 3)] {
        let (st, body) = api
            .post(
                "/api/v2/sales/batch",
                &json!({"salesDataArray": [{"storeId": s, "year": 2024, "month": 1, "dailyData": {d.to_string(): day(1.0, 1)}}]}),
            )
            .await;
        assert_eq!(st, 200, "{body}");
    }
    let id: i64 = sqlx::query_scalar("SELECT id FROM sales.monthly_sales WHERE store_id = $1")
        .bind(s)
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    let path = format!("/api/v2/sales/{id}/history");
    // (actor id, email) of versions 3, 2, 1 as each caller sees them.
    let seen = |b: &Value| -> Vec<(i64, Value)> {
        b["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["actor"]["userId"].as_i64().unwrap(),
                    v["actor"]["email"].clone(),
                )
            })
            .collect()
    };
    let admin_id = f.admin_id;
    for round in 0..2 {
        let (st, b) = f.admin.get(&path).await;
        assert_eq!(st, 200, "{b}");
        assert_eq!(
            seen(&b),
            vec![
                (manager_id, json!("m@x.test")),
                (admin_id, json!("admin@example.com")),
                (staff_id, json!("a@x.test")),
            ],
            "admin, round {round}"
        );
        let (_, b) = manager.get(&path).await;
        assert_eq!(
            seen(&b),
            vec![
                (manager_id, json!("m@x.test")),
                (admin_id, Value::Null),
                (staff_id, json!("a@x.test")),
            ],
            "manager, round {round}"
        );
        let (_, b) = staff.get(&path).await;
        assert_eq!(
            seen(&b),
            vec![
                (manager_id, Value::Null),
                (admin_id, Value::Null),
                (staff_id, json!("a@x.test")),
            ],
            "the writer, round {round}"
        );
        let (_, b) = other.get(&path).await;
        assert_eq!(
            seen(&b),
            vec![
                (manager_id, Value::Null),
                (admin_id, Value::Null),
                (staff_id, Value::Null)
            ],
            "another staff user, round {round}"
        );
    }
}

/// A history keeps every digit of a day's values, as a GET of the record
/// does: for an admin (the page as cached) and for a staff reader whose page
/// has other actors' emails taken out. It was read through f64:
/// `100000000000.123456789` came back as `100000000000.12346`.
#[tokio::test]
async fn a_history_keeps_every_digit() {
    let f = Fixture::start(1, &[]).await;
    let s = f.stores[0];
    let (_, staff_token) = user_token(&f.db, &f.server, "d@x.test", "staff", &[s]).await;
    let staff = Api::new(&f.server, Some(&staff_token));
    let written = "100000000000.123456789";
    let r = f
        .admin
        .req(reqwest::Method::POST, "/api/v2/sales/batch")
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"salesDataArray": [{{"storeId": {s}, "year": 2023, "month": 5,
                 "dailyData": {{"15": {{"sales": {written}, "customers": 123}}}}}}]}}"#
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id: i64 = sqlx::query_scalar("SELECT id FROM sales.monthly_sales WHERE store_id = $1")
        .bind(s)
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    for (who, api) in [("admin", &f.admin), ("staff", &staff)] {
        let r = api
            .req(reqwest::Method::GET, &format!("/api/v2/sales/{id}/history"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{who}");
        let text = r.text().await.unwrap();
        assert!(text.contains(written), "{who}: {text}");
        let doc: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(doc["data"].as_array().unwrap().len(), 1, "{who}: {doc}");
        // The staff reader does not see the admin's email.
        let email = &doc["data"][0]["actor"]["email"];
        assert_eq!(email.is_null(), who == "staff", "{who}: {doc}");
    }
}

/// A sales record's history and as-of reads, as text (every digit as
/// stored): the versions of `sales.history`, and `sales.get_sales_as_of`
/// now and at each version's time.
async fn history_texts(pool: &sqlx::PgPool, id: i64) -> (String, Vec<String>) {
    let versions: String = sqlx::query_scalar("SELECT (sales.history($1) -> 'versions')::text")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
    let times: Vec<String> = sqlx::query_scalar(
        "SELECT v ->> 'at' FROM jsonb_array_elements(sales.history($1) -> 'versions') v
         UNION ALL SELECT now()::text",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap();
    let mut as_of = Vec::new();
    for at in times {
        let doc: String =
            sqlx::query_scalar("SELECT sales.get_sales_as_of($1, $2::timestamptz)::text")
                .bind(id)
                .bind(&at)
                .fetch_one(pool)
                .await
                .unwrap_or_else(|e| panic!("as of {at}: {e}"));
        as_of.push(doc);
    }
    (versions, as_of)
}

/// After a `TRUNCATE` of `sales.monthly_sales` (which writes no delete
/// event), a record's history and its `asOf` answer exactly what they
/// answered before: every version with its whole daily data, to the digit.
/// The walk started from the row as it is now, which was gone: the newest
/// version showed every day changing to null, older ones only the days
/// they changed, and `asOf` a null `dailyData` with null totals. A record
/// whose events were all pruned still answers `asOf` with the truncated
/// row. A row removed without any trace (a DELETE with
/// `session_replication_role = replica`, which fires no trigger) cannot be
/// rebuilt: its versions say `valuesKnown: false` and `asOf` is PSGON,
/// never days rebuilt from the changed days alone.
#[tokio::test]
async fn a_truncated_record_keeps_its_history_and_as_of() {
    let db = sales_e2e::TestDb::new().await;
    let stores = db.stores(2).await;
    let pool = &db.pool;
    let mut ids = Vec::new();
    for (s, month) in [(stores[0], 1), (stores[0], 2), (stores[1], 3)] {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
             VALUES ($1, 2024, $2, '{\"1\": {\"sales\": 10.50, \"customers\": 3}, \"2\": {\"sales\": 20}}')
             RETURNING id",
        )
        .bind(s)
        .bind(month)
        .fetch_one(pool)
        .await
        .unwrap();
        for set in [
            "daily_data || '{\"2\": {\"sales\": 21.000, \"customers\": 2}}'",
            "daily_data || '{\"3\": {\"sales\": 100000000000.123456789}}'",
            "daily_data - '1'",
            "daily_data || '{\"1\": {\"sales\": 7}}'",
        ] {
            sqlx::query(&format!(
                "UPDATE sales.monthly_sales SET daily_data = {set} WHERE id = $1"
            ))
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
        }
        ids.push(id);
    }
    let (kept, old_pruned, replica) = (ids[0], ids[1], ids[2]);
    // The second record's events are gone (pruned): only the row is known.
    sqlx::query("DELETE FROM sales.events WHERE row_id = $1")
        .bind(old_pruned)
        .execute(pool)
        .await
        .unwrap();
    let before = history_texts(pool, kept).await;
    assert!(before.0.contains("100000000000.123456789"), "{}", before.0);
    assert_eq!(before.1.len(), 6, "five versions and now");
    let before_pruned: String = sqlx::query_scalar("SELECT sales.get_sales_as_of($1, now())::text")
        .bind(old_pruned)
        .fetch_one(pool)
        .await
        .unwrap();
    let gone_before: String = sqlx::query_scalar("SELECT (sales.history($1) -> 'gone')::text")
        .bind(old_pruned)
        .fetch_one(pool)
        .await
        .unwrap();
    let current: String =
        sqlx::query_scalar("SELECT m.daily_data::text FROM sales.monthly_sales m WHERE m.id = $1")
            .bind(kept)
            .fetch_one(pool)
            .await
            .unwrap();

    // A delete that fires no trigger: nothing records the row's last state.
    let mut conn = db.connect().await;
    sqlx::raw_sql(&format!(
        "SET session_replication_role = replica; DELETE FROM sales.monthly_sales WHERE id = {replica}"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    drop(conn);
    sqlx::query("TRUNCATE sales.monthly_sales")
        .execute(pool)
        .await
        .unwrap();

    let after = history_texts(pool, kept).await;
    assert_eq!(after.0, before.0, "the versions after the truncate");
    assert_eq!(after.1, before.1, "asOf each version's time, and now");
    let now: Value = serde_json::from_str(after.1.last().unwrap()).unwrap();
    assert_eq!(now["version"], 5, "{now}");
    let data: String =
        sqlx::query_scalar("SELECT (sales.get_sales_as_of($1, now()) -> 'dailyData')::text")
            .bind(kept)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(data, current, "the truncated row's last daily data");
    let meta: Value = sqlx::query_scalar("SELECT sales.history($1) - 'versions'")
        .bind(kept)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(meta["deleted"], true, "{meta}");
    assert_eq!(meta["complete"], true, "{meta}");

    // Only the row was known: it still is.
    let after_pruned: String = sqlx::query_scalar("SELECT sales.get_sales_as_of($1, now())::text")
        .bind(old_pruned)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(after_pruned, before_pruned);
    let gone_after: String = sqlx::query_scalar("SELECT (sales.history($1) -> 'gone')::text")
        .bind(old_pruned)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(gone_after, gone_before);

    // Removed without a trace: said, not guessed.
    let h: Value = sqlx::query_scalar("SELECT sales.history($1)")
        .bind(replica)
        .fetch_one(pool)
        .await
        .unwrap();
    let versions = h["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 5, "{h}");
    for v in versions {
        assert_eq!(v["valuesKnown"], false, "{h}");
        assert!(v["changes"].is_null(), "{h}");
    }
    let e = sqlx::query_scalar::<_, Value>("SELECT sales.get_sales_as_of($1, now())")
        .bind(replica)
        .fetch_one(pool)
        .await
        .expect_err("the daily data of a row removed without a trace");
    let d = e.as_database_error().expect("a database error");
    assert_eq!(d.code().as_deref(), Some("PSGON"), "{e}");
    assert!(d.message().contains("is not known"), "{e}");
}

/// An id given again by hand after a TRUNCATE is a record of its own: its
/// history starts from its own events, not from the state the TRUNCATE kept
/// of the earlier record of that id (told apart by event id: the new record
/// starts again at version 1, below the kept state's version).
#[tokio::test]
async fn an_id_given_again_after_a_truncate_is_not_the_truncated_record() {
    let db = sales_e2e::TestDb::new().await;
    let s = db.stores(1).await[0];
    let exec = |sql: String| {
        let pool = db.pool.clone();
        async move {
            sqlx::raw_sql(&sql).execute(&pool).await.unwrap();
        }
    };
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         VALUES ($1, 2024, 1, '{\"1\": {\"sales\": 1}}') RETURNING id",
    )
    .bind(s)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    for d in 2..=3 {
        exec(format!(
            "UPDATE sales.monthly_sales SET daily_data = daily_data || '{{\"{d}\": {{\"sales\": {d}}}}}' WHERE id = {id}"
        ))
        .await;
    }
    exec("TRUNCATE sales.monthly_sales".into()).await;
    let kept: Option<i64> = sqlx::query_scalar("SELECT (sales.record_row($1)).version")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(kept, Some(3), "the truncated record's last state");
    // The id given again, by hand, then deleted: versions 1 and 2.
    exec(format!(
        "INSERT INTO sales.monthly_sales (id, store_id, year, month, daily_data)
         VALUES ({id}, {s}, 2024, 2, '{{\"9\": {{\"sales\": 9}}}}');
         DELETE FROM sales.monthly_sales WHERE id = {id};"
    ))
    .await;
    let now: Option<i64> = sqlx::query_scalar("SELECT (sales.record_row($1)).version")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(now, None, "the new record was deleted: no row, kept or not");
}
