//! `GET /api/v2/sales/export`: the filtered sales as CSV, JSON or NDJSON,
//! streamed in constant memory, resumable by key, with live progress.
//!
//! How it works:
//!
//! * **Postgres formats every row.** The export is one
//!   `COPY (SELECT ...) TO STDOUT` on a pooled read connection (`read_pool`),
//!   read with sqlx's `copy_out_raw` as a stream of CopyData messages, one per
//!   row. CSV is Postgres' own RFC 4180 writer (quoting of commas, quotes and
//!   newlines); JSON and NDJSON rows are built in SQL as JSON text and copied
//!   with a quote and delimiter (0x01, 0x02) that JSON text never contains, so
//!   COPY passes each row through untouched. The server only frames rows
//!   (CRLF line ends for CSV, `[`, `,` and `]` for a JSON array), coalesces
//!   them into 64 KiB chunks, compresses on the fly (zstd or gzip, per
//!   `Accept-Encoding`) and hands the chunks to the response through a
//!   channel of four chunks. Backpressure reaches Postgres through the
//!   socket: memory does not grow with the size of the export.
//! * COPY takes no bind parameters, so filters are rendered as literals from
//!   already-typed values (numbers, and text through an escaped `E''`
//!   literal); no caller text reaches SQL any other way.
//! * The export runs in a `REPEATABLE READ, READ ONLY` transaction: the row
//!   count taken first (the `estimatedTotal` of progress events) and the COPY
//!   see the same snapshot. `statement_timeout` is lifted for the COPY only
//!   (`SET LOCAL`), so DB_QUERY_TIMEOUT does not cut long exports.
//! * **Resume**: rows come in key order (monthly: store id, year, month;
//!   daily: store id, date) and every row carries its key (`12:2024-03`,
//!   `12:2024-03-05`); `after=<key>` continues strictly after that key.
//! * **Cancellation**: the producer runs in its own task. When the client goes
//!   away the response body (the channel's receiver) is dropped; the producer
//!   notices (a failed send, or `closed()` while it waits on Postgres), cancels
//!   the backend's query with `pg_cancel_backend` from another connection and
//!   closes its connection instead of returning it to the pool, so no query,
//!   transaction or cursor outlives the request. A client that stops reading
//!   for EXPORT_STALL_TIMEOUT is treated the same way.
//! * **Progress**: `export-progress` events go through Postgres
//!   (`pg_notify('sales_ephemeral', ...)`, not stored) to whichever instance
//!   holds the user's WebSocket: at most two per second while running, plus a
//!   final one (`done: true`, with `status` completed, cancelled or failed).
//! * **Limits**: EXPORT_MAX_CONCURRENT exports per instance and
//!   EXPORT_MAX_PER_USER per user (429 with Retry-After beyond that); each
//!   export ends at EXPORT_MAX_DURATION, however slowly it is read (the body
//!   then ends with an error, never as a short file); the request rate
//!   limits apply as everywhere.

use super::error::{ApiError, ApiResult, ErrorBody};
use super::filters::{parse_projection, RawFilter, SalesFilter};
use super::middleware::{negotiate, Encoding, Streaming};
use super::security::BearerAuth;
use super::ApiTags;
use crate::auth::Principal;
use crate::state::AppState;
use bytes::Bytes;
use futures_util::StreamExt;
use poem::http::{header, HeaderValue};
use poem::{IntoResponse, Request, Response};
use poem_openapi::param::Query;
use poem_openapi::registry::{
    MetaHeader, MetaMediaType, MetaResponse, MetaResponses, MetaSchema, MetaSchemaRef, Registry,
};
use poem_openapi::types::Type;
use poem_openapi::{ApiResponse, Enum, OpenApi};
use sales_core::projection::{Projection, SALES_DOC};
use sales_core::sql::{push_sales_doc, Literals, SqlWriter};
use serde_json::json;
use sqlx::pool::PoolConnection;
use sqlx::{Executor, PgPool, Postgres};
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

/// Rows are coalesced into chunks of about this size before they are sent.
pub const CHUNK: usize = 64 * 1024;
/// Chunks buffered between the producer and the response.
pub const QUEUE: usize = 4;
/// A client that reads nothing for this long is dropped like a disconnect.
pub const EXPORT_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Progress events are sent at most this often (plus the final one).
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
/// Retry-After when EXPORT_MAX_CONCURRENT exports are running.
pub const BUSY_RETRY_AFTER: u64 = 5;
use crate::events::EPHEMERAL_CHANNEL;

pub struct ExportApi {
    pub state: Arc<AppState>,
    slots: Arc<Semaphore>,
    per_user: Arc<std::sync::Mutex<std::collections::HashMap<i64, usize>>>,
}

impl ExportApi {
    pub fn new(state: Arc<AppState>) -> Self {
        let slots = Arc::new(Semaphore::new(state.config.export_max_concurrent));
        Self {
            state,
            slots,
            per_user: Default::default(),
        }
    }

    /// One of the user's EXPORT_MAX_PER_USER slots, so that one user
    /// cannot hold every slot of the instance.
    fn user_slot(&self, user: i64) -> Option<UserSlot> {
        let mut map = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(user).or_insert(0);
        if *n >= self.state.config.export_max_per_user {
            return None;
        }
        *n += 1;
        Some(UserSlot {
            user,
            map: self.per_user.clone(),
        })
    }
}

/// Released when the export ends, however it ends.
struct UserSlot {
    user: i64,
    map: Arc<std::sync::Mutex<std::collections::HashMap<i64, usize>>>,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.user);
            }
        }
    }
}

#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[oai(rename_all = "lowercase")]
pub enum ExportFormat {
    /// RFC 4180 CSV with a header row, CRLF line ends, UTF-8.
    Csv,
    /// One JSON array of row objects.
    Json,
    /// One JSON object per line.
    Ndjson,
}

impl ExportFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            ExportFormat::Csv => "text/csv; charset=utf-8",
            ExportFormat::Json => "application/json",
            ExportFormat::Ndjson => "application/x-ndjson",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            ExportFormat::Csv => "csv",
            ExportFormat::Json => "json",
            ExportFormat::Ndjson => "ndjson",
        }
    }

    fn name(self) -> &'static str {
        self.extension()
    }
}

