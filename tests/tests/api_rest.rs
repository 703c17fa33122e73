//! REST API v2 end to end: a real server on a free port, its own database,
//! real Redis. Every request asserts the server never answers 5xx.

use reqwest::Method;
use sales_e2e::{month, user_token, Api, Fixture, TEST_JWT_SECRET};
use serde_json::{json, Value};

async fn fixture(overrides: &[(&str, &str)]) -> Fixture {
    Fixture::start(4, overrides).await
}

async fn seed_months(f: &Fixture) {
    let mut recs = Vec::new();
    for &s in &f.stores {
        for m in 1..=6 {
            recs.push(month(s, 2024, m, 28, 100.0 * s as f64 + m as f64));
        }
    }
    let (st, body) = f
        .admin
        .post("/api/v2/sales/batch", &json!({"salesDataArray": recs}))
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["inserted"], 24);
}

#[tokio::test]
async fn login_and_tokens() {
    let f = fixture(&[]).await;
    sales_server::users::upsert_user(
        &f.db.pool,
        "m@example.com",
        "manager",
        &[f.stores[0]],
        "manager-password",
    )
    .await
    .unwrap();
    let anon = Api::new(&f.server, None);

    let (st, body) = anon
        .post(
            "/api/v2/auth/login",
            &json!({"email": "M@example.com", "password": "manager-password"}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["tokenType"], "Bearer");
    assert_eq!(body["user"]["role"], "manager");
    assert_eq!(body["user"]["stores"], json!([f.stores[0]]));
    let token = body["token"].as_str().unwrap().to_string();
    let (st, _) = Api::new(&f.server, Some(&token))
        .get(&format!("/api/v2/sales?storeId={}", f.stores[0]))
        .await;
    assert_eq!(st, 200);

    let (st, body) = anon
        .post(
            "/api/v2/auth/login",
            &json!({"email": "m@example.com", "password": "wrong-password"}),
        )
        .await;
    assert_eq!(st, 401);
    assert_eq!(body["error"]["code"], "unauthorized");
    let (st, _) = anon
        .post(
            "/api/v2/auth/login",
            &json!({"email": "nobody@example.com", "password": "whatever-it-is"}),
        )
        .await;
    assert_eq!(st, 401);
    let (st, body) = anon
        .post("/api/v2/auth/login", &json!({"email": "m@example.com"}))
        .await;
    assert_eq!(st, 400, "{body}");

    // Missing token.
    let (st, body) = anon.get("/api/v2/sales").await;
    assert_eq!(st, 401);
    assert!(body["error"]["requestId"].is_string());

    // Expired, wrongly signed, alg none, garbage.
    let now = chrono::Utc::now().timestamp();
    let claims =
        |exp: i64| json!({"sub": "1", "role": "admin", "stores": [], "exp": exp, "iat": now - 100});
    let sign = |c: &Value, secret: &str| sales_e2e::fixtures::token::sign_claims(c, secret);
    let expired = sign(&claims(now - 3600), TEST_JWT_SECRET);
    let (st, body) = Api::new(&f.server, Some(&expired))
        .get("/api/v2/sales")
        .await;
    assert_eq!(st, 401);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body}"
    );
    let wrong = sign(
        &claims(now + 3600),
        "some-other-secret-some-other-secret-0000",
    );
    assert_eq!(
        Api::new(&f.server, Some(&wrong))
            .get("/api/v2/sales")
            .await
            .0,
        401
    );
    use base64::Engine;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims(now + 3600))
    );
    assert_eq!(
        Api::new(&f.server, Some(&none))
            .get("/api/v2/sales")
            .await
            .0,
        401
    );
    assert_eq!(
        Api::new(&f.server, Some("not.a.token"))
            .get("/api/v2/sales")
            .await
            .0,
        401
    );
    let valid = sign(&claims(now + 3600), TEST_JWT_SECRET);
    assert_eq!(
        Api::new(&f.server, Some(&valid))
            .get("/api/v2/sales")
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn scope_is_enforced() {
    let f = fixture(&[]).await;
    seed_months(&f).await;
    let (_, staff_token) =
        user_token(&f.db, &f.server, "s@example.com", "staff", &[f.stores[0]]).await;
    let staff = Api::new(&f.server, Some(&staff_token));

    // No filter: only the staff member's store.
    let (st, body) = staff.get("/api/v2/sales?limit=200&fields=storeId").await;
    assert_eq!(st, 200);
    let ids: Vec<i64> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["storeId"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 6);
    assert!(ids.iter().all(|&s| s == f.stores[0]));

    // Another store: 403, not an empty list.
    let other = f.stores[1];
    let (st, body) = staff.get(&format!("/api/v2/sales?storeId={other}")).await;
    assert_eq!(st, 403, "{body}");
    assert_eq!(body["error"]["details"]["storeIds"], json!([other]));
    let (st, _) = staff
        .get(&format!("/api/v2/sales?storeId={},{other}", f.stores[0]))
        .await;
    assert_eq!(st, 403);
    let (_, list) = f
        .admin
        .get(&format!("/api/v2/sales?storeId={other}&fields=id"))
        .await;
    let foreign_id = list["data"][0]["id"].as_i64().unwrap();
    // A record of another store is missing, as far as staff can tell (issue 13).
    assert_eq!(
        staff.get(&format!("/api/v2/sales/{foreign_id}")).await.0,
        404
    );
    assert_eq!(staff.get(&format!("/api/v2/stores/{other}")).await.0, 403);
    let (st, _) = staff
        .get(&format!("/api/v2/sales/summary?storeId={other}"))
        .await;
    assert_eq!(st, 403);

    // Writes outside scope: 403 and nothing written.
    let (st, _) = staff
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [month(other, 2025, 1, 3, 1.0)]}),
        )
        .await;
    assert_eq!(st, 403);
    let (st, _) = staff
        .send_json(
            Method::DELETE,
            "/api/v2/sales/batch",
            &json!({"ids": [foreign_id]}),
        )
        .await;
    // By id, a record of another store is "no such sales record" (issue 13).
    assert_eq!(st, 422);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.monthly_sales WHERE store_id = $1")
        .bind(other)
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(n, 6);

    // Staff may write their own store; staff may not create stores or change status.
    let (st, body) = staff
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [month(f.stores[0], 2025, 1, 3, 1.0)]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        staff
            .post(
                "/api/v2/stores",
                &json!({"code": "Z1", "name": "Z", "region": "North"})
            )
            .await
            .0,
        403
    );
    let (st, _) = staff
        .send_json(
            Method::PATCH,
            &format!("/api/v2/stores/{}", f.stores[0]),
            &json!({"status": "closed"}),
        )
        .await;
    assert_eq!(st, 403);

    // Stores list is scoped.
    let (_, body) = staff.get("/api/v2/stores").await;
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn list_projection_pagination_and_sorting() {
    let f = fixture(&[]).await;
    seed_months(&f).await;
    let a = &f.admin;

    let (st, body) = a
        .get("/api/v2/sales?fields=storeId,year,month,dailyData.1.sales&limit=3")
        .await;
    assert_eq!(st, 200);
    let first = &body["data"][0];
    assert_eq!(first.as_object().unwrap().len(), 4, "{first}");
    assert_eq!(first["dailyData"].as_object().unwrap().len(), 1);
    assert!(first["dailyData"]["1"]["customers"].is_null());
    assert_eq!(
        body["meta"]["fields"],
        json!(["storeId", "year", "month", "dailyData.1.sales"])
    );
    assert_eq!(body["meta"]["count"], 3);

    // snake_case, exclude, nested store.
    let (_, body) = a
        .get("/api/v2/sales?fields=store_id,total_sales,store.name&exclude=total_sales&limit=1")
        .await;
    let r = &body["data"][0];
    assert!(
        r["totalSales"].is_null() && r["storeId"].is_number() && r["store"]["name"].is_string(),
        "{r}"
    );

    // Unknown field, SQL in fields: 400 naming the field.
    let (st, body) = a.get("/api/v2/sales?fields=storeId,colour").await;
    assert_eq!(st, 400);
    assert_eq!(body["error"]["details"]["field"], "colour");
    let (st, body) = a
        .get("/api/v2/sales?fields=id%3B%20DROP%20TABLE%20sales.stores%3B--")
        .await;
    assert_eq!(st, 400);
    assert_eq!(body["error"]["details"]["parameter"], "fields");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.stores")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(n, 4);
    assert_eq!(a.get("/api/v2/sales?exclude=nope").await.0, 400);

    // Limits.
    for bad in ["0", "-1", "abc"] {
        let (st, body) = a.get(&format!("/api/v2/sales?limit={bad}")).await;
        assert_eq!(st, 400, "limit={bad}");
        assert_eq!(body["error"]["details"]["parameter"], "limit");
    }
    let (st, body) = a.get("/api/v2/sales?limit=10000&fields=id").await;
    assert_eq!(st, 200);
    assert_eq!(body["meta"]["limit"], 200);
    assert_eq!(body["meta"]["limitClamped"], true);
    assert_eq!(body["meta"]["count"], 24);

    // Bad filters.
    assert_eq!(a.get("/api/v2/sales?month=13").await.0, 400);
    assert_eq!(a.get("/api/v2/sales?from=2024-13").await.0, 400);
    assert_eq!(a.get("/api/v2/sales?from=2024-05&to=2024-01").await.0, 400);
    assert_eq!(a.get("/api/v2/sales?storeId=1,x").await.0, 400);
    assert_eq!(a.get("/api/v2/sales?sort=name").await.0, 400);
    // A sort key is its camelCase or snake_case spelling, exactly, as
    // `fields` names are: `_store_id` and `store__id` are no names.
    for bent in [
        "_store_id",
        "store__id",
        "store_Id",
        "year_",
        "-total__sales",
    ] {
        let (st, body) = a.get(&format!("/api/v2/sales?sort={bent}")).await;
        assert_eq!(st, 400, "{bent}: {body}");
        assert_eq!(body["error"]["details"]["parameter"], "sort", "{body}");
    }
    assert_eq!(
        a.get("/api/v2/sales?sort=store_id,-total_sales").await.0,
        200
    );
    assert_eq!(a.get("/api/v2/sales?cursor=garbage").await.0, 400);

    // Keyset pages cover every row exactly once, in the requested order.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => {
                format!("/api/v2/sales?sort=-totalSales&fields=id,totalSales&limit=5&cursor={c}")
            }
            None => "/api/v2/sales?sort=-totalSales&fields=id,totalSales&limit=5".to_string(),
        };
        let (st, body) = a.get(&path).await;
        assert_eq!(st, 200, "{body}");
        for r in body["data"].as_array().unwrap() {
            seen.push((r["totalSales"].as_f64().unwrap(), r["id"].as_i64().unwrap()));
        }
        match body["meta"]["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 24);
    let mut ids: Vec<i64> = seen.iter().map(|s| s.1).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 24, "no row twice");
    assert!(
        seen.windows(2).all(|w| w[0].0 >= w[1].0),
        "descending totals"
    );
    // A cursor is tied to its sort.
    let (_, body) = a.get("/api/v2/sales?sort=-totalSales&limit=5").await;
    let c = body["meta"]["nextCursor"].as_str().unwrap();
    assert_eq!(
        a.get(&format!("/api/v2/sales?sort=year&cursor={c}"))
            .await
            .0,
        400
    );
    // And to its filters: reused under others it is refused, not resumed
    // as another listing's position; the same filters written otherwise
    // (ids reordered or repeated) are the same filters.
    let s0 = f.stores[0];
    let s1 = f.stores[1];
    let (_, body) = a
        .get(&format!(
            "/api/v2/sales?storeId={s0},{s1}&sort=-totalSales&limit=2"
        ))
        .await;
    let c = body["meta"]["nextCursor"].as_str().unwrap().to_string();
    for other in [
        format!("storeId={s0}"),
        format!("storeId={s0},{s1}&year=2024"),
        format!("storeId={s0},{s1}&minTotalSales=1"),
        String::new(),
    ] {
        let (st, body) = a
            .get(&format!(
                "/api/v2/sales?{other}&sort=-totalSales&limit=2&cursor={c}"
            ))
            .await;
        assert_eq!(st, 400, "{other}: {body}");
        assert_eq!(body["error"]["details"]["parameter"], "cursor", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("other filters"),
            "{body}"
        );
    }
    let (st, body) = a
        .get(&format!(
            "/api/v2/sales?storeId={s1},{s0},{s1}&sort=-totalSales&limit=2&cursor={c}"
        ))
        .await;
    assert_eq!(st, 200, "{body}");

    // Filters, ranges, offset, includeMetadata=false.
    let s = f.stores[2];
    let (_, body) = a
        .get(&format!(
            "/api/v2/sales?storeId={s}&from=2024-02&to=2024-04&fields=month"
        ))
        .await;
    let months: Vec<i64> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["month"].as_i64().unwrap())
        .collect();
    assert_eq!(months, vec![2, 3, 4]);
    let (_, body) = a
        .get(&format!("/api/v2/sales?storeId={s}&offset=4&fields=month"))
        .await;
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let (_, body) = a
        .get("/api/v2/sales?region=South&fields=storeId&includeMetadata=false")
        .await;
    assert!(body.get("meta").is_none());
    assert!(body["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["storeId"] == f.stores[1]));

    // One record.
    let id = seen[0].1;
    let (st, body) = a
        .get(&format!("/api/v2/sales/{id}?fields=id,dailyData.2"))
        .await;
    assert_eq!(st, 200);
    assert_eq!(body["data"]["id"], id);
    assert_eq!(body["data"]["dailyData"].as_object().unwrap().len(), 1);
    assert_eq!(a.get("/api/v2/sales/999999").await.0, 404);
    assert_eq!(a.get("/api/v2/sales/abc").await.0, 400);
}

#[tokio::test]
async fn batch_writes_and_summaries() {
    let f = fixture(&[("BATCH_MAX_RECORDS", "50"), ("BODY_LIMIT", "20000")]).await;
    let a = &f.admin;
    let s = f.stores[0];

    let (st, body) = a
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [month(s, 2024, 1, 31, 10.0), month(s, 2024, 2, 29, 5.0)]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        (body["inserted"].as_i64(), body["updated"].as_i64()),
        (Some(2), Some(0))
    );
    assert!(body["eventId"].is_number());

    // Merge by day (default) then replace.
    let (_, body) = a.post("/api/v2/sales/batch", &json!({"salesDataArray": [{"storeId": s.to_string(), "year": 2024, "month": 1, "dailyData": {"1": {"sales": 99}}}]})).await;
    assert_eq!(body["updated"], 1);
    let days: i32 = sqlx::query_scalar(
        "SELECT days_reported FROM sales.monthly_sales WHERE store_id = $1 AND month = 1",
    )
    .bind(s)
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(days, 31);
    let (_, body) = a.post("/api/v2/sales/batch", &json!({"mode": "replace", "salesDataArray": [{"storeId": s, "year": 2024, "month": 1, "dailyData": {"1": {"sales": 99}}}]})).await;
    assert_eq!(body["updated"], 1);
    let days: i32 = sqlx::query_scalar(
        "SELECT days_reported FROM sales.monthly_sales WHERE store_id = $1 AND month = 1",
    )
    .bind(s)
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(days, 1);
    // Same again: unchanged.
    let (_, body) = a.post("/api/v2/sales/batch", &json!({"mode": "replace", "salesDataArray": [{"storeId": s, "year": 2024, "month": 1, "dailyData": {"1": {"sales": 99}}}]})).await;
    assert_eq!(body["unchanged"], 1);

    // Invalid records: 422 with a per-record report, nothing written.
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.events")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    let (st, body) = a
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [
                month(s, 2024, 3, 3, 1.0),
                {"storeId": s, "year": 2024, "month": 13, "dailyData": {}},
                {"storeId": s, "year": 2024, "month": 4, "dailyData": {"31": {"sales": 1}}},
                {"storeId": s, "year": 2024, "month": 5, "dailyData": {"1": {"sales": -5}}},
                {"storeId": 999999, "year": 2024, "month": 5, "dailyData": {}},
            ]}),
        )
        .await;
    assert_eq!(st, 422, "{body}");
    let errors = body["error"]["details"]["errors"].as_array().unwrap();
    let fields: Vec<(i64, &str)> = errors
        .iter()
        .map(|e| (e["index"].as_i64().unwrap(), e["field"].as_str().unwrap()))
        .collect();
    assert!(fields.contains(&(1, "month")), "{fields:?}");
    assert!(fields.contains(&(2, "dailyData.31")));
    assert!(fields.contains(&(3, "dailyData.1.sales")));
    assert!(fields.contains(&(4, "storeId")));
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.events")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(before, after, "a rejected batch writes nothing");
    assert_eq!(
        a.get(&format!("/api/v2/sales?storeId={s}&month=3")).await.1["meta"]["count"],
        0
    );

    // Best effort writes the valid ones.
    let (st, body) = a.post("/api/v2/sales/batch", &json!({"atomic": false, "salesDataArray": [month(s, 2024, 3, 3, 1.0), {"storeId": s, "year": 2024, "month": 13, "dailyData": {}}]})).await;
    assert_eq!(st, 200);
    assert_eq!(
        (body["inserted"].as_i64(), body["failed"].as_i64()),
        (Some(1), Some(1))
    );

    // A record is written as sent, and an escaped key is the key it spells;
    // a key given twice is refused (`a_key_given_twice_is_refused_by_name`).
    let r = a
        .req(Method::POST, "/api/v2/sales/batch")
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"mode": "replace", "salesDataArray": [{{"store\u0049d": {s}, "year": 2024, "month": 7,
                 "dailyData": {{"2": {{"sales": 6}}}}}}]}}"#
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let daily: Value = sqlx::query_scalar(
        "SELECT daily_data FROM sales.monthly_sales WHERE store_id = $1 AND year = 2024 AND month = 7",
    )
    .bind(s)
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(daily, json!({"2": {"sales": 6}}));
    let r = a
        .req(Method::POST, "/api/v2/sales/batch")
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"mode": "replace", "salesDataArray": [{{"store\u0049d": {s}, "year": 2024, "month": 7,
                 "dailyData": {{"1": {{"sales": 1}}}}, "dailyData": {{"2": {{"sales": 5}}}}}}]}}"#
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["error"]["details"]["errors"][0]["field"], "dailyData",
        "{body}"
    );

    // Malformed JSON, wrong types, bad mode, empty, oversized.
    let r = a
        .req(Method::POST, "/api/v2/sales/batch")
        .header("content-type", "application/json")
        .body("{\"salesDataArray\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_parameter");
    assert_eq!(
        a.post("/api/v2/sales/batch", &json!({"salesDataArray": "nope"}))
            .await
            .0,
        400
    );
    assert_eq!(
        a.post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [], "mode": "merge"})
        )
        .await
        .0,
        400
    );
    let (st, body) = a
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [month(s, 2024, 6, 1, 1.0)], "mode": "upsert"}),
        )
        .await;
    assert_eq!(st, 400, "{body}");
    assert!(body.to_string().contains("mode"), "{body}");
    // `null` is the default mode, as an absent member.
    let (st, body) = a
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [month(s, 2024, 6, 1, 1.0)], "mode": null}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let many: Vec<Value> = (0..51)
        .map(|i| month(s, 2030, 1 + (i % 12), 1, 1.0))
        .collect();
    let (st, body) = a
        .post("/api/v2/sales/batch", &json!({"salesDataArray": many}))
        .await;
    assert_eq!(st, 413, "{body}");
    let big: Vec<Value> = (0..40)
        .map(|i| month(s, 2031, 1 + (i % 12), 31, 1.0))
        .collect();
    let (st, _) = a
        .post("/api/v2/sales/batch", &json!({"salesDataArray": big}))
        .await;
    assert_eq!(st, 413, "body over BODY_LIMIT");

    // Summaries.
    let (st, body) = a
        .get("/api/v2/sales/summary?groupBy=month&from=2024-01&to=2024-03")
        .await;
    assert_eq!(st, 200, "{body}");
    let keys: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, vec!["2024-01", "2024-02", "2024-03"]);
    assert_eq!(body["data"][1]["totalSales"].as_f64(), Some(145.0));
    let (_, body) = a.get("/api/v2/sales/summary?groupBy=store").await;
    assert_eq!(body["data"][0]["key"], s.to_string());
    assert!(body["data"][0]["storeCode"].is_string());
    assert_eq!(
        a.get("/api/v2/sales/summary?groupBy=fortnight").await.0,
        400
    );

    // Delete by id and by key; unknown ones reported, atomic.
    let id: i64 =
        sqlx::query_scalar("SELECT id FROM sales.monthly_sales WHERE store_id = $1 AND month = 2")
            .bind(s)
            .fetch_one(&f.db.pool)
            .await
            .unwrap();
    let (st, body) = a
        .send_json(
            Method::DELETE,
            "/api/v2/sales/batch",
            &json!({"ids": [id, 987654]}),
        )
        .await;
    assert_eq!(st, 422, "{body}");
    let (st, body) = a
        .send_json(
            Method::DELETE,
            "/api/v2/sales/batch",
            &json!({"ids": [id], "keys": [{"storeId": s, "year": 2024, "month": 3}]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["deleted"], 2);
    assert_eq!(
        a.send_json(Method::DELETE, "/api/v2/sales/batch", &json!({}))
            .await
            .0,
        400
    );
}

#[tokio::test]
async fn stores_endpoints() {
    let f = fixture(&[]).await;
    let a = &f.admin;
    let (st, body) = a
        .post(
            "/api/v2/stores",
            &json!({"code": "NEW-1", "name": "New Store", "region": "West"}),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    let id = body["data"]["id"].as_i64().unwrap();
    assert_eq!(body["data"]["status"], "open");
    assert_eq!(
        a.post(
            "/api/v2/stores",
            &json!({"code": "NEW-1", "name": "Again", "region": "West"})
        )
        .await
        .0,
        409
    );
    assert_eq!(
        a.post(
            "/api/v2/stores",
            &json!({"code": "bad code!", "name": "x", "region": "West"})
        )
        .await
        .0,
        400
    );
    assert_eq!(
        a.post(
            "/api/v2/stores",
            &json!({"code": "X2", "name": "x", "region": "West", "status": "gone"})
        )
        .await
        .0,
        400
    );

    let (_, body) = a.get("/api/v2/stores?region=West&fields=code").await;
    assert_eq!(body["data"], json!([{"code": "NEW-1"}]));
    // `meta` says what the page was read with, `exclude` too (it was left
    // out, and the OpenAPI document described `meta` as any value).
    let (_, body) = a
        .get("/api/v2/stores?region=West&exclude=created_at&limit=5")
        .await;
    assert_eq!(
        body["meta"],
        json!({"limit": 5, "offset": 0, "fields": [], "exclude": ["createdAt"]})
    );
    assert_eq!(a.get("/api/v2/stores?fields=colour").await.0, 400);
    assert_eq!(a.get("/api/v2/stores/424242").await.0, 404);

    let (_, mtoken) = user_token(&f.db, &f.server, "mgr@example.com", "manager", &[id]).await;
    let manager = Api::new(&f.server, Some(&mtoken));
    let (st, body) = manager
        .send_json(
            Method::PATCH,
            &format!("/api/v2/stores/{id}"),
            &json!({"status": "renovating"}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["data"]["status"], "renovating");
    assert_eq!(body["data"]["version"], 2);
    let kind: String = sqlx::query_scalar(
        "SELECT kind FROM sales.events WHERE store_id = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(id)
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(kind, "store-status-changed");
    assert_eq!(
        manager
            .send_json(
                Method::PATCH,
                &format!("/api/v2/stores/{id}"),
                &json!({"name": "Renamed"})
            )
            .await
            .0,
        403
    );
    assert_eq!(
        manager
            .send_json(
                Method::PATCH,
                &format!("/api/v2/stores/{}", f.stores[0]),
                &json!({"status": "closed"})
            )
            .await
            .0,
        403
    );
    assert_eq!(
        a.send_json(
            Method::PATCH,
            "/api/v2/stores/424242",
            &json!({"status": "closed"})
        )
        .await
        .0,
        404
    );
    assert_eq!(
        a.send_json(Method::PATCH, &format!("/api/v2/stores/{id}"), &json!({}))
            .await
            .0,
        400
    );
}

#[tokio::test]
async fn representation_etag_compression_headers() {
    let f = fixture(&[]).await;
    seed_months(&f).await;
    let a = &f.admin;
    let path = "/api/v2/sales?limit=24&sort=id&includeMetadata=false";

    let r = a.req(Method::GET, path).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    let etag = h["etag"].to_str().unwrap().to_string();
    assert!(etag.starts_with('"'));
    assert_eq!(h["vary"], "Authorization, Accept-Encoding");
    assert_eq!(h["cache-control"], "private, no-cache");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert!(h.contains_key("content-security-policy") && h.contains_key("referrer-policy"));
    assert!(h.contains_key("x-request-id"));
    let plain = r.bytes().await.unwrap();

    let r = a
        .req(Method::GET, path)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert!(r.bytes().await.unwrap().is_empty());

    // Each encoding decodes to the same bytes.
    for enc in ["zstd", "br", "gzip"] {
        let r = a
            .req(Method::GET, path)
            .header("accept-encoding", enc)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-encoding"], enc);
        let tag = r.headers()["etag"].to_str().unwrap().to_string();
        assert_ne!(tag, etag, "each encoding has its own strong ETag");
        let body = r.bytes().await.unwrap();
        assert!(body.len() < plain.len());
        let decoded = match enc {
            "zstd" => zstd::decode_all(&body[..]).unwrap(),
            "gzip" => {
                let mut out = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut out)
                    .unwrap();
                out
            }
            _ => {
                let mut out = Vec::new();
                std::io::Read::read_to_end(
                    &mut brotli::Decompressor::new(&body[..], 4096),
                    &mut out,
                )
                .unwrap();
                out
            }
        };
        assert_eq!(decoded, plain.to_vec(), "{enc}");
        let r = a
            .req(Method::GET, path)
            .header("accept-encoding", enc)
            .header("if-none-match", &tag)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 304);
    }
    // A HEAD answers as its GET: the same ETag, encoding and length, and
    // 304 to the GET's tag (it carried the digest of an empty body).
    for enc in ["identity", "gzip"] {
        let get = a
            .req(Method::GET, path)
            .header("accept-encoding", enc)
            .send()
            .await
            .unwrap();
        let (gh, body) = (get.headers().clone(), get.bytes().await.unwrap());
        let head = a
            .req(Method::HEAD, path)
            .header("accept-encoding", enc)
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), 200);
        let hh = head.headers().clone();
        assert_eq!(hh["etag"], gh["etag"], "{enc}");
        assert_eq!(
            hh.get("content-encoding"),
            gh.get("content-encoding"),
            "{enc}"
        );
        assert_eq!(
            hh["content-length"],
            body.len().to_string().as_str(),
            "{enc}"
        );
        assert!(head.bytes().await.unwrap().is_empty());
        let head = a
            .req(Method::HEAD, path)
            .header("accept-encoding", enc)
            .header("if-none-match", gh["etag"].to_str().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), 304, "{enc}");
    }
    // Several Accept-Encoding lines make one list: a coding refused on one
    // is not used because another allows `*`.
    let r = a
        .req(Method::GET, path)
        .header("accept-encoding", "*")
        .header("accept-encoding", "zstd;q=0")
        .send()
        .await
        .unwrap();
    assert_ne!(r.headers()["content-encoding"], "zstd");
    // A refusal made before the representation layer (an undeclared
    // parameter) is marked like every other error.
    let r = a
        .req(Method::GET, "/api/v2/sales?bogus=1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["vary"], "Authorization, Accept-Encoding");

    // Small bodies are not compressed.
    let r = a
        .req(Method::GET, "/api/v2/sales?limit=1&fields=id")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("content-encoding").is_none());

    // A request id is taken from the request.
    let r = a
        .req(Method::GET, "/api/v2/sales?limit=1")
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    // Writes and errors are not cached.
    let r = a
        .req(Method::GET, "/api/v2/sales?limit=0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["cache-control"], "no-store");
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["requestId"].is_string());
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let f = fixture(&[("RATE_LIMIT_PER_MINUTE", "5")]).await;
    let mut statuses = Vec::new();
    let mut retry = None;
    for _ in 0..7 {
        let r = f
            .admin
            .req(Method::GET, "/api/v2/stores")
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "rate_limited");
        }
    }
    assert_eq!(&statuses[..5], &[200; 5]);
    assert_eq!(statuses[5], 429, "{statuses:?}");
    assert!(retry.unwrap() >= 1);
    // Another user has a budget of their own; a fresh token of a user
    // whose budget is spent brings none (a refresh or a new login gave a
    // new budget before).
    let (_, other) = user_token(&f.db, &f.server, "o@example.com", "admin", &[]).await;
    let o = Api::new(&f.server, Some(&other));
    for _ in 0..5 {
        assert_eq!(o.get("/api/v2/stores").await.0, 200);
    }
    let (_, fresh) = user_token(&f.db, &f.server, "o@example.com", "admin", &[]).await;
    assert_ne!(fresh, other);
    let (st, body) = Api::new(&f.server, Some(&fresh))
        .get("/api/v2/stores")
        .await;
    assert_eq!(st, 429, "{body}");
}

