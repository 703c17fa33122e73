//! Cache benchmark: Zipf-distributed reads over 200 stores x 24 months with
//! 5% writes, against two server instances sharing Redis. Prints hit rate,
//! p50/p99 for hits and misses (from the `X-Cache` header), and staleness:
//! the time from a write's response on one instance until the other instance
//! serves the new value.
//!
//! usage: bench_cache URL_A URL_B TOKEN [seconds] [workers]

use clap::Parser;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Self { cdf }
    }

    /// A rank in 0..n (0 most frequent).
    fn sample(&self, rng: &mut impl Rng) -> usize {
        let u: f64 = rng.gen();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

struct Results {
    hits: Mutex<Histogram<u64>>,
    misses: Mutex<Histogram<u64>>,
    stale: Mutex<Histogram<u64>>,
}

/// The 24 months ending 2026-10, most recent first.
fn month(rank: usize) -> (i32, i32) {
    let idx = 2026 * 12 + 9 - rank as i32;
    (idx / 12, idx % 12 + 1)
}

/// Cache benchmark: two instances sharing Redis (see the header of tests/src/bin/bench_cache.rs).
#[derive(Parser)]
struct Args {
    url_a: String,
    url_b: String,
    /// A bearer token both instances accept.
    token: String,
    #[arg(default_value_t = 20)]
    seconds: u64,
    #[arg(default_value_t = 16)]
    workers: usize,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let urls = [args.url_a, args.url_b];
    let token = args.token;
    let (secs, workers) = (args.seconds, args.workers);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let stores = Arc::new(Zipf::new(200, 1.0));
    let months = Arc::new(Zipf::new(24, 1.0));
    let res = Arc::new(Results {
        hits: Mutex::new(Histogram::new(3).unwrap()),
        misses: Mutex::new(Histogram::new(3).unwrap()),
        stale: Mutex::new(Histogram::new(3).unwrap()),
    });
    let (reads, writes, errors) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let marker = Arc::new(AtomicU64::new(1));
    let deadline = Instant::now() + Duration::from_secs(secs);
    // Warm-up: one read of every key, so the measured phase starts from a warm cache.
    for s in 1..=200 {
        for r in 0..24 {
            let (y, m) = month(r);
            let _ = http
                .get(format!("{}/api/v2/sales?storeId={s}&year={y}&month={m}&fields=storeId,year,month,totalSales,dailyData", urls[0]))
                .bearer_auth(&token)
                .send()
                .await;
        }
    }
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (http, token, urls, stores, months, res) = (
            http.clone(),
            token.clone(),
            urls.clone(),
            stores.clone(),
            months.clone(),
            res.clone(),
        );
        let (reads, writes, errors, marker) = (
            reads.clone(),
            writes.clone(),
            errors.clone(),
            marker.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(w as u64 + 1);
            let mut stale_watchers = Vec::new();
            while Instant::now() < deadline {
                let store = stores.sample(&mut rng) + 1;
                let (y, m) = month(months.sample(&mut rng));
                let inst = rng.gen_range(0..2);
                let path = format!("/api/v2/sales?storeId={store}&year={y}&month={m}&fields=storeId,year,month,totalSales,dailyData");
                if rng.gen_bool(0.05) {
                    // A write through one instance with a unique value for day 1.
                    let value = 1_000_000 + marker.fetch_add(1, Ordering::Relaxed);
                    let body = json!({"salesDataArray": [{"storeId": store, "year": y, "month": m, "dailyData": {"1": {"sales": value}}}]});
                    let r = http.post(format!("{}/api/v2/sales/batch", urls[inst])).bearer_auth(&token).json(&body).send().await;
                    let committed = Instant::now();
                    match r {
                        Ok(r) if r.status().is_success() => {
                            writes.fetch_add(1, Ordering::Relaxed);
                            // Staleness: poll the other instance until it serves the value.
                            let (http, token, other, res) = (http.clone(), token.clone(), urls[1 - inst].clone(), res.clone());
                            stale_watchers.push(tokio::spawn(async move {
                                let until = committed + Duration::from_secs(5);
                                while Instant::now() < until {
                                    if let Ok(r) = http.get(format!("{other}{path}")).bearer_auth(&token).send().await {
                                        if let Ok(v) = r.json::<Value>().await {
                                            let seen = v["data"][0]["dailyData"]["1"]["sales"].as_u64();
                                            if seen.is_some_and(|s| s >= value) {
                                                let us = committed.elapsed().as_micros() as u64;
                                                let _ = res.stale.lock().await.record(us.max(1));
                                                return;
                                            }
                                        }
                                    }
                                    tokio::time::sleep(Duration::from_millis(2)).await;
                                }
                                let _ = res.stale.lock().await.record(5_000_000);
                            }));
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    continue;
                }
                let started = Instant::now();
                match http.get(format!("{}{path}", urls[inst])).bearer_auth(&token).send().await {
                    Ok(r) if r.status().is_success() => {
                        let hit = r.headers().get("x-cache").is_some_and(|v| v == "hit");
                        let _ = r.bytes().await;
                        let us = started.elapsed().as_micros() as u64;
                        reads.fetch_add(1, Ordering::Relaxed);
                        if hit {
                            let _ = res.hits.lock().await.record(us.max(1));
                        } else {
                            let _ = res.misses.lock().await.record(us.max(1));
                        }
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            for w in stale_watchers {
                let _ = w.await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let hits = res.hits.lock().await;
    let misses = res.misses.lock().await;
    let stale = res.stale.lock().await;
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let total = hits.len() + misses.len();
    println!("== cache: Zipf(1.0) over 200 stores x Zipf(1.0) over 24 months, 5% writes, 2 instances, {workers} workers, {secs}s");
    println!(
        "reads {}  writes {}  errors {}",
        reads.load(Ordering::Relaxed),
        writes.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed)
    );
    println!(
        "hit rate            : {:.2}%  (target >= 97%)",
        100.0 * hits.len() as f64 / total.max(1) as f64
    );
    println!(
        "hit  latency p50/p99: {:.2} / {:.2} ms",
        ms(&hits, 0.5),
        ms(&hits, 0.99)
    );
    println!(
        "miss latency p50/p99: {:.2} / {:.2} ms",
        ms(&misses, 0.5),
        ms(&misses, 0.99)
    );
    println!(
        "staleness p50/p99   : {:.1} / {:.1} ms over {} writes (target p99 <= 1000 ms)",
        ms(&stale, 0.5),
        ms(&stale, 0.99),
        stale.len()
    );
    if errors.load(Ordering::Relaxed) > 0 {
        std::process::exit(1);
    }
}