#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[oai(rename_all = "lowercase")]
pub enum ExportShape {
    /// One row per store-month, a column per day.
    Monthly,
    /// One row per store-day.
    Daily,
}

impl ExportShape {
    fn name(self) -> &'static str {
        match self {
            ExportShape::Monthly => "monthly",
            ExportShape::Daily => "daily",
        }
    }
}

/// The resume key of a row: `store:YYYY-MM` (monthly) or `store:YYYY-MM-DD` (daily).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RowKey {
    pub store: i64,
    pub year: i32,
    pub month: i32,
    pub day: Option<u32>,
}

impl RowKey {
    pub fn parse(raw: &str, shape: ExportShape) -> Result<Self, String> {
        let example = match shape {
            ExportShape::Monthly => "12:2024-03",
            ExportShape::Daily => "12:2024-03-05",
        };
        let bad = || {
            format!(
                "{raw:?} is not a {} row key like {example} (the `key` of the last row you have)",
                shape.name()
            )
        };
        let (store, date) = raw.trim().split_once(':').ok_or_else(bad)?;
        let digits = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit());
        let store: i64 = store
            .parse()
            .ok()
            .filter(|s| *s > 0 && store.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(bad)?;
        let parts: Vec<&str> = date.split('-').collect();
        let want = if shape == ExportShape::Daily { 3 } else { 2 };
        if parts.len() != want || !digits(parts[0], 4) || !digits(parts[1], 2) {
            return Err(bad());
        }
        let year: i32 = parts[0].parse().map_err(|_| bad())?;
        let month: i32 = parts[1].parse().map_err(|_| bad())?;
        if !(2000..=2100).contains(&year) || !(1..=12).contains(&month) {
            return Err(bad());
        }
        let day = match parts.get(2) {
            Some(d) if digits(d, 2) => {
                let d: u32 = d.parse().map_err(|_| bad())?;
                if !(1..=31).contains(&d) {
                    return Err(bad());
                }
                Some(d)
            }
            Some(_) => return Err(bad()),
            None => None,
        };
        Ok(Self {
            store,
            year,
            month,
            day,
        })
    }
}

impl std::fmt::Display for RowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}-{:02}", self.store, self.year, self.month)?;
        if let Some(d) = self.day {
            write!(f, "-{d:02}")?;
        }
        Ok(())
    }
}

/// The filter and the caller's scope as SQL conditions on `m` and `s`, with
/// literal values (COPY cannot take bind parameters).
pub fn where_sql(f: &SalesFilter, who: &Principal) -> String {
    let mut w = Literals(String::from("true"));
    f.push_where(&mut w, who);
    w.0
}

const FROM_MONTHLY: &str = "FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id";
const FROM_DAILY: &str = "FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id \
     CROSS JOIN LATERAL jsonb_each(m.daily_data) AS e(k, v)";
const MONTH_KEY: &str = "m.store_id || ':' || m.year || '-' || lpad(m.month::text, 2, '0')";
const DATE: &str = "m.year || '-' || lpad(m.month::text, 2, '0') || '-' || lpad(e.k, 2, '0')";
const DAY_KEY: &str =
    "m.store_id || ':' || m.year || '-' || lpad(m.month::text, 2, '0') || '-' || lpad(e.k, 2, '0')";

/// Columns of `shape=daily` CSV, in order.
pub const DAILY_CSV_COLUMNS: &[&str] = &[
    "key",
    "store_id",
    "store_code",
    "store_name",
    "date",
    "sales",
    "customers",
    "transactions",
];

/// Columns of `shape=monthly` CSV before the day columns `d1_sales,
/// d1_customers, ..., d31_sales, d31_customers`.
pub const MONTHLY_CSV_COLUMNS: &[&str] = &[
    "key",
    "store_id",
    "store_code",
    "store_name",
    "region",
    "year",
    "month",
    "total_sales",
    "total_customers",
    "days_reported",
];

/// What one export runs: the estimate and the COPY statement.
#[derive(Debug, Clone)]
pub struct ExportSql {
    /// `SELECT <rows the COPY will produce>` (bigint).
    pub count: String,
    /// `COPY (...) TO STDOUT ...`.
    pub copy: String,
    /// The row query inside the COPY (for benchmarks against `psql \copy`).
    pub select: String,
}

pub struct ExportSpec<'a> {
    pub format: ExportFormat,
    pub shape: ExportShape,
    pub filter: &'a SalesFilter,
    pub who: &'a Principal,
    pub after: Option<RowKey>,
    pub projection: Option<&'a Projection>,
    pub header: bool,
}

/// The document expression for monthly JSON rows, with literals.
fn doc_expr(p: Option<&Projection>) -> String {
    let mut w = Literals::default();
    match p {
        Some(p) => push_sales_doc(&mut w, p),
        None => w.sql("sales.sales_doc(m)"),
    }
    w.0
}

