//! Resume: a client that comes back with its last event id is replayed what
//! it may see and missed, then follows live events with no gap and no
//! duplicate at the seam, even while writes go on; a pruned id answers
//! `resync_required`.

mod ws_common;

use futures_util::StreamExt;
use sales_e2e::TestDb;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::Duration;
use ws_common::*;

/// Ends the server's relay connection to this test's database (it
/// connects again by itself).
async fn cut_relay(db: &TestDb) {
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'sales-server-relay'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
}

/// Every event after a resume, and the `resumed` reply: frames are read
/// until the reply, then until the answer to a ping sent once the relay has
/// dispatched the whole log (so the live events held back behind the
/// replay, and anything sent twice, have arrived as well).
async fn after_resume(
    c: &mut Client,
    db: &TestDb,
    server: &sales_e2e::RunningServer,
) -> (Vec<Value>, Value) {
    let mut got: Vec<Value> = c.pending.drain(..).collect();
    let mut resumed = None;
    while resumed.is_none() {
        let f = c.frame().await.expect("open");
        match f["type"].as_str() {
            Some("resumed") => resumed = Some(f),
            Some("subscribed") => {}
            None => got.push(f),
            _ => panic!("unexpected frame {f}"),
        }
    }
    sales_e2e::relay_caught_up(db, server).await;
    c.send(json!({"type": "ping"})).await;
    loop {
        let f = c.frame().await.expect("open");
        match f["type"].as_str() {
            Some("pong") => break,
            None => got.push(f),
            _ => panic!("unexpected frame {f}"),
        }
    }
    (got, resumed.unwrap())
}

/// Ids of the sales events of `store` after `after`, in delivery order.
async fn logged_ids(db: &TestDb, store: i64, after: i64) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT id FROM sales.events WHERE kind LIKE 'sales-data-%' AND store_id = $1 AND id > $2 ORDER BY seq",
    )
    .bind(store)
    .bind(after)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// Row and version of each sales event of `store` after `after`, by id.
async fn row_versions(
    db: &TestDb,
    store: i64,
    after: i64,
) -> std::collections::HashMap<i64, (i64, i64)> {
    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT id, row_id, row_version FROM sales.events WHERE kind LIKE 'sales-data-%' AND store_id = $1 AND id > $2",
    )
    .bind(store)
    .bind(after)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    rows.into_iter().map(|(id, r, v)| (id, (r, v))).collect()
}

