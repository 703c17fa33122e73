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
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The tag every entry carries: bumping it clears the whole cache.
pub const TAG_ALL: &str = "all";
/// Entries that depend on every store's sales (unfiltered lists, summaries).
pub const TAG_SALES_ALL: &str = "sales:all";
/// Entries that depend on the store list.
pub const TAG_STORES: &str = "stores";
/// Entries that show users' details (a history's actors and their emails).
pub const TAG_USERS: &str = "users";
/// Entries read from the event log's past (histories, past versions):
/// pruning makes them stale.
pub const TAG_HISTORY: &str = "history";

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

/// Invalidation off the delivery path. [`Invalidator::invalidate_soon`]
/// marks the tags at once (this instance stops serving entries under them:
/// a lookup that finds one pending is a miss, so its answer comes from
/// Postgres, which already holds the change) and a background task applies
/// the invalidation to the backend (Redis: one pipelined INCR for
/// everything marked meanwhile), then unmarks them. The relay calls it
/// before dispatching an event, so a client that reads after receiving the
/// event never gets the older cached value from this instance, however slow
/// Redis is; other instances mark the same tags from their own relay.
///
/// The relay also says up to which delivery position its events are:
/// once their invalidation is applied, the backend records that position
/// (`{prefix}:relayed:{epoch}`, the highest any instance reached in the
/// event log of that epoch), from which a starting instance knows what it
/// must invalidate itself (see [`Cache::catch_up`]).
#[derive(Clone)]
pub struct Invalidator {
    cache: Arc<Cache>,
    tx: tokio::sync::mpsc::UnboundedSender<Marked>,
}

/// Tags marked stale, and the delivery position (in the event log of the
/// epoch named) their events reach.
type Marked = (Vec<String>, Option<(Arc<str>, i64)>);

impl Invalidator {
    pub fn spawn(cache: Arc<Cache>) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Marked>();
        let c = cache.clone();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut marked = vec![first];
                while let Ok(more) = rx.try_recv() {
                    marked.push(more);
                }
                let mut tags: Vec<String> = marked.iter().flat_map(|(t, _)| t).cloned().collect();
                tags.sort();
                tags.dedup();
                let applied = c.invalidate(&tags).await;
                // Positions in the log being read now only: one marked
                // before the log was replaced is a number of the old log.
                let epoch = c.log_epoch();
                let upto = marked
                    .iter()
                    .filter_map(|m| m.1.as_ref())
                    .filter(|(e, _)| *e == epoch)
                    .map(|(_, u)| *u)
                    .max();
                if let (true, Some(upto)) = (applied, upto) {
                    if c.may_mark_relayed().await {
                        // Under the epoch the position was checked against
                        // (the log may be found replaced meanwhile).
                        c.mark_relayed(&epoch, upto).await;
                    }
                }
                for (m, _) in &marked {
                    c.unmark_pending(m);
                }
            }
        });
        Self { cache, tx }
    }

    /// Makes every entry of this instance's in-process first level stale
    /// (another instance cleared the shared cache).
    pub fn drop_first_level(&self) {
        self.cache.drop_first_level();
    }

    /// The relay reads another event log from here on (see
    /// [`Cache::set_log_epoch`]).
    pub fn set_log_epoch(&self, epoch: &str) {
        self.cache.set_log_epoch(epoch);
    }

    /// Marks `tags` stale on this instance now; the backend follows.
    pub fn invalidate_soon(&self, tags: Vec<String>) {
        self.invalidate_soon_upto(tags, None);
    }

    /// As [`Self::invalidate_soon`], for events delivered up to position
    /// `upto` (recorded once their invalidation is applied).
    pub fn invalidate_soon_upto(&self, tags: Vec<String>, upto: Option<i64>) {
        if tags.is_empty() && upto.is_none() {
            return;
        }
        self.cache.mark_pending(&tags);
        let upto = upto.map(|u| (self.cache.log_epoch(), u));
        if let Err(e) = self.tx.send((tags, upto)) {
            // The worker is gone (runtime shutting down): nothing to serve.
            self.cache.unmark_pending(&e.0 .0);
        }
    }
}

