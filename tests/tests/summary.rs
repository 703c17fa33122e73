//! Summaries: every grouping and metric checked against the same figures
//! computed independently in SQL (a date series probing each day of the
//! JSON), comparisons with the previous year across a leap day and with the
//! previous period, top N, scope, caching and invalidation, bad input,
//! `sales.summary` in SQL answering what the API answers, every metric
//! answering alike whatever else is asked (over months with no days and days
//! with customers only), and answers agreeing with the OpenAPI schema.

use sales_e2e::{eventually, user_token, Api, Fixture};
use serde_json::{json, Value};
use std::time::Duration;

/// Three stores (North, South, East), each with every day of Jan..Mar of
/// 2023 and 2024 (so 29 February 2024), written in SQL.
async fn fixture() -> Fixture {
    fixture_with(&[]).await
}

async fn fixture_with(overrides: &[(&str, &str)]) -> Fixture {
    let f = Fixture::start(3, overrides).await;
    sqlx::query(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         SELECT s.id, y, mo, (SELECT jsonb_object_agg(extract(day FROM d)::int,
                    jsonb_build_object('sales', (s.id % 7) * 100 + mo * 10 + extract(day FROM d) + (y - 2023) * 5,
                                       'customers', 1 + (extract(day FROM d)::int + s.id::int) % 9,
                                       'transactions', 2 + extract(day FROM d)::int % 4))
                 FROM generate_series(make_date(y, mo, 1), make_date(y, mo, 1) + interval '1 month' - interval '1 day',
                                      interval '1 day') d)
         FROM sales.stores s, generate_series(2023, 2024) y, generate_series(1, 3) mo",
    )
    .execute(&f.db.pool)
    .await
    .unwrap();
    f
}

/// Store-days as an independent SQL source: a date series over each
/// month, probing the JSON by day (not `jsonb_each`).
fn days(alias: &str) -> String {
    format!(
        "(SELECT m.store_id, st.region, st.code, d::date AS d,
            (m.daily_data -> extract(day FROM d)::int::text ->> 'sales')::numeric AS sales,
            (m.daily_data -> extract(day FROM d)::int::text ->> 'customers')::numeric AS customers,
            (m.daily_data -> extract(day FROM d)::int::text ->> 'transactions')::numeric AS transactions
         FROM sales.monthly_sales m JOIN sales.stores st ON st.id = m.store_id,
              generate_series(make_date(m.year, m.month, 1),
                              make_date(m.year, m.month, 1) + interval '1 month' - interval '1 day',
                              interval '1 day') d
         WHERE m.daily_data ? extract(day FROM d)::int::text) {alias}"
    )
}

