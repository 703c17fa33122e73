//! `/api/v2/sales`: list (filters, projection, sort, keyset pagination),
//! one record, batch upsert and delete, summaries.
//!
//! Documents are built and projected inside Postgres (`sales.sales_doc`,
//! `sales.project`); the server splices the resulting JSON text into the
//! response without parsing it.

use super::cached::{cached, sales_tags};
use super::error::{ApiError, ApiResult, ErrorBody};
use super::filters::{parse_projection, RawFilter, SalesFilter};
use super::raw::RawJson;
use super::security::BearerAuth;
use super::ApiTags;
use crate::state::AppState;
use base64::Engine;
use poem_openapi::param::{Path, Query};
use poem_openapi::{payload::Json, ApiResponse, Enum, Object, OpenApi};
use sales_core::projection::{Projection, SALES_DOC};
use serde_json::{json, Value};
use sqlx::{Postgres, QueryBuilder, Row};
use std::sync::Arc;
use std::time::Instant;

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;
pub const MAX_OFFSET: i64 = 10_000;

pub struct SalesApi {
    pub state: Arc<AppState>,
}

/// One day of sales.
#[derive(Object, Debug, Clone)]
pub struct DaySales {
    pub sales: Option<f64>,
    pub customers: Option<i64>,
    pub transactions: Option<i64>,
}

