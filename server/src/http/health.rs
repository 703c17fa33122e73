//! `/health`, `/health/live`, `/health/ready`.

use super::ApiTags;
use crate::state::AppState;
use poem_openapi::{payload::Json, ApiResponse, Object, OpenApi};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct HealthApi {
    pub state: Arc<AppState>,
    /// The last summary and readiness probes, shared by callers (see
    /// [`Shared`]).
    health: Shared<HealthProbe>,
    ready: Shared<Readiness>,
}

impl HealthApi {
    pub fn new(state: Arc<AppState>) -> Self {
        Self {
            state,
            health: Shared::default(),
            ready: Shared::default(),
        }
    }
}

/// How long one probe's result answers other callers. `/health` and
/// `/health/ready` take no token and have no rate limit (load balancers
/// poll them), so each probe is shared: one runs at a time, and what it
/// found answers every caller for this long. However often they are asked,
/// they make at most a few queries a second and hold one pool connection.
const PROBE_REUSE: Duration = Duration::from_secs(1);

/// The longest one probe's query waits (a connection that hangs must not
/// hold every caller that shares the probe).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The result of the last probe and when it finished; the lock is held
/// while a probe runs, so callers that arrive meanwhile wait for its
/// result instead of probing again, and take it however long it took.
struct Shared<T> {
    reuse: Duration,
    last: tokio::sync::Mutex<Option<(Instant, T)>>,
    /// Held while an admin's fresh probe runs: at most one at a time, so
    /// however many an admin sends, probes hold at most two connections.
    fresh: tokio::sync::Mutex<()>,
}

impl<T> Default for Shared<T> {
    fn default() -> Self {
        Self::new(PROBE_REUSE)
    }
}

impl<T> Shared<T> {
    fn new(reuse: Duration) -> Self {
        Self {
            reuse,
            last: tokio::sync::Mutex::new(None),
            fresh: tokio::sync::Mutex::new(()),
        }
    }
}

impl<T: Clone> Shared<T> {
    /// A result that finished after this call began, or within the reuse
    /// window; else a probe of its own.
    async fn get<F: std::future::Future<Output = T>>(&self, probe: impl FnOnce() -> F) -> T {
        let arrived = Instant::now();
        let mut last = self.last.lock().await;
        if let Some((done, v)) = last.as_ref() {
            if *done >= arrived || done.elapsed() < self.reuse {
                return v.clone();
            }
        }
        let v = probe().await;
        *last = Some((Instant::now(), v.clone()));
        v
    }

    /// A fresh probe (for an admin), not queued behind others; kept for
    /// the callers after it when no probe is running. While another fresh
    /// probe runs, the caller shares probes as everyone else does.
    async fn fresh<F: std::future::Future<Output = T>>(&self, probe: impl FnOnce() -> F) -> T {
        let Ok(_running) = self.fresh.try_lock() else {
            return self.get(probe).await;
        };
        let v = probe().await;
        if let Ok(mut last) = self.last.try_lock() {
            *last = Some((Instant::now(), v.clone()));
        }
        v
    }
}

/// `f`, or an error once [`PROBE_TIMEOUT`] has passed.
async fn bounded<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(PROBE_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
    }
}

/// What one `/health` probe found; errors as the driver gave them (shown
/// to admins only).
#[derive(Clone)]
struct HealthProbe {
    postgres: Result<f64, String>,
    redis: Option<Result<f64, String>>,
    holders: Vec<crate::events::holders::Holder>,
}

/// State of one dependency.
#[derive(Object, Debug, Clone)]
#[oai(rename_all = "camelCase")]
pub struct Dependency {
    /// False when the dependency is not used by this instance (Redis unset).
    pub configured: bool,
    pub up: bool,
    pub latency_ms: Option<f64>,
    pub error: Option<String>,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct Health {
    /// `ok`, `degraded` (Redis down: answers come from Postgres) or `down`.
    pub status: String,
    pub version: String,
    pub uptime_seconds: u64,
    pub postgres: Dependency,
    pub redis: Dependency,
    pub event_delivery: EventDelivery,
}

/// Whether live event delivery is held back, and by what.
#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct EventDelivery {
    /// True while an event-writing transaction has held delivery back for
    /// more than a second (events ordered after its first event wait for it).
    pub held_back: bool,
    /// How long the oldest such transaction has held it back, in seconds.
    pub held_back_seconds: Option<f64>,
    /// The transactions holding it back, oldest first (admin token only).
    pub holders: Option<Vec<DeliveryHolder>>,
}

