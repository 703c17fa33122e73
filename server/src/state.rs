//! What every request handler shares.

use crate::auth::Auth;
use crate::cache::{Cache, Invalidator};
use crate::config::Config;
use crate::db;
use anyhow::Context;
use sqlx::PgPool;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct AppState {
    pub config: Config,
    pub auth: Arc<Auth>,
    pub pool: PgPool,
    /// One connection of its own for `/health` and `/health/ready`: a
    /// request pool with no free connection is busy, not broken, and a
    /// probe waiting for one answered "down" after seconds.
    pub probe_pool: PgPool,
    pub cache: Arc<Cache>,
    /// Cache invalidation off the delivery path (used by the event relay).
    pub invalidator: Invalidator,
    /// WebSocket fan-out, fed by the event relay.
    pub hub: Arc<crate::ws::Hub>,
    /// Revocation: the relay's sink in front of the hub (see `ws::revoke`).
    pub access: Arc<crate::ws::Revoking>,
    /// Bounds the password hashes computed at once (PASSWORD_HASH_CONCURRENCY):
    /// each holds a blocking thread and ~19 MB for ~50 ms.
    pub hashing: Arc<tokio::sync::Semaphore>,
    /// Streaming replica for reads (DATABASE_REPLICA_URL), when configured.
    pub replica: Option<Replica>,
    pub started: Instant,
    /// `sales.parse_json` (extension 0.6.0 on), used by the batch endpoint
    /// when the database has it.
    pub parse_json: db::Feature,
}

/// A read replica and whether it is answering. A background check flips
/// `up`; while it is down, reads go to the primary.
pub struct Replica {
    pub pool: PgPool,
    pub up: Arc<AtomicBool>,
    pub reads: AtomicU64,
    pub fallbacks: AtomicU64,
    /// The primary's WAL position when this instance last learned of a
    /// change (its own write, or an event from the relay). A cached read
    /// may only come from the replica once it has replayed that far;
    /// otherwise the cache could store data older than the invalidation
    /// that made room for it.
    pub min_lsn: Arc<AtomicU64>,
}

/// How long a read waits for the replica's connection and its answer to
/// whether it has replayed far enough, before going to the primary.
const REPLICA_CHECK: Duration = Duration::from_millis(500);

/// Whether the replica has replayed up to a position (`$1`).
const REPLAYED_SQL: &str = "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::pg_lsn, false)";

/// What the replica check found of the server `DATABASE_REPLICA_URL` names.
#[derive(Debug, Clone, PartialEq)]
enum Follows {
    /// A standby of this primary: read from.
    Yes,
    /// Not in recovery (a promoted or detached replica, or a primary).
    NotInRecovery,
    /// In recovery, but of another primary or another timeline: its event
    /// log's epoch (`sales.event_log_epoch()`: the log's identity and the
    /// WAL timeline) is not the primary's.
    Other { replica: String, primary: String },
    /// Did not answer (the reason).
    Unreachable(String),
}

/// The primary's event log epoch as last read (it changes only with a
/// promotion or a restore): read again when a standby's differs, and when
/// older than [`PRIMARY_EPOCH_FOR`], so the check rarely takes one of the
/// request pool's connections.
#[derive(Default)]
struct PrimaryEpoch {
    value: Option<String>,
    read_at: Option<Instant>,
}

const PRIMARY_EPOCH_FOR: Duration = Duration::from_secs(5);

/// A standby's epoch as comparable with the primary's
/// (`sales.event_log_epoch()`, `identity.timeline`): the timeline its WAL
/// receiver streams when the role may see it (pg_read_all_stats), else the
/// timeline of its last restartpoint (which after a promotion upstream
/// only moves at the next one).
const STANDBY_EPOCH_SQL: &str = "SELECT pg_is_in_recovery(),
        split_part(e, '.', 1) || '.' ||
        coalesce((SELECT received_tli FROM pg_stat_wal_receiver)::text, split_part(e, '.', 2))
 FROM sales.event_log_epoch() AS e";