pub fn build_sql(spec: &ExportSpec<'_>) -> ExportSql {
    let mut w = where_sql(spec.filter, spec.who);
    let after = spec.after;
    match spec.shape {
        ExportShape::Monthly => {
            if let Some(k) = after {
                let _ = write!(
                    w,
                    " AND (m.store_id, m.year, m.month) > ({}, {}, {})",
                    k.store, k.year, k.month
                );
            }
            let count = format!("SELECT count(*)::bigint {FROM_MONTHLY} WHERE {w}");
            let cols = match spec.format {
                ExportFormat::Csv => {
                    let mut c = format!(
                        "{MONTH_KEY} AS key, m.store_id AS store_id, s.code AS store_code, \
                         s.name AS store_name, s.region AS region, m.year AS year, m.month AS month, \
                         m.total_sales AS total_sales, m.total_customers AS total_customers, \
                         m.days_reported AS days_reported"
                    );
                    for d in 1..=31 {
                        let _ = write!(
                            c,
                            ", m.daily_data->'{d}'->>'sales' AS d{d}_sales, \
                             m.daily_data->'{d}'->>'customers' AS d{d}_customers"
                        );
                    }
                    c
                }
                // The key goes first; an empty projection (`{}`) still gets it.
                ExportFormat::Json | ExportFormat::Ndjson => format!(
                    "'{{\"key\":\"' || {MONTH_KEY} || '\"' || \
                     coalesce(nullif(',' || substr(({})::text, 2), ',}}'), '}}')",
                    doc_expr(spec.projection)
                ),
            };
            let select = format!(
                "SELECT {cols} {FROM_MONTHLY} WHERE {w} ORDER BY m.store_id, m.year, m.month"
            );
            ExportSql {
                count,
                copy: copy_statement(&select, spec.format, spec.header),
                select,
            }
        }
        ExportShape::Daily => {
            let count = match after {
                None => format!(
                    "SELECT coalesce(sum(m.days_reported), 0)::bigint {FROM_MONTHLY} WHERE {w}"
                ),
                Some(k) => format!(
                    "SELECT coalesce(sum(CASE WHEN (m.store_id, m.year, m.month) = ({s}, {y}, {mo}) \
                     THEN (SELECT count(*) FROM jsonb_object_keys(m.daily_data) AS d(k) WHERE d.k::int > {d}) \
                     ELSE m.days_reported END), 0)::bigint {FROM_MONTHLY} \
                     WHERE {w} AND (m.store_id, m.year, m.month) >= ({s}, {y}, {mo})",
                    s = k.store,
                    y = k.year,
                    mo = k.month,
                    d = k.day.unwrap_or(0)
                ),
            };
            if let Some(k) = after {
                let _ = write!(
                    w,
                    " AND (m.store_id, m.year, m.month) >= ({s}, {y}, {mo}) \
                     AND ((m.store_id, m.year, m.month) > ({s}, {y}, {mo}) OR e.k::int > {d})",
                    s = k.store,
                    y = k.year,
                    mo = k.month,
                    d = k.day.unwrap_or(0)
                );
            }
            let cols = match spec.format {
                ExportFormat::Csv => format!(
                    "{DAY_KEY} AS key, m.store_id AS store_id, s.code AS store_code, \
                     s.name AS store_name, {DATE} AS date, e.v->>'sales' AS sales, \
                     e.v->>'customers' AS customers, e.v->>'transactions' AS transactions"
                ),
                ExportFormat::Json | ExportFormat::Ndjson => format!(
                    "'{{\"key\":\"' || {DAY_KEY} || '\",\"storeId\":' || m.store_id || \
                     ',\"storeCode\":' || to_json(s.code)::text || \
                     ',\"storeName\":' || to_json(s.name)::text || \
                     ',\"date\":\"' || {DATE} || \
                     '\",\"sales\":' || coalesce((e.v->'sales')::text, 'null') || \
                     ',\"customers\":' || coalesce((e.v->'customers')::text, 'null') || \
                     ',\"transactions\":' || coalesce((e.v->'transactions')::text, 'null') || '}}'"
                ),
            };
            let select = format!(
                "SELECT {cols} {FROM_DAILY} WHERE {w} ORDER BY m.store_id, m.year, m.month, e.k::int"
            );
            ExportSql {
                count,
                copy: copy_statement(&select, spec.format, spec.header),
                select,
            }
        }
    }
}

fn copy_statement(select: &str, format: ExportFormat, header: bool) -> String {
    match format {
        ExportFormat::Csv => {
            format!("COPY ({select}) TO STDOUT WITH (FORMAT csv, HEADER {header})")
        }
        // JSON text never holds a raw control character, so with these as
        // quote and delimiter COPY never quotes: each row arrives as-is.
        ExportFormat::Json | ExportFormat::Ndjson => format!(
            "COPY ({select}) TO STDOUT WITH (FORMAT csv, DELIMITER E'\\x02', QUOTE E'\\x01')"
        ),
    }
}

/// `sales[-store12]-2024-01_2024-06-daily.csv`.
pub fn file_name(f: &SalesFilter, format: ExportFormat, shape: ExportShape) -> String {
    let mut name = String::from("sales");
    if let Some(s) = f.single_store() {
        let _ = write!(name, "-store{s}");
    }
    let ym = |(y, m): (i32, i32)| format!("{y}-{m:02}");
    let period = match (f.year, f.month, f.from, f.to) {
        (Some(y), Some(m), _, _) => ym((y, m)),
        (Some(y), None, _, _) => y.to_string(),
        (None, _, Some(a), Some(b)) if a == b => ym(a),
        (None, _, Some(a), Some(b)) => format!("{}_{}", ym(a), ym(b)),
        (None, _, Some(a), None) => format!("{}_latest", ym(a)),
        (None, _, None, Some(b)) => format!("upto_{}", ym(b)),
        (None, Some(m), None, None) => format!("month{m:02}"),
        (None, None, None, None) => "all".to_string(),
    };
    let _ = write!(name, "-{period}-{}.{}", shape.name(), format.extension());
    name
}

/// A streamed export body, as the OpenAPI document describes it.
pub struct ExportResponse {
    body: poem::Body,
    format: ExportFormat,
    encoding: Encoding,
    file_name: String,
    export_id: String,
    estimated_total: u64,
}

impl IntoResponse for ExportResponse {
    fn into_response(self) -> Response {
        let mut resp = Response::builder()
            .content_type(self.format.content_type())
            .header(
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}\"", self.file_name),
            )
            .header(header::CACHE_CONTROL, "no-store")
            .header("x-export-id", self.export_id.as_str())
            .header("x-export-estimated-rows", self.estimated_total.to_string())
            .body(self.body);
        if self.encoding != Encoding::Identity {
            resp.headers_mut().insert(
                header::CONTENT_ENCODING,
                HeaderValue::from_static(self.encoding.token()),
            );
        }
        // Not buffered for an ETag, not compressed again by the middleware.
        resp.extensions_mut().insert(Streaming);
        resp
    }
}

