//! `/api/v2/sales`: list (filters, projection, sort, keyset pagination),
//! one record, batch upsert and delete, summaries.
//!
//! Documents are built and projected inside Postgres (`sales.sales_doc`,
//! `sales.project`); the server splices the resulting JSON text into the
//! response without parsing it.

mod batch;
mod history;
mod list;
mod model;

pub use history::{parse_as_of, HistoryPage, HistoryResponse, MAX_HISTORY_LIMIT};
pub use list::{
    check_cursor_values, decode_cursor, encode_cursor, filters_digest, list_body, parse_sort,
    sort_spec, ListQuery, SortKey,
};
pub use model::*;

use super::cached::{cached, sales_tags};
use super::error::{ApiError, ApiResult};
use super::filters::{parse_projection, RawFilter, SalesFilter, TotalParam};
use super::raw::RawJson;
use super::security::BearerAuth;
use super::ApiTags;
use crate::db::sql::Binds;
use crate::db::{Changes, Write};
use crate::state::AppState;
pub(crate) use batch::merge_report;
use list::one_body;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::{payload::Json, OpenApi};
use sales_core::projection::SALES_DOC;
use sales_core::summary::Summary;
use serde_json::{json, Value};
use sqlx::{Postgres, QueryBuilder};
use std::sync::Arc;

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;
pub const MAX_OFFSET: i64 = 10_000;

