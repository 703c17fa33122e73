//! A record's history (`GET /api/v2/sales/{id}/history`) and the record as
//! it was at a time (`GET /api/v2/sales/{id}?asOf=`), read back from its
//! events by `sales.history` and `sales.get_sales_as_of` (see
//! extension/sql/history.sql).
//!
//! Scope: a caller limited to some stores sees a record's past only when
//! every store the record belonged to (now and in its retained history) is
//! theirs; otherwise the record is 404, as a missing one.

use crate::auth::Principal;
use crate::http::error::{ApiError, ApiResult, ErrorBody};
use crate::state::AppState;
use chrono::{DateTime, Utc};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object};
use serde_json::{json, Value};

use super::{DaySales, RawJson};

/// Largest page of history.
pub const MAX_HISTORY_LIMIT: i64 = 200;

/// Who wrote a version.
#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct HistoryActor {
    /// `user` (through the API, or SQL that named its user), or `sql` for a
    /// write that named no user.
    #[oai(rename = "type")]
    pub kind: String,
    pub user_id: Option<i64>,
    /// The user's email now: shown to whoever may look the user up (admins;
    /// a manager for their staff; a user for themselves), null otherwise
    /// and when the user was deleted.
    pub email: Option<String>,
}

/// Where a record was before a version moved it.
#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct HistoryKey {
    pub store_id: i64,
    pub year: i32,
    pub month: i32,
}

/// One day a version changed.
#[derive(Object, Debug)]
pub struct DayChange {
    /// Day of month, `"1"`..`"31"`.
    pub day: String,
    /// The day before (null: not reported).
    pub old: Option<DaySales>,
    /// The day after (null: removed, or the record was deleted).
    pub new: Option<DaySales>,
}

/// One version of a record.
#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub version: i64,
    /// When the writing transaction started.
    pub at: String,
    /// The event that recorded it (`sales.events`).
    pub event_id: i64,
    /// `insert`, `update` or `delete`.
    pub operation: String,
    pub actor: HistoryActor,
    /// The import or asynchronous batch that wrote it (`/api/v2/imports/{id}`).
    pub job_id: Option<i64>,
    pub store_id: i64,
    pub year: i32,
    pub month: i32,
    /// Where the record was before, when this version moved it.
    pub previous: Option<HistoryKey>,
    /// False for versions written before the events carried old values
    /// (pg_sales 0.3.0): `changes` is then null.
    pub values_known: bool,
    /// Each changed day, old -> new, by day.
    pub changes: Option<Vec<DayChange>>,
}

/// Versions no longer retained.
#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct HistoryGone {
    /// Versions 1 to this one are gone.
    pub through_version: i64,
    pub message: String,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct HistoryMeta {
    pub id: i64,
    /// Null when the record was deleted.
    pub current_version: Option<i64>,
    pub deleted: bool,
    /// The retained versions reach back to the record's insert.
    pub complete: bool,
    /// Pass as `beforeVersion` for the next (older) page; null on the last.
    pub next_before_version: Option<i64>,
    /// Set when older versions are no longer retained.
    pub gone: Option<HistoryGone>,
    /// How long history is kept (`HISTORY_RETENTION`).
    pub history_retention_seconds: i64,
}

#[derive(Object, Debug)]
pub struct HistoryPage {
    /// Newest first.
    pub data: Vec<HistoryEntry>,
    pub meta: HistoryMeta,
}

#[derive(ApiResponse)]
pub enum HistoryResponse {
    /// A page of versions, newest first.
    #[oai(status = 200)]
    Ok(RawJson<HistoryPage>),
    /// The versions asked for are older than the retained history
    /// (`details.throughVersion`: versions 1 to it are gone).
    #[oai(status = 410)]
    Gone(Json<ErrorBody>),
}

/// Whether the caller may see record `$1`: it is known, and every store it
/// belonged to is in the caller's scope `$5` (`NULL`: every store). Read by
/// the statement that reads the record, with the same snapshot: checked in
/// a statement of its own, a record moved out of the caller's stores
/// between the two was answered with the days of its new store.
const VISIBLE_SQL: &str =
    "(SELECT cardinality(r) > 0 AND ($5::bigint[] IS NULL OR r <@ $5::bigint[]) \
     FROM sales.record_stores($1) r)";

