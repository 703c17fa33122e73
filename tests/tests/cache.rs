//! Cache over real Redis: hits and misses, scope isolation, invalidation
//! (API write on the same instance, plain SQL, another instance), compressed
//! entries, clear by tag, and Redis going away and coming back.

use sales_e2e::{
    eventually, free_port, month, redis_url, relay_caught_up, user_token, warm, Api, OwnRedis,
    TestDb,
};
use serde_json::{json, Value};
use std::time::Duration;

async fn stats(admin: &Api) -> Value {
    let (st, body) = admin.get("/api/admin/cache/stats").await;
    assert_eq!(st, 200, "{body}");
    body
}

async fn setup(db: &TestDb, stores: &[i64], admin: &Api) {
    let recs: Vec<Value> = stores
        .iter()
        .flat_map(|&s| (1..=3).map(move |m| month(s, 2024, m, 28, 10.0 * s as f64)))
        .collect();
    let (st, body) = admin
        .post("/api/v2/sales/batch", &json!({"salesDataArray": recs}))
        .await;
    assert_eq!(st, 200, "{body}");
    let _ = db;
}

fn total(body: &Value) -> f64 {
    body["data"][0]["totalSales"].as_f64().unwrap_or(-1.0)
}

/// Sets a store-month's sales to `sales` (day 1 only) with the event
/// triggers off: a change no relay sees, which only a cache clear (or an
/// entry's expiry) makes the caches let go of.
async fn change_unseen(db: &TestDb, store: i64, month: i32, sales: i64) {
    sqlx::raw_sql(&format!(
        "SET session_replication_role = replica;
         UPDATE sales.monthly_sales SET daily_data = '{{\"1\": {{\"sales\": {sales}}}}}',
                total_sales = {sales}
         WHERE store_id = {store} AND year = 2024 AND month = {month};
         SET session_replication_role = origin;"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn hits_misses_and_read_your_writes() {
    let db = TestDb::new().await;
    let stores = db.stores(2).await;
    // Counts hits and misses exactly: a Redis call timed out on a busy
    // machine (counted as a lost invalidation, which makes every entry
    // stale) would be a miss this test does not expect.
    let server = db.server(&[("REDIS_TIMEOUT", "10s")]).await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let admin = Api::new(&server, Some(&token));
    setup(&db, &stores, &admin).await;
    // The batch's own invalidations applied before anything is cached: the
    // relay seeing them later would make the month 3 entry below stale.
    relay_caught_up(&db, &server).await;
    let s = stores[0];
    let path = format!("/api/v2/sales?storeId={s}&year=2024&month=2&fields=totalSales");
    warm(
        &admin,
        &format!("/api/v2/sales?storeId={s}&year=2024&month=1&fields=totalSales"),
    )
    .await;

    let before = stats(&admin).await;
    let (_, first) = admin.get(&path).await;
    let (_, second) = admin.get(&path).await;
    assert_eq!(first, second);
    let after = stats(&admin).await;
    assert_eq!(
        after["misses"].as_u64().unwrap() - before["misses"].as_u64().unwrap(),
        1
    );
    assert_eq!(
        after["hits"].as_u64().unwrap() - before["hits"].as_u64().unwrap(),
        1
    );
    assert_eq!(after["backend"], "redis");
    assert_eq!(total(&second), 280.0 * s as f64 / 2.0 * 2.0);

    // A write through the API is visible to the writer's very next read.
    let (st, _) = admin.post("/api/v2/sales/batch", &json!({"salesDataArray": [{"storeId": s, "year": 2024, "month": 2, "dailyData": {"1": {"sales": 1000}}}]})).await;
    assert_eq!(st, 200);
    let (_, fresh) = admin.get(&path).await;
    assert_ne!(total(&fresh), total(&second), "read-your-writes");
    // Another month of the same store was not invalidated.
    let other = format!("/api/v2/sales?storeId={s}&year=2024&month=3&fields=totalSales");
    warm(&admin, &other).await;
    let h0 = stats(&admin).await["hits"].as_u64().unwrap();
    admin.post("/api/v2/sales/batch", &json!({"salesDataArray": [{"storeId": s, "year": 2024, "month": 2, "dailyData": {"2": {"sales": 5}}}]})).await;
    let r = admin
        .req(reqwest::Method::GET, &other)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-cache"],
        "hit",
        "month 3 entry survives a month 2 write"
    );
    assert_eq!(stats(&admin).await["hits"].as_u64().unwrap(), h0 + 1);

    // Clear by tag, then everything.
    admin.get(&other).await;
    let (st, body) = admin
        .post(
            "/api/admin/cache/clear",
            &json!({"tag": format!("store:{s}:2024-03")}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let m0 = stats(&admin).await["misses"].as_u64().unwrap();
    admin.get(&other).await;
    assert_eq!(stats(&admin).await["misses"].as_u64().unwrap(), m0 + 1);
    admin.get(&other).await;
    admin.post("/api/admin/cache/clear", &json!({})).await;
    let m1 = stats(&admin).await["misses"].as_u64().unwrap();
    admin.get(&other).await;
    assert_eq!(stats(&admin).await["misses"].as_u64().unwrap(), m1 + 1);
    server.stop().await;
}

/// A clear of `store:N` reaches the store's month entries too (they carry
/// only their month's tag), and leaves other stores' entries cached; a tag
/// in no form entries carry is refused naming `tag`, not taken as cleared.
#[tokio::test]
async fn a_store_clear_reaches_its_months_and_a_wrong_tag_is_refused() {
    let db = TestDb::new().await;
    let stores = db.stores(2).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let admin = Api::new(&server, Some(&token));
    setup(&db, &stores, &admin).await;
    // The batch's own invalidations applied before anything is cached.
    relay_caught_up(&db, &server).await;
    let (s, other) = (stores[0], stores[1]);
    let path = format!("/api/v2/sales?storeId={s}&year=2024&month=2&fields=totalSales");
    let kept = format!("/api/v2/sales?storeId={other}&year=2024&month=2&fields=totalSales");
    let id: i64 = sqlx::query_scalar(
        "SELECT id FROM sales.monthly_sales WHERE store_id = $1 AND year = 2024 AND month = 2",
    )
    .bind(s)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let record = format!("/api/v2/sales/{id}?fields=totalSales");
    warm(&admin, &path).await;
    warm(&admin, &kept).await;
    warm(&admin, &record).await;
    // Changed with no event: only a clear makes the cache let go of it.
    change_unseen(&db, s, 2, 777).await;
    let (_, stale) = admin.get(&path).await;
    assert_ne!(total(&stale), 777.0, "cached before the clear");

    let (st, body) = admin
        .post(
            "/api/admin/cache/clear",
            &json!({"tag": format!("store:{s}")}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["cleared"], format!("store:{s}"));
    let r = admin.req(reqwest::Method::GET, &path).send().await.unwrap();
    assert_eq!(r.headers()["x-cache"], "miss", "the month entry is cleared");
    let fresh: Value = r.json().await.unwrap();
    assert_eq!(total(&fresh), 777.0);
    // And the record read by id.
    let r = admin
        .req(reqwest::Method::GET, &record)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-cache"],
        "miss",
        "the record entry is cleared"
    );
    let fresh: Value = r.json().await.unwrap();
    assert_eq!(fresh["data"]["totalSales"].as_f64(), Some(777.0), "{fresh}");
    let r = admin.req(reqwest::Method::GET, &kept).send().await.unwrap();
    assert_eq!(
        r.headers()["x-cache"],
        "hit",
        "another store's month stays cached"
    );

    for bad in [
        "store-12",
        "store:12:2024-3",
        "row:x",
        "everything",
        "",
        "  ",
    ] {
        let (st, body) = admin
            .post("/api/admin/cache/clear", &json!({"tag": bad}))
            .await;
        assert_eq!(st, 400, "{bad}: {body}");
        assert_eq!(body["error"]["details"]["parameter"], "tag", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("store:N:YYYY-MM"),
            "{body}"
        );
    }
    // `null`, as an unset variable in a client sends it: refused like an
    // empty tag, not read as "clear everything".
    let (st, body) = admin
        .post("/api/admin/cache/clear", &json!({"tag": null}))
        .await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(body["error"]["details"]["parameter"], "tag", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("must not be null"),
        "{body}"
    );
    let r = admin.req(reqwest::Method::GET, &kept).send().await.unwrap();
    assert_eq!(r.headers()["x-cache"], "hit", "nothing was cleared");
    server.stop().await;
}

/// The in-process first level: a repeated read is served from memory
/// without Redis; a write through this instance, and one through another
/// instance (heard by the relay), stop it serving the old body.
#[tokio::test]
async fn first_level_serves_repeats_until_a_write() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    // Entries outlive every wait below: a value read fresh was
    // invalidated, not expired.
    let long = [("CACHE_TTL", "300"), ("CACHE_L1_TTL", "300")];
    let one = db.server(&long).await;
    let two = db.server(&long).await;
    let (_, token) = user_token(&db, &one, "a@example.com", "admin", &[]).await;
    let a1 = Api::new(&one, Some(&token));
    let a2 = Api::new(&two, Some(&token));
    setup(&db, &stores, &a1).await;
    let s = stores[0];
    let path = format!("/api/v2/sales?storeId={s}&year=2024&month=1&fields=totalSales");
    let l1_hits = |b: &Value| b["l1Hits"].as_u64().unwrap();

    // Miss, then a Redis hit that fills the first level, then first-level hits.
    let (_, first) = a1.get(&path).await;
    let before = stats(&a1).await;
    for _ in 0..3 {
        let (_, b) = a1.get(&path).await;
        assert_eq!(b["data"], first["data"]);
    }
    let after = stats(&a1).await;
    assert!(
        l1_hits(&after) > l1_hits(&before),
        "no first-level hit: {before} -> {after}"
    );

    // A write through this instance: its next read is the new value.
    let (st, _) = a1.post("/api/v2/sales/batch", &json!({"mode": "replace", "salesDataArray": [{"storeId": s, "year": 2024, "month": 1, "dailyData": {"1": {"sales": 11}}}]})).await;
    assert_eq!(st, 200);
    let (_, b) = a1.get(&path).await;
    assert_eq!(total(&b), 11.0, "read-your-writes through the first level");

    // Instance two's first level holds the value; a write through instance
    // one reaches it through two's relay.
    eventually(
        Duration::from_secs(10),
        "instance two's first level warm",
        || async {
            let before = l1_hits(&stats(&a2).await);
            let (_, b) = a2.get(&path).await;
            (total(&b) == 11.0 && l1_hits(&stats(&a2).await) > before).then_some(())
        },
    )
    .await;
    let (st, _) = a1.post("/api/v2/sales/batch", &json!({"mode": "replace", "salesDataArray": [{"storeId": s, "year": 2024, "month": 1, "dailyData": {"1": {"sales": 12}}}]})).await;
    assert_eq!(st, 200);
    eventually(
        Duration::from_secs(30),
        "instance two serves the new value",
        || async {
            let (_, b) = a2.get(&path).await;
            (total(&b) == 12.0).then_some(())
        },
    )
    .await;
    one.stop().await;
    two.stop().await;
}

/// A compressed hit from the first level sends the encoding made for the
/// entry the first time, byte for byte, with the same ETag: neither the
/// digest nor the compression is redone per hit.
#[tokio::test]
async fn first_level_keeps_each_encoding() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let api = Api::new(&server, Some(&token));
    setup(&db, &stores, &api).await;
    // The batch's events move the first level's generation when the relay
    // dispatches them: let that happen before the first level is filled.
    relay_caught_up(&db, &server).await;
    // All fields of one store-month: over the 1 kB compression threshold.
    let path = format!("/api/v2/sales?storeId={}&year=2024&month=1", stores[0]);
    let get = |enc: &'static str| {
        let req = api.req(reqwest::Method::GET, &path);
        async move {
            let r = req
                .header("accept-encoding", enc)
                .send()
                .await
                .expect("request");
            assert_eq!(r.status(), 200);
            let h = |n: &str| {
                r.headers()
                    .get(n)
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default()
            };
            let (ce, etag, cache) = (h("content-encoding"), h("etag"), h("x-cache"));
            (ce, etag, cache, r.bytes().await.expect("body").to_vec())
        }
    };
    let (_, _, _, plain) = get("identity").await;
    assert!(plain.len() > 1024, "{} bytes", plain.len());
    let reused = |b: &Value| b["encodingsReused"].as_u64().unwrap();

    for (enc, decode) in [
        (
            "br",
            (|b: &[u8]| {
                let mut out = Vec::new();
                brotli::BrotliDecompress(&mut &b[..], &mut out).expect("br");
                out
            }) as fn(&[u8]) -> Vec<u8>,
        ),
        ("zstd", |b: &[u8]| zstd::decode_all(b).expect("zstd")),
        ("gzip", |b: &[u8]| {
            use std::io::Read;
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(b)
                .read_to_end(&mut out)
                .expect("gzip");
            out
        }),
    ] {
        // Until a first-level hit has made this encoding (the first request
        // after the miss is a Redis hit that fills the first level).
        let (first_etag, first_body) = eventually(
            Duration::from_secs(10),
            "a first-level hit in this encoding",
            || async {
                let (ce, etag, cache, body) = get(enc).await;
                (ce == enc && cache == "hit").then_some((etag, body))
            },
        )
        .await;
        assert_eq!(decode(&first_body), plain, "{enc} decodes to the body");
        let before = reused(&stats(&api).await);
        for _ in 0..3 {
            let (ce, etag, cache, body) = get(enc).await;
            assert_eq!((ce.as_str(), cache.as_str()), (enc, "hit"));
            assert_eq!(etag, first_etag, "{enc}: the same ETag on every hit");
            assert_eq!(body, first_body, "{enc}: the same bytes on every hit");
        }
        let after = reused(&stats(&api).await);
        assert!(
            after >= before + 3,
            "{enc}: hits did not reuse the kept encoding ({before} -> {after})"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn scope_isolation() {
    let db = TestDb::new().await;
    let stores = db.stores(2).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let admin = Api::new(&server, Some(&token));
    setup(&db, &stores, &admin).await;
    let (_, t1) = user_token(&db, &server, "one@example.com", "manager", &[stores[0]]).await;
    let (_, t2) = user_token(&db, &server, "two@example.com", "manager", &[stores[1]]).await;
    // Same URL, different scopes: never the same entry.
    let path = "/api/v2/sales?fields=storeId&limit=200";
    let (_, a) = Api::new(&server, Some(&t1)).get(path).await;
    let (_, b) = Api::new(&server, Some(&t2)).get(path).await;
    let (_, c) = admin.get(path).await;
    let ids = |v: &Value| {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["storeId"].as_i64().unwrap())
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(ids(&a), [stores[0]].into());
    assert_eq!(ids(&b), [stores[1]].into());
    assert_eq!(ids(&c), stores.iter().copied().collect());
    // Again (now from the cache): still separate.
    let (_, a2) = Api::new(&server, Some(&t1)).get(path).await;
    let (_, b2) = Api::new(&server, Some(&t2)).get(path).await;
    assert_eq!((a2, b2), (a, b));
    server.stop().await;
}

#[tokio::test]
async fn invalidation_by_sql_and_across_instances() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    // Entries outlive every wait below: a value read fresh was
    // invalidated, not expired.
    let long = [("CACHE_TTL", "300"), ("CACHE_L1_TTL", "300")];
    let one = db.server(&long).await;
    let two = db.server(&long).await;
    let (_, token) = user_token(&db, &one, "a@example.com", "admin", &[]).await;
    let a1 = Api::new(&one, Some(&token));
    let a2 = Api::new(&two, Some(&token));
    setup(&db, &stores, &a1).await;
    let s = stores[0];
    let path = format!("/api/v2/sales?storeId={s}&year=2024&month=1&fields=totalSales");
    let (_, cached1) = a1.get(&path).await;
    let (_, cached2) = a2.get(&path).await;
    assert_eq!(cached1["data"], cached2["data"]);

    // Plain SQL: both instances see the change once the relay has read the event.
    sqlx::query("UPDATE sales.monthly_sales SET daily_data = '{\"1\": {\"sales\": 7}}' WHERE store_id = $1 AND year = 2024 AND month = 1")
        .bind(s)
        .execute(&db.pool)
        .await
        .unwrap();
    for api in [&a1, &a2] {
        eventually(
            Duration::from_secs(30),
            "fresh value after SQL update",
            || async {
                let (_, b) = api.get(&path).await;
                (total(&b) == 7.0).then_some(())
            },
        )
        .await;
    }

    // A write through instance one invalidates instance two's view.
    let (st, _) = a1.post("/api/v2/sales/batch", &json!({"mode": "replace", "salesDataArray": [{"storeId": s, "year": 2024, "month": 1, "dailyData": {"1": {"sales": 9}}}]})).await;
    assert_eq!(st, 200);
    eventually(
        Duration::from_secs(30),
        "instance two serves the new value",
        || async {
            let (_, b) = a2.get(&path).await;
            (total(&b) == 9.0).then_some(())
        },
    )
    .await;
    one.stop().await;
    two.stop().await;
}

/// Waits until `path` is served from `api`'s instance's first level (a
/// repeat counts a first-level hit), its value unchanged meanwhile.
async fn cached_in_first_level(api: &Api, path: &str, round: usize) {
    let before = total(&api.get(path).await.1);
    eventually(
        Duration::from_secs(10),
        "a first-level hit on instance two",
        || async {
            let l1 = stats(api).await["l1Hits"].as_u64().unwrap();
            assert_eq!(total(&api.get(path).await.1), before, "round {round}");
            (stats(api).await["l1Hits"].as_u64().unwrap() > l1).then_some(())
        },
    )
    .await;
}

/// An admin's clear through one instance reaches the other instances'
/// first levels: a value changed where no event tells the relays (replica
/// mode), then the cache cleared (all of it, or one tag) through instance
/// one, is read fresh from instance two at once. It was served from
/// instance two's memory until its entry expired (here a minute).
#[tokio::test]
async fn a_clear_through_one_instance_empties_every_first_level() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let long = [("CACHE_L1_TTL", "60s")];
    let one = db.server(&long).await;
    let two = db.server(&long).await;
    let (_, token) = user_token(&db, &one, "a@example.com", "admin", &[]).await;
    let a1 = Api::new(&one, Some(&token));
    let a2 = Api::new(&two, Some(&token));
    setup(&db, &stores, &a1).await;
    let s = stores[0];
    let path = format!("/api/v2/sales?storeId={s}&year=2024&month=1&fields=totalSales");
    for (round, (clear, sales)) in [
        (json!({}), 7),
        (json!({"tag": format!("store:{s}:2024-01")}), 8),
    ]
    .into_iter()
    .enumerate()
    {
        // Cached in instance two's first level: a repeat is a first-level hit.
        cached_in_first_level(&a2, &path, round).await;
        // Changed with no event for the relays to see.
        change_unseen(&db, s, 1, sales).await;
        let (st, body) = a1.post("/api/admin/cache/clear", &clear).await;
        assert_eq!(st, 200, "{body}");
        eventually(
            Duration::from_secs(10),
            "instance two reads the value after the clear",
            || async {
                let (_, b) = a2.get(&path).await;
                (total(&b) == sales as f64).then_some(())
            },
        )
        .await;
    }
    one.stop().await;
    two.stop().await;
}

/// A clear made through one instance while another's listener was away
/// (its connection cut just before) still empties that instance's first
/// level: it drops it as it listens again, since whatever was NOTIFYed
/// meanwhile is lost. It served the older value until `CACHE_L1_TTL`.
#[tokio::test]
async fn a_clear_missed_by_a_listener_that_was_away_empties_its_first_level() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let long = [("CACHE_L1_TTL", "60s")];
    let one = db.server(&long).await;
    let two = db.server(&long).await;
    let (_, token) = user_token(&db, &one, "a@example.com", "admin", &[]).await;
    let a1 = Api::new(&one, Some(&token));
    let a2 = Api::new(&two, Some(&token));
    setup(&db, &stores, &a1).await;
    let s = stores[0];
    let path = format!("/api/v2/sales?storeId={s}&year=2024&month=1&fields=totalSales");
    // The listeners come back after 100 ms at least: a clear right after
    // the cut reaches neither. When one was back by the end of the clear
    // (it may have heard it), the round proved nothing and runs again.
    let mut missed = false;
    for (round, sales) in [9, 10, 11].into_iter().enumerate() {
        for api in [&a1, &a2] {
            eventually(
                Duration::from_secs(10),
                "both listeners listening",
                || async {
                    let (_, body) = api.get("/api/admin/websocket/stats").await;
                    (body["relay"]["listening"] == json!(true)).then_some(())
                },
            )
            .await;
        }
        cached_in_first_level(&a2, &path, round).await;
        change_unseen(&db, s, 1, sales).await;
        assert_eq!(db.cut_listeners().await, 2);
        let (st, body) = a1.post("/api/admin/cache/clear", &json!({})).await;
        assert_eq!(st, 200, "{body}");
        let back: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'sales-server-ephemeral'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        eventually(
            Duration::from_secs(10),
            "instance two reads the value after the clear",
            || async { (total(&a2.get(&path).await.1) == sales as f64).then_some(()) },
        )
        .await;
        if back == 0 {
            missed = true;
            break;
        }
    }
    assert!(
        missed,
        "in every round a listener was back before the clear"
    );
    one.stop().await;
    two.stop().await;
}