pub struct SalesApi {
    pub state: Arc<AppState>,
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
        #[oai(name = "minTotalSales")] min_total_sales: Query<Option<TotalParam>>,
        #[oai(name = "maxTotalSales")] max_total_sales: Query<Option<TotalParam>>,
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
            Some(_) if offset > 0 => {
                return Err(ApiError::bad_param(
                    "offset",
                    "cannot be combined with cursor",
                ));
            }
            Some(c) => {
                let vals = decode_cursor(c, &spec, &filters_digest(&filter), keys.len())?;
                check_cursor_values(&keys, &vals)?;
                Some(vals)
            }
            None => None,
        };

        // A region filter reads the stores' regions, as a projection of
        // store fields reads the stores: either way the page depends on
        // the store documents.
        let tags = sales_tags(
            filter.store_ids.as_deref(),
            filter.year,
            filter.month,
            &auth.0,
            projection.needs_store() || filter.region.is_some(),
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
    /// Summaries over the filtered records, computed in Postgres in one statement: `groupBy` any
    /// combination of dimensions, `metrics` over store-days, `compareTo` a previous period (its
    /// values under `previous`, the change under `changePct`), `top` groups by `orderBy`.
    /// Cached per caller scope; invalidated by the events of the stores it covers.
    #[oai(path = "/api/v2/sales/summary", method = "get")]
    async fn summary(
        &self,
        auth: BearerAuth,
        /// Comma-separated: store (default), region, year, quarter, month, week (ISO),
        /// weekday (ISO, 1 = Monday), day.
        #[oai(name = "groupBy")]
        group_by: Query<Option<String>>,
        /// Comma-separated: totalSales, totalCustomers, months, stores (the default set), count
        /// (store-days), {sum|avg|min|max}{Sales|Customers|Transactions}, salesPerCustomer.
        metrics: Query<Option<String>>,
        /// `previousPeriod` (as many months just before) or `previousYear` (the same months a
        /// year earlier). Needs a period: `from` and `to`, or `year` (and `month`).
        #[oai(name = "compareTo")]
        compare_to: Query<Option<String>>,
        /// Only the first N groups (1..1000) by `orderBy` (default: the first metric, largest first).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        top: Query<Option<i64>>,
        /// Comma-separated, `-` for descending: a groupBy dimension, a metric, or
        /// `<metric>ChangePct` (with compareTo). Ties by the dimensions.
        #[oai(name = "orderBy")]
        order_by: Query<Option<String>>,
        #[oai(name = "storeId")] store_id: Query<Option<String>>,
        region: Query<Option<String>>,
        #[oai(validator(minimum(value = "2000"), maximum(value = "2100")))] year: Query<
            Option<i32>,
        >,
        #[oai(validator(minimum(value = "1"), maximum(value = "12")))] month: Query<Option<i32>>,
        from: Query<Option<String>>,
        to: Query<Option<String>>,
        #[oai(name = "minTotalSales")] min_total_sales: Query<Option<TotalParam>>,
        #[oai(name = "maxTotalSales")] max_total_sales: Query<Option<TotalParam>>,
    ) -> ApiResult<SummaryResponse> {
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
        let bad = |e: sales_core::summary::SummaryError| ApiError::bad_param(e.param, e.reason);
        let period = sales_core::summary::period(filter.year, filter.month, filter.from, filter.to)
            .map_err(bad)?;
        let spec = Summary::parse(
            group_by.0.as_deref(),
            metrics.0.as_deref(),
            compare_to.0.as_deref(),
            top.0,
            order_by.0.as_deref(),
            period,
        )
        .map_err(bad)?;
        if spec.compare.is_some() && filter.month.is_some() && filter.year.is_none() {
            return Err(ApiError::bad_param(
                "month",
                "with compareTo, give year too (a month of every year is not one period)",
            ));
        }
        // The compared period replaces the current one in the conditions.
        let compared = spec.compared_period().map(|p| SalesFilter {
            year: None,
            month: None,
            from: Some(p.from),
            to: Some(p.to),
            ..filter.clone()
        });
        let tags = sales_tags(filter.store_ids.as_deref(), None, None, &auth.0, true);
        // A comparison leaves out groups whose first date is still to come
        // (`current_date`, UTC on the server's connections): its answer
        // holds for the day it was computed on, so the day is in its key.
        let today = compared
            .is_some()
            .then(|| chrono::Utc::now().date_naive().to_string());
        let params = (&filter, &spec, today);
        let body = cached(
            &self.state,
            "sales.summary",
            &params,
            &auth.0,
            tags,
            || async {
                let scope = auth.0.scope();
                let current = filter.terms(scope.as_deref());
                let before = compared
                    .as_ref()
                    .map(|f| f.terms(scope.as_deref()))
                    .unwrap_or_default();
                let (rows, groups): (String, i64) =
                    crate::db::retry("sales_summary", true, || async {
                        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new("");
                        spec.render(&mut Binds(&mut qb), &current, &before);
                        crate::metrics::timed(
                            "sales_summary",
                            qb.build_query_as()
                                .fetch_one(&mut *self.state.read_conn().await?),
                        )
                        .await
                    })
                    .await?;
                let label = |p: (i32, i32)| format!("{}-{:02}", p.0, p.1);
                let span = |p: Option<sales_core::summary::Period>| {
                    p.map(|p| json!({"from": label(p.from), "to": label(p.to)}))
                };
                let limit = spec.top.unwrap_or(sales_core::summary::MAX_GROUPS) as i64;
                let meta = json!({
                    "groupBy": spec.group_by.iter().map(|d| d.name()).collect::<Vec<_>>(),
                    "metrics": spec.metrics.iter().map(|m| m.name()).collect::<Vec<_>>(),
                    "year": filter.year,
                    "month": filter.month,
                    "from": filter.from.map(label),
                    "to": filter.to.map(label),
                    // Null for a month of every year (`month` without
                    // `year`), which is no one span.
                    "period": span(spec.period),
                    "compareTo": spec.compare.map(|c| c.name()),
                    "comparedPeriod": span(spec.compared_period()),
                    "top": spec.top,
                    "groups": groups,
                    "truncated": groups > limit,
                });
                Ok(format!("{{\"data\":{rows},\"meta\":{meta}}}"))
            },
        )
        .await?;
        Ok(SummaryResponse::Ok(RawJson::new(body)))
    }

    /// One sales record by id, with optional `fields` / `exclude`. A record outside the
    /// caller's scope is 404, as a missing one. With `asOf`, the record as it was then, read
    /// back from its history: 404 with the reason when it did not exist then (not yet
    /// inserted, or deleted), 410 when that version is older than the retained history.
    #[oai(path = "/api/v2/sales/:id", method = "get")]
    async fn get_one(
        &self,
        auth: BearerAuth,
        id: Path<i64>,
        fields: Query<Option<String>>,
        exclude: Query<Option<String>>,
        /// A time (RFC 3339, e.g. `2024-06-01T12:00:00Z`) or a date (midnight UTC).
        #[oai(name = "asOf")]
        as_of: Query<Option<String>>,
    ) -> ApiResult<OneResponse> {
        let projection = parse_projection(&SALES_DOC, fields.0.as_deref(), exclude.0.as_deref())?;
        if let Some(raw) = as_of.0.as_deref() {
            let at = parse_as_of(raw)?;
            let tags = vec![
                crate::cache::tag_row(id.0),
                crate::cache::TAG_STORES.to_string(),
                crate::cache::TAG_HISTORY.to_string(),
            ];
            let params = (id.0, at, &projection.fields, &projection.excluded);
            let body = cached(
                &self.state,
                "sales.get_as_of",
                &params,
                &auth.0,
                tags,
                || {
                    history::as_of_body(
                        &self.state,
                        id.0,
                        at,
                        &projection.fields,
                        &projection.excluded,
                        &auth.0,
                    )
                },
            )
            .await?;
            if body.starts_with("{\"data\"") {
                return Ok(OneResponse::Ok(RawJson::new(body)));
            }
            let v: Value = serde_json::from_str(&body).map_err(ApiError::internal)?;
            if let Some(why) = v["gone"].as_str() {
                return Ok(OneResponse::Gone(super::error::ErrorBody::new(
                    "gone", why, None,
                )));
            }
            return Err(ApiError::not_found(
                v["missing"]
                    .as_str()
                    .unwrap_or("no such version")
                    .to_string(),
            ));
        }
        let tags = vec![
            crate::cache::tag_row(id.0),
            crate::cache::TAG_STORES.to_string(),
        ];
        let params = (id.0, &projection.fields, &projection.excluded);
        let body = cached(&self.state, "sales.get", &params, &auth.0, tags, || {
            one_body(&self.state, id.0, &projection, &auth.0)
        })
        .await?;
        Ok(OneResponse::Ok(RawJson::new(body)))
    }

    /// The history of a sales record, newest first: every retained version with its time,
    /// actor (user id and email, or `sql` for a write that named no user), operation, job
    /// (imports, asynchronous batches) and, for each changed day, the old and new value.
    /// Paged by `beforeVersion` (`meta.nextBeforeVersion`). Versions older than the retained
    /// history (`HISTORY_RETENTION`) are reported in `meta.gone`; a page wholly older is 410.
    /// A record with a store outside the caller's scope (now or in its history) is 404.
    #[oai(path = "/api/v2/sales/:id/history", method = "get")]
    async fn history(
        &self,
        auth: BearerAuth,
        id: Path<i64>,
        /// Versions per page, default 50, at most 200.
        #[oai(validator(minimum(value = "1"), maximum(value = "200")))]
        limit: Query<Option<i64>>,
        /// Only versions older than this one (`meta.nextBeforeVersion` of the previous page).
        #[oai(name = "beforeVersion", validator(minimum(value = "1")))]
        before_version: Query<Option<i64>>,
    ) -> ApiResult<HistoryResponse> {
        let limit = limit.0.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_HISTORY_LIMIT).contains(&limit) {
            return Err(ApiError::bad_param(
                "limit",
                format!("must be between 1 and {MAX_HISTORY_LIMIT}"),
            ));
        }
        // Each version names its actor by their email now: a user's change
        // or deletion makes the page stale too.
        let tags = vec![
            crate::cache::tag_row(id.0),
            crate::cache::TAG_USERS.to_string(),
            crate::cache::TAG_HISTORY.to_string(),
        ];
        let params = (id.0, limit, before_version.0);
        let body = cached(&self.state, "sales.history", &params, &auth.0, tags, || {
            history::history_body(&self.state, id.0, &auth.0, limit, before_version.0)
        })
        .await?;
        history::history_response(&self.state, &auth.0, body).await
    }

    /// Validate and upsert many store-months in one transaction. With `atomic` (default) any
    /// invalid record rejects the batch with 422 and a per-record report; nothing is written.
    #[oai(path = "/api/v2/sales/batch", method = "post")]
    async fn batch_upsert(
        &self,
        auth: BearerAuth,
        body: BatchUpsertBody,
        /// Queue the batch and answer 202 with a job (see `/api/v2/imports/{id}`).
        #[oai(name = "async")]
        run_async: Query<Option<bool>>,
        /// Refused (412): a batch has no representation to match.
        #[oai(name = "If-Match")]
        if_match: Header<Option<String>>,
    ) -> ApiResult<BatchResponse> {
        if if_match.0.is_some() {
            return Err(ApiError::nothing_to_match("/api/v2/sales/batch"));
        }
        let max = self.state.config.batch_max_records;
        let n = body.records.len();
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
        let records = std::sync::Arc::new(body.records);
        let checked = batch::check_records(records.clone()).await?;
        let mut rejected: Vec<(usize, Vec<sales_core::FieldError>)> = Vec::new();
        let mut kept: Vec<usize> = Vec::with_capacity(n);
        let mut denied: Vec<i64> = Vec::new();
        for (i, c) in checked.into_iter().enumerate() {
            match c {
                batch::Checked::Valid { store, unstorable } => {
                    if !auth.0.can_access_store(store) {
                        denied.push(store);
                    }
                    if unstorable.is_empty() {
                        kept.push(i);
                    } else {
                        rejected.push((i, unstorable));
                    }
                }
                batch::Checked::Refused { stores, errors } => {
                    denied.extend(stores.into_iter().filter(|s| !auth.0.can_access_store(*s)));
                    rejected.push((i, errors));
                }
            }
        }
        // Scope first: a record for a store outside the token's scope is 403,
        // whatever else is wrong with the batch.
        if !denied.is_empty() {
            return Err(ApiError::outside_scope(denied));
        }
        let atomic = body.atomic.unwrap_or(true);
        let replace = body.mode == Some(BatchMode::Replace);
        // The records to write: one JSON array of their texts as received.
        let mut text =
            String::with_capacity(records.iter().map(|r| r.get().len() + 1).sum::<usize>() + 2);
        text.push('[');
        for (j, &i) in kept.iter().enumerate() {
            if j > 0 {
                text.push(',');
            }
            text.push_str(records[i].get());
        }
        text.push(']');
        // Each piece is a value the body's parser accepted, so the array is
        // JSON; it is checked again (a pass over the whole text) only where
        // it goes on as a JSON value rather than as text.
        let as_value = |text: &str| {
            serde_json::value::RawValue::from_string(text.to_owned()).map_err(ApiError::internal)
        };
        if run_async.0.unwrap_or(false) {
            let records = as_value(&text)?;
            let id = crate::jobs::batch::enqueue(
                &self.state.pool,
                self.state.config.jobs_max_per_user,
                auth.0.user_id,
                auth.0.scope(),
                &records,
                &kept,
                &rejected,
                n,
                replace,
                atomic,
            )
            .await?
            .map_err(ApiError::too_many_jobs)?;
            let url = format!("/api/v2/imports/{id}");
            return Ok(BatchResponse::Accepted(
                Json(super::imports::JobAccepted {
                    id,
                    kind: "batch".into(),
                    state: "queued".into(),
                    status_url: url.clone(),
                    format: None,
                    rows_read: n as i64,
                    // Records already refused (bad values); the job's
                    // status has their reasons. The merge may refuse more.
                    rows_rejected: rejected.len() as i64,
                }),
                url,
            ));
        }
        let write = !kept.is_empty();
        // With `atomic`, a refused record means nothing is written; the
        // others still go through the extension for a complete report.
        let roll_back = atomic && !rejected.is_empty();
        let (pool, user, scope) = (&self.state.pool, auth.0.user_id, auth.0.scope());
        let (summary, changes) = if write {
            // Without sales.parse_json the records go as jsonb.
            let mut as_jsonb = if self.state.parse_json.has(pool).await {
                None
            } else {
                Some(as_value(&text)?)
            };
            loop {
                let out = crate::db::retry_tx("batch_upsert", || async {
                    let mut w = Write::begin(pool, user).await?;
                    // The records go as text: sales.parse_json makes them
                    // jsonb several times faster than Postgres' jsonb input.
                    let query = match &as_jsonb {
                        None => sqlx::query_scalar(
                            "SELECT sales.batch_upsert_impl(sales.parse_json($1), $2, $3, $4)",
                        )
                        .bind(text.as_str()),
                        Some(records) => {
                            sqlx::query_scalar("SELECT sales.batch_upsert_impl($1, $2, $3, $4)")
                                .bind(sqlx::types::Json(&**records))
                        }
                    };
                    let summary: Value = crate::metrics::timed(
                        "batch_upsert",
                        query
                            .bind(replace)
                            .bind(atomic)
                            .bind(&scope)
                            .fetch_one(w.conn()),
                    )
                    .await?;
                    if roll_back || (atomic && summary["failed"].as_i64().unwrap_or(0) > 0) {
                        w.rollback().await?;
                        let mut summary = summary;
                        for k in ["inserted", "updated", "unchanged"] {
                            summary[k] = json!(0);
                        }
                        summary["eventId"] = Value::Null;
                        return Ok((summary, Changes::none()));
                    }
                    Ok((summary, w.commit().await?))
                })
                .await;
                match out {
                    // The extension went back to a version without
                    // sales.parse_json: nothing was written, send jsonb.
                    Err(crate::db::TxFailure::BeforeCommit(e))
                        if as_jsonb.is_none() && crate::db::is_undefined_function(&e) =>
                    {
                        self.state.parse_json.missing();
                        as_jsonb = Some(as_value(&text)?);
                    }
                    out => break out?,
                }
            }
        } else {
            (
                json!({"total": 0, "inserted": 0, "updated": 0, "unchanged": 0, "failed": 0,
                       "merged": 0, "eventId": null, "errors": [], "duplicates": []}),
                Changes::none(),
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
        if !changes.is_empty() {
            self.state.publish(changes).await;
        }
        Ok(BatchResponse::Ok(RawJson::new(summary.to_string())))
    }

    /// Delete store-months by id and/or by `{storeId, year, month}` keys. Unknown items are
    /// reported; with `atomic` (default) nothing is deleted when any item fails (422).
    #[oai(path = "/api/v2/sales/batch", method = "delete")]
    async fn batch_delete(
        &self,
        auth: BearerAuth,
        body: BatchDeleteBody,
        /// Refused (412): a batch has no representation to match.
        #[oai(name = "If-Match")]
        if_match: Header<Option<String>>,
    ) -> ApiResult<DeleteResponse> {
        if if_match.0.is_some() {
            return Err(ApiError::nothing_to_match("/api/v2/sales/batch"));
        }
        let ids = body.ids.clone().unwrap_or_default();
        let raw_keys = body.keys.unwrap_or_default();
        // Each key read as a value; one holding a number a double cannot
        // hold is that key's error (its stores still judged for scope).
        let mut unreadable: std::collections::HashMap<usize, sales_core::FieldError> =
            Default::default();
        let keys: Vec<Value> = raw_keys
            .iter()
            .enumerate()
            .map(|(j, raw)| match serde_json::from_str::<Value>(raw.get()) {
                Ok(v) => v,
                Err(e) => {
                    unreadable.insert(j, batch::unreadable(raw.get(), &e.to_string()));
                    Value::Null
                }
            })
            .collect();
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
        // Scope: a store the caller names in a key is 403, however the key
        // names it (`3`, `"3"`, `3.0`, `"3.0"`, `3e0`, in any spelling of
        // `storeId`), as for upserts; a key refused for its own reasons
        // (`3.0` is not an id) is judged for scope first, so it never lets
        // the rest of the request through. An id whose row lies outside the
        // scope is reported as missing, never with its store: the answer
        // must not tell who owns a record the caller may not see.
        let denied: Vec<i64> = raw_keys
            .iter()
            .flat_map(|raw| batch::stores_named(raw.get()))
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
            return Err(ApiError::outside_scope(denied));
        }
        // Keys are checked here with the extension's rules; only well-formed
        // ones reach it (a malformed value, say a number beyond f64, would
        // otherwise fail the whole statement).
        let mut kept_keys: Vec<usize> = Vec::with_capacity(keys.len());
        let mut sent_keys: Vec<Value> = Vec::with_capacity(keys.len());
        let mut rejected: Vec<Value> = Vec::new();
        for (j, k) in keys.iter().enumerate() {
            if let Some(e) = unreadable.get(&j) {
                rejected.push(json!({
                    "index": ids.len() + j,
                    "field": sales_core::record::key_field(j, &e.field),
                    "reason": e.reason,
                }));
                continue;
            }
            match sales_core::record::check_month_key(k) {
                Ok(mk) => {
                    kept_keys.push(j);
                    sent_keys
                        .push(json!({"storeId": mk.store_id, "year": mk.year, "month": mk.month}));
                }
                Err(errs) => {
                    for e in errs {
                        let field = sales_core::record::key_field(j, &e.field);
                        rejected.push(
                            json!({"index": ids.len() + j, "field": field, "reason": e.reason}),
                        );
                    }
                }
            }
        }
        let atomic = body.atomic.unwrap_or(true);
        let n_ids = ids.len();
        // The extension's report as the caller sent the items: hidden ids
        // said missing, keys renumbered, the keys refused here added.
        let finish = |summary: &mut Value| {
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
            super::error::cap_report(summary);
        };
        let ids_arg = (!ids.is_empty()).then(|| ids.clone());
        let keys_arg = (!keys.is_empty()).then(|| Value::Array(sent_keys));
        let (pool, user, scope) = (&self.state.pool, auth.0.user_id, auth.0.scope());
        // Retried as a batch upsert is: a deadlock, a serialization failure
        // or a connection lost before COMMIT runs the delete again.
        let (summary, changes) = crate::db::retry_tx("batch_delete", || async {
            let mut w = Write::begin(pool, user).await?;
            let mut summary: Value =
                sqlx::query_scalar("SELECT sales.batch_delete_impl($1, $2, $3, $4)")
                    .bind(&ids_arg)
                    .bind(&keys_arg)
                    .bind(atomic)
                    .bind(&scope)
                    .fetch_one(w.conn())
                    .await?;
            finish(&mut summary);
            if atomic && summary["failed"].as_i64().unwrap_or(0) > 0 {
                w.rollback().await?;
                return Ok((summary, None));
            }
            Ok((summary, Some(w.commit().await?)))
        })
        .await?;
        let Some(changes) = changes else {
            let failed = summary["failed"].as_i64().unwrap_or(0);
            return Err(ApiError::unprocessable(
                format!("{failed} of {n} items failed; nothing was deleted"),
                Some(summary),
            ));
        };
        self.state.publish(changes).await;
        Ok(DeleteResponse::Ok(RawJson::new(summary.to_string())))
    }
}

