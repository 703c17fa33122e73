//! ETag / 304, Cache-Control, Vary and compression for buffered bodies.

use super::limits::RawBody;
use super::request_id::explained_error;
use crate::cache::CachedBody;
use crate::http::compress::{
    accept_encoding, compress, field_list, negotiate, Encoding, COMPRESS_MIN,
};
use crate::http::error::ApiError;
use crate::http::routes::Routes;
use crate::state::AppState;
use bytes::Bytes;
use poem::http::{header, HeaderValue, Method, StatusCode};
use poem::{Endpoint, IntoResponse, Request, Response};
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::sync::Arc;

tokio::task_local! {
    /// The cache entry a handler answered from, if any (see [`offer_cached`]).
    static CACHED: RefCell<Option<Arc<CachedBody>>>;
}

/// Called by a handler that answers from the cache: when the response body
/// is this entry's body, its ETag digest and encodings are taken from (and
/// kept with) the entry instead of being computed for every hit.
pub fn offer_cached(body: Arc<CachedBody>) {
    let _ = CACHED.try_with(|c| *c.borrow_mut() = Some(body));
}

/// The last body each of the documents every caller is served the same
/// (the OpenAPI document, the API explorer, the dashboard's files) answered
/// with: its ETag digest and encodings are computed once per body, as a
/// cache entry's are, not for every request. The explorer's page is 1.9 MB,
/// which brotli took about a second of CPU to compress, on paths no login
/// or rate limit bounds. Only 200 answers are kept, so the map holds at
/// most one body per file served.
static STATIC_BODIES: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, Arc<CachedBody>>>,
> = std::sync::LazyLock::new(Default::default);

fn is_static(path: &str) -> bool {
    crate::http::routes::beside(path).is_some()
}

/// The kept body of a static document, when it is `bytes`; else `bytes`
/// kept as its body from now on.
fn static_body(path: &str, bytes: &Bytes) -> Arc<CachedBody> {
    let mut m = STATIC_BODIES.lock().unwrap_or_else(|p| p.into_inner());
    match m.get(path) {
        Some(c) if c.bytes == *bytes => c.clone(),
        _ => {
            let c = Arc::new(CachedBody::new(bytes.clone()));
            m.insert(path.to_string(), c.clone());
            c
        }
    }
}

/// The ETag digest of a body.
fn digest(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..12])
}

fn slot(enc: Encoding) -> Option<usize> {
    match enc {
        Encoding::Zstd => Some(0),
        Encoding::Brotli => Some(1),
        Encoding::Gzip => Some(2),
        Encoding::Identity => None,
    }
}

/// Compresses, off the async threads when the body is large.
async fn encode(enc: Encoding, bytes: &Bytes, level: u32) -> Option<Bytes> {
    if bytes.len() > 256 * 1024 {
        let data = bytes.clone();
        tokio::task::spawn_blocking(move || compress(enc, &data, level))
            .await
            .ok()
            .and_then(Result::ok)
            .map(Bytes::from)
    } else {
        compress(enc, bytes, level).ok().map(Bytes::from)
    }
}

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

/// The ETag a GET answers for `body` without a content coding.
pub fn etag_of(body: &[u8]) -> String {
    format!("\"{}\"", digest(body))
}

/// Whether an `If-Match` value holds for the resource whose GET would
/// answer `body` (RFC 9110 13.1.1): `*`, or one of the listed ETags by
/// strong comparison (a weak `W/` tag never matches). The tag of any
/// content coding of that body (`"<digest>-gzip"`) matches too: each names
/// the same state.
pub fn if_match_holds(header_value: &str, body: &[u8]) -> bool {
    if_match_holds_for(header_value, &digest(body))
}