impl ApiResponse for ExportResponse {
    fn meta() -> MetaResponses {
        let text = || {
            MetaSchemaRef::Inline(Box::new(MetaSchema {
                format: Some("binary"),
                ..MetaSchema::new("string")
            }))
        };
        let header = |name: &str, description: &str| MetaHeader {
            name: name.to_string(),
            description: Some(description.to_string()),
            required: false,
            deprecated: false,
            schema: String::schema_ref(),
        };
        MetaResponses {
            responses: vec![MetaResponse {
                description: "The export, streamed (chunked; compressed when Accept-Encoding allows zstd or gzip).",
                status: Some(200),
                status_range: None,
                content: vec![
                    MetaMediaType {
                        content_type: "text/csv; charset=utf-8",
                        schema: text(),
                    },
                    MetaMediaType {
                        content_type: "application/json",
                        schema: MetaSchemaRef::Inline(Box::new(MetaSchema {
                            items: Some(Box::new(MetaSchemaRef::Inline(Box::new(
                                MetaSchema::new("object"),
                            )))),
                            ..MetaSchema::new("array")
                        })),
                    },
                    MetaMediaType {
                        content_type: "application/x-ndjson",
                        schema: text(),
                    },
                ],
                headers: vec![
                    header(
                        "Content-Disposition",
                        "attachment; filename=\"sales-2024-01_2024-06-daily.csv\"",
                    ),
                    header("Content-Encoding", "zstd or gzip when negotiated"),
                    header(
                        "X-Export-Id",
                        "Identifies this export in export-progress events",
                    ),
                    header(
                        "X-Export-Estimated-Rows",
                        "Rows the export will hold (counted in the export's snapshot)",
                    ),
                ],
            }],
        }
    }

    fn register(_registry: &mut Registry) {}
}

#[allow(clippy::too_many_arguments)]
#[OpenApi(tag = "ApiTags::Sales")]
impl ExportApi {
    /// Export sales as CSV, JSON or NDJSON, streamed. Admins and managers only (staff: 403).
    ///
    /// Same filters and scope as `GET /api/v2/sales` (a store outside your scope is 403).
    /// `shape=monthly` (default): one row per store-month; CSV columns `key, store_id, store_code,
    /// store_name, region, year, month, total_sales, total_customers, days_reported`, then
    /// `d1_sales, d1_customers, ..., d31_sales, d31_customers` (empty where a day is not
    /// reported); JSON/NDJSON rows are the sales documents of `GET /api/v2/sales` (with
    /// `fields`/`exclude`) plus `key`. `shape=daily`: one row per reported store-day, columns
    /// `key, store_id, store_code, store_name, date, sales, customers, transactions` (JSON:
    /// `key, storeId, storeCode, storeName, date, sales, customers, transactions`).
    ///
    /// Rows are ordered by key: `storeId:YYYY-MM` (monthly) or `storeId:YYYY-MM-DD` (daily),
    /// and every row carries it. After an interrupted download, repeat the request with
    /// `after=<key of the last row you have>`: the export continues with the next row.
    /// Progress: the caller's WebSocket receives `export-progress` events with the
    /// `X-Export-Id` of the response. At most EXPORT_MAX_CONCURRENT exports run per instance
    /// (429 with Retry-After beyond that).
    #[oai(path = "/api/v2/sales/export", method = "get")]
    async fn export(
        &self,
        req: &Request,
        auth: BearerAuth,
        /// `csv` (default), `json` or `ndjson`.
        format: Query<Option<ExportFormat>>,
        /// `monthly` (default) or `daily`.
        shape: Query<Option<ExportShape>>,
        /// One store id or several, comma-separated.
        #[oai(name = "storeId")]
        store_id: Query<Option<String>>,
        region: Query<Option<String>>,
        #[oai(validator(minimum(value = "2000"), maximum(value = "2100")))] year: Query<
            Option<i32>,
        >,
        #[oai(validator(minimum(value = "1"), maximum(value = "12")))] month: Query<Option<i32>>,
        /// First month, `YYYY-MM`.
        from: Query<Option<String>>,
        /// Last month, `YYYY-MM` (inclusive).
        to: Query<Option<String>>,
        #[oai(name = "minTotalSales", validator(minimum(value = "0")))] min_total_sales: Query<
            Option<f64>,
        >,
        #[oai(name = "maxTotalSales", validator(minimum(value = "0")))] max_total_sales: Query<
            Option<f64>,
        >,
        /// Paths to include (monthly JSON/NDJSON only), as in `GET /api/v2/sales`.
        fields: Query<Option<String>>,
        /// Paths to leave out (monthly JSON/NDJSON only).
        exclude: Query<Option<String>>,
        /// Continue strictly after this row key (`12:2024-03`, or `12:2024-03-05` for daily).
        after: Query<Option<String>>,
        /// CSV header row (default true; false suits appending a resumed part).
        header: Query<Option<bool>>,
    ) -> ApiResult<ExportResponse> {
        if !auth.0.can_export() {
            return Err(ApiError::forbidden(
                "exports need the admin or manager role",
            ));
        }
        let format = format.0.unwrap_or(ExportFormat::Csv);
        let shape = shape.0.unwrap_or(ExportShape::Monthly);
        if region
            .0
            .as_deref()
            .is_some_and(|r| r.chars().any(char::is_control))
        {
            return Err(ApiError::bad_param(
                "region",
                "must not contain control characters",
            ));
        }
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
        let projected = fields.0.is_some() || exclude.0.is_some();
        let projection = if projected {
            if shape != ExportShape::Monthly || format == ExportFormat::Csv {
                let param = if fields.0.is_some() {
                    "fields"
                } else {
                    "exclude"
                };
                return Err(ApiError::bad_param(
                    param,
                    "applies to shape=monthly with format=json or ndjson; CSV and daily rows have fixed columns",
                ));
            }
            Some(parse_projection(
                &SALES_DOC,
                fields.0.as_deref(),
                exclude.0.as_deref(),
            )?)
        } else {
            None
        };
        let after = after
            .0
            .as_deref()
            .filter(|a| !a.trim().is_empty())
            .map(|a| RowKey::parse(a, shape))
            .transpose()
            .map_err(|e| ApiError::bad_param("after", e))?;
        let encoding = negotiate(
            req.headers()
                .get(header::ACCEPT_ENCODING)
                .and_then(|v| v.to_str().ok()),
            &[Encoding::Zstd, Encoding::Gzip],
        );
        let user_slot = self.user_slot(auth.0.user_id).ok_or_else(|| {
            ApiError::TooManyRequests(
                ErrorBody::new(
                    "rate_limited",
                    format!(
                        "you already run {} export(s) (EXPORT_MAX_PER_USER); retry after {BUSY_RETRY_AFTER} s",
                        self.state.config.export_max_per_user
                    ),
                    Some(json!({"limit": "EXPORT_MAX_PER_USER"})),
                ),
                BUSY_RETRY_AFTER,
            )
        })?;
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            ApiError::TooManyRequests(
                ErrorBody::new(
                    "rate_limited",
                    format!(
                        "{} exports are already running on this instance (EXPORT_MAX_CONCURRENT); retry after {BUSY_RETRY_AFTER} s",
                        self.state.config.export_max_concurrent
                    ),
                    Some(json!({"limit": "EXPORT_MAX_CONCURRENT"})),
                ),
                BUSY_RETRY_AFTER,
            )
        })?;
        let csv_header = header.0.unwrap_or(true);
        let sql = build_sql(&ExportSpec {
            format,
            shape,
            filter: &filter,
            who: &auth.0,
            after,
            projection: projection.as_ref(),
            header: csv_header,
        });
        let export_id = uuid::Uuid::new_v4().simple().to_string();
        let job = Job {
            sql,
            format,
            shape,
            encoding,
            level: self.state.config.compression_level,
            header: csv_header,
            state: self.state.clone(),
            user_id: auth.0.user_id,
            export_id: export_id.clone(),
            // HTTP/2 ends a failed stream with RST_STREAM on its own; an
            // HTTP/1.1 connection must be broken (see `crate::listener`).
            break_on_failure: (req.version() < poem::http::Version::HTTP_2)
                .then(|| (req.local_addr().clone(), req.remote_addr().clone())),
        };
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(QUEUE);
        let (started_tx, started_rx) = oneshot::channel();
        let slots = Slots {
            _permit: permit,
            _user: user_slot,
        };
        tokio::spawn(run(job, slots, tx, started_tx).instrument(tracing::Span::current()));
        let estimated_total = match started_rx.await {
            Ok(Ok(total)) => total,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(ApiError::internal("export task ended before starting")),
        };
        let body = poem::Body::from_bytes_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
        Ok(ExportResponse {
            body,
            format,
            encoding,
            file_name: file_name(&filter, format, shape),
            export_id,
            estimated_total,
        })
    }
}

