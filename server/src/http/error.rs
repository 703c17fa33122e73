//! One error type at the HTTP edge, one JSON shape for every error:
//! `{"error": {"code", "message", "details", "requestId"}}`.
//!
//! Database errors are mapped here, once: named constraints and the
//! extension's SQLSTATEs become 4xx; anything else is logged with the request
//! id and answered as a bare 500 that leaks no SQL.

use poem::http::{header, HeaderValue, StatusCode};
use poem::{IntoResponse, Response};
use poem_openapi::{payload::Json, ApiResponse, Object};
use serde_json::Value;

tokio::task_local! {
    /// The current request's id, set by the request-id middleware.
    pub static REQUEST_ID: String;
}

tokio::task_local! {
    /// Whether the current request was answered from the cache (`hit`/`miss`),
    /// reported in the `X-Cache` header.
    pub static CACHE_STATUS: std::cell::Cell<Option<&'static str>>;
}

pub fn set_cache_status(status: &'static str) {
    let _ = CACHE_STATUS.try_with(|c| c.set(Some(status)));
}

pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(|id| id.clone()).ok()
}

#[derive(Object, Debug, Clone)]
#[oai(rename_all = "camelCase")]
pub struct ErrorDetail {
    /// Machine-readable code, e.g. `bad_parameter`, `forbidden`, `validation_failed`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// Structured context: the offending parameter, a per-record report, ...
    pub details: Option<Value>,
    /// The request id (also in the `X-Request-Id` header and the logs).
    pub request_id: Option<String>,
}

#[derive(Object, Debug, Clone)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

impl ErrorBody {
    pub fn new(code: &str, message: impl Into<String>, details: Option<Value>) -> Json<Self> {
        Json(ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                message: message.into(),
                details,
                request_id: current_request_id(),
            },
        })
    }

    /// The same body as a plain response, for what answers outside the
    /// OpenAPI service (routing and parsing errors, the WebSocket upgrade).
    pub fn response(
        status: StatusCode,
        code: &str,
        message: impl Into<String>,
        details: Option<Value>,
    ) -> Response {
        let mut resp = Self::new(code, message, details).into_response();
        resp.set_status(status);
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    }
}

#[derive(ApiResponse, Debug)]
pub enum ApiError {
    /// A parameter or the body is malformed; `details.parameter` names it.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// Missing, expired or invalid bearer token, or wrong credentials.
    #[oai(status = 401)]
    Unauthorized(
        Json<ErrorBody>,
        /// Removes the `pg_sales_refresh` cookie when the refresh token a
        /// refresh or logout read from it is refused for good.
        #[oai(header = "Set-Cookie")]
        Option<String>,
    ),
    /// The token does not allow this (role, or a store outside its scope).
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// No such resource.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// Conflicts with existing data (e.g. a duplicate store code).
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    /// `If-Match` names no ETag of the resource's current state: it changed
    /// since the caller read it; `details.etag` is the current one.
    #[oai(status = 412)]
    PreconditionFailed(Json<ErrorBody>),
    /// The body or batch is larger than allowed.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// Well-formed but invalid data; `details` carries the per-record report.
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    /// Too many requests; retry after the `Retry-After` seconds.
    #[oai(status = 429)]
    TooManyRequests(Json<ErrorBody>, #[oai(header = "Retry-After")] u64),
    /// Unexpected failure (logged with the request id).
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// A dependency is unavailable, the query timed out or a concurrent
    /// write conflicted; retry after the `Retry-After` seconds.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u64),
}

impl ApiError {
    pub fn bad_param(parameter: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self::bad_param_with(
            format!("{parameter}: {message}"),
            serde_json::json!({"parameter": parameter, "reason": message}),
        )
    }

    /// A 400 for a parameter, its message and every text of its details
    /// cut at [`crate::MAX_MESSAGE`] bytes: they quote the value refused,
    /// and a 60 kB `fields=` was answered twice over (in the message and in
    /// `details`).
    pub fn bad_param_with(message: String, mut details: Value) -> Self {
        fn clip_texts(v: &mut Value) {
            match v {
                Value::String(t) if t.len() > crate::MAX_MESSAGE => {
                    *t = crate::clip(t, crate::MAX_MESSAGE).into_owned();
                }
                Value::Array(a) => a.iter_mut().for_each(clip_texts),
                Value::Object(o) => o.values_mut().for_each(clip_texts),
                _ => {}
            }
        }
        clip_texts(&mut details);
        ApiError::BadRequest(ErrorBody::new(
            "bad_parameter",
            crate::clip(&message, crate::MAX_MESSAGE).into_owned(),
            Some(details),
        ))
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::Unauthorized(ErrorBody::new("unauthorized", message, None), None)
    }

