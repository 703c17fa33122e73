//! Read-through caching for GET handlers: the key is route + normalised
//! query + the caller's scope; the tags say what the response depends on.

use super::error::{ApiError, ApiResult};
use crate::auth::Principal;
use crate::cache::{self, Lookup};
use crate::state::AppState;
use poem::Request;
use std::future::Future;

fn query_pairs(req: &Request) -> Vec<(String, String)> {
    req.uri()
        .query()
        .map(|q| {
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode(k), decode(v))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Serves from the cache when fresh; otherwise computes, stores and returns.
pub async fn cached<F, Fut>(
    state: &AppState,
    req: &Request,
    who: &Principal,
    tags: Vec<String>,
    compute: F,
) -> ApiResult<String>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ApiResult<String>>,
{
    let key = state
        .cache
        .key(req.uri().path(), &query_pairs(req), &who.scope_key());
    match state.cache.lookup(&key, &tags).await {
        Lookup::Hit(body) => {
            super::error::set_cache_status("hit");
            String::from_utf8(body).map_err(ApiError::internal)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(decode("a%2Cb+c"), "a,b c");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
    }
}