async fn sql_rows(f: &Fixture, sql: &str) -> Vec<Value> {
    sqlx::query_scalar::<_, Value>(&format!(
        "SELECT coalesce(jsonb_agg(t), '[]') FROM ({sql}) t"
    ))
    .fetch_one(&f.db.pool)
    .await
    .unwrap_or_else(|e| panic!("{sql}: {e}"))
    .as_array()
    .unwrap()
    .clone()
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// Compares rows member by member (numbers within 1e-6).
fn same(api: &[Value], sql: &[Value], members: &[&str]) {
    assert_eq!(api.len(), sql.len(), "rows: api {api:?}\nsql {sql:?}");
    for (a, s) in api.iter().zip(sql) {
        for m in members {
            match (num(&a[m]), num(&s[m])) {
                (Some(x), Some(y)) => assert!((x - y).abs() < 1e-6, "{m}: {a} vs {s}"),
                _ => assert_eq!(a[m], s[m], "{m}: {a} vs {s}"),
            }
        }
    }
}

async fn get(api: &Api, q: &str) -> Value {
    let (st, body) = api.get(&format!("/api/v2/sales/summary?{q}")).await;
    assert_eq!(st, 200, "{q}: {body}");
    body
}

#[tokio::test]
async fn groupings_and_metrics_match_sql() {
    let f = fixture().await;
    // Region x month, day-level metrics.
    let body = get(
        &f.admin,
        "groupBy=region,month&metrics=sumSales,avgSales,minCustomers,maxTransactions,count,salesPerCustomer,sumTransactions&year=2024",
    )
    .await;
    let sql = sql_rows(
        &f,
        &format!(
            "SELECT region, to_char(d, 'YYYY-MM') AS month, sum(sales) AS \"sumSales\",
                    round(avg(sales), 4) AS \"avgSales\", min(customers) AS \"minCustomers\",
                    max(transactions) AS \"maxTransactions\", count(*) AS count,
                    round(sum(sales) / sum(customers), 4) AS \"salesPerCustomer\",
                    sum(transactions) AS \"sumTransactions\"
             FROM {x} WHERE extract(year FROM d) = 2024 GROUP BY 1, 2 ORDER BY 1, 2",
            x = days("x"),
        ),
    )
    .await;
    same(
        body["data"].as_array().unwrap(),
        &sql,
        &[
            "region",
            "month",
            "sumSales",
            "avgSales",
            "minCustomers",
            "maxTransactions",
            "count",
            "salesPerCustomer",
            "sumTransactions",
        ],
    );
    assert_eq!(body["data"][0]["key"], format!("East/2024-01"));
    assert_eq!(body["meta"]["groups"], 9);

    // ISO week x weekday, one store, a range.
    let s = f.stores[1];
    let body = get(
        &f.admin,
        &format!("groupBy=week,weekday&metrics=sumSales,count&storeId={s}&from=2024-02&to=2024-03"),
    )
    .await;
    let sql = sql_rows(
        &f,
        &format!(
            "SELECT to_char(d, 'IYYY-\"W\"IW') AS week, extract(isodow FROM d)::int AS weekday,
                    sum(sales) AS \"sumSales\", count(*) AS count
             FROM {x} WHERE store_id = {s} AND d BETWEEN '2024-02-01' AND '2024-03-31'
             GROUP BY 1, 2 ORDER BY 1, 2",
            x = days("x"),
        ),
    )
    .await;
    same(
        body["data"].as_array().unwrap(),
        &sql,
        &["week", "weekday", "sumSales", "count"],
    );

    // Year x quarter x store with the monthly totals (default metrics).
    let body = get(&f.admin, "groupBy=year,quarter,store").await;
    let sql = sql_rows(
        &f,
        &format!(
            "SELECT extract(year FROM d)::int AS year, to_char(d, 'YYYY-\"Q\"Q') AS quarter,
                    store_id AS \"storeId\", min(code) AS \"storeCode\", sum(sales) AS \"totalSales\",
                    sum(customers) AS \"totalCustomers\", count(DISTINCT date_trunc('month', d)) AS months,
                    1 AS stores
             FROM {x} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            x = days("x"),
        ),
    )
    .await;
    same(
        body["data"].as_array().unwrap(),
        &sql,
        &[
            "year",
            "quarter",
            "storeId",
            "storeCode",
            "totalSales",
            "totalCustomers",
            "months",
            "stores",
        ],
    );

    // Top 2 stores by sales in 2024, largest first.
    let body = get(
        &f.admin,
        "groupBy=store&metrics=sumSales&year=2024&top=2&orderBy=-sumSales",
    )
    .await;
    let sql = sql_rows(
        &f,
        &format!(
            "SELECT store_id AS \"storeId\", sum(sales) AS \"sumSales\" FROM {x}
             WHERE extract(year FROM d) = 2024 GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 2",
            x = days("x"),
        ),
    )
    .await;
    same(
        body["data"].as_array().unwrap(),
        &sql,
        &["storeId", "sumSales"],
    );
    assert_eq!(body["meta"]["groups"], 3);
    assert_eq!(body["meta"]["truncated"], true);

    // The filters of the list endpoint apply: a region and a minimum month total.
    let body = get(
        &f.admin,
        "groupBy=store&metrics=count&region=South&minTotalSales=1",
    )
    .await;
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(body["data"][0]["region"], Value::Null);
    assert_eq!(body["data"][0]["storeId"], f.stores[1]);

    // SQL: sales.summary answers the same rows.
    let q = "groupBy=region,month&metrics=sumSales,avgCustomers&compareTo=previousYear&from=2024-01&to=2024-03&orderBy=-sumSales";
    let body = get(&f.admin, q).await;
    let doc: Value = sqlx::query_scalar(
        "SELECT sales.summary(group_by => 'region,month', metrics => 'sumSales,avgCustomers',
                compare_to => 'previousYear', from_period => '2024-01', to_period => '2024-03',
                order_by => '-sumSales')",
    )
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(doc["rows"], body["data"]);
    assert_eq!(doc["groups"], 9);
}

