//! Streaming export end to end: `GET /api/v2/sales/export` against a real
//! server, its own database and real Redis. Every format and shape is parsed
//! back with a real parser and compared with what the database holds.

use reqwest::header::HeaderMap;
use sales_e2e::{eventually, user_token, Api, Fixture, TestDb};
use serde_json::{json, Map, Value};
use std::io::Read;
use std::time::Duration;

/// A store name that needs every kind of CSV quoting.
const AWKWARD_NAME: &str = "Acme, \"Best\" Store\nSecond line; 'single' \\ back";

async fn fixture(overrides: &[(&str, &str)]) -> Fixture {
    Fixture::start(4, overrides).await
}

/// Six months for each store, with gaps, days without customers and days
/// with transactions, fractional and whole sales; one awkward store name.
async fn seed(f: &Fixture) {
    seed_year(f, 2024, 6).await;
    sqlx::query("UPDATE sales.stores SET name = $1 WHERE id = $2")
        .bind(AWKWARD_NAME)
        .bind(f.stores[1])
        .execute(&f.db.pool)
        .await
        .expect("awkward name");
}

async fn seed_year(f: &Fixture, year: i32, months: i32) {
    sqlx::query(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         SELECT s, $2, mo, (
             SELECT jsonb_object_agg(d::text, CASE
                 WHEN d % 7 = 0 THEN jsonb_build_object('sales', d * 10 + s)
                 WHEN d % 5 = 0 THEN jsonb_build_object('sales', round(d * 1.25 + s, 2), 'customers', d, 'transactions', d + 1)
                 ELSE jsonb_build_object('sales', d * 100 + mo + 0.5, 'customers', d + s) END)
             FROM generate_series(1, 28) d WHERE d % 9 <> 0)
         FROM unnest($1::bigint[]) s, generate_series(1, $3) mo",
    )
    .bind(&f.stores)
    .bind(year)
    .bind(months)
    .execute(&f.db.pool)
    .await
    .expect("seed months");
}

struct Export {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Export {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("utf-8 body")
    }
}

async fn export(api: &Api, query: &str, accept_encoding: Option<&str>) -> Export {
    let mut req = api.req(
        reqwest::Method::GET,
        &format!("/api/v2/sales/export?{query}"),
    );
    if let Some(enc) = accept_encoding {
        req = req.header("accept-encoding", enc);
    }
    let r = tokio::time::timeout(Duration::from_secs(60), req.send())
        .await
        .expect("export answered in time")
        .expect("request");
    let status = r.status().as_u16();
    assert!(status < 500, "export?{query} answered {status}");
    let headers = r.headers().clone();
    let body = tokio::time::timeout(Duration::from_secs(120), r.bytes())
        .await
        .expect("export body in time")
        .expect("body")
        .to_vec();
    Export {
        status,
        headers,
        body,
    }
}

fn csv_records(body: &[u8]) -> (Vec<String>, Vec<Vec<String>>) {
    let mut rd = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(body);
    let header: Vec<String> = rd
        .headers()
        .expect("csv header")
        .iter()
        .map(str::to_string)
        .collect();
    let rows = rd
        .records()
        .map(|r| r.expect("csv record").iter().map(str::to_string).collect())
        .collect();
    (header, rows)
}

fn ndjson(body: &[u8]) -> Vec<Value> {
    std::str::from_utf8(body)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

/// A number as the CSV shows it, compared as a number.
fn num(s: &str) -> Option<f64> {
    if s.is_empty() {
        None
    } else {
        Some(s.parse().expect("a number"))
    }
}

fn jnum(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// Store-days as the database has them, in key order.
async fn db_days(f: &Fixture, store_filter: Option<&[i64]>) -> Vec<Value> {
    let ids: Option<Vec<i64>> = store_filter.map(|s| s.to_vec());
    sqlx::query_scalar(
        "SELECT jsonb_build_object('storeId', m.store_id, 'storeCode', s.code, 'storeName', s.name,
                'date', make_date(m.year, m.month, e.k::int)::text, 'day', e.v)
         FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id,
              jsonb_each(m.daily_data) e(k, v)
         WHERE $1::bigint[] IS NULL OR m.store_id = ANY($1)
         ORDER BY m.store_id, m.year, m.month, e.k::int",
    )
    .bind(ids)
    .fetch_all(&f.db.pool)
    .await
    .expect("db days")
}

/// Sales documents (as `GET /api/v2/sales` shows them) in key order.
async fn db_docs(f: &Fixture, store_filter: Option<&[i64]>) -> Vec<Value> {
    let ids: Option<Vec<i64>> = store_filter.map(|s| s.to_vec());
    sqlx::query_scalar(
        "SELECT sales.sales_doc(m) || jsonb_build_object('storeName', s.name, 'storeCode', s.code, 'region', s.region)
         FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id
         WHERE $1::bigint[] IS NULL OR m.store_id = ANY($1)
         ORDER BY m.store_id, m.year, m.month",
    )
    .bind(ids)
    .fetch_all(&f.db.pool)
    .await
    .expect("db docs")
}

fn day_key(d: &Value) -> String {
    format!("{}:{}", d["storeId"], d["date"].as_str().unwrap())
}

fn month_key(doc: &Value) -> String {
    format!(
        "{}:{}-{:02}",
        doc["storeId"],
        doc["year"],
        doc["month"].as_i64().unwrap()
    )
}

fn check_daily_objects(rows: &[Value], want: &[Value]) {
    assert_eq!(rows.len(), want.len());
    for (r, d) in rows.iter().zip(want) {
        let o = r.as_object().expect("row object");
        let keys: Vec<&str> = o.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "key",
                "storeId",
                "storeCode",
                "storeName",
                "date",
                "sales",
                "customers",
                "transactions"
            ]
        );
        assert_eq!(r["key"], json!(day_key(d)));
        assert_eq!(r["storeId"], d["storeId"]);
        assert_eq!(r["storeCode"], d["storeCode"]);
        assert_eq!(r["storeName"], d["storeName"]);
        assert_eq!(r["date"], d["date"]);
        for m in ["sales", "customers", "transactions"] {
            assert_eq!(jnum(&r[m]), jnum(&d["day"][m]), "{m} of {}", r["key"]);
        }
    }
}

