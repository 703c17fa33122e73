//! In-process backend (moka) with the same tag semantics, for a single
//! instance without Redis.

use moka::future::Cache as Moka;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::RwLock;

pub struct MemoryCache {
    entries: Moka<String, Arc<Vec<u8>>>,
    tags: RwLock<HashMap<String, u64>>,
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
            tags: RwLock::new(HashMap::new()),
        }
    }

    pub async fn fetch(&self, key: &str, tag_keys: &[String]) -> (Option<Vec<u8>>, Vec<u64>) {
        let versions = {
            let tags = self.tags.read().await;
            tag_keys
                .iter()
                .map(|t| tags.get(t).copied().unwrap_or(0))
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
        let mut tags = self.tags.write().await;
        for t in tag_keys {
            *tags.entry(t.clone()).or_insert(0) += 1;
        }
    }
}