#[tokio::test]
async fn year_over_year_across_a_leap_day_and_previous_period() {
    let f = fixture().await;
    let s = f.stores[0];
    let body = get(
        &f.admin,
        &format!(
            "groupBy=day&metrics=sumSales&storeId={s}&year=2024&month=2&compareTo=previousYear"
        ),
    )
    .await;
    let rows = body["data"].as_array().unwrap();
    assert_eq!(rows.len(), 29);
    assert_eq!(
        body["meta"]["comparedPeriod"],
        json!({"from": "2023-02", "to": "2023-02"})
    );
    assert_eq!(
        (&body["meta"]["year"], &body["meta"]["month"]),
        (&json!(2024), &json!(2))
    );
    // February of every year: the filters say so, and it is no one period.
    let every = get(
        &f.admin,
        &format!("groupBy=year&metrics=sumSales&storeId={s}&month=2"),
    )
    .await;
    assert_eq!(every["meta"]["month"], 2);
    assert!(
        every["meta"]["year"].is_null() && every["meta"]["period"].is_null(),
        "{every}"
    );
    let years: Vec<&str> = every["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["year"].as_str().unwrap_or_default())
        .collect();
    assert!(years.len() >= 2, "{every}");
    let sql = sql_rows(
        &f,
        &format!(
            "SELECT to_char(c.d, 'YYYY-MM-DD') AS day, c.sales AS \"sumSales\", p.sales AS prev,
                    round((c.sales - p.sales) / p.sales * 100, 2) AS pct
             FROM {c} LEFT JOIN {p} ON p.store_id = c.store_id AND p.d = c.d - interval '1 year'
                  AND extract(day FROM p.d) = extract(day FROM c.d)
             WHERE c.store_id = {s} AND c.d BETWEEN '2024-02-01' AND '2024-02-29' ORDER BY 1",
            c = days("c"),
            p = days("p"),
        ),
    )
    .await;
    assert_eq!(sql.len(), 29);
    for (a, e) in rows.iter().zip(&sql) {
        assert_eq!(a["day"], e["day"]);
        assert_eq!(num(&a["sumSales"]), num(&e["sumSales"]), "{a}");
        assert_eq!(num(&a["previous"]["sumSales"]), num(&e["prev"]), "{a}");
        assert_eq!(num(&a["changePct"]["sumSales"]), num(&e["pct"]), "{a}");
    }
    // 29 February has no day a year before: nothing to compare with.
    let leap = &rows[28];
    assert_eq!(leap["day"], "2024-02-29");
    assert!(leap["previous"]["sumSales"].is_null(), "{leap}");
    assert!(leap["changePct"]["sumSales"].is_null(), "{leap}");
    // By month the leap day counts in February 2024, against a 28-day February 2023.
    let body = get(
        &f.admin,
        &format!("groupBy=month&metrics=count,sumSales&storeId={s}&year=2024&compareTo=previousYear&from=2024-01&to=2024-03"),
    )
    .await;
    let feb = &body["data"][1];
    assert_eq!(feb["month"], "2024-02");
    assert_eq!(
        (feb["count"].clone(), feb["previous"]["count"].clone()),
        (json!(29), json!(28))
    );
    assert_eq!(
        body["meta"]["period"],
        json!({"from": "2024-01", "to": "2024-03"})
    );

    // The previous period: Feb..Mar 2024 against Dec 2023..Jan 2024 (only January has data).
    let body = get(
        &f.admin,
        "groupBy=store&metrics=sumSales&from=2024-02&to=2024-03&compareTo=previousPeriod&orderBy=store",
    )
    .await;
    assert_eq!(
        body["meta"]["comparedPeriod"],
        json!({"from": "2023-12", "to": "2024-01"})
    );
    let sql = sql_rows(
        &f,
        &format!(
            "SELECT store_id AS \"storeId\",
                    sum(sales) FILTER (WHERE d >= '2024-02-01') AS cur,
                    sum(sales) FILTER (WHERE d < '2024-02-01') AS prev
             FROM {x} WHERE d BETWEEN '2023-12-01' AND '2024-03-31' GROUP BY 1 ORDER BY 1",
            x = days("x"),
        ),
    )
    .await;
    for (a, e) in body["data"].as_array().unwrap().iter().zip(&sql) {
        assert_eq!(a["storeId"], e["storeId"]);
        assert_eq!(num(&a["sumSales"]), num(&e["cur"]));
        assert_eq!(num(&a["previous"]["sumSales"]), num(&e["prev"]));
    }
    // Ordered by the change.
    let body = get(
        &f.admin,
        "groupBy=store&metrics=sumSales&year=2024&compareTo=previousYear&orderBy=-sumSalesChangePct&top=1",
    )
    .await;
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn bad_input_scope_and_cache() {
    let f = fixture().await;
    for (q, param) in [
        ("groupBy=colour", "groupBy"),
        ("groupBy=", "groupBy"),
        ("groupBy=store,store", "groupBy"),
        ("metrics=median", "metrics"),
        // A name is its camelCase or its snake_case spelling, exactly.
        ("metrics=total__sales", "metrics"),
        ("metrics=_total_sales", "metrics"),
        ("metrics=sumSales&orderBy=sum_Sales_", "orderBy"),
        ("compareTo=previous__year&year=2024", "compareTo"),
        ("from=2024-05&to=2024-04", "from"),
        ("year=2023&from=2024-01", "year"),
        ("top=1001", "top"),
        ("top=0", "top"),
        ("compareTo=previousYear", "compareTo"),
        ("compareTo=lastWeek&year=2024", "compareTo"),
        (
            "compareTo=previousYear&month=2&from=2024-01&to=2024-03",
            "month",
        ),
        ("orderBy=sumSales", "orderBy"),
        ("orderBy=month", "orderBy"),
        // A list names something in every place; a given order, a key
        // (both were read as the names around the gap, or as no order).
        ("groupBy=store,,region", "groupBy"),
        ("groupBy=store,", "groupBy"),
        ("metrics=sumSales,,avgSales", "metrics"),
        ("orderBy=", "orderBy"),
    ] {
        let (st, body) = f.admin.get(&format!("/api/v2/sales/summary?{q}")).await;
        assert_eq!(st, 400, "{q}: {body}");
        assert_eq!(body["error"]["details"]["parameter"], param, "{q}: {body}");
    }
    for q in [
        "metrics=total_sales",
        "metrics=sum_sales&orderBy=-sum_sales&year=2024&compareTo=previous_year",
    ] {
        let (st, body) = f.admin.get(&format!("/api/v2/sales/summary?{q}")).await;
        assert_eq!(st, 200, "{q}: {body}");
    }
    let e = sqlx::query("SELECT sales.summary(group_by => 'colour')")
        .execute(&f.db.pool)
        .await
        .unwrap_err();
    assert_eq!(sales_e2e::sqlstate(&e).as_deref(), Some("22023"));
    assert!(e.to_string().contains("group_by"), "{e}");

    // A manager sees their store only.
    let (_, token) = user_token(&f.db, &f.server, "m@example.com", "manager", &[f.stores[2]]).await;
    let manager = Api::new(&f.server, Some(&token));
    let body = get(&manager, "groupBy=region&metrics=stores").await;
    assert_eq!(
        body["data"],
        json!([{"key": "East", "region": "East", "stores": 1}])
    );
    let (st, _) = manager
        .get(&format!("/api/v2/sales/summary?storeId={}", f.stores[0]))
        .await;
    assert_eq!(st, 403);

    // Cached, and a write to a covered store invalidates it.
    let path = "/api/v2/sales/summary?groupBy=region&metrics=sumSales&year=2024";
    sales_e2e::warm(&f.admin, path).await;
    let before = get(&f.admin, "groupBy=region&metrics=sumSales&year=2024").await;
    let (st, body) = f
        .admin
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [{"storeId": f.stores[2], "year": 2024, "month": 1,
                    "dailyData": {"1": {"sales": 100000, "customers": 1}}}]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let east = |b: &Value| {
        b["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["region"] == "East")
            .and_then(|r| r["sumSales"].as_f64())
            .unwrap()
    };
    let old = east(&before);
    eventually(Duration::from_secs(10), "the summary to change", || async {
        let now = get(&f.admin, "groupBy=region&metrics=sumSales&year=2024").await;
        (east(&now) > old).then_some(())
    })
    .await;
}

/// A year-over-year comparison by weekday compares Monday with Monday (the
/// same date a year earlier falls on another weekday), and by week the same
/// ISO week number of the year before.
#[tokio::test]
async fn year_over_year_by_weekday_and_week_compares_like_with_like() {
    let f = fixture().await;
    let s = f.stores[0];
    let body = get(
        &f.admin,
        &format!(
            "groupBy=weekday&metrics=sumSales&storeId={s}&year=2024&month=3&compareTo=previousYear"
        ),
    )
    .await;
    let sql = sql_rows(
        &f,
        &format!(
            "SELECT cur.weekday, cur.\"sumSales\", prev.sales AS prev FROM
               (SELECT extract(isodow FROM c.d)::int AS weekday, sum(c.sales) AS \"sumSales\"
                FROM {c} WHERE c.store_id = {s} AND c.d BETWEEN '2024-03-01' AND '2024-03-31'
                GROUP BY 1) cur
             LEFT JOIN
               (SELECT extract(isodow FROM p.d)::int AS weekday, sum(p.sales) AS sales
                FROM {p} WHERE p.store_id = {s} AND p.d BETWEEN '2023-03-01' AND '2023-03-31'
                GROUP BY 1) prev USING (weekday)
             ORDER BY 1",
            c = days("c"),
            p = days("p"),
        ),
    )
    .await;
    let mut rows = body["data"].as_array().unwrap().clone();
    rows.sort_by_key(|r| r["weekday"].as_i64());
    assert_eq!(rows.len(), 7, "{body}");
    for (a, e) in rows.iter().zip(&sql) {
        assert_eq!(a["weekday"], e["weekday"]);
        assert_eq!(num(&a["sumSales"]), num(&e["sumSales"]), "{a}");
        assert_eq!(num(&a["previous"]["sumSales"]), num(&e["prev"]), "{a}");
    }

    let body = get(
        &f.admin,
        &format!("groupBy=week&metrics=sumSales&storeId={s}&from=2024-01&to=2024-03&compareTo=previousYear"),
    )
    .await;
    let sql = sql_rows(
        &f,
        &format!(
            "SELECT cur.week, cur.\"sumSales\", prev.sales AS prev FROM
               (SELECT to_char(c.d, 'IYYY-\"W\"IW') AS week, sum(c.sales) AS \"sumSales\"
                FROM {c} WHERE c.store_id = {s} AND c.d BETWEEN '2024-01-01' AND '2024-03-31'
                GROUP BY 1) cur
             LEFT JOIN
               (SELECT (extract(isoyear FROM p.d)::int + 1)::text || '-W' || to_char(p.d, 'IW') AS week,
                       sum(p.sales) AS sales
                FROM {p} WHERE p.store_id = {s} AND p.d BETWEEN '2023-01-01' AND '2023-03-31'
                GROUP BY 1) prev USING (week)
             ORDER BY 1",
            c = days("c"),
            p = days("p"),
        ),
    )
    .await;
    let mut rows = body["data"].as_array().unwrap().clone();
    rows.sort_by(|a, b| a["week"].as_str().cmp(&b["week"].as_str()));
    assert_eq!(rows.len(), sql.len(), "{body}");
    for (a, e) in rows.iter().zip(&sql) {
        assert_eq!(a["week"], e["week"]);
        assert_eq!(num(&a["sumSales"]), num(&e["sumSales"]), "{a}");
        assert_eq!(num(&a["previous"]["sumSales"]), num(&e["prev"]), "{a}");
    }
}

/// With `day` among the dimensions, a weekday or week beside it is the
/// day's own: each day meets the same day a year before, as by `day`
/// alone. (The compared side keyed its weekday and week on the date as
/// stored, so no key met and every comparison was lost, and compared
/// days came back as groups of their own with another day's weekday.)
#[tokio::test]
async fn a_day_with_its_weekday_or_week_compares_as_the_day_alone() {
    let f = fixture().await;
    let s = f.stores[0];
    let by_day = get(
        &f.admin,
        &format!(
            "groupBy=day&metrics=sumSales&storeId={s}&year=2024&month=3&compareTo=previousYear"
        ),
    )
    .await;
    let previous_of = |body: &Value| -> Vec<(String, Value)> {
        let mut v: Vec<(String, Value)> = body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["day"].as_str().unwrap().to_string(),
                    r["previous"]["sumSales"].clone(),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let expected = previous_of(&by_day);
    assert_eq!(expected.len(), 31, "{by_day}");
    assert!(expected.iter().all(|(_, p)| !p.is_null()), "{by_day}");
    for group_by in ["day,weekday", "weekday,day", "week,day", "day,week,weekday"] {
        let body = get(
            &f.admin,
            &format!(
                "groupBy={group_by}&metrics=sumSales&storeId={s}&year=2024&month=3&compareTo=previousYear"
            ),
        )
        .await;
        assert_eq!(previous_of(&body), expected, "{group_by}: {body}");
        for r in body["data"].as_array().unwrap() {
            let day =
                chrono::NaiveDate::parse_from_str(r["day"].as_str().unwrap(), "%Y-%m-%d").unwrap();
            if let Some(w) = r.get("weekday") {
                assert_eq!(
                    w.as_u64(),
                    Some(u64::from(
                        chrono::Datelike::weekday(&day).number_from_monday()
                    )),
                    "{group_by}: {r}"
                );
            }
            if let Some(w) = r.get("week") {
                let iso = chrono::Datelike::iso_week(&day);
                assert_eq!(
                    w.as_str(),
                    Some(format!("{}-W{:02}", iso.year(), iso.week()).as_str()),
                    "{group_by}: {r}"
                );
            }
        }
    }
}

/// Every metric, as the API names them.
const METRICS: &[&str] = &[
    "totalSales",
    "totalCustomers",
    "months",
    "stores",
    "count",
    "sumSales",
    "sumCustomers",
    "sumTransactions",
    "avgSales",
    "avgCustomers",
    "avgTransactions",
    "minSales",
    "minCustomers",
    "minTransactions",
    "maxSales",
    "maxCustomers",
    "maxTransactions",
    "salesPerCustomer",
];

/// The fixture, with many requests allowed, and April of 2024 written
/// through the API: the first store with one day of customers only, the
/// second with such a day and a full one, the third an empty month (also in
/// April 2023, so that it has something to compare with).
async fn sparse_fixture() -> Fixture {
    let f = fixture_with(&[("RATE_LIMIT_PER_MINUTE", "100000")]).await;
    let [a, b, c] = [f.stores[0], f.stores[1], f.stores[2]];
    let (st, body) = f
        .admin
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [
                {"storeId": a, "year": 2024, "month": 4, "dailyData": {"1": {"customers": 5}}},
                {"storeId": b, "year": 2024, "month": 4, "dailyData": {
                    "1": {"customers": 5},
                    "2": {"sales": 10.5, "customers": 2, "transactions": 1}}},
                {"storeId": c, "year": 2024, "month": 4, "dailyData": {}},
                {"storeId": c, "year": 2023, "month": 4, "dailyData": {}},
            ]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["failed"], 0, "{body}");
    f
}

fn row_of<'a>(body: &'a Value, member: &str, value: &Value) -> &'a Value {
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| &r[member] == value)
        .unwrap_or_else(|| panic!("no row with {member} = {value}: {body}"))
}