    /// The same error, answered with `cookie` as its `Set-Cookie` (a 401
    /// only; other errors are returned unchanged).
    pub fn with_cookie(self, cookie: Option<String>) -> Self {
        match self {
            ApiError::Unauthorized(body, _) => ApiError::Unauthorized(body, cookie),
            other => other,
        }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::Forbidden(ErrorBody::new("forbidden", message, None))
    }

    /// 403 naming the stores outside the caller's scope (never an empty
    /// answer, which would hide the refusal).
    pub fn outside_scope(mut denied: Vec<i64>) -> Self {
        denied.sort_unstable();
        denied.dedup();
        ApiError::Forbidden(ErrorBody::new(
            "forbidden",
            format!("stores outside your scope: {denied:?}"),
            Some(serde_json::json!({"storeIds": denied})),
        ))
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::NotFound(ErrorBody::new("not_found", message, None))
    }

    pub fn conflict(message: impl Into<String>, details: Option<Value>) -> Self {
        ApiError::Conflict(ErrorBody::new("conflict", message, details))
    }

    pub fn precondition_failed(message: impl Into<String>, current_etag: &str) -> Self {
        ApiError::PreconditionFailed(ErrorBody::new(
            "precondition_failed",
            message,
            Some(serde_json::json!({"etag": current_etag})),
        ))
    }

    /// `If-Match` sent to a resource that has no representation to match
    /// (a batch endpoint): RFC 9110 makes the condition false, so nothing
    /// is written rather than the header being ignored.
    pub fn nothing_to_match(path: &str) -> Self {
        ApiError::PreconditionFailed(ErrorBody::new(
            "precondition_failed",
            format!(
                "If-Match: {path} has no representation to match, so the condition is false and \
                 nothing was written; sales records take no conditional writes (read them back \
                 after a batch instead: each record's version says which write it holds)"
            ),
            Some(serde_json::json!({"header": "If-Match"})),
        ))
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        ApiError::PayloadTooLarge(ErrorBody::new("payload_too_large", message, None))
    }

    pub fn unprocessable(message: impl Into<String>, details: Option<Value>) -> Self {
        ApiError::Unprocessable(ErrorBody::new("validation_failed", message, details))
    }

    pub fn too_many(retry_after: u64) -> Self {
        ApiError::TooManyRequests(
            ErrorBody::new(
                "rate_limited",
                format!("rate limit reached; retry after {retry_after} s"),
                None,
            ),
            retry_after,
        )
    }

    /// A job not created: the user has as many unfinished jobs as
    /// JOBS_MAX_PER_USER allows (429), or their job lock stayed taken (503).
    pub fn too_many_jobs(e: crate::jobs::TooManyJobs) -> Self {
        const RETRY_AFTER: u64 = 5;
        match e {
            crate::jobs::TooManyJobs::Full(active) => ApiError::TooManyRequests(
                ErrorBody::new(
                    "too_many_jobs",
                    e.to_string(),
                    Some(serde_json::json!({"unfinishedJobs": active, "retryAfter": RETRY_AFTER})),
                ),
                RETRY_AFTER,
            ),
            crate::jobs::TooManyJobs::Busy => ApiError::unavailable(e.to_string()),
        }
    }

    /// Too many failed logins for one account.
    pub fn too_many_logins(retry_after: u64) -> Self {
        ApiError::TooManyRequests(
            ErrorBody::new(
                "login_throttled",
                format!("too many failed logins for this account; retry after {retry_after} s"),
                Some(serde_json::json!({"retryAfter": retry_after})),
            ),
            retry_after,
        )
    }

    /// Too many failed logins from one client address.
    pub fn too_many_logins_from_address(retry_after: u64) -> Self {
        ApiError::TooManyRequests(
            ErrorBody::new(
                "login_throttled",
                format!("too many failed logins from this address; retry after {retry_after} s"),
                Some(serde_json::json!({"retryAfter": retry_after})),
            ),
            retry_after,
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError::Unavailable(ErrorBody::new("unavailable", message, None), 1)
    }

    /// Logs the cause and returns an opaque 500.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        ApiError::Internal(ErrorBody::new(
            "internal",
            "internal error; see the server log for this request id",
            None,
        ))
    }

    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::Unauthorized(..) => 401,
            ApiError::Forbidden(_) => 403,
            ApiError::NotFound(_) => 404,
            ApiError::Conflict(_) => 409,
            ApiError::PreconditionFailed(_) => 412,
            ApiError::PayloadTooLarge(_) => 413,
            ApiError::Unprocessable(_) => 422,
            ApiError::TooManyRequests(..) => 429,
            ApiError::Internal(_) => 500,
            ApiError::Unavailable(..) => 503,
        }
    }
}