/// Events a starting instance reads back from the log to invalidate their
/// tags itself; past this many it makes every entry stale instead.
const CATCH_UP_EVENTS: i64 = 10_000;

/// How long a log's relayed position (`{prefix}:relayed:{epoch}`) lives
/// after its last mark. Marked with every invalidation the relay applies
/// and at every start; one that expired (a log no instance relays, or no
/// event in 30 days) is what a first start finds: every entry is made
/// stale once.
pub const RELAYED_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Tags held pending by [`Cache::hold`]; released when dropped.
pub struct Held {
    cache: Arc<Cache>,
    tags: Vec<String>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.cache.unmark_pending(&self.tags);
    }
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
    /// Hits the first level served (also counted in `hits`).
    pub l1_hits: AtomicU64,
    /// Compressed hits whose encoding was already kept with the entry.
    pub encodings_reused: AtomicU64,
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
    pub l1_hits: u64,
    pub encodings_reused: u64,
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
    Hit(Arc<CachedBody>),
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
    /// Until [`Cache::catch_up`] has made stale what this instance may have
    /// missed before it started, nothing is served from Redis.
    starting: AtomicBool,
    /// Tags with an invalidation marked but not yet applied (see
    /// [`Invalidator`]): entries under them are not served meanwhile.
    pending: Mutex<HashMap<String, u32>>,
    /// Jobs whose end this instance has applied to the cache, and when
    /// ([`Cache::settled`], [`Cache::mark_settled`]).
    settled_jobs: Mutex<HashMap<i64, std::time::Instant>>,
    pending_count: AtomicUsize,
    /// The first level in front of Redis: entries a Redis lookup found
    /// fresh, served from memory until the next invalidation of any tag on
    /// this instance (`generation` moves), or `CACHE_L1_TTL`. See [`L1`].
    l1: Option<L1>,
    /// The epoch of the event log the relay reads (`sales.event_log_epoch()`):
    /// positions recorded in Redis are numbers of that log's delivery order.
    log_epoch: std::sync::RwLock<Arc<str>>,
}

/// Entries of the first level, each with the invalidation generation it
/// was verified under.
///
/// Every invalidation this instance applies or marks (its own writes, and
/// through the relay every instance's writes) moves one counter, and an
/// entry is served only while the counter is where it was when Redis
/// confirmed the entry. One counter for every tag keeps a hit free of locks
/// and maps; a write drops the whole first level, which refills from Redis
/// on the next lookups. Another instance's write reaches this level as fast
/// as this instance's relay hears of it; the TTL bounds what a relay outage
/// could leave behind.
struct L1 {
    entries: moka::sync::Cache<String, Arc<L1Entry>>,
    /// Shared with the Redis backend, which moves it when Redis restarted.
    generation: Arc<AtomicU64>,
}

struct L1Entry {
    generation: u64,
    body: Arc<CachedBody>,
}

/// A cached response body and what serving it derives from it, computed at
/// most once per entry of the first level rather than on every hit: the
/// ETag digest and the body in each content coding a client asked for.
#[derive(Debug)]
pub struct CachedBody {
    pub bytes: bytes::Bytes,
    pub etag: std::sync::OnceLock<String>,
    /// zstd, br, gzip (None: compressing failed, send it uncompressed).
    pub encoded: [std::sync::OnceLock<Option<bytes::Bytes>>; 3],
}

impl CachedBody {
    pub fn new(bytes: impl Into<bytes::Bytes>) -> Self {
        Self {
            bytes: bytes.into(),
            etag: Default::default(),
            encoded: Default::default(),
        }
    }
}

