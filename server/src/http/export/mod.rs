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
//!   transaction or cursor outlives the request. Before the first byte (the
//!   row count, which may wait on a lock) the handler itself checks the
//!   client's socket every 200 ms (`listener::peer_gone`): over HTTP/1.1 the
//!   server would otherwise not see a hang-up until the handler returns. A client that stops reading
//!   for EXPORT_STALL_TIMEOUT is treated the same way, and its transfer is
//!   cut like a failed one (it is still connected, and must not take what
//!   it got for the whole file).
//! * **Progress**: `export-progress` events go through Postgres
//!   (`pg_notify('sales_ephemeral', ...)`, not stored) to whichever instance
//!   holds the user's WebSocket: at most two per second while running, plus a
//!   final one (`done: true`, with `status` completed, cancelled or failed).
//! * **Limits**: EXPORT_MAX_CONCURRENT exports per instance and
//!   EXPORT_MAX_PER_USER per user (429 with Retry-After beyond that); each
//!   export ends at EXPORT_MAX_DURATION, however slowly it is read (the body
//!   then ends with an error, never as a short file); the request rate
//!   limits apply as everywhere.

mod format;
mod progress;
mod pump;
mod response;
mod sql;

pub use format::{file_name, ExportFormat, ExportShape, RowKey};
pub use response::ExportResponse;
pub use sql::{
    build_sql, where_sql, ExportSpec, ExportSql, DAILY_CSV_COLUMNS, MONTHLY_CSV_COLUMNS,
};

use super::compress::{accept_encoding, negotiate, Encoding};
use super::error::{ApiError, ApiResult};
use super::filters::{parse_projection, RawFilter, SalesFilter, TotalParam};
use super::security::BearerAuth;
use super::ApiTags;
use crate::state::AppState;
use bytes::Bytes;
use poem::Request;
use poem_openapi::param::Query;
use poem_openapi::OpenApi;
use pump::{Job, Slots};
use sales_core::projection::SALES_DOC;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

/// Rows are coalesced into chunks of about this size before they are sent.
pub const CHUNK: usize = 64 * 1024;
/// Chunks buffered between the producer and the response.
pub const QUEUE: usize = 4;
/// A client that reads nothing for this long is dropped like a disconnect.
pub const EXPORT_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Progress events are sent at most this often (plus the final one).
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
/// Until its first byte, an export asks this often whether its client is
/// still connected.
const PEER_CHECK: Duration = Duration::from_millis(200);
pub struct ExportApi {
    pub state: Arc<AppState>,
    slots: crate::http::slots::Slots,
}

impl ExportApi {
    pub fn new(state: Arc<AppState>) -> Self {
        let slots = crate::http::slots::Slots::new(
            state.config.export_max_concurrent,
            state.config.export_max_per_user,
            crate::http::slots::Names {
                what: "exports",
                total: "EXPORT_MAX_CONCURRENT",
                per_user: "EXPORT_MAX_PER_USER",
            },
        );
        Self { state, slots }
    }
}

#[allow(clippy::too_many_arguments)]
#[OpenApi(tag = "ApiTags::Sales")]
impl ExportApi {
    /// Export sales as CSV, JSON or NDJSON, streamed. Admins and managers only (staff: 403).
    ///
    /// Same filters and scope as `GET /api/v2/sales` (a store outside your scope is 403).
    /// `shape=monthly` (default): one row per store-month; CSV columns `key, store_id, store_code,
    /// store_name, region, year, month, total_sales, total_customers, days_reported`, then
    /// `d1_sales, d1_customers, d1_transactions, ..., d31_transactions` (empty where a day
    /// does not give it; an import reads the file back as it was); JSON/NDJSON rows are the sales documents of `GET /api/v2/sales` (with
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
        #[oai(name = "minTotalSales")] min_total_sales: Query<Option<TotalParam>>,
        #[oai(name = "maxTotalSales")] max_total_sales: Query<Option<TotalParam>>,
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
        if header.0.is_some() && format != ExportFormat::Csv {
            return Err(ApiError::bad_param(
                "header",
                "applies to format=csv; JSON and NDJSON have no header row",
            ));
        }
        let after = after
            .0
            .as_deref()
            .map(|a| match a.trim() {
                // A client resuming from an unset variable would start
                // over and get every row twice.
                "" => Err(
                    "is empty; give the key of the last row you have, or leave after out"
                        .to_string(),
                ),
                a => RowKey::parse(a, shape),
            })
            .transpose()
            .map_err(|e| ApiError::bad_param("after", e))?;
        // Every `Accept-Encoding` line: they make one list (RFC 9110 5.3),
        // as for buffered responses.
        let encoding = negotiate(
            accept_encoding(req.headers()).as_deref(),
            &[Encoding::Zstd, Encoding::Gzip],
        );
        let csv_header = header.0.unwrap_or(true);
        let name = file_name(&filter, format, shape, after.as_ref());
        if req
            .extensions()
            .get::<crate::http::middleware::Head>()
            .is_some()
        {
            // The GET's status and headers, without running it: no slot,
            // no query, no progress events.
            return Ok(ExportResponse {
                body: poem::Body::empty(),
                format,
                encoding,
                file_name: name,
                export_id: None,
                estimated_total: None,
            });
        }
        let slot = self.slots.take_or_429(auth.0.user_id)?;
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
            principal: auth.0.clone(),
            export_id: export_id.clone(),
            // HTTP/2 ends a failed stream with RST_STREAM on its own; an
            // HTTP/1.1 connection must be broken (see `crate::listener`).
            break_on_failure: (req.version() < poem::http::Version::HTTP_2)
                .then(|| (req.local_addr().clone(), req.remote_addr().clone())),
            complete: Default::default(),
        };
        let complete = job.complete.clone();
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(QUEUE);
        let (started_tx, started_rx) = oneshot::channel();
        let slots = Slots { _slot: slot };
        // The task answers errors before the first byte: it carries the
        // request's id for them.
        let run = pump::run(job, slots, tx, started_tx).instrument(tracing::Span::current());
        match super::error::current_request_id() {
            Some(id) => tokio::spawn(super::error::REQUEST_ID.scope(id, run)),
            None => tokio::spawn(run),
        };
        // Until the first byte, a client that hangs up is noticed by asking
        // the kernel (HTTP/1.1: hyper reads nothing while the handler runs);
        // returning drops the body's receiver, which stops the export and
        // cancels its query.
        let (local, remote) = (req.local_addr().clone(), req.remote_addr().clone());
        let mut started_rx = started_rx;
        let estimated_total = loop {
            tokio::select! {
                r = &mut started_rx => break match r {
                    Ok(Ok(total)) => total,
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err(ApiError::internal("export task ended before starting")),
                },
                _ = tokio::time::sleep(PEER_CHECK) => {
                    if crate::listener::peer_gone(&local, &remote) {
                        tracing::info!(export_id = %export_id, "client hung up before the export started");
                        return Err(ApiError::BadRequest(super::error::ErrorBody::new(
                            "client_closed",
                            "the client closed the connection",
                            None,
                        )));
                    }
                }
            }
        };
        let body = pump::body(rx, complete);
        Ok(ExportResponse {
            body,
            format,
            encoding,
            file_name: name,
            export_id: Some(export_id),
            estimated_total: Some(estimated_total),
        })
    }
}
