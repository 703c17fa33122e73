//! Helpers shared by the extension tests (`extension_*.rs`): calling the batch
//! functions, reading Postgres errors, counting NOTIFYs.
#![allow(dead_code)]

use sales_e2e::TestDb;
use serde_json::{json, Map, Value};
use sqlx::postgres::{PgDatabaseError, PgListener};
use std::time::Duration;

/// SQLSTATE, message and DETAIL of a Postgres error.
pub fn pg_error(e: &sqlx::Error) -> (String, String, Option<String>) {
    let db = e
        .as_database_error()
        .unwrap_or_else(|| panic!("not a database error: {e}"));
    let pg = db
        .try_downcast_ref::<PgDatabaseError>()
        .expect("a Postgres error");
    (
        pg.code().to_string(),
        pg.message().to_string(),
        pg.detail().map(str::to_string),
    )
}

/// The JSON report carried in DETAIL by a PS422 error.
pub fn ps422_report(e: &sqlx::Error) -> Value {
    let (code, message, detail) = pg_error(e);
    assert_eq!(code, "PS422", "expected PS422, got {code}: {message}");
    serde_json::from_str(&detail.expect("PS422 carries DETAIL")).expect("DETAIL is JSON")
}

/// Asserts SQLSTATE `code` and returns the message.
pub fn expect_code(r: Result<impl std::fmt::Debug, sqlx::Error>, code: &str) -> String {
    let e = r.expect_err("expected an error");
    let (c, message, _) = pg_error(&e);
    assert_eq!(c, code, "unexpected SQLSTATE for: {message}");
    message
}

/// `{"1": {"sales": s, "customers": c}, ...}` for days `from..=to`.
pub fn days(from: u32, to: u32, sales: f64, customers: i64) -> Value {
    let mut m = Map::new();
    for d in from..=to {
        m.insert(
            d.to_string(),
            json!({"sales": sales, "customers": customers}),
        );
    }
    Value::Object(m)
}

pub fn record(store: i64, year: i32, month: i32, daily: Value) -> Value {
    json!({"storeId": store, "year": year, "month": month, "dailyData": daily})
}

pub async fn upsert(
    db: &TestDb,
    records: &Value,
    mode: &str,
    atomic: bool,
) -> Result<Value, sqlx::Error> {
    sqlx::query_scalar("SELECT sales.batch_upsert($1, $2, $3)")
        .bind(records)
        .bind(mode)
        .bind(atomic)
        .fetch_one(&db.pool)
        .await
}

pub async fn upsert_ok(db: &TestDb, records: &Value) -> Value {
    upsert(db, records, "merge", true)
        .await
        .expect("batch_upsert")
}

pub async fn scalar_i64(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Counts `sales_events` notifications on a connection of its own.
pub struct Notifications {
    listener: PgListener,
}

impl Notifications {
    pub async fn listen(db: &TestDb) -> Self {
        let mut listener = PgListener::connect(&db.url).await.expect("listener");
        listener
            .listen_all(["sales_events", "test_fence"])
            .await
            .expect("LISTEN");
        Self { listener }
    }

    /// Payloads (event ids) of every `sales_events` notification committed
    /// before this call. A fence NOTIFY is committed now; the queue is in
    /// commit order, so everything before the fence has arrived when it does.
    pub async fn drain(&mut self, db: &TestDb) -> Vec<i64> {
        sqlx::query("SELECT pg_notify('test_fence', '')")
            .execute(&db.pool)
            .await
            .expect("fence");
        let mut ids = Vec::new();
        loop {
            let n = tokio::time::timeout(Duration::from_secs(30), self.listener.recv())
                .await
                .expect("notification within 30 s")
                .expect("listener");
            if n.channel() == "test_fence" {
                return ids;
            }
            ids.push(n.payload().parse().expect("payload is an event id"));
        }
    }
}