#[tokio::test]
async fn admin_endpoints() {
    let f = fixture(&[]).await;
    let (uid, token) = user_token(
        &f.db,
        &f.server,
        "staff@example.com",
        "staff",
        &[f.stores[0]],
    )
    .await;
    let staff = Api::new(&f.server, Some(&token));
    let (st, body) = f
        .admin
        .post(
            "/api/admin/announcements",
            &json!({"message": "Inventory tonight", "level": "warning"}),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    assert!(body["eventId"].is_number());
    assert_eq!(
        staff
            .post("/api/admin/announcements", &json!({"message": "x"}))
            .await
            .0,
        403
    );
    assert_eq!(
        f.admin
            .post("/api/admin/announcements", &json!({"message": ""}))
            .await
            .0,
        400
    );
    // A blank message is named, on both routes.
    for (path, body) in [
        ("/api/admin/announcements", json!({"message": "   "})),
        (
            "/api/admin/notifications",
            json!({"userId": uid, "message": " \n\t "}),
        ),
    ] {
        let (st, body) = f.admin.post(path, &body).await;
        assert_eq!(st, 400, "{path}: {body}");
        assert_eq!(
            body["error"]["message"], "message: must not be blank",
            "{path}: {body}"
        );
        assert_eq!(
            body["error"]["details"]["parameter"], "message",
            "{path}: {body}"
        );
    }
    let (st, _) = f
        .admin
        .post(
            "/api/admin/notifications",
            &json!({"userId": uid, "message": "Hi"}),
        )
        .await;
    assert_eq!(st, 201);
    assert_eq!(
        f.admin
            .post(
                "/api/admin/notifications",
                &json!({"userId": 424242, "message": "Hi"})
            )
            .await
            .0,
        404
    );
    let (st, body) = f.admin.get("/api/admin/indexes").await;
    assert_eq!(st, 200, "{body}");
    assert!(body.is_array());
    let (st, body) = f
        .admin
        .post("/api/admin/maintenance", &json!({"dryRun": true}))
        .await;
    assert_eq!(st, 200, "{body}");
    assert!(body["actions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["statement"].as_str().unwrap().starts_with("ANALYZE")));
    // A flag sent as null (an unset client variable) is refused naming it:
    // `dryRun: null` used to run the fixes for real.
    for (body, param) in [
        (json!({"dryRun": null}), "dryRun"),
        (json!({"dryRun": true, "dropUnused": null}), "dropUnused"),
    ] {
        let (st, answer) = f.admin.post("/api/admin/maintenance", &body).await;
        assert_eq!(st, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["details"]["parameter"], param, "{answer}");
    }
    // One run at a time, whether from here or `sales-server maintain`.
    let mut holder = f.db.connect().await;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await
        .unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(sales_server::maintain::MAINTAIN_LOCK)
        .execute(&mut holder)
        .await
        .unwrap();
    let (st, body) = f.admin.post("/api/admin/maintenance", &json!({})).await;
    assert_eq!(st, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with(&format!(
                "another maintain run is in progress (Postgres pid {pid}"
            )),
        "{body}"
    );
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(sales_server::maintain::MAINTAIN_LOCK)
        .execute(&mut holder)
        .await
        .unwrap();
    let (st, body) = f.admin.post("/api/admin/maintenance", &json!({})).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["dryRun"], false);
    assert_eq!(staff.get("/api/admin/indexes").await.0, 403);
}

#[tokio::test]
async fn openapi_describes_every_endpoint() {
    let f = fixture(&[]).await;
    let (st, spec) = Api::new(&f.server, None).get("/openapi.json").await;
    assert_eq!(st, 200);
    for (path, method) in [
        ("/api/v2/auth/login", "post"),
        ("/api/v2/sales", "get"),
        ("/api/v2/sales/{id}", "get"),
        ("/api/v2/sales/batch", "post"),
        ("/api/v2/sales/batch", "delete"),
        ("/api/v2/sales/summary", "get"),
        ("/api/v2/stores", "get"),
        ("/api/v2/stores", "post"),
        ("/api/v2/stores/{id}", "get"),
        ("/api/v2/stores/{id}", "patch"),
        ("/health", "get"),
    ] {
        let op = &spec["paths"][path][method];
        assert!(op.is_object(), "{method} {path} missing from the spec");
        assert!(
            op["description"].is_string() || op["summary"].is_string(),
            "{method} {path} has no description"
        );
    }
    let list = &spec["paths"]["/api/v2/sales"]["get"];
    for status in ["200", "400", "401", "403", "429"] {
        assert!(list["responses"][status].is_object(), "list lacks {status}");
    }
    // The streamed export judges no precondition (it has no ETag): no 412.
    let export = &spec["paths"]["/api/v2/sales/export"]["get"]["responses"];
    assert!(
        export["200"].is_object() && export["412"].is_null(),
        "{export}"
    );
    // Every list's `meta` is described member by member.
    for list in ["StorePage", "UserPage"] {
        let meta = &spec["components"]["schemas"][list]["properties"]["meta"];
        assert!(meta["$ref"].is_string(), "{list}.meta: {meta}");
    }
    let r = reqwest::get(format!("http://{}/docs", f.server.addr))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A database whose extension has no `sales.parse_json` (older than 0.6.0,
/// or recreated at such a version while the server runs): the batch
/// endpoint finds the function missing, sends the records as jsonb instead
/// and writes the same rows; it takes the function up again once it is back.
#[tokio::test]
async fn batches_write_the_same_rows_without_parse_json() {
    let f = fixture(&[]).await;
    let (a, s, pool) = (&f.admin, f.stores[0], &f.db.pool);
    let rec = |m: i32| {
        json!({"storeId": s, "year": 2024, "month": m, "dailyData": {
            "1": {"sales": 10.25, "customers": 3}, "2": {"sales": 1.50}, "10": {"sales": 0}}})
    };
    let post = |m: i32| async move {
        let (st, body) = a
            .post("/api/v2/sales/batch", &json!({"salesDataArray": [rec(m)]}))
            .await;
        assert_eq!(st, 200, "month {m}: {body}");
        assert_eq!(body["inserted"], 1, "month {m}: {body}");
    };
    let rename = |from: &'static str, to: &'static str| async move {
        sqlx::query(&format!("ALTER FUNCTION sales.{from}(text) RENAME TO {to}"))
            .execute(pool)
            .await
            .unwrap();
    };
    post(1).await;
    rename("parse_json", "parse_json_put_away").await;
    post(2).await;
    post(3).await;
    rename("parse_json_put_away", "parse_json").await;
    post(4).await;
    let days: Vec<(i32, String, String)> = sqlx::query_as(
        "SELECT month, daily_data::text, total_sales::text FROM sales.monthly_sales
         WHERE store_id = $1 ORDER BY month",
    )
    .bind(s)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(days.len(), 4, "{days:?}");
    for d in &days[1..] {
        assert_eq!((&d.1, &d.2), (&days[0].1, &days[0].2), "{days:?}");
    }
}

/// Rows written past the row trigger (plain SQL in replica mode, as a
/// logical-replication apply writes them) can have NULL totals, or NaN and
/// infinite ones. Sorting by
/// such a column still pages through every row once, in Postgres' order
/// (NULLs last ascending, first descending), with cursors that carry the NULL.
#[tokio::test]
async fn sorting_by_a_column_with_nulls_pages_through_every_row_once() {
    let f = fixture(&[]).await;
    seed_months(&f).await;
    let store = f.stores[0];
    sqlx::raw_sql(&format!(
        "BEGIN; SET LOCAL session_replication_role = replica;
         INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         VALUES ({store}, 2024, 7, '{{\"1\": {{\"sales\": 5}}}}'),
                ({store}, 2024, 8, '{{\"2\": {{\"sales\": 6}}}}');
         INSERT INTO sales.monthly_sales (store_id, year, month, daily_data, total_sales)
         VALUES ({store}, 2024, 9, '{{}}', 'NaN'), ({store}, 2024, 10, '{{}}', 'Infinity');
         COMMIT;"
    ))
    .execute(&f.db.pool)
    .await
    .unwrap();
    for (sort, order) in [
        ("totalSales", "total_sales ASC, id"),
        ("-totalSales", "total_sales DESC, id"),
        ("daysReported,-id", "days_reported ASC, id DESC"),
        ("-totalCustomers,-id", "total_customers DESC, id DESC"),
        (
            "-daysReported,totalSales,id",
            "days_reported DESC, total_sales ASC, id",
        ),
    ] {
        let want: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT id FROM sales.monthly_sales WHERE store_id = $1 ORDER BY {order}"
        ))
        .bind(store)
        .fetch_all(&f.db.pool)
        .await
        .unwrap();
        assert_eq!(want.len(), 10);
        for limit in [1, 2, 3] {
            let mut got: Vec<i64> = Vec::new();
            let mut path =
                format!("/api/v2/sales?storeId={store}&sort={sort}&fields=id&limit={limit}");
            for _ in 0..20 {
                let (st, body) = f.admin.get(&path).await;
                assert_eq!(st, 200, "{sort} {limit}: {body}");
                got.extend(
                    body["data"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r["id"].as_i64().unwrap()),
                );
                match body["meta"]["nextCursor"].as_str() {
                    Some(c) => {
                        path = format!(
                            "/api/v2/sales?storeId={store}&sort={sort}&fields=id&limit={limit}&cursor={c}"
                        )
                    }
                    None => break,
                }
            }
            assert_eq!(got, want, "sort={sort} limit={limit}");
        }
    }
    // A NULL where the column never is: a tampered cursor, 400 naming it.
    let (_, body) = f.admin.get("/api/v2/sales?sort=storeId&limit=1").await;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let real = body["meta"]["nextCursor"].as_str().unwrap();
    let mut c: Value =
        serde_json::from_slice(&base64::Engine::decode(&b64, real).unwrap()).unwrap();
    c["v"] = json!([null, "1"]);
    let tampered = base64::Engine::encode(&b64, c.to_string());
    let (st, body) = f
        .admin
        .get(&format!("/api/v2/sales?sort=storeId&cursor={tampered}"))
        .await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(body["error"]["details"]["parameter"], "cursor");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("never null"),
        "{body}"
    );
}

/// A region filter is what a store's region can be: 1..100 characters as
/// Postgres counts them (after trimming), no control characters; anything
/// else, an empty one included, is a 400
/// naming `region` on every endpoint that takes it.
#[tokio::test]
async fn region_filters_are_checked_as_characters() {
    let f = fixture(&[]).await;
    seed_months(&f).await;
    let store = f.stores[0];
    // 71 characters, 123 bytes.
    let region = format!("Région-Île-de-France-{}", "é".repeat(50));
    assert_eq!(region.chars().count(), 71);
    let (st, body) = f
        .admin
        .send_json(
            Method::PATCH,
            &format!("/api/v2/stores/{store}"),
            &json!({ "region": region }),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let enc = |s: &str| s.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
    for path in [
        "/api/v2/sales",
        "/api/v2/sales/summary",
        "/api/v2/stores",
        "/api/v2/sales/export",
    ] {
        let (st, body) = f
            .admin
            .get(&format!("{path}?region={}", enc(&region)))
            .await;
        assert_eq!(st, 200, "{path}: {body}");
        // Given but empty (an unset variable in a client) is refused, not
        // read as "every region".
        for bad in ["a\u{0}b", "a\nb", &"é".repeat(101), "", "  "] {
            let (st, body) = f.admin.get(&format!("{path}?region={}", enc(bad))).await;
            assert_eq!(st, 400, "{path} {bad:?}: {body}");
            assert_eq!(
                body["error"]["details"]["parameter"], "region",
                "{path}: {body}"
            );
        }
    }
    // With a cursor, the region is still what is named.
    let (_, body) = f.admin.get("/api/v2/sales?limit=1").await;
    let c = body["meta"]["nextCursor"].as_str().unwrap();
    let (st, body) = f
        .admin
        .get(&format!("/api/v2/sales?limit=1&cursor={c}&region=a%00b"))
        .await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(body["error"]["details"]["parameter"], "region");
}

/// A parameter its declared type or bounds refuse is a 400 that names it
/// and says in words what it must be; a path's `id` is named `id`.
#[tokio::test]
async fn refused_parameters_are_named_and_explained() {
    let f = fixture(&[]).await;
    for (path, param, reason) in [
        ("/api/v2/sales?limit=0", "limit", "must be at least 1"),
        ("/api/v2/sales?limit=abc", "limit", "must be a whole number"),
        ("/api/v2/sales?year=2101", "year", "must be at most 2100"),
        ("/api/v2/sales/abc", "id", "must be a whole number"),
        (
            "/api/v2/sales/99999999999999999999/history",
            "id",
            "is out of range (a whole number in -9223372036854775808..9223372036854775807)",
        ),
        (
            "/api/v2/sales?limit=99999999999999999999",
            "limit",
            "is out of range (a whole number in -9223372036854775808..9223372036854775807)",
        ),
        (
            "/api/v2/sales?storeId=99999999999999999999",
            "storeId",
            "\"99999999999999999999\" is out of range (ids are at most 9223372036854775807)",
        ),
        ("/api/v2/stores/x", "id", "must be a whole number"),
        ("/api/v2/users/1.5", "id", "must be a whole number"),
        // A month written right but out of range says which part is.
        (
            "/api/v2/sales?from=1999-12",
            "from",
            "\"1999-12\": the year must be between 2000 and 2100",
        ),
        (
            "/api/v2/sales/summary?to=2101-01",
            "to",
            "\"2101-01\": the year must be between 2000 and 2100",
        ),
        (
            "/api/v2/sales/export?from=2024-13",
            "from",
            "\"2024-13\": the month must be between 01 and 12",
        ),
        (
            "/api/v2/sales?to=2024-6-1",
            "to",
            "\"2024-6-1\" is not a month like 2024-06",
        ),
        // Given but naming nothing: refused, not read as a default.
        (
            "/api/v2/sales?sort=,",
            "sort",
            "names no key (leave the parameter out for the default, storeId,year,month)",
        ),
        (
            "/api/v2/sales?sort=",
            "sort",
            "names no key (leave the parameter out for the default, storeId,year,month)",
        ),
        (
            "/api/v2/sales/summary?year=2024&compareTo=",
            "compareTo",
            "must be previousYear or previousPeriod (leave it out for no comparison)",
        ),
        // One path in two spellings (meta.fields echoed it twice).
        (
            "/api/v2/sales?fields=id,total_sales,totalSales",
            "fields",
            "given twice",
        ),
    ] {
        let (st, body) = f.admin.get(path).await;
        assert_eq!(st, 400, "{path}: {body}");
        assert_eq!(
            body["error"]["details"]["parameter"], param,
            "{path}: {body}"
        );
        assert_eq!(body["error"]["details"]["reason"], reason, "{path}: {body}");
        // A projection's message names the path it refuses.
        let message = match param {
            "fields" => format!("{param}: field \"totalSales\": {reason}"),
            _ => format!("{param}: {reason}"),
        };
        assert_eq!(body["error"]["message"], message, "{path}: {body}");
    }
    // A refused value is quoted in part: a 20 kB `fields` or `storeId` was
    // answered in full, twice (message and details).
    let long = "a".repeat(20_000);
    for path in [
        format!("/api/v2/sales?fields={long}"),
        format!("/api/v2/sales?storeId={long}"),
        format!("/api/v2/sales/summary?groupBy={long}"),
    ] {
        let (st, body) = f.admin.get(&path).await;
        assert_eq!(st, 400, "{body}");
        let size = body.to_string().len();
        assert!(size < 2_000, "{} bytes: {}", size, &body.to_string()[..300]);
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .ends_with("… (cut)"),
            "{body}"
        );
    }
}

/// More paths than a projection takes are blamed on the list given:
/// `fields` alone is `fields` (it was called `exclude`), both together say
/// so.
#[tokio::test]
async fn too_many_projection_paths_name_the_list_given() {
    let f = fixture(&[]).await;
    let many = vec!["year"; 300].join(",");
    let (st, body) = f.admin.get(&format!("/api/v2/sales?fields={many}")).await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(body["error"]["details"]["parameter"], "fields", "{body}");
    let (st, body) = f.admin.get(&format!("/api/v2/sales?exclude={many}")).await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(body["error"]["details"]["parameter"], "exclude", "{body}");
    let half = vec!["year"; 150].join(",");
    let (st, body) = f
        .admin
        .get(&format!("/api/v2/sales?fields={half}&exclude={half}"))
        .await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(body["error"]["details"]["parameter"], "fields", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fields and exclude together"),
        "{body}"
    );
}

/// A JSON body the typed extractors refuse is a 400 naming the first field
/// at fault and why, read against the operation's schema in the OpenAPI
/// document (poem-openapi's own message names only the object's type); an
/// enum query parameter lists its values. Nothing is written.
#[tokio::test]
async fn refused_bodies_name_the_field_and_the_rule() {
    let f = fixture(&[]).await;
    let cases: Vec<(Method, &str, String, &str, &str)> = vec![
        (Method::POST, "/api/v2/stores", json!({"name": "A", "region": "North"}).to_string(), "code", "required"),
        (Method::POST, "/api/v2/stores", json!({"code": "ok-1", "name": "A", "region": "North", "status": "ajar"}).to_string(), "status", "must be one of open, closed, renovating"),
        (Method::POST, "/api/v2/stores", json!({"code": "no spaces", "name": "A", "region": "North"}).to_string(), "code", "must match ^[A-Za-z0-9_-]{1,32}$"),
        (Method::POST, "/api/v2/users", json!({"email": "x@example.com", "password": "a-long-password-1"}).to_string(), "role", "required"),
        (Method::POST, "/api/v2/users", json!({"email": "x@example.com", "password": "a-long-password-1", "role": "king"}).to_string(), "role", "must be one of admin, manager, staff"),
        (Method::POST, "/api/v2/users", json!({"email": "x@example.com", "password": "a-long-password-1", "role": "staff", "stores": [1, "two"]}).to_string(), "stores[1]", "must be a whole number"),
        (Method::POST, "/api/v2/sales/batch", json!({}).to_string(), "salesDataArray", "required"),
        // A misspelt member is named, not the one it stands for as missing.
        (Method::POST, "/api/v2/sales/batch", json!({"sales_data_array": []}).to_string(), "sales_data_array", "unknown field; did you mean salesDataArray (required)?"),
        (Method::POST, "/api/v2/stores", json!({"code": "ok-2", "name": "A", "regoin": "North"}).to_string(), "regoin", "unknown field; did you mean region (required)?"),
        (Method::POST, "/api/v2/sales/batch", json!({"salesDataArray": 5}).to_string(), "salesDataArray", "must be an array"),
        (Method::POST, "/api/v2/sales/batch", json!({"salesDataArray": [], "mode": "bogus"}).to_string(), "mode", "must be one of merge, replace"),
        (Method::POST, "/api/v2/sales/batch", json!({"salesDataArray": [], "atomic": "yes"}).to_string(), "atomic", "must be true or false"),
        (Method::DELETE, "/api/v2/sales/batch", json!({"ids": ["7"]}).to_string(), "ids[0]", "must be a whole number"),
        (Method::POST, "/api/v2/auth/login", json!({"email": "x@example.com"}).to_string(), "password", "required"),
        (Method::POST, "/api/v2/stores", "{\"code\": ".to_string(), "body", "is not valid JSON: EOF while parsing a value at line 1 column 9"),
        (Method::POST, "/api/v2/stores", "[1]".to_string(), "body", "must be an object"),
    ];
    let stores_before = f.admin.get("/api/v2/stores").await.1["data"]
        .as_array()
        .unwrap()
        .len();
    for (method, path, body, field, reason) in cases {
        let r = f
            .admin
            .req(method.clone(), path)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let got: serde_json::Value = r.json().await.unwrap();
        let what = format!("{method} {path} {body}: {got}");
        assert_eq!(status, 400, "{what}");
        assert_eq!(got["error"]["details"]["parameter"], field, "{what}");
        assert_eq!(got["error"]["details"]["reason"], reason, "{what}");
        assert_eq!(
            got["error"]["message"],
            format!("{field}: {reason}"),
            "{what}"
        );
        assert!(got["error"]["requestId"].is_string(), "{what}");
    }
    let stores_after = f.admin.get("/api/v2/stores").await.1["data"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(stores_before, stores_after, "a refused body wrote nothing");
    for (path, param, reason) in [
        (
            "/api/v2/sales/export?format=xml",
            "format",
            "must be one of csv, json, ndjson",
        ),
        (
            "/api/v2/sales/export?format=csv&shape=weekly",
            "shape",
            "must be one of monthly, daily",
        ),
    ] {
        let (st, body) = f.admin.get(path).await;
        assert_eq!(st, 400, "{path}: {body}");
        assert_eq!(
            body["error"]["details"]["parameter"], param,
            "{path}: {body}"
        );
        assert_eq!(body["error"]["details"]["reason"], reason, "{path}: {body}");
    }
}

/// `PATCH /api/v2/stores/{id}` with `If-Match` changes the store only in
/// the state that ETag (from a GET of it) names: a second writer holding
/// the same, now stale, ETag gets 412 with the current one and changes
/// nothing, so neither overwrites the other unseen. `*` matches any state,
/// a weak tag none; without the header the write goes through as before.
#[tokio::test]
async fn if_match_guards_a_store_update_against_lost_updates() {
    let f = fixture(&[]).await;
    let store = f.stores[0];
    let path = format!("/api/v2/stores/{store}");
    let patch = |tag: Option<String>, body: Value| {
        let path = path.clone();
        let admin = &f.admin;
        async move {
            admin
                .send_if_match(Method::PATCH, &path, tag.as_deref(), Some(&body))
                .await
        }
    };
    let read = f.admin.etag(&path).await;
    // The first writer holding the ETag wins.
    let (st, body) = patch(Some(read.clone()), json!({"name": "First"})).await;
    assert_eq!(st, 200, "{body}");
    // The second, holding the same ETag, is refused and changes nothing.
    let (st, body) = patch(Some(read.clone()), json!({"name": "Second"})).await;
    assert_eq!(st, 412, "{body}");
    assert_eq!(body["error"]["code"], "precondition_failed", "{body}");
    let now = f.admin.etag(&path).await;
    assert_ne!(now, read);
    assert_eq!(body["error"]["details"]["etag"], now, "{body}");
    let (_, doc) = f.admin.get(&path).await;
    assert_eq!(doc["data"]["name"], "First", "{doc}");
    // With the current ETag (or one of a content coding of the same state,
    // in a list) it goes through.
    let coded = format!("\"stale\", \"{}-gzip\"", now.trim_matches('"'));
    let (st, body) = patch(Some(coded), json!({"name": "Third"})).await;
    assert_eq!(st, 200, "{body}");
    // A weak tag never matches; `*` matches whatever the state.
    let weak = format!("W/{}", f.admin.etag(&path).await);
    assert_eq!(patch(Some(weak), json!({"name": "Weak"})).await.0, 412);
    assert_eq!(patch(Some("*".into()), json!({"name": "Any"})).await.0, 200);
    assert_eq!(patch(None, json!({"name": "Plain"})).await.0, 200);
    let (_, doc) = f.admin.get(&path).await;
    assert_eq!(doc["data"]["name"], "Plain", "{doc}");
    // A store that does not exist is 404 either way.
    let (st, _) = f
        .admin
        .send_json(
            Method::PATCH,
            "/api/v2/stores/999999",
            &json!({"name": "x"}),
        )
        .await;
    assert_eq!(st, 404);
}

/// A batch large enough to be checked in parts (over the cores) reports
/// each refused record by its own index, whichever part it fell in, writes
/// the rest with `atomic: false`, and is refused whole (403 naming the
/// store) when any part names a store outside the caller's scope.
#[tokio::test]
async fn a_large_batch_reports_refused_records_by_index_in_every_part() {
    let f = fixture(&[]).await;
    let (s0, s1) = (f.stores[0], f.stores[1]);
    // Years 2001..=2100, twelve months each.
    let n = 1200;
    let records = |store_at: &dyn Fn(usize) -> i64| -> Vec<Value> {
        (0..n)
            .map(|i| {
                month(
                    store_at(i),
                    2001 + (i / 12) as i32,
                    1 + (i % 12) as i32,
                    3,
                    10.0 + i as f64,
                )
            })
            .collect()
    };
    let mut recs = records(&|_| s0);
    // Refusals at the edges of any split of 1,200 into 2, 3 or 4 parts.
    recs[5]["dailyData"]["32"] = json!({"sales": 1});
    recs[299]["dailyData"]["1"]["sales"] = json!(-1);
    recs[300]["colour"] = json!("red");
    recs[301]["dailyData"]["2"] = json!("lots");
    recs[599]["month"] = json!(13);
    recs[600]["storeId"] = json!("x");
    recs[1199]["dailyData"]["1"]["customers"] = json!(1.5);
    let refused = [5u64, 299, 300, 301, 599, 600, 1199];
    let (st, body) = f
        .admin
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": recs, "atomic": false}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let at: Vec<u64> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    let mut distinct = at.clone();
    distinct.dedup();
    assert_eq!(distinct, refused, "{body}");
    assert_eq!(body["failed"], refused.len(), "{body}");
    assert_eq!(body["inserted"], n - refused.len(), "{body}");
    let field_of = |i: u64| {
        body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["index"] == i)
            .map(|e| e["field"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(field_of(5), "dailyData.32");
    assert_eq!(field_of(300), "colour");
    assert_eq!(field_of(599), "month");
    // One record of another store, late in the batch: a staff user scoped
    // to a third store is refused the whole batch, and nothing is written.
    let s2 = f.stores[2];
    let (_, staff) = user_token(&f.db, &f.server, "parts@example.com", "staff", &[s2]).await;
    let staff = Api::new(&f.server, Some(&staff));
    let other = records(&|i| if i == 1100 { s1 } else { s2 });
    let (st, body) = staff
        .post("/api/v2/sales/batch", &json!({"salesDataArray": other}))
        .await;
    assert_eq!(st, 403, "{body}");
    assert_eq!(body["error"]["details"]["storeIds"], json!([s1]), "{body}");
    let (_, page) = f
        .admin
        .get(&format!("/api/v2/sales?storeId={s1},{s2}&limit=1"))
        .await;
    assert_eq!(page["data"], json!([]), "{page}");
}

/// A member a JSON body's object does not have (a misspelling: `atomc`,
/// `regoin`, `Mode`) is a 400 naming it and the members allowed, rather
/// than a request that does something else than meant (a merge instead of
/// a replace, a store rename without its region, a non-atomic delete run
/// atomically); nothing is written. The document says so: every object a
/// JSON request body refers to has `additionalProperties: false`.
#[tokio::test]
async fn misspelt_body_members_are_refused_and_change_nothing() {
    let f = fixture(&[]).await;
    let store = f.stores[0];
    let (st, before) = f.admin.get(&format!("/api/v2/stores/{store}")).await;
    assert_eq!(st, 200, "{before}");
    let record = month(store, 2031, 1, 3, 10.0);
    let cases: Vec<(Method, String, Value, &str, &str)> = vec![
        (
            Method::POST,
            "/api/v2/sales/batch".into(),
            json!({"salesDataArray": [record], "Mode": "replace"}),
            "Mode",
            "atomic, mode, salesDataArray",
        ),
        (
            Method::DELETE,
            "/api/v2/sales/batch".into(),
            json!({"keys": [{"storeId": store, "year": 2031, "month": 1}], "atomc": false}),
            "atomc",
            "atomic, ids, keys",
        ),
        (
            Method::PATCH,
            format!("/api/v2/stores/{store}"),
            json!({"name": "Renamed", "regoin": "South"}),
            "regoin",
            "name, region, status",
        ),
        (
            Method::POST,
            "/api/v2/stores".into(),
            json!({"code": "typo-1", "name": "A", "region": "North", "staus": "closed"}),
            "staus",
            "code, name, region, status",
        ),
        (
            Method::POST,
            "/api/v2/users".into(),
            json!({"email": "typo@example.com", "password": "a-long-password-1", "role": "staff", "store": [store]}),
            "store",
            "disabled, email, password, role, stores",
        ),
        (
            Method::POST,
            "/api/v2/auth/login".into(),
            json!({"email": "admin@example.com", "password": "x", "remember": true}),
            "remember",
            "email, password, refreshCookie",
        ),
        (
            Method::POST,
            "/api/admin/cache/clear".into(),
            json!({"tags": "sales"}),
            "tags",
            "tag",
        ),
        (
            Method::POST,
            "/api/admin/maintenance".into(),
            json!({"dry_run": true}),
            "dry_run",
            "dropUnused, dryRun",
        ),
    ];
    for (method, path, body, field, allowed) in cases {
        let (status, got) = f.admin.send_json(method.clone(), &path, &body).await;
        let what = format!("{method} {path} {body}: {got}");
        assert_eq!(status, 400, "{what}");
        assert_eq!(got["error"]["details"]["parameter"], field, "{what}");
        assert_eq!(
            got["error"]["details"]["reason"],
            format!("unknown field; allowed: {allowed}"),
            "{what}"
        );
    }
    // Nothing was written: the month is absent, the store unchanged, no
    // store or user was created.
    let (_, months) = f
        .admin
        .get(&format!("/api/v2/sales?storeId={store}&year=2031"))
        .await;
    assert_eq!(months["data"], json!([]), "{months}");
    let (_, after) = f.admin.get(&format!("/api/v2/stores/{store}")).await;
    assert_eq!(after, before);
    let (_, stores) = f.admin.get("/api/v2/stores?limit=200").await;
    assert!(
        !stores.to_string().contains("typo-1"),
        "a refused store was created: {stores}"
    );
    let (_, users) = f.admin.get("/api/v2/users").await;
    assert!(
        !users.to_string().contains("typo@example.com"),
        "a refused user was created: {users}"
    );
    // The same bodies without the misspelt member are accepted.
    let (st, body) = f
        .admin
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [month(store, 2031, 1, 3, 10.0)], "mode": "replace"}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    // The document closes every request body's objects.
    let (_, spec) = Api::new(&f.server, None).get("/openapi.json").await;
    let schemas = &spec["components"]["schemas"];
    for name in [
        "BatchUpsertRequest",
        "BatchDeleteRequest",
        "CreateStore",
        "UpdateStore",
        "CreateUser",
        "UpdateUser",
        "LinkIdentity",
        "LoginRequest",
        "RefreshRequest",
        "PasswordChange",
        "Announcement",
        "Notification",
        "CacheClear",
        "MaintenanceRequest",
    ] {
        assert_eq!(
            schemas[name]["additionalProperties"],
            json!(false),
            "{name}: {}",
            schemas[name]
        );
    }
    // Response-only objects stay open (clients must ignore new members).
    assert!(schemas["BatchSummary"]["additionalProperties"].is_null());
}

/// With CORS_ORIGINS set, the listed origins get CORS answers and others a
/// 403; the server's own origin (its dashboard: login, API, WebSocket)
/// passes whatever the list says.
#[tokio::test]
async fn cors_origins_leave_the_servers_own_origin_alone() {
    let f = fixture(&[("CORS_ORIGINS", "https://app.example.com")]).await;
    let own = f.admin.base.clone();
    let login = |origin: String| {
        let http = f.admin.http.clone();
        let url = format!("{}/api/v2/auth/login", f.admin.base);
        async move {
            http.post(url)
                .header("origin", origin)
                .json(&json!({"email": "nobody@example.com", "password": "wrong-password"}))
                .send()
                .await
                .unwrap()
        }
    };
    // Same origin: the login itself answers (401 for a wrong password).
    let r = login(own.clone()).await;
    assert_eq!(r.status(), 401);
    let r = f
        .admin
        .req(Method::GET, "/api/v2/stores")
        .header("origin", own.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The CORS headers depend on `Origin`: caches are told so.
    assert_eq!(
        r.headers()["vary"],
        "Authorization, Accept-Encoding, Origin"
    );
    // A listed origin gets its CORS header; another is refused.
    let r = login("https://app.example.com".into()).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let r = login("https://evil.example.com".into()).await;
    assert_eq!(r.status(), 403);
    // Marked like every refusal, in the API's shape.
    assert!(r.headers().contains_key("vary"), "{:?}", r.headers());
    assert_eq!(r.headers()["cache-control"], "no-store");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden", "{body}");
    // A listed origin may send a conditional PATCH and a PUT: the preflight
    // allows `If-Match` and the method.
    for (method, header) in [("PATCH", "if-match"), ("PUT", "content-type")] {
        let r = f
            .admin
            .req(Method::OPTIONS, "/api/v2/stores/1")
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", method)
            .header("access-control-request-headers", header)
            .send()
            .await
            .unwrap();
        let allowed = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_ascii_lowercase()
        };
        assert!(r.status().is_success(), "{method}: {}", r.status());
        // The preflight's answer varies by origin as every answer does.
        assert!(
            allowed("vary").contains("origin"),
            "{method}: {:?}",
            r.headers()
        );
        assert!(
            allowed("access-control-allow-methods").contains(&method.to_ascii_lowercase()),
            "{method}: {:?}",
            r.headers()
        );
        assert!(
            allowed("access-control-allow-headers").contains(header),
            "{header}: {:?}",
            r.headers()
        );
    }
    // The WebSocket upgrade from the page's own origin.
    let ws = format!(
        "{}/ws?token={}",
        f.admin.base.replacen("http://", "ws://", 1),
        f.admin.token.as_deref().unwrap()
    );
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(ws).unwrap();
    req.headers_mut().insert("origin", own.parse().unwrap());
    let (_socket, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("same-origin WebSocket upgrade");
    assert_eq!(resp.status(), 101);
}

/// A store's name or region of spaces only is a 400 naming the field (they
/// are stored trimmed), not a constraint error.
#[tokio::test]
async fn blank_store_names_and_regions_name_the_field() {
    let f = fixture(&[]).await;
    let (st, body) = f
        .admin
        .post(
            "/api/v2/stores",
            &json!({"code": "B1", "name": "   ", "region": "North"}),
        )
        .await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(body["error"]["details"]["parameter"], "name");
    let (st, body) = f
        .admin
        .send_json(
            Method::PATCH,
            &format!("/api/v2/stores/{}", f.stores[0]),
            &json!({"region": "  "}),
        )
        .await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(body["error"]["details"]["parameter"], "region");
    // Characters that show as nothing, or break a line or a label: a C1
    // control, line and paragraph separators, a name of zero-width spaces.
    for (name, region, field) in [
        ("x\u{85}y", "North", "name"),
        ("Shop", "No\u{2028}rth", "region"),
        ("Shop", "No\u{2029}rth", "region"),
        // Direction overrides and isolates: the rest of a line reads reversed.
        ("\u{202e}evil reversed name", "North", "name"),
        ("Shop", "No\u{2067}rth", "region"),
        ("\u{200b}\u{200b}", "North", "name"),
        ("Shop", "\u{feff} \u{2060}", "region"),
    ] {
        let (st, body) = f
            .admin
            .post(
                "/api/v2/stores",
                &json!({"code": "B2", "name": name, "region": region}),
            )
            .await;
        assert_eq!(st, 400, "{name:?} {region:?}: {body}");
        let said = body.to_string();
        assert!(said.contains(field), "{name:?} {region:?}: {body}");
    }
    let (st, body) = f
        .admin
        .send_json(
            Method::PATCH,
            &format!("/api/v2/stores/{}", f.stores[0]),
            &json!({"name": "\u{200b}"}),
        )
        .await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(body["error"]["details"]["parameter"], "name");
    // Invisible characters between visible ones are part of a name (an
    // emoji sequence's joiners).
    let (st, body) = f
        .admin
        .post(
            "/api/v2/stores",
            &json!({"code": "B3", "name": "Family \u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}", "region": "North"}),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    // A region filter no store's region can be: a separator inside or at
    // either end (where trimming would take it off unseen), or nothing
    // visible; on stores, sales lists and exports alike.
    for q in [
        "No%E2%80%A8rth",
        "North%E2%80%A8",
        "%C2%85North",
        "%E2%80%8B",
        "%EF%BB%BF%20",
    ] {
        for path in ["/api/v2/stores", "/api/v2/sales", "/api/v2/sales/export"] {
            let (st, body) = f.admin.get(&format!("{path}?region={q}")).await;
            assert_eq!(st, 400, "{path}?region={q}: {body}");
            assert_eq!(body["error"]["details"]["parameter"], "region", "{body}");
        }
    }
}

/// A metric whose number Postgres' `numeric` cannot store (more than 16,383
/// digits after the point: `1.0e-16383`, which an `f64` reads as 0; or an
/// exponent `numeric_in` refuses whatever the digits: `0e99999999999`) is
/// refused as its record's own error, naming the field: the other records
/// of an `atomic: false` batch are written (the whole statement used to
/// fail with a 400 naming nothing), and an atomic batch is a 422 report.
#[tokio::test]
async fn numbers_numeric_cannot_store_are_the_records_own_error() {
    let f = fixture(&[]).await;
    let s = f.stores[0];
    for tiny in [
        "1.0e-16383",
        "0e-16384",
        "1e-20000",
        "0e99999999999",
        "0e+1073741823",
        "1e-2147483649",
    ] {
        let body = format!(
            r#"{{"atomic": false, "salesDataArray": [
                {{"storeId": {s}, "year": 2001, "month": 5, "dailyData": {{"1": {{"sales": 5}}}}}},
                {{"storeId": {s}, "year": 2001, "month": 6, "dailyData": {{"1": {{"sales": {tiny}}}}}}}]}}"#
        );
        let r = f
            .admin
            .req(reqwest::Method::POST, "/api/v2/sales/batch")
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let doc: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{tiny}: {doc}");
        assert_eq!(doc["failed"], 1, "{doc}");
        assert_eq!(doc["errors"][0]["index"], 1, "{doc}");
        assert_eq!(doc["errors"][0]["field"], "dailyData.1.sales", "{doc}");
        assert!(
            doc["errors"][0]["reason"]
                .as_str()
                .unwrap()
                .contains("more than Postgres can store"),
            "{doc}"
        );
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sales.monthly_sales WHERE year = 2001 AND month = 5",
        )
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
        assert_eq!(n, 1, "{tiny}: the valid record is written");
        sqlx::query("DELETE FROM sales.monthly_sales WHERE year = 2001")
            .execute(&f.db.pool)
            .await
            .unwrap();
        let r = f
            .admin
            .req(reqwest::Method::POST, "/api/v2/sales/batch")
            .header("content-type", "application/json")
            .body(body.replace(r#""atomic": false"#, r#""atomic": true"#))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let doc: Value = r.json().await.unwrap();
        assert_eq!(status, 422, "{tiny}: {doc}");
        assert_eq!(
            doc["error"]["details"]["errors"][0]["field"], "dailyData.1.sales",
            "{doc}"
        );
    }
}

/// A NUL character, which Postgres' text and jsonb cannot hold, is refused
/// naming the field (a message, its data), and a login with one in its
/// email is a wrong email (401); each was a 400 from Postgres naming nothing.
#[tokio::test]
async fn nul_characters_are_refused_naming_the_field() {
    let f = fixture(&[]).await;
    for (path, body, field) in [
        (
            "/api/admin/announcements",
            json!({"message": "a\u{0}b"}),
            "message",
        ),
        (
            "/api/admin/announcements",
            json!({"message": "ok", "data": {"k": ["x\u{0}"]}}),
            "data",
        ),
        (
            "/api/admin/notifications",
            json!({"userId": f.admin_id, "message": "\u{0}"}),
            "message",
        ),
    ] {
        let (st, doc) = f.admin.post(path, &body).await;
        assert_eq!(st, 400, "{path}: {doc}");
        assert_eq!(doc["error"]["details"]["parameter"], field, "{path}: {doc}");
    }
    let (st, doc) = Api::new(&f.server, None)
        .post(
            "/api/v2/auth/login",
            &json!({"email": "a\u{0}@example.com", "password": "whatever-123"}),
        )
        .await;
    assert_eq!(st, 401, "{doc}");
}

/// OPTIONS that is not a CORS preflight says what the resource allows
/// (204 with `Allow`); it was a 405 without one.
#[tokio::test]
async fn options_says_what_a_resource_allows() {
    let f = fixture(&[]).await;
    let client = reqwest::Client::new();
    for (path, expected) in [
        ("/api/v2/sales/1", "GET, HEAD, OPTIONS"),
        ("/api/v2/sales/batch", "DELETE, POST, OPTIONS"),
    ] {
        let r = client
            .request(reqwest::Method::OPTIONS, f.server.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 204, "{path}");
        let allow = r.headers()["allow"].to_str().unwrap().to_string();
        let mut got: Vec<&str> = allow.split(", ").collect();
        got.sort();
        let mut want: Vec<&str> = expected.split(", ").collect();
        want.sort();
        assert_eq!(got, want, "{path}: {allow}");
        // A method the resource does not allow: 405 with the same Allow.
        let r = client
            .request(reqwest::Method::PUT, f.server.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 405, "{path}");
        assert_eq!(r.headers()["allow"].to_str().unwrap(), allow, "{path}");
        // Its message names the methods `Allow` names.
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            body["error"]["message"],
            format!("PUT is not allowed here; use {allow}"),
            "{path}"
        );
    }
}

/// Routes served beside the document (the explorer, the document, the
/// dashboard's assets) answer a method they do not take with 405 and
/// `Allow`, and OPTIONS with 204 and the same `Allow` (a POST to the
/// explorer used to get the page, an OPTIONS on an asset a bare 405); a
/// CORS preflight with no CORS configured is such an OPTIONS. Refusals
/// made before the API (405, 415) carry `Vary` like every answer; a 401
/// names its scheme; a GET's Content-Type says nothing (it has no body).
#[tokio::test]
async fn every_route_says_what_it_allows_and_refusals_are_marked() {
    let f = fixture(&[]).await;
    let client = reqwest::Client::new();
    for path in ["/openapi.json", "/assets/app.js", "/docs", "/"] {
        let r = client
            .request(reqwest::Method::POST, f.server.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 405, "POST {path}");
        assert_eq!(r.headers()["allow"], "GET, HEAD, OPTIONS", "{path}");
        assert!(r.headers().contains_key("vary"), "{path}");
        let r = client
            .request(reqwest::Method::OPTIONS, f.server.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 204, "OPTIONS {path}");
        assert_eq!(r.headers()["allow"], "GET, HEAD, OPTIONS", "{path}");
    }
    let r = client
        .request(reqwest::Method::OPTIONS, f.server.url("/api/v2/sales"))
        .header("origin", "https://elsewhere.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        204,
        "a preflight with no CORS configured"
    );
    assert!(r.headers().contains_key("allow"));
    assert!(!r.headers().contains_key("access-control-allow-origin"));
    // 415 made before the API: marked.
    let r = client
        .post(f.server.url("/api/v2/auth/login"))
        .header("content-type", "application/json; charset=latin1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    assert!(r.headers().contains_key("vary"));
    // Spaces around the `;` of a media type are allowed (RFC 9110 5.6.6).
    let r = f
        .admin
        .req(
            reqwest::Method::PATCH,
            &format!("/api/v2/stores/{}", f.stores[0]),
        )
        .header("content-type", "application/json ; charset=utf-8")
        .body(r#"{"name": "Spaced"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // A GET has no body: its Content-Type is not read.
    let r = f
        .admin
        .req(reqwest::Method::GET, "/api/v2/sales?limit=1")
        .header("content-type", "text/plain; charset=latin1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // 401: the scheme, and whether a token was refused.
    let r = client
        .get(f.server.url("/api/v2/auth/me"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        r#"Bearer realm="pg_sales""#
    );
    let r = client
        .get(f.server.url("/api/v2/auth/me"))
        .header("authorization", "Bearer x.y.z")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        r#"Bearer realm="pg_sales", error="invalid_token""#
    );
}

/// A body in a transfer coding other than chunked (`gzip, chunked`) is
/// 501: it was read as if plain. Two `Authorization` headers are 400: the
/// server read the first, a proxy may read the last.
#[tokio::test]
async fn unknown_transfer_codings_and_two_authorizations_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = fixture(&[]).await;
    let token = f.admin.token.clone().unwrap();
    let raw = |request: Vec<u8>| {
        let addr = f.server.addr;
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(&request).await.unwrap();
            let mut out = Vec::new();
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(30), s.read_to_end(&mut out))
                    .await;
            String::from_utf8_lossy(&out).to_string()
        }
    };
    let body = br#"{"ids": [999999]}"#;
    // Chunked alone is read: the batch reports the unknown id (422).
    for (coding, status) in [("gzip, chunked", "501"), ("chunked", "422")] {
        let mut req = format!(
            "DELETE /api/v2/sales/batch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nTransfer-Encoding: {coding}\r\nConnection: close\r\n\r\n{:x}\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        req.extend_from_slice(b"\r\n0\r\n\r\n");
        let answer = raw(req).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{coding}: {answer}"
        );
        if status == "501" {
            // The client's fault, said so and named (it was an opaque
            // "internal error"), marked like every refusal.
            assert!(
                answer.contains("\"code\":\"not_implemented\"")
                    && answer.contains("Transfer-Encoding \\\"gzip\\\" is not supported"),
                "{answer}"
            );
            assert!(
                answer.to_ascii_lowercase().contains("\r\nvary: "),
                "{answer}"
            );
        }
    }
    let r = f
        .admin
        .req(reqwest::Method::GET, "/api/v2/auth/me")
        .header("authorization", "Bearer junk")
        .send()
        .await
        .unwrap();
    // reqwest adds the fixture's header beside the one given here.
    assert_eq!(r.status().as_u16(), 400);
    let doc: Value = r.json().await.unwrap();
    assert!(
        doc["error"]["message"]
            .as_str()
            .unwrap()
            .contains("one Authorization"),
        "{doc}"
    );
    // Naming what it refuses, as every 400 does (details were null).
    assert_eq!(doc["error"]["details"]["header"], "Authorization", "{doc}");
    // The dashboard and the explorer connect to this server only (no
    // `ws:`/`wss:` to any host for a script injected into the page).
    for path in ["/", "/docs"] {
        let r = reqwest::get(f.server.url(path)).await.unwrap();
        let csp = r.headers()["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("connect-src 'self';"), "{path}: {csp}");
    }
}

/// A request body with a `Content-Encoding` (the server reads bodies as
/// sent) is 415: a gzip batch was a 400 "not valid JSON", and a plain body
/// labelled `br` was written as if uncompressed.
#[tokio::test]
async fn request_bodies_with_a_content_encoding_are_415() {
    let f = fixture(&[]).await;
    let s = f.stores[0];
    let body = json!({"salesDataArray": [{"storeId": s, "year": 2001, "month": 5, "dailyData": {"1": {"sales": 5}}}]});
    for coding in ["gzip", "br", "x-made-up"] {
        let r = f
            .admin
            .req(reqwest::Method::POST, "/api/v2/sales/batch")
            .header("content-encoding", coding)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let doc: Value = r.json().await.unwrap();
        assert_eq!(status, 415, "{coding}: {doc}");
        assert!(
            doc["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Content-Encoding"),
            "{doc}"
        );
    }
    // Nor is a body declared in a charset other than UTF-8 misread.
    let r = f
        .admin
        .req(reqwest::Method::POST, "/api/v2/sales/batch")
        .header("content-type", "application/json; charset=utf-16")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.monthly_sales WHERE year = 2001")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
    let r = f
        .admin
        .req(reqwest::Method::POST, "/api/v2/sales/batch")
        .header("content-encoding", "identity")
        .header("content-type", "application/json; charset=UTF-8")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

/// A query value whose %-escapes are not UTF-8 is a 400 naming it (it was
/// read with replacement characters: `region=%FF` answered an empty page).
#[tokio::test]
async fn query_values_that_are_not_utf8_are_named() {
    let f = fixture(&[]).await;
    for (q, name) in [("region=%FF", "region"), ("fields=id%C3", "fields")] {
        let r = f
            .admin
            .req(reqwest::Method::GET, &format!("/api/v2/sales?{q}"))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let doc: Value = r.json().await.unwrap();
        assert_eq!(status, 400, "{q}: {doc}");
        assert_eq!(doc["error"]["details"]["parameter"], name, "{q}: {doc}");
    }
    let (st, _) = f.admin.get("/api/v2/sales?region=S%C3%BCd").await;
    assert_eq!(st, 200);
}

/// A key given twice in one object of a body is refused by name: it was read
/// as its last value (`{"code": "A", "code": "B"}` made store B, a delete of
/// `{"ids": [1], "ids": [2]}` deleted record 2), or refused without naming
/// it (`salesDataArray` twice). In a batch it is that record's own error.
#[tokio::test]
async fn a_key_given_twice_is_refused_by_name() {
    let f = fixture(&[]).await;
    let s = f.stores[0];
    let send = |method: Method, path: &'static str, body: String| {
        let req = f
            .admin
            .req(method, path)
            .header("content-type", "application/json")
            .body(body);
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (st, doc) = send(
        Method::POST,
        "/api/v2/stores",
        r#"{"code": "DUP-A", "name": "n", "region": "north", "code": "DUP-B"}"#.into(),
    )
    .await;
    assert_eq!(st, 400, "{doc}");
    assert_eq!(doc["error"]["details"]["parameter"], "code", "{doc}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.stores WHERE code LIKE 'DUP-%'")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);

    // Top level of a batch.
    let (st, doc) = send(
        Method::POST,
        "/api/v2/sales/batch",
        r#"{"salesDataArray": [], "salesDataArray": []}"#.into(),
    )
    .await;
    assert_eq!(st, 400, "{doc}");
    assert_eq!(doc["error"]["details"]["parameter"], "salesDataArray");

    // Inside records: each such record is refused, the others written.
    let body = format!(
        r#"{{"atomic": false, "salesDataArray": [
            {{"storeId": {s}, "year": 2003, "month": 1, "dailyData": {{"1": {{"sales": 1}}}}}},
            {{"storeId": {s}, "year": 2003, "month": 2, "dailyData": {{"1": {{"sales": 1, "sales": 2}}}}}},
            {{"storeId": {s}, "year": 2003, "month": 3, "month": 4, "dailyData": {{}}}}
        ]}}"#
    );
    let (st, doc) = send(Method::POST, "/api/v2/sales/batch", body).await;
    assert_eq!(st, 200, "{doc}");
    assert_eq!(doc["inserted"], 1, "{doc}");
    let errors: Vec<(i64, String)> = doc["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["index"].as_i64().unwrap(),
                e["field"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        errors,
        vec![(1, "dailyData.1.sales".into()), (2, "month".into())],
        "{doc}"
    );
    assert_eq!(
        doc["errors"][0]["reason"],
        "appears more than once in the same object"
    );
    let months: Vec<i32> = sqlx::query_scalar(
        "SELECT month FROM sales.monthly_sales WHERE store_id = $1 AND year = 2003 ORDER BY month",
    )
    .bind(s)
    .fetch_all(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(months, vec![1]);

    // A batch delete.
    let id: i64 = sqlx::query_scalar(
        "SELECT id FROM sales.monthly_sales WHERE store_id = $1 AND year = 2003",
    )
    .bind(s)
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    let (st, doc) = send(
        Method::DELETE,
        "/api/v2/sales/batch",
        format!(r#"{{"ids": [999999999], "ids": [{id}]}}"#),
    )
    .await;
    assert_eq!(st, 400, "{doc}");
    assert_eq!(doc["error"]["details"]["parameter"], "ids", "{doc}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.monthly_sales WHERE id = $1")
        .bind(id)
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

/// A batch delete that Postgres picks as the victim of a deadlock with
/// another writer is run again, as a batch upsert is: the answer is 200
/// with both rows deleted, not a 503 for the client to retry. A 503 that
/// is still given (a conflict retried three times, Postgres down) says
/// when to come back (`Retry-After`).
#[tokio::test]
async fn a_batch_delete_that_loses_a_deadlock_is_run_again() {
    let f = fixture(&[]).await;
    seed_months(&f).await;
    let store = f.stores[0];
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM sales.monthly_sales WHERE store_id = $1 AND year = 2024 AND month IN (1, 2)
         ORDER BY month",
    )
    .bind(store)
    .fetch_all(&f.db.pool)
    .await
    .unwrap();
    let mut writer = f.db.pool.begin().await.unwrap();
    // The delete starts waiting first, so its deadlock check runs first and
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
    let lock = |id: i64| {
        sqlx::query("SELECT 1 FROM sales.monthly_sales WHERE id = $1 FOR UPDATE").bind(id)
    };
    lock(ids[1]).execute(&mut *writer).await.unwrap();
    let delete = {
        let admin = f.admin.clone();
        let ids = ids.clone();
        tokio::spawn(async move {
            admin
                .send_json(
                    Method::DELETE,
                    "/api/v2/sales/batch",
                    &json!({ "ids": ids }),
                )
                .await
        })
    };
    sales_e2e::eventually(
        std::time::Duration::from_secs(30),
        "the delete to wait for February's row",
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            )
            .bind(writer_pid)
            .fetch_one(&f.db.pool)
            .await
            .unwrap();
            (waiting > 0).then_some(())
        },
    )
    .await;
    // January's row is the delete's: asking for it closes the circle.
    lock(ids[0])
        .execute(&mut *writer)
        .await
        .expect("January's row, once the delete lost the deadlock");
    writer.commit().await.unwrap();
    let (st, body) = delete.await.unwrap();
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["deleted"], 2, "{body}");
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sales.monthly_sales WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_one(&f.db.pool)
            .await
            .unwrap();
    assert_eq!(left, 0);
}

