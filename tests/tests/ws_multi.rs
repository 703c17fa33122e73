//! Several instances on one database: each has its own LISTEN connection and
//! delivers every event to its own clients, whichever instance (or plain SQL)
//! made the write. Eight concurrent writers: every client sees every event it
//! may see exactly once, in log order, and each row's versions only go up.

mod ws_common;

use rand::Rng;
use sales_e2e::{eventually, server_bin, ServerProc, TestDb};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use ws_common::*;

/// A server process started by the test (killed on drop).
fn spawn_server(db: &TestDb) -> ServerProc {
    let mut env = db.env();
    env.push(("RATE_LIMIT_PER_MINUTE".into(), "100000".into()));
    ServerProc::start(&server_bin(), &env).unwrap()
}

async fn post_batch(addr: SocketAddr, records: Vec<Value>) {
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/api/v2/sales/batch"))
        .bearer_auth(token(998, "admin", &[]))
        .json(&json!({"salesDataArray": records}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
}

#[tokio::test]
async fn two_server_processes_each_deliver_every_event() {
    let db = TestDb::new().await;
    let s1 = db.stores(1).await[0];
    let a = spawn_server(&db);
    let mut b = spawn_server(&db);

    eventually(WAIT, "one LISTEN connection per instance", || async {
        let relays: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'sales-server-relay'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        (relays == 2).then_some(())
    })
    .await;

    let t = token(5, "manager", &[s1]);
    let mut on_a = Client::connect(a.addr, &t).await;
    let mut on_b = Client::connect(b.addr, &t).await;
    for c in [&mut on_a, &mut on_b] {
        c.subscribe(&format!("sales-data-{s1}")).await;
        c.subscribe("announcements").await;
    }

    // Through instance A's REST API, then through SQL, then an announcement.
    post_batch(a.addr, vec![record(s1, 2024, 5, 1, 10)]).await;
    upsert(&db, vec![record(s1, 2024, 5, 2, 20)]).await;
    sqlx::query("SELECT sales.announce('both instances')")
        .execute(&db.pool)
        .await
        .unwrap();
    let got_a = on_a.events(3).await;
    let got_b = on_b.events(3).await;
    assert_eq!(got_a, got_b, "both instances deliver the same frames");
    let kinds: Vec<&str> = got_b.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "sales-data-created",
            "sales-data-updated",
            "system-announcement"
        ]
    );

    // SIGTERM to instance B: its clients get 1001 and it exits cleanly.
    let pid = b.pid().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let frame = on_b.closed().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1001);
    let status = b.exited(WAIT).await.expect("exit in time");
    assert!(status.success(), "{status}");

    // A keeps serving.
    upsert(&db, vec![record(s1, 2024, 5, 3, 30)]).await;
    assert_eq!(on_a.event().await["event"], "sales-data-updated");
    drop(a);
}