/// A batch whose events touch more tags than Redis is asked to bump in one
/// call (1,000): every tag is bumped, the first and the last in sort order
/// too (their counters in Redis move), and the values read are the new ones.
#[tokio::test]
async fn a_batch_over_many_tags_invalidates_every_one() {
    let db = TestDb::new().await;
    let stores = db.stores(25).await;
    // Entries outlive every wait below: a value read fresh was
    // invalidated, not expired.
    let one = db
        .server(&[("CACHE_TTL", "300"), ("CACHE_L1_TTL", "300")])
        .await;
    let (_, token) = user_token(&db, &one, "a@example.com", "admin", &[]).await;
    let a1 = Api::new(&one, Some(&token));
    // 25 stores x 24 months: 600 row tags, 600 store-month tags, 25 store
    // tags and `sales:all`.
    let write = |value: f64| {
        let recs: Vec<Value> = stores
            .iter()
            .flat_map(|&s| {
                (2023..=2024).flat_map(move |y| (1..=12).map(move |m| month(s, y, m, 28, value)))
            })
            .collect();
        assert_eq!(recs.len(), 600);
        json!({"mode": "replace", "salesDataArray": recs})
    };
    let (st, body) = a1.post("/api/v2/sales/batch", &write(1.0)).await;
    assert_eq!(st, 200, "{body}");
    relay_caught_up(&db, &one).await;
    // The store-months whose tags sort first and last.
    let mut months: Vec<(String, String)> = stores
        .iter()
        .flat_map(|&s| {
            (2023..=2024).flat_map(move |y| {
                (1..=12).map(move |m| {
                    (
                        format!("store:{s}:{y}-{m:02}"),
                        format!("/api/v2/sales?storeId={s}&year={y}&month={m}&fields=totalSales"),
                    )
                })
            })
        })
        .collect();
    months.sort();
    let paths = [months[0].1.clone(), months[months.len() - 1].1.clone()];
    for p in &paths {
        let (st, body) = a1.get(p).await;
        assert_eq!((st, total(&body)), (200, 28.0), "{p}: {body}");
        warm(&a1, p).await;
    }

    let counter = |tag: &str| tag_counter(&db.name, tag);
    let tags = [months[0].0.clone(), months[months.len() - 1].0.clone()];
    let before: Vec<u64> = tags.iter().map(|t| counter(t)).collect();

    let (st, body) = a1.post("/api/v2/sales/batch", &write(2.0)).await;
    assert_eq!(st, 200, "{body}");
    relay_caught_up(&db, &one).await;
    eventually(
        Duration::from_secs(30),
        "the first and the last tag bumped",
        || async {
            let now: Vec<u64> = tags.iter().map(|t| counter(t)).collect();
            (now[0] > before[0] && now[1] > before[1]).then_some(())
        },
    )
    .await;
    for p in &paths {
        let (_, b) = a1.get(p).await;
        assert_eq!(total(&b), 56.0, "{p}: {b}");
    }
    one.stop().await;
}

