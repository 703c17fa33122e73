//! Postgres pools and migrations.

use crate::config::Config;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::str::FromStr;

/// Migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

pub fn connect_options(url: &str, cfg: &Config) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(PgConnectOptions::from_str(url)?
        .application_name("sales-server")
        // DB_QUERY_TIMEOUT bounds every statement on the server side.
        .options([(
            "statement_timeout",
            format!("{}", cfg.db_query_timeout.as_millis()),
        )]))
}

/// The primary's pool. Connections are checked before use, so a restarted
/// Postgres costs one failed check, not a failed request.
pub async fn connect(cfg: &Config) -> Result<PgPool, sqlx::Error> {
    pool_for(&cfg.database_url, cfg).await
}

pub async fn pool_for(url: &str, cfg: &Config) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .min_connections(cfg.db_pool_min)
        .max_connections(cfg.db_pool_max)
        .idle_timeout(cfg.db_idle_timeout)
        .acquire_timeout(cfg.db_connection_timeout)
        .test_before_acquire(true)
        .connect_with(connect_options(url, cfg)?)
        .await
}

/// A pool that connects on first use (for the replica, which may be down at start).
pub fn lazy_pool_for(url: &str, cfg: &Config) -> Result<PgPool, sqlx::Error> {
    Ok(PgPoolOptions::new()
        .min_connections(0)
        .max_connections(cfg.db_pool_max)
        .idle_timeout(cfg.db_idle_timeout)
        .acquire_timeout(cfg.db_connection_timeout)
        .test_before_acquire(true)
        .connect_lazy_with(connect_options(url, cfg)?))
}

pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
