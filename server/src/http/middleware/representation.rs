//! ETag / 304, Cache-Control, Vary and compression for buffered bodies.

use super::{error_response, hex};
use crate::http::compress::{compress, negotiate, Encoding, COMPRESS_MIN};
use crate::state::AppState;
use poem::http::{header, HeaderValue, Method, StatusCode};
use poem::{Endpoint, IntoResponse, Request, Response};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Marks a response whose body is a stream (exports): it is neither buffered
/// for an ETag nor compressed here (the producer compresses on the fly).
#[derive(Clone, Copy, Debug)]
pub struct Streaming;

fn compressible(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        ct.starts_with("application/json")
            || ct.starts_with("text/")
            || ct.starts_with("application/javascript")
            || ct.starts_with("application/x-ndjson")
    })
}

fn if_none_match_hits(header_value: Option<&str>, etag: &str) -> bool {
    header_value.is_some_and(|v| {
        v.split(',').any(|t| {
            let t = t.trim();
            t == "*" || t == etag || t.strip_prefix("W/") == Some(etag)
        })
    })
}

/// ETag / 304, Cache-Control, Vary and compression for buffered bodies.
pub async fn with_representation<E: Endpoint>(
    ep: Arc<E>,
    req: Request,
    state: Arc<AppState>,
) -> poem::Result<Response> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let accept = req
        .headers()
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let inm = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut resp = ep
        .call(req)
        .await
        .map(IntoResponse::into_response)
        .unwrap_or_else(error_response);
    let headers = resp.headers_mut();
    headers.insert(
        header::VARY,
        HeaderValue::from_static("Authorization, Accept-Encoding"),
    );
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        || resp.extensions().get::<Streaming>().is_some()
    {
        return Ok(resp);
    }
    let cacheable =
        (method == Method::GET || method == Method::HEAD) && resp.status() == StatusCode::OK;
    if !resp.headers().contains_key(header::CACHE_CONTROL) {
        let value = if cacheable && path.starts_with("/api/v2/") {
            format!("private, max-age={}", state.config.cache_ttl.as_secs())
        } else if cacheable
            && (path == "/openapi.json" || path.starts_with("/docs") || path.starts_with("/assets"))
        {
            "no-cache".to_string()
        } else {
            "no-store".to_string()
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(header::CACHE_CONTROL, v);
        }
    }
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (parts, body) = resp.into_parts();
    let bytes = body
        .into_bytes()
        .await
        .map_err(|e| poem::Error::new(e, StatusCode::INTERNAL_SERVER_ERROR))?;
    let mut enc = Encoding::Identity;
    if bytes.len() >= COMPRESS_MIN && compressible(content_type.as_deref()) {
        enc = negotiate(
            accept.as_deref(),
            &[Encoding::Zstd, Encoding::Brotli, Encoding::Gzip],
        );
    }
    let mut resp = Response::from_parts(parts, poem::Body::empty());
    if cacheable {
        // Strong ETag of the representation: the body's digest, plus the
        // encoding, since each encoding is a different byte sequence.
        let digest = hex(&Sha256::digest(&bytes)[..12]);
        let etag = match enc {
            Encoding::Identity => format!("\"{digest}\""),
            e => format!("\"{digest}-{}\"", e.token()),
        };
        if let Ok(v) = HeaderValue::from_str(&etag) {
            resp.headers_mut().insert(header::ETAG, v);
        }
        if if_none_match_hits(inm.as_deref(), &etag) {
            resp.set_status(StatusCode::NOT_MODIFIED);
            resp.headers_mut().remove(header::CONTENT_TYPE);
            resp.headers_mut().remove(header::CONTENT_LENGTH);
            return Ok(resp);
        }
    }
    if enc != Encoding::Identity {
        let level = state.config.compression_level;
        let data = bytes.clone();
        let compressed = if bytes.len() > 256 * 1024 {
            tokio::task::spawn_blocking(move || compress(enc, &data, level))
                .await
                .ok()
                .and_then(Result::ok)
        } else {
            compress(enc, &data, level).ok()
        };
        if let Some(c) = compressed {
            resp.headers_mut().insert(
                header::CONTENT_ENCODING,
                HeaderValue::from_static(enc.token()),
            );
            resp.headers_mut().remove(header::CONTENT_LENGTH);
            resp.set_body(c);
            return Ok(resp);
        }
    }
    resp.set_body(bytes);
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_matching() {
        assert!(if_none_match_hits(Some("\"a\", \"b\""), "\"b\""));
        assert!(if_none_match_hits(Some("W/\"b\""), "\"b\""));
        assert!(if_none_match_hits(Some("*"), "\"b\""));
        assert!(!if_none_match_hits(Some("\"c\""), "\"b\""));
        assert!(!if_none_match_hits(None, "\"b\""));
    }
}