#[tokio::test]
async fn resume_after_missing_100_events_then_live_without_gap_or_duplicate() {
    let db = TestDb::new().await;
    let s = db.stores(2).await;
    let (s1, s2) = (s[0], s[1]);
    let me = user(&db, "me@example.test", "staff", &[s1]).await;
    let someone = user(&db, "someone@example.test", "staff", &[s2]).await;
    let server = db.server(&[]).await;
    let t = token(me, "staff", &[s1]);

    let mut c = Client::connect(server.addr, &t).await;
    c.subscribe(&format!("sales-data-{s1}")).await;
    upsert(&db, vec![record(s1, 2024, 1, 1, 1)]).await;
    let last_seen = c.event().await["id"].as_i64().unwrap();
    drop(c);

    // While away: 100 events for s1, interleaved with events it may not see.
    for i in 0..100 {
        upsert(
            &db,
            vec![record(
                s1,
                2024,
                1 + (i % 12),
                1 + (i as u32 % 28),
                i as i64,
            )],
        )
        .await;
        if i % 10 == 0 {
            upsert(&db, vec![record(s2, 2024, 1, 1, i as i64)]).await;
            sqlx::query("SELECT sales.notify_user($1, 'for someone else')")
                .bind(someone)
                .execute(&db.pool)
                .await
                .unwrap();
        }
    }
    sqlx::query("SELECT sales.notify_user($1, 'missed while away')")
        .bind(me)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(logged_ids(&db, s1, last_seen).await.len(), 100);
    sales_e2e::relay_caught_up(&db, &server).await;

    // Writes keep coming while it reconnects, subscribes and resumes.
    let writer = {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            for i in 0..60 {
                let rec = record(s1, 2025, 1 + (i % 12), 1, 1000 + i as i64);
                sqlx::query("SELECT sales.batch_upsert($1)")
                    .bind(json!([rec]))
                    .execute(&pool)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    let channel = format!("sales-data-{s1}");
    // One client subscribes and resumes in one message: strict log order.
    let mut atomic = Client::connect(server.addr, &t).await;
    atomic
        .send(json!({"type": "resume", "lastEventId": last_seen, "events": [channel]}))
        .await;
    // Another subscribes first and resumes after some live events arrived.
    let mut separate = Client::connect(server.addr, &t).await;
    separate.subscribe(&channel).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    separate
        .send(json!({"type": "resume", "lastEventId": last_seen}))
        .await;
    writer.await.unwrap();

    let expected_sales = logged_ids(&db, s1, last_seen).await;
    assert_eq!(expected_sales.len(), 160);
    for (name, c) in [("atomic", &mut atomic), ("separate", &mut separate)] {
        let (got, resumed) = after_resume(c, &db, &server).await;
        assert_eq!(resumed["lastEventId"], last_seen);
        let ids: Vec<i64> = got.iter().map(|e| e["id"].as_i64().unwrap()).collect();
        let unique: HashSet<i64> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "{name}: no duplicates: {ids:?}");
        let mut sales: Vec<i64> = got
            .iter()
            .filter(|e| e["event"] != "user-notification")
            .map(|e| e["id"].as_i64().unwrap())
            .collect();
        let mut expected = expected_sales.clone();
        if name == "separate" {
            // Events delivered live before the resume came first; the rest
            // follows in log order, except older versions of rows that had
            // already come live in a newer one: those are skipped.
            let newest: std::collections::HashMap<i64, i64> = got
                .iter()
                .filter(|e| e["event"] != "user-notification")
                .fold(Default::default(), |mut m, e| {
                    let v = m.entry(e["data"]["id"].as_i64().unwrap()).or_insert(0);
                    *v = (*v).max(e["data"]["version"].as_i64().unwrap());
                    m
                });
            let logged = row_versions(&db, s1, last_seen).await;
            expected.retain(|id| {
                let (row, version) = logged[id];
                sales.contains(id) || newest.get(&row).is_none_or(|v| *v <= version)
            });
            assert_eq!(
                resumed["superseded"].as_u64().unwrap() as usize,
                expected_sales.len() - expected.len(),
                "{resumed}"
            );
            let order: std::collections::HashMap<i64, usize> = expected_sales
                .iter()
                .enumerate()
                .map(|(i, id)| (*id, i))
                .collect();
            sales.sort_by_key(|id| order[id]);
        }
        assert_eq!(
            sales, expected,
            "{name}: every sales event of s1 once (bar superseded versions), in log order"
        );
        // Versions of each row only go up.
        let mut seen: std::collections::HashMap<i64, i64> = Default::default();
        for e in got.iter().filter(|e| e["event"] != "user-notification") {
            let (row, v) = (
                e["data"]["id"].as_i64().unwrap(),
                e["data"]["version"].as_i64().unwrap(),
            );
            assert!(
                seen.insert(row, v).is_none_or(|old| old < v),
                "{name}: row {row} went back to version {v}"
            );
        }
        let notes: Vec<&Value> = got
            .iter()
            .filter(|e| e["event"] == "user-notification")
            .collect();
        assert_eq!(notes.len(), 1, "{name}: only the user's own notification");
        assert_eq!(notes[0]["data"]["message"], "missed while away");
        assert!(got
            .iter()
            .all(|e| e["data"]["storeId"] == s1 || e["event"] == "user-notification"));
        if name == "atomic" {
            assert!(resumed["replayed"].as_u64().unwrap() >= 101, "{resumed}");
            assert_eq!(resumed["superseded"], 0, "{resumed}");
        }
    }
    let st = stats(server.addr).await;
    assert_eq!(st["resumes"], 2);
    assert!(st["messages"]["replayed"].as_u64().unwrap() >= 101);
    server.stop().await;
}

#[tokio::test]
async fn resume_from_zero_replays_what_is_retained() {
    let db = TestDb::new().await;
    let s1 = db.stores(1).await[0];
    upsert(&db, vec![record(s1, 2024, 1, 1, 1)]).await; // before the server started
    let server = db.server(&[]).await;
    sales_e2e::relay_caught_up(&db, &server).await;
    let mut c = Client::connect(server.addr, &token(1, "admin", &[])).await;
    c.subscribe("stores").await;
    c.subscribe(&format!("sales-data-{s1}")).await;
    c.send(json!({"type": "resume", "lastEventId": 0})).await;
    let ev = c.events(2).await;
    assert_eq!(ev[0]["event"], "store-created");
    assert_eq!(ev[1]["event"], "sales-data-created");
    assert_eq!(c.reply("resumed").await["replayed"], 2);
    upsert(&db, vec![record(s1, 2024, 1, 2, 1)]).await;
    assert_eq!(c.event().await["event"], "sales-data-updated");
    server.stop().await;
}

#[tokio::test]
async fn a_pruned_id_requires_resync_and_the_connection_goes_on() {
    let db = TestDb::new().await;
    let s1 = db.stores(1).await[0];
    let server = db.server(&[]).await;
    let mut c = Client::connect(server.addr, &token(1, "staff", &[s1])).await;
    c.subscribe(&format!("sales-data-{s1}")).await;
    upsert(&db, vec![record(s1, 2024, 1, 1, 1)]).await;
    let old = c.event().await["id"].as_i64().unwrap();
    // The maintenance command prunes with EVENT_RETENTION; prune everything.
    sqlx::query("SELECT sales.prune_events('0 seconds')")
        .execute(&db.pool)
        .await
        .unwrap();

    c.send(json!({"type": "resume", "lastEventId": old})).await;
    let err = c.reply("resumed").await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "resync_required");
    // Pruned by whoever pruned, with whatever retention: the message does
    // not name this instance's (it read "older than the retention (7
    // days)" after a prune of everything).
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("event {old} was pruned from the event log"))
            && !message.contains("days"),
        "{err}"
    );
    upsert(&db, vec![record(s1, 2024, 1, 2, 1)]).await;
    assert_eq!(c.event().await["event"], "sales-data-updated");
    assert_eq!(stats(server.addr).await["resyncRequired"], 1);

    // An id that never existed is just as unknown.
    c.send(json!({"type": "resume", "lastEventId": 987654321}))
        .await;
    assert_eq!(c.reply("resumed").await["code"], "resync_required");

    // From the start of the log, once its start was pruned: not a replay
    // of what is left as if it were everything.
    c.send(json!({"type": "resume", "lastEventId": 0})).await;
    let err = c.reply("resumed").await;
    assert_eq!(err["code"], "resync_required", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("start of the log were pruned"),
        "{err}"
    );
    assert_eq!(stats(server.addr).await["resyncRequired"], 3);
    server.stop().await;
}

