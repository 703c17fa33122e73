//! `/api/admin/*`: announcements, user notifications, index report and maintenance.

use super::error::{ApiError, ApiResult};
use super::security::BearerAuth;
use super::ApiTags;
use crate::db::Write;
use crate::state::AppState;
use poem_openapi::types::MaybeUndefined;
use poem_openapi::{payload::Json, ApiResponse, Enum, Object, OpenApi};
use std::sync::Arc;

pub struct AdminApi {
    pub state: Arc<AppState>,
}

#[derive(Enum, Debug, Clone, Copy)]
#[oai(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warning,
    Critical,
}

#[derive(Object, Debug)]
#[oai(deny_unknown_fields)]
pub struct Announcement {
    #[oai(validator(min_length = 1, max_length = 2000))]
    pub message: String,
    pub level: Option<Level>,
    pub data: Option<serde_json::Value>,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
#[oai(deny_unknown_fields)]
pub struct Notification {
    pub user_id: i64,
    #[oai(validator(min_length = 1, max_length = 2000))]
    pub message: String,
    pub data: Option<serde_json::Value>,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct EventCreated {
    pub event_id: i64,
}

#[derive(ApiResponse)]
pub enum EventResponse {
    /// The event was stored and will be delivered over WebSockets.
    #[oai(status = 201)]
    Created(Json<EventCreated>),
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct IndexFinding {
    pub index_name: String,
    pub table_name: String,
    pub size_bytes: i64,
    /// invalid, duplicate, unused or bloated.
    pub reason: String,
    pub detail: String,
    /// The statement that fixes it.
    pub fix: String,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
#[oai(deny_unknown_fields)]
pub struct MaintenanceRequest {
    /// Only report what would run (absent: false; null is refused, so an
    /// unset client variable never runs the fixes for real).
    pub dry_run: MaybeUndefined<bool>,
    /// Also drop indexes reported as unused (absent: false).
    pub drop_unused: MaybeUndefined<bool>,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct MaintenanceAction {
    pub statement: String,
    pub ok: bool,
    pub error: Option<String>,
    pub elapsed_ms: f64,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct MaintenanceResult {
    pub findings: Vec<IndexFinding>,
    pub actions: Vec<MaintenanceAction>,
    pub dry_run: bool,
}

/// 400 naming the field when a message is blank (nothing but spaces, tabs
/// or line breaks), or when it or its data holds a NUL character, which
/// Postgres' text and jsonb cannot store (it refused the statement, naming
/// no field).
fn check_message(field: &str, message: &str, data: Option<&serde_json::Value>) -> ApiResult<()> {
    fn has_nul(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::String(s) => s.contains('\0'),
            serde_json::Value::Array(a) => a.iter().any(has_nul),
            serde_json::Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
            _ => false,
        }
    }
    // Named here rather than by `sales.announce`'s or `sales.notify_user`'s
    // SQLSTATE (they refuse spaces only; a message of line breaks and tabs
    // is as blank on a screen).
    if message.trim().is_empty() {
        return Err(ApiError::bad_param(field, "must not be blank"));
    }
    if message.contains('\0') {
        return Err(ApiError::bad_param(
            field,
            "must not contain the NUL character (\\u0000)",
        ));
    }
    if data.is_some_and(has_nul) {
        return Err(ApiError::bad_param(
            "data",
            "must not contain the NUL character (\\u0000)",
        ));
    }
    Ok(())
}

#[OpenApi(tag = "ApiTags::Admin")]
impl AdminApi {
    /// Send a system announcement to every WebSocket client subscribed to `announcements` (admin only).
    #[oai(path = "/api/admin/announcements", method = "post")]
    async fn announce(
        &self,
        auth: BearerAuth,
        body: Json<Announcement>,
    ) -> ApiResult<EventResponse> {
        auth.require_admin()?;
        check_message("message", &body.message, body.data.as_ref())?;
        let level = format!("{:?}", body.level.unwrap_or(Level::Info)).to_lowercase();
        let mut w = Write::begin(&self.state.pool, auth.0.user_id).await?;
        let id: i64 =
            sqlx::query_scalar("SELECT sales.announce($1, $2, coalesce($3, '{}'::jsonb))")
                .bind(&body.message)
                .bind(level)
                .bind(&body.data)
                .fetch_one(w.conn())
                .await?;
        let changes = w.commit().await?;
        self.state.publish(changes).await;
        Ok(EventResponse::Created(Json(EventCreated { event_id: id })))
    }

    /// Send a notification to one user's WebSocket connections (admin only). Unknown user: 404.
    #[oai(path = "/api/admin/notifications", method = "post")]
    async fn notify(&self, auth: BearerAuth, body: Json<Notification>) -> ApiResult<EventResponse> {
        auth.require_admin()?;
        check_message("message", &body.message, body.data.as_ref())?;
        let pool = &self.state.pool;
        let exists: bool = crate::db::retry("notify_user_exists", true, || {
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sales.users WHERE id = $1)")
                .bind(body.user_id)
                .fetch_one(pool)
        })
        .await?;
        if !exists {
            return Err(ApiError::not_found(format!("no user {}", body.user_id)));
        }
        let mut w = Write::begin(&self.state.pool, auth.0.user_id).await?;
        let id: i64 =
            sqlx::query_scalar("SELECT sales.notify_user($1, $2, coalesce($3, '{}'::jsonb))")
                .bind(body.user_id)
                .bind(&body.message)
                .bind(&body.data)
                .fetch_one(w.conn())
                .await?;
        let changes = w.commit().await?;
        self.state.publish(changes).await;
        Ok(EventResponse::Created(Json(EventCreated { event_id: id })))
    }

    /// WebSocket hub statistics on this instance: connections by role and store, subscriptions
    /// per channel, queues, replay state and the relay (admin only).
    #[oai(path = "/api/admin/websocket/stats", method = "get")]
    async fn websocket_stats(
        &self,
        auth: BearerAuth,
    ) -> ApiResult<Json<std::collections::BTreeMap<String, serde_json::Value>>> {
        auth.require_admin()?;
        let mut stats = self.state.hub.stats();
        stats["relay"]["heldBackBy"] = crate::events::holders::report(&self.state.pool).await;
        let serde_json::Value::Object(map) = stats else {
            return Err(ApiError::internal("hub statistics are not an object"));
        };
        Ok(Json(map.into_iter().collect()))
    }

    /// Cache hit rate and sizes on this instance (admin only).
    #[oai(path = "/api/admin/cache/stats", method = "get")]
    async fn cache_stats(&self, auth: BearerAuth) -> ApiResult<Json<CacheStats>> {
        auth.require_admin()?;
        let s = self.state.cache.snapshot();
        Ok(Json(CacheStats {
            backend: s.backend.into(),
            healthy: s.healthy,
            hits: s.hits,
            l1_hits: s.l1_hits,
            encodings_reused: s.encodings_reused,
            misses: s.misses,
            hit_rate: s.hit_rate,
            sets: s.sets,
            errors: s.errors,
            invalidations: s.invalidations,
            bytes_stored: s.bytes_stored,
            bytes_saved_by_compression: s.bytes_saved_by_compression,
        }))
    }

    /// Clear the cache on every instance: all of it, or the entries of one tag (admin only).
    #[oai(path = "/api/admin/cache/clear", method = "post")]
    async fn cache_clear(
        &self,
        auth: BearerAuth,
        body: Json<CacheClear>,
    ) -> ApiResult<Json<CacheCleared>> {
        auth.require_admin()?;
        let tag = match &body.0.tag {
            MaybeUndefined::Undefined => None,
            // An unset variable in a client, as an empty tag is: refused
            // rather than read as "everything".
            MaybeUndefined::Null => {
                return Err(ApiError::bad_param(
                    "tag",
                    "must not be null (leave tag out to clear everything)",
                ))
            }
            MaybeUndefined::Value(t) => {
                Some(ClearTag::parse(t.trim()).map_err(|why| ApiError::bad_param("tag", why))?)
            }
        };
        // What fills the cache again is not read from a replica that has
        // not replayed what the clear is for.
        self.state.raise_read_floor().await;
        let tags = match &tag {
            Some(ClearTag::Store(store)) => {
                // Everything of the store: its lists, its documents, each
                // month a record can have (entries of a month carry only
                // its tag, so that a write to one month leaves the others
                // cached; every month, not only those with rows now, as a
                // clear is for what was changed by hand), and each of its
                // records read by id.
                let rows: Vec<i64> =
                    sqlx::query_scalar("SELECT id FROM sales.monthly_sales WHERE store_id = $1")
                        .bind(store)
                        .fetch_all(&self.state.pool)
                        .await?;
                let mut tags = vec![
                    crate::cache::tag_store(*store),
                    crate::cache::tag_store_doc(*store),
                ];
                let (first, last) = (sales_core::daily::MIN_YEAR, sales_core::daily::MAX_YEAR);
                tags.extend((first..=last).flat_map(|y| {
                    (1..=12).map(move |m| crate::cache::tag_store_month(*store, y, m))
                }));
                tags.extend(rows.into_iter().map(crate::cache::tag_row));
                tags
            }
            Some(ClearTag::One(t)) => vec![t.clone()],
            None => vec![crate::cache::TAG_ALL.to_string()],
        };
        self.state.cache.invalidate(&tags).await;
        // Another instance may fill an entry again from the replica before
        // it hears of the clear (and raises its own floor): once the
        // replica has replayed what the clear is for, the same tags are
        // made stale again.
        self.state.once_replica_caught_up(move |state| async move {
            state.cache.invalidate(&tags).await;
        });
        // The other instances' first levels: Redis is shared, they are not.
        let sealed =
            crate::events::sealed::seal(auth.0.user_id, "cache-cleared", serde_json::json!({}));
        if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(crate::events::CACHE_CHANNEL)
            .bind(sealed)
            .execute(&self.state.pool)
            .await
        {
            tracing::warn!(error = %e, "could not tell the other instances to drop their first-level cache; their entries expire within CACHE_L1_TTL");
        }
        Ok(Json(CacheCleared {
            cleared: match tag {
                Some(ClearTag::Store(store)) => crate::cache::tag_store(store),
                Some(ClearTag::One(t)) => t,
                None => crate::cache::TAG_ALL.into(),
            },
        }))
    }

    /// The slowest and the most frequent statements on the `sales` tables, from
    /// pg_stat_statements (admin only). Without it, says how to enable it.
    #[oai(path = "/api/admin/queries", method = "get")]
    async fn queries(
        &self,
        auth: BearerAuth,
        /// Statements per list, default 20.
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: poem_openapi::param::Query<Option<i64>>,
    ) -> ApiResult<Json<QueryStats>> {
        auth.require_admin()?;
        let limit = limit.0.unwrap_or(20);
        if !(1..=500).contains(&limit) {
            return Err(ApiError::bad_param("limit", "must be between 1 and 500"));
        }
        let pool = &self.state.pool;
        // Created by the migrations when the migrating role may (a GET
        // changes nothing); when it is missing the answer says what to do.
        let disabled = |why: String| {
            Json(QueryStats {
                enabled: false,
                message: Some(why),
                slowest: vec![],
                most_frequent: vec![],
            })
        };
        let read = |order: &'static str| {
            crate::db::retry("query_stats", true, move || query_stats(pool, order, limit))
        };
        match read("s.mean_exec_time").await {
            Ok(slowest) => {
                let most_frequent = read("s.calls").await?;
                Ok(Json(QueryStats {
                    enabled: true,
                    message: None,
                    slowest,
                    most_frequent,
                }))
            }
            // Not the extension's absence: the database is unreachable.
            Err(e)
                if crate::db::is_transient(&e, true) || matches!(e, sqlx::Error::PoolTimedOut) =>
            {
                Err(e.into())
            }
            Err(e) => {
                tracing::info!(error = %e, "pg_stat_statements unavailable");
                Ok(disabled(ENABLE_STATEMENTS.to_string()))
            }
        }
    }

    /// Invalid, duplicate, unused and bloated indexes on the sales tables, with the fix for each (admin only).
    #[oai(path = "/api/admin/indexes", method = "get")]
    async fn indexes(&self, auth: BearerAuth) -> ApiResult<Json<Vec<IndexFinding>>> {
        auth.require_admin()?;
        let pool = &self.state.pool;
        let findings =
            crate::db::retry("index_report", true, || crate::maintain::report(pool)).await?;
        Ok(Json(findings.into_iter().map(to_finding).collect()))
    }

    /// Apply the index report's fixes without blocking writes (CONCURRENTLY), then ANALYZE (admin only).
    #[oai(path = "/api/admin/maintenance", method = "post")]
    async fn maintenance(
        &self,
        auth: BearerAuth,
        body: Json<MaintenanceRequest>,
    ) -> ApiResult<Json<MaintenanceResult>> {
        auth.require_admin()?;
        let pool = &self.state.pool;
        let flag = |name: &str, v: &MaybeUndefined<bool>| match v {
            MaybeUndefined::Null => Err(ApiError::bad_param(
                name,
                "must be true or false (leave it out for false)",
            )),
            MaybeUndefined::Value(b) => Ok(*b),
            MaybeUndefined::Undefined => Ok(false),
        };
        let dry_run = flag("dryRun", &body.dry_run)?;
        let drop_unused = flag("dropUnused", &body.drop_unused)?;
        // One run at a time, whether from here or the command line.
        let lock = if dry_run {
            None
        } else {
            Some(
                crate::maintain::RunLock::take(&self.state.config.database_url)
                    .await?
                    .map_err(|why| ApiError::conflict(why, None))?,
            )
        };
        let mut findings =
            crate::db::retry("index_report", true, || crate::maintain::report(pool)).await?;
        crate::maintain::skip_building(pool, &mut findings).await?;
        let plan = crate::maintain::plan(&findings, drop_unused);
        let actions = if dry_run {
            plan.into_iter()
                .map(|statement| MaintenanceAction {
                    statement,
                    ok: true,
                    error: None,
                    elapsed_ms: 0.0,
                })
                .collect()
        } else {
            crate::maintain::apply(&self.state.config.database_url, &plan)
                .await?
                .into_iter()
                .map(|a| MaintenanceAction {
                    statement: a.statement,
                    ok: a.outcome.is_ok(),
                    error: a.outcome.err(),
                    elapsed_ms: a.elapsed.as_secs_f64() * 1000.0,
                })
                .collect()
        };
        if let Some(lock) = lock {
            lock.release().await;
        }
        Ok(Json(MaintenanceResult {
            findings: findings.into_iter().map(to_finding).collect(),
            actions,
            dry_run,
        }))
    }
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct CacheStats {
    /// `redis`, `redis-cluster` or `memory`.
    pub backend: String,
    /// False while Redis is unreachable (requests are answered from Postgres).
    pub healthy: bool,
    pub hits: u64,
    /// Hits served by the in-process first level in front of Redis (also
    /// counted in `hits`).
    pub l1_hits: u64,
    /// Compressed hits served with the encoding kept beside the first-level
    /// entry (compressed once per entry and encoding, not per hit).
    pub encodings_reused: u64,
    pub misses: u64,
    pub hit_rate: f64,
    pub sets: u64,
    pub errors: u64,
    /// Tag invalidations (by events, writes and clears).
    pub invalidations: u64,
    pub bytes_stored: u64,
    pub bytes_saved_by_compression: u64,
}

#[derive(Object, Debug)]
#[oai(deny_unknown_fields)]
pub struct CacheClear {
    /// Clear only entries with this tag: `store:12` (everything of store 12:
    /// its lists, documents and months), `store:12:2024-03` (one month),
    /// `row:7`, `storedoc:12`, `stores`, `sales:all` (cross-store lists and
    /// summaries), `users`, `history`, or `all`; absent: everything. Another
    /// form, or an empty or blank tag, is refused (400 naming `tag`).
    #[oai(validator(max_length = 200))]
    pub tag: MaybeUndefined<String>,
}

/// A tag an admin's cache clear names, in one of the forms entries carry.
#[derive(Debug, PartialEq)]
enum ClearTag {
    /// `store:N`: every entry of the store, whichever of its tags it carries
    /// (a record deleted by hand since is not found by id: `row:N` or a
    /// clear of everything reaches it).
    Store(i64),
    /// Any other tag, cleared as entries carry it.
    One(String),
}

impl ClearTag {
    const FORMS: &'static str =
        "all, sales:all, stores, users, history, store:N, store:N:YYYY-MM, storedoc:N or row:N";

    fn parse(t: &str) -> Result<ClearTag, String> {
        let id = |s: &str| {
            (!s.is_empty() && s.len() <= 18 && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<i64>().ok())
                .flatten()
                .filter(|n| *n > 0)
        };
        if t.is_empty() {
            // An unset variable in a client's request: not "everything".
            return Err(format!(
                "must not be empty (leave tag out to clear everything); the forms are {}",
                Self::FORMS
            ));
        }
        let unknown = || format!("{t:?} is no cache tag; the forms are {}", Self::FORMS);
        use crate::cache::{TAG_ALL, TAG_HISTORY, TAG_SALES_ALL, TAG_STORES, TAG_USERS};
        if [TAG_ALL, TAG_SALES_ALL, TAG_STORES, TAG_USERS, TAG_HISTORY].contains(&t) {
            return Ok(ClearTag::One(t.to_string()));
        }
        let (kind, rest) = t.split_once(':').ok_or_else(unknown)?;
        match kind {
            "row" => id(rest)
                .map(crate::cache::tag_row)
                .map(ClearTag::One)
                .ok_or_else(unknown),
            "storedoc" => id(rest)
                .map(crate::cache::tag_store_doc)
                .map(ClearTag::One)
                .ok_or_else(unknown),
            "store" => match rest.split_once(':') {
                None => id(rest).map(ClearTag::Store).ok_or_else(unknown),
                Some((store, period)) => {
                    let store = id(store).ok_or_else(unknown)?;
                    let (y, m) = period
                        .split_once('-')
                        .filter(|(y, m)| {
                            y.len() == 4
                                && m.len() == 2
                                && (y.bytes().chain(m.bytes())).all(|b| b.is_ascii_digit())
                        })
                        .and_then(|(y, m)| Some((y.parse::<i64>().ok()?, m.parse::<i64>().ok()?)))
                        .filter(|(_, m)| (1..=12).contains(m))
                        .ok_or_else(unknown)?;
                    // No record has a month outside 2000..2100, so no
                    // entry carries such a tag: "cleared" would mislead.
                    if !(2000..=2100).contains(&y) {
                        return Err(format!(
                            "{t:?} is no cache tag (records are of the years 2000 to 2100); \
                             the forms are {}",
                            Self::FORMS
                        ));
                    }
                    Ok(ClearTag::One(crate::cache::tag_store_month(store, y, m)))
                }
            },
            _ => Err(unknown()),
        }
    }
}

#[derive(Object, Debug)]
pub struct CacheCleared {
    /// The tag that was invalidated (`all` for everything).
    pub cleared: String,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct QueryStat {
    pub query_id: String,
    /// Normalised statement text (constants replaced by $n).
    pub query: String,
    pub calls: i64,
    pub total_ms: f64,
    pub mean_ms: f64,
    pub rows: i64,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct QueryStats {
    /// False when pg_stat_statements is not loaded; `message` says how to enable it.
    pub enabled: bool,
    pub message: Option<String>,
    /// Highest mean time first.
    pub slowest: Vec<QueryStat>,
    /// Most calls first.
    pub most_frequent: Vec<QueryStat>,
}

const ENABLE_STATEMENTS: &str =
    "pg_stat_statements is not available: add shared_preload_libraries = 'pg_stat_statements' \
    to postgresql.conf (make run does this in the cluster it manages), restart Postgres, then run \
    CREATE EXTENSION pg_stat_statements in this database as a superuser (sales-server migrate \
    does, when its role may)";

async fn query_stats(
    pool: &sqlx::PgPool,
    order: &str,
    limit: i64,
) -> Result<Vec<QueryStat>, sqlx::Error> {
    let sql = format!(
        "SELECT s.queryid::text, s.query, s.calls, s.total_exec_time, s.mean_exec_time, s.rows
         FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
         WHERE d.datname = current_database() AND s.query ~* '\\msales\\.'
         ORDER BY {order} DESC LIMIT $1"
    );
    let rows: Vec<(String, String, i64, f64, f64, i64)> =
        sqlx::query_as(&sql).bind(limit).fetch_all(pool).await?;
    Ok(rows
        .into_iter()
        .map(|(query_id, query, calls, total, mean, rows)| QueryStat {
            query_id,
            query,
            calls,
            total_ms: (total * 1000.0).round() / 1000.0,
            mean_ms: (mean * 1000.0).round() / 1000.0,
            rows,
        })
        .collect())
}

fn to_finding(f: crate::maintain::Finding) -> IndexFinding {
    IndexFinding {
        index_name: f.index_name,
        table_name: f.table_name,
        size_bytes: f.size_bytes,
        reason: f.reason,
        detail: f.detail,
        fix: f.fix,
    }
}

#[cfg(test)]
mod tests {
    use super::ClearTag;

    #[test]
    fn clear_tags_take_the_forms_entries_carry() {
        assert_eq!(ClearTag::parse("store:12"), Ok(ClearTag::Store(12)));
        for t in [
            "store:12:2024-03",
            "row:7",
            "storedoc:3",
            "stores",
            "sales:all",
            "all",
            "users",
            "history",
        ] {
            assert_eq!(ClearTag::parse(t), Ok(ClearTag::One(t.to_string())), "{t}");
        }
        for t in [
            "store-12",
            "store:",
            "store:0",
            "store:x",
            "store:12:2024-3",
            "store:12:1999-01",
            "store:12:2101-12",
            "store:12:2024-13",
            "row:-1",
            "stores:1",
            "Store:12",
            "store:12:2024-03:x",
        ] {
            let e = ClearTag::parse(t).unwrap_err();
            assert!(
                e.contains("is no cache tag") && e.contains("store:N:YYYY-MM"),
                "{t}: {e}"
            );
        }
    }
}
