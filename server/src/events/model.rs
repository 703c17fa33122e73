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
    pub payload: Payload,
    pub created_at: DateTime<Utc>,
    /// The region of the event's store when it was read (for the
    /// `region-<name>` channels).
    pub region: Option<super::vocab::RegionKey>,
}

/// The columns of an event row `e`. The payload comes as text: the relay
/// keeps it as JSON text (see [`Payload`]).
const COLUMNS: &str = "e.id, e.seq, e.kind, e.store_id, e.user_id, e.actor_id, e.row_id, \
     e.row_version, e.payload::text AS payload, e.created_at";

/// The regions of the stores a page's sales events name, read by a
/// statement of its own once the page is in hand: its snapshot is taken
/// after the events became final, so a store created, moved to another
/// region or deleted by the transaction that wrote an event is seen as that
/// transaction left it. (Read inside the page's own statement, the long
/// poll's snapshot predates the events it waited for: a new store's rows
/// reached no region follower and a region change in the same transaction
/// was missed.) A deleted store's region is the one its `store-deleted`
/// event names, so live delivery and replay both give its rows, their
/// deletions included, to that region's followers.
pub const REGIONS_SQL: &str = "SELECT i.id, coalesce(s.region, \
       (SELECT d.payload->>'region' FROM sales.events d \
        WHERE d.row_id = i.id AND d.kind = 'store-deleted' \
        ORDER BY d.row_version DESC LIMIT 1)) \
     FROM unnest($1::bigint[]) i(id) LEFT JOIN sales.stores s ON s.id = i.id";

/// Whether more than `$3` events lie after seq `$1` up to seq `$2` (see
/// [`Event::more_than_between`]).
pub const MORE_THAN_BETWEEN_SQL: &str = "SELECT count(*) > $3 FROM (SELECT 1 FROM sales.events e \
     WHERE e.seq > $1 AND e.seq <= $2 ORDER BY e.seq LIMIT $3 + 1) f";

/// The id of the last event a new reader starts after (see [`Event::head`]).
pub const HEAD_ID_SQL: &str = "SELECT sales.events_head()";