struct Job {
    sql: ExportSql,
    format: ExportFormat,
    shape: ExportShape,
    encoding: Encoding,
    level: u32,
    header: bool,
    state: Arc<AppState>,
    user_id: i64,
    export_id: String,
    /// The HTTP/1.1 connection to break if the export fails mid-stream.
    break_on_failure: Option<(poem::web::LocalAddr, poem::web::RemoteAddr)>,
}

/// Why an export stopped early.
enum Stop {
    /// The client went away (or stopped reading for EXPORT_STALL_TIMEOUT).
    Cancelled(&'static str),
    Db(sqlx::Error),
    Io(io::Error),
    /// EXPORT_MAX_DURATION reached (a client reading just fast enough to
    /// escape the stall timeout would otherwise hold a slot and a snapshot
    /// for as long as it likes).
    Expired,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Cancelled(why) => f.write_str(why),
            Stop::Db(e) => write!(f, "database: {e}"),
            Stop::Io(e) => write!(f, "encoding: {e}"),
            Stop::Expired => f.write_str("EXPORT_MAX_DURATION reached"),
        }
    }
}

impl From<sqlx::Error> for Stop {
    fn from(e: sqlx::Error) -> Self {
        Stop::Db(e)
    }
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Stop::Io(e)
    }
}

type Started = oneshot::Sender<Result<u64, ApiError>>;

/// The export task: owns the connection, streams, and always leaves the
/// connection clean (committed and pooled, or cancelled and closed).
/// Held for as long as the export runs (EXPORT_MAX_CONCURRENT,
/// EXPORT_MAX_PER_USER), and released before the body ends: a client that
/// has read the whole export may start the next one at once.
struct Slots {
    _permit: OwnedSemaphorePermit,
    _user: UserSlot,
}