#[tokio::test]
async fn every_format_and_shape_matches_the_database() {
    let f = fixture(&[]).await;
    seed(&f).await;
    let days = db_days(&f, None).await;
    let docs = db_docs(&f, None).await;
    assert_eq!(docs.len(), 24);
    assert!(days.len() > 500);

    // Daily CSV: RFC 4180 with CRLF, header, awkward names round-trip.
    let e = export(&f.admin, "format=csv&shape=daily", None).await;
    assert_eq!(e.status, 200, "{}", String::from_utf8_lossy(&e.body));
    assert_eq!(e.header("content-type"), "text/csv; charset=utf-8");
    assert_eq!(
        e.header("content-disposition"),
        "attachment; filename=\"sales-all-daily.csv\""
    );
    assert_eq!(e.header("cache-control"), "no-store");
    assert!(!e.header("x-export-id").is_empty());
    assert!(e.headers.get("etag").is_none());
    assert_eq!(e.header("x-export-estimated-rows"), days.len().to_string());
    assert!(e
        .text()
        .starts_with("key,store_id,store_code,store_name,date,sales,customers,transactions\r\n"));
    let (header, rows) = csv_records(&e.body);
    assert_eq!(
        header,
        [
            "key",
            "store_id",
            "store_code",
            "store_name",
            "date",
            "sales",
            "customers",
            "transactions"
        ]
    );
    assert_eq!(rows.len(), days.len());
    for (r, d) in rows.iter().zip(&days) {
        assert_eq!(r[0], day_key(d));
        assert_eq!(r[1], d["storeId"].to_string());
        assert_eq!(r[2], d["storeCode"].as_str().unwrap());
        assert_eq!(r[3], d["storeName"].as_str().unwrap());
        assert_eq!(r[4], d["date"].as_str().unwrap());
        for (i, m) in ["sales", "customers", "transactions"].iter().enumerate() {
            assert_eq!(num(&r[5 + i]), jnum(&d["day"][m]), "{m} of {}", r[0]);
        }
    }
    assert!(rows.iter().any(|r| r[3] == AWKWARD_NAME));
    assert!(e.text().contains("\"Acme, \"\"Best\"\" Store\nSecond line"));

    // Daily JSON (one array) and NDJSON (one object per line).
    let e = export(&f.admin, "format=json&shape=daily", None).await;
    assert_eq!(e.status, 200);
    assert_eq!(e.header("content-type"), "application/json");
    check_daily_objects(e.json().as_array().expect("one JSON array"), &days);
    let e = export(&f.admin, "format=ndjson&shape=daily", None).await;
    assert_eq!(e.status, 200);
    assert_eq!(e.header("content-type"), "application/x-ndjson");
    assert_eq!(
        e.header("content-disposition"),
        "attachment; filename=\"sales-all-daily.ndjson\""
    );
    check_daily_objects(&ndjson(&e.body), &days);

    // Monthly CSV: a row per store-month, three columns per day.
    let e = export(&f.admin, "format=csv&shape=monthly", None).await;
    assert_eq!(e.status, 200);
    let (header, rows) = csv_records(&e.body);
    assert_eq!(header.len(), 10 + 93);
    assert_eq!(
        header[..10],
        [
            "key",
            "store_id",
            "store_code",
            "store_name",
            "region",
            "year",
            "month",
            "total_sales",
            "total_customers",
            "days_reported"
        ]
    );
    assert_eq!(header[10], "d1_sales");
    assert_eq!(header[11], "d1_customers");
    assert_eq!(header[12], "d1_transactions");
    assert_eq!(header[102], "d31_transactions");
    assert_eq!(rows.len(), docs.len());
    for (r, d) in rows.iter().zip(&docs) {
        assert_eq!(r[0], month_key(d));
        assert_eq!(r[1], d["storeId"].to_string());
        assert_eq!(r[2], d["storeCode"].as_str().unwrap());
        assert_eq!(r[3], d["storeName"].as_str().unwrap());
        assert_eq!(r[4], d["region"].as_str().unwrap());
        assert_eq!(r[5], d["year"].to_string());
        assert_eq!(r[6], d["month"].to_string());
        assert_eq!(num(&r[7]), jnum(&d["totalSales"]));
        assert_eq!(num(&r[8]), jnum(&d["totalCustomers"]));
        assert_eq!(num(&r[9]), jnum(&d["daysReported"]));
        for day in 1..=31usize {
            let v = &d["dailyData"][day.to_string()];
            for (i, m) in ["sales", "customers", "transactions"].iter().enumerate() {
                assert_eq!(
                    num(&r[7 + 3 * day + i]),
                    jnum(&v[m]),
                    "d{day}_{m} of {}",
                    r[0]
                );
            }
        }
    }
    assert!(rows.iter().any(|r| r[3] == AWKWARD_NAME));

    // Monthly JSON / NDJSON: the sales documents plus `key`.
    for fmt in ["json", "ndjson"] {
        let e = export(&f.admin, &format!("format={fmt}&shape=monthly"), None).await;
        assert_eq!(e.status, 200);
        let rows = if fmt == "json" {
            e.json().as_array().expect("array").clone()
        } else {
            ndjson(&e.body)
        };
        assert_eq!(rows.len(), docs.len());
        for (r, d) in rows.iter().zip(&docs) {
            let mut want: Map<String, Value> = d.as_object().unwrap().clone();
            for k in ["storeName", "storeCode", "region"] {
                want.remove(k);
            }
            want.insert("key".into(), json!(month_key(d)));
            assert_eq!(r.as_object().unwrap().keys().next().unwrap(), "key");
            assert_eq!(r, &Value::Object(want), "{fmt}");
        }
    }

    // Projection (monthly JSON): only `key` and the asked-for paths.
    let e = export(
        &f.admin,
        "format=ndjson&shape=monthly&fields=storeId,total_sales,dailyData.2.sales,store.name",
        None,
    )
    .await;
    assert_eq!(e.status, 200);
    let rows = ndjson(&e.body);
    assert_eq!(rows.len(), docs.len());
    for (r, d) in rows.iter().zip(&docs) {
        let mut keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["dailyData", "key", "store", "storeId", "totalSales"]);
        assert_eq!(r["store"]["name"], d["storeName"]);
        assert_eq!(
            jnum(&r["dailyData"]["2"]["sales"]),
            jnum(&d["dailyData"]["2"]["sales"])
        );
    }
    // Everything excluded: the key stays.
    let e = export(
        &f.admin,
        "format=json&shape=monthly&exclude=id,storeId,year,month,dailyData,totalSales,totalCustomers,daysReported,version,createdAt,updatedAt",
        None,
    )
    .await;
    assert_eq!(e.status, 200);
    let rows = e.json();
    assert_eq!(rows[0], json!({"key": month_key(&docs[0])}));

    // Filters: one store, a period range; the file name says so.
    let s = f.stores[2];
    let e = export(
        &f.admin,
        &format!("format=csv&shape=daily&storeId={s}&from=2024-02&to=2024-03"),
        None,
    )
    .await;
    assert_eq!(e.status, 200);
    assert_eq!(
        e.header("content-disposition"),
        format!("attachment; filename=\"sales-store{s}-2024-02_2024-03-daily.csv\"")
    );
    // Every narrowing filter is in the name: a resumed part or a region's
    // export is not named like the whole.
    let part = export(
        &f.admin,
        &format!("format=csv&storeId={s}&region=North&year=2024&month=3&minTotalSales=10&after={s}:2024-01"),
        None,
    )
    .await;
    assert_eq!(part.status, 200, "{}", part.text());
    assert_eq!(
        part.header("content-disposition"),
        format!("attachment; filename=\"sales-store{s}-North-2024-03-min10-after-{s}_2024-01-monthly.csv\"")
    );
    let (_, rows) = csv_records(&e.body);
    let want: Vec<String> = db_days(&f, Some(&[s]))
        .await
        .iter()
        .filter(|d| {
            let date = d["date"].as_str().unwrap();
            ("2024-02".."2024-04").contains(&date)
        })
        .map(day_key)
        .collect();
    assert!(!want.is_empty());
    assert_eq!(rows.iter().map(|r| r[0].clone()).collect::<Vec<_>>(), want);
    let e = export(&f.admin, "format=json&shape=daily&minTotalSales=1e12", None).await;
    assert_eq!(e.status, 200);
    assert_eq!(e.text(), "[]\n");
    let e = export(&f.admin, "format=csv&shape=daily&year=2023", None).await;
    assert_eq!(
        e.text(),
        "key,store_id,store_code,store_name,date,sales,customers,transactions\r\n"
    );
    let e = export(&f.admin, "format=ndjson&shape=daily&year=2023", None).await;
    assert_eq!(e.text(), "");
}

