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