/// A store-month of sales as the API shows it (every member may be projected away).
#[derive(Object, Debug, Clone)]
#[oai(rename_all = "camelCase")]
pub struct SalesRecord {
    pub id: Option<i64>,
    pub store_id: Option<i64>,
    pub year: Option<i32>,
    pub month: Option<i32>,
    /// Keyed by day of month: `{"1": {"sales": 1000, "customers": 52}}`.
    pub daily_data: Option<std::collections::BTreeMap<String, DaySales>>,
    pub total_sales: Option<f64>,
    pub total_customers: Option<i64>,
    pub days_reported: Option<i32>,
    /// Incremented by every change; events carry it too.
    pub version: Option<i64>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    /// Present when a `store.*` field is requested.
    pub store: Option<super::stores::Store>,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct ListMeta {
    /// The canonical paths of `fields` (empty: all).
    pub fields: Vec<String>,
    pub exclude: Vec<String>,
    pub count: i64,
    pub limit: i64,
    /// True when the requested limit was above 200 and was lowered.
    pub limit_clamped: bool,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
    pub sort: String,
    pub took_ms: f64,
}

#[derive(Object, Debug)]
pub struct SalesPage {
    pub data: Vec<SalesRecord>,
    /// Dropped with `includeMetadata=false`.
    pub meta: Option<ListMeta>,
}

#[derive(Object, Debug)]
pub struct SalesOne {
    pub data: SalesRecord,
}

#[derive(ApiResponse)]
pub enum ListResponse {
    /// A page of sales records.
    #[oai(status = 200)]
    Ok(RawJson<SalesPage>),
}

#[derive(ApiResponse)]
pub enum OneResponse {
    /// The record.
    #[oai(status = 200)]
    Ok(RawJson<SalesOne>),
}

#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[oai(rename_all = "lowercase")]
pub enum BatchMode {
    /// Days in the request replace the same days; other days are kept.
    Merge,
    /// The request's daily data replaces the month's.
    Replace,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct BatchUpsertRequest {
    /// Records like `{"storeId": 12, "year": 2024, "month": 1, "dailyData": {"1": {"sales": 1000, "customers": 52}}}`.
    pub sales_data_array: Vec<Value>,
    /// `merge` (default) or `replace`.
    pub mode: Option<BatchMode>,
    /// All or nothing (default true). With false, valid records are written and the rest reported.
    pub atomic: Option<bool>,
}

#[derive(Object, Debug)]
pub struct RecordError {
    /// Position in the request array.
    pub index: i64,
    /// Path of the offending value, e.g. `dailyData.31`.
    pub field: String,
    pub reason: String,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct BatchSummary {
    pub total: i64,
    pub inserted: i64,
    pub updated: i64,
    /// Valid records that changed nothing.
    pub unchanged: i64,
    pub failed: i64,
    /// Records folded into a later one with the same store and month.
    pub merged: i64,
    /// The batch-completed event (None when nothing was written).
    pub event_id: Option<i64>,
    pub errors: Vec<RecordError>,
    pub duplicates: Vec<Value>,
}

#[derive(ApiResponse)]
pub enum BatchResponse {
    /// Summary of the batch.
    #[oai(status = 200)]
    Ok(RawJson<BatchSummary>),
    /// With `async=true`: checked and queued; the job's status (at `Location`) carries the
    /// summary once it ran, and `import-completed` is sent to your WebSocket.
    #[oai(status = 202)]
    Accepted(
        Json<super::imports::JobAccepted>,
        #[oai(header = "Location")] String,
    ),
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct BatchDeleteRequest {
    /// Record ids.
    pub ids: Option<Vec<i64>>,
    /// `{"storeId", "year", "month"}` keys.
    pub keys: Option<Vec<Value>>,
    /// All or nothing (default true).
    pub atomic: Option<bool>,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct DeleteSummary {
    pub total: i64,
    pub deleted: i64,
    pub failed: i64,
    pub event_id: Option<i64>,
    pub errors: Vec<RecordError>,
}

#[derive(ApiResponse)]
pub enum DeleteResponse {
    /// Summary of the deletion.
    #[oai(status = 200)]
    Ok(RawJson<DeleteSummary>),
}

#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[oai(rename_all = "lowercase")]
pub enum GroupBy {
    Store,
    Region,
    Month,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct SummaryRow {
    /// Store id, region name, or `YYYY-MM`.
    pub key: String,
    pub store_code: Option<String>,
    pub store_name: Option<String>,
    pub total_sales: f64,
    pub total_customers: i64,
    /// Store-months counted.
    pub months: i64,
    pub stores: i64,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct SummaryPage {
    pub data: Vec<SummaryRow>,
    pub meta: Value,
}

#[derive(ApiResponse)]
pub enum SummaryResponse {
    /// Totals per group.
    #[oai(status = 200)]
    Ok(RawJson<SummaryPage>),
}

/// A sortable key: (name, SQL expression, SQL type for cursor values).
const SORT_KEYS: &[(&str, &str, &str)] = &[
    ("id", "m.id", "bigint"),
    ("storeId", "m.store_id", "bigint"),
    ("year", "m.year", "integer"),
    ("month", "m.month", "integer"),
    ("totalSales", "m.total_sales", "numeric"),
    ("totalCustomers", "m.total_customers", "bigint"),
    ("daysReported", "m.days_reported", "integer"),
    ("updatedAt", "m.updated_at", "timestamptz"),
    ("createdAt", "m.created_at", "timestamptz"),
];

#[derive(Debug, Clone)]
pub struct SortKey {
    pub name: &'static str,
    pub expr: &'static str,
    pub ty: &'static str,
    pub desc: bool,
}

/// `-year,-month,storeId` -> keys (camelCase or snake_case; `period` = year, month).
pub fn parse_sort(raw: Option<&str>) -> ApiResult<Vec<SortKey>> {
    let raw = raw
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or("storeId,year,month");
    let mut keys: Vec<SortKey> = Vec::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (desc, name) = match part.strip_prefix('-') {
            Some(n) => (true, n),
            None => (false, part.strip_prefix('+').unwrap_or(part)),
        };
        let camel = sales_core::names::to_camel(name);
        let names: Vec<&str> = if camel == "period" {
            vec!["year", "month"]
        } else {
            vec![camel.as_str()]
        };
        for n in names {
            let Some((k, expr, ty)) = SORT_KEYS.iter().find(|(k, _, _)| *k == n) else {
                return Err(ApiError::bad_param(
                    "sort",
                    format!(
                        "cannot sort by {name:?}; allowed: period, {}",
                        SORT_KEYS.iter().map(|k| k.0).collect::<Vec<_>>().join(", ")
                    ),
                ));
            };
            if keys.iter().any(|e| e.name == *k) {
                return Err(ApiError::bad_param("sort", format!("{k} given twice")));
            }
            keys.push(SortKey {
                name: k,
                expr,
                ty,
                desc,
            });
        }
    }
    if keys.len() > 6 {
        return Err(ApiError::bad_param("sort", "at most 6 keys"));
    }
    // The id makes the order total, so keyset pages never skip or repeat a row.
    if !keys.iter().any(|k| k.name == "id") {
        keys.push(SortKey {
            name: "id",
            expr: "m.id",
            ty: "bigint",
            desc: false,
        });
    }
    Ok(keys)
}

pub fn sort_spec(keys: &[SortKey]) -> String {
    keys.iter()
        .map(|k| format!("{}{}", if k.desc { "-" } else { "" }, k.name))
        .collect::<Vec<_>>()
        .join(",")
}

/// Opaque keyset cursor: the sort it belongs to and the last row's key values.
pub fn encode_cursor(spec: &str, values: &[String]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"s": spec, "v": values}).to_string())
}

pub fn decode_cursor(raw: &str, spec: &str, n: usize) -> ApiResult<Vec<String>> {
    let bad = |why: &str| ApiError::bad_param("cursor", why.to_string());
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw.trim())
        .map_err(|_| bad("not a cursor from this API"))?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad("not a cursor from this API"))?;
    if v["s"].as_str() != Some(spec) {
        return Err(bad(
            "the cursor belongs to a different sort; keep `sort` the same across pages",
        ));
    }
    let vals: Vec<String> = v["v"]
        .as_array()
        .ok_or_else(|| bad("malformed cursor"))?
        .iter()
        .map(|x| x.as_str().map(str::to_string))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("malformed cursor"))?;
    if vals.len() != n {
        return Err(bad("malformed cursor"));
    }
    Ok(vals)
}