/// Splits a full export at several keys, resumes after each, and checks
/// that the parts put together equal the full export.
#[tokio::test]
async fn resume_after_key_equals_one_full_export() {
    let f = fixture(&[]).await;
    seed(&f).await;
    for (fmt, shape) in [
        ("csv", "daily"),
        ("ndjson", "daily"),
        ("json", "daily"),
        ("csv", "monthly"),
        ("ndjson", "monthly"),
        ("json", "monthly"),
    ] {
        let base = format!("format={fmt}&shape={shape}");
        let full = export(&f.admin, &base, None).await;
        assert_eq!(full.status, 200);
        // (key, row as text) of every row.
        let rows_of = |e: &Export| -> Vec<(String, String)> {
            match fmt {
                "csv" => {
                    let (_, rows) = csv_records(&e.body);
                    rows.into_iter()
                        .map(|r| (r[0].clone(), r.join("\u{1}")))
                        .collect()
                }
                "ndjson" => ndjson(&e.body)
                    .into_iter()
                    .map(|v| (v["key"].as_str().unwrap().to_string(), v.to_string()))
                    .collect(),
                _ => e
                    .json()
                    .as_array()
                    .expect("array")
                    .iter()
                    .map(|v| (v["key"].as_str().unwrap().to_string(), v.to_string()))
                    .collect(),
            }
        };
        let all = rows_of(&full);
        let n = all.len();
        assert!(n > 20, "{base}");
        let keys: Vec<String> = all.iter().map(|r| r.0.clone()).collect();
        let mut sorted = keys.clone();
        // Key order: store id (as a number), then the date.
        sorted.sort_by_key(|k| {
            let (store, date) = k.split_once(':').unwrap();
            (store.parse::<i64>().unwrap(), date.to_string())
        });
        assert_eq!(sorted, keys, "rows come in key order ({base})");
        sorted.dedup();
        assert_eq!(sorted.len(), n, "keys are unique ({base})");
        // Cut points: a few rows in, a third, two thirds, the last row but one.
        let cuts = [2, n / 3, 2 * n / 3, n - 2];
        let mut joined: Vec<(String, String)> = all[..=cuts[0]].to_vec();
        for (i, &cut) in cuts.iter().enumerate() {
            let after = &all[cut].0;
            let part = export(&f.admin, &format!("{base}&after={after}"), None).await;
            assert_eq!(part.status, 200, "{}", part.text());
            let rows = rows_of(&part);
            let upto = cuts.get(i + 1).copied().unwrap_or(n - 1);
            assert_eq!(rows.len(), n - cut - 1, "{base} after {after}");
            assert_eq!(
                part.header("x-export-estimated-rows"),
                (n - cut - 1).to_string(),
                "{base} after {after}"
            );
            joined.extend_from_slice(&rows[..upto - cut]);
        }
        assert_eq!(joined, all, "{base}");
        // After the very last key: nothing.
        let last = keys.last().unwrap();
        let tail = export(&f.admin, &format!("{base}&after={last}"), None).await;
        assert_eq!(tail.status, 200);
        assert!(rows_of(&tail).is_empty(), "{base}");
    }
    // CSV without a header, for appending a resumed part to a file.
    let e = export(&f.admin, "format=csv&shape=daily&header=false", None).await;
    assert!(e
        .text()
        .starts_with(&format!("{}:2024-01-01,", f.stores[0])));
    // A key of the wrong shape is refused, naming the parameter.
    let e = export(&f.admin, "format=csv&shape=daily&after=1:2024-01", None).await;
    assert_eq!(e.status, 400);
    assert_eq!(e.json()["error"]["details"]["parameter"], "after");
    let e = export(&f.admin, "format=csv&shape=monthly&after=garbage", None).await;
    assert_eq!(e.status, 400);
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

#[tokio::test]
async fn compressed_exports_decode_to_the_same_content() {
    let f = fixture(&[("COMPRESSION_LEVEL", "3")]).await;
    seed(&f).await;
    for year in 2021..=2023 {
        seed_year(&f, year, 12).await;
    }
    for query in [
        "format=csv&shape=daily",
        "format=json&shape=monthly",
        "format=ndjson&shape=daily",
    ] {
        let plain = export(&f.admin, query, Some("identity")).await;
        assert_eq!(plain.status, 200);
        assert!(plain.headers.get("content-encoding").is_none());
        assert!(plain.body.len() > 64 * 1024, "several chunks ({query})");

        let z = export(&f.admin, query, Some("gzip, deflate, br, zstd")).await;
        assert_eq!(z.status, 200);
        assert_eq!(z.header("content-encoding"), "zstd");
        assert!(z.header("vary").contains("Accept-Encoding"));
        assert!(z.body.len() < plain.body.len() / 3, "{query}");
        assert_eq!(zstd::decode_all(&z.body[..]).expect("zstd"), plain.body);

        let g = export(&f.admin, query, Some("gzip")).await;
        assert_eq!(g.status, 200);
        assert_eq!(g.header("content-encoding"), "gzip");
        assert!(g.body.len() < plain.body.len() / 3, "{query}");
        assert_eq!(gunzip(&g.body), plain.body);

        // Brotli is not offered for streams: identity.
        let b = export(&f.admin, query, Some("br")).await;
        assert!(b.headers.get("content-encoding").is_none());
        assert_eq!(b.body, plain.body);
    }
}

#[tokio::test]
async fn progress_events_go_through_postgres() {
    let f = fixture(&[]).await;
    seed(&f).await;
    let mut listener = sqlx::postgres::PgListener::connect(&f.db.url)
        .await
        .expect("listener");
    listener.listen("sales_ephemeral").await.expect("listen");
    let e = export(&f.admin, "format=ndjson&shape=daily", None).await;
    assert_eq!(e.status, 200);
    let rows = ndjson(&e.body).len() as u64;
    let id = e.header("x-export-id").to_string();
    let mut events: Vec<Value> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let n = tokio::time::timeout_at(deadline, listener.recv())
            .await
            .expect("final progress event within 15 s")
            .expect("notification");
        // Sealed by the server (see `events::sealed`), and recent.
        let now = chrono::Utc::now().timestamp_millis();
        let json = sales_server::events::sealed::open(n.payload(), now).expect("a sealed payload");
        let v: Value = serde_json::from_str(json).expect("JSON payload");
        if v["data"]["exportId"] != json!(id) {
            continue;
        }
        let done = v["data"]["done"] == json!(true);
        events.push(v);
        if done {
            break;
        }
    }
    for v in &events {
        assert_eq!(v["userId"], json!(f.admin_id));
        assert_eq!(v["event"], "export-progress");
        assert_eq!(v["data"]["estimatedTotal"], json!(rows));
        assert!(v["data"]["percent"].as_f64().unwrap() <= 100.0);
    }
    let last = &events.last().unwrap()["data"];
    assert_eq!(last["status"], "completed");
    assert_eq!(last["rowsSent"], json!(rows));
    assert_eq!(last["percent"], json!(100.0));
    assert_eq!(last["cancelled"], json!(false));
    assert!(last["error"].is_null());
    // A few per second at most.
    assert!(events.len() <= 10, "{} events", events.len());
}