/// Each metric asked alone answers the groups and values it answers among
/// all the others: months with no days and days with customers only count
/// the same whether or not a day-level metric expands the days. Sums over
/// nothing are 0; averages, minima, maxima and ratios over nothing are null.
#[tokio::test]
async fn every_metric_answers_alike_alone_and_among_all() {
    let f = sparse_fixture().await;
    let [a, b, c] = [f.stores[0], f.stores[1], f.stores[2]];
    let all = METRICS.join(",");

    // The cases of the report: the empty month's store stays with maxSales.
    let q = "year=2024&month=4&metrics=months,totalSales";
    let few = get(&f.admin, q).await;
    let more = get(&f.admin, &format!("{q},maxSales")).await;
    assert_eq!(few["meta"]["groups"], 3, "{few}");
    assert_eq!(more["meta"]["groups"], 3, "{more}");
    let empty = row_of(&more, "storeId", &json!(c));
    assert_eq!(
        (
            &empty["months"],
            num(&empty["totalSales"]),
            &empty["maxSales"]
        ),
        (&json!(1), Some(0.0), &Value::Null),
        "{more}"
    );
    // A month whose only day has customers: totalSales 0 with a day-level metric too.
    let q = format!("storeId={a}&year=2024&month=4&metrics=totalSales,count");
    let body = get(&f.admin, &format!("{q},avgCustomers")).await;
    let r = &body["data"][0];
    assert_eq!(
        (num(&r["totalSales"]), &r["count"], num(&r["avgCustomers"])),
        (Some(0.0), &json!(1), Some(5.0)),
        "{body}"
    );

    // All metrics together, by store, for April 2024.
    let body = get(&f.admin, &format!("year=2024&month=4&metrics={all}")).await;
    let expect = [
        (
            a,
            json!({"totalSales": 0, "totalCustomers": 5, "months": 1, "stores": 1, "count": 1,
                   "sumSales": 0, "sumCustomers": 5, "sumTransactions": 0,
                   "avgSales": null, "avgCustomers": 5, "avgTransactions": null,
                   "minSales": null, "maxSales": null, "minCustomers": 5, "maxTransactions": null,
                   "salesPerCustomer": 0}),
        ),
        (
            b,
            json!({"totalSales": 10.5, "totalCustomers": 7, "months": 1, "count": 2,
                   "sumTransactions": 1, "avgSales": 10.5, "avgCustomers": 3.5,
                   "avgTransactions": 1, "minCustomers": 2, "maxCustomers": 5,
                   "salesPerCustomer": 1.5}),
        ),
        (
            c,
            json!({"totalSales": 0, "totalCustomers": 0, "months": 1, "stores": 1, "count": 0,
                   "sumSales": 0, "sumCustomers": 0, "sumTransactions": 0,
                   "avgSales": null, "avgCustomers": null, "avgTransactions": null,
                   "minSales": null, "minCustomers": null, "minTransactions": null,
                   "maxSales": null, "maxCustomers": null, "maxTransactions": null,
                   "salesPerCustomer": null}),
        ),
    ];
    for (store, want) in expect {
        let r = row_of(&body, "storeId", &json!(store));
        for (m, v) in want.as_object().unwrap() {
            assert_eq!(num(&r[m]), num(v), "store {store} {m}: {r}");
            assert_eq!(r[m].is_null(), v.is_null(), "store {store} {m}: {r}");
        }
    }

    // Every metric alone against all of them, by month-level and day-level
    // dimensions, with and without a comparison.
    for group in [
        "store",
        "region",
        "month",
        "year,quarter",
        "store,month",
        "day",
        "week,weekday",
    ] {
        for filter in [
            "year=2024",
            "from=2024-03&to=2024-04&compareTo=previousYear",
            "year=2024&month=4&compareTo=previousPeriod",
        ] {
            let q = |metrics: &str| format!("groupBy={group}&{filter}&metrics={metrics}");
            let together = get(&f.admin, &q(&all)).await;
            let rows = together["data"].as_array().unwrap();
            assert!(!rows.is_empty(), "{}: {together}", q(&all));
            for m in METRICS {
                let alone = get(&f.admin, &q(m)).await;
                assert_eq!(
                    alone["meta"]["groups"],
                    together["meta"]["groups"],
                    "{}",
                    q(m)
                );
                let one = alone["data"].as_array().unwrap();
                assert_eq!(one.len(), rows.len(), "{}: {alone}", q(m));
                for (x, y) in one.iter().zip(rows) {
                    assert_eq!(x["key"], y["key"], "{}", q(m));
                    for (label, x, y) in [
                        ("", &x[m], &y[m]),
                        ("previous.", &x["previous"][m], &y["previous"][m]),
                        ("changePct.", &x["changePct"][m], &y["changePct"][m]),
                    ] {
                        assert!(
                            x.is_null() == y.is_null()
                                && (x.is_null()
                                    || (num(x).unwrap() - num(y).unwrap()).abs() < 1e-6),
                            "{} ({label}{m}): alone {x}, among all {y}",
                            q(m)
                        );
                    }
                    assert_eq!(x["previous"].is_null(), y["previous"].is_null(), "{}", q(m));
                }
            }
        }
    }
}

