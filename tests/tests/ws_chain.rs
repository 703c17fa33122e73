//! Following a whole chain: `all-stores` and `region-<name>` carry the
//! sales events of every store (of a region), so a dashboard needs one
//! subscription however many stores there are; a scoped token gets its
//! stores' events only. Resume replays them like any channel.

mod ws_common;

use sales_e2e::TestDb;
use serde_json::json;
use ws_common::*;

#[tokio::test]
async fn chain_and_region_channels() {
    let db = TestDb::new().await;
    // T001 North, T002 South, T003 East, T004 North.
    let s = db.stores(4).await;
    let manager_id = user(&db, "m@example.test", "manager", &[s[0], s[1]]).await;
    let server = db.server(&[]).await;

    let mut admin = Client::connect(server.addr, &token(999, "admin", &[])).await;
    for ch in ["all-stores", "region-North"] {
        assert_eq!(
            admin.subscribe(ch).await,
            json!({"type": "subscribed", "event": ch})
        );
    }
    let mut north = Client::connect(server.addr, &token(998, "admin", &[])).await;
    assert_eq!(north.subscribe("region-North").await["type"], "subscribed");
    let mut manager =
        Client::connect(server.addr, &token(manager_id, "manager", &[s[0], s[1]])).await;
    assert_eq!(manager.subscribe("all-stores").await["type"], "subscribed");
    assert_eq!(
        manager.subscribe("region-North").await["type"],
        "subscribed"
    );

    // One row per store, in store order (one statement, one transaction).
    upsert(&db, (0..4).map(|i| record(s[i], 2024, 1, 1, 10)).collect()).await;

    // all-stores: every store's event once (the admin is on region-North
    // too: a connection reached twice gets one frame).
    let got = admin.events(4).await;
    let stores: Vec<i64> = got
        .iter()
        .map(|e| e["data"]["storeId"].as_i64().unwrap())
        .collect();
    assert_eq!(stores, s);
    assert!(got.iter().all(|e| e["event"] == "sales-data-created"));
    admin.assert_nothing_more(&db, &server).await;

    // region-North: T001 and T004.
    let got = north.events(2).await;
    assert_eq!(
        got.iter()
            .map(|e| e["data"]["storeId"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![s[0], s[3]]
    );
    north.assert_nothing_more(&db, &server).await;

    // The manager: their two stores on all-stores, only T001 on region-North
    // (one frame each).
    let got = manager.events(2).await;
    assert_eq!(
        got.iter()
            .map(|e| e["data"]["storeId"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![s[0], s[1]]
    );
    manager.assert_nothing_more(&db, &server).await;

    // A region with no stores is a channel like any (nothing arrives), a
    // name longer than a region can be is refused.
    assert_eq!(
        north.subscribe("region-Nowhere").await["type"],
        "subscribed"
    );
    let long = format!("region-{}", "x".repeat(101));
    assert_eq!(north.subscribe(&long).await["type"], "error");
    // The longest name a region can have, in 2-byte letters, is confirmed
    // whole (it was cut at 200 bytes, so the answer named another channel).
    let widest = format!("region-{}", "ö".repeat(100));
    let ack = north.subscribe(&widest).await;
    assert_eq!(ack["event"], widest.as_str(), "{ack}");
    north
        .send(json!({"type": "unsubscribe", "event": widest}))
        .await;
    assert_eq!(north.reply("unsubscribed").await["event"], widest.as_str());
    // A new name no store can have is refused, not given room among the
    // names clients introduce (the REST region filter refuses the same).
    for made_up in ["region- ", "region-\u{0}", "region-North "] {
        let e = north.subscribe(made_up).await;
        assert_eq!(e["code"], "unknown_channel", "{made_up:?}: {e}");
    }

    // Resume replays a region channel: each replayed event's store is
    // placed in its region as the relay places live ones.
    let mut back = Client::connect(server.addr, &token(997, "admin", &[])).await;
    back.send(json!({"type": "resume", "lastEventId": 0, "events": ["region-North"]}))
        .await;
    let mut replayed = Vec::new();
    let mut resumed = None;
    while replayed.len() < 2 || resumed.is_none() {
        let f = back.frame().await.expect("open");
        match f["type"].as_str() {
            Some("resumed") => resumed = Some(f),
            Some("subscribed") => {}
            None => replayed.push(f["data"]["storeId"].as_i64().unwrap()),
            _ => panic!("unexpected frame {f}"),
        }
    }
    assert_eq!(replayed, vec![s[0], s[3]]);
    back.assert_nothing_more(&db, &server).await;
}

/// Region names are bounded per instance, but that bound never decides
/// whether a real region can be followed: every region with stores is known
/// from the start, and leaving a region nobody follows adds no name. A
/// client that leaves a thousand made-up regions does not stop another from
/// following a real one.
#[tokio::test]
async fn made_up_region_names_do_not_crowd_out_real_ones() {
    let db = TestDb::new().await;
    let s = db.stores(1).await;
    // A region no other test names, whose stores have no events yet.
    let region = format!("Fjord-{}", db.name);
    sqlx::query("UPDATE sales.stores SET region = $1 WHERE id = $2")
        .bind(&region)
        .bind(s[0])
        .execute(&db.pool)
        .await
        .unwrap();
    let server = db.server(&[]).await;
    let staff = user(&db, "s@example.test", "staff", &[s[0]]).await;
    let mut junk = Client::connect(server.addr, &token(staff, "staff", &[s[0]])).await;
    for i in 0..1_100 {
        junk.send(json!({"type": "unsubscribe", "event": format!("region-made-up-{i}")}))
            .await;
        assert_eq!(junk.reply("unsubscribed").await["type"], "unsubscribed");
    }
    let channel = format!("region-{region}");
    let mut follower = Client::connect(server.addr, &token(999, "admin", &[])).await;
    assert_eq!(
        follower.subscribe(&channel).await,
        json!({"type": "subscribed", "event": channel})
    );
    upsert(&db, vec![record(s[0], 2024, 1, 1, 10)]).await;
    assert_eq!(follower.event().await["data"]["storeId"], s[0]);
    server.stop().await;
}

/// A row moved by plain SQL from a store a subscriber may not see reaches
/// it without what the event says of that store (its id, the old month and
/// the old days); a subscriber that may see both gets all of it.
#[tokio::test]
async fn a_row_moved_in_from_a_hidden_store_shows_nothing_of_it() {
    let db = TestDb::new().await;
    let s = db.stores(2).await;
    let staff = user(&db, "one@example.test", "staff", &[s[0]]).await;
    let server = db.server(&[]).await;
    let channel = format!("sales-data-{}", s[0]);
    let mut scoped = Client::connect(server.addr, &token(staff, "staff", &[s[0]])).await;
    assert_eq!(scoped.subscribe(&channel).await["type"], "subscribed");
    let mut admin = Client::connect(server.addr, &token(999, "admin", &[])).await;
    assert_eq!(admin.subscribe(&channel).await["type"], "subscribed");
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         VALUES ($1, 2024, 3, '{\"1\": {\"sales\": 5}}') RETURNING id",
    )
    .bind(s[1])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE sales.monthly_sales SET store_id = $2, daily_data = '{\"1\": {\"sales\": 6}}' WHERE id = $1",
    )
    .bind(id)
    .bind(s[0])
    .execute(&db.pool)
    .await
    .unwrap();
    let full = admin.event().await;
    assert_eq!(full["data"]["previousStoreId"], s[1], "{full}");
    assert_eq!(full["data"]["previousDays"]["1"]["sales"], 5, "{full}");
    let shown = scoped.event().await;
    assert_eq!(shown["event"], "sales-data-updated");
    assert_eq!(shown["data"]["storeId"], s[0]);
    assert_eq!(shown["data"]["id"], id);
    for gone in [
        "previousStoreId",
        "previousDays",
        "previousYear",
        "previousMonth",
    ] {
        assert!(shown["data"].get(gone).is_none(), "{gone}: {shown}");
    }
    server.stop().await;
}

/// A row moved out to a store the follower may not see reaches a scoped
/// whole-chain follower of its old store as the old key's deletion
/// (`moved: true`), as it reaches that store's own subscribers; one who may
/// see both stores gets the update.
#[tokio::test]
async fn a_row_moved_away_from_a_whole_chain_follower_is_deleted_for_it() {
    let db = TestDb::new().await;
    let s = db.stores(2).await;
    let staff = user(&db, "old@example.test", "staff", &[s[0]]).await;
    let both = user(&db, "both@example.test", "manager", &[s[0], s[1]]).await;
    let server = db.server(&[]).await;
    let mut scoped = Client::connect(server.addr, &token(staff, "staff", &[s[0]])).await;
    assert_eq!(scoped.subscribe("all-stores").await["type"], "subscribed");
    let mut wide = Client::connect(server.addr, &token(both, "manager", &[s[0], s[1]])).await;
    assert_eq!(wide.subscribe("all-stores").await["type"], "subscribed");
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         VALUES ($1, 2024, 3, '{\"1\": {\"sales\": 5}}') RETURNING id",
    )
    .bind(s[0])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(scoped.event().await["event"], "sales-data-created");
    assert_eq!(wide.event().await["event"], "sales-data-created");
    sqlx::query("UPDATE sales.monthly_sales SET store_id = $2 WHERE id = $1")
        .bind(id)
        .bind(s[1])
        .execute(&db.pool)
        .await
        .unwrap();
    let gone = scoped.event().await;
    assert_eq!(gone["event"], "sales-data-deleted", "{gone}");
    assert_eq!(gone["data"]["storeId"], s[0], "{gone}");
    assert_eq!(gone["data"]["moved"], true, "{gone}");
    let moved = wide.event().await;
    assert_eq!(moved["event"], "sales-data-updated", "{moved}");
    assert_eq!(moved["data"]["storeId"], s[1], "{moved}");
    wide.assert_nothing_more(&db, &server).await;
    scoped.assert_nothing_more(&db, &server).await;
    server.stop().await;
}

/// Replays `channel` from after event `last` on a new connection: the
/// replayed events' (event, storeId), in order.
async fn replay_region(addr: std::net::SocketAddr, last: i64, channel: &str) -> Vec<(String, i64)> {
    let mut c = Client::connect(addr, &token(996, "admin", &[])).await;
    c.send(json!({"type": "resume", "lastEventId": last, "events": [channel]}))
        .await;
    let mut got = Vec::new();
    loop {
        let f = c.frame().await.expect("open");
        match f["type"].as_str() {
            Some("resumed") => return got,
            Some("subscribed") => {}
            None => got.push((
                f["event"].as_str().unwrap().to_string(),
                f["data"]["storeId"].as_i64().unwrap(),
            )),
            _ => panic!("unexpected frame {f}"),
        }
    }
}

/// A store's region is read once its events are final, live and on replay
/// alike: a store created with its first row, moved to another region with
/// a change to a row, or deleted with its rows, each in one transaction,
/// reaches the followers of the region the transaction left it in, and a
/// resume from before any of it gives the same region's followers the same
/// events. (Live delivery read the regions with the long poll's snapshot,
/// older than the events it waited for: the new store's row reached no
/// region and the moved store's row went to the old one. A replay placed a
/// deleted store's rows in no region; the deletion event names it now.)
#[tokio::test]
async fn regions_are_read_as_the_events_left_them_live_and_on_replay() {
    let db = TestDb::new().await;
    let server = db.server(&[]).await;
    let mut a = Client::connect(server.addr, &token(999, "admin", &[])).await;
    let mut b = Client::connect(server.addr, &token(998, "admin", &[])).await;
    assert_eq!(a.subscribe("region-Upland").await["type"], "subscribed");
    assert_eq!(b.subscribe("region-Lowland").await["type"], "subscribed");
    let head = || async {
        sqlx::query_scalar::<_, i64>("SELECT coalesce(max(id), 0) FROM sales.events")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    let start = head().await;

    // A new store in Upland and its first row, one transaction.
    let store: i64 = {
        let mut tx = db.pool.begin().await.unwrap();
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO sales.stores (code, name, region) VALUES ('RG1', 'Regions', 'Upland') RETURNING id",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
             VALUES ($1, 2024, 1, '{\"1\": {\"sales\": 5}}')",
        )
        .bind(id)
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        id
    };
    let e = a.event().await;
    assert_eq!(
        (e["event"].as_str(), e["data"]["storeId"].as_i64()),
        (Some("sales-data-created"), Some(store)),
        "{e}"
    );
    b.assert_nothing_more(&db, &server).await;
    a.assert_nothing_more(&db, &server).await;
    assert_eq!(
        replay_region(server.addr, start, "region-Upland").await,
        [("sales-data-created".to_string(), store)]
    );
    let moved_at = head().await;

    // Moved to Lowland with a change to its row, one transaction.
    sqlx::raw_sql(&format!(
        "BEGIN;
         UPDATE sales.stores SET region = 'Lowland' WHERE id = {store};
         UPDATE sales.monthly_sales SET daily_data = '{{\"1\": {{\"sales\": 6}}}}' WHERE store_id = {store};
         COMMIT;"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let e = b.event().await;
    assert_eq!(
        (e["event"].as_str(), e["data"]["storeId"].as_i64()),
        (Some("sales-data-updated"), Some(store)),
        "{e}"
    );
    a.assert_nothing_more(&db, &server).await;
    b.assert_nothing_more(&db, &server).await;
    assert_eq!(
        replay_region(server.addr, moved_at, "region-Lowland").await,
        [("sales-data-updated".to_string(), store)]
    );
    assert_eq!(
        replay_region(server.addr, moved_at, "region-Upland").await,
        []
    );
    let deleted_at = head().await;

    // Deleted with its rows.
    sqlx::query("DELETE FROM sales.stores WHERE id = $1")
        .bind(store)
        .execute(&db.pool)
        .await
        .unwrap();
    let e = b.event().await;
    assert_eq!(
        (e["event"].as_str(), e["data"]["storeId"].as_i64()),
        (Some("sales-data-deleted"), Some(store)),
        "{e}"
    );
    a.assert_nothing_more(&db, &server).await;
    assert_eq!(
        replay_region(server.addr, deleted_at, "region-Lowland").await,
        [("sales-data-deleted".to_string(), store)]
    );
    // From before it all: the store's region is now the one its deletion
    // names, for every one of its rows' events.
    assert_eq!(
        replay_region(server.addr, start, "region-Lowland").await,
        [
            ("sales-data-created".to_string(), store),
            ("sales-data-updated".to_string(), store),
            ("sales-data-deleted".to_string(), store),
        ]
    );
    assert_eq!(replay_region(server.addr, start, "region-Upland").await, []);
}
