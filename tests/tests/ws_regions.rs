//! The bounded room for region names that clients introduce, filled: a
//! region that gets its first store afterwards can still be followed from
//! that store's event on, before any sales event of it. (Its own test
//! binary: the region names are the process's, and filling the room would
//! change what other tests' made-up regions are answered.)

mod ws_common;

use sales_e2e::TestDb;
use std::time::Duration;
use ws_common::*;

#[tokio::test]
async fn a_new_stores_region_can_be_followed_once_clients_filled_the_room() {
    let db = TestDb::new().await;
    let s = db.stores(1).await;
    let server = db.server(&[]).await;
    let staff = user(&db, "s@example.test", "staff", &[s[0]]).await;
    // One staff connection takes every name clients may introduce.
    let mut junk = Client::connect(server.addr, &token(staff, "staff", &[s[0]])).await;
    let mut refused = None;
    for i in 0..1_100 {
        let name = format!("region-made-up-{i}");
        let r = junk.subscribe(&name).await;
        if r["type"] == "error" {
            assert_eq!(r["code"], "unknown_channel", "{r}");
            refused = Some(i);
            break;
        }
    }
    assert!(
        refused.is_some(),
        "the room for clients' names never filled"
    );

    // A store in a region no store had: a store event, no sales event.
    let region = format!("Fresh-{}", db.name);
    let store: i64 = sqlx::query_scalar(
        "INSERT INTO sales.stores (code, name, region) VALUES ('FRESH1', 'Fresh', $1) RETURNING id",
    )
    .bind(&region)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let channel = format!("region-{region}");
    let mut follower = Client::connect(server.addr, &token(999, "admin", &[])).await;
    // As soon as the relay has read the store's event (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while follower.subscribe(&channel).await["type"] != "subscribed" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{channel} still unknown 10 s after its first store"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    upsert(&db, vec![record(store, 2024, 1, 1, 10)]).await;
    let e = follower.event().await;
    assert_eq!(e["data"]["storeId"], store, "{e}");
    server.stop().await;
}
