//! A database with nothing in it: no extension, no migrations. For tests
//! that install a chosen extension version themselves (upgrades). Dropped
//! when the value is dropped, like `TestDb`.

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor};
use std::str::FromStr;

pub struct BareDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl BareDb {
    /// Creates `pgs_bare_<random>` on the test cluster (`DATABASE_URL`).
    pub async fn new() -> Self {
        let name = format!("pgs_bare_{}", uuid::Uuid::new_v4().simple());
        let base = PgConnectOptions::from_str(&crate::base_url()).expect("DATABASE_URL");
        let mut admin = base
            .clone()
            .database("postgres")
            .connect()
            .await
            .expect("connect to postgres db");
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create bare database");
        admin.close().await.ok();
        let opts = base.database(&name);
        let url = format!("{}", opts.to_url_lossy());
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .expect("connect to bare database");
        Self { name, url, pool }
    }

    /// Every object of the installed pg_sales extension with its full
    /// definition (functions, tables with columns, constraints, indexes and
    /// triggers, views, sequences, statistics, comments, dump configuration),
    /// one row per object, sorted: two databases with the same rows have the
    /// same extension, however each got there.
    pub async fn extension_fingerprint(&self) -> Vec<String> {
        let rows: Vec<(String, String, String)> =
            sqlx::query_as(include_str!("extension_fingerprint.sql"))
                .fetch_all(&self.pool)
                .await
                .expect("extension fingerprint");
        rows.into_iter()
            .map(|(object, comment, definition)| format!("{object}\n{comment}\n{definition}"))
            .collect()
    }
}

impl Drop for BareDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Same as TestDb: no async drop, so a short-lived runtime on its own
        // thread removes the database.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async move {
                    if let Ok(opts) = PgConnectOptions::from_str(&crate::base_url()) {
                        if let Ok(mut c) = opts.database("postgres").connect().await {
                            let _ = c
                                .execute(
                                    format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str(),
                                )
                                .await;
                        }
                    }
                });
            }
        })
        .join();
    }
}