/// A client reading in the background into a shared list.
struct Collector {
    name: &'static str,
    stores: Vec<i64>,
    got: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

async fn collector(name: &'static str, addr: SocketAddr, t: &str, stores: &[i64]) -> Collector {
    let mut c = Client::connect(addr, t).await;
    for s in stores {
        assert_eq!(
            c.subscribe(&format!("sales-data-{s}")).await["type"],
            "subscribed"
        );
    }
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let task = tokio::spawn(async move {
        loop {
            let e = c.event().await;
            sink.lock().unwrap().push(e);
        }
    });
    Collector {
        name,
        stores: stores.to_vec(),
        got,
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_writers_every_client_sees_each_allowed_event_once_in_order() {
    let db = TestDb::new().await;
    let s = db.stores(4).await;
    let overrides = [("RATE_LIMIT_PER_MINUTE", "100000")];
    let a = db.server(&overrides).await;
    let b = db.server(&overrides).await;

    let mut forbidden = Client::connect(b.addr, &token(30, "staff", &[s[0], s[1]])).await;
    assert_eq!(
        forbidden.subscribe(&format!("sales-data-{}", s[2])).await["code"],
        "forbidden"
    );
    drop(forbidden);
    let clients = vec![
        collector("admin on A", a.addr, &token(1, "admin", &[]), &s).await,
        collector("admin on B", b.addr, &token(2, "admin", &[]), &s).await,
        collector(
            "staff on B",
            b.addr,
            &token(3, "staff", &[s[0], s[1]]),
            &[s[0], s[1]],
        )
        .await,
        collector(
            "manager on A",
            a.addr,
            &token(4, "manager", &[s[2], s[3]]),
            &[s[2], s[3]],
        )
        .await,
        collector("staff on A", a.addr, &token(5, "staff", &[s[1]]), &[s[1]]).await,
    ];
    let start: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM sales.events")
        .fetch_one(&db.pool)
        .await
        .unwrap();

    // Each writer owns its rows (year 2030 + w), so each row's versions are
    // written in sequence while the stores' events interleave.
    let mut writers = Vec::new();
    for w in 0..8i32 {
        let pool = db.pool.clone();
        let (stores, addr_a, addr_b) = (s.clone(), a.addr, b.addr);
        writers.push(tokio::spawn(async move {
            let year = 2030 + w;
            for i in 0..30 {
                let pick: Vec<(i64, i32)> = {
                    let mut rng = rand::thread_rng();
                    let n = rng.gen_range(1..=4);
                    (0..n).map(|_| (stores[rng.gen_range(0..4)], rng.gen_range(1..=6))).collect()
                };
                let records: Vec<Value> = pick
                    .iter()
                    .map(|(st, m)| record(*st, year, *m, 1 + (i as u32 % 28), (w * 1000 + i) as i64))
                    .collect();
                match (w % 4, i % 3) {
                    (1, _) => post_batch(if i % 2 == 0 { addr_a } else { addr_b }, records).await,
                    (3, 2) if i > 5 => {
                        // Plain SQL UPDATE of several of its own rows at once.
                        sqlx::query(
                            "UPDATE sales.monthly_sales SET daily_data = daily_data || jsonb_build_object('2', jsonb_build_object('sales', $1::int))
                             WHERE year = $2 AND store_id = $3",
                        )
                        .bind(i)
                        .bind(year)
                        .bind(pick[0].0)
                        .execute(&pool)
                        .await
                        .unwrap();
                    }
                    _ => {
                        sqlx::query("SELECT sales.batch_upsert($1)").bind(Value::Array(records)).execute(&pool).await.unwrap();
                    }
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    // A last transaction writes a row of every store: each client's last
    // event is one of its rows, so once that has arrived, anything sent
    // before it (an event too many, or one twice) has arrived as well.
    upsert(&db, s.iter().map(|st| record(*st, 2029, 1, 1, 1)).collect()).await;

    let log: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT id, store_id, row_id, row_version FROM sales.events
         WHERE kind LIKE 'sales-data-%' AND id > $1 ORDER BY seq",
    )
    .bind(start)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(log.len() > 200, "{} events", log.len());

    for c in &clients {
        let expected: Vec<i64> = log
            .iter()
            .filter(|e| c.stores.contains(&e.1))
            .map(|e| e.0)
            .collect();
        let last = *expected.last().unwrap();
        eventually(Duration::from_secs(60), c.name, || async {
            let got = c.got.lock().unwrap();
            got.iter()
                .any(|e| e["id"].as_i64() == Some(last))
                .then_some(())
        })
        .await;
    }
    for c in &clients {
        c.task.abort();
        let got = c.got.lock().unwrap().clone();
        let expected: Vec<i64> = log
            .iter()
            .filter(|e| c.stores.contains(&e.1))
            .map(|e| e.0)
            .collect();
        let ids: Vec<i64> = got.iter().map(|e| e["id"].as_i64().unwrap()).collect();
        assert_eq!(
            ids, expected,
            "{}: every allowed event exactly once, in log order",
            c.name
        );
        let mut versions: HashMap<i64, i64> = HashMap::new();
        for e in &got {
            let (row, v) = (
                e["data"]["id"].as_i64().unwrap(),
                e["data"]["version"].as_i64().unwrap(),
            );
            let prev = versions.insert(row, v);
            assert!(
                prev.is_none_or(|p| p < v),
                "{}: row {row} version {v} after {prev:?}",
                c.name
            );
        }
    }
    a.stop().await;
    b.stop().await;
}
