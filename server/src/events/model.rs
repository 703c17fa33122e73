//! Events as the relay reads them from `sales.events`, and the NOTIFY-only
//! (ephemeral) messages such as export progress.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};
use sqlx::postgres::PgRow;
use sqlx::{PgExecutor, Row};

pub use super::vocab::{Kind, Variant};

/// A place in delivery order: `seq` (a cluster-wide clock the extension
/// stamps on each event row) orders events; `id` names the event to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    pub seq: i64,
    pub id: i64,
}

impl Pos {
    pub const START: Pos = Pos { seq: 0, id: 0 };
}

/// One row of `sales.events`.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: i64,
    /// Delivery order.
    pub seq: i64,
    pub kind_name: String,
    pub kind: Kind,
    pub store_id: Option<i64>,
    /// Set only on user-only events (notifications): that user alone sees them.
    pub user_id: Option<i64>,
    /// Who caused the event (the `sales.user_id` setting of the writer).
    pub actor_id: Option<i64>,
    pub row_id: Option<i64>,
    pub row_version: Option<i64>,
    pub payload: Value,
    pub created_at: DateTime<Utc>,
    /// The region of the event's store when it was read (for the
    /// `region-<name>` channels).
    pub region: Option<super::vocab::RegionKey>,
}

/// The columns of an event row `e`, and its store's region.
const COLUMNS: &str = "e.id, e.seq, e.kind, e.store_id, e.user_id, e.actor_id, e.row_id, \
     e.row_version, e.payload, e.created_at, \
     (SELECT s.region FROM sales.stores s WHERE s.id = e.store_id) AS region";

/// The last event a new reader starts after (see [`Event::head`]).
pub const HEAD_SQL: &str =
    "SELECT e.id, e.seq FROM sales.events e WHERE e.id = (SELECT sales.events_head())";

impl Event {
    pub fn pos(&self) -> Pos {
        Pos {
            seq: self.seq,
            id: self.id,
        }
    }

    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        let kind_name: String = row.try_get("kind")?;
        Ok(Event {
            id: row.try_get("id")?,
            seq: row.try_get("seq")?,
            kind: Kind::parse(&kind_name),
            kind_name,
            store_id: row.try_get("store_id")?,
            user_id: row.try_get("user_id")?,
            actor_id: row.try_get("actor_id")?,
            row_id: row.try_get("row_id")?,
            row_version: row.try_get("row_version")?,
            payload: row.try_get("payload")?,
            created_at: row.try_get("created_at")?,
            region: row
                .try_get::<Option<String>, _>("region")?
                .and_then(|r| super::vocab::RegionKey::of(&r)),
        })
    }

    /// Events after `after_id` in delivery order (see `sales.events_since`).
    /// A pruned `after_id` fails with SQLSTATE PS410.
    pub async fn since<'e>(
        exec: impl PgExecutor<'e>,
        after_id: i64,
        max_rows: i32,
    ) -> Result<Vec<Event>, sqlx::Error> {
        let sql = format!("SELECT {COLUMNS} FROM sales.events_since($1, $2) e");
        let rows = sqlx::query(&sql)
            .bind(after_id)
            .bind(max_rows)
            .fetch_all(exec)
            .await?;
        rows.iter().map(Event::from_row).collect()
    }

    /// Events after a delivery position (whether or not its event is still
    /// retained), in delivery order, with the primary's WAL position as they
    /// were read; when nothing is deliverable Postgres waits up to `wait_ms`
    /// for an event-writing transaction to end (a long poll,
    /// `sales.events_after_seq`). May return nothing: call again.
    pub async fn after_seq<'e>(
        exec: impl PgExecutor<'e>,
        pos: Pos,
        max_rows: i32,
        wait_ms: i32,
    ) -> Result<(Vec<Event>, Option<u64>), sqlx::Error> {
        // The primary's WAL position comes with the rows (evaluated after the
        // function has returned them), for the replica read floor: no
        // second round trip before dispatch.
        let sql = format!(
            "SELECT {COLUMNS}, (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint AS lsn
             FROM sales.events_after_seq($1, $2, $3) e"
        );
        let rows = sqlx::query(&sql)
            .bind(pos.seq)
            .bind(max_rows)
            .bind(wait_ms)
            .fetch_all(exec)
            .await?;
        let lsn = match rows.last() {
            Some(r) => Some(r.try_get::<i64, _>("lsn")? as u64),
            None => None,
        };
        let events = rows.iter().map(Event::from_row).collect::<Result<_, _>>()?;
        Ok((events, lsn))
    }

    /// The delivery position of a retained event, `None` when it is not in the table.
    pub async fn position_of<'e>(
        exec: impl PgExecutor<'e>,
        id: i64,
    ) -> Result<Option<Pos>, sqlx::Error> {
        if id == 0 {
            return Ok(Some(Pos::START));
        }
        let seq: Option<i64> = sqlx::query_scalar("SELECT seq FROM sales.events WHERE id = $1")
            .bind(id)
            .fetch_optional(exec)
            .await?;
        Ok(seq.map(|seq| Pos { seq, id }))
    }

    /// Where a new reader starts: the last event `events_since` would return.
    /// (`sales.events_head()` is volatile: as a scalar subquery it runs once;
    /// compared in the WHERE clause it would run for every row of the log.)
    pub async fn head<'e>(exec: impl PgExecutor<'e>) -> Result<Pos, sqlx::Error> {
        let row: Option<(i64, i64)> = sqlx::query_as(HEAD_SQL).fetch_optional(exec).await?;
        Ok(row.map(|(id, seq)| Pos { seq, id }).unwrap_or(Pos::START))
    }

    /// The frame clients receive:
    /// `{"id":N,"event":"sales-data-updated","data":{...,"storeId":..,"version":..},"ts":"..."}`.
    pub fn to_frame(&self) -> String {
        self.frame(Variant::Full)
    }

    /// The frame for one form of delivery (see [`Variant`]).
    pub fn frame(&self, variant: Variant) -> String {
        let (name, data) = match (variant, self.moved_from()) {
            (Variant::MovedAway, Some(old)) => {
                let mut m = Map::new();
                m.insert("id".into(), self.row_id.into());
                m.insert("storeId".into(), old.store_id.into());
                m.insert("year".into(), old.year.into());
                m.insert("month".into(), old.month.into());
                m.insert("version".into(), self.row_version.into());
                m.insert("moved".into(), true.into());
                ("sales-data-deleted", m)
            }
            _ => {
                let mut data = match &self.payload {
                    Value::Object(m) => m.clone(),
                    Value::Null => Map::new(),
                    other => {
                        let mut m = Map::new();
                        m.insert("value".into(), other.clone());
                        m
                    }
                };
                if let Some(s) = self.store_id {
                    data.entry("storeId").or_insert(Value::from(s));
                }
                if let Some(v) = self.row_version {
                    data.entry("version").or_insert(Value::from(v));
                }
                (self.kind_name.as_str(), data)
            }
        };
        serde_json::json!({
            "id": self.id,
            "event": name,
            "data": Value::Object(data),
            "ts": self.created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        })
        .to_string()
    }
}

