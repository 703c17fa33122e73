//! Response cache with tag-based invalidation, over Redis (shared by every
//! instance) or, without `REDIS_URL`, in process (one instance).
//!
//! Tags are version counters. An entry records the version of each of its
//! tags when it was computed; invalidating a tag increments its counter, so
//! every entry that depends on it becomes stale at once, on every instance,
//! in O(1). A read fetches the entry and the current tag versions in one
//! round trip (MGET) and serves the entry only if they still match.
//!
//! Race-free by construction: the miss path reads the tag versions *before*
//! querying Postgres and stores the entry under those versions. A write that
//! lands in between bumps a version, so the just-stored entry is already
//! stale and is never served.
//!
//! Keys include the caller's scope, so two callers who see different stores
//! never share an entry. If Redis is down or slow (REDIS_TIMEOUT), the cache
//! answers "miss" and requests go to Postgres; `/health` says degraded.

pub mod memory;
pub mod redis;

use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The tag every entry carries: bumping it clears the whole cache.
pub const TAG_ALL: &str = "all";
/// Entries that depend on every store's sales (unfiltered lists, summaries).
pub const TAG_SALES_ALL: &str = "sales:all";
/// Entries that depend on the store list.
pub const TAG_STORES: &str = "stores";

pub fn tag_store(store: i64) -> String {
    format!("store:{store}")
}

pub fn tag_store_month(store: i64, year: i64, month: i64) -> String {
    format!("store:{store}:{year}-{month:02}")
}

pub fn tag_row(id: i64) -> String {
    format!("row:{id}")
}

/// Entries that embed a store's document (`store.*` fields).
pub fn tag_store_doc(store: i64) -> String {
    format!("storedoc:{store}")
}

/// The tags touched by the events the current transaction has written.
/// Write handlers call it before COMMIT and invalidate right after, so the
/// writer reads its own writes at once (other instances learn through the
/// relay).
pub async fn tx_event_tags(conn: &mut sqlx::PgConnection) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String, Option<i64>, Option<i64>, serde_json::Value)> = sqlx::query_as(
        "SELECT DISTINCT kind, store_id, row_id,
                jsonb_build_object('year', payload->'year', 'month', payload->'month',
                                   'previousStoreId', payload->'previousStoreId')
         FROM sales.transaction_events()",
    )
    .fetch_all(conn)
    .await?;
    let mut tags: Vec<String> = rows
        .iter()
        .flat_map(|(k, s, r, p)| tags_for_event(k, *s, *r, p))
        .collect();
    tags.sort();
    tags.dedup();
    Ok(tags)
}

/// The tags an event invalidates. Every sales change touches its store,
/// its store-month, its row, and the cross-store views.
pub fn tags_for_event(
    kind: &str,
    store_id: Option<i64>,
    row_id: Option<i64>,
    payload: &serde_json::Value,
) -> Vec<String> {
    let mut tags = Vec::new();
    if kind.starts_with("sales-data-") {
        tags.push(TAG_SALES_ALL.to_string());
        if let Some(s) = store_id {
            tags.push(tag_store(s));
            if let (Some(y), Some(m)) = (payload["year"].as_i64(), payload["month"].as_i64()) {
                tags.push(tag_store_month(s, y, m));
            }
        }
        if let Some(prev) = payload["previousStoreId"].as_i64() {
            tags.push(tag_store(prev));
        }
        if let Some(r) = row_id {
            tags.push(tag_row(r));
        }
    } else if kind.starts_with("store-") {
        tags.push(TAG_STORES.to_string());
        // Store documents appear inside sales documents (`store.name`) and
        // regions drive summaries.
        tags.push(TAG_SALES_ALL.to_string());
        if let Some(s) = store_id {
            tags.push(tag_store(s));
            tags.push(tag_store_doc(s));
        }
    }
    tags
}

/// A cached value and the tag versions it was computed under.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub versions: Vec<u64>,
    pub body: Vec<u8>,
}

const FLAG_PLAIN: u8 = 0;
const FLAG_ZSTD: u8 = 1;

impl Entry {
    /// `[n: u8][n x u64 LE versions][flag: u8][body]`, body zstd-compressed
    /// when at least `compress_min` bytes. Returns (bytes, bytes saved).
    pub fn encode(&self, compress_min: usize) -> (Vec<u8>, u64) {
        let mut out = Vec::with_capacity(self.body.len() / 2 + 16);
        out.push(self.versions.len() as u8);
        for v in &self.versions {
            out.extend_from_slice(&v.to_le_bytes());
        }
        if self.body.len() >= compress_min {
            if let Ok(c) = zstd::bulk::compress(&self.body, 1) {
                if c.len() < self.body.len() {
                    out.push(FLAG_ZSTD);
                    let saved = (self.body.len() - c.len()) as u64;
                    out.extend_from_slice(&c);
                    return (out, saved);
                }
            }
        }
        out.push(FLAG_PLAIN);
        out.extend_from_slice(&self.body);
        (out, 0)
    }

