//! Redis backend: a reconnecting connection (or a cluster connection with
//! REDIS_CLUSTER_URLS), every call bounded by REDIS_TIMEOUT. Failures turn
//! into misses; the first failure is logged once and marks the instance
//! degraded, the first success after it logs the recovery.

use crate::config::Config;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::RwLock;

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// How long a write's invalidation waits for a Redis marked unavailable.
pub const QUICK_BUMP: Duration = Duration::from_millis(100);

pub struct RedisCache {
    conn: Arc<RwLock<Option<Conn>>>,
    cluster: bool,
    timeout: Duration,
    degraded: Arc<AtomicBool>,
    /// The last failure as the driver told it (for an admin's `/health`).
    last_error: Arc<std::sync::Mutex<Option<String>>>,
    /// Tag counters live this long after their last bump: longer than any
    /// entry, so an entry never outlives the counter it recorded.
    tag_ttl: Duration,
    /// The first level's generation: moved when Redis restarted, so that
    /// nothing it served before the restart was seen is kept in memory.
    l1_generation: Arc<AtomicU64>,
    /// The `run_id` of the Redis in use, as last seen (None: not yet).
    run_id: Arc<std::sync::Mutex<Option<String>>>,
    /// A cluster's primaries (address -> `run_id`), as last seen (None:
    /// not yet).
    primaries: Arc<std::sync::Mutex<Option<Primaries>>>,
    /// The cluster's nodes, to connect again (empty: a single Redis).
    cluster_urls: Vec<String>,
}

/// A cluster's primaries: each node's address and `run_id`.
type Primaries = std::collections::BTreeMap<String, String>;

/// How long a cluster may stay not wholly reachable before its connection
/// is made again (the client's map of slots may name a node that is gone).
const CLUSTER_RECONNECT_AFTER: Duration = Duration::from_secs(3);

/// How long making the cluster connection again may take at least.
const CLUSTER_RECONNECT_LIMIT: Duration = Duration::from_secs(30);

/// After a restart (or a primary replaced): moves the tag every entry
/// carries by a random amount, not by one. A counter that came back from
/// an older snapshot would give out again, by one, the values entries
/// stored after the snapshot recorded (entries that live on other nodes).
async fn restart_bump<C: redis::aio::ConnectionLike>(
    c: &mut C,
    tag_all: &str,
    ttl: Duration,
) -> redis::RedisResult<()> {
    let mut p = redis::pipe();
    p.cmd("INCRBY")
        .arg(tag_all)
        .arg(random_start())
        .ignore()
        .cmd("PEXPIRE")
        .arg(tag_all)
        .arg(ttl.as_millis() as u64)
        .ignore();
    p.query_async::<()>(c).await
}

/// Sets KEYS[1] to ARGV[1] unless it holds a number at least as high.
const MARK_MAX: &str = "local v = tonumber(redis.call('GET', KEYS[1])) \
    if v == nil or tonumber(ARGV[1]) > v then redis.call('SET', KEYS[1], ARGV[1]) end \
    if ARGV[2] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 1";

/// `run_id` from the answer to `INFO server`.
fn run_id_of(info: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(|v| v.trim().to_string())
}

/// Bumps tag counters: each key in KEYS; ARGV[1] is the counters' time to
/// live, ARGV[1 + i] the start of KEYS[i]. A missing counter (never bumped,
/// expired, evicted, or lost with a restart) starts from a random value,
/// never from 0 again: an entry that recorded the old value cannot match
/// the new one.
const BUMP: &str = "for i, k in ipairs(KEYS) do \
    if redis.call('EXISTS', k) == 0 then redis.call('SET', k, ARGV[i + 1]) end \
    redis.call('INCR', k) redis.call('PEXPIRE', k, ARGV[1]) end return #KEYS";

/// Tags bumped by one call of [`BUMP`] (Redis runs nothing else meanwhile:
/// about a millisecond's work).
const BUMP_CHUNK: usize = 1000;

fn bump_script() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(BUMP))
}

/// One call of [`BUMP`] for `tags` (sent by its digest, the script loaded
/// when Redis does not know it).
fn bump_call(tags: &[&str], ttl: Duration) -> redis::ScriptInvocation<'static> {
    let mut call = bump_script().prepare_invoke();
    call.arg(ttl.as_millis() as u64);
    for t in tags {
        call.key(*t).arg(random_start());
    }
    call
}

/// A counter's first value: random, and far from overflowing an INCR.
fn random_start() -> u64 {
    rand::random::<u32>() as u64 + 1
}