#[tokio::test]
async fn roles_scope_and_bad_parameters() {
    let f = fixture(&[]).await;
    seed(&f).await;
    let (a, b) = (f.stores[0], f.stores[1]);
    let (_, staff) = user_token(&f.db, &f.server, "s@example.com", "staff", &[a]).await;
    let staff = Api::new(&f.server, Some(&staff));
    let (_, manager) = user_token(&f.db, &f.server, "m@example.com", "manager", &[a]).await;
    let manager = Api::new(&f.server, Some(&manager));

    let e = export(&staff, &format!("format=csv&storeId={a}"), None).await;
    assert_eq!(e.status, 403);
    assert_eq!(e.json()["error"]["code"], "forbidden");
    let e = export(&Api::new(&f.server, None), "format=csv", None).await;
    assert_eq!(e.status, 401);

    // A manager: a store outside the scope is 403; no filter means only theirs.
    let e = export(&manager, &format!("format=csv&storeId={b}"), None).await;
    assert_eq!(e.status, 403);
    let e = export(&manager, &format!("format=csv&storeId={a},{b}"), None).await;
    assert_eq!(e.status, 403);
    let e = export(&manager, "format=ndjson&shape=daily", None).await;
    assert_eq!(e.status, 200);
    let rows = ndjson(&e.body);
    assert_eq!(rows.len(), db_days(&f, Some(&[a])).await.len());
    assert!(rows.iter().all(|r| r["storeId"] == json!(a)));

    for (query, param) in [
        ("format=xml", "format"),
        ("format=csv&shape=weekly", "shape"),
        ("format=csv&fields=storeId", "fields"),
        ("format=json&shape=daily&fields=storeId", "fields"),
        ("format=json&shape=monthly&fields=nope", "fields"),
        ("format=csv&year=1999", "year"),
        ("format=csv&from=2024-07&to=2024-01", "from"),
        ("format=csv&storeId=x", "storeId"),
        ("format=csv&region=a%00b", "region"),
        ("format=csv&after=1:2024-13", "after"),
        ("format=csv&shape=daily&after=2:2026-02-30", "after"),
        ("format=csv&shape=daily&after=2:2025-04-31", "after"),
        // Resuming from an unset variable would start over.
        ("format=csv&after=", "after"),
        ("format=ndjson&after=%20", "after"),
        ("format=csv&minTotalSales=-1", "minTotalSales"),
        ("format=csv&maxTotalSales=1e400", "maxTotalSales"),
    ] {
        let e = export(&f.admin, query, None).await;
        assert_eq!(e.status, 400, "{query}: {}", e.text());
        assert_eq!(
            e.json()["error"]["details"]["parameter"],
            json!(param),
            "{query}: {}",
            e.text()
        );
    }
    // Past the double range: said so, not "non-negative".
    let e = export(&f.admin, "format=csv&maxTotalSales=1e400", None).await;
    assert!(e.text().contains("out of range"), "{}", e.text());
    // NaN and -inf are below no bound: refused as under the minimum.
    for query in [
        "format=csv&minTotalSales=NaN",
        "format=csv&minTotalSales=-inf",
    ] {
        let e = export(&f.admin, query, None).await;
        assert_eq!(e.status, 400, "{query}: {}", e.text());
        assert!(e.text().contains("at least 0"), "{query}: {}", e.text());
    }
    // A region name with quotes is a value, never SQL.
    let e = export(&f.admin, "format=csv&region=No'rth%22%3B--", None).await;
    assert_eq!(e.status, 200);
    assert_eq!(csv_records(&e.body).1.len(), 0);
    let e = export(&f.admin, "format=csv&shape=daily&region=North", None).await;
    assert_eq!(e.status, 200);
    assert!(!csv_records(&e.body).1.is_empty());
}