/// A tag's counter in the shared Redis (`{prefix}:t:{tag}`), 0 when absent.
fn tag_counter(prefix: &str, tag: &str) -> u64 {
    let out = std::process::Command::new("redis-cli")
        .args(["-u", &redis_url(), "GET", &format!("{prefix}:t:{tag}")])
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// A server that starts answers nothing from what Redis kept: writes made
/// while no instance was relaying events (plain SQL here, with every server
/// stopped) were never invalidated there.
#[tokio::test]
async fn a_new_instance_serves_nothing_written_while_none_ran() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let one = db.server(&[]).await;
    let (_, token) = user_token(&db, &one, "a@example.com", "admin", &[]).await;
    let a1 = Api::new(&one, Some(&token));
    setup(&db, &stores, &a1).await;
    let s = stores[0];
    let path = format!("/api/v2/sales?storeId={s}&year=2024&month=1&fields=totalSales");
    warm(&a1, &path).await;
    let (_, b) = a1.get(&path).await;
    assert_eq!(total(&b), 280.0 * s as f64, "{b}");
    one.stop().await;

    sqlx::query(
        "UPDATE sales.monthly_sales SET daily_data = '{\"1\": {\"sales\": 7}}'
         WHERE store_id = $1 AND year = 2024 AND month = 1",
    )
    .bind(s)
    .execute(&db.pool)
    .await
    .unwrap();

    let two = db.server(&[]).await;
    let a2 = Api::new(&two, Some(&token));
    let (st, b) = a2.get(&path).await;
    assert_eq!((st, total(&b)), (200, 7.0), "{b}");
    two.stop().await;
}

