//! `/health`, `/health/live`, `/health/ready`.

use super::ApiTags;
use crate::state::AppState;
use poem_openapi::{payload::Json, ApiResponse, Object, OpenApi};
use std::sync::Arc;
use std::time::Instant;

pub struct HealthApi {
    pub state: Arc<AppState>,
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

/// What holds event delivery back; holder details only for an admin token.
async fn event_delivery(state: &AppState, req: &poem::Request) -> EventDelivery {
    let holders = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        crate::events::holders::list(&state.pool),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .unwrap_or_default();
    let admin = req
        .header(poem::http::header::AUTHORIZATION)
        .and_then(crate::auth::bearer)
        .and_then(|t| state.auth.verify(t).ok())
        .is_some_and(|p| p.is_admin());
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

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct Liveness {
    pub status: String,
}

#[derive(Object, Debug)]
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
    /// is shown to admins (send an admin bearer token); others see only `unreachable`.
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
        let started = Instant::now();
        let pg = sqlx::query_scalar::<_, i32>("SELECT 1")
            .fetch_one(&self.state.pool)
            .await;
        let postgres = Dependency {
            configured: true,
            up: pg.is_ok(),
            latency_ms: pg.as_ref().ok().map(|_| ms(started.elapsed())),
            error: pg.err().map(|e| {
                tracing::warn!(error = %e, "health: postgres unreachable");
                shown(e.to_string())
            }),
        };
        let redis = match self.state.redis_ping().await {
            None => Dependency {
                configured: false,
                up: false,
                latency_ms: None,
                error: None,
            },
            Some(Ok(d)) => Dependency {
                configured: true,
                up: true,
                latency_ms: Some(ms(d)),
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
            event_delivery: event_delivery(&self.state, req).await,
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
    #[oai(path = "/health/ready", method = "get")]
    async fn ready(&self) -> ReadyResponse {
        let mut problems = Vec::new();
        let expected = crate::db::MIGRATOR.iter().count() as i64;
        let ext: Result<Option<String>, _> = sqlx::query_scalar(
            "SELECT extversion::text FROM pg_extension WHERE extname = 'pg_sales'",
        )
        .fetch_optional(&self.state.pool)
        .await;
        let applied: Result<i64, _> =
            sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.state.pool)
                .await;
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
        let applied = applied.unwrap_or(0);
        if applied < expected {
            problems.push(format!("{applied} of {expected} migrations applied"));
        }
        let body = Readiness {
            ready: problems.is_empty(),
            problems,
            extension_version,
            migrations_applied: applied,
            migrations_expected: expected,
        };
        if body.ready {
            ReadyResponse::Ready(Json(body))
        } else {
            ReadyResponse::NotReady(Json(body))
        }
    }
}