/// Sessions of the test database that an export could leave behind: a
/// running COPY, or a transaction left open.
async fn leftovers(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT format('%s %s %s', pid, state, left(query, 60)) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND ((state = 'active' AND query ILIKE 'COPY%')
                OR state IN ('idle in transaction', 'idle in transaction (aborted)'))",
    )
    .fetch_all(&db.pool)
    .await
    .expect("pg_stat_activity")
}

/// About 290,000 store-days (some 45 MB of JSON): far more than socket
/// buffers hold, so an export is still running when the client leaves.
async fn seed_big(f: &Fixture) {
    let mut tx = f.db.pool.begin().await.unwrap();
    // Without events (the row trigger that derives the totals stays on).
    sqlx::query("ALTER TABLE sales.monthly_sales DISABLE TRIGGER monthly_sales_events")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO sales.stores (code, name, region)
         SELECT 'BIG' || i, 'Big store ' || i, 'West' FROM generate_series(1, 400) i",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         SELECT s.id, 2022 + mo / 12, 1 + mo % 12,
                (SELECT jsonb_object_agg(d::text, jsonb_build_object('sales', d * 10.5, 'customers', d, 'transactions', d + 3))
                 FROM generate_series(1, 28) d)
         FROM sales.stores s, generate_series(0, 23) mo WHERE s.code LIKE 'BIG%'",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("ALTER TABLE sales.monthly_sales ENABLE TRIGGER monthly_sales_events")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// Opens an export and reads its first chunk; the response is kept open.
async fn open_export(api: &Api, query: &str) -> (String, reqwest::Response) {
    let mut r = api
        .req(
            reqwest::Method::GET,
            &format!("/api/v2/sales/export?{query}"),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-export-id"].to_str().unwrap().to_string();
    let first = tokio::time::timeout(Duration::from_secs(30), r.chunk())
        .await
        .expect("first chunk in time")
        .expect("chunk")
        .expect("a first chunk");
    assert!(!first.is_empty());
    (id, r)
}

#[tokio::test]
async fn disconnect_cancels_the_query_and_the_limit_answers_429() {
    let f = fixture(&[("EXPORT_MAX_CONCURRENT", "1")]).await;
    seed_big(&f).await;
    let mut listener = sqlx::postgres::PgListener::connect(&f.db.url)
        .await
        .expect("listener");
    listener.listen("sales_ephemeral").await.expect("listen");

    let (id, open) = open_export(&f.admin, "format=json&shape=daily").await;
    // The export is running (a COPY on the server's connection) ...
    let running = eventually(Duration::from_secs(10), "the COPY to show up", || async {
        let l = leftovers(&f.db).await;
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert!(running.iter().any(|s| s.contains("COPY")), "{running:?}");

    // ... and holds the only export slot.
    let busy = export(&f.admin, "format=csv", None).await;
    assert_eq!(busy.status, 429, "{}", busy.text());
    assert!(busy.header("retry-after").parse::<u64>().unwrap() >= 1);
    assert_eq!(busy.json()["error"]["code"], "rate_limited");

    // The client goes away mid-stream.
    drop(open);
    let left = eventually(
        Duration::from_secs(15),
        "no COPY and no open transaction in pg_stat_activity",
        || async {
            let l = leftovers(&f.db).await;
            l.is_empty().then_some(l)
        },
    )
    .await;
    assert!(left.is_empty());

    // The user is told the export was cancelled, short of its total.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let last = loop {
        let n = tokio::time::timeout_at(deadline, listener.recv())
            .await
            .expect("a final progress event")
            .expect("notification");
        let now = chrono::Utc::now().timestamp_millis();
        let json = sales_server::events::sealed::open(n.payload(), now).expect("a sealed payload");
        let v: Value = serde_json::from_str(json).unwrap();
        if v["data"]["exportId"] == json!(id) && v["data"]["done"] == json!(true) {
            break v;
        }
    };
    assert_eq!(last["data"]["status"], "cancelled");
    assert_eq!(last["data"]["cancelled"], json!(true));
    let sent = last["data"]["rowsSent"].as_u64().unwrap();
    let total = last["data"]["estimatedTotal"].as_u64().unwrap();
    assert!(sent < total, "{sent} of {total}");

    // The slot is free again, and the pool still works.
    let ok = eventually(
        Duration::from_secs(10),
        "the export slot to be freed",
        || async {
            let e = export(
                &f.admin,
                "format=csv&shape=monthly&year=2023&storeId=1",
                None,
            )
            .await;
            (e.status == 200).then_some(e)
        },
    )
    .await;
    assert!(ok.text().starts_with("key,"));
    let (st, _) = f.admin.get("/api/v2/sales?limit=1").await;
    assert_eq!(st, 200);

    // Cancelling before the first byte (a slow client that never reads) is
    // handled the same way: open, drop at once.
    let r = f
        .admin
        .req(
            reqwest::Method::GET,
            "/api/v2/sales/export?format=csv&shape=daily",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(r);
    eventually(
        Duration::from_secs(15),
        "no leftovers after an early drop",
        || async { leftovers(&f.db).await.is_empty().then_some(()) },
    )
    .await;
}

/// A store name or region a spreadsheet would run as a formula is written
/// to CSV with a leading `'` (shown as text); JSON keeps it as it is.
#[tokio::test]
async fn csv_cells_that_look_like_formulas_are_written_as_text() {
    let f = fixture(&[]).await;
    seed(&f).await;
    let formula = "=HYPERLINK(\"http://evil.example\",\"x\")";
    // A code may start with `-`, which a spreadsheet reads as a formula.
    sqlx::query(
        "UPDATE sales.stores SET code = '-A1', name = $1, region = '@SUM(1)' WHERE id = $2",
    )
    .bind(formula)
    .bind(f.stores[0])
    .execute(&f.db.pool)
    .await
    .unwrap();
    let s = f.stores[0];
    let e = export(&f.admin, &format!("storeId={s}&format=csv"), None).await;
    assert_eq!(e.status, 200);
    let (header, rows) = csv_records(&e.body);
    let name = header.iter().position(|h| h == "store_name").unwrap();
    let region = header.iter().position(|h| h == "region").unwrap();
    let code = header.iter().position(|h| h == "store_code").unwrap();
    assert!(!rows.is_empty());
    for r in &rows {
        assert_eq!(r[name], format!("'{formula}"));
        assert_eq!(r[region], "'@SUM(1)");
        assert_eq!(r[code], "'-A1");
    }
    let e = export(
        &f.admin,
        &format!("storeId={s}&format=csv&shape=daily"),
        None,
    )
    .await;
    let (header, rows) = csv_records(&e.body);
    let name = header.iter().position(|h| h == "store_name").unwrap();
    let code = header.iter().position(|h| h == "store_code").unwrap();
    assert!(rows.iter().all(|r| r[name] == format!("'{formula}")));
    assert!(rows.iter().all(|r| r[code] == "'-A1"));
    // The export still imports back by code: the daily file, with its
    // store_id column emptied so the code alone names the store, after the
    // store's rows were deleted.
    let mut wtr = csv::Writer::from_writer(Vec::new());
    wtr.write_record(&header).unwrap();
    let sid = header.iter().position(|h| h == "store_id").unwrap();
    for r in &rows {
        let mut r = r.clone();
        r[sid] = String::new();
        wtr.write_record(&r).unwrap();
    }
    let file = wtr.into_inner().unwrap();
    let before = db_days(&f, Some(&[s])).await;
    sqlx::query("DELETE FROM sales.monthly_sales WHERE store_id = $1")
        .bind(s)
        .execute(&f.db.pool)
        .await
        .unwrap();
    let r = f
        .admin
        .req(reqwest::Method::POST, "/api/v2/imports?format=daily")
        .header("content-type", "text/csv")
        .body(file)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let job: Value = r.json().await.unwrap();
    let id = job["id"].as_i64().unwrap();
    let done = eventually(Duration::from_secs(90), "the import to end", || async {
        let (st, doc) = f.admin.get(&format!("/api/v2/imports/{id}")).await;
        assert_eq!(st, 200, "{doc}");
        matches!(doc["state"].as_str(), Some("completed" | "failed")).then_some(doc)
    })
    .await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["rowsRejected"], 0, "{done}");
    assert_eq!(db_days(&f, Some(&[s])).await, before);
    let e = export(
        &f.admin,
        &format!("storeId={s}&format=ndjson&shape=daily"),
        None,
    )
    .await;
    assert!(ndjson(&e.body).iter().all(|d| d["storeName"] == formula));
    f.server.stop().await;
}

/// A user disabled while their export streams gets no more of it: the
/// transfer is cut (never ended as if complete).
#[tokio::test]
async fn an_export_stops_when_its_user_is_disabled() {
    let f = fixture(&[]).await;
    // About 500,000 store-days, far more than the queue and the socket
    // buffers hold while the client does not read.
    sqlx::query(
        "INSERT INTO sales.stores (code, name, region)
         SELECT 'X' || g, 'Store ' || g, 'North' FROM generate_series(1, 150) g",
    )
    .execute(&f.db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         SELECT s.id, y, mo, (SELECT jsonb_object_agg(d::text, jsonb_build_object('sales', d * 10 + 0.5, 'customers', d))
                              FROM generate_series(1, 28) d)
         FROM sales.stores s, generate_series(2011, 2020) y, generate_series(1, 12) mo
         WHERE s.code LIKE 'X%'",
    )
    .execute(&f.db.pool)
    .await
    .unwrap();
    let (uid, token) = user_token(&f.db, &f.server, "exporter@x.test", "admin", &[]).await;
    let exporter = Api::new(&f.server, Some(&token));
    let mut r = exporter
        .req(
            reqwest::Method::GET,
            "/api/v2/sales/export?format=csv&shape=daily",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut got = r.chunk().await.unwrap().map_or(0, |c| c.len());
    assert!(got > 0);
    let d = f
        .admin
        .req(reqwest::Method::PATCH, &format!("/api/v2/users/{uid}"))
        .json(&json!({"disabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(d.status().as_u16(), 200);
    let ended = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            match r.chunk().await {
                Ok(Some(c)) => got += c.len(),
                Ok(None) => return Ok(got),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the export ends in time");
    assert!(
        ended.is_err(),
        "cut, not complete: {got} bytes then a clean end"
    );
    assert!(got < 20_000_000, "{got} bytes");
    f.server.stop().await;
}

/// Exports of the test database waiting on a lock (the row count behind a
/// held `LOCK TABLE`), as `pid query` lines.
async fn waiting_on_lock(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT format('%s %s', pid, left(query, 60)) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND state = 'active' AND wait_event_type = 'Lock' AND query ILIKE 'SELECT count%'",
    )
    .fetch_all(&db.pool)
    .await
    .expect("pg_stat_activity")
}

/// A client that hangs up over HTTP/1.1 while its export still counts its
/// rows (here behind a table lock) frees its slot and its query at once,
/// not when the count ends: the server asks the kernel whether the client is
/// still there, and cancels the count when it is not.
#[tokio::test]
async fn a_client_gone_before_the_first_byte_frees_its_slot_and_its_query() {
    let f = fixture(&[("EXPORT_MAX_CONCURRENT", "1")]).await;
    seed(&f).await;
    let mut lock = f.db.connect().await;
    sqlx::raw_sql("BEGIN; LOCK TABLE sales.monthly_sales IN ACCESS EXCLUSIVE MODE")
        .execute(&mut lock)
        .await
        .unwrap();

    // Over HTTP/1.1 (reqwest's default without TLS), abandoned mid-count.
    let api = f.admin.clone();
    let first = tokio::spawn(async move { export(&api, "format=csv", None).await.status });
    let waiting = eventually(
        Duration::from_secs(15),
        "the export's count to wait on the lock",
        || async {
            let w = waiting_on_lock(&f.db).await;
            (w.len() == 1).then_some(w)
        },
    )
    .await;
    first.abort();
    let _ = first.await;
    eventually(
        Duration::from_secs(15),
        "the abandoned count to be cancelled while the lock is held",
        || async { waiting_on_lock(&f.db).await.is_empty().then_some(()) },
    )
    .await;

    // The slot goes back as the cancelled export's task ends, right after
    // its count is cancelled, while the lock is still held: the next export
    // gets it (its own count then waits on the lock). One that comes in the
    // instant between the two is a 429 and tries again.
    let (second, now) = eventually(
        Duration::from_secs(15),
        "the next export's count to wait on the lock",
        || async {
            let api = f.admin.clone();
            let t = tokio::spawn(async move { export(&api, "format=csv", None).await });
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while tokio::time::Instant::now() < deadline {
                if t.is_finished() {
                    let e = t.await.unwrap();
                    assert_eq!(e.status, 429, "{}", e.text());
                    return None;
                }
                let w = waiting_on_lock(&f.db).await;
                if w.len() == 1 {
                    return Some((t, w));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("the next export neither answered nor waited on the lock");
        },
    )
    .await;
    assert_ne!(now, waiting, "a new query, not the first one");
    sqlx::raw_sql("COMMIT").execute(&mut lock).await.unwrap();
    let e = second.await.unwrap();
    assert_eq!(e.status, 200, "{}", e.text());
    assert!(e.text().starts_with("key,"));
}

/// An export that fails before its first byte answers with the request's
/// id, as every other error does (the export runs in a task of its own).
#[tokio::test]
async fn an_export_failing_before_its_first_byte_names_the_request() {
    let f = fixture(&[("DB_QUERY_TIMEOUT", "500ms")]).await;
    seed(&f).await;
    let mut lock = f.db.connect().await;
    sqlx::raw_sql("BEGIN; LOCK TABLE sales.monthly_sales IN ACCESS EXCLUSIVE MODE")
        .execute(&mut lock)
        .await
        .unwrap();
    let r = f
        .admin
        .req(reqwest::Method::GET, "/api/v2/sales/export?format=csv")
        .header("x-request-id", "export-req-7")
        .send()
        .await
        .unwrap();
    sqlx::raw_sql("ROLLBACK").execute(&mut lock).await.unwrap();
    assert_eq!(r.status(), 503);
    // A 503 says when to come back.
    assert_eq!(
        r.headers().get("retry-after").map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["requestId"], "export-req-7", "{body}");
}

/// A monthly CSV export imports back unchanged: every day's sales,
/// customers and transactions, also for days that give only transactions
/// (an import replaces each day of the file whole, so a column left out
/// of the export would be deleted by the round trip).
#[tokio::test]
async fn a_monthly_csv_export_imports_back_unchanged() {
    let f = fixture(&[]).await;
    seed(&f).await;
    let s = f.stores[0];
    // A month whose days give only transactions, and one day of each kind.
    sqlx::query(
        r#"INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
           VALUES ($1, 2025, 2, '{"1": {"transactions": 7}, "2": {"transactions": 3},
                                 "3": {"sales": 10.5, "transactions": 2},
                                 "4": {"customers": 4, "transactions": 1}}')"#,
    )
    .bind(s)
    .execute(&f.db.pool)
    .await
    .unwrap();
    let before = db_days(&f, Some(&[s])).await;
    let versions = |f: &Fixture| {
        let pool = f.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT sum(version)::bigint FROM sales.monthly_sales WHERE store_id = $1",
            )
            .bind(s)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let versions_before = versions(&f).await;
    let e = export(
        &f.admin,
        &format!("storeId={s}&format=csv&shape=monthly"),
        None,
    )
    .await;
    assert_eq!(e.status, 200);
    let r = f
        .admin
        .req(reqwest::Method::POST, "/api/v2/imports?format=monthly")
        .header("content-type", "text/csv")
        .body(e.body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let job: Value = r.json().await.unwrap();
    let id = job["id"].as_i64().unwrap();
    let done = eventually(Duration::from_secs(90), "the import to end", || async {
        let (st, doc) = f.admin.get(&format!("/api/v2/imports/{id}")).await;
        assert_eq!(st, 200, "{doc}");
        matches!(doc["state"].as_str(), Some("completed" | "failed")).then_some(doc)
    })
    .await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["rowsRejected"], 0, "{done}");
    assert_eq!(db_days(&f, Some(&[s])).await, before, "every day as it was");
    assert_eq!(versions(&f).await, versions_before, "nothing changed");
    f.server.stop().await;
}

/// `minTotalSales` / `maxTotalSales` pick the same rows in the list, the
/// summary and the export: each compares with the decimal the parameter is
/// written as, every digit of it (a double keeps 15–17 significant
/// digits: `1234567890123.4567` read as one missed the row whose total it
/// is), in any form a number takes (`1.2345678901234567e12`).
#[tokio::test]
async fn total_sales_filters_pick_the_same_rows_everywhere() {
    let f = fixture(&[]).await;
    let s = f.stores[0];
    sqlx::query(
        r#"INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
           VALUES ($1, 2024, 1, '{"1": {"sales": 1234567890.1234567}}'),
                  ($1, 2024, 2, '{"1": {"sales": 617283945061.7283}, "2": {"sales": 617283945061.7284}}')"#,
    )
    .bind(s)
    .execute(&f.db.pool)
    .await
    .unwrap();
    for (filter, expected) in [
        ("month=1&maxTotalSales=1234567890.123456", 0),
        ("month=1&minTotalSales=1234567890.1234567", 1),
        ("month=1&maxTotalSales=1234567890.1234567", 1),
        ("month=1&minTotalSales=1234567890.123457", 0),
        ("month=1&minTotalSales=1.2345678901234567e9", 1),
        ("month=1&minTotalSales=1234567890.12345670001", 0),
        ("month=2&minTotalSales=1234567890123.4567", 1),
        ("month=2&maxTotalSales=1234567890123.4567", 1),
        (
            "month=2&minTotalSales=1234567890123.4567&maxTotalSales=1234567890123.4567",
            1,
        ),
        ("month=2&maxTotalSales=1234567890123.4566", 0),
        ("month=2&minTotalSales=1234567890123.45670000000001", 0),
    ] {
        let q = format!("storeId={s}&year=2024&{filter}");
        let (st, list) = f.admin.get(&format!("/api/v2/sales?{q}&fields=id")).await;
        assert_eq!(st, 200, "{list}");
        let listed = list["data"].as_array().unwrap().len();
        let (st, sum) = f
            .admin
            .get(&format!("/api/v2/sales/summary?{q}&metrics=months"))
            .await;
        assert_eq!(st, 200, "{sum}");
        let counted = sum["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["months"].as_i64().unwrap())
            .sum::<i64>() as usize;
        let e = export(&f.admin, &format!("{q}&format=ndjson"), None).await;
        assert_eq!(e.status, 200);
        let exported = ndjson(&e.body).len();
        assert_eq!(
            (listed, counted, exported),
            (expected, expected, expected),
            "{filter}"
        );
    }
    f.server.stop().await;
}

/// Filters that select no month at all are refused alike by the list, the
/// export and summaries (400 naming the parameter that empties the
/// period): a year outside from..to, or a month without a year that the
/// range does not hold. The list and the export answered 200 with nothing.
#[tokio::test]
async fn filters_that_select_no_month_are_refused_everywhere() {
    let f = fixture(&[]).await;
    for (q, param) in [
        ("year=2024&from=2023-01&to=2023-12", "year"),
        ("month=2&from=2024-03&to=2024-04", "month"),
        // One end open: no record is older than 2000-01 or newer than
        // 2100-12 (these answered 200 with nothing).
        ("month=2&to=2000-01", "month"),
        ("month=1&from=2100-12", "month"),
        // Total bounds that admit no total, likewise.
        ("minTotalSales=10&maxTotalSales=5", "minTotalSales"),
    ] {
        for path in [
            "/api/v2/sales",
            "/api/v2/sales/summary",
            "/api/v2/sales/export",
        ] {
            let (st, body) = f.admin.get(&format!("{path}?{q}")).await;
            assert_eq!(st, 400, "{path}?{q}: {body}");
            assert_eq!(
                body["error"]["details"]["parameter"], param,
                "{path}?{q}: {body}"
            );
        }
    }
    // A month the range holds is a filter like any other, and equal
    // bounds pick the totals equal to them.
    for q in [
        "month=2&from=2024-01&to=2024-04",
        "minTotalSales=5&maxTotalSales=5",
    ] {
        let (st, body) = f.admin.get(&format!("/api/v2/sales?{q}")).await;
        assert_eq!(st, 200, "{q}: {body}");
    }
    // `header` shapes CSV only: with JSON or NDJSON it is refused rather
    // than ignored.
    for format in ["json", "ndjson"] {
        let (st, body) = f
            .admin
            .get(&format!(
                "/api/v2/sales/export?format={format}&header=false"
            ))
            .await;
        assert_eq!(st, 400, "{format}: {body}");
        assert_eq!(body["error"]["details"]["parameter"], "header", "{body}");
    }
    f.server.stop().await;
}

/// A HEAD of an export answers the GET's status and headers without
/// running it: no export id or row estimate (only a run has them), no body;
/// and its errors are the GET's.
#[tokio::test]
async fn a_head_answers_without_running_the_export() {
    let f = fixture(&[]).await;
    seed(&f).await;
    let s = f.stores[0];
    let head = |path: String| {
        let api = &f.admin;
        async move {
            let r = api
                .req(reqwest::Method::HEAD, &path)
                .header("accept-encoding", "gzip")
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.headers().clone(),
                r.bytes().await.unwrap(),
            )
        }
    };
    let (st, headers, body) = head(format!("/api/v2/sales/export?storeId={s}&format=ndjson")).await;
    assert_eq!(st, 200);
    assert!(body.is_empty());
    assert_eq!(
        headers["content-disposition"],
        format!("attachment; filename=\"sales-store{s}-all-monthly.ndjson\"")
    );
    assert_eq!(headers["content-type"], "application/x-ndjson");
    assert_eq!(headers["content-encoding"], "gzip");
    assert!(headers.get("x-export-id").is_none(), "{headers:?}");
    assert!(
        headers.get("x-export-estimated-rows").is_none(),
        "{headers:?}"
    );
    // A GET of the same runs and says so.
    let r = f
        .admin
        .req(
            reqwest::Method::GET,
            &format!("/api/v2/sales/export?storeId={s}&format=ndjson"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-export-id").is_some());
    assert_eq!(r.headers()["x-export-estimated-rows"], "6");
    let _ = r.bytes().await.unwrap();
    // Errors as for a GET.
    let (st, _, _) = head(format!("/api/v2/sales/export?storeId={s},&format=csv")).await;
    assert_eq!(st, 400);
    let (_, staff) = user_token(&f.db, &f.server, "staff@example.com", "staff", &[s]).await;
    let r = Api::new(&f.server, Some(&staff))
        .req(
            reqwest::Method::HEAD,
            &format!("/api/v2/sales/export?storeId={s}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}