/// Memory the first level may hold (bodies and keys).
const L1_MAX_BYTES: u64 = 64 << 20;

impl Cache {
    pub fn new(config: &crate::config::Config) -> Self {
        let stats = Arc::new(Stats::default());
        let degraded = Arc::new(AtomicBool::new(false));
        let l1_generation = Arc::new(AtomicU64::new(0));
        let redis = !config.redis_cluster_urls.is_empty() || config.redis_url.is_some();
        let backend = if redis {
            Backend::Redis(redis::RedisCache::start(
                config,
                degraded.clone(),
                l1_generation.clone(),
            ))
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
            starting: AtomicBool::new(redis),
            pending: Mutex::new(HashMap::new()),
            settled_jobs: Mutex::new(HashMap::new()),
            pending_count: AtomicUsize::new(0),
            // The in-process backend is a first level already.
            l1: (redis && !config.cache_l1_ttl.is_zero()).then(|| L1 {
                entries: moka::sync::Cache::builder()
                    .time_to_live(config.cache_l1_ttl)
                    // Weighed when inserted, before any encoding is made:
                    // room for the body and about as much again for the
                    // encodings kept beside it.
                    .weigher(|k: &String, v: &Arc<L1Entry>| {
                        (k.len() + 2 * v.body.bytes.len()).min(u32::MAX as usize) as u32
                    })
                    .max_capacity(L1_MAX_BYTES)
                    .build(),
                generation: l1_generation,
            }),
            log_epoch: std::sync::RwLock::new(Arc::from("")),
        }
    }

    /// Names the event log whose delivery positions this instance records
    /// (set before the relay starts, and again when it finds the log
    /// replaced: restored from a dump, recovered to a point in time, a
    /// standby promoted). A position is kept per epoch, so one recorded in
    /// another log is never taken for this one's: a restored log gives its
    /// positions again, and a starting instance that read the old log's
    /// position as this one's caught up on too little and served what the
    /// restore had taken back until `CACHE_TTL`.
    pub fn set_log_epoch(&self, epoch: &str) {
        *self.log_epoch.write().unwrap_or_else(|e| e.into_inner()) = Arc::from(epoch);
    }

    fn log_epoch(&self) -> Arc<str> {
        self.log_epoch
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether job `id`'s end was applied to the cache on this instance
    /// within `keep` ([`Cache::mark_settled`]); older ids are forgotten.
    pub fn settled(&self, id: i64, keep: Duration) -> bool {
        let now = std::time::Instant::now();
        let mut seen = self.settled_jobs.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|_, at| now.duration_since(*at) < keep);
        seen.contains_key(&id)
    }