/// An event's `seq` from its id (see [`Event::position_of`]).
pub const SEQ_OF_SQL: &str = "SELECT e.seq FROM sales.events e WHERE e.id = $1";

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
            payload: Payload::from_json(
                row.try_get::<Option<&str>, _>("payload")?.unwrap_or("null"),
            )
            .map_err(|e| sqlx::Error::ColumnDecode {
                index: "payload".into(),
                source: Box::new(e),
            })?,
            created_at: row.try_get("created_at")?,
            region: None,
        })
    }

    /// Sets the region of every sales event in `events` (see
    /// [`REGIONS_SQL`]), and makes the region of every store a store event
    /// names known (a new store's, or one a store moved to), so that a
    /// client may follow a region from its first store on, whatever names
    /// clients have taken of their bounded room; one query, none when no
    /// event names a store.
    async fn fill_regions<'e>(
        exec: impl PgExecutor<'e>,
        events: &mut [Event],
    ) -> Result<(), sqlx::Error> {
        let mut stores: Vec<i64> = events
            .iter()
            .filter(|e| e.kind.is_sales() || e.kind.is_store())
            .filter_map(|e| e.store_id)
            .collect();
        if stores.is_empty() {
            return Ok(());
        }
        stores.sort_unstable();
        stores.dedup();
        let rows: Vec<(i64, Option<String>)> = sqlx::query_as(REGIONS_SQL)
            .bind(&stores)
            .fetch_all(exec)
            .await?;
        let regions: std::collections::HashMap<i64, super::vocab::RegionKey> = rows
            .into_iter()
            .filter_map(|(id, r)| Some((id, super::vocab::RegionKey::of(&r?)?)))
            .collect();
        for e in events.iter_mut().filter(|e| e.kind.is_sales()) {
            e.region = e.store_id.and_then(|s| regions.get(&s).copied());
        }
        Ok(())
    }

    /// Events after `after_id` in delivery order (see `sales.events_since`).
    /// A pruned `after_id` fails with SQLSTATE PS410.
    pub async fn since(
        pool: &sqlx::PgPool,
        after_id: i64,
        max_rows: i32,
    ) -> Result<Vec<Event>, sqlx::Error> {
        let sql = format!("SELECT {COLUMNS} FROM sales.events_since($1, $2) e ORDER BY e.seq");
        let rows = sqlx::query(&sql)
            .bind(after_id)
            .bind(max_rows)
            .fetch_all(pool)
            .await?;
        let mut events = rows
            .iter()
            .map(Event::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Self::fill_regions(pool, &mut events).await?;
        Ok(events)
    }

    /// The relay's page query (see [`Event::after_seq`]): after a seq
    /// (`$1`), at most `$2` rows, waiting up to `$3` ms.
    pub fn after_seq_sql() -> String {
        format!(
            "SELECT {COLUMNS}, {floor} AS lsn
             FROM sales.events_after_seq($1, $2, $3) e",
            floor = crate::db::write::READ_FLOOR_EXPR
        )
    }

    /// Events after a delivery position (whether or not its event is still
    /// retained), in delivery order, with the primary's WAL position as they
    /// were read; when nothing is deliverable Postgres waits up to `wait_ms`
    /// for an event-writing transaction to end (a long poll,
    /// `sales.events_after_seq`). May return nothing: call again.
    pub async fn after_seq(
        conn: &mut sqlx::PgConnection,
        pos: Pos,
        max_rows: i32,
        wait_ms: i32,
    ) -> Result<(Vec<Event>, Option<u64>), sqlx::Error> {
        // The primary's WAL position comes with the rows (evaluated after the
        // function has returned them), for the replica read floor; the
        // regions of a page with sales events come by a second statement
        // (see `REGIONS_SQL`).
        let sql = Self::after_seq_sql();
        let rows = sqlx::query(&sql)
            .bind(pos.seq)
            .bind(max_rows)
            .bind(wait_ms)
            .fetch_all(&mut *conn)
            .await?;
        let lsn = match rows.last() {
            Some(r) => Some(r.try_get::<i64, _>("lsn")? as u64),
            None => None,
        };
        let mut events = rows
            .iter()
            .map(Event::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Self::fill_regions(&mut *conn, &mut events).await?;
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
        let seq: Option<i64> = sqlx::query_scalar(SEQ_OF_SQL)
            .bind(id)
            .fetch_optional(exec)
            .await?;
        Ok(seq.map(|seq| Pos { seq, id }))
    }

    /// Whether a replay from the very start of the log (`lastEventId` 0)
    /// would still find every event: false once a prune has run (it ends by
    /// writing `events-pruned`). Only the first `within` events are looked
    /// at: a replay that goes further stops as too long anyway.
    pub async fn log_start_kept<'e>(
        exec: impl PgExecutor<'e>,
        within: i64,
    ) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT NOT EXISTS (SELECT 1 FROM (SELECT e.kind FROM sales.events e
                                               ORDER BY e.seq LIMIT $1) f
                                WHERE f.kind = 'events-pruned')",
        )
        .bind(within)
        .fetch_one(exec)
        .await
    }

    /// Whether more than `max` events lie after `from`, up to `upto`, in
    /// delivery order: a replay over them would stop as too long, so a
    /// resume asks this before it sends anything. Reads at most `max + 1`
    /// entries of the log's `seq` index.
    pub async fn more_than_between<'e>(
        exec: impl PgExecutor<'e>,
        from: Pos,
        upto: Pos,
        max: i64,
    ) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(MORE_THAN_BETWEEN_SQL)
            .bind(from.seq)
            .bind(upto.seq)
            .bind(max)
            .fetch_one(exec)
            .await
    }

    /// Where a new reader starts: the last event `events_since` would return.
    ///
    /// Two statements: `sales.events_head()` reads the delivery horizon and
    /// then, with a snapshot of its own, the newest event below it. Its
    /// seq looked up in the same statement used that statement's snapshot,
    /// older than the function's: an event committed between the two was
    /// named by the function and not found by the lookup, and the reader
    /// started from the beginning of the log (a relay then sent every
    /// retained event again as live). A statement of its own comes after
    /// the function's and sees what it saw, unless the event was pruned
    /// meanwhile (then the head is read again).
    pub async fn head(conn: &mut sqlx::PgConnection) -> Result<Pos, sqlx::Error> {
        for _ in 0..10 {
            let id: i64 = sqlx::query_scalar(HEAD_ID_SQL)
                .fetch_one(&mut *conn)
                .await?;
            if id == 0 {
                return Ok(Pos::START);
            }
            if let Some(pos) = Self::position_of(&mut *conn, id).await? {
                return Ok(pos);
            }
        }
        Err(sqlx::Error::Protocol(
            "the event log's head was pruned each of ten times it was read".into(),
        ))
    }

    /// The log's epoch (`sales.event_log_epoch()`: its identity, made anew
    /// by a restore, and the WAL timeline) and its newest `seq` (0 when
    /// empty): together they tell whether this is still the log a reader
    /// was reading. An identity row that is gone (the table emptied by
    /// hand) is an error saying how to put one back.
    pub async fn log_identity<'e>(exec: impl PgExecutor<'e>) -> Result<(String, i64), sqlx::Error> {
        let (epoch, newest): (Option<String>, i64) = sqlx::query_as(
            "SELECT sales.event_log_epoch(), coalesce((SELECT max(seq) FROM sales.events), 0)",
        )
        .fetch_one(exec)
        .await?;
        let epoch = epoch.ok_or_else(|| {
            sqlx::Error::Protocol(
                "sales.event_log_identity has no row, so the event log has no epoch: \
                 INSERT INTO sales.event_log_identity DEFAULT VALUES"
                    .into(),
            )
        })?;
        Ok((epoch, newest))
    }

    /// The log's epoch now (None without an identity row).
    pub async fn epoch<'e>(exec: impl PgExecutor<'e>) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT sales.event_log_epoch()")
            .fetch_one(exec)
            .await
    }

    /// The frame clients receive:
    /// `{"id":N,"event":"sales-data-updated","data":{...,"storeId":..,"version":..},"ts":"..."}`.
    pub fn to_frame(&self) -> String {
        self.frame(Variant::Full)
    }

    /// The frame for one form of delivery (see [`Variant`]). The full frame
    /// is written around the payload's own text: `storeId` and `version`
    /// are added when the payload lacks them, nothing else is touched.
    pub fn frame(&self, variant: Variant) -> String {
        if let (Variant::MovedAway, Some(old)) = (variant, self.moved_from()) {
            let mut m = Map::new();
            m.insert("id".into(), self.row_id.into());
            m.insert("storeId".into(), old.store_id.into());
            m.insert("year".into(), old.year.into());
            m.insert("month".into(), old.month.into());
            m.insert("version".into(), self.row_version.into());
            m.insert("moved".into(), true.into());
            return serde_json::json!({
                "id": self.id,
                "event": "sales-data-deleted",
                "data": Value::Object(m),
                "ts": self.created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            })
            .to_string();
        }
        if variant == Variant::MovedIn {
            // Rare (a row moved between stores by plain SQL): parsed and
            // written again without the old store's members.
            let mut data: Value = serde_json::from_str(&self.payload.text).unwrap_or(Value::Null);
            if let Some(m) = data.as_object_mut() {
                for k in [
                    "previousStoreId",
                    "previousYear",
                    "previousMonth",
                    "previousDays",
                ] {
                    m.remove(k);
                }
                if let Some(s) = self.store_id {
                    m.entry("storeId").or_insert(s.into());
                }
                if let Some(v) = self.row_version {
                    m.entry("version").or_insert(v.into());
                }
            }
            return serde_json::json!({
                "id": self.id,
                "event": self.kind_name,
                "data": data,
                "ts": self.created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            })
            .to_string();
        }
        let p = &self.payload;
        let mut out = String::with_capacity(p.text.len() + 128);
        out.push_str("{\"id\":");
        out.push_str(itoa::Buffer::new().format(self.id));
        out.push_str(",\"event\":");
        push_json_string(&mut out, &self.kind_name);
        out.push_str(",\"data\":");
        let mut fields = 0;
        match p.keys.shape {
            Shape::Object => {
                // The object's text without its closing brace.
                out.push_str(&p.text[..p.text.len() - 1]);
                fields = usize::from(p.text.len() > 2);
            }
            Shape::Null => out.push('{'),
            Shape::Other => {
                out.push_str("{\"value\":");
                out.push_str(&p.text);
                fields = 1;
            }
        }
        let mut add = |key: &str, v: Option<i64>, present: bool| {
            if let (Some(v), false) = (v, present) {
                if fields > 0 {
                    out.push(',');
                }
                out.push('"');
                out.push_str(key);
                out.push_str("\":");
                out.push_str(itoa::Buffer::new().format(v));
                fields += 1;
            }
        };
        add("storeId", self.store_id, p.keys.has_store_id);
        add("version", self.row_version, p.keys.has_version);
        out.push_str("},\"ts\":\"");
        out.push_str(&self.created_at.to_rfc3339_opts(SecondsFormat::Micros, true));
        out.push_str("\"}");
        out
    }
}