/// Checks `v` against an OpenAPI 3.0 schema of `spec` (`$ref`, `allOf`,
/// `nullable`, `type`, `properties`, `required`, `items`): a member that the
/// schema does not describe, or one of another type, is a mismatch.
fn conforms(spec: &Value, schema: &Value, v: &Value, path: &str) -> Result<(), String> {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.trim_start_matches("#/components/schemas/");
        return conforms(spec, &spec["components"]["schemas"][name], v, path);
    }
    if v.is_null() {
        return if schema["nullable"] == true {
            Ok(())
        } else {
            Err(format!("{path} is null, not nullable in {schema}"))
        };
    }
    if let Some(parts) = schema["allOf"].as_array() {
        for p in parts {
            conforms(spec, p, v, path)?;
        }
    }
    let ok = match schema["type"].as_str() {
        None => true,
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("string") => v.is_string(),
        Some("boolean") => v.is_boolean(),
        Some("array") => {
            for (i, x) in v.as_array().into_iter().flatten().enumerate() {
                conforms(spec, &schema["items"], x, &format!("{path}[{i}]"))?;
            }
            v.is_array()
        }
        Some("object") => {
            let Some(o) = v.as_object() else {
                return Err(format!("{path} = {v} is not an object"));
            };
            for req in schema["required"].as_array().into_iter().flatten() {
                if !o.contains_key(req.as_str().unwrap()) {
                    return Err(format!("{path} lacks {req}"));
                }
            }
            for (k, x) in o {
                let p = &schema["properties"][k];
                if p.is_null() {
                    return Err(format!("{path}.{k} is not in the schema {schema}"));
                }
                conforms(spec, p, x, &format!("{path}.{k}"))?;
            }
            true
        }
        Some(t) => return Err(format!("{path}: unknown type {t}")),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{path} = {v} is not {}", schema["type"]))
    }
}

