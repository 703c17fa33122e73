//! `/api/v2/imports`: POS and export files in (streamed, up to
//! IMPORT_MAX_BYTES), their jobs' status, the caller's jobs, cancellation.
//! The same status serves asynchronous batches (`POST
//! /api/v2/sales/batch?async=true`). See `crate::jobs`.

use super::error::{ApiError, ApiResult};
use super::raw::RawJson;
use super::security::BearerAuth;
use super::ApiTags;
use crate::jobs::import::{self, ImportRequest};
use crate::jobs::parse::{FileError, Requested};
use crate::state::AppState;
use bytes::Bytes;
use futures_util::StreamExt;
use poem::{Request, RequestBody};
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::{Json, ParsePayload, Payload};
use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::{ApiRequest, ApiResponse, Enum, Object, OpenApi};
use serde_json::{json, Value};
use std::sync::Arc;

pub struct ImportsApi {
    pub state: Arc<AppState>,
    /// Uploads being read (IMPORT_MAX_UPLOADS, IMPORT_MAX_UPLOADS_PER_USER):
    /// each holds a database connection while its body comes in, so
    /// however slowly clients send, uploads never hold more than these.
    uploads: crate::http::slots::Slots,
}

impl ImportsApi {
    pub fn new(state: Arc<AppState>) -> Self {
        let uploads = crate::http::slots::Slots::new(
            state.config.import_max_uploads,
            state.config.import_max_uploads_per_user,
            crate::http::slots::Names {
                what: "import uploads",
                total: "IMPORT_MAX_UPLOADS",
                per_user: "IMPORT_MAX_UPLOADS_PER_USER",
            },
        );
        Self { state, uploads }
    }
}

/// Whether a request is an upload whose body the import streams itself
/// (the middleware's BODY_LIMIT buffering would hold it all in memory).
pub fn streams_body(req: &Request) -> bool {
    req.method() == poem::http::Method::POST && req.uri().path() == "/api/v2/imports"
}

fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

fn binary_schema() -> MetaSchemaRef {
    MetaSchemaRef::Inline(Box::new(MetaSchema {
        format: Some("binary"),
        ..MetaSchema::new("string")
    }))
}

/// The media types an upload is taken as CSV in (the first is the one the
/// OpenAPI document names first; the others are listed beside it).
pub const CSV_TYPES: [&str; 3] = ["text/csv", "text/plain", "application/csv"];
/// The media types an upload is taken as NDJSON in.
pub const NDJSON_TYPES: [&str; 3] = [
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
];

/// A CSV file (`text/csv`; `text/plain` and `application/csv` are taken too).
pub struct CsvBody(pub poem::Body);

impl Payload for CsvBody {
    const CONTENT_TYPE: &'static str = CSV_TYPES[0];

    fn check_content_type(content_type: &str) -> bool {
        CSV_TYPES.contains(&essence(content_type).as_str())
    }

    fn schema_ref() -> MetaSchemaRef {
        binary_schema()
    }
}

impl ParsePayload for CsvBody {
    const IS_REQUIRED: bool = true;

    async fn from_request(request: &Request, body: &mut RequestBody) -> poem::Result<Self> {
        Ok(Self(
            <poem::Body as poem::FromRequest>::from_request(request, body).await?,
        ))
    }
}

/// Newline-delimited JSON records (`application/x-ndjson`).
pub struct NdjsonBody(pub poem::Body);

impl Payload for NdjsonBody {
    const CONTENT_TYPE: &'static str = NDJSON_TYPES[0];

    fn check_content_type(content_type: &str) -> bool {
        NDJSON_TYPES.contains(&essence(content_type).as_str())
    }

    fn schema_ref() -> MetaSchemaRef {
        binary_schema()
    }
}

impl ParsePayload for NdjsonBody {
    const IS_REQUIRED: bool = true;

    async fn from_request(request: &Request, body: &mut RequestBody) -> poem::Result<Self> {
        Ok(Self(
            <poem::Body as poem::FromRequest>::from_request(request, body).await?,
        ))
    }
}

/// The file: CSV (daily or monthly shape, `,` or `;`, optional UTF-8 BOM,
/// CRLF or LF) or NDJSON records.
#[derive(ApiRequest)]
pub enum ImportBody {
    Csv(CsvBody),
    Ndjson(NdjsonBody),
}

#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[oai(rename_all = "lowercase")]
pub enum ImportFormat {
    /// Told by the header: a `date` column is the daily shape, `year` and `month` the monthly one.
    Auto,
    /// One line per store-day: store_code (or store_id), date, sales, customers, transactions.
    Daily,
    /// One line per store-month: store_code (or store_id), year, month, d1_sales … d31_customers.
    Monthly,
}