fn not_found(id: i64) -> ApiError {
    ApiError::not_found(format!("no sales record {id}"))
}

/// The history page as the API answers it (cached as text; a page that is
/// wholly older than the retained history is answered 410 by the caller).
pub(super) async fn history_body(
    state: &AppState,
    id: i64,
    who: &Principal,
    limit: i64,
    before_version: Option<i64>,
) -> ApiResult<String> {
    // Composed in SQL and read as text: day values keep every digit (a
    // `serde_json::Value` would read them as f64).
    let sql = format!(
        "WITH s AS MATERIALIZED (SELECT {VISIBLE_SQL} AS visible)
         SELECT s.visible, CASE WHEN s.visible THEN
                (SELECT CASE WHEN h IS NOT NULL THEN
                        jsonb_build_object('data', coalesce(h -> 'versions', '[]'::jsonb),
                                           'meta', (h - 'versions')
                                                   || jsonb_build_object('historyRetentionSeconds', $4::bigint))::text
                        END
                 FROM sales.history($1, $2, $3) h)
                END
         FROM s"
    );
    let (visible, doc): (bool, Option<String>) =
        crate::db::retry("sales_history", true, || async {
            crate::metrics::timed(
                "sales_history",
                sqlx::query_as(&sql)
                    .bind(id)
                    .bind(limit as i32)
                    .bind(before_version)
                    .bind(state.config.history_retention.as_secs() as i64)
                    .bind(who.scope())
                    .fetch_one(&mut *state.read_conn().await?),
            )
            .await
        })
        .await?;
    match doc {
        Some(doc) if visible => Ok(doc),
        _ => Err(not_found(id)),
    }
}

/// The actors whose emails the caller may not see in a page (cached
/// with every email, for every caller of the same scope). Admins see
/// every one; a manager those of the staff they manage (a staff user with
/// one of their stores) and their own; anyone else their own: the same
/// users each may look up through `/api/v2/users`.
async fn hidden_actors(state: &AppState, who: &Principal, page: &Value) -> ApiResult<Vec<i64>> {
    use crate::auth::Role;
    if who.role == Role::Admin {
        return Ok(Vec::new());
    }
    let Some(versions) = page["data"].as_array() else {
        return Ok(Vec::new());
    };
    let others: Vec<i64> = versions
        .iter()
        .filter(|v| !v["actor"]["email"].is_null())
        .filter_map(|v| v["actor"]["userId"].as_i64())
        .filter(|&u| u != who.user_id)
        .collect::<std::collections::BTreeSet<i64>>()
        .into_iter()
        .collect();
    let managed: std::collections::HashSet<i64> = if who.role == Role::Manager && !others.is_empty()
    {
        let stores: Vec<i64> = who.stores.iter().copied().collect();
        crate::db::retry("history_actors", true, || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT id FROM sales.users WHERE id = ANY($1) AND role = 'staff' AND store_ids && $2",
            )
            .bind(&others)
            .bind(&stores)
            .fetch_all(&mut *state.read_conn().await?)
            .await
        })
        .await?
        .into_iter()
        .collect()
    } else {
        Default::default()
    };
    Ok(others
        .into_iter()
        .filter(|u| !managed.contains(u))
        .collect())
}

/// `page` with the emails of the actors `hidden` set to null. Done in SQL on
/// the page's text, so every other value (day values above all) stays
/// exactly as written.
async fn without_emails(state: &AppState, page: &str, hidden: &[i64]) -> ApiResult<String> {
    let out: String = crate::db::retry("history_hide_emails", true, || async {
        sqlx::query_scalar(
            "SELECT jsonb_set(p, '{data}', coalesce((
                        SELECT jsonb_agg(CASE WHEN (v #>> '{actor,userId}')::bigint = ANY($2)
                                              THEN jsonb_set(v, '{actor,email}', 'null')
                                              ELSE v END ORDER BY n)
                        FROM jsonb_array_elements(p -> 'data') WITH ORDINALITY AS t(v, n)), '[]'))::text
             FROM (SELECT $1::jsonb AS p) q",
        )
        .bind(page)
        .bind(hidden)
        .fetch_one(&mut *state.read_conn().await?)
        .await
    })
    .await?;
    Ok(out)
}

