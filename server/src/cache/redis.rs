//! Redis backend: a reconnecting connection (or a cluster connection with
//! REDIS_CLUSTER_URLS), every call bounded by REDIS_TIMEOUT. Failures turn
//! into misses; the first failure is logged once and marks the instance
//! degraded, the first success after it logs the recovery.

use crate::config::Config;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::RwLock;

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

pub struct RedisCache {
    conn: Arc<RwLock<Option<Conn>>>,
    cluster: bool,
    timeout: Duration,
    degraded: Arc<AtomicBool>,
}

impl RedisCache {
    /// Connects in the background, retrying with backoff, so that a server
    /// starts (degraded) even when Redis is down.
    pub fn start(config: &Config, degraded: Arc<AtomicBool>) -> Self {
        let conn: Arc<RwLock<Option<Conn>>> = Arc::new(RwLock::new(None));
        let cluster_urls = config.redis_cluster_urls.clone();
        let url = config.redis_url.clone();
        let timeout = config.redis_timeout;
        degraded.store(true, Ordering::Relaxed);
        let (slot, flag) = (conn.clone(), degraded.clone());
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            let mut warned = false;
            loop {
                let attempt: Result<Conn, redis::RedisError> = if !cluster_urls.is_empty() {
                    match redis::cluster::ClusterClient::builder(cluster_urls.clone())
                        .connection_timeout(timeout.max(Duration::from_millis(500)))
                        .response_timeout(timeout)
                        .build()
                    {
                        Ok(c) => c.get_async_connection().await.map(Conn::Cluster),
                        Err(e) => Err(e),
                    }
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
        Self {
            conn,
            cluster: !config.redis_cluster_urls.is_empty(),
            timeout,
            degraded,
        }
    }

    pub async fn connected(&self) -> bool {
        self.conn.read().await.is_some()
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, ()> {
        let Some(conn) = self.conn.read().await.clone() else {
            return Err(());
        };
        let fut = async move {
            match conn {
                Conn::Single(mut c) => cmd.query_async::<T>(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async::<T>(&mut c).await,
            }
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => {
                if self.degraded.swap(false, Ordering::Relaxed) {
                    tracing::info!("redis is back; cache enabled");
                }
                Ok(v)
            }
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
        // Logged once per outage, not per request.
        if !self.degraded.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = why, "redis unavailable; serving from Postgres");
        }
    }

    /// The entry and the current versions of its tags, in one MGET.
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
        let versions = vals
            .drain(1..)
            .map(|v| {
                v.and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok())
                    .unwrap_or(0)
            })
            .collect();
        Ok((vals.pop().flatten(), versions))
    }

    pub async fn put(&self, key: &str, raw: Vec<u8>, ttl: Duration) -> Result<(), ()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(raw).arg("PX").arg(ttl.as_millis() as u64);
        self.run::<()>(&cmd).await
    }

    /// INCR each tag (a pipeline; tag keys may live in different slots).
    pub async fn bump(&self, tag_keys: &[String]) -> Result<(), ()> {
        let Some(conn) = self.conn.read().await.clone() else {
            return Err(());
        };
        let mut pipe = redis::pipe();
        for t in tag_keys {
            pipe.cmd("INCR").arg(t).ignore();
        }
        let fut = async move {
            match conn {
                Conn::Single(mut c) => pipe.query_async::<()>(&mut c).await,
                Conn::Cluster(mut c) => {
                    // A cluster pipeline must stay within one slot: send the INCRs one by one.
                    for t in tag_keys {
                        redis::cmd("INCR").arg(t).query_async::<i64>(&mut c).await?;
                    }
                    Ok(())
                }
            }
        };
        match tokio::time::timeout(self.timeout.max(Duration::from_millis(500)), fut).await {
            Ok(Ok(())) => Ok(()),
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

    pub async fn ping(&self) -> Result<Duration, String> {
        let started = Instant::now();
        match self.run::<String>(&redis::cmd("PING")).await {
            Ok(_) => Ok(started.elapsed()),
            Err(()) => Err("unreachable".into()),
        }
    }
}
