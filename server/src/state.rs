//! What every request handler shares.

use crate::auth::Auth;
use crate::config::Config;
use crate::db;
use anyhow::Context;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct AppState {
    pub config: Config,
    pub auth: Auth,
    pub pool: PgPool,
    pub redis: Option<redis::Client>,
    pub started: Instant,
}

impl AppState {
    pub async fn connect(config: Config) -> anyhow::Result<Arc<Self>> {
        let auth = Auth::from_config(&config)?;
        let pool = db::connect(&config)
            .await
            .context("connecting to Postgres (DATABASE_URL)")?;
        let redis = match &config.redis_url {
            Some(url) => Some(redis::Client::open(url.as_str()).context("REDIS_URL")?),
            None => None,
        };
        Ok(Arc::new(Self {
            config,
            auth,
            pool,
            redis,
            started: Instant::now(),
        }))
    }

    /// PING with a short timeout; `None` when Redis is not configured.
    pub async fn redis_ping(&self) -> Option<Result<Duration, String>> {
        let client = self.redis.as_ref()?;
        let started = Instant::now();
        let attempt = async {
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        };
        Some(
            match tokio::time::timeout(
                self.config.redis_timeout.max(Duration::from_millis(500)),
                attempt,
            )
            .await
            {
                Ok(Ok(_)) => Ok(started.elapsed()),
                Ok(Err(e)) => Err(e),
                Err(_) => Err("timed out".into()),
            },
        )
    }
}

impl AppState {
    /// A state whose pool never connects until used: for printing the spec.
    pub fn offline(config: Config) -> anyhow::Result<Arc<Self>> {
        let pool = db::lazy_pool_for(&config.database_url, &config)?;
        let mut config = config;
        if config.jwt_secret.is_none() {
            // Printing the spec verifies no token; any secret will do.
            config.jwt_secret = Some("x".repeat(32));
        }
        let auth = Auth::from_config(&config)?;
        Ok(Arc::new(Self {
            config,
            auth,
            pool,
            redis: None,
            started: Instant::now(),
        }))
    }
}

impl AppState {
    /// The pool for reads that may be served by a replica.
    pub fn read_pool(&self) -> PgPool {
        self.pool.clone()
    }

    /// Called by a write handler after its transaction commits, before it
    /// answers: the hook for read-your-writes (cache invalidation).
    pub async fn after_write(&self, _summary: &serde_json::Value) {}

    /// Called after a store is created or changed.
    pub async fn after_store_write(&self) {}
}
