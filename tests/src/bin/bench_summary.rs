//! Summary latency over a chain of `--stores` stores x `--months` months
//! (default 10,000 x 36, every day of each month reported), through
//! `GET /api/v2/sales/summary` of an in-process server: each query once
//! per run with the cache emptied first (computed by Postgres) and then
//! answered from the cache, reporting the median and the slowest of each.
//!
//! Run with `scripts/bench_summary.sh [--stores N] [--months N] [--runs N]`.
//! The database is created for the run and dropped afterwards.

use clap::Parser;
use sales_e2e::{user_token, TestDb};
use serde_json::json;
use std::time::{Duration, Instant};

/// Summary latency (see the header of tests/src/bin/bench_summary.rs).
#[derive(Debug, Parser)]
struct Opts {
    #[arg(long, default_value_t = 10_000)]
    stores: i64,
    /// Months ending December 2025.
    #[arg(long, default_value_t = 36)]
    months: i32,
    /// Uncached runs per query (cached: 20 x as many).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

const QUERIES: &[(&str, &str)] = &[
    ("region x month, one year (monthly totals)", "groupBy=region,month&year=2025"),
    (
        "top 10 stores by growth vs previous year",
        "groupBy=store&metrics=sumSales&year=2025&compareTo=previousYear&top=10&orderBy=-sumSalesChangePct",
    ),
    (
        "region x weekday, one quarter (store-days)",
        "groupBy=region,weekday&metrics=avgSales,maxSales,count&from=2025-01&to=2025-03",
    ),
    (
        "month, one year vs previous (store-days)",
        "groupBy=month&metrics=sumSales,avgSales,salesPerCustomer&year=2025&compareTo=previousYear",
    ),
    ("one store by day, one year", "groupBy=day&metrics=sumSales&storeId=1&year=2025"),
];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], *v.last().unwrap())
}

#[tokio::main]
async fn main() {
    let o = Opts::parse();
    let db = TestDb::new().await;
    let started = Instant::now();
    // The chain, written in SQL with the event trigger off (a load, not a
    // write path under test).
    sqlx::raw_sql(&format!(
        "INSERT INTO sales.stores (code, name, region)
             SELECT format('S%s', lpad(g::text, 6, '0')), 'Store ' || g, 'Region ' || (g % 20)
             FROM generate_series(1, {stores}) g;
         ALTER TABLE sales.monthly_sales DISABLE TRIGGER monthly_sales_events;
         INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
             SELECT s.id, extract(year FROM p)::int, extract(month FROM p)::int,
                    (SELECT jsonb_object_agg(extract(day FROM d)::int,
                        jsonb_build_object('sales', 500 + (s.id * 7 + extract(doy FROM d)::int * 13) % 900,
                                           'customers', 20 + (s.id + extract(day FROM d)::int) % 60,
                                           'transactions', 25 + (s.id * 3 + extract(day FROM d)::int) % 70))
                     FROM generate_series(p, p + interval '1 month' - interval '1 day', interval '1 day') d)
             FROM sales.stores s,
                  generate_series(date '2026-01-01' - make_interval(months => {months}),
                                  date '2025-12-01', interval '1 month') p;
         ALTER TABLE sales.monthly_sales ENABLE TRIGGER monthly_sales_events;",
        stores = o.stores,
        months = o.months,
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    // Outside the load's transaction (VACUUM cannot run inside one).
    for t in ["sales.monthly_sales", "sales.stores"] {
        sqlx::query(&format!("VACUUM ANALYZE {t}"))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let (rows, size): (i64, String) = sqlx::query_as(
        "SELECT count(*), pg_size_pretty(pg_total_relation_size('sales.monthly_sales')) FROM sales.monthly_sales",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    println!(
        "{} stores x {} months: {rows} store-months ({size}) loaded in {:.0} s",
        o.stores,
        o.months,
        started.elapsed().as_secs_f64()
    );

    let server = db
        .server(&[("DB_QUERY_TIMEOUT", "120s"), ("LOG_LEVEL", "warn")])
        .await;
    let (_, token) = user_token(&db, &server, "bench@example.com", "admin", &[]).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", server.addr);
    let get = |q: &str| {
        http.get(format!("{base}/api/v2/sales/summary?{q}"))
            .bearer_auth(&token)
            .send()
    };
    let clear = || {
        http.post(format!("{base}/api/admin/cache/clear"))
            .bearer_auth(&token)
            .json(&json!({}))
            .send()
    };
    println!("| query | groups | uncached median / slowest (ms) | cached median / slowest (ms) |");
    println!("|---|---|---|---|");
    for (label, q) in QUERIES {
        let mut cold = Vec::new();
        let mut groups = 0;
        for _ in 0..o.runs {
            assert!(clear().await.unwrap().status().is_success());
            let t = Instant::now();
            let r = get(q).await.unwrap();
            let status = r.status();
            let cache = r
                .headers()
                .get("x-cache")
                .map(|v| v.to_str().unwrap_or("").to_string());
            let body: serde_json::Value = r.json().await.unwrap();
            cold.push(t.elapsed());
            assert!(status.is_success(), "{q}: {status} {body}");
            assert_eq!(cache.as_deref(), Some("miss"), "{q}");
            groups = body["meta"]["groups"].as_i64().unwrap_or(0);
        }
        let mut warm = Vec::new();
        for _ in 0..o.runs * 20 {
            let t = Instant::now();
            let r = get(q).await.unwrap();
            let hit = r.headers().get("x-cache").is_some_and(|v| v == "hit");
            r.bytes().await.unwrap();
            if hit {
                warm.push(t.elapsed());
            }
        }
        let (cm, cx) = median(cold);
        let (wm, wx) = if warm.is_empty() {
            (Duration::ZERO, Duration::ZERO)
        } else {
            median(warm)
        };
        println!(
            "| {label} (`{q}`) | {groups} | {:.0} / {:.0} | {:.2} / {:.2} |",
            ms(cm),
            ms(cx),
            ms(wm),
            ms(wx)
        );
    }
}