/// The page for this caller: 410 for a page with no version that is wholly
/// older than the retained history; otherwise the page with the emails the
/// caller may not see taken out.
pub(super) async fn history_response(
    state: &AppState,
    who: &Principal,
    body: String,
) -> ApiResult<HistoryResponse> {
    // Read for its structure only; the answer is `body` itself, or `body`
    // with emails taken out (numbers read here as f64 are never written back).
    let v: Value = serde_json::from_str(&body).map_err(ApiError::internal)?;
    let gone = {
        let empty = v["data"].as_array().is_some_and(|a| a.is_empty());
        let gone = &v["meta"]["gone"];
        (empty && !gone.is_null()).then(|| gone.clone())
    };
    let body = match gone {
        Some(_) => body,
        None => {
            let hidden = hidden_actors(state, who, &v).await?;
            if hidden.is_empty() {
                body
            } else {
                without_emails(state, &body, &hidden).await?
            }
        }
    };
    match gone {
        Some(g) => Ok(HistoryResponse::Gone(ErrorBody::new(
            "gone",
            g["message"]
                .as_str()
                .unwrap_or("history no longer retained"),
            Some(json!({"throughVersion": g["throughVersion"]})),
        ))),
        None => Ok(HistoryResponse::Ok(RawJson::new(body))),
    }
}

/// `asOf`: an RFC 3339 time (`2024-06-01T12:00:00Z`) or a date (midnight UTC).
pub fn parse_as_of(raw: &str) -> ApiResult<DateTime<Utc>> {
    let raw = raw.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Ok(t.with_timezone(&Utc));
    }
    // A year of four digits, as RFC 3339 has it (`%Y` also takes a sign
    // and more digits, past what a Postgres timestamp holds).
    let four_digit_year = raw.len() == 10 && raw.as_bytes()[..4].iter().all(u8::is_ascii_digit);
    if let Ok(d) = chrono::NaiveDate::parse_from_str(raw, "%Y-%m-%d") {
        if let Some(t) = d.and_hms_opt(0, 0, 0).filter(|_| four_digit_year) {
            return Ok(t.and_utc());
        }
    }
    Err(ApiError::bad_param(
        "asOf",
        format!(
            "{raw:?} is not a time like 2024-06-01T12:00:00Z (RFC 3339) or a date like 2024-06-01"
        ),
    ))
}

/// What an as-of read found, as cached: `{"data": doc}`, or `{"missing":
/// why}` (404), or `{"gone": why}` (410).
pub(super) async fn as_of_body(
    state: &AppState,
    id: i64,
    at: DateTime<Utc>,
    fields: &[String],
    exclude: &[String],
    who: &Principal,
) -> ApiResult<String> {
    let none = |v: &[String]| (!v.is_empty()).then(|| v.to_vec());
    // The record's document is only looked for once the same statement has
    // found the caller may see it (an unknown or gone version of a record
    // out of scope is a 404 like the record).
    let sql = format!(
        "WITH s AS MATERIALIZED (SELECT {VISIBLE_SQL} AS visible)
         SELECT s.visible, CASE WHEN s.visible THEN sales.get_sales_as_of($1, $2, $3, $4)::text END
         FROM s"
    );
    let found: Result<(bool, Option<String>), sqlx::Error> =
        crate::db::retry("sales_get_as_of", true, || async {
            crate::metrics::timed(
                "sales_get_as_of",
                sqlx::query_as(&sql)
                    .bind(id)
                    .bind(at)
                    .bind(none(fields))
                    .bind(none(exclude))
                    .bind(who.scope())
                    .fetch_one(&mut *state.read_conn().await?),
            )
            .await
        })
        .await;
    let why = |e: &sqlx::Error, code: &str| {
        e.as_database_error()
            .filter(|d| d.code().as_deref() == Some(code))
            .map(|d| d.message().to_string())
    };
    match found {
        Ok((true, Some(doc))) => Ok(format!("{{\"data\":{doc}}}")),
        Ok(_) => Err(not_found(id)),
        Err(e) => {
            if let Some(m) = why(&e, "PS404") {
                Ok(json!({"missing": m}).to_string())
            } else if let Some(m) = why(&e, "PSGON") {
                Ok(json!({"gone": m}).to_string())
            } else {
                Err(e.into())
            }
        }
    }
}