/// Checks each cursor value against its key's SQL type, so a tampered
/// cursor is a 400 naming `cursor`, not a failed cast in Postgres.
pub fn check_cursor_values(keys: &[SortKey], vals: &[String]) -> ApiResult<()> {
    for (k, v) in keys.iter().zip(vals) {
        let ok = match k.ty {
            "bigint" => v.parse::<i64>().is_ok(),
            "integer" => v.parse::<i32>().is_ok(),
            "numeric" => v.parse::<f64>().is_ok_and(f64::is_finite),
            "timestamptz" => chrono::DateTime::parse_from_str(v, "%Y-%m-%d %H:%M:%S%.f%#z")
                .is_ok_and(|t| (1..=9999).contains(&chrono::Datelike::year(&t))),
            _ => false,
        };
        if !ok {
            return Err(ApiError::bad_param(
                "cursor",
                format!(
                    "not a cursor from this API ({} is not a valid {})",
                    k.name, k.ty
                ),
            ));
        }
    }
    Ok(())
}

/// The document expression for one row, projected in Postgres.
pub fn doc_sql(p: &Projection, qb: &mut QueryBuilder<'_, Postgres>) {
    let with_store = p
        .fields
        .iter()
        .any(|f| f == "store" || f.starts_with("store."));
    let doc = if with_store {
        "sales.sales_doc(m, s)"
    } else {
        "sales.sales_doc(m)"
    };
    if p.is_identity() {
        qb.push(doc);
    } else {
        qb.push("sales.project(")
            .push(doc)
            .push(", ")
            .push_bind(p.fields.clone())
            .push("::text[], ");
        qb.push_bind(p.excluded.clone()).push("::text[])");
    }
}

/// `(k1, k2, ...) after (v1, v2, ...)` for mixed directions, as an OR chain.
fn push_keyset(qb: &mut QueryBuilder<'_, Postgres>, keys: &[SortKey], vals: &[String]) {
    qb.push(" AND (");
    for i in 0..keys.len() {
        if i > 0 {
            qb.push(" OR ");
        }
        qb.push("(");
        for (j, k) in keys.iter().enumerate().take(i) {
            qb.push(k.expr)
                .push(" = CAST(")
                .push_bind(vals[j].clone())
                .push(format!(" AS {})", k.ty))
                .push(" AND ");
        }
        let k = &keys[i];
        qb.push(k.expr).push(if k.desc { " < " } else { " > " });
        qb.push("CAST(")
            .push_bind(vals[i].clone())
            .push(format!(" AS {}))", k.ty));
    }
    qb.push(")");
}

fn ms(started: Instant) -> f64 {
    (started.elapsed().as_secs_f64() * 1e5).round() / 100.0
}