/// A queued job.
#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct JobAccepted {
    pub id: i64,
    /// `import` or `batch`.
    pub kind: String,
    pub state: String,
    /// Where its status is (also in `Location`).
    pub status_url: String,
    /// The shape the file was read as (imports).
    pub format: Option<String>,
    /// Data lines read (imports: the file's; batches: records).
    pub rows_read: i64,
    /// Lines already rejected while reading (imports).
    pub rows_rejected: i64,
}

/// A rejected row.
#[derive(Object, Debug)]
pub struct RowError {
    /// Line of the file (1 is the header of a CSV).
    pub line: i64,
    /// The column (or record member) at fault, when one is.
    pub column: Option<String>,
    pub reason: String,
}

/// A job's state and counts.
#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct JobStatus {
    pub id: i64,
    /// `import` or `batch`.
    pub kind: String,
    /// `uploading`, `queued`, `running`, `completed`, `failed` or `cancelled`.
    pub state: String,
    pub user_id: Option<i64>,
    /// The shape the file was read as: `daily`, `monthly` or `ndjson`.
    pub format: Option<String>,
    pub dry_run: bool,
    pub max_errors: Option<i64>,
    pub rows_read: i64,
    pub rows_written: i64,
    pub rows_rejected: i64,
    /// The highest input line merged so far (chunks go in store and month
    /// order, so lower lines may still be waiting).
    pub last_line: i64,
    pub chunks: i64,
    /// Times a worker took it (more than 1: a worker was lost and another continued).
    pub attempts: i64,
    pub last_error: Option<String>,
    pub cancel_requested: bool,
    /// Batches: the report the synchronous call answers; imports: the final counts.
    pub result: Option<Value>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub updated_at: String,
    pub finished_at: Option<String>,
    /// The first rejected rows, by line (in the list of jobs: none; an import's rejected
    /// rows all count in `errorsOmitted` there, read them from the job itself; a batch's
    /// refused records are in its `result`).
    pub errors: Vec<RowError>,
    /// Rejected rows not listed.
    pub errors_omitted: i64,
}

#[derive(Object, Debug)]
pub struct JobList {
    /// The jobs without their rejected rows (`errors` empty; an import's all counted in
    /// `errorsOmitted`): `GET /api/v2/imports/{id}` lists them.
    pub data: Vec<JobStatus>,
}

