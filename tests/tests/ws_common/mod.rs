//! Shared helpers for the WebSocket tests: tokens, users, writes and a small
//! client that tells events from replies.
#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use sales_e2e::TestDb;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const WAIT: Duration = Duration::from_secs(15);

#[allow(unused_imports)]
pub use sales_e2e::fixtures::token::{token, token_expiring};

/// Inserts a user (for user notifications, which need one) and returns its id.
pub async fn user(db: &TestDb, email: &str, role: &str, stores: &[i64]) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO sales.users (email, password_hash, role, store_ids)
         VALUES ($1, '$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g', $2, $3) RETURNING id",
    )
    .bind(email)
    .bind(role)
    .bind(stores)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

pub fn record(store: i64, year: i32, month: i32, day: u32, sales: i64) -> Value {
    json!({"storeId": store, "year": year, "month": month,
           "dailyData": {day.to_string(): {"sales": sales, "customers": 1}}})
}

/// `sales.batch_upsert` as user `actor` (one transaction).
pub async fn upsert_as(db: &TestDb, actor: Option<i64>, records: Vec<Value>) -> Value {
    let mut tx = db.pool.begin().await.unwrap();
    if let Some(a) = actor {
        sqlx::query("SELECT set_config('sales.user_id', $1, true)")
            .bind(a.to_string())
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    let v: Value = sqlx::query_scalar("SELECT sales.batch_upsert($1)")
        .bind(Value::Array(records))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    v
}

pub async fn upsert(db: &TestDb, records: Vec<Value>) -> Value {
    upsert_as(db, None, records).await
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub fn ws_url(addr: std::net::SocketAddr, token: &str) -> String {
    format!("ws://{addr}/ws?token={token}")
}

/// A test client: `events` holds event frames that arrived while waiting
/// for a reply.
pub struct Client {
    pub ws: Socket,
    pub pending: VecDeque<Value>,
    /// Replies (frames with a `type`) that arrived while waiting for events.
    pub replies: VecDeque<Value>,
    pub ready: Value,
}

impl Client {
    pub async fn connect(addr: std::net::SocketAddr, token: &str) -> Client {
        let (ws, _) =
            tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(ws_url(addr, token)))
                .await
                .expect("connect timed out")
                .expect("connect");
        Client::from_socket(ws).await
    }

    pub async fn from_socket(ws: Socket) -> Client {
        let mut c = Client {
            ws,
            pending: VecDeque::new(),
            replies: VecDeque::new(),
            ready: Value::Null,
        };
        c.ready = c.reply("ready").await;
        c
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    /// The next JSON text frame, or None when the connection ended.
    pub async fn frame(&mut self) -> Option<Value> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("no frame in time");
            match msg {
                Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Waits for a reply of `kind` (or an error), keeping events for later.
    pub async fn reply(&mut self, kind: &str) -> Value {
        if let Some(at) = self
            .replies
            .iter()
            .position(|f| f["type"] == kind || f["type"] == "error")
        {
            return self.replies.remove(at).unwrap();
        }
        loop {
            let f = self
                .frame()
                .await
                .unwrap_or_else(|| panic!("closed while waiting for {kind}"));
            if f.get("type").is_some() {
                if f["type"] == kind || f["type"] == "error" {
                    return f;
                }
            } else {
                self.pending.push_back(f);
            }
        }
    }

    pub async fn subscribe(&mut self, event: &str) -> Value {
        self.send(json!({"type": "subscribe", "event": event}))
            .await;
        self.reply("subscribed").await
    }

    /// The next event frame (frames with an `event` and no `type`).
    pub async fn event(&mut self) -> Value {
        if let Some(e) = self.pending.pop_front() {
            return e;
        }
        loop {
            let f = self
                .frame()
                .await
                .expect("connection closed while waiting for an event");
            if f.get("type").is_none() {
                return f;
            }
            self.replies.push_back(f);
        }
    }

    pub async fn events(&mut self, n: usize) -> Vec<Value> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.event().await);
        }
        v
    }

    /// Asserts nothing else arrives within `quiet` (a ping round trip first
    /// makes sure the server handled everything sent before).
    pub async fn assert_no_event(&mut self, quiet: Duration) {
        assert!(
            self.pending.is_empty(),
            "unexpected events: {:?}",
            self.pending
        );
        self.send(json!({"type": "ping"})).await;
        let pong = self.reply("pong").await;
        assert_eq!(pong["type"], "pong");
        assert!(
            self.pending.is_empty(),
            "unexpected events: {:?}",
            self.pending
        );
        if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(quiet, self.ws.next()).await {
            panic!("unexpected frame: {t}");
        }
    }

    /// Asserts that nothing more is on its way to this connection from the
    /// event log: once the relay has dispatched every logged event, each
    /// frame meant for this connection is queued, and the answer to a ping
    /// is queued behind them (no quiet period to outwait, so a late frame
    /// cannot slip past the check on a busy machine).
    pub async fn assert_nothing_more(&mut self, db: &TestDb, server: &sales_e2e::RunningServer) {
        sales_e2e::relay_caught_up(db, server).await;
        self.assert_no_event(Duration::ZERO).await;
    }

    /// Reads until the server closes; returns the close frame.
    pub async fn closed(&mut self) -> Option<CloseFrame> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("not closed in time")
            {
                Some(Ok(Message::Close(f))) => return f,
                None | Some(Err(_)) => return None,
                Some(Ok(_)) => {}
            }
        }
    }
}

/// Handshake request with extra headers (for the protocol/header token forms).
pub fn request(
    addr: std::net::SocketAddr,
    query: &str,
    headers: &[(&str, &str)],
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut req = format!("ws://{addr}/ws{query}")
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    req
}

/// The admin stats as JSON.
pub async fn stats(addr: std::net::SocketAddr) -> Value {
    reqwest::Client::new()
        .get(format!("http://{addr}/api/admin/websocket/stats"))
        .bearer_auth(token(1, "admin", &[]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}