/// Event ids are given again after a restore (the log goes on from the
/// dump's newest event), so an id is only meaningful with the log's epoch
/// (`ready.epoch`): a resume under another epoch is told to resync instead
/// of being replayed other events. A log replaced while the server runs (a
/// restore, a recovery to an earlier point, a promoted standby) is noticed
/// as the relay connects again: every connection is closed with 1012 so
/// that each client resumes.
#[tokio::test]
async fn an_id_of_another_epoch_of_the_log_requires_resync() {
    let db = TestDb::new().await;
    let s1 = db.stores(1).await[0];
    let channel = format!("sales-data-{s1}");
    let server = db.server(&[]).await;
    let epoch_now = || async {
        sqlx::query_scalar::<_, String>("SELECT sales.event_log_epoch()")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    let old = epoch_now().await;
    let mut c = Client::connect(server.addr, &token(1, "staff", &[s1])).await;
    assert_eq!(c.ready["epoch"], old.as_str(), "{}", c.ready);
    c.subscribe(&channel).await;
    upsert(&db, vec![record(s1, 2024, 1, 1, 1)]).await;
    let first = c.event().await["id"].as_i64().unwrap();
    upsert(&db, vec![record(s1, 2024, 1, 2, 1)]).await;
    let second = c.event().await["id"].as_i64().unwrap();

    // Under its own epoch the id is replayed from as always.
    let mut r = Client::connect(server.addr, &token(1, "staff", &[s1])).await;
    r.send(json!({"type": "resume", "lastEventId": first, "epoch": old, "events": [channel]}))
        .await;
    let (got, resumed) = after_resume(&mut r, &db, &server).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["id"], second, "{got:?}");
    assert_eq!(resumed["replayed"], 1, "{resumed}");

    // A new identity, as a restored dump has, and the relay's connection
    // lost: as it connects again it finds another log.
    sqlx::query("UPDATE sales.event_log_identity SET epoch = gen_random_uuid()")
        .execute(&db.pool)
        .await
        .unwrap();
    let new = epoch_now().await;
    assert_ne!(new, old);
    // Before the relay notices, a resume is judged by the log's own epoch,
    // not by the relay's copy of it.
    r.send(json!({"type": "resume", "lastEventId": first, "epoch": old}))
        .await;
    let err = r.reply("resumed").await;
    assert_eq!(err["code"], "resync_required", "{err}");
    cut_relay(&db).await;
    for client in [&mut c, &mut r] {
        let close = client.closed().await.expect("a close frame");
        assert_eq!(u16::from(close.code), 1012, "{close:?}");
    }

    let mut c = Client::connect(server.addr, &token(1, "staff", &[s1])).await;
    assert_eq!(c.ready["epoch"], new.as_str(), "{}", c.ready);
    c.send(json!({"type": "resume", "lastEventId": first, "epoch": old, "events": [channel]}))
        .await;
    let err = c.reply("resumed").await;
    assert_eq!(err["code"], "resync_required", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("another epoch"),
        "{err}"
    );
    // Subscribed by the resume, live events go on.
    upsert(&db, vec![record(s1, 2024, 1, 3, 1)]).await;
    let live = c.event().await;
    assert_eq!(live["event"], "sales-data-updated", "{live}");
    assert!(live["id"].as_i64().unwrap() > second, "{live}");
    let st = stats(server.addr).await;
    assert_eq!(st["relay"]["logReplaced"], 1, "{st}");
    assert_eq!(st["relay"]["epoch"], new.as_str(), "{st}");
    assert_eq!(st["closed"]["logReplaced"], 2, "{st}");

    // The same epoch with the newest events gone (a file-system snapshot
    // of the database put back): also another log. The relay gives it a
    // new identity (so the ids given again are of another epoch for every
    // client), relays from its head and every connection resumes.
    sales_e2e::relay_caught_up(&db, &server).await;
    let last_seen = live["id"].as_i64().unwrap();
    sqlx::query("DELETE FROM sales.events WHERE id > $1")
        .bind(second)
        .execute(&db.pool)
        .await
        .unwrap();
    cut_relay(&db).await;
    let close = c.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1012, "{close:?}");
    let renewed = epoch_now().await;
    assert_ne!(renewed, new, "the identity is renewed");
    let mut c = Client::connect(server.addr, &token(1, "staff", &[s1])).await;
    assert_eq!(c.ready["epoch"], renewed.as_str(), "{}", c.ready);
    c.send(json!({"type": "resume", "lastEventId": last_seen, "epoch": new, "events": [channel]}))
        .await;
    let err = c.reply("resumed").await;
    assert_eq!(err["code"], "resync_required", "{err}");
    upsert(&db, vec![record(s1, 2024, 1, 4, 1)]).await;
    let live = c.event().await;
    assert_eq!(live["event"], "sales-data-updated", "{live}");
    assert_eq!(stats(server.addr).await["relay"]["logReplaced"], 2);
    server.stop().await;
}