/// The metrics of a record (its text; the record passed the rules) whose
/// number Postgres' `numeric` cannot store, each with its field: read as
/// an `f64` such a number is 0, and passed to the extension it would make
/// the whole statement fail (every record of an `atomic: false` batch,
/// with no field named).
fn numbers_numeric_refuses(record: &str) -> Vec<sales_core::FieldError> {
    use serde_json::value::RawValue;
    use std::collections::BTreeMap;
    // More than 16,383 digits after the point takes a negative exponent or
    // a number longer than that, and an exponent numeric_in refuses has ten
    // digits or more: a record with none of these (nearly every one) is not
    // read a second time.
    if record.len() < 16_384 && !crate::jobs::parse::may_hold_unstorable_numbers(record) {
        return Vec::new();
    }
    #[derive(serde::Deserialize)]
    struct Daily<'a> {
        #[serde(borrow, rename = "dailyData", alias = "daily_data")]
        daily: Option<BTreeMap<String, BTreeMap<String, &'a RawValue>>>,
    }
    let Ok(Daily { daily: Some(days) }) = serde_json::from_str::<Daily<'_>>(record) else {
        return Vec::new();
    };
    let mut errors = Vec::new();
    for (day, metrics) in &days {
        for (metric, value) in metrics {
            if let Some(why) = crate::jobs::parse::numeric_text_problem(value.get()) {
                errors.push(sales_core::FieldError::new(
                    format!("dailyData.{day}.{metric}"),
                    why,
                ));
            }
        }
    }
    errors
}