fn push_json_string(out: &mut String, s: &str) {
    // Serialising a &str into a String cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// An event's payload as the relay keeps it: its JSON text without
/// whitespace, and the few members the server reads (row keys for cache
/// tags and moved rows). Nothing else of it is parsed: a sales event's
/// changed and previous days go from Postgres to every client as text.
#[derive(Debug, Clone)]
pub struct Payload {
    text: Box<str>,
    keys: PayloadKeys,
}

/// What the server reads of a payload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PayloadKeys {
    shape: Shape,
    pub year: Option<i64>,
    pub month: Option<i64>,
    pub previous_store_id: Option<i64>,
    pub previous_year: Option<i64>,
    pub previous_month: Option<i64>,
    has_store_id: bool,
    has_version: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Shape {
    Object,
    #[default]
    Null,
    Other,
}

impl Payload {
    /// From JSON text (Postgres's `jsonb` output, with its spaces).
    pub fn from_json(text: &str) -> Result<Payload, serde_json::Error> {
        let text = compact(text);
        // Nothing here builds a tree: the members read go through
        // `KeysVisitor`, the rest is skipped as raw text (serde_json skips
        // without recursing), so a document nested deeper than its parser
        // goes (128 levels; jsonb allows more) is still a payload, its
        // members beside the deep one read, rather than stopping the relay
        // at this event.
        let keys = match text.as_bytes().first() {
            Some(b'{') => {
                let mut de = serde_json::Deserializer::from_str(&text);
                let keys = serde::Deserializer::deserialize_map(&mut de, KeysVisitor)?;
                de.end()?;
                keys
            }
            _ => {
                // Checks the text is one JSON value.
                let v = serde_json::from_str::<&serde_json::value::RawValue>(&text)?;
                PayloadKeys {
                    shape: if v.get() == "null" {
                        Shape::Null
                    } else {
                        Shape::Other
                    },
                    ..PayloadKeys::default()
                }
            }
        };
        Ok(Payload {
            text: text.into_boxed_str(),
            keys,
        })
    }

    #[cfg(test)]
    pub fn from_value(v: &Value) -> Payload {
        Payload::from_json(&v.to_string()).expect("a Value prints as JSON")
    }

    /// The members the server reads.
    pub fn keys(&self) -> &PayloadKeys {
        &self.keys
    }

    /// The JSON text, without whitespace.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The whole payload, parsed (for the rare events whose every member
    /// the server reads: user and session changes).
    pub fn value(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
}

impl Default for Payload {
    fn default() -> Self {
        Payload {
            text: "null".into(),
            keys: PayloadKeys::default(),
        }
    }
}

/// JSON text without the whitespace between tokens.
fn compact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut from = 0;
    for (i, b) in text.bytes().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if matches!(b, b' ' | b'\n' | b'\t' | b'\r') {
            out.push_str(&text[from..i]);
            from = i + 1;
        }
    }
    out.push_str(&text[from..]);
    out
}