/// A client that subscribes before it resumes may get a row's newer version
/// live before the replay reaches the older ones it missed: those are
/// skipped (counted as `superseded`), so the row's version never goes
/// backwards, and every other missed event is still replayed.
#[tokio::test]
async fn subscribing_before_resuming_never_sends_a_row_version_backwards() {
    let db = TestDb::new().await;
    let stores = db.stores(2).await;
    let (s1, s2) = (stores[0], stores[1]);
    let server = db.server(&[]).await;
    let t = token(1, "admin", &[]);
    let channel = format!("sales-data-{s1}");
    let mut c = Client::connect(server.addr, &t).await;
    c.subscribe(&channel).await;
    upsert(&db, vec![record(s1, 2024, 1, 1, 1)]).await;
    let first = c.event().await;
    let (row, last) = (
        first["data"]["id"].as_i64().unwrap(),
        first["id"].as_i64().unwrap(),
    );
    drop(c);
    // Missed while away: two newer versions of that row, and another row.
    upsert(&db, vec![record(s1, 2024, 1, 2, 1)]).await;
    upsert(&db, vec![record(s1, 2024, 1, 3, 1)]).await;
    upsert(&db, vec![record(s1, 2024, 2, 1, 1)]).await;
    sales_e2e::relay_caught_up(&db, &server).await;

    let other: i64 =
        sqlx::query_scalar("SELECT id FROM sales.monthly_sales WHERE store_id = $1 AND month = 2")
            .bind(s1)
            .fetch_one(&db.pool)
            .await
            .unwrap();

    let mut c = Client::connect(server.addr, &t).await;
    c.subscribe(&channel).await;
    c.subscribe("stores").await;
    upsert(&db, vec![record(s1, 2024, 1, 4, 1)]).await;
    let live = c.event().await;
    assert_eq!(live["data"]["id"], row);
    let live_version = live["data"]["version"].as_i64().unwrap();
    // A store whose id is the other row's, at a higher version, live too:
    // store and sales ids overlap, and a store's version says nothing of a
    // sales row's.
    if other != s2 {
        sqlx::query(
            "INSERT INTO sales.stores (id, code, name, region) VALUES ($1, 'SAMEID', 'Same id', 'North')",
        )
        .bind(other)
        .execute(&db.pool)
        .await
        .unwrap();
        assert_eq!(c.event().await["event"], "store-created");
    }
    sqlx::query(
        "UPDATE sales.stores SET name = name || ' renamed', version = version + 5 WHERE id = $1",
    )
    .bind(other)
    .execute(&db.pool)
    .await
    .unwrap();
    let renamed = c.event().await;
    assert_eq!(renamed["event"], "store-updated");
    assert!(
        renamed["data"]["version"].as_i64().unwrap() > 1,
        "{renamed}"
    );
    c.send(json!({"type": "resume", "lastEventId": last})).await;
    let (got, resumed) = after_resume(&mut c, &db, &server).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        got[0]["data"]["month"], 2,
        "the other row is replayed: {got:?}"
    );
    assert_ne!(got[0]["data"]["id"], row);
    assert_eq!(resumed["replayed"], 1, "{resumed}");
    assert_eq!(resumed["superseded"], 2, "{resumed}");
    assert_eq!(resumed["supersededRows"], json!([row]), "{resumed}");

    // Live delivery goes on, the row's versions still going up.
    upsert(&db, vec![record(s1, 2024, 1, 5, 1)]).await;
    let next = c.event().await;
    assert_eq!(next["data"]["id"], row);
    assert!(next["data"]["version"].as_i64().unwrap() > live_version);
    server.stop().await;
}