/// A store's January total cached in Redis by an instance that has then
/// stopped: (the store, an admin token, the cached path).
async fn cached_by_a_stopped_instance(db: &TestDb) -> (i64, String, String) {
    let stores = db.stores(1).await;
    let one = db.server(&[]).await;
    let (_, token) = user_token(db, &one, "a@example.com", "admin", &[]).await;
    let a1 = Api::new(&one, Some(&token));
    setup(db, &stores, &a1).await;
    relay_caught_up(db, &one).await;
    let s = stores[0];
    let path = format!("/api/v2/sales?storeId={s}&year=2024&month=1&fields=totalSales");
    warm(&a1, &path).await;
    let (_, b) = a1.get(&path).await;
    assert_eq!(total(&b), 280.0 * s as f64, "{b}");
    one.stop().await;
    (s, token, path)
}

/// A database restored from a dump taken before events this cache prefix
/// has relayed: the shared Redis remembers having relayed past the log's
/// newest event, and what it holds may be of rows the restore took back. A
/// starting instance makes everything stale (it found nothing to catch up
/// on, and served the cached answer until `CACHE_TTL`). Simulated: a change
/// no relay sees, and the prefix's relayed position set past the log.
#[tokio::test]
async fn a_database_restored_behind_the_cache_leaves_nothing_stale() {
    let db = TestDb::new().await;
    let (s, token, path) = cached_by_a_stopped_instance(&db).await;
    change_unseen(&db, s, 1, 99).await;
    let (newest, epoch): (i64, String) =
        sqlx::query_as("SELECT coalesce(max(seq), 0), sales.event_log_epoch() FROM sales.events")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let set = std::process::Command::new("redis-cli")
        .args([
            "-u",
            &redis_url(),
            "SET",
            &format!("{}:relayed:{epoch}", db.name),
            &(newest + 50).to_string(),
        ])
        .output()
        .expect("redis-cli");
    assert!(set.status.success());

    let two = db.server(&[]).await;
    let a2 = Api::new(&two, Some(&token));
    let (st, b) = a2.get(&path).await;
    assert_eq!((st, total(&b)), (200, 99.0), "{b}");
    two.stop().await;
}