#[derive(ApiResponse)]
pub enum ImportResponse {
    /// Read and queued; `Location` is the job's status. (400, nothing queued: the file is
    /// empty, not text, or its header names no store or date; 413: larger than IMPORT_MAX_BYTES.)
    #[oai(status = 202)]
    Accepted(Json<JobAccepted>, #[oai(header = "Location")] String),
}

#[derive(ApiResponse)]
pub enum StatusResponse {
    /// The job.
    #[oai(status = 200)]
    Ok(RawJson<JobStatus>),
}

#[derive(ApiResponse)]
pub enum ListResponse {
    /// Jobs, newest first.
    #[oai(status = 200)]
    Ok(RawJson<JobList>),
}

#[derive(ApiResponse)]
pub enum CancelResponse {
    /// The job after the request: `cancelled` when it had not started, else it stops
    /// before its next chunk (rows of committed chunks stay written).
    #[oai(status = 200)]
    Ok(RawJson<JobStatus>),
}

/// A blocking `Read` over the body's chunks (the parser runs on a blocking thread).
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    cur: Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

fn file_error(e: FileError) -> ApiError {
    match e {
        FileError::TooLarge(_) => ApiError::too_large(e.to_string()),
        _ => ApiError::bad_param("body", e.to_string()),
    }
}

#[OpenApi(tag = "ApiTags::Imports")]
impl ImportsApi {
    /// Import a file of sales: the project's export CSVs (daily or monthly shape), a POS daily
    /// CSV (`store_code,date,sales,customers,transactions`: any column order, optional metric
    /// columns, `,` or `;`, a UTF-8 BOM, CRLF) or NDJSON records. The body is read as it
    /// streams (up to IMPORT_MAX_BYTES) and staged; then `202` with the job. Rows are written
    /// in chunks by a background worker through the batch merge (validation, your store scope,
    /// versions, events); bad rows are rejected with line, column and reason. Progress and
    /// completion arrive on your WebSocket (`import-progress`, `import-completed`).
    #[oai(path = "/api/v2/imports", method = "post")]
    async fn create(
        &self,
        auth: BearerAuth,
        body: ImportBody,
        /// `auto` (default), `daily` or `monthly` (CSV only).
        format: Query<Option<ImportFormat>>,
        /// Check and count every row, write nothing.
        #[oai(name = "dryRun")]
        dry_run: Query<Option<bool>>,
        /// The job fails once more rows than this are rejected (default 1000).
        #[oai(
            name = "maxErrors",
            validator(minimum(value = "0"), maximum(value = "100000000"))
        )]
        max_errors: Query<Option<i64>>,
    ) -> ApiResult<ImportResponse> {
        let (body, requested) = match body {
            ImportBody::Csv(b) => (
                b.0,
                match format.0.unwrap_or(ImportFormat::Auto) {
                    ImportFormat::Auto => Requested::Auto,
                    ImportFormat::Daily => Requested::Daily,
                    ImportFormat::Monthly => Requested::Monthly,
                },
            ),
            ImportBody::Ndjson(b) => match format.0 {
                None | Some(ImportFormat::Auto) => (b.0, Requested::Ndjson),
                Some(_) => return Err(ApiError::bad_param(
                    "format",
                    "daily and monthly are CSV shapes; an NDJSON body takes no format (or auto)",
                )),
            },
        };
        let _slot = self.uploads.take_or_429(auth.0.user_id)?;
        // Refused before the body is read when the user has no job to
        // spare; the job's creation counts again under the user's lock.
        let max_jobs = self.state.config.jobs_max_per_user;
        let active = crate::jobs::unfinished(&self.state.pool, auth.0.user_id).await?;
        if active >= max_jobs {
            return Err(ApiError::too_many_jobs(crate::jobs::TooManyJobs::Full(
                active,
            )));
        }
        let max_bytes = self.state.config.import_max_bytes;
        let idle = self.state.config.import_idle_timeout;
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(16);
        let pump = async move {
            let mut stream = body.into_bytes_stream();
            let mut seen = 0u64;
            loop {
                // A body that sends nothing for IMPORT_IDLE_TIMEOUT is
                // dropped: the upload ends as a cut one (nothing queued).
                let chunk = match tokio::time::timeout(idle, stream.next()).await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => break,
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "the body sent nothing for {} s (IMPORT_IDLE_TIMEOUT)",
                            idle.as_secs()
                        ),
                    )),
                };
                let item = chunk.and_then(|b| {
                    seen += b.len() as u64;
                    if seen > max_bytes {
                        Err(std::io::Error::other(crate::jobs::parse::TooLarge(
                            max_bytes,
                        )))
                    } else {
                        Ok(b)
                    }
                });
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    break;
                }
            }
        };
        let req = ImportRequest {
            requested,
            dry_run: dry_run.0.unwrap_or(false),
            max_errors: max_errors.0.unwrap_or(1000),
            user_id: Some(auth.0.user_id),
            scope: auth.0.scope(),
            file_name: None,
            lease: self.state.config.job_lease,
            max_jobs: Some(max_jobs),
            job_id: None,
        };
        let reader = ChannelReader {
            rx,
            cur: Bytes::new(),
        };
        let (_, staged) = tokio::join!(pump, import::stage(&self.state.pool, reader, &req));
        let staged = match staged {
            Ok(s) => s,
            Err(import::StageError::File(e)) => return Err(file_error(e)),
            Err(import::StageError::Db(e)) => return Err(e.into()),
            Err(import::StageError::TooManyJobs(e)) => return Err(ApiError::too_many_jobs(e)),
        };
        let url = format!("/api/v2/imports/{}", staged.job_id);
        Ok(ImportResponse::Accepted(
            Json(JobAccepted {
                id: staged.job_id,
                kind: "import".into(),
                state: staged.state,
                status_url: url.clone(),
                format: staged.shape.map(|s| s.name().into()),
                rows_read: staged.lines as i64,
                rows_rejected: staged.rejected as i64,
            }),
            url,
        ))
    }

    /// A job's state: rows read, written and rejected, the first rejected rows (line, column,
    /// reason), attempts and the last error. Imports and asynchronous batches alike; another
    /// user's job is 404 (admins see every job).
    #[oai(path = "/api/v2/imports/:id", method = "get")]
    async fn status(&self, auth: BearerAuth, id: Path<i64>) -> ApiResult<StatusResponse> {
        let owner = (!auth.0.is_admin()).then_some(auth.0.user_id);
        match crate::jobs::status(&self.state.pool, id.0, owner).await? {
            Some(doc) => {
                settle_ended(&self.state, std::slice::from_ref(&doc)).await?;
                Ok(StatusResponse::Ok(RawJson::new(doc.to_string())))
            }
            None => Err(ApiError::not_found(format!("no job {}", id.0))),
        }
    }

    /// The caller's jobs, newest first (admins: everyone's).
    #[oai(path = "/api/v2/imports", method = "get")]
    async fn list(
        &self,
        auth: BearerAuth,
        /// At most this many (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "200")))]
        limit: Query<Option<i64>>,
    ) -> ApiResult<ListResponse> {
        let owner = (!auth.0.is_admin()).then_some(auth.0.user_id);
        let mut data = crate::jobs::list(&self.state.pool, owner, limit.0.unwrap_or(50)).await?;
        settle_ended(&self.state, &data).await?;
        for d in &mut data {
            // The list shows no error: every rejected line is omitted,
            // except a batch's, whose refused records are in its `result`.
            d["errors"] = json!([]);
            d["errorsOmitted"] = if d["kind"] == "batch" {
                json!(0)
            } else {
                d["rowsRejected"].clone()
            };
        }
        Ok(ListResponse::Ok(RawJson::new(
            json!({"data": data}).to_string(),
        )))
    }

    /// Cancel a job. A queued job is cancelled at once; a running import stops before its next
    /// chunk, keeping what committed; a running batch (one transaction) cannot be stopped: 409.
    /// Cancelling a finished job changes nothing.
    #[oai(path = "/api/v2/imports/:id", method = "delete")]
    async fn cancel(&self, auth: BearerAuth, id: Path<i64>) -> ApiResult<CancelResponse> {
        let owner = (!auth.0.is_admin()).then_some(auth.0.user_id);
        match crate::jobs::cancel(&self.state.pool, id.0, owner).await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(ApiError::not_found(format!("no job {}", id.0))),
            Err(crate::jobs::CancelError::RunningBatch) => {
                return Err(ApiError::conflict(
                    format!(
                        "job {} is a batch that is running: it is written in one transaction, which cannot be stopped part way; it ends completed or failed (a queued batch can be cancelled)",
                        id.0
                    ),
                    None,
                ))
            }
            Err(crate::jobs::CancelError::Db(e)) => return Err(e.into()),
        }
        match crate::jobs::status(&self.state.pool, id.0, owner).await? {
            Some(doc) => Ok(CancelResponse::Ok(RawJson::new(doc.to_string()))),
            None => Err(ApiError::not_found(format!("no job {}", id.0))),
        }
    }
}

