//! What a client can rely on beyond "every event once": a row's `version`
//! never goes backwards at any client (live, or across a resume seam), even
//! with overlapping transactions on the same rows; one client cannot delay
//! another's resume; a user's connections are capped; a row moved to
//! another store by plain SQL reaches the old store's subscribers as a
//! deletion of the old key (never the new payload) and clears the old
//! store-month's cached answers.

mod ws_common;

use futures_util::SinkExt;
use rand::Rng;
use sales_e2e::{eventually, TestDb};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use ws_common::*;

/// Checks that, per row, versions only go up in `frames`; returns how many
/// sales events there were.
fn assert_versions_go_up(name: &str, frames: &[Value]) -> usize {
    let mut last: HashMap<i64, i64> = HashMap::new();
    let mut n = 0;
    for f in frames {
        let kind = f["event"].as_str().unwrap_or("");
        if !kind.starts_with("sales-data-") {
            continue;
        }
        n += 1;
        let (row, v) = (
            f["data"]["id"].as_i64().unwrap(),
            f["data"]["version"].as_i64().unwrap(),
        );
        if let Some(p) = last.insert(row, v) {
            assert!(p < v, "{name}: row {row} version {v} after {p}");
        }
    }
    n
}

/// Reads frames into `got` until aborted.
fn collect(mut c: Client, got: Arc<Mutex<Vec<Value>>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(f) = c.frame().await {
            if f.get("type").is_none() {
                got.lock().unwrap().push(f);
            }
        }
    })
}