/// Whether the server behind `replica` is a standby that follows `primary`;
/// None when the primary's epoch cannot be read (nothing is concluded: a
/// busy request pool says nothing of the replica).
async fn follows(replica: &PgPool, primary: &PgPool, ours: &mut PrimaryEpoch) -> Option<Follows> {
    let limit = Duration::from_millis(800);
    let theirs = tokio::time::timeout(
        limit,
        sqlx::query_as::<_, (bool, Option<String>)>(STANDBY_EPOCH_SQL).fetch_one(replica),
    )
    .await;
    let (recovering, theirs) = match theirs {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Some(Follows::Unreachable(e.to_string())),
        Err(_) => return Some(Follows::Unreachable("no answer within 800 ms".into())),
    };
    if !recovering {
        return Some(Follows::NotInRecovery);
    }
    let stale = ours.read_at.is_none_or(|t| t.elapsed() > PRIMARY_EPOCH_FOR);
    if stale || ours.value != theirs {
        let read = tokio::time::timeout(
            limit,
            sqlx::query_scalar::<_, Option<String>>("SELECT sales.event_log_epoch()")
                .fetch_one(primary),
        )
        .await;
        match read {
            Ok(Ok(v)) => {
                ours.value = v;
                ours.read_at = Some(Instant::now());
            }
            _ if ours.read_at.is_none() => return None,
            _ => {}
        }
    }
    Some(if theirs == ours.value {
        Follows::Yes
    } else {
        Follows::Other {
            replica: theirs.unwrap_or_default(),
            primary: ours.value.clone().unwrap_or_default(),
        }
    })
}