/// Before a job is shown ended: a job that wrote rows and ended lately
/// (within the first level's lifetime, `CACHE_L1_TTL`, and a margin for
/// clocks) may be ended before its writes' invalidation reached this
/// instance. Its commit makes the end visible everywhere at once, while
/// the instance that ran it invalidates Redis only after it, and this
/// instance's first level empties only when its relay reads the events
/// (later still while a transaction writing events holds delivery back).
/// The first time this instance shows such a job, it applies the job's
/// cache tags itself (an asynchronous batch keeps them in its row), or,
/// for an import (whose chunks were each invalidated before the next),
/// empties its first level; so a client that sees the job end reads the
/// new values here.
async fn settle_ended(state: &Arc<AppState>, jobs: &[serde_json::Value]) -> ApiResult<()> {
    let margin = std::time::Duration::from_secs(2);
    let recent = chrono::Utc::now()
        - chrono::Duration::from_std(state.config.cache_l1_ttl + margin)
            .unwrap_or_else(|_| chrono::Duration::zero());
    for j in jobs {
        let ended_recently = matches!(
            j["state"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) && j["rowsWritten"].as_i64().unwrap_or(0) > 0
            && j["finishedAt"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .is_some_and(|t| t >= recent);
        let Some(id) = j["id"].as_i64() else { continue };
        if !ended_recently
            || state
                .cache
                .settled(id, state.config.cache_l1_ttl + margin * 5)
        {
            continue;
        }
        let tags: Option<Vec<String>> =
            sqlx::query_scalar("SELECT cache_tags FROM jobs.jobs WHERE id = $1")
                .bind(id)
                .fetch_optional(&state.pool)
                .await?
                .flatten();
        match tags {
            Some(tags) if !tags.is_empty() => {
                state.publish(crate::db::Changes::from_tags(tags)).await
            }
            _ => state.cache.drop_first_level(),
        }
        state.cache.mark_settled(id);
    }
    Ok(())
}