/// Per-item errors listed in one report at most.
pub const MAX_REPORTED_ERRORS: usize = 100;

/// Caps `errors` of a batch report; `errorsOmitted` says how many more there
/// were (added to those the extension's report already left out: it lists
/// at most 1,000).
pub fn cap_report(report: &mut Value) {
    let before = report
        .get("errorsOmitted")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if let Some(errors) = report.get_mut("errors").and_then(Value::as_array_mut) {
        if errors.len() > MAX_REPORTED_ERRORS {
            let omitted = (errors.len() - MAX_REPORTED_ERRORS) as u64;
            errors.truncate(MAX_REPORTED_ERRORS);
            report["errorsOmitted"] = Value::from(omitted + before);
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        crate::db::broken_connection(&e);
        let Some(db) = e.as_database_error() else {
            return match e {
                sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                    tracing::warn!(error = %e, "database unavailable");
                    ApiError::unavailable("database unavailable; retry later")
                }
                other => ApiError::internal(other),
            };
        };
        let code = db.code().map(|c| c.to_string()).unwrap_or_default();
        let pg = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>();
        let detail = pg.and_then(|p| p.detail()).map(str::to_string);
        let constraint = db.constraint().map(str::to_string);
        match code.as_str() {
            // Batch rejected by the extension: the report is JSON in DETAIL.
            "PS422" => {
                let mut report = detail.and_then(|d| serde_json::from_str::<Value>(&d).ok());
                if let Some(r) = report.as_mut() {
                    cap_report(r);
                }
                ApiError::unprocessable(db.message().to_string(), report)
            }
            "PS410" => ApiError::conflict(
                db.message().to_string(),
                Some(serde_json::json!({"resync": true})),
            ),
            // Class 22 is bad data (a malformed or out-of-range value, NUL
            // in text): the request's fault, never a 500.
            c if c.starts_with("22") => ApiError::BadRequest(ErrorBody::new(
                "bad_parameter",
                db.message().to_string(),
                Some(serde_json::json!({"sqlstate": c})),
            )),
            "23505" => ApiError::conflict(
                "already exists",
                Some(serde_json::json!({"constraint": constraint, "detail": detail})),
            ),
            "23503" => ApiError::conflict(
                "refers to a row that does not exist, or is still referred to",
                Some(serde_json::json!({"constraint": constraint})),
            ),
            "23514" | "23502" => ApiError::unprocessable(
                format!(
                    "violates {}",
                    constraint.clone().unwrap_or_else(|| "a constraint".into())
                ),
                Some(serde_json::json!({"constraint": constraint})),
            ),
            "40001" | "40P01" => ApiError::unavailable("conflicting concurrent write; retry"),
            "57014" => ApiError::unavailable("query timed out (DB_QUERY_TIMEOUT)"),
            "57P01" | "57P02" | "57P03" | "08000" | "08003" | "08006" => {
                ApiError::unavailable("database unavailable; retry later")
            }
            _ => ApiError::internal(format!("database error {code}: {}", db.message())),
        }
    }
}

impl From<crate::db::TxFailure> for ApiError {
    fn from(f: crate::db::TxFailure) -> Self {
        match f {
            crate::db::TxFailure::BeforeCommit(e) => ApiError::from(e),
            crate::db::TxFailure::AtCommit(e) if crate::db::is_transient(&e, true) => {
                tracing::error!(error = %e, "connection lost at COMMIT; the write's outcome is unknown");
                ApiError::Unavailable(ErrorBody::new(
                    "outcome_unknown",
                    "the database connection was lost while committing: the write may or may not \
                     have happened; read the records back before sending it again",
                    Some(serde_json::json!({"outcome": "unknown"})),
                ), 1)
            }
            crate::db::TxFailure::AtCommit(e) => ApiError::from(e),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::internal(format!("{e:#}"))
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod report_tests {
    use super::*;

    /// The extension lists at most 1,000 errors and counts the rest; the
    /// API's cap of 100 adds what it leaves out to that count.
    #[test]
    fn a_capped_report_counts_every_omitted_error() {
        let errors: Vec<Value> = (0..1000).map(|i| serde_json::json!({"index": i})).collect();
        let mut r = serde_json::json!({"errors": errors, "errorsOmitted": 200});
        cap_report(&mut r);
        assert_eq!(r["errors"].as_array().unwrap().len(), MAX_REPORTED_ERRORS);
        assert_eq!(r["errorsOmitted"], 1100);
        let mut r = serde_json::json!({"errors": [{"index": 0}]});
        cap_report(&mut r);
        assert!(r.get("errorsOmitted").is_none());
    }
}
