//! Read-through caching for GET handlers: the key is the operation, the
//! parameters as the handler parsed and validated them (never the raw
//! query: two spellings of one request share an entry, and nothing the
//! handler ignores can tell two entries apart), and the caller's scope; the
//! tags say what the response depends on.

use super::error::{ApiError, ApiResult};
use crate::auth::Principal;
use crate::cache::{self, Lookup};
use crate::state::AppState;
use std::future::Future;

/// Serves from the cache when fresh; otherwise computes, stores and returns.
pub async fn cached<F, Fut>(
    state: &AppState,
    operation: &str,
    params: &impl std::fmt::Debug,
    who: &Principal,
    tags: Vec<String>,
    compute: F,
) -> ApiResult<String>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ApiResult<String>>,
{
    // Debug output quotes and escapes strings, so no value can forge a
    // separator and pass for another parameter.
    let parsed = [("params".to_string(), format!("{params:?}"))];
    let key = state.cache.key(operation, &parsed, &who.scope_key());
    match state.cache.lookup(&key, &tags).await {
        Lookup::Hit(body) => {
            super::error::set_cache_status("hit");
            let text = String::from_utf8(body.bytes.to_vec()).map_err(ApiError::internal)?;
            // The representation middleware serves the entry's digest and
            // encodings when the response body is this entry's body.
            super::middleware::offer_cached(body);
            Ok(text)
        }
        Lookup::Miss(versions) => {
            super::error::set_cache_status("miss");
            let body = compute().await?;
            if let Some(v) = versions {
                state.cache.store(&key, v, body.clone().into_bytes()).await;
            }
            Ok(body)
        }
    }
}

/// Tags for a sales query: the narrowest set of things it depends on.
pub fn sales_tags(
    store_ids: Option<&[i64]>,
    year: Option<i32>,
    month: Option<i32>,
    who: &Principal,
    with_store_doc: bool,
) -> Vec<String> {
    // The stores the answer can contain.
    let stores: Option<Vec<i64>> = match (store_ids, who.scope()) {
        (Some(ids), _) => Some(ids.to_vec()),
        (None, Some(scope)) => Some(scope),
        (None, None) => None,
    };
    let mut tags = match stores {
        Some(s) if s.len() == 1 => match (year, month) {
            (Some(y), Some(m)) => vec![cache::tag_store_month(s[0], y as i64, m as i64)],
            _ => vec![cache::tag_store(s[0])],
        },
        Some(s) if s.len() <= 32 => s.iter().map(|id| cache::tag_store(*id)).collect(),
        _ => vec![cache::TAG_SALES_ALL.to_string()],
    };
    if with_store_doc {
        tags.push(cache::TAG_STORES.to_string());
    }
    tags
}