/// With `compareTo`, `previous` is null for a group that the compared
/// period does not have (and an object, zeros and nulls as for any group,
/// for one it has even when it holds no day), `changePct` is by metric, and
/// every answer agrees with the OpenAPI schema the server publishes.
#[tokio::test]
async fn comparisons_answer_what_the_openapi_schema_says() {
    let f = sparse_fixture().await;
    let [a, b, c] = [f.stores[0], f.stores[1], f.stores[2]];
    let (st, spec) = Api::new(&f.server, None).get("/openapi.json").await;
    assert_eq!(st, 200);
    let op = &spec["paths"]["/api/v2/sales/summary"]["get"];
    let page = &op["responses"]["200"]["content"]["application/json; charset=utf-8"]["schema"];
    assert!(page.is_object(), "{op}");
    let all = METRICS.join(",");

    // April 2024 against April 2023, where only the third store has a (dayless) month.
    let body = get(
        &f.admin,
        &format!("year=2024&month=4&compareTo=previousYear&metrics={all}"),
    )
    .await;
    conforms(&spec, page, &body, "body").unwrap();
    for s in [a, b] {
        let r = row_of(&body, "storeId", &json!(s));
        assert!(r["previous"].is_null(), "{r}");
        for m in METRICS {
            assert!(r["changePct"][m].is_null(), "{m}: {r}");
        }
    }
    let r = row_of(&body, "storeId", &json!(c));
    let (p, ch) = (&r["previous"], &r["changePct"]);
    assert_eq!(
        (
            &p["months"],
            num(&p["totalSales"]),
            &p["count"],
            &p["avgSales"]
        ),
        (&json!(1), Some(0.0), &json!(0), &Value::Null),
        "{r}"
    );
    assert_eq!(
        (num(&ch["months"]), &ch["totalSales"]),
        (Some(0.0), &Value::Null),
        "{r}"
    );

    // By month over March..April: March has its year before, April 2024
    // (three months) meets April 2023 (one): a change of 200% in months.
    for metrics in [all.as_str(), "count,months,stores,totalSales"] {
        let body = get(
            &f.admin,
            &format!(
                "groupBy=month&from=2024-03&to=2024-04&compareTo=previousYear&metrics={metrics}"
            ),
        )
        .await;
        conforms(&spec, page, &body, "body").unwrap();
        let apr = row_of(&body, "month", &json!("2024-04"));
        assert_eq!(num(&apr["changePct"]["months"]), Some(200.0), "{apr}");
        let mar = row_of(&body, "month", &json!("2024-03"));
        assert_eq!(mar["previous"]["count"], 93, "{mar}");
    }
    // A fractional change of a count (store-days), in the schema too.
    let body = get(
        &f.admin,
        "groupBy=region&from=2024-02&to=2024-04&compareTo=previousPeriod&metrics=count,months,stores",
    )
    .await;
    conforms(&spec, page, &body, "body").unwrap();
    assert!(
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| num(&r["changePct"]["count"]).is_some_and(|x| x.fract() != 0.0)),
        "{body}"
    );
}