/// `If-Match` on a batch is evaluated, not ignored: a batch endpoint has no
/// representation to match, so the condition is false (RFC 9110) and the
/// answer is 412 with nothing written or deleted.
#[tokio::test]
async fn if_match_on_a_batch_writes_nothing() {
    let f = fixture(&[]).await;
    seed_months(&f).await;
    let store = f.stores[0];
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM sales.monthly_sales")
            .fetch_one(&f.db.pool)
            .await
            .unwrap()
    };
    let before = count().await;
    let r = f
        .admin
        .req(Method::POST, "/api/v2/sales/batch")
        .header("if-match", "\"nope\"")
        .json(&json!({"salesDataArray": [month(store, 2025, 1, 28, 5.0)]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 412);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "precondition_failed", "{body}");
    assert_eq!(body["error"]["details"]["header"], "If-Match", "{body}");
    let r = f
        .admin
        .req(Method::DELETE, "/api/v2/sales/batch")
        .header("if-match", "*")
        .json(&json!({"keys": [{"storeId": store, "year": 2024, "month": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 412);
    assert_eq!(count().await, before, "nothing written or deleted");
}

/// A number a double cannot hold (`1e309`) in one record of a batch is
/// that record's error, naming its field, not a 400 for the whole request:
/// the other records of an `atomic: false` batch are written.
#[tokio::test]
async fn a_number_past_the_double_range_is_its_records_error() {
    let f = fixture(&[]).await;
    let s = f.stores[0];
    let (st, body) = f
        .admin
        .post(
            "/api/v2/sales/batch",
            &json!({"atomic": false, "salesDataArray": []}),
        )
        .await;
    assert_eq!(st, 400, "an empty batch: {body}");
    let text = format!(
        r#"{{"atomic": false, "salesDataArray": [
            {{"storeId": {s}, "year": 2024, "month": 1, "dailyData": {{"1": {{"sales": 5, "customers": 1}}}}}},
            {{"storeId": {s}, "year": 2024, "month": 2, "dailyData": {{"1": {{"sales": 1e309, "customers": 1}}}}}},
            {{"storeId": {s}, "year": 2024, "month": 3, "dailyData": {{"1": {{"sales": 1, "customers": -1e400}}}}}},
            {{"storeId": {s}, "year": 2024, "month": 4, "note": 1e400, "dailyData": {{"1": {{"sales": 1}}}}}}
        ]}}"#
    );
    let r = f
        .admin
        .req(Method::POST, "/api/v2/sales/batch")
        .header("content-type", "application/json")
        .body(text.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["inserted"].as_i64(), body["failed"].as_i64()),
        (Some(1), Some(3)),
        "{body}"
    );
    let fields: Vec<(i64, String)> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["index"].as_i64().unwrap(),
                e["field"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        fields,
        [
            (1, "dailyData.1.sales".to_string()),
            (2, "dailyData.1.customers".to_string()),
            (3, "note".to_string())
        ],
        "{body}"
    );
    assert!(
        body["errors"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("out of range"),
        "{body}"
    );
    // Atomic: nothing written, the same report in the 422.
    let r = f
        .admin
        .req(Method::POST, "/api/v2/sales/batch")
        .header("content-type", "application/json")
        .body(
            text.replace(r#""atomic": false"#, r#""atomic": true"#)
                .replace("\"month\": 1,", "\"month\": 5,"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.monthly_sales")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(n, 1, "only the first batch's good record");
}

/// A list parameter given names something in every place: `fields=` (a
/// client's unset variable) is not the whole document, `id,,year` not the
/// two names, `storeId=1,` not store 1 alone; each is a 400 naming the
/// parameter, on the list, one record, stores and exports alike. The bound
/// on the paths of both lists names no single path.
#[tokio::test]
async fn lists_name_something_in_every_place() {
    let f = fixture(&[]).await;
    seed_months(&f).await;
    let s = f.stores[0];
    let id: i64 = sqlx::query_scalar("SELECT min(id) FROM sales.monthly_sales")
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    for (path, param, why) in [
        (
            format!("/api/v2/sales?storeId={s}&fields="),
            "fields",
            "at least one",
        ),
        (
            format!("/api/v2/sales?storeId={s}&fields=,"),
            "fields",
            "at least one",
        ),
        (
            format!("/api/v2/sales?storeId={s}&fields=id,,year"),
            "fields",
            "empty name",
        ),
        (
            format!("/api/v2/sales?storeId={s}&exclude=dailyData,"),
            "exclude",
            "empty name",
        ),
        (
            format!("/api/v2/sales/{id}?fields="),
            "fields",
            "at least one",
        ),
        (
            format!("/api/v2/stores/{s}?fields=code,,name"),
            "fields",
            "empty name",
        ),
        (
            format!("/api/v2/sales?storeId={s},"),
            "storeId",
            "empty item",
        ),
        (
            format!("/api/v2/sales?storeId=,{s}"),
            "storeId",
            "empty item",
        ),
        (
            format!("/api/v2/sales/export?storeId={s},,{s}"),
            "storeId",
            "empty item",
        ),
        (
            format!("/api/v2/sales/export?storeId={s}&format=json&fields=storeId,"),
            "fields",
            "empty name",
        ),
    ] {
        let (st, body) = f.admin.get(&path).await;
        assert_eq!(st, 400, "{path}: {body}");
        assert_eq!(
            body["error"]["details"]["parameter"], param,
            "{path}: {body}"
        );
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(why), "{path}: {body}");
    }
    let many = (1..=201)
        .map(|d| format!("dailyData.{}", d % 31 + 1))
        .collect::<Vec<_>>();
    let (st, body) = f
        .admin
        .get(&format!(
            "/api/v2/sales?storeId={s}&fields={}",
            many.join(",")
        ))
        .await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(body["error"]["details"]["parameter"], "fields", "{body}");
    assert!(body["error"]["details"].get("field").is_none(), "{body}");
}

/// A store outside the caller's scope refuses the whole batch (403, nothing
/// written) however a refused record names it: as a string beside a
/// number past the double range, in a key given twice, in a second
/// spelling of the key, as `404.0`; and in a delete key's second spelling.
#[tokio::test]
async fn a_store_outside_the_scope_refuses_the_batch_however_it_is_named() {
    let f = fixture(&[]).await;
    let (mine, other) = (f.stores[0], f.stores[1]);
    let (_, staff) = user_token(&f.db, &f.server, "scoped@example.com", "staff", &[mine]).await;
    let staff = Api::new(&f.server, Some(&staff));
    let good = format!(
        r#"{{"storeId": {mine}, "year": 2024, "month": 1, "dailyData": {{"1": {{"sales": 1}}}}}}"#
    );
    for bad in [
        format!(
            r#"{{"storeId": "{other}", "year": 2024, "month": 1, "dailyData": {{"1": {{"sales": 1e400}}}}}}"#
        ),
        format!(
            r#"{{"storeId": {other}, "storeId": {mine}, "year": 2024, "month": 2, "dailyData": {{}}}}"#
        ),
        format!(
            r#"{{"storeId": {mine}, "store_id": {other}, "year": 2024, "month": 3, "dailyData": {{}}}}"#
        ),
        format!(r#"{{"storeId": {other}.0, "year": 2024, "month": 4, "dailyData": {{}}}}"#),
        format!(
            r#"{{"storeId": {other}, "\ud800": 1, "year": 2024, "month": 5, "dailyData": {{}}}}"#
        ),
    ] {
        let body = format!(r#"{{"atomic": false, "salesDataArray": [{good}, {bad}]}}"#);
        let (st, doc) = staff
            .send_text(Method::POST, "/api/v2/sales/batch", &body)
            .await;
        assert_eq!(st, 403, "{bad}: {doc}");
        assert_eq!(
            doc["error"]["details"]["storeIds"],
            json!([other]),
            "{bad}: {doc}"
        );
    }
    let (_, page) = f
        .admin
        .get(&format!("/api/v2/sales?storeId={mine},{other}&limit=1"))
        .await;
    assert_eq!(page["data"], json!([]), "nothing written: {page}");
    let (st, body) = staff
        .send_json(
            Method::DELETE,
            "/api/v2/sales/batch",
            &json!({"atomic": false, "keys": [{"storeId": mine, "store_id": other, "year": 2024, "month": 1}]}),
        )
        .await;
    assert_eq!(st, 403, "{body}");
    assert_eq!(
        body["error"]["details"]["storeIds"],
        json!([other]),
        "{body}"
    );
    // A delete key naming the other store as no id reads it (`3.0`,
    // `"3.0"`, `3e0`) refuses the whole request too: it was that key's own
    // error, and the caller's own row beside it was deleted.
    let (st, body) = f
        .admin
        .send_text(
            Method::POST,
            "/api/v2/sales/batch",
            &format!(r#"{{"salesDataArray": [{good}]}}"#),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    for named in [
        format!("{other}.0"),
        format!("\"{other}.0\""),
        format!("{other}e0"),
    ] {
        let body = format!(
            r#"{{"atomic": false, "keys": [{{"storeId": {mine}, "year": 2024, "month": 1}}, {{"storeId": {named}, "year": 2024, "month": 1}}]}}"#
        );
        let (st, doc) = staff
            .send_text(Method::DELETE, "/api/v2/sales/batch", &body)
            .await;
        assert_eq!(st, 403, "{named}: {doc}");
        assert_eq!(
            doc["error"]["details"]["storeIds"],
            json!([other]),
            "{named}: {doc}"
        );
        let (_, page) = f
            .admin
            .get(&format!("/api/v2/sales?storeId={mine}&year=2024&month=1"))
            .await;
        assert_eq!(
            page["data"].as_array().unwrap().len(),
            1,
            "{named}: deleted: {page}"
        );
    }
}

/// A record the body's parser took but the record reader cannot (a lone
/// surrogate escape) is that record's error: the other records of an
/// `"atomic": false` batch are written (the whole batch was a 400 giving a
/// position counted from the record's own start).
#[tokio::test]
async fn a_record_with_a_lone_surrogate_is_its_own_error() {
    let f = fixture(&[]).await;
    let s = f.stores[0];
    let body = format!(
        r#"{{"atomic": false, "salesDataArray": [
            {{"storeId": {s}, "year": 2024, "month": 10, "dailyData": {{"1": {{"sales": 1}}}}}},
            {{"storeId": {s}, "year": 2024, "month": 11, "\ud800": 1}}]}}"#
    );
    let (st, doc) = f
        .admin
        .send_text(Method::POST, "/api/v2/sales/batch", &body)
        .await;
    assert_eq!(st, 200, "{doc}");
    assert_eq!(doc["inserted"], 1, "{doc}");
    assert_eq!(doc["failed"], 1, "{doc}");
    assert_eq!(doc["errors"][0]["index"], 1, "{doc}");
    let reason = doc["errors"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("lone surrogate"), "{doc}");
    assert!(!reason.contains("column"), "{doc}");
}

/// A delete key holding a number a double cannot hold is that key's
/// error: the other items of an `"atomic": false` delete go (the whole
/// request was a 400 saying the JSON was not valid); a key naming a store
/// outside the scope beside such a number still refuses the request.
#[tokio::test]
async fn a_delete_key_past_the_double_range_is_its_own_error() {
    let f = fixture(&[]).await;
    seed_months(&f).await;
    let (s, other) = (f.stores[0], f.stores[1]);
    let body = format!(
        r#"{{"atomic": false, "keys": [{{"storeId": {s}, "year": 1e400, "month": 1}}, {{"storeId": {s}, "year": 2024, "month": 2}}]}}"#
    );
    let (st, doc) = f
        .admin
        .send_text(Method::DELETE, "/api/v2/sales/batch", &body)
        .await;
    assert_eq!(st, 200, "{doc}");
    assert_eq!(doc["deleted"], 1, "{doc}");
    assert_eq!(doc["failed"], 1, "{doc}");
    assert_eq!(doc["total"], 2, "{doc}");
    assert_eq!(doc["errors"][0]["index"], 0, "{doc}");
    assert_eq!(doc["errors"][0]["field"], "keys[0].year", "{doc}");
    assert_eq!(
        doc["errors"][0]["reason"], "number out of range (beyond ±1.8e308)",
        "{doc}"
    );
    let (_, page) = f
        .admin
        .get(&format!("/api/v2/sales?storeId={s}&year=2024&month=2"))
        .await;
    assert_eq!(page["data"], json!([]), "{page}");

    let (_, staff) = user_token(&f.db, &f.server, "deleter@example.com", "staff", &[s]).await;
    let staff = Api::new(&f.server, Some(&staff));
    let body = format!(
        r#"{{"atomic": false, "keys": [{{"storeId": {other}, "year": 1e400, "month": 1}}, {{"storeId": {s}, "year": 2024, "month": 3}}]}}"#
    );
    let (st, doc) = staff
        .send_text(Method::DELETE, "/api/v2/sales/batch", &body)
        .await;
    assert_eq!(st, 403, "{doc}");
    assert_eq!(doc["error"]["details"]["storeIds"], json!([other]), "{doc}");
}

/// A batch delete naming one row twice (its id twice, or its id and its
/// key) deletes it once and counts the repeats in `duplicates`, so that
/// deleted, failed and duplicates add up to total.
#[tokio::test]
async fn a_delete_naming_a_row_twice_counts_the_repeat() {
    let f = fixture(&[]).await;
    seed_months(&f).await;
    let s = f.stores[0];
    let id: i64 = sqlx::query_scalar(
        "SELECT id FROM sales.monthly_sales WHERE store_id = $1 AND year = 2024 AND month = 1",
    )
    .bind(s)
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    let (st, doc) = f
        .admin
        .send_json(
            Method::DELETE,
            "/api/v2/sales/batch",
            &json!({"ids": [id, id], "keys": [{"storeId": s, "year": 2024, "month": 1}, {"storeId": s, "year": 2024, "month": 2}]}),
        )
        .await;
    assert_eq!(st, 200, "{doc}");
    assert_eq!(doc["total"], 4, "{doc}");
    assert_eq!(doc["deleted"], 2, "{doc}");
    assert_eq!(doc["failed"], 0, "{doc}");
    assert_eq!(doc["duplicates"], 2, "{doc}");
}