/// Whether a database error is "that event is no longer retained" (PS410).
pub fn is_pruned(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "PS410")
}

/// A NOTIFY-only message for one user (export progress and the like).
#[derive(Debug, Clone, PartialEq)]
pub struct Ephemeral {
    pub user_id: i64,
    pub event: String,
    pub data: Value,
}

impl Ephemeral {
    pub fn parse(payload: &str) -> Result<Self, String> {
        let v: Value = serde_json::from_str(payload).map_err(|e| format!("not JSON: {e}"))?;
        let user_id = v
            .get("userId")
            .and_then(|u| {
                u.as_i64()
                    .or_else(|| u.as_str().and_then(|s| s.parse().ok()))
            })
            .ok_or("userId must be a user id")?;
        let event = v
            .get("event")
            .and_then(Value::as_str)
            .ok_or("event must be a string")?;
        if event.is_empty()
            || event.len() > 64
            || !event.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
        {
            return Err("event must be a lowercase-hyphenated name".into());
        }
        Ok(Ephemeral {
            user_id,
            event: event.to_string(),
            data: v.get("data").cloned().unwrap_or(Value::Null),
        })
    }

    /// `{"event":"export-progress","data":{...},"ts":"..."}`: no id, never replayed.
    pub fn to_frame(&self) -> String {
        serde_json::json!({
            "event": self.event,
            "data": self.data,
            "ts": Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str, payload: Value) -> Event {
        Event {
            id: 7,
            seq: 100,
            kind_name: kind.into(),
            kind: Kind::parse(kind),
            store_id: Some(3),
            user_id: None,
            actor_id: Some(1),
            row_id: Some(9),
            row_version: Some(2),
            payload,
            created_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            region: None,
        }
    }

    #[test]
    fn frame_adds_store_and_version_without_overriding() {
        let f: Value = serde_json::from_str(
            &ev("sales-data-updated", serde_json::json!({"id": 9})).to_frame(),
        )
        .unwrap();
        assert_eq!(f["id"], 7);
        assert_eq!(f["event"], "sales-data-updated");
        assert_eq!(f["data"]["storeId"], 3);
        assert_eq!(f["data"]["version"], 2);
        assert_eq!(f["ts"], "2023-11-14T22:13:20.000000Z");
        let f: Value = serde_json::from_str(
            &ev("store-updated", serde_json::json!({"version": 5})).to_frame(),
        )
        .unwrap();
        assert_eq!(f["data"]["version"], 5);
    }

    #[test]
    fn positions_order_by_seq() {
        assert!(Pos { seq: 5, id: 100 } < Pos { seq: 6, id: 1 });
        assert!(Pos::START < Pos { seq: 1, id: 1 });
    }

    #[test]
    fn ephemeral_payloads() {
        let e = Ephemeral::parse(r#"{"userId":4,"event":"export-progress","data":{"rows":10}}"#)
            .unwrap();
        assert_eq!(e.user_id, 4);
        assert_eq!(e.data["rows"], 10);
        assert!(Ephemeral::parse(r#"{"event":"export-progress"}"#).is_err());
        assert!(Ephemeral::parse(r#"{"userId":1,"event":"Bad Name"}"#).is_err());
        assert!(Ephemeral::parse("nope").is_err());
    }
}
