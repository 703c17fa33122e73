//! sales-server as a library: `main.rs` parses configuration and calls
//! [`Server::bind`]; tests do the same in-process.

pub mod auth;
pub mod cli;
pub mod config;
pub mod db;
pub mod http;
pub mod logging;
pub mod maintain;
pub mod seed;
pub mod state;
pub mod users;

use anyhow::Context;
use config::Config;
use poem::listener::{Acceptor, AcceptorExt, Listener, TcpListener};
use state::AppState;
use std::net::SocketAddr;
use std::sync::Arc;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

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
        let state = AppState::connect(config).await?;
        db::migrate(&state.pool)
            .await
            .context("running migrations")?;
        let bind = format!("{}:{}", state.config.bind_addr, state.config.port);
        let acceptor = TcpListener::bind(bind.clone())
            .into_acceptor()
            .await
            .with_context(|| format!("binding {bind}"))?;
        let addr = acceptor
            .local_addr()
            .first()
            .and_then(|a| a.as_socket_addr().copied())
            .context("listener has no socket address")?;
        Ok(Self {
            addr,
            state,
            acceptor: acceptor.boxed(),
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
        poem::Server::new_with_acceptor(self.acceptor)
            .name("sales-server")
            .run_with_graceful_shutdown(app, shutdown, Some(timeout))
            .await?;
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
    }
}