/// `sales.summary` (the extension's copy of the same statement) answers
/// what the API answers over months with no days and customers-only days.
#[tokio::test]
async fn sales_summary_answers_the_api_over_sparse_months() {
    let f = sparse_fixture().await;
    let all = METRICS.join(",");
    let body = get(
        &f.admin,
        &format!(
            "groupBy=region,month&from=2024-03&to=2024-04&compareTo=previousYear&metrics={all}"
        ),
    )
    .await;
    let doc: Value = sqlx::query_scalar(&format!(
        "SELECT sales.summary(group_by => 'region,month', metrics => '{all}',
                compare_to => 'previousYear', from_period => '2024-03', to_period => '2024-04')"
    ))
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    // Differs when the installed extension predates the API's statement:
    // reinstall it (`cargo pgrx install`).
    assert_eq!(
        doc["rows"], body["data"],
        "sales.summary differs from the API (is the extension up to date?)"
    );
    assert_eq!(doc["groups"], 6);
}

/// A group only the compared period has (a store that sold a year ago and
/// not now) is in the answer, with the metrics of no rows (sums and counts
/// 0, averages null), its `previous`, and a change of -100%; `sales.summary`
/// answers the same.
#[tokio::test]
async fn a_group_only_the_compared_period_has_is_shown_at_minus_100() {
    let f = fixture().await;
    let gone = f.stores[1];
    sqlx::query("DELETE FROM sales.monthly_sales WHERE store_id = $1 AND year = 2024")
        .bind(gone)
        .execute(&f.db.pool)
        .await
        .unwrap();
    let q = "groupBy=store&metrics=sumSales,count,avgSales&year=2024&compareTo=previousYear&orderBy=sumSalesChangePct";
    let body = get(&f.admin, q).await;
    assert_eq!(body["meta"]["groups"], 3, "{body}");
    let rows = body["data"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{body}");
    let r = &rows[0];
    assert_eq!(r["storeId"], gone, "the -100% row sorts first: {body}");
    assert!(
        r["storeCode"].is_string() && r["storeName"].is_string(),
        "{r}"
    );
    assert_eq!(
        (num(&r["sumSales"]), &r["count"], &r["avgSales"]),
        (Some(0.0), &json!(0), &Value::Null),
        "{r}"
    );
    let prev: f64 = sqlx::query_scalar(
        "SELECT sum(total_sales)::float8 FROM sales.monthly_sales WHERE store_id = $1 AND year = 2023",
    )
    .bind(gone)
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(num(&r["previous"]["sumSales"]), Some(prev), "{r}");
    assert_eq!(r["previous"]["count"], 90, "{r}");
    assert_eq!(
        (
            num(&r["changePct"]["sumSales"]),
            num(&r["changePct"]["count"])
        ),
        (Some(-100.0), Some(-100.0)),
        "{r}"
    );
    assert!(r["changePct"]["avgSales"].is_null(), "{r}");
    for other in &rows[1..] {
        assert!(num(&other["sumSales"]).unwrap() > 0.0, "{other}");
    }
    // Without a comparison the store has no group.
    let body = get(&f.admin, "groupBy=store&metrics=sumSales&year=2024").await;
    assert_eq!(body["meta"]["groups"], 2, "{body}");

    // The extension's copy answers the same.
    let doc: Value = sqlx::query_scalar(
        "SELECT sales.summary(group_by => 'store', metrics => 'sumSales,count,avgSales',
                year => 2024, compare_to => 'previousYear', order_by => 'sumSalesChangePct')",
    )
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    let body = get(&f.admin, q).await;
    assert_eq!(
        (&doc["rows"], &doc["groups"]),
        (&body["data"], &json!(3)),
        "sales.summary differs from the API (is the extension up to date?)"
    );

    // This month and the next against the same months a year before, which
    // have sales and this year none: this month falls to 0 (-100%); the
    // next has not come yet and is no row.
    let (this, next): ((i32, u32), (i32, u32)) = sqlx::query_as::<_, (i32, i32, i32, i32)>(
        "SELECT extract(year FROM current_date)::int, extract(month FROM current_date)::int,
                extract(year FROM current_date + interval '1 month')::int,
                extract(month FROM current_date + interval '1 month')::int",
    )
    .fetch_one(&f.db.pool)
    .await
    .map(|(a, b, c, d)| ((a, b as u32), (c, d as u32)))
    .unwrap();
    sqlx::query("DELETE FROM sales.monthly_sales")
        .execute(&f.db.pool)
        .await
        .unwrap();
    for (y, m) in [this, next] {
        sqlx::query(
            "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
             VALUES ($1, $2, $3, '{\"1\": {\"sales\": 10}}')",
        )
        .bind(gone)
        .bind(y - 1)
        .bind(m as i32)
        .execute(&f.db.pool)
        .await
        .unwrap();
    }
    let q = format!(
        "groupBy=month&metrics=sumSales&from={}-{:02}&to={}-{:02}&compareTo=previousYear",
        this.0, this.1, next.0, next.1
    );
    let body = get(&f.admin, &q).await;
    let months: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["month"].as_str().unwrap())
        .collect();
    assert_eq!(months, vec![format!("{}-{:02}", this.0, this.1)], "{body}");
    assert_eq!(num(&body["data"][0]["changePct"]["sumSales"]), Some(-100.0));
}