/// A database restored from a dump gets an event log of its own (a new
/// epoch), whose positions are given again from the dump's. Written past
/// the position recorded for the old log before any instance started (by
/// plain SQL, say), it used to be caught up on from that position: only
/// the new log's events after it were invalidated, and what the restore
/// took back was served from the cache until it expired. Positions are
/// kept per log: the new log has none recorded, and everything is made
/// stale. Simulated: a change no relay sees, a new epoch, and the new
/// log's events past the old position.
#[tokio::test]
async fn a_restored_log_that_passed_the_old_position_leaves_nothing_stale() {
    let db = TestDb::new().await;
    let (s, token, path) = cached_by_a_stopped_instance(&db).await;
    change_unseen(&db, s, 1, 99).await;
    sqlx::query("UPDATE sales.event_log_identity SET epoch = gen_random_uuid()")
        .execute(&db.pool)
        .await
        .unwrap();
    // Events of the new log (none of them about that month) past every
    // position the old one reached.
    sqlx::query("SELECT sales.emit('test-filler', '{}') FROM generate_series(1, 20)")
        .execute(&db.pool)
        .await
        .unwrap();

    let two = db.server(&[]).await;
    let a2 = Api::new(&two, Some(&token));
    let (st, b) = a2.get(&path).await;
    assert_eq!((st, total(&b)), (200, 99.0), "{b}");
    two.stop().await;
}