async fn run(job: Job, slots: Slots, tx: mpsc::Sender<io::Result<Bytes>>, started: Started) {
    let mut slots = Some(slots);
    let begun = Instant::now();
    metrics::gauge!("exports_running").increment(1.0);
    let _running = scopeguard(|| metrics::gauge!("exports_running").decrement(1.0));
    let (progress_tx, progress_rx) = watch::channel(Snapshot::default());
    let notifier = tokio::spawn(
        notify_progress(
            job.state.pool.clone(),
            job.user_id,
            job.export_id.clone(),
            job.format,
            job.shape,
            progress_rx,
        )
        .instrument(tracing::Span::current()),
    );
    // A replica when one is configured and has caught up, else the primary.
    let mut conn = match job.state.read_conn().await {
        Ok(c) => c,
        Err(e) => {
            let _ = started.send(Err(ApiError::from(e)));
            progress_tx.send_modify(|s| s.state = RunState::Failed("database unavailable".into()));
            drop(progress_tx);
            let _ = notifier.await;
            return;
        }
    };
    let mut pid: Option<Backend> = None;
    let mut started = Some(started);
    let mut bytes_out: u64 = 0;
    let outcome = {
        let work = stream(
            &mut conn,
            &job,
            &tx,
            &mut started,
            &mut pid,
            &progress_tx,
            &mut bytes_out,
        );
        tokio::select! {
            r = work => r,
            _ = tx.closed() => Err(Stop::Cancelled("client disconnected")),
            _ = tokio::time::sleep(job.state.config.export_max_duration) => Err(Stop::Expired),
        }
    };
    let rows = progress_tx.borrow().rows;
    let status = match &outcome {
        Ok(()) => "completed",
        Err(Stop::Cancelled(_)) => "cancelled",
        Err(_) => "failed",
    };
    metrics::counter!("exports_total", "format" => job.format.name(), "shape" => job.shape.name(), "status" => status)
        .increment(1);
    metrics::counter!("export_rows_total", "format" => job.format.name()).increment(rows);
    metrics::counter!("export_bytes_total", "format" => job.format.name()).increment(bytes_out);
    match outcome {
        Ok(()) => {
            // Committed: the connection goes back to the pool.
            drop(conn);
            progress_tx.send_modify(|s| s.state = RunState::Completed);
            tracing::info!(
                export_id = %job.export_id, rows, bytes = bytes_out,
                elapsed_ms = begun.elapsed().as_millis() as u64, "export completed"
            );
        }
        Err(stop) => {
            discard(conn, pid, &job.state).await;
            let state = match &stop {
                Stop::Cancelled(why) => {
                    tracing::info!(export_id = %job.export_id, rows, reason = why, "export cancelled");
                    RunState::Cancelled
                }
                Stop::Expired => {
                    tracing::warn!(export_id = %job.export_id, rows, "export stopped at EXPORT_MAX_DURATION");
                    RunState::Failed("the export took longer than EXPORT_MAX_DURATION".into())
                }
                other => {
                    tracing::error!(export_id = %job.export_id, rows, error = %other, "export failed");
                    RunState::Failed("the export failed; see the server log".into())
                }
            };
            match started.take() {
                // Nothing sent yet: the handler answers with an error status.
                Some(s) => {
                    let err = match stop {
                        Stop::Db(e) => ApiError::from(e),
                        Stop::Expired => ApiError::unavailable(
                            "the export did not start within EXPORT_MAX_DURATION",
                        ),
                        other => ApiError::internal(other),
                    };
                    let _ = s.send(Err(err));
                }
                // Mid-stream: end the body with an error, so the client sees
                // a broken transfer rather than a short file.
                None => {
                    // The slots go now: a client that does not read must
                    // not hold them while the abort waits for room.
                    drop(slots.take());
                    if !matches!(stop, Stop::Cancelled(_)) {
                        // Nothing more reaches the client, not even the
                        // last chunk: the transfer is cut, never short.
                        if let Some((local, remote)) = &job.break_on_failure {
                            crate::listener::break_connection(local, remote);
                        }
                        let abort = tx.send(Err(io::Error::other("export failed")));
                        let _ = tokio::time::timeout(EXPORT_STALL_TIMEOUT, abort).await;
                    }
                }
            }
            progress_tx.send_modify(|s| s.state = state);
        }
    }
    drop(progress_tx);
    drop(slots.take());
    // The response ends now; the last progress NOTIFY follows on its own.
    drop(tx);
    let _ = notifier.await;
}

/// Runs `f` when dropped (also when the task panics).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// The server process behind a connection: its pid and start time, which
/// together name it unambiguously on whichever server (primary or replica)
/// it runs.
type Backend = (i32, chrono::DateTime<chrono::Utc>);

/// A connection whose COPY may still be running: cancel the query from
/// another connection and close this one (never back to the pool). The
/// session also has `client_connection_check_interval` set, so the server
/// stops on its own once the socket is gone, even mid-sort.
async fn discard(conn: PoolConnection<Postgres>, backend: Option<Backend>, state: &AppState) {
    let raw = conn.detach();
    if let Some((pid, started)) = backend {
        // The connection came from the replica or the primary: ask both; the
        // start time makes sure only this session is cancelled.
        let mut pools = vec![state.pool.clone()];
        if state.config.database_replica_url.is_some() {
            pools.push(state.read_pool());
        }
        for pool in pools {
            let cancel = sqlx::query(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE pid = $1 AND backend_start = $2",
            )
            .bind(pid)
            .bind(started)
            .execute(&pool);
            if let Err(e) = tokio::time::timeout(Duration::from_secs(5), cancel)
                .await
                .unwrap_or(Err(sqlx::Error::PoolTimedOut))
            {
                tracing::warn!(pid, error = %e, "could not cancel the export query; closing its connection");
            }
        }
    }
    // Closing the session ends (rolls back) its transaction.
    let _ = tokio::time::timeout(Duration::from_secs(5), sqlx::Connection::close(raw)).await;
}

