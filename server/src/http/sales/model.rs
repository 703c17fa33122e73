//! The shapes of `/api/v2/sales` requests and responses.

use crate::http::raw::RawJson;
use poem_openapi::impl_apirequest_for_payload;
use poem_openapi::payload::{Json, Payload};
use poem_openapi::{ApiResponse, Enum, Object};
use serde_json::Value;

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
    pub store: Option<crate::http::stores::Store>,
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
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
    pub sort: String,
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
    /// `asOf` is older than the record's retained history.
    #[oai(status = 410)]
    Gone(Json<crate::http::error::ErrorBody>),
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
#[oai(deny_unknown_fields)]
pub struct BatchUpsertRequest {
    /// Records like `{"storeId": 12, "year": 2024, "month": 1, "dailyData": {"1": {"sales": 1000, "customers": 52}}}`.
    pub sales_data_array: Vec<Value>,
    /// `merge` (default) or `replace`.
    pub mode: Option<BatchMode>,
    /// All or nothing (default true). With false, valid records are written and the rest reported.
    pub atomic: Option<bool>,
}

/// The body of `POST /api/v2/sales/batch` as received, documented as
/// [`BatchUpsertRequest`]: each record is kept as its JSON text, read by
/// validation through a [`sales_core::json::Tape`] and sent on to Postgres
/// as it came (no `Value` with a map per object is built and printed again;
/// that was most of the server's CPU for a large batch).
pub struct BatchUpsertBody {
    pub records: Vec<Box<serde_json::value::RawValue>>,
    pub mode: Option<BatchMode>,
    pub atomic: Option<bool>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchUpsertWire {
    #[serde(rename = "salesDataArray")]
    sales_data_array: Vec<Box<serde_json::value::RawValue>>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    atomic: Option<bool>,
}

/// A JSON body read by the handler's own type, documented (and its
/// content type checked) as the `Object` it stands for.
macro_rules! documented_as {
    ($body:ty, $doc:ty) => {
        impl Payload for $body {
            const CONTENT_TYPE: &'static str = "application/json; charset=utf-8";

            fn check_content_type(content_type: &str) -> bool {
                <Json<$doc> as Payload>::check_content_type(content_type)
            }

            fn schema_ref() -> poem_openapi::registry::MetaSchemaRef {
                <$doc as poem_openapi::types::Type>::schema_ref()
            }

            fn register(registry: &mut poem_openapi::registry::Registry) {
                <$doc as poem_openapi::types::Type>::register(registry);
            }
        }

        impl_apirequest_for_payload!($body);
    };
}

/// The request's body parsed as `T`; an empty one refused saying `empty`.
async fn read_body<T: serde::de::DeserializeOwned>(
    request: &poem::Request,
    body: &mut poem::RequestBody,
    empty: &str,
) -> poem::Result<T> {
    let bad = |reason: String| poem_openapi::error::ParseRequestPayloadError { reason };
    let data = <Vec<u8> as poem::FromRequest>::from_request(request, body).await?;
    if data.is_empty() {
        return Err(bad(empty.into()).into());
    }
    Ok(serde_json::from_slice(&data).map_err(|e| bad(e.to_string()))?)
}

documented_as!(BatchUpsertBody, BatchUpsertRequest);

impl poem_openapi::payload::ParsePayload for BatchUpsertBody {
    const IS_REQUIRED: bool = true;

    async fn from_request(
        request: &poem::Request,
        body: &mut poem::RequestBody,
    ) -> poem::Result<Self> {
        let bad = |reason: String| poem_openapi::error::ParseRequestPayloadError { reason };
        let wire: BatchUpsertWire = read_body(
            request,
            body,
            "the body must be a JSON object with salesDataArray",
        )
        .await?;
        let mode = match wire.mode.as_deref() {
            None => None,
            Some("merge") => Some(BatchMode::Merge),
            Some("replace") => Some(BatchMode::Replace),
            Some(other) => {
                return Err(bad(format!("mode: {other:?} is not one of merge, replace")).into())
            }
        };
        Ok(Self {
            records: wire.sales_data_array,
            mode,
            atomic: wire.atomic,
        })
    }
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
    /// The first 100 problems.
    pub errors: Vec<RecordError>,
    /// Problems past those listed (absent when none).
    pub errors_omitted: Option<i64>,
    /// The first 1,000 folds (`merged` counts them all).
    pub duplicates: Vec<Value>,
    /// Folds past those listed (absent when none).
    pub duplicates_omitted: Option<i64>,
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
        Json<crate::http::imports::JobAccepted>,
        #[oai(header = "Location")] String,
    ),
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
#[oai(deny_unknown_fields)]
pub struct BatchDeleteRequest {
    /// Record ids.
    pub ids: Option<Vec<i64>>,
    /// `{"storeId", "year", "month"}` keys.
    pub keys: Option<Vec<Value>>,
    /// All or nothing (default true).
    pub atomic: Option<bool>,
}

/// The body of `DELETE /api/v2/sales/batch` as received, documented as
/// [`BatchDeleteRequest`]: each key kept as its JSON text, so that a key
/// holding a number a double cannot hold (`1e400`) is that key's error
/// rather than the whole body's ("not valid JSON").
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchDeleteBody {
    #[serde(default)]
    pub ids: Option<Vec<i64>>,
    #[serde(default)]
    pub keys: Option<Vec<Box<serde_json::value::RawValue>>>,
    #[serde(default)]
    pub atomic: Option<bool>,
}

documented_as!(BatchDeleteBody, BatchDeleteRequest);

impl poem_openapi::payload::ParsePayload for BatchDeleteBody {
    const IS_REQUIRED: bool = true;