/// Redis restarted from an older snapshot holds entries whose tag counters
/// predate later writes. The restart is noticed within about a second: every
/// entry is made stale, in Redis and in this instance's memory too (an old
/// answer read in that second was otherwise kept in memory for
/// CACHE_L1_TTL).
#[tokio::test]
async fn a_redis_restored_from_a_snapshot_leaves_nothing_stale_in_memory() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let dir = std::env::temp_dir().join(format!("pgs_redis_snap_{}", db.name));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let mut redis = OwnRedis::start_in(port, Some(&dir));
    let url = format!("redis://127.0.0.1:{port}");
    let server = db
        .server(&[("REDIS_URL", url.as_str()), ("CACHE_L1_TTL", "60s")])
        .await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let admin = Api::new(&server, Some(&token));
    setup(&db, &stores, &admin).await;
    let s = stores[0];
    let path = format!("/api/v2/sales?storeId={s}&year=2024&month=1&fields=totalSales");
    warm(&admin, &path).await;
    let old = total(&admin.get(&path).await.1);
    let snapshot = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "SAVE"])
        .output()
        .unwrap();
    assert!(snapshot.status.success());
    let (st, _) = admin
        .post(
            "/api/v2/sales/batch",
            &json!({"mode": "replace", "salesDataArray": [{"storeId": s, "year": 2024, "month": 1, "dailyData": {"1": {"sales": 9}}}]}),
        )
        .await;
    assert_eq!(st, 200);
    // Not read again before the restart: this instance keeps nothing of it.

    redis.stop();
    let _redis = OwnRedis::start_in(port, Some(&dir));
    // Read all along while the server reconnects; once the new value has
    // come back, it must stay for good (not the snapshot's, kept in memory).
    let started = std::time::Instant::now();
    let mut seen_new_since: Option<std::time::Instant> = None;
    let mut seen: Vec<(u128, f64)> = Vec::new();
    while seen_new_since.is_none_or(|t| t.elapsed() < Duration::from_secs(3)) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the new value never held for 3 s: (ms, value) {seen:?}"
        );
        let (st, b) = admin.get(&path).await;
        assert_eq!(st, 200, "{b}");
        let v = total(&b);
        if seen.last().is_none_or(|(_, last)| *last != v) {
            seen.push((started.elapsed().as_millis(), v));
        }
        if v == 9.0 {
            seen_new_since.get_or_insert_with(std::time::Instant::now);
        } else {
            assert_eq!(v, old, "{b}");
            seen_new_since = None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// While Redis does not answer, requests do not wait on it: once one call
/// has failed (REDIS_TIMEOUT, here 15 s), reads miss at once and are answered
/// from Postgres, and writes do not try their invalidation, until the
/// once-a-second probe finds Redis again.
#[tokio::test]
async fn reads_do_not_wait_on_a_redis_that_does_not_answer() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let port = free_port();
    let redis = OwnRedis::start(port);
    let url = format!("redis://127.0.0.1:{port}");
    let server = db
        .server(&[
            ("REDIS_URL", url.as_str()),
            // Five calls that each waited for it would take five times as
            // long; all five within one such wait show that none waited.
            ("REDIS_TIMEOUT", "15s"),
            // Every read goes to Redis (none is answered from memory).
            ("CACHE_L1_TTL", "0"),
        ])
        .await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let admin = Api::new(&server, Some(&token));
    setup(&db, &stores, &admin).await;
    let path = format!("/api/v2/sales?storeId={}&fields=totalSales", stores[0]);
    warm(&admin, &path).await;
    // One store-month cached in Redis before the outage, rewritten during it.
    let month = format!(
        "/api/v2/sales?storeId={}&year=2024&month=1&fields=totalSales",
        stores[0]
    );
    warm(&admin, &month).await;
    assert_ne!(total(&admin.get(&month).await.1), 5.0);

    redis.signal("STOP");
    // The first call finds out (it may wait up to REDIS_TIMEOUT).
    let (st, _) = admin.get(&path).await;
    assert_eq!(st, 200);
    let started = std::time::Instant::now();
    for _ in 0..5 {
        let (st, b) = admin.get(&path).await;
        assert_eq!(st, 200, "{b}");
        assert!(total(&b) > 0.0, "{b}");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "five reads took {took:?} with Redis stalled (REDIS_TIMEOUT 15 s each before)"
    );
    // Writes neither: their invalidations are counted as lost at once
    // (each waited REDIS_TIMEOUT before), and made up for when Redis is
    // back, so the last value written is what is read then.
    let started = std::time::Instant::now();
    for sales in 1..=5 {
        let (st, b) = admin
            .post(
                "/api/v2/sales/batch",
                &json!({"mode": "replace", "salesDataArray": [
                    {"storeId": stores[0], "year": 2024, "month": 1, "dailyData": {"1": {"sales": sales}}}]}),
            )
            .await;
        assert_eq!(st, 200, "{b}");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "five writes took {took:?} with Redis stalled (REDIS_TIMEOUT 15 s each before)"
    );
    redis.signal("CONT");
    eventually(Duration::from_secs(30), "cache hits again", || async {
        let h0 = stats(&admin).await["hits"].as_u64().unwrap();
        admin.get(&path).await;
        admin.get(&path).await;
        (stats(&admin).await["hits"].as_u64().unwrap() > h0).then_some(())
    })
    .await;
    for _ in 0..3 {
        assert_eq!(total(&admin.get(&month).await.1), 5.0, "the last write");
    }
    server.stop().await;
}

#[tokio::test]
async fn compressed_entries_round_trip() {
    let db = TestDb::new().await;
    let stores = db.stores(3).await;
    let server = db.server(&[("CACHE_COMPRESS_MIN", "512")]).await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let admin = Api::new(&server, Some(&token));
    setup(&db, &stores, &admin).await;
    let path = "/api/v2/sales?limit=200";
    // Once the relay has read the set-up batch and applied its invalidation
    // (a hit after that), clear the cache: the next read computes and stores
    // the entry, the one after decodes it.
    relay_caught_up(&db, &server).await;
    warm(&admin, path).await;
    admin.post("/api/admin/cache/clear", &json!({})).await;
    let r1 = admin.req(reqwest::Method::GET, path).send().await.unwrap();
    assert_eq!(r1.headers()["x-cache"], "miss");
    let miss = r1.bytes().await.unwrap();
    let r2 = admin.req(reqwest::Method::GET, path).send().await.unwrap();
    assert_eq!(r2.headers()["x-cache"], "hit");
    let hit = r2.bytes().await.unwrap();
    assert!(
        stats(&admin).await["bytesSavedByCompression"]
            .as_u64()
            .unwrap()
            > 0,
        "a large entry is stored compressed"
    );
    assert_eq!(miss, hit, "a compressed hit decodes to the same bytes");
    server.stop().await;
}