/// A connection to the cluster made of `urls`.
async fn connect_cluster(
    urls: &[String],
    timeout: Duration,
) -> Result<ClusterConnection, redis::RedisError> {
    redis::cluster::ClusterClient::builder(urls.to_vec())
        .connection_timeout(timeout.max(Duration::from_millis(500)))
        .response_timeout(timeout)
        .build()?
        .get_async_connection()
        .await
}

/// The cluster's primaries, when the cluster is whole: its state is `ok`
/// and every primary that serves slots (`cluster_size` of them) answered
/// `INFO` through this connection. The client sends a command for every
/// primary only to those it holds a connection to, so a node that went
/// away (before a replica takes its place) or a map of slots that still
/// names it shows as fewer answers. Err says what is missing.
async fn cluster_primaries(
    cc: &mut ClusterConnection,
    bound: Duration,
) -> Result<Primaries, String> {
    use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
    let by_node = RoutingInfo::MultiNode((
        MultipleNodeRoutingInfo::AllMasters,
        Some(ResponsePolicy::Special),
    ));
    // Every primary this connection reaches says the cluster is whole, and
    // how many primaries serve slots.
    let mut info = redis::cmd("CLUSTER");
    info.arg("INFO");
    let states = answers_by_node(
        tokio::time::timeout(bound, cc.route_command(&info, by_node.clone()))
            .await
            .map_err(|_| "CLUSTER INFO timed out".to_string())?
            .map_err(|e| e.to_string())?,
    )?;
    let mut size = 0;
    for (node, state) in &states {
        let field = |name: &str| {
            state
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        if field("cluster_state") != Some("ok") {
            return Err(format!(
                "{node} says the cluster state is {}",
                field("cluster_state").unwrap_or("unknown")
            ));
        }
        size = size.max(
            field("cluster_size")
                .and_then(|v| v.parse().ok())
                .ok_or("CLUSTER INFO has no cluster_size")?,
        );
    }
    let mut server = redis::cmd("INFO");
    server.arg("server");
    let answers = answers_by_node(
        tokio::time::timeout(bound, cc.route_command(&server, by_node))
            .await
            .map_err(|_| "INFO timed out".to_string())?
            .map_err(|e| e.to_string())?,
    )?;
    let mut out = Primaries::new();
    for (node, answer) in answers {
        let run_id = run_id_of(&answer).ok_or("INFO server without run_id")?;
        out.insert(node, run_id);
    }
    if out.is_empty() || out.len() < size {
        return Err(format!(
            "{} of the cluster's {size} primaries answered",
            out.len()
        ));
    }
    Ok(out)
}

/// A command's answers from several nodes, by node address.
fn answers_by_node(v: redis::Value) -> Result<Vec<(String, String)>, String> {
    let redis::Value::Map(pairs) = v else {
        return Err("the answers did not come back by node".into());
    };
    pairs
        .into_iter()
        .map(|(node, answer)| {
            Ok((
                redis::from_redis_value(&node).map_err(|e| e.to_string())?,
                redis::from_redis_value(&answer).map_err(|e| e.to_string())?,
            ))
        })
        .collect()
}

/// Whether `now` has a primary `before` did not (a replica took over, or
/// a node was added) or one whose `run_id` changed (it restarted, maybe
/// from an older snapshot).
fn primaries_changed(before: &Primaries, now: &Primaries) -> bool {
    now.iter().any(|(node, id)| before.get(node) != Some(id))
}

/// How long tag counters live (see `RedisCache::tag_ttl`).
pub fn tag_ttl(entry_ttl: Duration) -> Duration {
    (entry_ttl * 2).max(Duration::from_secs(24 * 3600))
}

impl RedisCache {
    /// Connects in the background, retrying with backoff, so that a server
    /// starts (degraded) even when Redis is down.
    pub fn start(
        config: &Config,
        degraded: Arc<AtomicBool>,
        l1_generation: Arc<AtomicU64>,
    ) -> Self {
        let conn: Arc<RwLock<Option<Conn>>> = Arc::new(RwLock::new(None));
        let cluster_urls = config.redis_cluster_urls.clone();
        let url = config.redis_url.clone();
        let timeout = config.redis_timeout;
        degraded.store(true, Ordering::Relaxed);
        let (slot, flag) = (conn.clone(), degraded.clone());
        let last_error: Arc<std::sync::Mutex<Option<String>>> = Default::default();
        let last = last_error.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            let mut warned = false;
            loop {
                let attempt: Result<Conn, redis::RedisError> = if !cluster_urls.is_empty() {
                    connect_cluster(&cluster_urls, timeout)
                        .await
                        .map(Conn::Cluster)
                } else {
                    let cfg = ConnectionManagerConfig::new()
                        .set_connection_timeout(timeout.max(Duration::from_millis(500)))
                        .set_response_timeout(timeout)
                        .set_number_of_retries(1)
                        .set_max_delay(2000);
                    match redis::Client::open(url.clone().unwrap_or_default().as_str()) {
                        Ok(c) => ConnectionManager::new_with_config(c, cfg)
                            .await
                            .map(Conn::Single),
                        Err(e) => Err(e),
                    }
                };
                match attempt {
                    Ok(c) => {
                        *slot.write().await = Some(c);
                        flag.store(false, Ordering::Relaxed);
                        if warned {
                            tracing::info!("redis reachable; cache enabled");
                        }
                        return;
                    }
                    Err(e) => {
                        *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                        if !warned {
                            tracing::warn!(error = %e, "redis unreachable; serving from Postgres until it is back");
                            warned = true;
                        }
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        let cache = Self {
            conn,
            cluster: !config.redis_cluster_urls.is_empty(),
            timeout,
            degraded,
            last_error,
            tag_ttl: tag_ttl(config.cache_ttl),
            l1_generation,
            run_id: Default::default(),
            primaries: Default::default(),
            cluster_urls: config.redis_cluster_urls.clone(),
        };
        cache.watch_restarts(format!("{}:t:all", config.cache_prefix));
        cache
    }

    /// Redis restarted (its `run_id` changed): it may have come back from
    /// an older snapshot, with counters from before writes it never saw.
    /// Bumping the tag every entry carries makes all of them stale, and the
    /// first level forgets what it kept. Checked every second, so the
    /// window for a stale hit after a restore is about one second.
    ///
    /// The same check is the probe that ends an outage: while Redis is
    /// marked unavailable, requests do not wait on it (they miss at once),
    /// and the first answer here marks it available again.
    ///
    /// A cluster is checked node by node (see [`cluster_primaries`]): each
    /// primary's `run_id`, and that the cluster is whole; not whole for
    /// [`CLUSTER_RECONNECT_AFTER`], its connection is made again.
    fn watch_restarts(&self, tag_all: String) {
        let conn = self.conn.clone();
        let (timeout, ttl) = (self.timeout, self.tag_ttl);
        let (degraded, l1_generation) = (self.degraded.clone(), self.l1_generation.clone());
        let seen = self.run_id.clone();
        let (seen_primaries, urls) = (self.primaries.clone(), self.cluster_urls.clone());
        let last_error = self.last_error.clone();
        tokio::spawn(async move {
            // Since when the cluster has not been whole (None: it is).
            let mut broken_since: Option<Instant> = None;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if Arc::strong_count(&conn) == 1 {
                    return;
                }
                let Some(c) = conn.read().await.clone() else {
                    continue;
                };
                let single = match c.clone() {
                    Conn::Single(s) => s,
                    Conn::Cluster(mut cc) => {
                        let bound = timeout.max(Duration::from_millis(500));
                        let found = cluster_primaries(&mut cc, bound).await;
                        let now = match found {
                            Ok(p) => p,
                            Err(why) => {
                                // Not whole: no read waits on it meanwhile.
                                *last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                                    Some(why.clone());
                                if !degraded.swap(true, Ordering::Relaxed) {
                                    tracing::warn!(error = %why, "redis cluster not wholly reachable; serving from Postgres");
                                }
                                let since = *broken_since.get_or_insert_with(Instant::now);
                                if since.elapsed() >= CLUSTER_RECONNECT_AFTER {
                                    // A fresh connection reads the slots
                                    // anew (a replica that took over).
                                    // Given time to connect to every node
                                    // (one that does not answer costs a
                                    // connection timeout, more than once).
                                    let limit = CLUSTER_RECONNECT_LIMIT.max(bound * 8);
                                    if let Ok(Ok(fresh)) =
                                        tokio::time::timeout(limit, connect_cluster(&urls, timeout))
                                            .await
                                    {
                                        *conn.write().await = Some(Conn::Cluster(fresh));
                                        tracing::info!("redis cluster connected again");
                                    }
                                    broken_since = Some(Instant::now());
                                }
                                continue;
                            }
                        };
                        broken_since = None;
                        let before = seen_primaries
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone();
                        if before.as_ref().is_some_and(|b| primaries_changed(b, &now)) {
                            // Nothing is served from Redis until it is done.
                            degraded.store(true, Ordering::Relaxed);
                            let done = restart_bump(&mut cc, &tag_all, ttl);
                            if !matches!(tokio::time::timeout(bound, done).await, Ok(Ok(_))) {
                                continue;
                            }
                            l1_generation.fetch_add(1, Ordering::AcqRel);
                            tracing::warn!("a redis cluster primary restarted or was replaced; every cache entry made stale");
                        }
                        *seen_primaries.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
                        if degraded.swap(false, Ordering::Relaxed) {
                            tracing::info!("redis is back; cache enabled");
                        }
                        continue;
                    }
                };
                let info = async move {
                    let mut cmd = redis::cmd("INFO");
                    cmd.arg("server");
                    let mut single = single;
                    cmd.query_async::<String>(&mut single).await
                };
                let Ok(Ok(info)) = tokio::time::timeout(timeout, info).await else {
                    continue;
                };
                let run_id = run_id_of(&info);
                let known = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if run_id.is_none() || run_id == known || known.is_none() {
                    // The first sight is recorded (a starting instance
                    // records it before serving from Redis: see
                    // `note_run_id`).
                    if known.is_none() {
                        *seen.lock().unwrap_or_else(|p| p.into_inner()) = run_id;
                    }
                    // Answering, and the same Redis: usable again after an
                    // outage (a restarted one only once it was handled).
                    if degraded.swap(false, Ordering::Relaxed) {
                        tracing::info!("redis is back; cache enabled");
                    }
                    continue;
                }
                {
                    let done = async {
                        match c {
                            Conn::Single(mut c) => restart_bump(&mut c, &tag_all, ttl).await,
                            Conn::Cluster(mut c) => restart_bump(&mut c, &tag_all, ttl).await,
                        }
                    };
                    if !matches!(tokio::time::timeout(timeout, done).await, Ok(Ok(_))) {
                        // Try again next second.
                        continue;
                    }
                    l1_generation.fetch_add(1, Ordering::AcqRel);
                    tracing::warn!("redis restarted; every cache entry made stale");
                }
                *seen.lock().unwrap_or_else(|p| p.into_inner()) = run_id;
                if degraded.swap(false, Ordering::Relaxed) {
                    tracing::info!("redis is back; cache enabled");
                }
            }
        });
    }

    pub async fn connected(&self) -> bool {
        self.conn.read().await.is_some()
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The connection, unless Redis is marked unavailable: then no read
    /// waits on it (the probe in `watch_restarts` ends the outage).
    async fn usable(&self) -> Option<Conn> {
        if self.degraded.load(Ordering::Relaxed) {
            return None;
        }
        self.conn.read().await.clone()
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, ()> {
        let Some(conn) = self.usable().await else {
            return Err(());
        };
        let fut = async move {
            match conn {
                Conn::Single(mut c) => cmd.query_async::<T>(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async::<T>(&mut c).await,
            }
        };
        self.bounded(self.timeout, fut).await
    }

    /// Awaits a Redis call for at most `limit`; a failure or a timeout
    /// marks Redis degraded.
    async fn bounded<T>(
        &self,
        limit: Duration,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, ()> {
        match tokio::time::timeout(limit, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.fail(&e.to_string());
                Err(())
            }
            Err(_) => {
                self.fail("timed out");
                Err(())
            }
        }
    }

    fn fail(&self, why: &str) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_string());
        // Logged once per outage, not per request.
        if !self.degraded.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = why, "redis unavailable; serving from Postgres");
        }
    }

    /// The entry and the current versions of its tags, in one MGET (a
    /// second round trip starts the counters that do not exist yet).
    pub async fn fetch(
        &self,
        key: &str,
        tag_keys: &[String],
    ) -> Result<(Option<Vec<u8>>, Vec<u64>), ()> {
        let mut cmd = redis::cmd("MGET");
        cmd.arg(key);
        for t in tag_keys {
            cmd.arg(t);
        }
        let mut vals: Vec<Option<Vec<u8>>> = self.run(&cmd).await?;
        if vals.len() != tag_keys.len() + 1 {
            return Err(());
        }
        let mut versions: Vec<Option<u64>> = vals
            .drain(1..)
            .map(|v| v.and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok()))
            .collect();
        for (i, t) in tag_keys.iter().enumerate() {
            if versions[i].is_some() {
                continue;
            }
            // SET NX: another instance may start the same counter at once;
            // whichever value won is read back.
            let mut init = redis::cmd("SET");
            init.arg(t)
                .arg(random_start())
                .arg("NX")
                .arg("PX")
                .arg(self.tag_ttl.as_millis() as u64);
            let _: Option<String> = self.run(&init).await?;
            let v: Option<u64> = self.run(redis::cmd("GET").arg(t)).await?;
            versions[i] = Some(v.ok_or(())?);
        }
        Ok((
            vals.pop().flatten(),
            versions.into_iter().flatten().collect(),
        ))
    }

    pub async fn put(&self, key: &str, raw: Vec<u8>, ttl: Duration) -> Result<(), ()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(raw).arg("PX").arg(ttl.as_millis() as u64);
        self.run::<()>(&cmd).await
    }

    /// Bumps each tag (see [`BUMP`]): up to [`BUMP_CHUNK`] tags per call,
    /// or one by one in a cluster, where tag keys live in different slots.
    /// Bumps the tags' versions, bounded by `REDIS_TIMEOUT` (at least
    /// 500 ms), or by [`QUICK_BUMP`] when `quick` (Redis is marked
    /// unavailable: tried all the same, since it may be back before the
    /// probe says so, but a write during an outage does not wait long).
    pub async fn bump(&self, tag_keys: &[String], quick: bool) -> Result<(), ()> {
        // Tried even while Redis is marked unavailable: an invalidation
        // not applied is made up for by making every entry stale.
        let Some(conn) = self.conn.read().await.clone() else {
            return Err(());
        };
        let ttl = self.tag_ttl;
        let fut = async move {
            let tags: Vec<&str> = tag_keys.iter().map(String::as_str).collect();
            let chunk = match conn {
                Conn::Single(_) => BUMP_CHUNK,
                Conn::Cluster(_) => 1,
            };
            for part in tags.chunks(chunk) {
                let call = bump_call(part, ttl);
                match conn.clone() {
                    Conn::Single(mut c) => call.invoke_async::<i64>(&mut c).await?,
                    Conn::Cluster(mut c) => call.invoke_async::<i64>(&mut c).await?,
                };
            }
            Ok(())
        };
        let bound = if quick {
            QUICK_BUMP
        } else {
            self.timeout.max(Duration::from_millis(500))
        };
        self.bounded(bound, fut).await
    }

    /// Records the `run_id` of the Redis in use now, so that a restart from
    /// here on is noticed (see `watch_restarts`).
    pub async fn note_run_id(&self) -> Result<(), ()> {
        if self.cluster {
            let Some(Conn::Cluster(mut cc)) = self.usable().await else {
                return Err(());
            };
            let bound = self.timeout.max(Duration::from_millis(500));
            return match cluster_primaries(&mut cc, bound).await {
                Ok(p) => {
                    // The first sight only: a restart between two tries of
                    // the catch-up is the watcher's to find.
                    self.primaries
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(p);
                    Ok(())
                }
                Err(why) => {
                    self.fail(&why);
                    Err(())
                }
            };
        }
        let mut cmd = redis::cmd("INFO");
        cmd.arg("server");
        let info: String = self.run(&cmd).await?;
        let mut seen = self.run_id.lock().unwrap_or_else(|p| p.into_inner());
        if seen.is_none() {
            *seen = run_id_of(&info);
        }
        Ok(())
    }

    /// A number kept under `key`, None when absent.
    pub async fn get_i64(&self, key: &str) -> Result<Option<i64>, ()> {
        let v: Option<String> = self.run(redis::cmd("GET").arg(key)).await?;
        Ok(v.and_then(|v| v.parse().ok()))
    }

    /// Raises the number under `key` to `value` (never lowers it); with
    /// `ttl`, the key then lives that long (from this call, whether it was
    /// raised or not).
    pub async fn mark_max(&self, key: &str, value: i64, ttl: Option<Duration>) -> Result<(), ()> {
        static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
        let script = SCRIPT.get_or_init(|| redis::Script::new(MARK_MAX));
        let Some(conn) = self.usable().await else {
            return Err(());
        };
        let mut call = script.prepare_invoke();
        call.key(key).arg(value);
        if let Some(ttl) = ttl {
            call.arg(ttl.as_millis().max(1) as u64);
        }
        let fut = async move {
            match conn {
                Conn::Single(mut c) => call.invoke_async::<i64>(&mut c).await,
                Conn::Cluster(mut c) => call.invoke_async::<i64>(&mut c).await,
            }
        };
        self.bounded(self.timeout, fut).await.map(|_| ())
    }

    pub async fn ping(&self) -> Result<Duration, String> {
        let started = Instant::now();
        match self.run::<String>(&redis::cmd("PING")).await {
            Ok(_) => Ok(started.elapsed()),
            Err(()) => Err(self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_else(|| "unreachable".into())),
        }
    }
}