/// A transaction holding event delivery back (`sales.event_holders()`).
#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct DeliveryHolder {
    /// Backend pid (`pg_stat_activity.pid`).
    pub pid: i32,
    pub held_for_seconds: f64,
    /// When it wrote its first event.
    pub since: chrono::DateTime<chrono::Utc>,
    pub query_start: Option<chrono::DateTime<chrono::Utc>>,
    pub state: Option<String>,
}

/// What holds event delivery back; holder details only for an admin.
fn event_delivery(holders: Vec<crate::events::holders::Holder>, admin: bool) -> EventDelivery {
    EventDelivery {
        held_back: !holders.is_empty(),
        held_back_seconds: holders.first().map(|h| h.held_for_seconds),
        holders: admin.then(|| {
            holders
                .into_iter()
                .map(|h| DeliveryHolder {
                    pid: h.pid,
                    held_for_seconds: h.held_for_seconds,
                    since: h.since,
                    query_start: h.query_start,
                    state: h.state,
                })
                .collect()
        }),
    }
}

/// `SELECT 1` on the probe pool. When the pool found no connection in
/// time, one connection of its own says why (refused, no such host, bad
/// password) instead of the pool's "timed out while waiting".
async fn select_one(pool: &sqlx::PgPool) -> Result<i32, sqlx::Error> {
    use sqlx::Connection;
    match sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(pool)
        .await
    {
        Err(sqlx::Error::PoolTimedOut) => {
            let mut conn = sqlx::PgConnection::connect_with(&pool.connect_options()).await?;
            let one = sqlx::query_scalar::<_, i32>("SELECT 1")
                .fetch_one(&mut conn)
                .await;
            let _ = conn.close().await;
            one
        }
        r => r,
    }
}