#[tokio::test]
async fn in_process_cache_without_redis() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let mut cfg = db.config(&[]);
    cfg.redis_url = None;
    let server = sales_server::Server::bind(cfg).await.unwrap().spawn();
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let admin = Api::new(&server, Some(&token));
    setup(&db, &stores, &admin).await;
    let path = format!("/api/v2/sales?storeId={}&fields=totalSales", stores[0]);
    warm(&admin, &path).await;
    let st = stats(&admin).await;
    assert_eq!(st["backend"], "memory");
    assert!(st["hits"].as_u64().unwrap() >= 1);
    let (_, health) = Api::new(&server, None).get("/health").await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["redis"]["configured"], false);
    server.stop().await;
}

#[tokio::test]
async fn redis_outage_and_recovery() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let port = free_port();
    let mut redis = OwnRedis::start(port);
    let url = format!("redis://127.0.0.1:{port}");
    eventually(Duration::from_secs(30), "private redis up", || async {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| ())
    })
    .await;
    let server = db
        .server(&[("REDIS_URL", url.as_str()), ("REDIS_TIMEOUT", "1s")])
        .await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let admin = Api::new(&server, Some(&token));
    let anon = Api::new(&server, None);
    setup(&db, &stores, &admin).await;
    let path = format!("/api/v2/sales?storeId={}&fields=totalSales", stores[0]);
    warm(&admin, &path).await;

    redis.stop();
    // Requests keep succeeding from Postgres; health says degraded.
    for _ in 0..5 {
        let (st, body) = admin.get(&path).await;
        assert_eq!(st, 200);
        assert!(total(&body) > 0.0);
    }
    let (st, health) = anon.get("/health").await;
    assert_eq!(st, 200);
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(stats(&admin).await["healthy"], false);

    let _redis = OwnRedis::start(port);
    eventually(
        Duration::from_secs(30),
        "health ok after redis restart",
        || async {
            let (_, h) = anon.get("/health").await;
            (h["status"] == "ok").then_some(())
        },
    )
    .await;
    // Hits resume.
    eventually(Duration::from_secs(30), "cache hits again", || async {
        let h0 = stats(&admin).await["hits"].as_u64().unwrap();
        admin.get(&path).await;
        admin.get(&path).await;
        (stats(&admin).await["hits"].as_u64().unwrap() > h0).then_some(())
    })
    .await;
    server.stop().await;
}

/// A list filtered by region depends on the stores' regions: a store
/// moved to another region leaves the cached page at once.
#[tokio::test]
async fn a_region_filtered_page_follows_its_stores_region() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let admin = Api::new(&server, Some(&token));
    setup(&db, &stores, &admin).await;
    let s = stores[0];
    let region: String = sqlx::query_scalar("SELECT region FROM sales.stores WHERE id = $1")
        .bind(s)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let path =
        format!("/api/v2/sales?storeId={s}&year=2024&month=1&region={region}&fields=totalSales");
    warm(&admin, &path).await;
    let (_, body) = admin.get(&path).await;
    assert_eq!(body["data"].as_array().map(Vec::len), Some(1), "{body}");
    sqlx::query("UPDATE sales.stores SET region = region || '-moved' WHERE id = $1")
        .bind(s)
        .execute(&db.pool)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the page without the moved store",
        || async {
            let (_, b) = admin.get(&path).await;
            (b["data"].as_array().map(Vec::len) == Some(0)).then_some(())
        },
    )
    .await;
    server.stop().await;
}

/// TRUNCATE fires no row trigger; its `table-truncated` event clears every
/// cached answer, on the first level and in Redis alike.
#[tokio::test]
async fn a_truncated_table_leaves_nothing_cached() {
    let db = TestDb::new().await;
    let stores = db.stores(2).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let admin = Api::new(&server, Some(&token));
    setup(&db, &stores, &admin).await;
    let page = format!("/api/v2/sales?storeId={}&fields=totalSales", stores[0]);
    let summary = format!("/api/v2/sales/summary?storeId={}", stores[1]);
    for path in [&page, &summary] {
        warm(&admin, path).await;
    }
    let (_, before) = admin.get(&summary).await;
    assert!(
        before["data"].as_array().is_some_and(|d| !d.is_empty()),
        "{before}"
    );

    sqlx::query("TRUNCATE sales.monthly_sales")
        .execute(&db.pool)
        .await
        .unwrap();
    let kind: String = sqlx::query_scalar("SELECT kind FROM sales.events ORDER BY id DESC LIMIT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(kind, "table-truncated");
    eventually(Duration::from_secs(30), "the page empty", || async {
        let (_, b) = admin.get(&page).await;
        b["data"]
            .as_array()
            .is_some_and(|d| d.is_empty())
            .then_some(())
    })
    .await;
    let (_, after) = admin.get(&summary).await;
    assert_ne!(after["data"], before["data"], "{after}");
    server.stop().await;
}

/// An answer computed again with the same data has the same ETag, so a
/// client's `If-None-Match` still gets a 304 after the entry was dropped.
#[tokio::test]
async fn an_answer_computed_again_keeps_its_etag() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "a@example.com", "admin", &[]).await;
    let admin = Api::new(&server, Some(&token));
    setup(&db, &stores, &admin).await;
    for path in [
        format!("/api/v2/sales?storeId={}&fields=totalSales", stores[0]),
        format!("/api/v2/sales/summary?storeId={}", stores[0]),
    ] {
        let r = admin.req(reqwest::Method::GET, &path).send().await.unwrap();
        let etag = r.headers()["etag"].to_str().unwrap().to_string();
        let (st, body) = admin.post("/api/admin/cache/clear", &json!({})).await;
        assert_eq!(st, 200, "{body}");
        let r = admin
            .req(reqwest::Method::GET, &path)
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 304, "{path}");
        assert_eq!(r.headers()["x-cache"], "miss", "{path}: computed again");
    }
    server.stop().await;
}

/// A TCP proxy to a Redis that can lose what is sent through it, as a
/// network partition does: while `cut`, bytes from the client are read and
/// dropped (a command sent then never reaches Redis, unlike one sent to a
/// stopped process, which runs once it resumes); `heal` closes every
/// connection made so far, so clients connect again.
struct RedisHole {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reset: tokio::sync::watch::Sender<u64>,
}

