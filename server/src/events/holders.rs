//! What holds event delivery back: event-writing transactions still
//! running (`sales.event_holders()`). Events ordered after such a
//! transaction's first event wait for it to end; one that has run longer
//! than [`REPORT_AFTER`] is named in `/health` (admins), the WebSocket stats
//! and the `events_delivery_held_back_seconds` metric.

use serde::Serialize;
use serde_json::Value;
use std::time::Duration;

/// Holders younger than this are ordinary commits in flight.
pub const REPORT_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Holder {
    pub pid: i32,
    /// Seconds the transaction has held delivery back (since its first event).
    pub held_for_seconds: f64,
    pub since: chrono::DateTime<chrono::Utc>,
    pub query_start: Option<chrono::DateTime<chrono::Utc>>,
    pub state: Option<String>,
}

/// The transactions holding delivery back for longer than [`REPORT_AFTER`],
/// oldest first.
pub async fn list<'e>(exec: impl sqlx::PgExecutor<'e>) -> Result<Vec<Holder>, sqlx::Error> {
    use sqlx::Row;
    let rows = sqlx::query(
        "SELECT pid, extract(epoch FROM held_for)::float8 AS held_for, since, query_start, state
         FROM sales.event_holders()
         WHERE held_for > make_interval(secs => $1)
         ORDER BY since",
    )
    .bind(REPORT_AFTER.as_secs_f64())
    .fetch_all(exec)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Holder {
                pid: r.try_get("pid")?,
                held_for_seconds: r.try_get("held_for")?,
                since: r.try_get("since")?,
                query_start: r.try_get("query_start")?,
                state: r.try_get("state")?,
            })
        })
        .collect()
}

/// The holders as JSON for the stats and `/health`: a list (empty when
/// nothing holds delivery back), or `null` when they cannot be read.
pub async fn report(pool: &sqlx::PgPool) -> Value {
    match tokio::time::timeout(Duration::from_secs(2), list(pool)).await {
        Ok(Ok(h)) => serde_json::to_value(h).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}