/// A quotient is rounded once, from its exact value: 9,000,000,000,000.00036
/// in sales over 8 customers is 1,125,000,000,000.000045, so 4 places give
/// ….0000. Numeric division first rounded it to 5 places (….00005), and
/// rounding that again gave ….0001.
#[tokio::test]
async fn ratios_are_rounded_once() {
    let f = Fixture::start(1, &[]).await;
    let s = f.stores[0];
    sqlx::query(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         VALUES ($1, 2024, 5, '{\"1\": {\"sales\": 0.00036, \"customers\": 8}}'::jsonb
                 || (SELECT jsonb_object_agg(d, '{\"sales\": 1000000000000}'::jsonb)
                     FROM generate_series(2, 10) d))",
    )
    .bind(s)
    .execute(&f.db.pool)
    .await
    .unwrap();
    let r = f
        .admin
        .req(
            reqwest::Method::GET,
            &format!("/api/v2/sales/summary?storeId={s}&year=2024&month=5&groupBy=month&metrics=sumSales,salesPerCustomer,avgSales,avgCustomers"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(
        compact.contains("\"salesPerCustomer\":1125000000000.0000"),
        "{text}"
    );
    // 9,000,000,000,000.00036 / 10 days = 900,000,000,000.000036.
    assert!(compact.contains("\"avgSales\":900000000000.0000"), "{text}");
    assert!(compact.contains("\"avgCustomers\":8.0000"), "{text}");
}
