//! In-process backend (moka) with the same tag semantics, for a single
//! instance without Redis.

use moka::future::Cache as Moka;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::RwLock;
use tokio::time::Instant;

/// How long past the entries' lifetime a tag's version is kept: longer
/// than any read takes between reading the versions and storing its entry
/// (a few statements and their retries, each bounded by `DB_QUERY_TIMEOUT`,
/// at most an hour), so an entry stored under a version from before a bump
/// has expired before that bump is forgotten.
const TAG_MARGIN: Duration = Duration::from_secs(6 * 3600);

pub struct MemoryCache {
    entries: Moka<String, Arc<Vec<u8>>>,
    tags: RwLock<Tags>,
    ttl: Duration,
}

/// Each tag's version and when it was last bumped. Versions come from one
/// counter, so a tag bumped again after being forgotten never takes a
/// version an entry of it was stored under; a forgotten tag reads 0, which
/// only entries stored after its last bump's lifetime could hold.
struct Tags {
    versions: HashMap<String, (u64, Instant)>,
    next: u64,
    pruned: Instant,
}

impl MemoryCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            entries: Moka::builder()
                .time_to_live(ttl)
                .weigher(|k: &String, v: &Arc<Vec<u8>>| {
                    (k.len() + v.len()).min(u32::MAX as usize) as u32
                })
                .max_capacity(256 << 20)
                .build(),
            tags: RwLock::new(Tags {
                versions: HashMap::new(),
                next: 1,
                pruned: Instant::now(),
            }),
            ttl,
        }
    }

    pub async fn fetch(&self, key: &str, tag_keys: &[String]) -> (Option<Vec<u8>>, Vec<u64>) {
        let versions = {
            let tags = self.tags.read().await;
            tag_keys
                .iter()
                .map(|t| tags.versions.get(t).map_or(0, |v| v.0))
                .collect()
        };
        (
            self.entries.get(key).await.map(|v| v.as_ref().clone()),
            versions,
        )
    }

    pub async fn put(&self, key: &str, raw: Vec<u8>) {
        self.entries.insert(key.to_string(), Arc::new(raw)).await;
    }

    pub async fn bump(&self, tag_keys: &[String]) {
        let now = Instant::now();
        let mut tags = self.tags.write().await;
        for t in tag_keys {
            let v = tags.next;
            tags.next += 1;
            tags.versions.insert(t.clone(), (v, now));
        }
        // Tags not bumped for longer than an entry can depend on them are
        // forgotten (once a minute at most): the map holds what was written
        // lately, not every store-month and record ever written.
        let keep = self.ttl + TAG_MARGIN;
        if now.duration_since(tags.pruned) > Duration::from_secs(60) {
            tags.versions
                .retain(|_, (_, at)| now.duration_since(*at) <= keep);
            tags.pruned = now;
        }
    }

    /// Tags whose version is held.
    #[cfg(test)]
    async fn held(&self) -> usize {
        self.tags.read().await.versions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bump moves every tag it names to a version no entry holds; a tag
    /// not bumped for longer than entries live (and the margin) is
    /// forgotten, and bumped again it still takes a new version.
    #[tokio::test(start_paused = true)]
    async fn tags_are_versioned_once_and_forgotten_when_old() {
        let c = MemoryCache::new(Duration::from_secs(5));
        let t = |s: &str| vec![s.to_string()];
        assert_eq!(c.fetch("k", &t("a")).await.1, [0]);
        c.bump(&t("a")).await;
        let (_, v1) = c.fetch("k", &t("a")).await;
        assert_ne!(v1, [0]);
        c.bump(&t("b")).await;
        assert_eq!(c.held().await, 2);
        // Past the entries' lifetime and the margin, the next bump (of
        // another tag, a minute after the last pruning) forgets them.
        tokio::time::advance(Duration::from_secs(5) + TAG_MARGIN + Duration::from_secs(61)).await;
        c.bump(&t("c")).await;
        assert_eq!(c.held().await, 1, "only c");
        assert_eq!(c.fetch("k", &t("a")).await.1, [0]);
        c.bump(&t("a")).await;
        let (_, v2) = c.fetch("k", &t("a")).await;
        assert_ne!(v2, v1, "a version is never given twice");
        assert_ne!(v2, [0]);
    }
}
