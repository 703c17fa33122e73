//! sales-server as a library: `main.rs` parses configuration and calls
//! [`Server::bind`]; tests do the same in-process.

pub mod access;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod config;
pub mod db;
pub mod events;
pub mod http;
pub mod jobs;
pub mod jwks;
pub mod listener;
pub mod logging;
pub mod maintain;
pub mod metrics;
pub mod seed;
pub mod sessions;
pub mod state;
pub mod users;
pub mod ws;

use anyhow::Context;
use config::Config;
use poem::listener::{Acceptor, AcceptorExt, Listener, TcpListener};
use state::AppState;
use std::net::SocketAddr;
use std::sync::Arc;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Concurrent HTTP/2 streams per connection.
pub const HTTP2_MAX_STREAMS: u32 = 64;

/// A bound, not yet running server.
pub struct Server {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    acceptor: poem::listener::BoxAcceptor,
}

impl Server {
    /// Connects to Postgres (and Redis when configured), runs migrations and
    /// binds the port (`PORT=0` picks a free one; see `addr`).
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        config.check_serving_secret()?;
        if let Some(secret) = &config.jwt_secret {
            events::sealed::init(secret);
        }
        config.warn_if_long_holders_can_fill_the_pool();
        metrics::init(config.slow_query_ms);
        let state = AppState::connect(config).await?;
        db::migrate(&state.pool)
            .await
            .context("running migrations")?;
        // Serving needs the extension at this release's version or newer; an
        // older one that this role may not update (`migrate` warned) stops
        // the start here, saying what to do, rather than at the first
        // function the older version lacks.
        if let Some(have) = db::extension_version(&state.pool).await? {
            if db::version_older(&have, VERSION) {
                anyhow::bail!(
                    "extension pg_sales in the database is {have} and this server needs {VERSION}: \
                     its owner or a superuser must run ALTER EXTENSION pg_sales UPDATE \
                     (this server's role may not), then start the server again"
                );
            }
        }
        // A new instance relays what happens from now on (clients ask for
        // older events with resume). The epoch first: a log replaced after
        // it was read is then one the relay finds of another epoch, while
        // a head read first could be of the log the epoch replaced.
        let (epoch, _) = events::model::Event::log_identity(&state.pool)
            .await
            .context("reading the event log's epoch")?;
        let head = events::relay::head(&state.pool)
            .await
            .context("reading the event log position")?;
        state.hub.set_position(head);
        state.hub.set_epoch(&epoch);
        state.cache.set_log_epoch(&epoch);
        // What was written while no instance relayed is made stale in the
        // shared cache before this instance serves anything from it.
        {
            let (cache, pool) = (state.cache.clone(), state.pool.clone());
            tokio::spawn(async move { cache.catch_up(&pool, &epoch, head.seq).await });
        }
        // Every region that has stores is known before any client names
        // one (later ones come with their stores' events), so the bounded
        // room for names that clients introduce never decides whether a
        // real region can be followed.
        let known: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT region FROM sales.stores WHERE region IS NOT NULL")
                .fetch_all(&state.pool)
                .await
                .context("reading the stores' regions")?;
        for r in &known {
            events::vocab::RegionKey::of(r);
        }
        // Revocation state as of now; user events past `head` are applied
        // again by the relay (they only move it forward).
        state
            .auth
            .revocations()
            .load(&state.pool, state.config.jwt_expiry.as_secs() as i64)
            .await
            .context("loading users and revoked sessions")?;
        if let Some(jwks) = state.auth.jwks() {
            // A file must be readable at start; a URL may come up later.
            match jwks.reload().await {
                Ok(n) => tracing::info!(keys = n, "JWKS read"),
                Err(e) if state.config.jwt_jwks_file.is_some() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "JWKS not readable yet; retrying")
                }
            }
        }
        let bind = format!("{}:{}", state.config.bind_addr, state.config.port);
        let acceptor = match TcpListener::bind(bind.clone()).into_acceptor().await {
            Ok(a) => a,
            // An address this machine does not have is a bad BIND_ADDR
            // (exit 2 naming it); a port in use is not a bad value.
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                return Err(config::ConfigError {
                    var: "BIND_ADDR",
                    value: state.config.bind_addr.clone(),
                    reason: format!("is not an address of this machine ({e})"),
                }
                .into());
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("binding {bind}"))),
        };
        let addr = acceptor
            .local_addr()
            .first()
            .and_then(|a| a.as_socket_addr().copied())
            .context("listener has no socket address")?;
        Ok(Self {
            addr,
            state,
            acceptor: listener::Breakable(listener::NoDelay(acceptor)).boxed(),
        })
    }

    /// Serves until `shutdown` resolves, then finishes requests in flight
    /// (bounded by SHUTDOWN_TIMEOUT).
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let app = http::app(self.state.clone());
        let timeout = self.state.config.shutdown_timeout;
        // The event relay and the WebSocket heartbeat live as long as the
        // server, side by side: the relay gets the hub as its sink, the hub
        // knows nothing of the relay. On shutdown, sockets close with 1001
        // while HTTP requests finish.
        let relay = events::relay::Relay::spawn(self.state.relay_deps()?);
        let heartbeat = ws::Heartbeat::spawn(self.state.hub.clone());
        let workers = jobs::Workers::spawn(self.state.clone());
        let jwks = self.state.auth.jwks().map(|j| j.spawn());
        let hub = self.state.hub.clone();
        let asked = Arc::new(std::sync::OnceLock::new());
        let asked_at = asked.clone();
        let shutdown = async move {
            shutdown.await;
            let _ = asked_at.set(std::time::Instant::now());
            hub.begin_shutdown();
        };
        // h2c stays served (proxies such as Envoy or Caddy speak it to
        // upstreams); BODY_LIMIT is enforced while reading, whatever the
        // protocol, and streams per connection are bounded.
        let served = poem::Server::new_with_acceptor(self.acceptor)
            .name("sales-server")
            .http2_max_concurrent_streams(HTTP2_MAX_STREAMS)
            .run_with_graceful_shutdown(app, shutdown, Some(timeout))
            .await;
        if !timeout.is_zero() && asked.get().is_some_and(|t| t.elapsed() >= timeout) {
            // Requests still running then were cut off with their
            // connections (a long export's client has part of its file).
            tracing::warn!(
                timeout_secs = timeout.as_secs_f64(),
                "SHUTDOWN_TIMEOUT ran out: connections still open were closed, requests in flight cut off"
            );
        }
        heartbeat
            .stop(
                &self.state.hub,
                timeout.min(std::time::Duration::from_secs(10)),
            )
            .await;
        workers.stop().await;
        if let Some(j) = jwks {
            j.abort();
        }
        relay.stop().await;
        served?;
        Ok(())
    }

    /// Runs in a background task; the returned handle stops it.
    pub fn spawn(self) -> RunningServer {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let addr = self.addr;
        let state = self.state.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = self
                .run(async {
                    let _ = rx.await;
                })
                .await
            {
                tracing::error!(error = %e, "server stopped with an error");
            }
        });
        RunningServer {
            addr,
            state,
            stop: Some(tx),
            task,
        }
    }
}

pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningServer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
        // Close the pools, waiting (bounded) for connections still being
        // opened: a connection left half way through authentication holds
        // its backend until Postgres' authentication_timeout (a minute), and
        // with it any DROP DATABASE of this database.
        let state = self.state.clone();
        let close = async move {
            state.pool.close().await;
            if let Some(r) = &state.replica {
                r.pool.close().await;
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), close).await;
    }
}

/// Longest error message sent back, over HTTP or a WebSocket: a parser's
/// message may quote the input it refused, and a client must not get its
/// whole request back.
pub const MAX_MESSAGE: usize = 500;

/// `text`, cut to at most `max` bytes (on a character boundary) with a mark
/// that it was cut.
pub fn clip(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… (cut)", &text[..end]).into()
}
