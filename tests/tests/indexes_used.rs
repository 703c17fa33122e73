//! Every index earns its keep: each index of the `sales` schema that backs no
//! constraint is scanned by a query the product itself issues. A database
//! with enough rows that the planner prefers indexes is driven through the API (lists by store
//! and by period, a record by id, summaries, store lists by region, an
//! export, a batch, a delete, a record's history, a login, a WebSocket
//! resume) and the relay;
//! then `pg_stat_user_indexes` must show a scan of every index. An index no
//! product query uses fails this test: drop it, or add the query that needs it.

use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use sales_e2e::{month, user_token, Api, TestDb};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// Scans per index of the `sales` schema, leaving out the indexes that back
/// a primary key or unique constraint (their job is integrity, whether or
/// not a query reads them).
async fn index_scans(db: &TestDb) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT s.indexrelname::text, s.idx_scan FROM pg_stat_user_indexes s \
         WHERE s.schemaname = 'sales' \
           AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = s.indexrelid)",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

#[tokio::test]
async fn every_index_serves_a_product_query() {
    let db = TestDb::new().await;
    // A chain of 5,000 stores over 50 regions with 24 months each (2024 and
    // 2025): 120,000 store-months, written in SQL (one day each) with the
    // event trigger off, so the setup takes seconds. At this size the
    // planner prefers each index for the queries it serves.
    let stores = db.stores(5).await;
    sqlx::raw_sql(
        "INSERT INTO sales.stores (code, name, region) \
             SELECT 'X' || g, 'Store ' || g, 'r' || (g % 50) FROM generate_series(1, 4995) g; \
         UPDATE sales.stores SET region = 'r' || (id % 50); \
         ALTER TABLE sales.monthly_sales DISABLE TRIGGER monthly_sales_events; \
         INSERT INTO sales.monthly_sales (store_id, year, month, daily_data) \
             SELECT s.id, y, m, jsonb_build_object('1', jsonb_build_object('sales', (s.id * m) % 997, 'customers', 1)) \
             FROM sales.stores s, generate_series(2024, 2025) y, generate_series(1, 12) m; \
         ALTER TABLE sales.monthly_sales ENABLE TRIGGER monthly_sales_events;",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let server = db.server(&[]).await;
    let (_, token) = user_token(&db, &server, "admin@example.com", "admin", &[]).await;
    let admin = Api::new(&server, Some(&token));
    // A chain's staff: enough users that a login looks its email up by index.
    sqlx::query(
        "INSERT INTO sales.users (email, password_hash, role, store_ids) \
         SELECT 'staff' || g || '@example.com', '$argon2id$unusable', 'staff', ARRAY[g::bigint] \
         FROM generate_series(1, 2000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(&db.pool).await.unwrap();
    sqlx::query("SELECT pg_stat_reset()")
        .execute(&db.pool)
        .await
        .unwrap();

    let s = stores[2];
    let ok = |(st, body): (u16, Value)| {
        assert_eq!(st, 200, "{body}");
        body
    };
    // Lists: one store's months, one period across stores, a region.
    let by_store = ok(admin.get(&format!("/api/v2/sales?storeId={s}")).await);
    ok(admin.get("/api/v2/sales?year=2025&month=3&limit=50").await);
    ok(admin.get("/api/v2/sales?year=2024&month=3&limit=50").await);
    ok(admin.get("/api/v2/sales?region=r1&year=2025&month=4").await);
    // One record by id.
    let id = by_store["data"][0]["id"].as_i64().expect("a record id");
    ok(admin.get(&format!("/api/v2/sales/{id}")).await);
    // Summaries of one period and of one store.
    ok(admin
        .get("/api/v2/sales/summary?groupBy=region&year=2025&month=5")
        .await);
    ok(admin
        .get("/api/v2/sales/summary?groupBy=month&year=2025&month=6")
        .await);
    ok(admin
        .get("/api/v2/sales/summary?groupBy=month&year=2024&month=5")
        .await);
    ok(admin
        .get(&format!("/api/v2/sales/summary?groupBy=month&storeId={s}"))
        .await);
    // Stores of a region.
    ok(admin.get("/api/v2/stores?region=r2&status=open").await);
    // An export of one store.
    let export = admin
        .req(
            Method::GET,
            &format!("/api/v2/sales/export?format=csv&storeId={s}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(export.status(), 200);
    export.bytes().await.unwrap();
    // A batch that updates existing months (the upsert's conflict key).
    let (st, body) = admin
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [month(s, 2025, 1, 28, 99.0)]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    // A delete by id, and one by key.
    let (st, body) = admin
        .send_json(Method::DELETE, "/api/v2/sales/batch", &json!({"ids": [id]}))
        .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = admin
        .send_json(
            Method::DELETE,
            "/api/v2/sales/batch",
            &json!({"keys": [{"storeId": s, "year": 2025, "month": 2}]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    // A record's history, and the record as it was before the batch
    // (its events by record).
    let updated: i64 = sqlx::query_scalar(
        "SELECT id FROM sales.monthly_sales WHERE store_id = $1 AND year = 2025 AND month = 1",
    )
    .bind(s)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    ok(admin.get(&format!("/api/v2/sales/{updated}/history")).await);
    ok(admin
        .get(&format!("/api/v2/sales/{updated}?asOf=2100-01-01"))
        .await);
    // A login (users by email).
    let anon = Api::new(&server, None);
    let (st, body) = anon
        .post(
            "/api/v2/auth/login",
            &json!({"email": "admin@example.com", "password": "password-123"}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    // A WebSocket resume from an old event id (events by id).
    let first_event: i64 = sqlx::query_scalar("SELECT min(id) FROM sales.events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let url = format!("ws://{}/ws?token={token}", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
    ws.send(Message::text(
        json!({"type": "resume", "lastEventId": first_event, "events": [format!("sales-data-{s}")]})
            .to_string(),
    ))
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "resumed" {
                    break;
                }
            }
        }
    })
    .await
    .ok();

    // Backends report their statistics within a second of finishing a
    // transaction, or within 10 s once idle; wait that long for the rest.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let unused = loop {
        let unused: Vec<String> = index_scans(&db)
            .await
            .into_iter()
            .filter(|(_, n)| *n == 0)
            .map(|(name, _)| name)
            .collect();
        if unused.is_empty() || std::time::Instant::now() > deadline {
            break unused;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        unused.is_empty(),
        "indexes no product query scanned: {unused:?} (all: {:?})",
        index_scans(&db).await
    );
}

/// How often a list query on one store is planned. sqlx prepares each
/// statement once per connection; Postgres plans its first five executions
/// with the values (custom plans), then keeps a generic plan if that is not
/// estimated dearer. The filter for one store is rendered as an equality,
/// which the generic plan estimates as the custom plans do, so it is planned
/// five times and then never again. Rendered as `= ANY($n)` (as for several
/// stores), the generic plan assumes ten stores, looks dearer, and every
/// execution is planned again (a third of the server's CPU under a
/// cache-miss load).
#[tokio::test]
async fn a_one_store_list_is_planned_once_per_connection() {
    use sales_core::projection::{Projection, SALES_DOC};
    use sales_core::sql::{push_sales_doc, push_terms, Term};
    use sales_server::db::sql::Binds;
    use sqlx::{Connection, QueryBuilder};
    let db = TestDb::new().await;
    // The size of the demo data: 200 stores x 24 months.
    let stores = db.stores(200).await;
    sqlx::query(
        "INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
         SELECT s, y, m, '{\"1\": {\"sales\": 10}}'
         FROM unnest($1::bigint[]) s, generate_series(2023, 2024) y, generate_series(1, 12) m",
    )
    .bind(&stores)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE sales.monthly_sales")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    // (generic plans, custom plans) of this connection's prepared list
    // query after `runs` executions with `per_query` stores each.
    async fn plans(
        conn: &mut sqlx::PgConnection,
        stores: &[i64],
        per_query: usize,
        runs: usize,
    ) -> (i64, i64) {
        for i in 0..runs {
            let ids: Vec<i64> = (0..per_query)
                .map(|k| stores[(i + k) % stores.len()])
                .collect();
            // The shape of the list endpoint's query (http/sales/list.rs):
            // a projected document, store and period filters, a total-sales
            // bound (the benchmark's cache buster), keyset order and a limit.
            let fields = ["storeId", "year", "month", "totalSales"];
            let projection = Projection::new(&SALES_DOC, &fields, &[]).unwrap();
            let mut qb: QueryBuilder<sqlx::Postgres> = QueryBuilder::new("SELECT (");
            push_sales_doc(&mut Binds(&mut qb), &projection);
            qb.push(")::text FROM sales.monthly_sales m LEFT JOIN sales.stores s ON s.id = m.store_id WHERE true");
            let bound =
                sales_core::decimal::Bound::parse(&(1_000_000_000_000 + i).to_string()).unwrap();
            push_terms(
                &mut Binds(&mut qb),
                &[
                    Term::StoreIn(&ids),
                    Term::Year(2024),
                    Term::Month((i % 12) as i32 + 1),
                    Term::MaxTotalSales(&bound),
                ],
            );
            qb.push(" ORDER BY m.store_id, m.year, m.month, m.id LIMIT ")
                .push_bind(51i64);
            let rows = qb.build().fetch_all(&mut *conn).await.unwrap();
            assert_eq!(rows.len(), per_query);
        }
        let kind = if per_query == 1 { "= $" } else { "= ANY(" };
        sqlx::query_as(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements
             WHERE statement LIKE '%WHERE true AND m.store_id ' || $1 || '%'",
        )
        .bind(kind)
        .fetch_one(&mut *conn)
        .await
        .unwrap()
    }
    // Five custom plans, then the generic one (a plan invalidated meanwhile,
    // say by an ANALYZE, would be rebuilt once more).
    let (generic, custom) = plans(&mut conn, &stores, 1, 20).await;
    assert!(
        generic >= 14 && custom <= 6,
        "one store: {generic} generic, {custom} custom plans"
    );
    assert_eq!(
        plans(&mut conn, &stores, 2, 20).await,
        (0, 20),
        "two stores"
    );
}

/// A write transaction reads back its own events (for the cache tags it
/// invalidates) by an index condition on seq, however long the log: the
/// server's statement and `sales.transaction_events()` both take the
/// transaction's seq range from scalar subqueries. With the volatile range
/// functions called in the WHERE clause, each write scanned the whole log.
/// Likewise the position a starting server relays from.
#[tokio::test]
async fn the_event_log_is_read_by_index_whatever_its_length() {
    use sqlx::Connection;
    let db = TestDb::new().await;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO sales.events (kind, payload) SELECT 'test-filler', '{}' FROM generate_series(1, 20000);
         ANALYZE sales.events;",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let body: String = sqlx::query_scalar(
        "SELECT prosrc FROM pg_proc WHERE oid = 'sales.transaction_events()'::regprocedure",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("SELECT sales.emit('test-event', '{}')")
        .execute(&mut *tx)
        .await
        .unwrap();
    for (what, sql) in [
        (
            "the server's statement",
            sales_server::db::write::TX_EVENTS_SQL,
        ),
        ("sales.transaction_events()", body.as_str()),
    ] {
        let plan: Value = sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) {sql}"))
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        let text = plan.to_string();
        assert!(
            text.contains("\"Index Name\":\"events_seq_idx\"") && !text.contains("Seq Scan"),
            "{what}: {plan:#}"
        );
    }
    let mine: Vec<String> = sqlx::query_scalar("SELECT kind FROM sales.transaction_events()")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(mine, ["test-event"]);
    tx.rollback().await.unwrap();

    // Where a starting server begins relaying: the head's id, then its seq
    // by one lookup of that id.
    let plan: Value = sqlx::query_scalar(&format!(
        "EXPLAIN (FORMAT JSON) {}",
        sales_server::events::model::SEQ_OF_SQL.replace("$1", "1")
    ))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let text = plan.to_string();
    assert!(
        text.contains("\"Index Name\":\"events_pkey\"") && !text.contains("Seq Scan"),
        "{plan:#}"
    );
    let head = sales_server::events::model::Event::head(&mut conn)
        .await
        .unwrap();
    let last: (i64, i64) =
        sqlx::query_as("SELECT id, seq FROM sales.events ORDER BY seq DESC LIMIT 1")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!((head.id, head.seq), last);

    // Whether a resume is too far behind: read from the seq index, at most
    // the bound's number of entries.
    let plan: Value = sqlx::query_scalar(&format!(
        "EXPLAIN (FORMAT JSON) {}",
        sales_server::events::model::MORE_THAN_BETWEEN_SQL
    ))
    .bind(head.seq - 15_000)
    .bind(head.seq)
    .bind(100_000i64)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let text = plan.to_string();
    assert!(
        text.contains("\"Index Name\":\"events_seq_idx\"") && !text.contains("Seq Scan"),
        "{plan:#}"
    );
    // Exactly at the bound is not more than it; one under is.
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sales.events WHERE seq > 0 AND seq <= $1")
            .bind(head.seq)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert!(n >= 20_000, "{n}");
    for (max, more) in [(100i64, true), (n - 1, true), (n, false), (n + 1, false)] {
        let got: bool = sqlx::query_scalar(sales_server::events::model::MORE_THAN_BETWEEN_SQL)
            .bind(0i64)
            .bind(head.seq)
            .bind(max)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(got, more, "more than {max}");
    }
}

/// The relay looks up the regions of a page's stores by the stores' key,
/// and a deleted store's by the event log's row index. A chain of a few
/// hundred stores fits in a few pages, and Postgres would rather scan them
/// than the key; the relay's connection turns sequential scans off for
/// that.
#[tokio::test]
async fn the_relay_looks_up_each_events_store_by_key() {
    use sqlx::{ConnectOptions, Connection};
    use std::str::FromStr;
    let db = TestDb::new().await;
    db.stores(200).await;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("ANALYZE sales.stores")
        .execute(&mut conn)
        .await
        .unwrap();
    let options = sqlx::postgres::PgConnectOptions::from_str(&db.url).unwrap();
    let mut relay = sales_server::events::relay::reader_options(&options)
        .connect()
        .await
        .unwrap();
    let sql = sales_server::events::model::REGIONS_SQL;
    let plan: Value = sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) {sql}"))
        .bind((1..=200).collect::<Vec<i64>>())
        .fetch_one(&mut relay)
        .await
        .unwrap();
    let text = plan.to_string();
    assert!(
        text.contains("\"Index Name\":\"stores_pkey\"")
            && text.contains("\"Index Name\":\"events_row_idx\"")
            && !text.contains("Seq Scan"),
        "{plan:#}"
    );
}