#[tokio::test]
async fn overlapping_transactions_on_the_same_rows_never_send_a_version_backwards() {
    let db = TestDb::new().await;
    let s = db.stores(2).await;
    let (s1, s2) = (s[0], s[1]);
    let server = db.server(&[]).await;
    // Four shared rows, and one private row per writer (written first, so
    // that each transaction has started writing before it queues for the
    // shared rows' locks).
    let mut seed = vec![];
    for (st, m) in [(s1, 1), (s1, 2), (s2, 1), (s2, 2)] {
        seed.push(record(st, 2024, m, 1, 1));
    }
    for w in 0..6 {
        seed.push(record(if w % 2 == 0 { s1 } else { s2 }, 2025, 1 + w, 1, 1));
    }
    upsert(&db, seed).await;
    // Start counting once the relay has passed the seed's events (a server
    // started right after a commit may still relay it).
    sales_e2e::relay_caught_up(&db, &server).await;

    let mut clients = vec![];
    for (name, role, stores) in [
        ("admin", "admin", vec![s1, s2]),
        ("staff s1", "staff", vec![s1]),
        ("staff s2", "staff", vec![s2]),
    ] {
        let mut c = Client::connect(
            server.addr,
            &token(900 + clients.len() as i64, role, &stores),
        )
        .await;
        for st in &stores {
            c.subscribe(&format!("sales-data-{st}")).await;
        }
        let got = Arc::new(Mutex::new(vec![]));
        let task = collect(c, got.clone());
        clients.push((name, got, task));
    }
    // One client leaves half-way and resumes while the writes go on.
    let resumer_token = token(950, "admin", &[]);
    let mut resumer = Client::connect(server.addr, &resumer_token).await;
    resumer.subscribe(&format!("sales-data-{s1}")).await;
    resumer.subscribe(&format!("sales-data-{s2}")).await;
    let start: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM sales.events")
        .fetch_one(&db.pool)
        .await
        .unwrap();

    let mut writers = vec![];
    for w in 0..6i32 {
        let pool = db.pool.clone();
        let own = if w % 2 == 0 { s1 } else { s2 };
        writers.push(tokio::spawn(async move {
            for i in 0..15 {
                let pause = Duration::from_millis(rand::thread_rng().gen_range(0..15));
                let mut tx = pool.begin().await.unwrap();
                sqlx::query(
                    "UPDATE sales.monthly_sales SET daily_data = daily_data || jsonb_build_object('2', jsonb_build_object('sales', $1::int))
                     WHERE store_id = $2 AND year = 2025 AND month = $3",
                )
                .bind(w * 100 + i)
                .bind(own)
                .bind(1 + w)
                .execute(&mut *tx)
                .await
                .unwrap();
                tokio::time::sleep(pause).await;
                // The shared rows, always in the same order (no deadlock);
                // one statement per row, so each row's lock is taken late.
                for (st, m) in [(s1, 1), (s1, 2), (s2, 1), (s2, 2)] {
                    sqlx::query(
                        "UPDATE sales.monthly_sales SET daily_data = daily_data || jsonb_build_object('3', jsonb_build_object('sales', $1::int))
                         WHERE store_id = $2 AND year = 2024 AND month = $3",
                    )
                    .bind(w * 100 + i)
                    .bind(st)
                    .bind(m)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                }
                tx.commit().await.unwrap();
            }
        }));
    }
    // The resumer reads a little, leaves, and comes back with its last id.
    let mut seen = vec![];
    for _ in 0..10 {
        seen.push(resumer.event().await);
    }
    let last_id = seen.last().unwrap()["id"].as_i64().unwrap();
    drop(resumer);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut back = Client::connect(server.addr, &resumer_token).await;
    back.send(json!({"type": "resume", "lastEventId": last_id,
                     "events": [format!("sales-data-{s1}"), format!("sales-data-{s2}")]}))
        .await;
    let back_got = Arc::new(Mutex::new(seen));
    let back_task = collect(back, back_got.clone());

    for w in writers {
        w.await.unwrap();
    }
    let log: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sales.events WHERE kind LIKE 'sales-data-%' AND id > $1",
    )
    .bind(start)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(log, 6 * 15 * 5);
    let mut per_store = vec![];
    for st in [s1, s2] {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sales.events WHERE kind LIKE 'sales-data-%' AND id > $1 AND store_id = $2",
        )
        .bind(start)
        .bind(st)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        per_store.push(n as usize);
    }
    // A last transaction writes a row of each store: once a client has
    // its last row's event, everything sent to it before has arrived too
    // (an event twice included), so the counts below are exact.
    let before: i64 = sqlx::query_scalar("SELECT max(id) FROM sales.events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    upsert(
        &db,
        vec![record(s1, 2026, 1, 1, 1), record(s2, 2026, 1, 1, 1)],
    )
    .await;
    let last: HashMap<i64, i64> = sqlx::query_as::<_, (i64, i64)>(
        "SELECT store_id, id FROM sales.events WHERE kind LIKE 'sales-data-%' AND id > $1",
    )
    .bind(before)
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(last.len(), 2, "{last:?}");
    let has_last = |got: &Mutex<Vec<Value>>, stores: &[i64]| {
        let got = got.lock().unwrap();
        stores
            .iter()
            .all(|st| got.iter().any(|e| e["id"].as_i64() == Some(last[st])))
    };
    let (n1, n2) = (per_store[0] + 1, per_store[1] + 1);
    for (name, got, task) in clients {
        let (want, stores) = match name {
            "admin" => (n1 + n2, vec![s1, s2]),
            "staff s1" => (n1, vec![s1]),
            _ => (n2, vec![s2]),
        };
        eventually(WAIT, name, || async {
            has_last(&got, &stores).then_some(())
        })
        .await;
        task.abort();
        let frames = got.lock().unwrap().clone();
        assert_eq!(
            assert_versions_go_up(name, &frames),
            want,
            "{name} got every event once"
        );
    }
    eventually(WAIT, "the resumer", || async {
        has_last(&back_got, &[s1, s2]).then_some(())
    })
    .await;
    back_task.abort();
    let frames = back_got.lock().unwrap().clone();
    assert_eq!(
        assert_versions_go_up("resumer", &frames),
        n1 + n2,
        "the resumer got every event once"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_delay_another_users_resume() {
    let db = TestDb::new().await;
    let stores = db.stores(5).await;
    // Tens of thousands of events: more than a socket's buffers hold.
    let mut batch = vec![];
    for (k, st) in stores.iter().enumerate() {
        for y in 0..50 {
            for m in 1..=12 {
                batch.push(record(*st, 2000 + y, m, 1 + (k as u32), 1));
            }
        }
    }
    for round in 0..12 {
        let records: Vec<Value> = batch
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r["dailyData"] = json!({"1": {"sales": round, "customers": 1}});
                r
            })
            .collect();
        for chunk in records.chunks(1000) {
            upsert(&db, chunk.to_vec()).await;
        }
    }
    let server = db.server(&[("WS_SEND_QUEUE", "16")]).await;
    let everything: Vec<String> = stores.iter().map(|s| format!("sales-data-{s}")).collect();

    // Twelve users resume from the start and never read a byte.
    let mut stuck = vec![];
    for u in 0..12 {
        let (mut ws, _) =
            tokio_tungstenite::connect_async(ws_url(server.addr, &token(500 + u, "admin", &[])))
                .await
                .unwrap();
        ws.send(Message::text(
            json!({"type": "resume", "lastEventId": 0, "events": everything}).to_string(),
        ))
        .await
        .unwrap();
        stuck.push(ws);
    }
    eventually(WAIT, "the stuck replays to fill their queues", || async {
        let s = server.state.hub.stats();
        (s["connections"]["resuming"].as_u64() == Some(12)
            && s["messages"]["replayed"].as_u64().unwrap_or(0) > 12 * 16)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Another user resumes from a recent event: answered at once.
    let recent: i64 = sqlx::query_scalar("SELECT max(id) - 3 FROM sales.events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let mut c = Client::connect(server.addr, &token(700, "admin", &[])).await;
    c.send(json!({"type": "resume", "lastEventId": recent, "events": [everything[4].clone()]}))
        .await;
    let resumed = tokio::time::timeout(Duration::from_secs(30), c.reply("resumed"))
        .await
        .expect("a resume answered while other users' replays are stuck");
    assert_eq!(resumed["lastEventId"], recent);
    // Answered while they were still stuck (each ends after its replay
    // timeout): not after them.
    assert_eq!(
        server.state.hub.stats()["connections"]["resuming"].as_u64(),
        Some(12),
        "the stuck replays had ended"
    );
    drop(stuck);
    server.stop().await;
}

#[tokio::test]
async fn a_user_has_at_most_64_connections() {
    let db = TestDb::new().await;
    let server = db.server(&[]).await;
    let t = token(42, "staff", &[]);
    let mut open = vec![];
    for _ in 0..64 {
        open.push(Client::connect(server.addr, &t).await);
    }
    let refused = tokio_tungstenite::connect_async(ws_url(server.addr, &t)).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 429),
        other => panic!("65th connection: {other:?}"),
    }
    // Another user is not affected; closing one makes room again.
    Client::connect(server.addr, &token(43, "staff", &[])).await;
    drop(open.pop());
    eventually(WAIT, "room for one more", || async {
        tokio_tungstenite::connect_async(ws_url(server.addr, &t))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_row_moved_by_sql_is_a_deletion_for_its_old_store_and_clears_its_cache() {
    let db = TestDb::new().await;
    let s = db.stores(2).await;
    let (old, new) = (s[0], s[1]);
    upsert(&db, vec![record(old, 2024, 3, 1, 10)]).await;
    let server = db.server(&[]).await;
    let admin = token(1, "admin", &[]);
    let http = reqwest::Client::new();
    let list = |store: i64| {
        http.get(format!(
            "http://{}/api/v2/sales?storeId={store}&year=2024&month=3",
            server.addr
        ))
        .bearer_auth(&admin)
        .send()
    };
    // Cache the old store-month's answer: read until it is a hit (a
    // starting instance misses without storing until its cache has caught
    // up with the log, which it does in the background).
    eventually(WAIT, "the old store-month's answer cached", || async {
        let r = list(old).await.ok()?;
        (r.headers()["x-cache"] == "hit").then_some(())
    })
    .await;

    let mut at_old = Client::connect(server.addr, &token(2, "staff", &[old])).await;
    at_old.subscribe(&format!("sales-data-{old}")).await;
    let mut at_new = Client::connect(server.addr, &token(3, "staff", &[new])).await;
    at_new.subscribe(&format!("sales-data-{new}")).await;

    sqlx::query("UPDATE sales.monthly_sales SET store_id = $1 WHERE store_id = $2")
        .bind(new)
        .bind(old)
        .execute(&db.pool)
        .await
        .unwrap();
    let gone = at_old.event().await;
    assert_eq!(gone["event"], "sales-data-deleted", "{gone}");
    assert_eq!(gone["data"]["storeId"], old);
    assert_eq!(gone["data"]["moved"], true);
    assert!(gone["data"].get("totalSales").is_none(), "{gone}");
    let arrived = at_new.event().await;
    assert_eq!(arrived["event"], "sales-data-updated");
    assert_eq!(arrived["data"]["storeId"], new);
    assert_eq!(arrived["id"], gone["id"]);

    // A read after the event never gets the old cached answer.
    let body: Value = list(old).await.unwrap().json().await.unwrap();
    assert_eq!(body["data"].as_array().map(Vec::len), Some(0), "{body}");
    server.stop().await;
}