/// A resume goes through at most `WS_REPLAY_MAX_EVENTS` events of the log,
/// whether they are the client's or not: a client following one store that
/// is far behind a busy log is told to resync at once, instead of costing a
/// scan of everything. A resume naming many channels gets every reply and
/// is not taken for a client that sends without reading; one naming more
/// than a connection may follow is refused; a long unknown name is quoted
/// back cut short.
#[tokio::test]
async fn a_resume_is_bounded_by_the_log_it_goes_through() {
    let db = TestDb::new().await;
    let stores = db.stores(2).await;
    let (s1, s2) = (stores[0], stores[1]);
    let server = db.server(&[("WS_REPLAY_MAX_EVENTS", "50")]).await;
    let t = token(1, "staff", &[s1]);
    let channel = format!("sales-data-{s1}");
    let mut c = Client::connect(server.addr, &t).await;
    c.subscribe(&channel).await;
    upsert(&db, vec![record(s1, 2024, 1, 1, 1)]).await;
    let last = c.event().await["id"].as_i64().unwrap();
    drop(c);
    // Missed: 20 events of the other store and one of the client's own.
    let months = |n: i32, from: i32| -> Vec<Value> {
        (from..from + n)
            .map(|i| record(s2, 2030 + i / 12, i % 12 + 1, 1, 1))
            .collect()
    };
    upsert(&db, months(20, 0)).await;
    upsert(&db, vec![record(s1, 2024, 1, 2, 1)]).await;
    sales_e2e::relay_caught_up(&db, &server).await;
    let mut c = Client::connect(server.addr, &t).await;
    c.send(json!({"type": "resume", "lastEventId": last, "events": [channel]}))
        .await;
    let (got, resumed) = after_resume(&mut c, &db, &server).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["event"], "sales-data-updated", "{got:?}");
    assert_eq!(resumed["replayed"], 1, "{resumed}");
    let mine = got[0]["id"].as_i64().unwrap();
    drop(c);
    // Past the bound: one event of the client's, then 60 of the other
    // store. The client is told before anything is replayed: its own
    // event, first in the log, is not sent ahead of the refusal.
    upsert(&db, vec![record(s1, 2024, 1, 4, 1)]).await;
    upsert(&db, months(60, 20)).await;
    sales_e2e::relay_caught_up(&db, &server).await;
    let mut c = Client::connect(server.addr, &t).await;
    c.send(json!({"type": "resume", "lastEventId": mine, "events": [channel]}))
        .await;
    let err = loop {
        let f = c.frame().await.expect("the connection stays open");
        // Replies have a `type`; events (`id`, `event`, `data`) do not.
        assert!(f.get("type").is_some(), "replayed before the refusal: {f}");
        if f["type"] == "error" || f["type"] == "resumed" {
            break f;
        }
    };
    assert_eq!(err["code"], "resync_required", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("more than 50 events"),
        "{err}"
    );
    // The connection goes on.
    upsert(&db, vec![record(s1, 2024, 1, 3, 1)]).await;
    assert_eq!(c.event().await["event"], "sales-data-updated");

    // An admin resuming with 600 channels gets 600 replies, then `resumed`.
    let mut a = Client::connect(server.addr, &token(2, "admin", &[])).await;
    let many: Vec<String> = (1..=600).map(|i| format!("sales-data-{i}")).collect();
    a.send(json!({"type": "resume", "lastEventId": mine, "events": many}))
        .await;
    let mut subscribed = 0;
    loop {
        let f = a.frame().await.expect("the connection stays open");
        match f["type"].as_str() {
            Some("subscribed") => subscribed += 1,
            Some("resumed") | Some("error") => break,
            _ => {}
        }
    }
    assert_eq!(subscribed, 600);
    // (Short names: a frame holds at most 16 KiB.)
    let too_many = vec!["stores"; 1001];
    a.send(json!({"type": "resume", "lastEventId": mine, "events": too_many}))
        .await;
    let err = a.reply("resumed").await;
    assert_eq!(err["code"], "bad_request", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("at most 1000"),
        "{err}"
    );
    let long = "x".repeat(16_000);
    a.send(json!({"type": "subscribe", "event": long})).await;
    let err = a.reply("subscribed").await;
    assert_eq!(err["code"], "unknown_channel", "{err}");
    assert!(err.to_string().len() < 1_000, "{err}");
    server.stop().await;
}