struct KeysVisitor;

/// A payload member's name, read without allocating.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Year,
    Month,
    PreviousStoreId,
    PreviousYear,
    PreviousMonth,
    StoreId,
    Version,
    Other,
}

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Key, E> {
                Ok(match s {
                    "year" => Key::Year,
                    "month" => Key::Month,
                    "previousStoreId" => Key::PreviousStoreId,
                    "previousYear" => Key::PreviousYear,
                    "previousMonth" => Key::PreviousMonth,
                    "storeId" => Key::StoreId,
                    "version" => Key::Version,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

impl<'de> serde::de::Visitor<'de> for KeysVisitor {
    type Value = PayloadKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<PayloadKeys, A::Error> {
        use serde::de::IgnoredAny;
        let mut k = PayloadKeys {
            shape: Shape::Object,
            ..PayloadKeys::default()
        };
        // A member the server reads as an integer: anything else reads as
        // absent (as `Value::as_i64` would). Taken as text, not as a
        // `Value`: a number past an `f64`'s range (jsonb keeps `1e400` as
        // its 401 digits) is an error to `Value`, and would stop the relay
        // at this event on every instance.
        fn int<'de, A: serde::de::MapAccess<'de>>(map: &mut A) -> Result<Option<i64>, A::Error> {
            Ok(map
                .next_value::<&serde_json::value::RawValue>()?
                .get()
                .parse::<i64>()
                .ok())
        }
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Year => k.year = int(&mut map)?,
                Key::Month => k.month = int(&mut map)?,
                Key::PreviousStoreId => k.previous_store_id = int(&mut map)?,
                Key::PreviousYear => k.previous_year = int(&mut map)?,
                Key::PreviousMonth => k.previous_month = int(&mut map)?,
                Key::StoreId | Key::Version | Key::Other => {
                    k.has_store_id |= key == Key::StoreId;
                    k.has_version |= key == Key::Version;
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(k)
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
            payload: Payload::from_value(&payload),
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

    /// The frame as a map of the payload would make it.
    fn reference_frame(e: &Event, payload: &Value) -> Value {
        let mut data = match payload {
            Value::Object(m) => m.clone(),
            Value::Null => Map::new(),
            other => Map::from_iter([("value".to_string(), other.clone())]),
        };
        if let Some(s) = e.store_id {
            data.entry("storeId").or_insert(Value::from(s));
        }
        if let Some(v) = e.row_version {
            data.entry("version").or_insert(Value::from(v));
        }
        serde_json::json!({
            "id": e.id,
            "event": e.kind_name,
            "data": data,
            "ts": e.created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        })
    }

    #[test]
    fn frames_are_written_around_the_payload_text() {
        let payloads = [
            r#"{"id": 9, "year": 2025, "month": 3, "version": 4, "storeId": 3}"#,
            r#"{"id": 9, "changedDays": ["1", "12"], "previousDays": {"1": null, "12": {"sales": 1.50}}}"#,
            r#"{"note": "a \"quoted\" value:  with , spaces\\", "nested": {"storeId": 1}}"#,
            "{}",
            "{ }",
            "null",
            "[1, 2]",
            r#""text with  spaces""#,
            "12.50",
            "{\n\t\"k\" : [ ] }",
        ];
        for text in payloads {
            let parsed: Value = serde_json::from_str(text).unwrap();
            for (store, version) in [(Some(3), Some(2)), (None, None), (Some(5), None)] {
                let mut e = ev("sales-data-updated", Value::Null);
                e.store_id = store;
                e.row_version = version;
                e.payload = Payload::from_json(text).unwrap();
                let frame = e.to_frame();
                assert!(!frame.contains(": ") || text.contains(":  with"), "{frame}");
                let got: Value = serde_json::from_str(&frame)
                    .unwrap_or_else(|err| panic!("{text}: the frame {frame} is not JSON: {err}"));
                assert_eq!(got, reference_frame(&e, &parsed), "{text}");
                assert_eq!(e.payload.value(), parsed);
            }
        }
        // Nested past the parser's depth (jsonb allows it), in a member
        // the server reads or another: kept as text, so the relay goes on
        // past such an event; the members beside it are read.
        for member in ["month", "note"] {
            let deep = format!(
                "{{\"year\": 2024, \"{member}\": {}1{}}}",
                "[".repeat(300),
                "]".repeat(300)
            );
            let p = Payload::from_json(&deep).expect("a deep document is still a payload");
            assert_eq!(p.text(), deep.replace(' ', ""));
            assert_eq!((p.keys().year, p.keys().month), (Some(2024), None));
        }
        let deep_array = format!("{}1{}", "[".repeat(300), "]".repeat(300));
        assert!(Payload::from_json(&deep_array).is_ok());
        // Numbers past an f64's range, where the server reads an integer
        // and elsewhere: read as absent, sent as they are.
        let huge = format!("1{}", "0".repeat(400));
        for text in [
            format!(r#"{{"year": {huge}, "month": -{huge}, "previousStoreId": {huge}.5}}"#),
            format!(r#"{{"year": 2024, "changedDays": [{huge}], "x": {{"y": {huge}}}}}"#),
        ] {
            let p = Payload::from_json(&text).expect("a huge number is still a payload");
            assert_eq!(p.text(), text.replace(' ', ""));
            assert_eq!((p.keys().month, p.keys().previous_store_id), (None, None));
        }
        assert!(Payload::from_json("{").is_err());
        assert!(Payload::from_json("{} x").is_err());
        assert!(Payload::from_json("").is_err());
    }

    #[test]
    fn payload_keys_read_integers_only() {
        let p = Payload::from_json(
            r#"{"year": 2025, "month": "3", "previousStoreId": 4, "previousYear": 1.5,
                "previousMonth": null, "storeId": "x", "changedDays": {"year": 1}}"#,
        )
        .unwrap();
        let k = p.keys();
        assert_eq!(
            (
                k.year,
                k.month,
                k.previous_store_id,
                k.previous_year,
                k.previous_month
            ),
            (Some(2025), None, Some(4), None, None)
        );
        assert!(k.has_store_id && !k.has_version);
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