/// [`if_match_holds`] for the body whose ETag digest is `current`.
fn if_match_holds_for(header_value: &str, current: &str) -> bool {
    header_value.split(',').any(|t| {
        let t = t.trim();
        if t == "*" {
            return true;
        }
        let Some(tag) = t.strip_prefix('"').and_then(|t| t.strip_suffix('"')) else {
            return false;
        };
        tag == current
            || tag.strip_prefix(current).is_some_and(|coding| {
                [Encoding::Zstd, Encoding::Brotli, Encoding::Gzip]
                    .iter()
                    .any(|e| coding.strip_prefix('-') == Some(e.token()))
            })
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

/// What every response varies by; with CORS_ORIGINS set, the CORS headers
/// depend on `Origin` too.
pub fn vary(cors: bool) -> HeaderValue {
    HeaderValue::from_static(if cors {
        "Authorization, Accept-Encoding, Origin"
    } else {
        "Authorization, Accept-Encoding"
    })
}

/// Marks an answer made outside this layer (a refusal of the limits or the
/// CORS layer, a failed precondition) as this layer marks an error:
/// `no-store` and `Vary`, unless it says otherwise.
pub fn mark(resp: &mut Response, cors: bool) {
    let h = resp.headers_mut();
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if !h.contains_key(header::VARY) {
        h.insert(header::VARY, vary(cors));
    }
}

/// ETag / 304, Cache-Control, Vary and compression for buffered bodies.
pub async fn with_representation<E: Endpoint>(
    ep: Arc<E>,
    req: Request,
    state: Arc<AppState>,
    routes: Arc<Routes>,
) -> poem::Result<Response> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let raw_body = req.extensions().get::<RawBody>().cloned();
    // Every `Accept-Encoding` line: they make one list (RFC 9110 5.3).
    let accept = accept_encoding(req.headers());
    // A HEAD is answered as its GET would be, body left out: its ETag,
    // encoding and 304 are the GET's (the router would otherwise drop the
    // body before its digest is taken).
    let head = method == Method::HEAD;
    let mut req = req;
    if head {
        req.set_method(Method::GET);
        req.extensions_mut().insert(Head);
    }
    // The preconditions of a read, each header's lines as one list.
    let im = field_list(req.headers(), header::IF_MATCH);
    let inm = field_list(req.headers(), header::IF_NONE_MATCH);
    let (result, cached) = CACHED
        .scope(RefCell::new(None), async {
            let r = ep.call(req).await;
            (r, CACHED.with(|c| c.borrow_mut().take()))
        })
        .await;
    let mut resp = result.map(IntoResponse::into_response).unwrap_or_else(|e| {
        let body = raw_body.as_ref().map(|b| &b.0[..]);
        explained_error(e, &routes, method.as_str(), &path, body)
    });
    let headers = resp.headers_mut();
    headers.insert(header::VARY, vary(!state.config.cors_origins.is_empty()));
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        || resp.extensions().get::<Streaming>().is_some()
    {
        if head {
            resp.set_body(());
        }
        return Ok(resp);
    }
    let cacheable =
        (method == Method::GET || method == Method::HEAD) && resp.status() == StatusCode::OK;
    if !resp.headers().contains_key(header::CACHE_CONTROL) {
        // Reads are revalidated every time (`no-cache`, answered 304 by the
        // ETag while nothing changed): the server's own cache is invalidated
        // by each write's event, a client's copy would not be, so a
        // `max-age` would let a client show data older than its own write.
        let value = if cacheable && path.starts_with("/api/v2/") {
            "private, no-cache"
        } else if cacheable
            && (path == "/openapi.json" || path.starts_with("/docs") || path.starts_with("/assets"))
        {
            "no-cache"
        } else {
            "no-store"
        };
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static(value));
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
    // The cache entry this body came from, when it is that entry's body;
    // for a static document, the body it answered with last time.
    let cached = cached.filter(|c| c.bytes == bytes);
    let from_cache = cached.is_some();
    let cached =
        cached.or_else(|| (cacheable && is_static(&path)).then(|| static_body(&path, &bytes)));
    // A body the compressor failed on before is sent without a coding,
    // under its uncompressed tag (so a client's If-None-Match matches it).
    if let (Some(c), Some(i)) = (&cached, slot(enc)) {
        if matches!(c.encoded[i].get(), Some(None)) {
            enc = Encoding::Identity;
        }
    }
    let mut resp = Response::from_parts(parts, poem::Body::empty());
    // The tag of the body without a coding, for a compression that fails.
    let mut identity_tag = None;
    if cacheable {
        // Strong ETag of the representation: the body's digest, plus the
        // encoding, since each encoding is a different byte sequence.
        let digest = match &cached {
            Some(c) => c.etag.get_or_init(|| digest(&c.bytes)).clone(),
            None => digest(&bytes),
        };
        let etag = match enc {
            Encoding::Identity => format!("\"{digest}\""),
            e => {
                identity_tag = HeaderValue::from_str(&format!("\"{digest}\"")).ok();
                format!("\"{digest}-{}\"", e.token())
            }
        };
        if let Ok(v) = HeaderValue::from_str(&etag) {
            resp.headers_mut().insert(header::ETAG, v);
        }
        // If-Match first (RFC 9110 13.2.2): when no listed tag names this
        // body (in any content coding; `*` names any), 412 whatever
        // If-None-Match says.
        if im
            .as_deref()
            .is_some_and(|v| !if_match_holds_for(v, &digest))
        {
            let mut failed = ApiError::precondition_failed(
                format!(
                    "If-Match: no tag listed names the current state of {path} \
                     (details.etag does); GET it again"
                ),
                &etag,
            )
            .into_response();
            mark(&mut failed, !state.config.cors_origins.is_empty());
            if head {
                failed.set_body(());
            }
            return Ok(failed);
        }
        if if_none_match_hits(inm.as_deref(), &etag) {
            resp.set_status(StatusCode::NOT_MODIFIED);
            resp.headers_mut().remove(header::CONTENT_TYPE);
            resp.headers_mut().remove(header::CONTENT_LENGTH);
            return Ok(resp);
        }
    }
    if let Some(i) = slot(enc) {
        let level = state.config.compression_level;
        let compressed = match &cached {
            Some(c) => match c.encoded[i].get() {
                Some(done) => {
                    if from_cache {
                        state
                            .cache
                            .stats
                            .encodings_reused
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    done.clone()
                }
                None => {
                    let made = encode(enc, &bytes, level).await;
                    c.encoded[i].get_or_init(|| made).clone()
                }
            },
            None => encode(enc, &bytes, level).await,
        };
        if let Some(c) = compressed {
            resp.headers_mut().insert(
                header::CONTENT_ENCODING,
                HeaderValue::from_static(enc.token()),
            );
            resp.headers_mut().remove(header::CONTENT_LENGTH);
            return Ok(with_body(resp, c, head));
        }
        // Not compressed after all (the compressor failed): the body goes
        // without a coding, and so does its tag.
        if let Some(tag) = identity_tag {
            resp.headers_mut().insert(header::ETAG, tag);
        }
    }
    Ok(with_body(resp, bytes, head))
}

/// Marks a request that came as a HEAD and is handled as its GET: a
/// handler whose GET has effects beyond its answer (an export runs) skips
/// them.
#[derive(Clone, Copy, Debug)]
pub struct Head;

/// The response with its body, or for a HEAD with the length it would have.
fn with_body(mut resp: Response, body: impl Into<bytes::Bytes>, head: bool) -> Response {
    let body = body.into();
    if head {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        resp.set_body(());
    } else {
        resp.set_body(body);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_by_strong_comparison() {
        let body = b"{\"data\":{\"id\":1}}";
        let tag = etag_of(body);
        let bare = tag.trim_matches('"');
        assert!(if_match_holds(&tag, body));
        assert!(if_match_holds("*", body));
        assert!(if_match_holds(&format!("\"x\", {tag}"), body));
        assert!(if_match_holds(&format!("\"{bare}-gzip\""), body));
        assert!(if_match_holds(&format!("\"{bare}-zstd\""), body));
        assert!(!if_match_holds(&format!("W/{tag}"), body));
        assert!(!if_match_holds(&format!("\"{bare}-deflate\""), body));
        assert!(!if_match_holds(bare, body));
        assert!(!if_match_holds("\"nonsense\"", body));
        assert!(!if_match_holds("", body));
        assert!(!if_match_holds(&tag, b"{\"data\":{\"id\":2}}"));
        // Two header lines joined into one list.
        assert!(if_match_holds(&format!("\"zz\", {tag}"), body));
    }

    /// A static document's body is kept with its encodings while it is
    /// the same, and replaced when it changes; other paths are not kept.
    #[test]
    fn static_documents_keep_their_encodings() {
        let a = Bytes::from_static(b"<html>explorer</html>");
        let first = static_body("/docs/test-page", &a);
        let _ = first.encoded[0].set(Some(Bytes::from_static(b"z")));
        let again = static_body("/docs/test-page", &Bytes::copy_from_slice(&a));
        assert!(Arc::ptr_eq(&first, &again));
        assert!(again.encoded[0].get().is_some());
        let changed = static_body("/docs/test-page", &Bytes::from_static(b"<html>new</html>"));
        assert!(!Arc::ptr_eq(&first, &changed));
        assert!(changed.encoded[0].get().is_none());
        assert!(is_static("/") && is_static("/openapi.json") && is_static("/assets/app.js"));
        assert!(!is_static("/api/v2/sales") && !is_static("/docsx") && !is_static("/health"));
    }

    #[test]
    fn etag_matching() {
        assert!(if_none_match_hits(Some("\"a\", \"b\""), "\"b\""));
        assert!(if_none_match_hits(Some("W/\"b\""), "\"b\""));
        assert!(if_none_match_hits(Some("*"), "\"b\""));
        assert!(!if_none_match_hits(Some("\"c\""), "\"b\""));
        assert!(!if_none_match_hits(None, "\"b\""));
    }
}