    pub fn decode(raw: &[u8]) -> Option<Self> {
        let n = *raw.first()? as usize;
        let header = 1 + n * 8;
        if raw.len() < header + 1 {
            return None;
        }
        let versions = (0..n)
            .map(|i| u64::from_le_bytes(raw[1 + i * 8..9 + i * 8].try_into().unwrap_or_default()))
            .collect();
        let body = match raw[header] {
            FLAG_PLAIN => raw[header + 1..].to_vec(),
            FLAG_ZSTD => zstd::bulk::decompress(&raw[header + 1..], 64 << 20).ok()?,
            _ => return None,
        };
        Some(Self { versions, body })
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub sets: AtomicU64,
    pub errors: AtomicU64,
    pub invalidations: AtomicU64,
    pub bytes_saved: AtomicU64,
    pub bytes_stored: AtomicU64,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsSnapshot {
    pub backend: &'static str,
    pub healthy: bool,
    pub hits: u64,
    pub misses: u64,
    pub hit_rate: f64,
    pub sets: u64,
    pub errors: u64,
    pub invalidations: u64,
    pub bytes_stored: u64,
    pub bytes_saved_by_compression: u64,
}

/// What a lookup found.
pub enum Lookup {
    /// A fresh entry.
    Hit(Vec<u8>),
    /// Nothing usable; store the computed value with these tag versions
    /// (None: the backend is unavailable, do not store).
    Miss(Option<Vec<u64>>),
}

pub enum Backend {
    Redis(redis::RedisCache),
    Memory(memory::MemoryCache),
}

pub struct Cache {
    backend: Backend,
    pub stats: Arc<Stats>,
    prefix: String,
    ttl: Duration,
    compress_min: usize,
    degraded: Arc<AtomicBool>,
    /// Invalidations that failed (Redis unreachable), counted; `settled` is
    /// the count the last full clear covered. While they differ, Redis may
    /// hold entries a write has made stale (it comes back from a snapshot,
    /// or a partition heals), so nothing is served until every entry has
    /// been invalidated at once.
    lost: AtomicU64,
    settled: AtomicU64,
}

impl Cache {
    pub fn new(config: &crate::config::Config) -> Self {
        let stats = Arc::new(Stats::default());
        let degraded = Arc::new(AtomicBool::new(false));
        let backend = if !config.redis_cluster_urls.is_empty() || config.redis_url.is_some() {
            Backend::Redis(redis::RedisCache::start(config, degraded.clone()))
        } else {
            Backend::Memory(memory::MemoryCache::new(config.cache_ttl))
        };
        Self {
            backend,
            stats,
            prefix: config.cache_prefix.clone(),
            ttl: config.cache_ttl,
            compress_min: config.cache_compress_min,
            degraded,
            lost: AtomicU64::new(0),
            settled: AtomicU64::new(0),
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Redis(r) if r.is_cluster() => "redis-cluster",
            Backend::Redis(_) => "redis",
            Backend::Memory(_) => "memory",
        }
    }

    /// False while Redis is configured but unreachable.
    pub fn healthy(&self) -> bool {
        !self.degraded.load(Ordering::Relaxed)
    }

    /// The entry key for a request: route, normalised query and the caller's scope.
    pub fn key(&self, route: &str, query: &[(String, String)], scope: &str) -> String {
        let mut q: Vec<&(String, String)> = query.iter().collect();
        q.sort();
        let mut h = Sha256::new();
        h.update(route.as_bytes());
        for (k, v) in q {
            h.update([0]);
            h.update(k.as_bytes());
            h.update([1]);
            h.update(v.as_bytes());
        }
        h.update([2]);
        h.update(scope.as_bytes());
        let d = h.finalize();
        format!(
            "{}:e:{}",
            self.prefix,
            d[..16]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        )
    }

    fn tag_key(&self, tag: &str) -> String {
        format!("{}:t:{tag}", self.prefix)
    }

    fn tag_keys(&self, tags: &[String]) -> Vec<String> {
        std::iter::once(self.tag_key(TAG_ALL))
            .chain(tags.iter().map(|t| self.tag_key(t)))
            .collect()
    }

    pub async fn lookup(&self, key: &str, tags: &[String]) -> Lookup {
        if !self.settle_lost_invalidations().await {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return Lookup::Miss(None);
        }
        let tag_keys = self.tag_keys(tags);
        let found = match &self.backend {
            Backend::Redis(r) => r.fetch(key, &tag_keys).await,
            Backend::Memory(m) => Ok(m.fetch(key, &tag_keys).await),
        };
        match found {
            Ok((raw, versions)) => {
                if let Some(entry) = raw.as_deref().and_then(Entry::decode) {
                    if entry.versions == versions {
                        self.stats.hits.fetch_add(1, Ordering::Relaxed);
                        return Lookup::Hit(entry.body);
                    }
                }
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                Lookup::Miss(Some(versions))
            }
            Err(()) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                Lookup::Miss(None)
            }
        }
    }

    /// After a failed invalidation, bumps the tag every entry carries before
    /// anything is served again. False while that is not possible yet.
    async fn settle_lost_invalidations(&self) -> bool {
        let lost = self.lost.load(Ordering::Acquire);
        if lost == self.settled.load(Ordering::Acquire) {
            return true;
        }
        let Backend::Redis(r) = &self.backend else {
            return true;
        };
        if r.bump(&[self.tag_key(TAG_ALL)]).await.is_err() {
            return false;
        }
        if self.settled.fetch_max(lost, Ordering::AcqRel) < lost {
            tracing::info!("cache cleared: invalidations were lost while Redis was unavailable");
        }
        true
    }

    pub async fn store(&self, key: &str, versions: Vec<u64>, body: Vec<u8>) {
        let (raw, saved) = Entry { versions, body }.encode(self.compress_min);
        self.stats.bytes_saved.fetch_add(saved, Ordering::Relaxed);
        self.stats
            .bytes_stored
            .fetch_add(raw.len() as u64, Ordering::Relaxed);
        let ok = match &self.backend {
            Backend::Redis(r) => r.put(key, raw, self.ttl).await.is_ok(),
            Backend::Memory(m) => {
                m.put(key, raw).await;
                true
            }
        };
        if ok {
            self.stats.sets.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Makes every entry tagged with any of `tags` stale, on every instance.
    pub async fn invalidate(&self, tags: &[String]) {
        if tags.is_empty() {
            return;
        }
        let mut keys: Vec<String> = tags.iter().map(|t| self.tag_key(t)).collect();
        keys.sort();
        keys.dedup();
        let ok = match &self.backend {
            Backend::Redis(r) => r.bump(&keys).await.is_ok(),
            Backend::Memory(m) => {
                m.bump(&keys).await;
                true
            }
        };
        if ok {
            self.stats
                .invalidations
                .fetch_add(keys.len() as u64, Ordering::Relaxed);
        } else {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            self.lost.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Clears everything (bumps the tag all entries carry).
    pub async fn clear_all(&self) {
        self.invalidate(&[TAG_ALL.to_string()]).await;
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let s = &self.stats;
        let hits = s.hits.load(Ordering::Relaxed);
        let misses = s.misses.load(Ordering::Relaxed);
        StatsSnapshot {
            backend: self.backend_name(),
            healthy: self.healthy(),
            hits,
            misses,
            hit_rate: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            sets: s.sets.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            invalidations: s.invalidations.load(Ordering::Relaxed),
            bytes_stored: s.bytes_stored.load(Ordering::Relaxed),
            bytes_saved_by_compression: s.bytes_saved.load(Ordering::Relaxed),
        }
    }

    /// Waits up to `limit` for the first Redis connection (no-op in process).
    pub async fn wait_ready(&self, limit: Duration) {
        if let Backend::Redis(r) = &self.backend {
            let deadline = tokio::time::Instant::now() + limit;
            while !r.connected().await && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// Redis reachability for /health (None for the in-process cache).
    pub async fn ping(&self) -> Option<Result<Duration, String>> {
        match &self.backend {
            Backend::Redis(r) => Some(r.ping().await),
            Backend::Memory(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn entry_round_trip() {
        let e = Entry {
            versions: vec![1, 7, 99],
            body: b"{\"data\":[]}".repeat(200),
        };
        let (raw, saved) = e.encode(1024);
        assert!(saved > 0);
        assert_eq!(Entry::decode(&raw).unwrap(), e);
        let small = Entry {
            versions: vec![],
            body: b"{}".to_vec(),
        };
        let (raw, saved) = small.encode(1024);
        assert_eq!(saved, 0);
        assert_eq!(Entry::decode(&raw).unwrap(), small);
        assert!(Entry::decode(&[3, 0]).is_none());
    }

    #[test]
    fn event_tags() {
        let t = tags_for_event(
            "sales-data-updated",
            Some(4),
            Some(10),
            &json!({"year": 2024, "month": 3}),
        );
        assert!(t.contains(&"store:4".to_string()));
        assert!(t.contains(&"store:4:2024-03".to_string()));
        assert!(t.contains(&"row:10".to_string()));
        assert!(t.contains(&TAG_SALES_ALL.to_string()));
        let t = tags_for_event("store-status-changed", Some(4), Some(4), &json!({}));
        assert!(t.contains(&TAG_STORES.to_string()));
        assert!(tags_for_event("system-announcement", None, None, &json!({})).is_empty());
    }
}
