//! What holds delivery back is named: an event-writing transaction left open
//! holds back the events ordered after its first one; after a second it is
//! reported (pid, age, query start) in `/health` (holder details for admins
//! only), in the WebSocket stats and in `/metrics`; other transactions'
//! events wait for it and arrive, in order, when it ends. A transaction
//! that writes no events delays nothing.

mod ws_common;

use sales_e2e::{eventually, TestDb};
use serde_json::Value;
use std::time::Duration;
use ws_common::*;

async fn get(url: String, token: Option<&str>) -> reqwest::Response {
    let mut r = reqwest::Client::new().get(url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap()
}

#[tokio::test]
async fn a_long_event_writing_transaction_is_named_and_an_idle_one_delays_nothing() {
    let db = TestDb::new().await;
    let s = db.stores(2).await;
    let (s1, s2) = (s[0], s[1]);
    let server = db.server(&[]).await;
    let admin = token(1, "admin", &[]);
    let mut c = Client::connect(server.addr, &admin).await;
    c.subscribe(&format!("sales-data-{s2}")).await;

    // A transaction holding an xid but writing no events: no delay.
    let mut idle = db.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *idle)
        .await
        .unwrap();
    // The event arrives while the idle transaction is still open (one that
    // held delivery back would hold it until the rollback below).
    upsert(&db, vec![record(s2, 2024, 1, 1, 1)]).await;
    c.event().await;
    idle.rollback().await.unwrap();

    // An event-writing transaction left open.
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT sales.batch_upsert($1)")
        .bind(serde_json::json!([record(s1, 2024, 2, 1, 5)]))
        .execute(&mut *holder)
        .await
        .unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    // Another writer's event is ordered after it and waits.
    upsert(&db, vec![record(s2, 2024, 3, 1, 7)]).await;
    c.assert_no_event(Duration::from_millis(300)).await;

    let named = |v: &Value| {
        v.as_array()
            .is_some_and(|a| a.iter().any(|h| h["pid"].as_i64() == Some(pid as i64)))
    };
    let health: Value = eventually(WAIT, "/health names the holder", || async {
        let v: Value = get(server.url("/health"), Some(&admin))
            .await
            .json()
            .await
            .ok()?;
        named(&v["eventDelivery"]["holders"]).then_some(v)
    })
    .await;
    let d = &health["eventDelivery"];
    assert_eq!(d["heldBack"], true, "{d}");
    assert!(d["heldBackSeconds"].as_f64().unwrap() > 1.0, "{d}");
    let h = &d["holders"][0];
    assert!(h["queryStart"].is_string() && h["since"].is_string(), "{h}");
    // Anonymous callers learn that delivery is held back, not by whom.
    let anon: Value = get(server.url("/health"), None).await.json().await.unwrap();
    assert_eq!(anon["eventDelivery"]["heldBack"], true);
    assert!(anon["eventDelivery"]["holders"].is_null(), "{anon}");

    let stats: Value = get(server.url("/api/admin/websocket/stats"), Some(&admin))
        .await
        .json()
        .await
        .unwrap();
    assert!(named(&stats["relay"]["heldBackBy"]), "{stats}");
    let metrics = get(server.url("/metrics"), Some(&admin))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!("events_delivery_held_back_seconds{{pid=\"{pid}\"")),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("held_back"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Delivery has been held back for more than a second (`heldBackSeconds`
    // above), and the waiting event has still not arrived.
    c.assert_no_event(Duration::ZERO).await;

    // It ends: the waiting event arrives, and nothing is named any more.
    holder.commit().await.unwrap();
    let e = c.event().await;
    assert_eq!(e["data"]["month"], 3, "{e}");
    eventually(WAIT, "no holder after the commit", || async {
        let v: Value = get(server.url("/health"), Some(&admin))
            .await
            .json()
            .await
            .ok()?;
        (v["eventDelivery"]["heldBack"] == false).then_some(())
    })
    .await;
    // A holder that ended leaves no series behind (each holder, and each
    // statement of one, used to stay a series at 0 for good).
    let metrics = get(server.url("/metrics"), Some(&admin))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        !metrics.contains("events_delivery_held_back_seconds{"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("held_back"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(metrics.contains("events_delivery_holders 0"), "{metrics}");
    server.stop().await;
}