    /// Records that job `id`'s end was applied to the cache here.
    pub fn mark_settled(&self, id: i64) {
        self.settled_jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, std::time::Instant::now());
    }

    /// Moves the first level's generation: every entry in it is stale (and
    /// read again from Redis, which every instance's invalidations reach).
    pub fn drop_first_level(&self) {
        if let Some(l1) = &self.l1 {
            l1.generation.fetch_add(1, Ordering::AcqRel);
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
        format!("{}:e:{}", self.prefix, hex::encode(&d[..16]))
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
        if self.starting.load(Ordering::Acquire) || !self.settle_lost_invalidations().await {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return Lookup::Miss(None);
        }
        let pending = self.is_pending(tags);
        let generation = self.l1.as_ref().map(|l1| {
            let g = l1.generation.load(Ordering::Acquire);
            if !pending {
                if let Some(e) = l1.entries.get(key).filter(|e| e.generation == g) {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    self.stats.l1_hits.fetch_add(1, Ordering::Relaxed);
                    return Err(e.body.clone());
                }
            }
            Ok(g)
        });
        let generation = match generation {
            Some(Err(body)) => return Lookup::Hit(body),
            Some(Ok(g)) => Some(g),
            None => None,
        };
        let tag_keys = self.tag_keys(tags);
        let found = match &self.backend {
            Backend::Redis(r) => r.fetch(key, &tag_keys).await,
            Backend::Memory(m) => Ok(m.fetch(key, &tag_keys).await),
        };
        match found {
            Ok((raw, versions)) => {
                if let Some(entry) = raw.as_deref().and_then(Entry::decode) {
                    if entry.versions == versions && !pending {
                        self.stats.hits.fetch_add(1, Ordering::Relaxed);
                        let body = Arc::new(CachedBody::new(entry.body));
                        if let (Some(l1), Some(generation)) = (&self.l1, generation) {
                            // Verified against the tag versions read after
                            // `generation` was: an invalidation since then
                            // has moved it, and the entry is never served.
                            l1.entries.insert(
                                key.to_string(),
                                Arc::new(L1Entry {
                                    generation,
                                    body: body.clone(),
                                }),
                            );
                        }
                        return Lookup::Hit(body);
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

    /// Whether an invalidation of any of `tags` (or of everything) is marked
    /// and not yet applied.
    fn is_pending(&self, tags: &[String]) -> bool {
        if self.pending_count.load(Ordering::Acquire) == 0 {
            return false;
        }
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.contains_key(TAG_ALL) || tags.iter().any(|t| p.contains_key(t))
    }

    /// Holds `tags` pending (entries under them are not served) until the
    /// returned guard is dropped: for a write whose commit makes something
    /// visible before its invalidation is applied (a job's final state), so
    /// that nobody reads the old value from this instance's cache after
    /// seeing the new state.
    pub fn hold(self: &Arc<Self>, tags: &[String]) -> Held {
        self.mark_pending(tags);
        Held {
            cache: self.clone(),
            tags: tags.to_vec(),
        }
    }

    fn mark_pending(&self, tags: &[String]) {
        self.drop_first_level();
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for t in tags {
            *p.entry(t.clone()).or_insert(0) += 1;
        }
        self.pending_count.store(p.len(), Ordering::Release);
    }

    fn unmark_pending(&self, tags: &[String]) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for t in tags {
            if let Some(n) = p.get_mut(t) {
                *n -= 1;
                if *n == 0 {
                    p.remove(t);
                }
            }
        }
        self.pending_count.store(p.len(), Ordering::Release);
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
        if self.degraded.load(Ordering::Relaxed) {
            // Not before the probe finds Redis answering: no read waits.
            return false;
        }
        if r.bump(&[self.tag_key(TAG_ALL)], false).await.is_err() {
            return false;
        }
        if self.settled.fetch_max(lost, Ordering::AcqRel) < lost {
            tracing::info!("cache made stale: this instance may have missed invalidations (it started, or Redis was unavailable)");
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
    /// False when the backend could not be told (the invalidation is then
    /// counted as lost).
    pub async fn invalidate(&self, tags: &[String]) -> bool {
        if tags.is_empty() {
            return true;
        }
        self.drop_first_level();
        let mut keys: Vec<String> = tags.iter().map(|t| self.tag_key(t)).collect();
        keys.sort();
        keys.dedup();
        let ok = match &self.backend {
            // Marked unavailable: still tried (Redis may be back before the
            // probe says so, and another instance may be reading it), but
            // bounded by QUICK_BUMP rather than `REDIS_TIMEOUT`, so a
            // write during an outage does not wait the whole bound. One
            // that fails is counted as lost below, which makes every entry
            // stale before anything is served from Redis again.
            Backend::Redis(r) => r
                .bump(&keys, self.degraded.load(Ordering::Relaxed))
                .await
                .is_ok(),
            Backend::Memory(m) => {
                m.bump(&keys).await;
                true
            }
        };
        // Again after the bump: a lookup that read the generation after the
        // first move but Redis before the bump verified the old entry.
        self.drop_first_level();
        if ok {
            self.stats
                .invalidations
                .fetch_add(keys.len() as u64, Ordering::Relaxed);
        } else {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            self.lost.fetch_add(1, Ordering::AcqRel);
        }
        ok
    }

    /// Whether the position of invalidations just applied may be recorded
    /// as the point up to which every event's were: not while this
    /// instance's start-up catch-up is unfinished (the events before its
    /// relay's start may not be invalidated yet; the catch-up records its
    /// own position when done), nor while an invalidation that failed
    /// earlier is not made good (every entry is made stale first, as a
    /// lookup would). Recorded past them, a restarted instance would find
    /// nothing to catch up on and serve what they left stale.
    async fn may_mark_relayed(&self) -> bool {
        !self.starting.load(Ordering::Acquire) && self.settle_lost_invalidations().await
    }

    /// Records that every event up to delivery position `seq` has had its
    /// invalidation applied (the highest any instance reached is kept).
    /// The position lives [`RELAYED_TTL`] from its last mark, so the keys
    /// of logs no instance relays any more (a restored dump's old epoch,
    /// the timeline before a promotion) do not stay for good.
    async fn mark_relayed(&self, epoch: &str, seq: i64) {
        if let Backend::Redis(r) = &self.backend {
            let _ = r
                .mark_max(&self.relayed_key(epoch), seq, Some(RELAYED_TTL))
                .await;
        }
    }

    /// Where the position reached in the event log of `epoch` is kept.
    fn relayed_key(&self, epoch: &str) -> String {
        format!("{}:relayed:{epoch}", self.prefix)
    }

    /// Raises the WAL position every instance sharing this cache waits for
    /// before it reads from a replica: a committed write's, before its
    /// invalidation is applied. An instance that finds an entry made stale
    /// by another instance's write then reads the new value, even while its
    /// own relay has not heard of the write yet (a transaction still
    /// writing events holds delivery back, not the commit or its
    /// invalidation).
    pub async fn share_read_floor(&self, lsn: u64) {
        if let Backend::Redis(r) = &self.backend {
            if r.mark_max(&self.read_floor_key(), lsn as i64, None)
                .await
                .is_err()
            {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The highest WAL position any instance shared ([`Cache::share_read_floor`]):
    /// `Ok(None)` without Redis, or when none was shared yet; `Err` when
    /// Redis does not answer (another instance's write may then be past
    /// the floor this instance knows of).
    pub async fn shared_read_floor(&self) -> Result<Option<u64>, ()> {
        match &self.backend {
            Backend::Redis(_) if self.degraded.load(Ordering::Relaxed) => Err(()),
            Backend::Redis(r) => Ok(r
                .get_i64(&self.read_floor_key())
                .await?
                .map(|v| v.max(0) as u64)),
            Backend::Memory(_) => Ok(None),
        }
    }

    fn read_floor_key(&self) -> String {
        format!("{}:read-floor", self.prefix)
    }

    /// Before a starting instance serves anything from Redis: the events
    /// after the last position whose invalidation any instance applied, up
    /// to `head` (where this instance's relay starts), may never have been
    /// invalidated (written while no instance relayed: plain SQL, or
    /// committed during a restart). Their tags are bumped now; with no
    /// position recorded (a first start, or Redis emptied), too many of
    /// them, or the log pruned in between, every entry is made stale.
    /// `head` is a position in the event log of `epoch`, whose recorded
    /// position is read and raised. Retries until Redis answers; until
    /// then lookups miss.
    pub async fn catch_up(&self, pool: &sqlx::PgPool, epoch: &str, head: i64) {
        let Backend::Redis(r) = &self.backend else {
            return;
        };
        loop {
            match self.try_catch_up(r, pool, epoch, head).await {
                Ok(()) => break,
                Err(e) => tracing::debug!(error = %e, "cache catch-up not done yet; retrying"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.drop_first_level();
        self.starting.store(false, Ordering::Release);
    }

    async fn try_catch_up(
        &self,
        r: &redis::RedisCache,
        pool: &sqlx::PgPool,
        epoch: &str,
        head: i64,
    ) -> anyhow::Result<()> {
        // Restarts of Redis are watched from here on.
        r.note_run_id()
            .await
            .map_err(|()| anyhow::anyhow!("redis unavailable"))?;
        let relayed = r
            .get_i64(&self.relayed_key(epoch))
            .await
            .map_err(|()| anyhow::anyhow!("redis unavailable"))?;
        // Relayed past the log's newest event (by `seq`, the delivery
        // order positions are kept in): this cache prefix saw events
        // the database does not have (a restore from a dump taken before
        // them, or another database under the same prefix), so what it
        // holds may be of rows that are no longer so: everything is made
        // stale. (Past `head` alone is other instances relaying meanwhile.)
        let behind = match relayed {
            Some(done) if done > head => {
                let newest: i64 =
                    sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM sales.events")
                        .fetch_one(pool)
                        .await?;
                done > newest
            }
            _ => false,
        };
        let tags = match relayed {
            _ if behind => None,
            Some(done) if done >= head => Some(Vec::new()),
            Some(done) => {
                crate::db::write::range_cache_tags(pool, done, head, CATCH_UP_EVENTS).await?
            }
            None => None,
        };
        let tags = tags.unwrap_or_else(|| vec![TAG_ALL.to_string()]);
        if !tags.is_empty() {
            let n = tags.len();
            if !self.invalidate(&tags).await {
                anyhow::bail!("redis unavailable");
            }
            tracing::info!(
                tags = n,
                since = ?relayed,
                head,
                "cache: made stale what was written while this instance was not relaying"
            );
        }
        self.mark_relayed(epoch, head).await;
        Ok(())
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
            l1_hits: s.l1_hits.load(Ordering::Relaxed),
            encodings_reused: s.encodings_reused.load(Ordering::Relaxed),
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

    #[tokio::test]
    async fn a_held_tag_is_a_miss_until_released() {
        let config = crate::config::Config::from_map(&Default::default()).unwrap();
        let cache = Arc::new(Cache::new(&config));
        let tags = vec![tag_store(1)];
        let other = vec![tag_store(2)];
        for (key, t) in [("k", &tags), ("o", &other)] {
            let Lookup::Miss(Some(v)) = cache.lookup(key, t).await else {
                panic!("miss expected")
            };
            cache.store(key, v, b"old".to_vec()).await;
        }
        let held = cache.hold(&tags);
        assert!(matches!(cache.lookup("k", &tags).await, Lookup::Miss(_)));
        assert!(matches!(cache.lookup("o", &other).await, Lookup::Hit(_)));
        drop(held);
        assert!(matches!(cache.lookup("k", &tags).await, Lookup::Hit(_)));
    }

    #[tokio::test]
    async fn a_pending_invalidation_is_a_miss_until_applied() {
        let config = crate::config::Config::from_map(&Default::default()).unwrap();
        let cache = Arc::new(Cache::new(&config));
        let tags = vec![tag_store(1)];
        let Lookup::Miss(Some(v)) = cache.lookup("k", &tags).await else {
            panic!("miss expected")
        };
        cache.store("k", v, b"old".to_vec()).await;
        assert!(matches!(cache.lookup("k", &tags).await, Lookup::Hit(_)));
        cache.mark_pending(&tags);
        assert!(matches!(cache.lookup("k", &tags).await, Lookup::Miss(_)));
        cache.unmark_pending(&tags);
        let inv = Invalidator::spawn(cache.clone());
        inv.invalidate_soon(tags.clone());
        assert!(matches!(cache.lookup("k", &tags).await, Lookup::Miss(_)));
        for _ in 0..200 {
            if cache.pending_count.load(Ordering::Acquire) == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(matches!(cache.lookup("k", &tags).await, Lookup::Miss(_)));
    }
}
