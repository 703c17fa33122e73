//! What every request handler shares.

use crate::auth::Auth;
use crate::cache::Cache;
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
    pub cache: Cache,
    /// WebSocket fan-out, fed by the event relay.
    pub hub: Arc<crate::ws::Hub>,
    pub started: Instant,
}

impl AppState {
    pub async fn connect(config: Config) -> anyhow::Result<Arc<Self>> {
        let auth = Auth::from_config(&config)?;
        let pool = db::connect(&config)
            .await
            .context("connecting to Postgres (DATABASE_URL)")?;
        let cache = Cache::new(&config);
        // Give Redis a moment so a healthy instance does not start degraded.
        cache.wait_ready(std::time::Duration::from_secs(2)).await;
        let hub = Arc::new(crate::ws::Hub::new(crate::ws::HubConfig::from_config(
            &config,
        )));
        Ok(Arc::new(Self {
            config,
            auth,
            pool,
            cache,
            hub,
            started: Instant::now(),
        }))
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
        let auth = Auth::from_config(&config)?;
        let cache = Cache::new(&config);
        let hub = Arc::new(crate::ws::Hub::new(crate::ws::HubConfig::from_config(
            &config,
        )));
        Ok(Arc::new(Self {
            config,
            auth,
            pool,
            cache,
            hub,
            started: Instant::now(),
        }))
    }
}

impl AppState {
    /// The pool for reads that may be served by a replica.
    pub fn read_pool(&self) -> PgPool {
        self.pool.clone()
    }
}