async fn send(
    tx: &mpsc::Sender<io::Result<Bytes>>,
    data: Bytes,
    bytes_out: &mut u64,
) -> Result<(), Stop> {
    if data.is_empty() {
        return Ok(());
    }
    let n = data.len() as u64;
    match tokio::time::timeout(EXPORT_STALL_TIMEOUT, tx.send(Ok(data))).await {
        Ok(Ok(())) => {
            *bytes_out += n;
            Ok(())
        }
        Ok(Err(_)) => Err(Stop::Cancelled("client disconnected")),
        Err(_) => Err(Stop::Cancelled("client stopped reading")),
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream(
    conn: &mut PoolConnection<Postgres>,
    job: &Job,
    tx: &mpsc::Sender<io::Result<Bytes>>,
    started: &mut Option<Started>,
    pid: &mut Option<Backend>,
    progress: &watch::Sender<Snapshot>,
    bytes_out: &mut u64,
) -> Result<(), Stop> {
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await?;
    let (backend, backend_start, total): (i32, chrono::DateTime<chrono::Utc>, i64) =
        sqlx::query_as(&format!(
            "SELECT pg_backend_pid(), \
             (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()), ({})",
            job.sql.count
        ))
        .persistent(false)
        .fetch_one(&mut **conn)
        .await?;
    *pid = Some((backend, backend_start));
    let total = total.max(0) as u64;
    // The COPY may run longer than DB_QUERY_TIMEOUT; the transaction-local
    // settings end with it.
    conn.execute(
        "SET LOCAL statement_timeout = 0; \
         SET LOCAL idle_in_transaction_session_timeout = '60s'; \
         SET LOCAL client_connection_check_interval = '1s'",
    )
    .await?;
    let mut rows = conn.copy_out_raw(&job.sql.copy).await?;
    // The query is planned and running: answer 200 and start the body.
    match started.take() {
        Some(s) => {
            if s.send(Ok(total)).is_err() {
                return Err(Stop::Cancelled("client disconnected"));
            }
        }
        None => return Err(Stop::Cancelled("client disconnected")),
    }
    progress.send_modify(|s| s.total = Some(total));

    let mut enc = Encoder::new(job.encoding, job.level)?;
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK + 4096);
    let mut count: u64 = 0;
    let mut header_pending = job.format == ExportFormat::Csv && job.header;
    if job.format == ExportFormat::Json {
        buf.extend_from_slice(b"[");
    }
    while let Some(msg) = rows.next().await {
        let msg = msg?;
        let line = msg.strip_suffix(b"\n").unwrap_or(&msg);
        match job.format {
            ExportFormat::Csv => {
                buf.extend_from_slice(line);
                buf.extend_from_slice(b"\r\n");
                if header_pending {
                    header_pending = false;
                } else {
                    count += 1;
                }
            }
            ExportFormat::Ndjson => {
                buf.extend_from_slice(line);
                buf.push(b'\n');
                count += 1;
            }
            ExportFormat::Json => {
                buf.extend_from_slice(if count == 0 { b"\n" } else { b",\n" });
                buf.extend_from_slice(line);
                count += 1;
            }
        }
        if buf.len() >= CHUNK {
            let chunk = std::mem::replace(&mut buf, Vec::with_capacity(CHUNK + 4096));
            send(tx, enc.encode(chunk)?, bytes_out).await?;
            progress.send_modify(|s| s.rows = count);
        }
    }
    drop(rows);
    conn.execute("COMMIT").await?;
    if job.format == ExportFormat::Json {
        buf.extend_from_slice(if count == 0 { b"]\n" } else { b"\n]\n" });
    }
    let tail = enc.encode(buf)?;
    send(tx, tail, bytes_out).await?;
    send(tx, enc.finish()?, bytes_out).await?;
    progress.send_modify(|s| s.rows = count);
    Ok(())
}

/// On-the-fly compression of the chunk stream.
enum Encoder {
    Identity,
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
}

impl Encoder {
    fn new(enc: Encoding, level: u32) -> io::Result<Self> {
        Ok(match enc {
            Encoding::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(
                Vec::with_capacity(CHUNK),
                level.clamp(1, 19) as i32,
            )?),
            Encoding::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                Vec::with_capacity(CHUNK),
                flate2::Compression::new(level.clamp(1, 9)),
            )),
            Encoding::Identity | Encoding::Brotli => Encoder::Identity,
        })
    }

    /// Feeds a chunk; returns what is ready to send (possibly nothing yet).
    fn encode(&mut self, chunk: Vec<u8>) -> io::Result<Bytes> {
        match self {
            Encoder::Identity => Ok(Bytes::from(chunk)),
            Encoder::Zstd(e) => {
                e.write_all(&chunk)?;
                Ok(Bytes::from(std::mem::take(e.get_mut())))
            }
            Encoder::Gzip(e) => {
                e.write_all(&chunk)?;
                Ok(Bytes::from(std::mem::take(e.get_mut())))
            }
        }
    }

    fn finish(self) -> io::Result<Bytes> {
        match self {
            Encoder::Identity => Ok(Bytes::new()),
            Encoder::Zstd(e) => e.finish().map(Bytes::from),
            Encoder::Gzip(e) => e.finish().map(Bytes::from),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
enum RunState {
    #[default]
    Running,
    Completed,
    Cancelled,
    Failed(String),
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Snapshot {
    rows: u64,
    total: Option<u64>,
    state: RunState,
}

impl Snapshot {
    fn percent(&self) -> f64 {
        if self.state == RunState::Completed {
            return 100.0;
        }
        match self.total {
            Some(t) if t > 0 => ((self.rows as f64 * 1000.0 / t as f64).round() / 10.0).min(100.0),
            _ => 0.0,
        }
    }
}

/// The `export-progress` message relayed to the user's WebSocket.
fn progress_payload(
    user_id: i64,
    export_id: &str,
    format: ExportFormat,
    shape: ExportShape,
    s: &Snapshot,
) -> serde_json::Value {
    let (status, error) = match &s.state {
        RunState::Running => ("running", None),
        RunState::Completed => ("completed", None),
        RunState::Cancelled => ("cancelled", None),
        RunState::Failed(e) => ("failed", Some(e.clone())),
    };
    json!({
        "userId": user_id,
        "event": "export-progress",
        "data": {
            "exportId": export_id,
            "format": format.name(),
            "shape": shape.name(),
            "rowsSent": s.rows,
            "estimatedTotal": s.total,
            "percent": s.percent(),
            "done": s.state != RunState::Running,
            "status": status,
            "cancelled": s.state == RunState::Cancelled,
            "error": error,
        }
    })
}

/// Sends progress NOTIFYs: the latest snapshot at most every
/// PROGRESS_INTERVAL, and always the final one, in order, as soon as the
/// export ends (the wait between two updates never delays the last one).
async fn notify_progress(
    pool: PgPool,
    user_id: i64,
    export_id: String,
    format: ExportFormat,
    shape: ExportShape,
    mut rx: watch::Receiver<Snapshot>,
) {
    let mut last: Option<Snapshot> = None;
    // Whether a change has been seen but not sent yet (found while waiting
    // out the interval).
    let mut pending = false;
    loop {
        let closed = if pending {
            pending = false;
            rx.has_changed().is_err()
        } else {
            rx.changed().await.is_err()
        };
        let snap = rx.borrow_and_update().clone();
        if last.as_ref() != Some(&snap) && (snap.total.is_some() || snap.state != RunState::Running)
        {
            let payload = progress_payload(user_id, &export_id, format, shape, &snap).to_string();
            if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(EPHEMERAL_CHANNEL)
                .bind(&payload)
                .execute(&pool)
                .await
            {
                tracing::warn!(error = %e, "could not send export progress");
            }
            last = Some(snap.clone());
        }
        if closed || snap.state != RunState::Running {
            break;
        }
        // Wait out the interval, unless the export ends first.
        let interval = tokio::time::sleep(PROGRESS_INTERVAL);
        tokio::pin!(interval);
        loop {
            tokio::select! {
                _ = &mut interval => break,
                r = rx.changed() => {
                    if r.is_err() || rx.borrow().state != RunState::Running {
                        pending = true;
                        break;
                    }
                }
            }
        }
        if !pending {
            // Changes seen while waiting are still unsent.
            let now = rx.borrow();
            pending = now.state == RunState::Running && last.as_ref() != Some(&*now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    fn admin() -> Principal {
        Principal {
            user_id: 1,
            email: None,
            role: Role::Admin,
            stores: Default::default(),
            exp: None,
        }
    }

    #[test]
    fn keys() {
        let k = RowKey::parse("12:2024-03", ExportShape::Monthly).unwrap();
        assert_eq!(k.to_string(), "12:2024-03");
        let d = RowKey::parse("12:2024-03-05", ExportShape::Daily).unwrap();
        assert_eq!(d.to_string(), "12:2024-03-05");
        assert!(k < d);
        for bad in [
            "12:2024-3",
            "x:2024-03",
            "0:2024-03",
            "12-2024-03",
            "12:2024-13",
            "12:2024-03-05",
            "+1:2024-03",
        ] {
            assert!(RowKey::parse(bad, ExportShape::Monthly).is_err(), "{bad}");
        }
        for bad in ["12:2024-03", "12:2024-03-32", "12:2024-03-5"] {
            assert!(RowKey::parse(bad, ExportShape::Daily).is_err(), "{bad}");
        }
    }

    #[test]
    fn literals_are_escaped() {
        let f = SalesFilter {
            region: Some("a'); DROP TABLE x; --".into()),
            store_ids: Some(vec![1, 2]),
            min_total_sales: Some(0.5),
            from: Some((2024, 1)),
            ..Default::default()
        };
        let w = where_sql(&f, &admin());
        assert!(w.contains("s.region = E'a''); DROP TABLE x; --'"), "{w}");
        assert!(w.contains("ANY(ARRAY[1,2]::bigint[])"), "{w}");
        assert!(w.contains("m.total_sales >= '0.5'::numeric"), "{w}");
        assert!(w.contains("(m.year, m.month) >= (2024, 1)"), "{w}");
        let big = SalesFilter {
            max_total_sales: Some(1e21),
            ..Default::default()
        };
        assert!(where_sql(&big, &admin()).contains("<= '1000000000000000000000'::numeric"));
    }

    #[test]
    fn scope_is_applied() {
        let manager = Principal {
            user_id: 2,
            email: None,
            role: Role::Manager,
            stores: [3, 1].into_iter().collect(),
            exp: None,
        };
        assert!(where_sql(&SalesFilter::default(), &manager)
            .contains("m.store_id = ANY(ARRAY[1,3]::bigint[])"));
    }

    #[test]
    fn names() {
        let mut f = SalesFilter {
            from: Some((2024, 1)),
            to: Some((2024, 6)),
            ..Default::default()
        };
        assert_eq!(
            file_name(&f, ExportFormat::Csv, ExportShape::Daily),
            "sales-2024-01_2024-06-daily.csv"
        );
        f.store_ids = Some(vec![12]);
        assert_eq!(
            file_name(&f, ExportFormat::Ndjson, ExportShape::Monthly),
            "sales-store12-2024-01_2024-06-monthly.ndjson"
        );
        assert_eq!(
            file_name(
                &SalesFilter::default(),
                ExportFormat::Json,
                ExportShape::Daily
            ),
            "sales-all-daily.json"
        );
    }

    #[test]
    fn statements() {
        let f = SalesFilter::default();
        let who = admin();
        let s = build_sql(&ExportSpec {
            format: ExportFormat::Csv,
            shape: ExportShape::Daily,
            filter: &f,
            who: &who,
            after: Some(RowKey::parse("3:2024-02-10", ExportShape::Daily).unwrap()),
            projection: None,
            header: true,
        });
        assert!(s.copy.starts_with("COPY (SELECT "));
        assert!(s.copy.ends_with("WITH (FORMAT csv, HEADER true)"));
        assert!(s.copy.contains("e.k::int > 10"));
        assert!(s.count.contains("d.k::int > 10"));
        let j = build_sql(&ExportSpec {
            format: ExportFormat::Ndjson,
            shape: ExportShape::Monthly,
            filter: &f,
            who: &who,
            after: None,
            projection: None,
            header: true,
        });
        assert!(j.copy.contains("QUOTE E'\\x01'"), "{}", j.copy);
        assert!(j.copy.contains("sales.sales_doc(m)"));
    }

    #[test]
    fn percent() {
        let mut s = Snapshot {
            rows: 1,
            total: Some(3),
            state: RunState::Running,
        };
        assert_eq!(s.percent(), 33.3);
        s.rows = 5;
        assert_eq!(s.percent(), 100.0);
        s.total = Some(0);
        assert_eq!(s.percent(), 0.0);
        s.state = RunState::Completed;
        assert_eq!(s.percent(), 100.0);
    }

    #[test]
    fn encoders_round_trip() {
        let data = b"key,store_id\r\n1:2024-01,1\r\n".repeat(5000);
        for enc in [Encoding::Zstd, Encoding::Gzip, Encoding::Identity] {
            let mut e = Encoder::new(enc, 3).unwrap();
            let mut out = Vec::new();
            for part in data.chunks(CHUNK) {
                out.extend_from_slice(&e.encode(part.to_vec()).unwrap());
            }
            out.extend_from_slice(&e.finish().unwrap());
            let back = match enc {
                Encoding::Zstd => zstd::decode_all(&out[..]).unwrap(),
                Encoding::Gzip => {
                    let mut d = flate2::read::GzDecoder::new(&out[..]);
                    let mut v = Vec::new();
                    std::io::Read::read_to_end(&mut d, &mut v).unwrap();
                    v
                }
                _ => out,
            };
            assert_eq!(back, data, "{enc:?}");
        }
    }
}
