//! The streamed export response and how the OpenAPI document describes it.

use super::format::ExportFormat;
use crate::http::compress::Encoding;
use crate::http::middleware::Streaming;
use poem::http::{header, HeaderValue};
use poem::{IntoResponse, Response};
use poem_openapi::registry::{
    MetaHeader, MetaMediaType, MetaResponse, MetaResponses, MetaSchema, MetaSchemaRef, Registry,
};
use poem_openapi::types::Type;
use poem_openapi::ApiResponse;

/// A streamed export body, as the OpenAPI document describes it.
pub struct ExportResponse {
    pub(super) body: poem::Body,
    pub(super) format: ExportFormat,
    pub(super) encoding: Encoding,
    pub(super) file_name: String,
    /// The running export's id and row estimate; none for a HEAD, which
    /// runs no export (RFC 9110 9.3.2 lets it leave out what only
    /// producing the content determines).
    pub(super) export_id: Option<String>,
    pub(super) estimated_total: Option<u64>,
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
            .body(self.body);
        if let Some(id) = self
            .export_id
            .as_deref()
            .and_then(|i| HeaderValue::from_str(i).ok())
        {
            resp.headers_mut().insert("x-export-id", id);
        }
        if let Some(total) = self.estimated_total {
            resp.headers_mut()
                .insert("x-export-estimated-rows", HeaderValue::from(total));
        }
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
                        "Identifies this export in export-progress events (not sent for HEAD, which runs no export)",
                    ),
                    header(
                        "X-Export-Estimated-Rows",
                        "Rows the export will hold (counted in the export's snapshot; not sent for HEAD)",
                    ),
                ],
            }],
        }
    }

    fn register(_registry: &mut Registry) {}
}