/// A user's own events written after the connection opened and before its
/// resume (here a batch's `batch-completed`) arrive within the replay, in
/// delivery order, so the last id received stays a safe place to resume
/// from. They were delivered live at once, ahead of the older events the
/// replay then sent, and a client that dropped after one of them resumed
/// past events it never got.
#[tokio::test]
async fn own_events_written_before_the_resume_arrive_in_order() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    let me = user(&db, "own@example.test", "staff", &[s]).await;
    let server = db.server(&[]).await;
    let t = token(me, "staff", &[s]);
    let c = Client::connect(server.addr, &t).await;
    let start = c.ready["lastEventId"].as_i64().unwrap();
    drop(c);
    upsert_as(&db, Some(me), vec![record(s, 2024, 1, 1, 1)]).await;
    let mut c = Client::connect(server.addr, &t).await;
    upsert_as(&db, Some(me), vec![record(s, 2024, 1, 2, 2)]).await;
    sales_e2e::relay_caught_up(&db, &server).await;
    c.send(json!({"type": "resume", "lastEventId": start, "events": [format!("sales-data-{s}")]}))
        .await;
    let (got, resumed) = after_resume(&mut c, &db, &server).await;
    let logged: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, kind FROM sales.events WHERE id > $1 ORDER BY seq")
            .bind(start)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let got: Vec<(i64, String)> = got
        .iter()
        .map(|e| {
            (
                e["id"].as_i64().unwrap(),
                e["event"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(got, logged, "{resumed}");
    let kinds: Vec<&str> = got.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "sales-data-created",
            "batch-completed",
            "sales-data-updated",
            "batch-completed"
        ]
    );
    assert_eq!(resumed["replayed"], 4, "{resumed}");

    // Without a request, the connection's own events still come (after
    // the opening hold): a client that only listens gets them.
    let mut quiet = Client::connect(server.addr, &t).await;
    sqlx::query("SELECT sales.notify_user($1, 'hello')")
        .bind(me)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(quiet.event().await["event"], "user-notification");

    // A resume refused outright is a request like any other: the held
    // events are released ahead of its answer (they waited for the hold
    // to run out, 5 to 6 s).
    let mut refused = Client::connect(server.addr, &t).await;
    sqlx::query("SELECT sales.notify_user($1, 'held')")
        .bind(me)
        .execute(&db.pool)
        .await
        .unwrap();
    sales_e2e::relay_caught_up(&db, &server).await;
    refused
        .send(json!({"type": "resume", "lastEventId": -1}))
        .await;
    let first = refused.frame().await.expect("open");
    assert_eq!(first["event"], "user-notification", "{first}");
    let answer = refused.frame().await.expect("open");
    assert_eq!(answer["code"], "bad_request", "{answer}");
}

/// A token that expires while its connection is open gets nothing more on
/// request: a resume (or any request) after its expiry (past `exp` by more
/// than the clock skew allowed, as for REST) closes it with 4001 and
/// replays nothing. The replay used to run on it.
#[tokio::test]
async fn an_expired_token_gets_no_replay() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    let me = user(&db, "exp@example.test", "staff", &[s]).await;
    let server = db.server(&[]).await;
    for i in 0..5 {
        upsert(&db, vec![record(s, 2024, 1, 1 + i, 1)]).await;
    }
    sales_e2e::relay_caught_up(&db, &server).await;
    let exp = chrono::Utc::now().timestamp() + 2;
    let t = token_expiring(me, "staff", &[s], exp);
    let mut c = Client::connect(server.addr, &t).await;
    let expired_from = exp + sales_server::auth::LEEWAY_SECS as i64;
    sales_e2e::eventually(WAIT, "the token to expire", || async {
        (chrono::Utc::now().timestamp() > expired_from).then_some(())
    })
    .await;
    c.send(json!({"type": "resume", "lastEventId": 0, "events": [format!("sales-data-{s}")]}))
        .await;
    let mut events = 0;
    let close = loop {
        match tokio::time::timeout(WAIT, c.ws.next())
            .await
            .expect("a frame")
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v.get("type").is_none() {
                    events += 1;
                }
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(f))) => break f,
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(events, 0);
    assert_eq!(u16::from(close.expect("a close frame").code), 4001);
}