/// Postgres, Redis and what holds delivery back, as found now.
async fn probe_health(state: &AppState) -> HealthProbe {
    let started = Instant::now();
    let postgres = bounded(select_one(&state.probe_pool))
        .await
        .map(|_| ms(started.elapsed()))
        .inspect_err(|e| tracing::warn!(error = %e, "health: postgres unreachable"));
    let redis = state.redis_ping().await.map(|r| r.map(ms));
    let holders = match postgres {
        Ok(_) => tokio::time::timeout(
            Duration::from_secs(2),
            crate::events::holders::list(&state.probe_pool),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    HealthProbe {
        postgres,
        redis,
        holders,
    }
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct Liveness {
    pub status: String,
}

#[derive(Object, Debug, Clone)]
#[oai(rename_all = "camelCase")]
pub struct Readiness {
    pub ready: bool,
    /// Why the instance is not ready, one entry per problem.
    pub problems: Vec<String>,
    pub extension_version: Option<String>,
    pub migrations_applied: i64,
    pub migrations_expected: i64,
}

#[derive(ApiResponse)]
pub enum HealthResponse {
    /// Postgres is reachable (status `ok`, or `degraded` when Redis is down).
    #[oai(status = 200)]
    Ok(Json<Health>),
    /// Postgres is unreachable.
    #[oai(status = 503)]
    Down(Json<Health>),
}

#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// Ready to serve: Postgres reachable, migrated, extension version matches.
    #[oai(status = 200)]
    Ready(Json<Readiness>),
    /// Not ready; `problems` says why.
    #[oai(status = 503)]
    NotReady(Json<Readiness>),
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

#[OpenApi(tag = "ApiTags::Health")]
impl HealthApi {
    /// Summary health: version and the state of Postgres and Redis. A dependency's error text
    /// is shown to admins (send an admin bearer token); others see only `unreachable`. Callers
    /// without an admin token share one probe: its result answers for up to a second.
    #[oai(path = "/health", method = "get")]
    async fn health(&self, req: &poem::Request) -> HealthResponse {
        // Raw driver errors name hosts, ports and users: not for anyone who asks.
        let admin = req
            .header(poem::http::header::AUTHORIZATION)
            .and_then(crate::auth::bearer)
            .and_then(|t| self.state.auth.verify(t).ok())
            .is_some_and(|p| p.is_admin());
        let shown = |e: String| {
            if admin {
                e
            } else {
                "unreachable".to_string()
            }
        };
        let probe = if admin {
            self.health.fresh(|| probe_health(&self.state)).await
        } else {
            self.health.get(|| probe_health(&self.state)).await
        };
        let postgres = Dependency {
            configured: true,
            up: probe.postgres.is_ok(),
            latency_ms: probe.postgres.as_ref().ok().copied(),
            error: probe.postgres.err().map(shown),
        };
        let redis = match probe.redis {
            None => Dependency {
                configured: false,
                up: false,
                latency_ms: None,
                error: None,
            },
            Some(Ok(d)) => Dependency {
                configured: true,
                up: true,
                latency_ms: Some(d),
                error: None,
            },
            Some(Err(e)) => Dependency {
                configured: true,
                up: false,
                latency_ms: None,
                error: Some(shown(e)),
            },
        };
        let status = if !postgres.up {
            "down"
        } else if redis.configured && !redis.up {
            "degraded"
        } else {
            "ok"
        };
        let body = Health {
            status: status.into(),
            version: crate::VERSION.into(),
            uptime_seconds: self.state.started.elapsed().as_secs(),
            postgres,
            redis,
            event_delivery: event_delivery(probe.holders, admin),
        };
        if body.postgres.up {
            HealthResponse::Ok(Json(body))
        } else {
            HealthResponse::Down(Json(body))
        }
    }

    /// Liveness: the process answers. Makes no checks (also the floor for benchmarks).
    #[oai(path = "/health/live", method = "get")]
    async fn live(&self) -> Json<Liveness> {
        Json(Liveness {
            status: "ok".into(),
        })
    }

    /// Readiness: Postgres reachable, all migrations applied, extension version matching this
    /// server, event relay listening. Redis down does not make an instance unready (degraded).
    /// Callers share one probe: its result answers for up to a second.
    #[oai(path = "/health/ready", method = "get")]
    async fn ready(&self) -> ReadyResponse {
        let body = self.ready.get(|| self.probe_ready()).await;
        if body.ready {
            ReadyResponse::Ready(Json(body))
        } else {
            ReadyResponse::NotReady(Json(body))
        }
    }
}

impl HealthApi {
    async fn probe_ready(&self) -> Readiness {
        let mut problems = Vec::new();
        let expected = crate::db::MIGRATOR.iter().count() as i64;
        let ext: Result<Option<String>, _> =
            bounded(crate::db::extension_version(&self.state.probe_pool)).await;
        let applied: Result<i64, _> = match &ext {
            Ok(_) => {
                bounded(
                    sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
                        .fetch_one(&self.state.probe_pool),
                )
                .await
            }
            Err(_) => Ok(0),
        };
        let reachable = ext.is_ok();
        let extension_version = match ext {
            Ok(v) => v,
            Err(e) => {
                // The detail goes to the log only.
                tracing::warn!(error = %e, "readiness: postgres unreachable");
                problems.push("postgres: unreachable".into());
                None
            }
        };
        match &extension_version {
            Some(v) if v != crate::VERSION => problems.push(format!(
                "extension pg_sales is {v}, this server expects {}",
                crate::VERSION
            )),
            None if problems.is_empty() => {
                problems.push("extension pg_sales is not installed".into())
            }
            _ => {}
        }
        if !self
            .state
            .hub
            .relay
            .connected
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            problems.push("event relay is not listening".into());
        }
        if !self
            .state
            .hub
            .relay
            .listening
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            problems.push(
                "event listener (access announcements, cache clears) is not listening".into(),
            );
        }
        let applied = applied.unwrap_or(0);
        // Unreachable: no count to judge (it said "0 of N applied").
        if reachable && applied < expected {
            problems.push(format!("{applied} of {expected} migrations applied"));
        }
        Readiness {
            ready: problems.is_empty(),
            problems,
            extension_version,
            migrations_applied: applied,
            migrations_expected: expected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    async fn counted(n: &AtomicUsize) -> usize {
        tokio::task::yield_now().await;
        n.fetch_add(1, Ordering::SeqCst) + 1
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_at_once_share_one_probe() {
        let shared = Arc::new(Shared::<usize>::new(Duration::from_secs(3600)));
        let probes = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (shared, probes) = (shared.clone(), probes.clone());
                tokio::spawn(async move { shared.get(|| counted(&probes)).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 1, "every caller sees the one probe");
        }
        assert_eq!(probes.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_admin_probes_afresh_and_others_reuse_it() {
        let shared = Shared::<usize>::new(Duration::from_secs(3600));
        let probes = AtomicUsize::new(0);
        assert_eq!(shared.get(|| counted(&probes)).await, 1);
        assert_eq!(shared.fresh(|| counted(&probes)).await, 2);
        assert_eq!(shared.get(|| counted(&probes)).await, 2);
        assert_eq!(probes.load(Ordering::SeqCst), 2);
    }

    /// Many admin calls at once: one probes afresh, the others share
    /// probes as everyone else does, so probes never hold more than two
    /// connections at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn admins_at_once_run_one_fresh_probe() {
        let shared = Arc::new(Shared::<()>::new(Duration::from_secs(3600)));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let (shared, running, most) = (shared.clone(), running.clone(), most.clone());
                tokio::spawn(async move {
                    shared
                        .fresh(|| async move {
                            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            running.fetch_sub(1, Ordering::SeqCst);
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(most.load(Ordering::SeqCst) <= 2, "{most:?}");
    }

    /// Callers that queued behind a probe slower than the reuse window
    /// take its result instead of each probing again in turn.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_behind_a_slow_probe_take_its_result() {
        let shared = Arc::new(Shared::<usize>::new(Duration::from_millis(1)));
        let probes = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let first = {
            let (shared, probes, release) = (shared.clone(), probes.clone(), release.clone());
            tokio::spawn(async move {
                shared
                    .get(|| async move {
                        release.notified().await;
                        probes.fetch_add(1, Ordering::SeqCst) + 1
                    })
                    .await
            })
        };
        // The first probe runs (and holds the lock) until released.
        let deadline = Instant::now() + Duration::from_secs(30);
        while shared.last.try_lock().is_ok() {
            assert!(Instant::now() < deadline, "the first probe never started");
            tokio::task::yield_now().await;
        }
        let arrived = Arc::new(AtomicUsize::new(0));
        let rest: Vec<_> = (0..16)
            .map(|_| {
                let (shared, probes, arrived) = (shared.clone(), probes.clone(), arrived.clone());
                tokio::spawn(async move {
                    // Counted in the same poll that enters `get` (and takes
                    // its arrival time) before it waits for the lock.
                    arrived.fetch_add(1, Ordering::SeqCst);
                    shared.get(|| counted(&probes)).await
                })
            })
            .collect();
        while arrived.load(Ordering::SeqCst) < 16 {
            assert!(Instant::now() < deadline, "callers never arrived");
            tokio::task::yield_now().await;
        }
        // Past the reuse window: only "finished after I arrived" can share.
        tokio::time::sleep(Duration::from_millis(5)).await;
        release.notify_one();
        assert_eq!(first.await.unwrap(), 1);
        for t in rest {
            assert_eq!(t.await.unwrap(), 1, "the running probe's result");
        }
        assert_eq!(probes.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_result_past_its_window_is_probed_again() {
        let shared = Shared::<usize>::new(Duration::ZERO);
        let probes = AtomicUsize::new(0);
        for i in 1..=3 {
            assert_eq!(shared.get(|| counted(&probes)).await, i);
        }
    }
}