impl Replica {
    fn start(url: &str, config: &Config, primary: PgPool) -> anyhow::Result<Self> {
        let pool = db::lazy_pool_for(url, config).context("DATABASE_REPLICA_URL")?;
        let up = Arc::new(AtomicBool::new(false));
        let (p, flag) = (pool.clone(), up.clone());
        tokio::spawn(async move {
            let mut was: Option<Follows> = None;
            let mut ours = PrimaryEpoch::default();
            loop {
                let Some(state) = follows(&p, &primary, &mut ours).await else {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                };
                let ok = state == Follows::Yes;
                flag.store(ok, Ordering::Relaxed);
                // Logged when it changes (an unreachable replica's reason
                // only when the kind of state changes).
                let changed = match (&was, &state) {
                    (Some(Follows::Unreachable(_)), Follows::Unreachable(_)) => false,
                    (Some(w), s) => w != s,
                    (None, _) => true,
                };
                if changed {
                    match &state {
                        Follows::Yes => tracing::info!(
                            "read replica reachable; list, summary and export reads go to it"
                        ),
                        Follows::NotInRecovery => tracing::warn!(
                            "DATABASE_REPLICA_URL names a server that is not in recovery (a \
                             promoted or detached replica, or a primary): it does not follow \
                             this primary's writes; reads go to the primary"
                        ),
                        Follows::Other { replica, primary } => tracing::warn!(
                            replica_epoch = %replica,
                            primary_epoch = %primary,
                            "DATABASE_REPLICA_URL names a standby that does not follow this \
                             primary (another timeline, or a copy of another database); reads \
                             go to the primary (a standby of a newly promoted primary is read \
                             from again once its next restartpoint records the new timeline)"
                        ),
                        Follows::Unreachable(why) => tracing::warn!(
                            error = %why,
                            "read replica unreachable; reads fall back to the primary"
                        ),
                    }
                }
                was = Some(state);
                if p.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(if ok { 1000 } else { 250 })).await;
            }
        });
        Ok(Self {
            pool,
            up,
            reads: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            min_lsn: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Waits up to `limit` for the first successful check.
    async fn wait_up(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.up.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl AppState {
    pub async fn connect(config: Config) -> anyhow::Result<Arc<Self>> {
        let auth = Arc::new(Auth::from_config(&config)?);
        let pool = db::connect(&config).await?;
        let cache = Arc::new(Cache::new(&config));
        // Give Redis a moment so a healthy instance does not start degraded.
        cache.wait_ready(std::time::Duration::from_secs(2)).await;
        let replica = match &config.database_replica_url {
            Some(url) => {
                let r = Replica::start(url, &config, pool.clone())?;
                // Whatever was committed before this instance started (its
                // own writes before a restart, what the start-up catch-up
                // invalidates) is read from the replica only once it has
                // replayed it: the floor starts at the primary's position,
                // not at 0.
                db::write::raise_read_floor(&pool, &r.min_lsn).await;
                r.wait_up(Duration::from_secs(2)).await;
                Some(r)
            }
            None => None,
        };
        Ok(Self::assemble(config, auth, pool, cache, replica))
    }

    /// The state around its connections: the invalidator and the hub.
    fn assemble(
        config: Config,
        auth: Arc<Auth>,
        pool: PgPool,
        cache: Arc<Cache>,
        replica: Option<Replica>,
    ) -> Arc<Self> {
        let invalidator = Invalidator::spawn(cache.clone());
        let hub = Arc::new(crate::ws::Hub::new(crate::ws::HubConfig::from_config(
            &config,
        )));
        let access = Arc::new(crate::ws::Revoking::spawn(
            hub.clone(),
            auth.revocations().clone(),
            config.jwt_expiry.as_secs() as i64,
            pool.clone(),
        ));
        let hashing = Arc::new(tokio::sync::Semaphore::new(
            config.password_hash_concurrency.max(1),
        ));
        let probe_pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(std::time::Duration::from_secs(2))
            .idle_timeout(Some(std::time::Duration::from_secs(60)))
            .connect_lazy_with((*pool.connect_options()).clone());
        Arc::new(Self {
            config,
            auth,
            probe_pool,
            pool,
            cache,
            invalidator,
            hub,
            access,
            hashing,
            replica,
            started: Instant::now(),
            parse_json: db::Feature::new("sales.parse_json(text)"),
        })
    }

    /// Redis reachability; `None` when the in-process cache is used.
    pub async fn redis_ping(&self) -> Option<Result<Duration, String>> {
        self.cache.ping().await
    }
}

impl AppState {
    /// A state whose pool never connects until used: for printing the spec.
    pub fn offline(config: Config) -> anyhow::Result<Arc<Self>> {
        let pool = db::lazy_pool_for(&config.database_url, &config)?;
        let mut config = config;
        config.redis_url = None;
        config.redis_cluster_urls.clear();
        if config.jwt_secret.is_none() {
            // Printing the spec verifies no token; any secret will do.
            config.jwt_secret = Some("x".repeat(32));
        }
        let auth = Arc::new(Auth::from_config(&config)?);
        let cache = Arc::new(Cache::new(&config));
        Ok(Self::assemble(config, auth, pool, cache, None))
    }
}

impl AppState {
    /// What the event relay needs: where to connect, where events go, and
    /// what to invalidate.
    pub fn relay_deps(&self) -> anyhow::Result<crate::events::relay::Deps> {
        Ok(crate::events::relay::Deps {
            connect: db::connect_options(&self.config.database_url, &self.config)?,
            connect_timeout: self.config.db_connection_timeout,
            sink: self.access.clone(),
            invalidator: self.invalidator.clone(),
            lsn_floor: self.replica.as_ref().map(|r| r.min_lsn.clone()),
        })
    }

    /// What the WebSocket endpoint needs.
    pub fn ws_context(&self) -> crate::ws::Context {
        crate::ws::Context {
            hub: self.hub.clone(),
            auth: self.auth.clone(),
            pool: self.pool.clone(),
            event_retention: self.config.event_retention,
        }
    }
}

/// A password hash could not be computed in time (too many at once).
#[derive(Debug, thiserror::Error)]
#[error("too many password checks in progress; retry later")]
pub struct HashingBusy;

impl AppState {
    /// Runs `f` (an argon2 hash or verification) on a blocking thread, at
    /// most PASSWORD_HASH_CONCURRENCY at once; waits up to 10 s for a turn.
    pub async fn with_hashing<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashingBusy> {
        run_hashing(&self.hashing, Duration::from_secs(10), f).await
    }
}

/// Runs `f` on a blocking thread once `limit` gives it a turn (waiting up
/// to `wait`). The permit goes with the work: a request given up while the
/// hash is computed does not free its turn before the hash is done.
async fn run_hashing<T: Send + 'static>(
    limit: &Arc<tokio::sync::Semaphore>,
    wait: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, HashingBusy> {
    let permit = tokio::time::timeout(wait, limit.clone().acquire_owned())
        .await
        .map_err(|_| HashingBusy)?
        .map_err(|_| HashingBusy)?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        f()
    })
    .await
    .map_err(|_| HashingBusy)
}

impl AppState {
    /// The pool for reads that may be served by a replica (list, summary,
    /// one record, export): the replica while it answers, else the primary.
    /// Writes, LISTEN and anything that must see its own writes use `pool`.
    pub fn read_pool(&self) -> PgPool {
        match &self.replica {
            Some(r) if r.up.load(Ordering::Relaxed) => {
                r.reads.fetch_add(1, Ordering::Relaxed);
                r.pool.clone()
            }
            Some(r) => {
                r.fallbacks.fetch_add(1, Ordering::Relaxed);
                self.pool.clone()
            }
            None => self.pool.clone(),
        }
    }

    /// Raises the replica read floor to the primary's current position:
    /// before a cache clear, so that what is read to fill the cache again
    /// is not older than what the clear was for (a change made by hand,
    /// which the replica may not have replayed yet).
    pub async fn raise_read_floor(&self) {
        if let Some(r) = &self.replica {
            db::write::raise_read_floor(&self.pool, &r.min_lsn).await;
        }
    }

    /// Runs `then` (in the background) once the replica has replayed up to
    /// the read floor as it is now, or after 30 s at most (it is late, or
    /// down: then reads go to the primary anyway). Nothing without a
    /// replica.
    pub fn once_replica_caught_up<F, Fut>(self: &Arc<Self>, then: F)
    where
        F: FnOnce(Arc<Self>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let Some(r) = &self.replica else { return };
        let floor = db::format_lsn(r.min_lsn.load(Ordering::Relaxed));
        let state = self.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                let Some(r) = &state.replica else { break };
                let done = tokio::time::timeout(
                    REPLICA_CHECK,
                    sqlx::query_scalar::<_, bool>(REPLAYED_SQL)
                        .bind(&floor)
                        .fetch_one(&r.pool),
                )
                .await;
                if let Ok(Ok(true)) = done {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            then(state).await;
        });
    }

    /// Publishes a committed write: raises the replica read floor, then
    /// invalidates the cache (see [`db::Changes::publish`]).
    pub async fn publish(&self, changes: db::Changes) {
        let floor = self.replica.as_ref().map(|r| &*r.min_lsn);
        changes.publish(&self.pool, floor, &self.cache).await
    }

    /// A connection for a read whose result may be cached: from the replica
    /// when it is up and has replayed every change this instance knows of
    /// and every write another instance sharing the cache published, else
    /// from the primary.
    pub async fn read_conn(
        &self,
    ) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, sqlx::Error> {
        if let Some(r) = &self.replica {
            // Another instance's write that made an entry stale, which
            // this instance's relay may not have read yet (delivery waits
            // for transactions still writing events); unknown while Redis
            // does not answer, and this instance's own floor is unknown
            // while the primary's position could not be read after a write
            // (see `db::write::raise_read_floor`): the read then goes to
            // the primary (before, the replica was read on the floor known,
            // and what it had not replayed was read, and cached, as stale).
            let floor_known = r.up.load(Ordering::Relaxed)
                && match self.cache.shared_read_floor().await {
                    Ok(shared) => {
                        if let Some(shared) = shared {
                            r.min_lsn.fetch_max(shared, Ordering::Relaxed);
                        }
                        db::write::settle_unknown_floor(&self.pool, &r.min_lsn).await
                    }
                    Err(()) => false,
                };
            if floor_known {
                let min = db::format_lsn(r.min_lsn.load(Ordering::Relaxed));
                if let Ok(Ok(mut conn)) =
                    tokio::time::timeout(REPLICA_CHECK, r.pool.acquire()).await
                {
                    // Bounded: a replica that stopped answering (a hung
                    // host) held the read, and an export its slot, for as
                    // long as the client waited.
                    let caught_up = tokio::time::timeout(
                        REPLICA_CHECK,
                        sqlx::query_scalar::<_, bool>(REPLAYED_SQL)
                            .bind(&min)
                            .fetch_one(&mut *conn),
                    )
                    .await;
                    match caught_up {
                        Ok(Ok(true)) => {
                            r.reads.fetch_add(1, Ordering::Relaxed);
                            return Ok(conn);
                        }
                        Ok(_) => {}
                        Err(_) => {
                            // Left mid-query: not given to anyone again.
                            conn.close_on_drop();
                            r.up.store(false, Ordering::Relaxed);
                        }
                    }
                }
            }
            r.fallbacks.fetch_add(1, Ordering::Relaxed);
        }
        self.pool.acquire().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (bounded) until `cond` holds.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn an_abandoned_hash_keeps_its_turn() {
        let limit = Arc::new(tokio::sync::Semaphore::new(1));
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (started, running) = std::sync::mpsc::channel::<()>();
        let request = tokio::spawn({
            let limit = limit.clone();
            async move {
                run_hashing(&limit, Duration::from_secs(10), move || {
                    started.send(()).unwrap();
                    wait.recv().ok();
                })
                .await
            }
        });
        tokio::task::spawn_blocking(move || running.recv().unwrap())
            .await
            .unwrap();
        // The request is given up while its hash still runs.
        request.abort();
        assert!(request.await.unwrap_err().is_cancelled());
        assert_eq!(
            limit.available_permits(),
            0,
            "the running hash keeps its turn"
        );
        go.send(()).unwrap();
        until("the turn comes back when the hash is done", || {
            limit.available_permits() == 1
        })
        .await;
    }
}