/// Answers come in the order of their requests while a resume runs too:
/// requests sent right behind a resume are answered after its `resumed`,
/// not ahead of it (they were, except an unsubscribe's).
#[tokio::test]
async fn requests_sent_behind_a_resume_are_answered_after_it() {
    let db = TestDb::new().await;
    let s = db.stores(1).await;
    upsert(
        &db,
        (1..=20).map(|d| record(s[0], 2024, 1, d, 10)).collect(),
    )
    .await;
    let server = db.server(&[]).await;
    sales_e2e::relay_caught_up(&db, &server).await;
    let mut c = Client::connect(server.addr, &token(999, "admin", &[])).await;
    let channel = format!("sales-data-{}", s[0]);
    for request in [
        json!({"type": "resume", "lastEventId": 0, "events": [channel]}),
        json!({"type": "ping"}),
        json!({"type": "subscribe", "event": "stores"}),
        json!({"type": "unsubscribe", "event": "stores"}),
        json!({"type": "ping"}),
    ] {
        c.send(request).await;
    }
    let mut answers = Vec::new();
    while answers.len() < 5 {
        let f = c.frame().await.expect("open");
        if let Some(t) = f["type"].as_str() {
            answers.push(match f["event"].as_str() {
                Some(e) => format!("{t} {e}"),
                None => t.to_string(),
            });
        }
    }
    assert_eq!(
        answers,
        [
            format!("subscribed {channel}"),
            "resumed".to_string(),
            "pong".to_string(),
            "subscribed stores".to_string(),
            "unsubscribed stores".to_string(),
        ]
    );
    let f = c.frame().await.expect("open");
    assert_eq!(f["type"], "pong", "{f}");
}