/// Sets the acting user for event rows written in this transaction.
pub async fn set_actor<'c, E>(conn: E, user_id: i64) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'c, Database = Postgres>,
{
    sqlx::query("SELECT set_config('sales.user_id', $1, true)")
        .bind(user_id.to_string())
        .execute(conn)
        .await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
#[OpenApi(tag = "ApiTags::Sales")]
impl SalesApi {
    /// List sales records. Filters combine with AND; only stores in the caller's scope are visible,
    /// and naming a store outside it is 403. `fields`/`exclude` take dotted paths
    /// (`dailyData.1.sales`, `dailyData.*.sales`, `store.name`; camelCase or snake_case).
    #[oai(path = "/api/v2/sales", method = "get")]
    async fn list(
        &self,
        auth: BearerAuth,
        /// One store id or several, comma-separated.
        #[oai(name = "storeId")]
        store_id: Query<Option<String>>,
        region: Query<Option<String>>,
        #[oai(validator(minimum(value = "2000"), maximum(value = "2100")))] year: Query<
            Option<i32>,
        >,
        #[oai(validator(minimum(value = "1"), maximum(value = "12")))] month: Query<Option<i32>>,
        /// First month of a range, `YYYY-MM`.
        from: Query<Option<String>>,
        /// Last month of a range, `YYYY-MM` (inclusive).
        to: Query<Option<String>>,
        #[oai(name = "minTotalSales", validator(minimum(value = "0")))] min_total_sales: Query<
            Option<f64>,
        >,
        #[oai(name = "maxTotalSales", validator(minimum(value = "0")))] max_total_sales: Query<
            Option<f64>,
        >,
        /// Comma-separated paths to include.
        fields: Query<Option<String>>,
        /// Comma-separated paths to leave out (applied after `fields`).
        exclude: Query<Option<String>>,
        /// Comma-separated keys, `-` for descending: period, year, month, storeId, totalSales,
        /// totalCustomers, daysReported, updatedAt, createdAt, id. Default `storeId,year,month`.
        sort: Query<Option<String>>,
        /// Page size, default 50; above 200 it is lowered to 200 (`meta.limitClamped`).
        #[oai(validator(minimum(value = "1")))]
        limit: Query<Option<i64>>,
        /// `meta.nextCursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Rows to skip (at most 10,000; use `cursor` beyond that). Not with `cursor`.
        #[oai(validator(minimum(value = "0"), maximum(value = "10000")))]
        offset: Query<Option<i64>>,
        /// `false` drops `meta`.
        #[oai(name = "includeMetadata")]
        include_metadata: Query<Option<bool>>,
    ) -> ApiResult<ListResponse> {
        let started = Instant::now();
        let filter = SalesFilter::parse(&RawFilter {
            store_id: store_id.0,
            region: region.0,
            year: year.0,
            month: month.0,
            from: from.0,
            to: to.0,
            min_total_sales: min_total_sales.0,
            max_total_sales: max_total_sales.0,
        })?;
        filter.check_scope(&auth.0)?;
        let projection = parse_projection(&SALES_DOC, fields.0.as_deref(), exclude.0.as_deref())?;
        let keys = parse_sort(sort.0.as_deref())?;
        let spec = sort_spec(&keys);
        let requested = limit.0.unwrap_or(DEFAULT_LIMIT);
        if requested < 1 {
            return Err(ApiError::bad_param(
                "limit",
                format!("{requested} is not a page size; use 1..{MAX_LIMIT}"),
            ));
        }
        let limit = requested.min(MAX_LIMIT);
        let offset = offset.0.unwrap_or(0);
        if !(0..=MAX_OFFSET).contains(&offset) {
            return Err(ApiError::bad_param(
                "offset",
                format!("must be between 0 and {MAX_OFFSET}; use cursor to go further"),
            ));
        }
        let after = match cursor.0.as_deref() {
            Some(c) if offset > 0 => {
                let _ = c;
                return Err(ApiError::bad_param(
                    "offset",
                    "cannot be combined with cursor",
                ));
            }
            Some(c) => {
                let vals = decode_cursor(c, &spec, keys.len())?;
                check_cursor_values(&keys, &vals)?;
                Some(vals)
            }
            None => None,
        };

        let with_store = projection.fields.iter().any(|f| f.starts_with("store"));
        let tags = sales_tags(
            filter.store_ids.as_deref(),
            filter.year,
            filter.month,
            &auth.0,
            with_store,
        );
        let include_meta = include_metadata.0.unwrap_or(true);
        let query = ListQuery {
            who: &auth.0,
            filter: &filter,
            projection: &projection,
            keys: &keys,
            spec: &spec,
            limit,
            requested,
            offset,
            after: after.as_ref(),
            include_meta,
            started,
        };
        let params = (
            &filter,
            (&projection.fields, &projection.excluded),
            &spec,
            (limit, requested > MAX_LIMIT, offset),
            &after,
            include_meta,
        );
        let with_cursor = after.is_some();
        let body = cached(&self.state, "sales.list", &params, &auth.0, tags, || {
            list_body(&self.state, query)
        })
        .await
        .map_err(|e| match e {
            // The only value the caller controls that reaches a cast.
            ApiError::BadRequest(_) if with_cursor => {
                ApiError::bad_param("cursor", "not a cursor from this API")
            }
            e => e,
        })?;
        Ok(ListResponse::Ok(RawJson::new(body)))
    }
    /// Totals by store, region or month over the filtered records.
    #[oai(path = "/api/v2/sales/summary", method = "get")]
    async fn summary(
        &self,
        auth: BearerAuth,
        /// `store` (default), `region` or `month`.
        #[oai(name = "groupBy")]
        group_by: Query<Option<GroupBy>>,
        #[oai(name = "storeId")] store_id: Query<Option<String>>,
        region: Query<Option<String>>,
        #[oai(validator(minimum(value = "2000"), maximum(value = "2100")))] year: Query<
            Option<i32>,
        >,
        #[oai(validator(minimum(value = "1"), maximum(value = "12")))] month: Query<Option<i32>>,
        from: Query<Option<String>>,
        to: Query<Option<String>>,
    ) -> ApiResult<SummaryResponse> {
        let started = Instant::now();
        let filter = SalesFilter::parse(&RawFilter {
            store_id: store_id.0,
            region: region.0,
            year: year.0,
            month: month.0,
            from: from.0,
            to: to.0,
            ..Default::default()
        })?;
        filter.check_scope(&auth.0)?;
        let group = group_by.0.unwrap_or(GroupBy::Store);
        let (key, extra, group_sql, order) = match group {
            GroupBy::Store => (
                "m.store_id::text",
                ", 'storeCode', min(s.code), 'storeName', min(s.name)",
                "m.store_id",
                "m.store_id",
            ),
            GroupBy::Region => ("s.region", "", "s.region", "s.region"),
            GroupBy::Month => (
                "format('%s-%s', m.year, lpad(m.month::text, 2, '0'))",
                "",
                "m.year, m.month",
                "m.year, m.month",
            ),
        };
        let tags = sales_tags(filter.store_ids.as_deref(), None, None, &auth.0, true);
        let params = (&filter, group);
        let body = cached(
            &self.state,
            "sales.summary",
            &params,
            &auth.0,
            tags,
            || async {
                let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(format!(
                    "SELECT coalesce(jsonb_agg(r ORDER BY ord), '[]')::text FROM (
               SELECT jsonb_build_object('key', {key}, 'totalSales', sum(m.total_sales),
                      'totalCustomers', sum(m.total_customers), 'months', count(*),
                      'stores', count(DISTINCT m.store_id){extra}) AS r,
                      row_number() OVER (ORDER BY {order}) AS ord
               FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id WHERE true"
                ));
                filter.push_where(&mut qb, &auth.0);
                qb.push(format!(" GROUP BY {group_sql}) g"));
                let data: String = crate::metrics::timed(
                    "sales_summary",
                    qb.build_query_scalar()
                        .fetch_one(&mut *self.state.read_conn().await?),
                )
                .await?;
                let meta = json!({
                    "groupBy": format!("{group:?}").to_lowercase(),
                    "from": filter.from.map(|(y, m)| format!("{y}-{m:02}")),
                    "to": filter.to.map(|(y, m)| format!("{y}-{m:02}")),
                    "tookMs": ms(started),
                });
                Ok(format!("{{\"data\":{data},\"meta\":{meta}}}"))
            },
        )
        .await?;
        Ok(SummaryResponse::Ok(RawJson::new(body)))
    }

    /// One sales record by id, with optional `fields` / `exclude`. A record outside the
    /// caller's scope is 404, as a missing one.
    #[oai(path = "/api/v2/sales/:id", method = "get")]
    async fn get_one(
        &self,
        auth: BearerAuth,
        id: Path<i64>,
        fields: Query<Option<String>>,
        exclude: Query<Option<String>>,
    ) -> ApiResult<OneResponse> {
        let projection = parse_projection(&SALES_DOC, fields.0.as_deref(), exclude.0.as_deref())?;
        let tags = vec![
            crate::cache::tag_row(id.0),
            crate::cache::TAG_STORES.to_string(),
        ];
        let params = (id.0, &projection.fields, &projection.excluded);
        let body = cached(&self.state, "sales.get", &params, &auth.0, tags, || async {
        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new("SELECT m.store_id, (");
        doc_sql(&projection, &mut qb);
        qb.push(")::text FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id WHERE m.id = ");
        qb.push_bind(id.0);
        // Outside the caller's scope is the same 404 as missing: the answer
        // must not tell which store owns a record the caller may not see.
        if let Some(scope) = auth.0.scope() {
            qb.push(" AND m.store_id = ANY(").push_bind(scope).push(")");
        }
        let row = crate::metrics::timed("sales_get", qb.build().fetch_optional(&mut *self.state.read_conn().await?)).await?;
        let Some(row) = row else {
            return Err(ApiError::not_found(format!("no sales record {}", id.0)));
        };
        Ok(format!("{{\"data\":{}}}", row.get::<&str, _>(1)))
        })
        .await?;
        Ok(OneResponse::Ok(RawJson::new(body)))
    }

    /// Validate and upsert many store-months in one transaction. With `atomic` (default) any
    /// invalid record rejects the batch with 422 and a per-record report; nothing is written.
    #[oai(path = "/api/v2/sales/batch", method = "post")]
    async fn batch_upsert(
        &self,
        auth: BearerAuth,
        body: Json<BatchUpsertRequest>,
        /// Queue the batch and answer 202 with a job (see `/api/v2/imports/{id}`).
        #[oai(name = "async")]
        run_async: Query<Option<bool>>,
    ) -> ApiResult<BatchResponse> {
        let max = self.state.config.batch_max_records;
        let n = body.sales_data_array.len();
        if n > max {
            return Err(ApiError::too_large(format!(
                "{n} records; at most {max} per batch (BATCH_MAX_RECORDS)"
            )));
        }
        if n == 0 {
            return Err(ApiError::bad_param(
                "salesDataArray",
                "must hold at least one record",
            ));
        }
        // Every record is checked here with the rules the extension applies
        // (one `sales_core` for both), so a record the SQL would read
        // differently from its validation never reaches it: it is reported
        // by index, and with `atomic` nothing is written.
        let mut rejected: Vec<(usize, Vec<sales_core::FieldError>)> = Vec::new();
        let mut kept: Vec<usize> = Vec::with_capacity(n);
        let mut denied: Vec<i64> = Vec::new();
        for (i, r) in body.sales_data_array.iter().enumerate() {
            match sales_core::record::check_record(r) {
                Ok(parts) => {
                    if !auth.0.can_access_store(parts.key.store_id) {
                        denied.push(parts.key.store_id);
                    }
                    kept.push(i);
                }
                Err(errors) => {
                    denied.extend(named_store(r).filter(|s| !auth.0.can_access_store(*s)));
                    rejected.push((i, errors))
                }
            }
        }
        // Scope first: a record for a store outside the token's scope is 403,
        // whatever else is wrong with the batch.
        if !denied.is_empty() {
            denied.sort_unstable();
            denied.dedup();
            return Err(ApiError::Forbidden(ErrorBody::new(
                "forbidden",
                format!("stores outside your scope: {denied:?}"),
                Some(json!({"storeIds": denied})),
            )));
        }
        let atomic = body.atomic.unwrap_or(true);
        let replace = body.mode == Some(BatchMode::Replace);
        let mut all = body.0.sales_data_array;
        let records = Value::Array(if rejected.is_empty() {
            all
        } else {
            kept.iter().map(|&i| std::mem::take(&mut all[i])).collect()
        });
        if run_async.0.unwrap_or(false) {
            let id = crate::jobs::batch::enqueue(
                &self.state.pool,
                auth.0.user_id,
                auth.0.scope(),
                records,
                &kept,
                &rejected,
                n,
                replace,
                atomic,
            )
            .await?;
            let url = format!("/api/v2/imports/{id}");
            return Ok(BatchResponse::Accepted(
                Json(super::imports::JobAccepted {
                    id,
                    kind: "batch".into(),
                    state: "queued".into(),
                    status_url: url.clone(),
                    format: None,
                    rows_read: n as i64,
                    rows_rejected: 0,
                }),
                url,
            ));
        }
        let write = !kept.is_empty();
        // With `atomic`, a refused record means nothing is written; the
        // others still go through the extension for a complete report.
        let roll_back = atomic && !rejected.is_empty();
        let (pool, user, scope) = (&self.state.pool, auth.0.user_id, auth.0.scope());
        let (summary, tags) = if write {
            crate::db::retry_tx("batch_upsert", || async {
                let mut tx = pool.begin().await?;
                set_actor(&mut *tx, user).await?;
                let summary: Value = crate::metrics::timed(
                    "batch_upsert",
                    sqlx::query_scalar("SELECT sales.batch_upsert_impl($1, $2, $3, $4)")
                        .bind(&records)
                        .bind(replace)
                        .bind(atomic)
                        .bind(&scope)
                        .fetch_one(&mut *tx),
                )
                .await?;
                if roll_back || (atomic && summary["failed"].as_i64().unwrap_or(0) > 0) {
                    tx.rollback().await?;
                    let mut summary = summary;
                    for k in ["inserted", "updated", "unchanged"] {
                        summary[k] = json!(0);
                    }
                    summary["eventId"] = Value::Null;
                    return Ok((summary, Vec::new()));
                }
                let tags = crate::events::model::tx_cache_tags(&mut tx).await?;
                tx.commit()
                    .await
                    .map_err(crate::db::TxFailure::AtCommit)?;
                Ok((summary, tags))
            })
            .await
            .map_err(|f| match f {
                crate::db::TxFailure::BeforeCommit(e) => ApiError::from(e),
                crate::db::TxFailure::AtCommit(e) if crate::db::is_transient(&e, true) => {
                    tracing::error!(error = %e, "connection lost at COMMIT; the batch's outcome is unknown");
                    ApiError::Unavailable(ErrorBody::new(
                        "outcome_unknown",
                        "the database connection was lost while committing: the batch may or may not \
                         have been written; read the records back before sending it again",
                        Some(json!({"outcome": "unknown"})),
                    ))
                }
                crate::db::TxFailure::AtCommit(e) => ApiError::from(e),
            })?
        } else {
            (
                json!({"total": 0, "inserted": 0, "updated": 0, "unchanged": 0, "failed": 0,
                       "merged": 0, "eventId": null, "errors": [], "duplicates": []}),
                Vec::new(),
            )
        };
        let mut summary = merge_report(summary, &kept, rejected, n);
        super::error::cap_report(&mut summary);
        let failed = summary["failed"].as_i64().unwrap_or(0);
        if atomic && failed > 0 {
            return Err(ApiError::unprocessable(
                format!("{failed} of {n} records are invalid; nothing was written"),
                Some(summary),
            ));
        }
        if !tags.is_empty() {
            self.state.note_change(&self.state.pool).await;
            self.state.cache.invalidate(&tags).await;
        }
        Ok(BatchResponse::Ok(RawJson::new(summary.to_string())))
    }

    /// Delete store-months by id and/or by `{storeId, year, month}` keys. Unknown items are
    /// reported; with `atomic` (default) nothing is deleted when any item fails (422).
    #[oai(path = "/api/v2/sales/batch", method = "delete")]
    async fn batch_delete(
        &self,
        auth: BearerAuth,
        body: Json<BatchDeleteRequest>,
    ) -> ApiResult<DeleteResponse> {
        let ids = body.ids.clone().unwrap_or_default();
        let keys = body.keys.clone().unwrap_or_default();
        let n = ids.len() + keys.len();
        if n == 0 {
            return Err(ApiError::bad_param("ids", "give ids or keys to delete"));
        }
        let max = self.state.config.batch_max_records;
        if n > max {
            return Err(ApiError::too_large(format!(
                "{n} items; at most {max} per batch (BATCH_MAX_RECORDS)"
            )));
        }
        // Scope: a store the caller names in a key is 403. An id whose row
        // lies outside the scope is reported as missing, never with its
        // store: the answer must not tell who owns a record the caller may
        // not see.
        let mut denied: Vec<i64> = keys
            .iter()
            .filter_map(named_store)
            .filter(|s| !auth.0.can_access_store(*s))
            .collect();
        let hidden: std::collections::HashSet<usize> = match auth.0.scope() {
            Some(scope) if !ids.is_empty() => {
                let visible: std::collections::HashSet<i64> = sqlx::query_scalar(
                    "SELECT id FROM sales.monthly_sales WHERE id = ANY($1) AND store_id = ANY($2)",
                )
                .bind(&ids)
                .bind(&scope)
                .fetch_all(&self.state.pool)
                .await?
                .into_iter()
                .collect();
                ids.iter()
                    .enumerate()
                    .filter(|(_, id)| !visible.contains(id))
                    .map(|(i, _)| i)
                    .collect()
            }
            _ => Default::default(),
        };
        if !denied.is_empty() {
            denied.sort_unstable();
            denied.dedup();
            return Err(ApiError::Forbidden(ErrorBody::new(
                "forbidden",
                format!("stores outside your scope: {denied:?}"),
                Some(json!({"storeIds": denied})),
            )));
        }
        // Keys are checked here with the extension's rules; only well-formed
        // ones reach it (a malformed value, say a number beyond f64, would
        // otherwise fail the whole statement).
        let mut kept_keys: Vec<usize> = Vec::with_capacity(keys.len());
        let mut sent_keys: Vec<Value> = Vec::with_capacity(keys.len());
        let mut rejected: Vec<Value> = Vec::new();
        for (j, k) in keys.iter().enumerate() {
            match sales_core::record::check_month_key(k) {
                Ok(mk) => {
                    kept_keys.push(j);
                    sent_keys
                        .push(json!({"storeId": mk.store_id, "year": mk.year, "month": mk.month}));
                }
                Err(errs) => {
                    for e in errs {
                        let field = if e.field.is_empty() {
                            format!("keys[{j}]")
                        } else {
                            format!("keys[{j}].{}", e.field)
                        };
                        rejected.push(
                            json!({"index": ids.len() + j, "field": field, "reason": e.reason}),
                        );
                    }
                }
            }
        }
        let atomic = body.atomic.unwrap_or(true);
        let mut tx = self.state.pool.begin().await?;
        set_actor(&mut *tx, auth.0.user_id).await?;
        let summary: Value = sqlx::query_scalar("SELECT sales.batch_delete_impl($1, $2, $3, $4)")
            .bind(if ids.is_empty() {
                None
            } else {
                Some(ids.clone())
            })
            .bind(if keys.is_empty() {
                None
            } else {
                Some(Value::Array(sent_keys))
            })
            .bind(atomic)
            .bind(auth.0.scope())
            .fetch_one(&mut *tx)
            .await?;
        let mut summary = summary;
        let n_ids = ids.len();
        if let Some(errors) = summary["errors"].as_array_mut() {
            for e in errors.iter_mut() {
                let index = e["index"].as_u64().unwrap_or(u64::MAX) as usize;
                if hidden.contains(&index) {
                    e["reason"] = Value::from("no such sales record");
                }
                // Renumber keys as the caller sent them.
                if index >= n_ids && index != usize::MAX {
                    if let Some(&j) = kept_keys.get(index - n_ids) {
                        let sent = format!("keys[{}]", index - n_ids);
                        let field = e["field"].as_str().unwrap_or_default().to_string();
                        e["index"] = json!(n_ids + j);
                        e["field"] = json!(field.replacen(&sent, &format!("keys[{j}]"), 1));
                    }
                }
            }
            let had = errors.len();
            errors.extend(rejected.iter().cloned());
            if errors.len() > had {
                errors.sort_by_key(|e| e["index"].as_u64().unwrap_or(u64::MAX));
            }
        }
        if !rejected.is_empty() {
            let failed_keys: std::collections::HashSet<u64> = rejected
                .iter()
                .filter_map(|e| e["index"].as_u64())
                .collect();
            summary["failed"] =
                json!(summary["failed"].as_u64().unwrap_or(0) + failed_keys.len() as u64);
            summary["total"] = json!(n);
        }
        super::error::cap_report(&mut summary);
        let failed = summary["failed"].as_i64().unwrap_or(0);
        if atomic && failed > 0 {
            tx.rollback().await?;
            return Err(ApiError::unprocessable(
                format!("{failed} of {n} items failed; nothing was deleted"),
                Some(summary),
            ));
        }
        let tags = crate::events::model::tx_cache_tags(&mut tx).await?;
        tx.commit().await?;
        self.state.note_change(&self.state.pool).await;
        self.state.cache.invalidate(&tags).await;
        Ok(DeleteResponse::Ok(RawJson::new(summary.to_string())))
    }
}

/// The store a record or key names, by the one spelling rule.
fn named_store(v: &Value) -> Option<i64> {
    v.as_object()?
        .iter()
        .find(|(k, _)| sales_core::record::spelled_as(k, "storeId"))
        .and_then(|(_, v)| sales_core::record::parse_id(v).ok())
}

/// The report of the records sent to the extension (numbered among
/// `kept`), with the records refused before it, numbered as in the request.
pub(crate) fn merge_report(
    mut summary: Value,
    kept: &[usize],
    rejected: Vec<(usize, Vec<sales_core::FieldError>)>,
    total: usize,
) -> Value {
    if rejected.is_empty() {
        return summary;
    }
    let at = |v: &Value| {
        v.as_u64()
            .and_then(|i| kept.get(i as usize))
            .map(|&i| Value::from(i))
            .unwrap_or(Value::Null)
    };
    let mut errors: Vec<Value> = Vec::new();
    for e in summary["errors"].as_array().cloned().unwrap_or_default() {
        let mut e = e;
        e["index"] = at(&e["index"]);
        errors.push(e);
    }
    for (i, errs) in &rejected {
        for e in errs {
            errors.push(json!({"index": i, "field": e.field, "reason": e.reason}));
        }
    }
    errors.sort_by_key(|e| e["index"].as_u64().unwrap_or(u64::MAX));
    if let Some(dups) = summary["duplicates"].as_array_mut() {
        for d in dups {
            d["index"] = at(&d["index"]);
            d["supersededBy"] = at(&d["supersededBy"]);
        }
    }
    summary["errors"] = Value::Array(errors);
    summary["total"] = Value::from(total);
    summary["failed"] =
        Value::from(summary["failed"].as_u64().unwrap_or(0) + rejected.len() as u64);
    summary
}

/// Everything a list query needs, checked.
pub struct ListQuery<'a> {
    pub who: &'a crate::auth::Principal,
    pub filter: &'a SalesFilter,
    pub projection: &'a Projection,
    pub keys: &'a [SortKey],
    pub spec: &'a str,
    pub limit: i64,
    pub requested: i64,
    pub offset: i64,
    pub after: Option<&'a Vec<String>>,
    pub include_meta: bool,
    pub started: Instant,
}

