//! WebSocket basics: every event kind reaches the right subscribers (writes
//! through SQL functions, plain SQL and the REST API), scope is enforced per
//! subscription, tokens are checked before the upgrade, the stats endpoint is
//! admin-only, and a stopping server closes sockets with 1001.

mod ws_common;

use futures_util::{SinkExt, StreamExt};
use sales_e2e::TestDb;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Error as WsError;
use ws_common::*;

fn kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn every_event_kind_reaches_its_subscribers() {
    let db = TestDb::new().await;
    let s = db.stores(2).await;
    let (s1, s2) = (s[0], s[1]);
    let staff_id = user(&db, "staff@example.test", "staff", &[s1]).await;
    let other_id = user(&db, "other@example.test", "staff", &[s2]).await;
    let server = db.server(&[("RATE_LIMIT_PER_MINUTE", "100000")]).await;

    let mut staff = Client::connect(server.addr, &token(staff_id, "staff", &[s1])).await;
    assert_eq!(staff.ready["userId"], staff_id);
    for ch in [
        format!("sales-data-{s1}"),
        "stores".into(),
        "announcements".into(),
    ] {
        let ack = staff.subscribe(&ch).await;
        assert_eq!(ack, json!({"type": "subscribed", "event": ch}));
    }
    let mut admin = Client::connect(server.addr, &token(999, "admin", &[])).await;
    assert_eq!(admin.subscribe("batch").await["type"], "subscribed");

    // 1. batch_upsert by the staff user: created + the user's own batch-completed.
    let summary = upsert_as(&db, Some(staff_id), vec![record(s1, 2024, 1, 1, 100)]).await;
    let ev = staff.events(2).await;
    assert_eq!(kinds(&ev), ["sales-data-created", "batch-completed"]);
    assert_eq!(ev[0]["data"]["storeId"], s1);
    assert_eq!(ev[0]["data"]["version"], 1);
    assert_eq!(ev[0]["data"]["totalSales"], 100);
    assert!(ev[0]["id"].as_i64().unwrap() < ev[1]["id"].as_i64().unwrap());
    assert_eq!(ev[1]["id"], summary["eventId"]);
    assert_eq!(ev[1]["data"]["storeIds"], json!([s1]));
    assert!(chrono::DateTime::parse_from_rfc3339(ev[0]["ts"].as_str().unwrap()).is_ok());
    let row_id = ev[0]["data"]["id"].as_i64().unwrap();
    assert_eq!(admin.event().await["id"], summary["eventId"]);

    // 2. A plain SQL UPDATE.
    sqlx::query("UPDATE sales.monthly_sales SET daily_data = daily_data || '{\"2\": {\"sales\": 5}}' WHERE id = $1")
        .bind(row_id)
        .execute(&db.pool)
        .await
        .unwrap();
    let e = staff.event().await;
    assert_eq!(e["event"], "sales-data-updated");
    assert_eq!(e["data"]["version"], 2);
    assert_eq!(e["data"]["changedDays"], json!(["2"]));

    // 3. Through the REST batch endpoint (the staff user's own token).
    let resp = reqwest::Client::new()
        .post(server.url("/api/v2/sales/batch"))
        .bearer_auth(token(staff_id, "staff", &[s1]))
        .json(&json!({"salesDataArray": [record(s1, 2024, 1, 3, 7)]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let ev = staff.events(2).await;
    assert_eq!(kinds(&ev), ["sales-data-updated", "batch-completed"]);
    assert_eq!(ev[0]["data"]["version"], 3);
    assert_eq!(admin.event().await["event"], "batch-completed");

    // 4. batch_delete (no actor: the batch summary goes to admins only).
    sqlx::query("SELECT sales.batch_delete(ARRAY[$1]::bigint[])")
        .bind(row_id)
        .execute(&db.pool)
        .await
        .unwrap();
    let e = staff.event().await;
    assert_eq!(e["event"], "sales-data-deleted");
    assert_eq!(e["data"]["version"], 4);
    let b = admin.event().await;
    assert_eq!(
        (b["event"].as_str(), b["data"]["operation"].as_str()),
        (Some("batch-completed"), Some("delete"))
    );

    // 5. Store status through plain SQL; the other store is out of scope.
    sqlx::query("UPDATE sales.stores SET status = 'closed' WHERE id = $1")
        .bind(s2)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE sales.stores SET status = 'renovating' WHERE id = $1")
        .bind(s1)
        .execute(&db.pool)
        .await
        .unwrap();
    let e = staff.event().await;
    assert_eq!(e["event"], "store-status-changed");
    assert_eq!(e["data"]["storeId"], s1);
    assert_eq!(e["data"]["status"], "renovating");
    assert_eq!(e["data"]["previousStatus"], "open");

    // 6. Sales of a store out of scope, then an announcement.
    upsert(&db, vec![record(s2, 2024, 2, 1, 1)]).await;
    sqlx::query("SELECT sales.announce('maintenance tonight', 'warning')")
        .execute(&db.pool)
        .await
        .unwrap();
    let e = staff.event().await;
    assert_eq!(e["event"], "system-announcement");
    assert_eq!(e["data"]["message"], "maintenance tonight");
    assert_eq!(e["data"]["level"], "warning");
    assert_eq!(
        admin.event().await["event"],
        "batch-completed",
        "admins see every batch"
    );

    // 7. User notifications: only the addressee.
    sqlx::query("SELECT sales.notify_user($1, 'not for you')")
        .bind(other_id)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("SELECT sales.notify_user($1, 'hello', '{\"k\": 1}')")
        .bind(staff_id)
        .execute(&db.pool)
        .await
        .unwrap();
    let e = staff.event().await;
    assert_eq!(e["event"], "user-notification");
    assert_eq!(e["data"]["message"], "hello");
    assert_eq!(e["data"]["data"], json!({"k": 1}));

    // 8. Export progress: NOTIFY-only, no id, relayed only when sealed with
    // the instances' key. The same message in plain JSON (which any role
    // that can connect may NOTIFY) is dropped, as is a sealed one changed,
    // and a sealed one sent again (a listener's copy) is relayed once.
    let forged = json!({"userId": staff_id, "event": "export-progress",
                        "data": {"url": "https://elsewhere.example/x.csv"}});
    let sealed =
        sales_server::events::sealed::seal(staff_id, "export-progress", json!({"rows": 9}));
    let good = sales_server::events::sealed::seal(staff_id, "export-progress", json!({"rows": 10}));
    for payload in [
        forged.to_string(),
        sealed.replace("\"rows\":9", "\"rows\":99"),
        sales_server::events::sealed::seal(other_id, "export-progress", json!({"rows": 10})),
        good.clone(),
        good,
    ] {
        sqlx::query("SELECT pg_notify('sales_ephemeral', $1)")
            .bind(payload)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let e = staff.event().await;
    assert_eq!(e["event"], "export-progress");
    assert_eq!(e["data"], json!({"rows": 10}));
    assert!(e.get("id").is_none());
    // A last message sent after them all comes next: the copy sent again
    // was not relayed a second time (NOTIFYs reach the relay in order).
    sqlx::query("SELECT pg_notify('sales_ephemeral', $1)")
        .bind(sales_server::events::sealed::seal(
            staff_id,
            "export-progress",
            json!({"rows": 11}),
        ))
        .execute(&db.pool)
        .await
        .unwrap();
    let e = staff.event().await;
    assert_eq!(e["data"], json!({"rows": 11}), "{e}");

    staff.assert_nothing_more(&db, &server).await;
    admin.assert_nothing_more(&db, &server).await;

    // A TRUNCATE took every row: whoever follows announcements is told, once.
    sqlx::query("TRUNCATE sales.monthly_sales")
        .execute(&db.pool)
        .await
        .unwrap();
    let e = staff.event().await;
    assert_eq!(e["event"], "table-truncated");
    assert_eq!(e["data"], json!({"table": "monthly_sales"}));
    staff.assert_nothing_more(&db, &server).await;

    // Unsubscribing stops the channel.
    staff
        .send(json!({"type": "unsubscribe", "event": "announcements"}))
        .await;
    assert_eq!(staff.reply("unsubscribed").await["event"], "announcements");
    // The user's own channels cannot be left: the error says so without
    // naming the channel as `event` (which would say it is not followed).
    for own in ["notifications", "user-notifications", "export-progress"] {
        staff
            .send(json!({"type": "unsubscribe", "event": own}))
            .await;
        let e = staff.reply("unsubscribed").await;
        assert_eq!(e["type"], "error", "{own}: {e}");
        assert_eq!(e["code"], "bad_request", "{own}: {e}");
        assert!(e.get("event").is_none(), "{own}: {e}");
        assert!(
            e["message"].as_str().unwrap().starts_with(own),
            "{own}: {e}"
        );
    }
    sqlx::query("SELECT sales.announce('second')")
        .execute(&db.pool)
        .await
        .unwrap();
    // The relay has dispatched it (to no one): an event that went out
    // would be queued before the check's ping is answered.
    staff.assert_nothing_more(&db, &server).await;
    server.stop().await;
}

#[tokio::test]
async fn refused_subscriptions_leave_the_connection_open() {
    let db = TestDb::new().await;
    let s = db.stores(2).await;
    let server = db.server(&[]).await;
    let mut c = Client::connect(server.addr, &token(5, "staff", &[s[0]])).await;

    let err = c.subscribe(&format!("sales-data-{}", s[1])).await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "forbidden");
    assert_eq!(err["event"], format!("sales-data-{}", s[1]));
    assert_eq!(c.subscribe("batch").await["code"], "forbidden");
    assert_eq!(c.subscribe("nonsense").await["code"], "unknown_channel");
    // A store's channel names its id as written elsewhere: no second name
    // with a leading zero.
    let zero = c.subscribe(&format!("sales-data-0{}", s[0])).await;
    assert_eq!(zero["code"], "unknown_channel", "{zero}");
    assert_eq!(c.subscribe("notifications").await["implicit"], true);
    c.send(json!({"type": "dance"})).await;
    assert_eq!(c.reply("error").await["code"], "bad_request");
    // A member a request does not have is refused, ping included, and the
    // answer names the channel the request named, if any.
    c.send(json!({"type": "ping", "id": 1})).await;
    let e = c.reply("pong").await;
    assert_eq!(e["code"], "bad_request", "{e}");
    c.send(json!({"type": "subscribe", "event": "stores", "id": 1}))
        .await;
    let e = c.reply("subscribed").await;
    assert_eq!(e["code"], "bad_request", "{e}");
    assert_eq!(e["event"], "stores", "{e}");
    c.ws.send(tokio_tungstenite::tungstenite::Message::text("{not json"))
        .await
        .unwrap();
    assert_eq!(c.reply("error").await["code"], "bad_request");
    c.send(json!({"type": "resume", "lastEventId": -1})).await;
    assert_eq!(c.reply("error").await["code"], "bad_request");

    // Still open and serving what the token allows.
    assert_eq!(
        c.subscribe(&format!("sales-data-{}", s[0])).await["type"],
        "subscribed"
    );
    upsert(
        &db,
        vec![record(s[1], 2024, 1, 1, 1), record(s[0], 2024, 1, 1, 2)],
    )
    .await;
    let e = c.event().await;
    assert_eq!(e["data"]["storeId"], s[0]);
    c.assert_nothing_more(&db, &server).await;

    let st = stats(server.addr).await;
    assert_eq!(st["refusedSubscriptions"], 2);
    server.stop().await;
}

async fn http_status(result: Result<impl Sized, WsError>) -> (u16, Value) {
    match result {
        Err(WsError::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| serde_json::from_slice(b).unwrap())
                .unwrap_or(Value::Null);
            (resp.status().as_u16(), body)
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, the upgrade succeeded"),
    }
}

#[tokio::test]
async fn tokens_are_checked_before_the_upgrade() {
    let db = TestDb::new().await;
    let server = db.server(&[]).await;
    let addr = server.addr;

    let (status, body) =
        http_status(tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthorized");
    assert!(body["error"]["message"].as_str().unwrap().contains("token"));

    let (status, _) =
        http_status(tokio_tungstenite::connect_async(ws_url(addr, "not.a.jwt")).await).await;
    assert_eq!(status, 401);
    let expired = token_expiring(1, "admin", &[], chrono::Utc::now().timestamp() - 3600);
    let (status, body) =
        http_status(tokio_tungstenite::connect_async(ws_url(addr, &expired)).await).await;
    assert_eq!(status, 401);
    // Told what to do next, as the REST API tells it.
    assert_eq!(
        body["error"]["message"],
        "token expired; refresh it (POST /api/v2/auth/refresh) or log in again",
        "{body}"
    );
    let wrong_key = sales_e2e::fixtures::token::sign(
        "some-other-secret-some-other-secret!",
        1,
        "admin",
        &[],
        chrono::Utc::now().timestamp() + 60,
    );
    let (status, _) =
        http_status(tokio_tungstenite::connect_async(ws_url(addr, &wrong_key)).await).await;
    assert_eq!(status, 401);

    // Authorization header.
    let t = token(3, "manager", &[1]);
    let (mut ws, _) = tokio_tungstenite::connect_async(request(
        addr,
        "",
        &[("authorization", &format!("Bearer {t}"))],
    ))
    .await
    .unwrap();
    let ready: Value = match ws.next().await.unwrap().unwrap() {
        tokio_tungstenite::tungstenite::Message::Text(t) => {
            serde_json::from_str(t.as_str()).unwrap()
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (ready["type"].as_str(), ready["role"].as_str()),
        (Some("ready"), Some("manager"))
    );

    // Sec-WebSocket-Protocol: bearer, <token>; the server picks "bearer".
    let (_ws, resp) = tokio_tungstenite::connect_async(request(
        addr,
        "",
        &[("sec-websocket-protocol", &format!("bearer, {t}"))],
    ))
    .await
    .unwrap();
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "bearer"
    );
    let (status, _) = http_status(
        tokio_tungstenite::connect_async(request(
            addr,
            "",
            &[("sec-websocket-protocol", "bearer, garbage")],
        ))
        .await,
    )
    .await;
    assert_eq!(status, 401);

    // A plain GET with a good token is told to upgrade.
    let resp = reqwest::get(format!("http://{addr}/ws?token={t}"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 426);
    let resp = reqwest::get(format!("http://{addr}/ws")).await.unwrap();
    assert_eq!(resp.status(), 401);
    server.stop().await;
}

/// A refused upgrade challenges as every 401 of the API does: the realm,
/// and `invalid_token` when a token was given (by query, `Authorization`
/// or `Sec-WebSocket-Protocol`) and refused.
#[tokio::test]
async fn refused_upgrades_challenge_as_the_api_does() {
    let db = TestDb::new().await;
    let server = db.server(&[]).await;
    let addr = server.addr;
    let challenge = |result: Result<_, WsError>| match result {
        Err(WsError::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401);
            resp.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .to_string()
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, the upgrade succeeded"),
    };
    let connect = |query: &'static str, headers: &'static [(&'static str, &'static str)]| {
        tokio_tungstenite::connect_async(request(addr, query, headers))
    };
    const REALM: &str = r#"Bearer realm="pg_sales""#;
    const INVALID: &str = r#"Bearer realm="pg_sales", error="invalid_token""#;
    assert_eq!(challenge(connect("", &[]).await), REALM);
    assert_eq!(
        challenge(connect("", &[("authorization", "Bearer garbage")]).await),
        INVALID
    );
    assert_eq!(challenge(connect("?token=garbage", &[]).await), INVALID);
    assert_eq!(
        challenge(connect("", &[("sec-websocket-protocol", "bearer, garbage")]).await),
        INVALID
    );
    // A plain GET (no upgrade asked) is refused alike.
    let client = reqwest::Client::new();
    let r = client
        .get(format!("http://{addr}/ws"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], REALM);
    let r = client
        .get(format!("http://{addr}/ws"))
        .header("authorization", "Bearer garbage")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], INVALID);
    server.stop().await;
}

#[tokio::test]
async fn stats_are_for_admins() {
    let db = TestDb::new().await;
    let s = db.stores(2).await;
    let server = db.server(&[]).await;
    let url = server.url("/api/admin/websocket/stats");
    let http = reqwest::Client::new();

    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    assert!(body["error"].as_object().unwrap().contains_key("requestId"));
    assert_eq!(
        http.get(&url)
            .bearer_auth("bad")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let r = http
        .get(&url)
        .bearer_auth(token(2, "manager", &[s[0]]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "forbidden"
    );

    let mut a = Client::connect(server.addr, &token(10, "staff", &[s[0]])).await;
    let mut b = Client::connect(server.addr, &token(11, "manager", &[s[0], s[1]])).await;
    a.subscribe(&format!("sales-data-{}", s[0])).await;
    b.subscribe(&format!("sales-data-{}", s[0])).await;
    b.subscribe("stores").await;
    upsert(&db, vec![record(s[0], 2024, 3, 1, 1)]).await;
    a.event().await;
    b.event().await;

    let st = stats(server.addr).await;
    assert_eq!(st["connections"]["total"], 2);
    assert_eq!(
        st["connections"]["byRole"],
        json!({"admin": 0, "manager": 1, "staff": 1})
    );
    assert_eq!(st["connections"]["byStore"][s[0].to_string()], 2);
    assert_eq!(st["connections"]["byStore"][s[1].to_string()], 1);
    assert_eq!(
        st["subscriptions"]["byChannel"][format!("sales-data-{}", s[0])],
        2
    );
    assert_eq!(st["subscriptions"]["byChannel"]["stores"], 1);
    assert_eq!(st["subscriptions"]["total"], 3);
    assert!(st["messages"]["sent"].as_u64().unwrap() >= 2 + 5, "{st}");
    assert_eq!(st["messages"]["dropped"], 0);
    assert_eq!(st["closed"]["slowConsumer"], 0);
    assert_eq!(st["relay"]["connected"], true);

    drop(a);
    sales_e2e::eventually(WAIT, "the closed connection to leave the stats", || async {
        (stats(server.addr).await["connections"]["total"] == 1).then_some(())
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn stopping_the_server_closes_sockets_with_going_away() {
    let db = TestDb::new().await;
    let server = db.server(&[]).await;
    let mut c = Client::connect(server.addr, &token(1, "staff", &[])).await;
    let stop = tokio::spawn(server.stop());
    let frame = c.closed().await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1001);
    tokio::time::timeout(WAIT, stop)
        .await
        .expect("server stopped in time")
        .unwrap();
}

/// A resume naming as many channels as a connection may follow (1,000
/// store channels, six-digit ids: 20 kB) fits in one client frame and is
/// answered channel by channel, then `resumed`; one more channel is
/// `bad_request` with the connection left open; a frame over 64 KiB is
/// closed with 1009.
#[tokio::test]
async fn a_resume_naming_a_thousand_channels_fits_in_one_frame() {
    let db = TestDb::new().await;
    let server = db.server(&[]).await;
    let mut c = Client::connect(server.addr, &token(1, "admin", &[])).await;
    let from = c.ready["lastEventId"].clone();
    let names = |n: i64| -> Vec<String> {
        (100_000..100_000 + n)
            .map(|id| format!("sales-data-{id}"))
            .collect()
    };
    let too_many = json!({"type": "resume", "lastEventId": from, "events": names(1001)});
    assert!(too_many.to_string().len() > 16 * 1024);
    c.send(too_many).await;
    let refused = c.reply("resumed").await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "bad_request", "{refused}");
    c.send(json!({"type": "resume", "lastEventId": from, "events": names(1000)}))
        .await;
    let mut subscribed = 0;
    loop {
        let f = c.frame().await.expect("closed during the resume");
        match f["type"].as_str() {
            Some("subscribed") => subscribed += 1,
            Some("resumed") => break,
            _ => panic!("unexpected frame {f}"),
        }
    }
    assert_eq!(subscribed, 1000);
    // Past the frame limit: 1009.
    let huge = json!({"type": "ping", "pad": "x".repeat(64 * 1024)});
    c.ws.send(tokio_tungstenite::tungstenite::Message::text(
        huge.to_string(),
    ))
    .await
    .unwrap();
    let close = c.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1009, "{close:?}");
}

/// A resume answers each channel it names in the order it named them
/// (unknown and implicit ones included), then `resumed`.
#[tokio::test]
async fn a_resume_answers_its_channels_in_order() {
    let db = TestDb::new().await;
    let s = db.stores(1).await[0];
    let server = db.server(&[]).await;
    let mut c = Client::connect(server.addr, &token(1, "admin", &[])).await;
    let from = c.ready["lastEventId"].clone();
    let names = [
        "nonsense".to_string(),
        format!("sales-data-{s}"),
        "notifications".to_string(),
        "stores".to_string(),
        "sales-data-01".to_string(),
    ];
    c.send(json!({"type": "resume", "lastEventId": from, "events": names}))
        .await;
    let mut answers = Vec::new();
    loop {
        let f = c.frame().await.expect("closed during the resume");
        if f["type"] == "resumed" {
            break;
        }
        answers.push((
            f["type"].as_str().unwrap().to_string(),
            f["event"].as_str().unwrap().to_string(),
        ));
    }
    let want: Vec<(String, String)> = [
        ("error", &names[0]),
        ("subscribed", &names[1]),
        ("subscribed", &names[2]),
        ("subscribed", &names[3]),
        ("error", &names[4]),
    ]
    .iter()
    .map(|(t, n)| (t.to_string(), n.to_string()))
    .collect();
    assert_eq!(answers, want);
}

/// An event row whose payload holds a number past a double's range where
/// the relay reads an integer (`year`, `month`: jsonb keeps `1e400` as its
/// 401 digits) is relayed past, not stopped at: the writes after it reach
/// their subscribers (before, the relay's page read failed at that row on
/// every instance, again at every reconnect).
#[tokio::test]
async fn a_payload_number_past_a_doubles_range_does_not_stop_the_relay() {
    let db = TestDb::new().await;
    let s = db.stores(1).await;
    let staff_id = user(&db, "staff@example.test", "staff", &[s[0]]).await;
    let server = db.server(&[]).await;
    let mut staff = Client::connect(server.addr, &token(staff_id, "staff", &[s[0]])).await;
    staff.subscribe(&format!("sales-data-{}", s[0])).await;
    sqlx::query("SELECT sales.emit('test-huge', '{\"year\": 1e400, \"month\": -1e400, \"previousStoreId\": 1e400}')")
        .execute(&db.pool)
        .await
        .unwrap();
    upsert(&db, vec![record(s[0], 2024, 1, 1, 100)]).await;
    let e = staff.event().await;
    assert_eq!(e["event"], "sales-data-created", "{e}");
    assert_eq!(e["data"]["storeId"], s[0]);
    server.stop().await;
}