    async fn from_request(
        request: &poem::Request,
        body: &mut poem::RequestBody,
    ) -> poem::Result<Self> {
        read_body(
            request,
            body,
            "the body must be a JSON object with ids or keys",
        )
        .await
    }
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct DeleteSummary {
    pub total: i64,
    pub deleted: i64,
    pub failed: i64,
    /// Items that named a row another item of the request named already
    /// (an id given twice, or an id and its row's key): with `deleted` and
    /// `failed` they add up to `total`.
    pub duplicates: i64,
    pub event_id: Option<i64>,
    pub errors: Vec<RecordError>,
}

#[derive(ApiResponse)]
pub enum DeleteResponse {
    /// Summary of the deletion.
    #[oai(status = 200)]
    Ok(RawJson<DeleteSummary>),
}

/// The metrics a summary can compute (those asked for with `metrics`; by
/// default totalSales, totalCustomers, months and stores). Over store-days:
/// `avg*`, `min*`, `max*` are per store-day. Sums and counts over nothing (a
/// month with no days, days without the field) are 0; averages, minima, maxima
/// and salesPerCustomer over nothing are null.
#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct SummaryMetrics {
    pub total_sales: Option<f64>,
    pub total_customers: Option<f64>,
    /// Store-months counted.
    pub months: Option<i64>,
    /// Distinct stores.
    pub stores: Option<i64>,
    /// Store-days reported.
    pub count: Option<i64>,
    pub sum_sales: Option<f64>,
    pub sum_customers: Option<f64>,
    pub sum_transactions: Option<f64>,
    pub avg_sales: Option<f64>,
    pub avg_customers: Option<f64>,
    pub avg_transactions: Option<f64>,
    pub min_sales: Option<f64>,
    pub min_customers: Option<f64>,
    pub min_transactions: Option<f64>,
    pub max_sales: Option<f64>,
    pub max_customers: Option<f64>,
    pub max_transactions: Option<f64>,
    /// Sum of sales / sum of customers.
    pub sales_per_customer: Option<f64>,
}

/// One group: its dimensions (those of `groupBy`), its metrics and, with
/// `compareTo`, the compared period's metrics and the change in percent.
#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct SummaryRow {
    /// The group's dimension values joined with `/` (one dimension: its value,
    /// e.g. the store id, the region or `YYYY-MM`).
    pub key: String,
    pub store_id: Option<i64>,
    pub store_code: Option<String>,
    pub store_name: Option<String>,
    pub region: Option<String>,
    pub year: Option<i32>,
    /// `2024-Q1`.
    pub quarter: Option<String>,
    /// `2024-03`.
    pub month: Option<String>,
    /// ISO week, `2024-W09`.
    pub week: Option<String>,
    /// ISO day of week, 1 (Monday) .. 7.
    pub weekday: Option<i32>,
    /// `2024-03-05`.
    pub day: Option<String>,
    #[oai(flatten)]
    pub metrics: SummaryMetrics,
    /// The compared period's metrics (null where it has no such group).
    pub previous: Option<SummaryMetrics>,
    /// (current - previous) / previous x 100, by metric (each null where previous is 0 or
    /// missing).
    pub change_pct: Option<SummaryChange>,
}

/// The change of each metric asked for against the compared period, in percent rounded to
/// 2 decimals: (current - previous) / previous x 100; null where previous is 0 or the compared
/// period has no such group. A number for every metric, counts included (`months`: 3 against 4
/// is -25).
#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct SummaryChange {
    pub total_sales: Option<f64>,
    pub total_customers: Option<f64>,
    pub months: Option<f64>,
    pub stores: Option<f64>,
    pub count: Option<f64>,
    pub sum_sales: Option<f64>,
    pub sum_customers: Option<f64>,
    pub sum_transactions: Option<f64>,
    pub avg_sales: Option<f64>,
    pub avg_customers: Option<f64>,
    pub avg_transactions: Option<f64>,
    pub min_sales: Option<f64>,
    pub min_customers: Option<f64>,
    pub min_transactions: Option<f64>,
    pub max_sales: Option<f64>,
    pub max_customers: Option<f64>,
    pub max_transactions: Option<f64>,
    pub sales_per_customer: Option<f64>,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct SummaryPage {
    pub data: Vec<SummaryRow>,
    pub meta: SummaryMeta,
}

/// What a summary was asked for and how many groups it found.
#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct SummaryMeta {
    /// The dimensions grouped by, in order.
    pub group_by: Vec<String>,
    /// The metrics of each group, in order.
    pub metrics: Vec<String>,
    /// The filters `year`, `month`, `from` and `to` (`YYYY-MM`), null when not given.
    pub year: Option<i32>,
    pub month: Option<i32>,
    pub from: Option<String>,
    pub to: Option<String>,
    /// The span of months the filters select; null when they select none (no period
    /// filter, or a month of every year).
    pub period: Option<SummarySpan>,
    /// `previousYear` or `previousPeriod`, null without a comparison.
    pub compare_to: Option<String>,
    /// The span compared with, null without a comparison.
    pub compared_period: Option<SummarySpan>,
    /// `top` as given, null when not given.
    pub top: Option<i64>,
    /// Groups found, before `top` or the most a summary returns.
    pub groups: i64,
    /// Whether groups were left out.
    pub truncated: bool,
}

/// A span of months, both ends included.
#[derive(Object, Debug)]
pub struct SummarySpan {
    /// First month, `YYYY-MM`.
    pub from: String,
    /// Last month, `YYYY-MM`.
    pub to: String,
}

#[derive(ApiResponse)]
pub enum SummaryResponse {
    /// Totals per group.
    #[oai(status = 200)]
    Ok(RawJson<SummaryPage>),
}