/// The list query for `q`, built fresh for each attempt (binds are consumed).
fn list_query(q: &ListQuery<'_>) -> QueryBuilder<'static, Postgres> {
    let mut qb: QueryBuilder<Postgres> = QueryBuilder::new("SELECT (");
    doc_sql(q.projection, &mut qb);
    qb.push(")::text AS doc, ARRAY[");
    for (i, k) in q.keys.iter().enumerate() {
        if i > 0 {
            qb.push(", ");
        }
        qb.push(k.expr).push("::text");
    }
    qb.push(
        "] AS cur FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id WHERE true",
    );
    q.filter.push_where(&mut qb, q.who);
    if let Some(vals) = q.after {
        push_keyset(&mut qb, q.keys, vals);
    }
    qb.push(" ORDER BY ");
    for (i, k) in q.keys.iter().enumerate() {
        if i > 0 {
            qb.push(", ");
        }
        qb.push(k.expr).push(if k.desc { " DESC" } else { " ASC" });
    }
    qb.push(" LIMIT ").push_bind(q.limit + 1);
    if q.offset > 0 {
        qb.push(" OFFSET ").push_bind(q.offset);
    }
    qb
}

/// Runs a list query; the body is the page as JSON text.
pub async fn list_body(state: &AppState, q: ListQuery<'_>) -> ApiResult<String> {
    let rows = crate::db::retry("sales_list", true, || async {
        let mut conn = state.read_conn().await?;
        let mut qb = list_query(&q);
        crate::metrics::timed("sales_list", qb.build().fetch_all(&mut *conn)).await
    })
    .await?;
    let has_more = rows.len() as i64 > q.limit;
    let rows = &rows[..rows.len().min(q.limit as usize)];
    let mut body = String::with_capacity(
        rows.iter()
            .map(|r| r.get::<&str, _>(0).len() + 1)
            .sum::<usize>()
            + 256,
    );
    body.push_str("{\"data\":[");
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(r.get::<&str, _>(0));
    }
    body.push(']');
    if q.include_meta {
        let next = if has_more {
            rows.last()
                .map(|r| encode_cursor(q.spec, &r.get::<Vec<String>, _>(1)))
        } else {
            None
        };
        let meta = json!({
            "fields": q.projection.fields, "exclude": q.projection.excluded, "count": rows.len(),
            "limit": q.limit, "limitClamped": q.requested > MAX_LIMIT, "nextCursor": next, "sort": q.spec,
            "tookMs": ms(q.started),
        });
        body.push_str(",\"meta\":");
        body.push_str(&meta.to_string());
    }
    body.push('}');
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_parsing() {
        let k = parse_sort(Some("-period,store_id")).unwrap();
        assert_eq!(sort_spec(&k), "-year,-month,storeId,id");
        assert!(parse_sort(Some("name")).is_err());
        assert!(parse_sort(Some("year,-year")).is_err());
        assert_eq!(
            sort_spec(&parse_sort(None).unwrap()),
            "storeId,year,month,id"
        );
    }

    #[test]
    fn cursor_values_are_typed() {
        let keys = parse_sort(Some("-updatedAt,totalSales")).unwrap();
        let ok = [
            "2024-01-05 10:11:12.123456+00".to_string(),
            "12.5".into(),
            "9".into(),
        ];
        assert!(check_cursor_values(&keys, &ok).is_ok());
        for bad in [
            ["2024-13-45 10:11:12+00".to_string(), "1".into(), "9".into()],
            [
                "2024-01-05 10:11:12+00".to_string(),
                "1e999".into(),
                "9".into(),
            ],
            [
                "2024-01-05 10:11:12+00".to_string(),
                "1".into(),
                "99999999999999999999".into(),
            ],
        ] {
            assert!(check_cursor_values(&keys, &bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cursor_round_trip() {
        let c = encode_cursor("storeId,id", &["1".into(), "9".into()]);
        assert_eq!(decode_cursor(&c, "storeId,id", 2).unwrap(), vec!["1", "9"]);
        assert!(decode_cursor(&c, "-storeId,id", 2).is_err());
        assert!(decode_cursor("garbage!", "storeId,id", 2).is_err());
    }
}