impl RedisHole {
    async fn start(upstream: u16) -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (reset, reset_rx) = tokio::sync::watch::channel(0u64);
        let c = cut.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let (cut, mut r1, mut r2) = (c.clone(), reset_rx.clone(), reset_rx.clone());
                r1.mark_unchanged();
                r2.mark_unchanged();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    loop {
                        tokio::select! {
                            _ = r1.changed() => return,
                            n = cr.read(&mut buf) => match n {
                                Ok(0) | Err(_) => return,
                                Ok(n) if !cut.load(Ordering::Acquire) => {
                                    if sw.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                                Ok(_) => {}
                            },
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    loop {
                        tokio::select! {
                            _ = r2.changed() => return,
                            n = sr.read(&mut buf) => match n {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if cw.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            },
                        }
                    }
                });
            }
        });
        Self { port, cut, reset }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Release);
    }

    fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::Release);
        self.reset.send_modify(|g| *g += 1);
    }
}

/// The position up to which invalidations were applied (`{prefix}:relayed:{epoch}`)
/// is not recorded past one that failed and was not made good: with one
/// instance, an invalidation lost in a partition from Redis, a later one
/// applied once it has healed, and the instance restarted before any read
/// made the loss good, the new instance does not serve the entry the lost
/// one left stale (before, the later position was recorded, the new
/// instance found nothing to catch up on, and served it until `CACHE_TTL`).
#[tokio::test]
async fn a_lost_invalidation_is_not_recorded_as_applied() {
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let s = stores[0];
    let port = free_port();
    let _redis = OwnRedis::start(port);
    let direct = format!("redis://127.0.0.1:{port}");
    eventually(Duration::from_secs(30), "private redis up", || async {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| ())
    })
    .await;
    let hole = RedisHole::start(port).await;
    let url = format!("redis://127.0.0.1:{}", hole.port);
    let settings = [
        ("REDIS_URL", url.as_str()),
        ("REDIS_TIMEOUT", "1s"),
        ("CACHE_L1_TTL", "0"),
    ];
    let one = db.server(&settings).await;
    let (_, token) = user_token(&db, &one, "a@example.com", "admin", &[]).await;
    let a1 = Api::new(&one, Some(&token));
    let anon = Api::new(&one, None);
    setup(&db, &stores, &a1).await;
    relay_caught_up(&db, &one).await;
    let path = format!("/api/v2/sales?storeId={s}&year=2024&month=1&fields=totalSales");
    warm(&a1, &path).await;
    let (_, b) = a1.get(&path).await;
    assert_eq!(total(&b), 280.0 * s as f64, "{b}");

    // Written by plain SQL while the server is cut off from Redis: the
    // relay's invalidation of it is lost, counted as an error. No read
    // through the server from here on (a read makes the loss good).
    let errors = stats(&a1).await["errors"].as_u64().unwrap();
    hole.cut();
    let write = |m: i32, sales: i32| {
        sqlx::query(
            "UPDATE sales.monthly_sales SET daily_data = jsonb_build_object('1', jsonb_build_object('sales', $2))
             WHERE store_id = $1 AND year = 2024 AND month = $3",
        )
        .bind(s)
        .bind(sales)
        .bind(m)
        .execute(&db.pool)
    };
    write(1, 7).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "the relay's invalidation failed",
        || async { (stats(&a1).await["errors"].as_u64().unwrap() > errors).then_some(()) },
    )
    .await;
    hole.heal();
    eventually(Duration::from_secs(30), "redis healthy again", || async {
        let (_, h) = anon.get("/health").await;
        (h["status"] == "ok").then_some(())
    })
    .await;
    // Another month written and relayed, its invalidation applied.
    write(2, 8).await.unwrap();
    let newest: i64 = sqlx::query_scalar("SELECT max(seq) FROM sales.events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let epoch: String = sqlx::query_scalar("SELECT sales.event_log_epoch()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let relayed = || {
        let out = std::process::Command::new("redis-cli")
            .args([
                "-u",
                &direct,
                "GET",
                &format!("{}:relayed:{epoch}", db.name),
            ])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<i64>()
            .unwrap_or(0)
    };
    eventually(
        Duration::from_secs(30),
        "the later position recorded",
        || async { (relayed() >= newest).then_some(()) },
    )
    .await;
    one.stop().await;

    let two = db.server(&settings).await;
    let a2 = Api::new(&two, Some(&token));
    let (st, b) = a2.get(&path).await;
    assert_eq!((st, total(&b)), (200, 7.0), "{b}");
    two.stop().await;
}

/// A log's relayed position lives `RELAYED_TTL` from its last mark, so the
/// positions of logs no instance relays any more (a restored dump's old
/// epoch, the timeline before a promotion) do not stay in Redis for good
/// (they used to: one key per restore, recovery or promotion). Each mark
/// renews it.
#[tokio::test]
async fn the_relayed_position_expires_unless_marked_again() {
    use sales_server::cache::RELAYED_TTL;
    let db = TestDb::new().await;
    let stores = db.stores(1).await;
    let server = db.server(&[]).await;
    let epoch: String = sqlx::query_scalar("SELECT sales.event_log_epoch()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let key = format!("{}:relayed:{epoch}", db.name);
    let redis = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-u", &redis_url()])
            .args(args)
            .output()
            .expect("redis-cli");
        assert!(out.status.success(), "redis-cli {args:?}");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<i64>()
            .unwrap_or(-3)
    };
    let limit = RELAYED_TTL.as_millis() as i64;
    for sales in [5, 6] {
        sqlx::query(
            "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
             VALUES ($1, 2024, 1, jsonb_build_object('1', jsonb_build_object('sales', $2)))
             ON CONFLICT (store_id, year, month) DO UPDATE SET daily_data = EXCLUDED.daily_data",
        )
        .bind(stores[0])
        .bind(sales)
        .execute(&db.pool)
        .await
        .unwrap();
        let newest: i64 = sqlx::query_scalar("SELECT max(seq) FROM sales.events")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        eventually(Duration::from_secs(30), "the position recorded", || async {
            (redis(&["GET", &key]) >= newest).then_some(())
        })
        .await;
        let ttl = redis(&["PTTL", &key]);
        assert!(ttl > 600_000 && ttl <= limit, "{key}: PTTL {ttl}");
        // Shortened, as time would: the next mark renews it.
        assert_eq!(redis(&["PEXPIRE", &key, "600000"]), 1);
    }
    server.stop().await;
}
