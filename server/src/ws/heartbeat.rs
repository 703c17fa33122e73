//! The WebSocket heartbeat.

use super::Hub;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The WebSocket heartbeat of one running server: pings every connection
/// each `ping_interval`, closing dead ones and those whose token expired,
/// and ends connections' opening holds as they run out.
pub struct Heartbeat {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    pub fn spawn(hub: Arc<Hub>) -> Heartbeat {
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut ping = tokio::time::interval(hub.cfg.ping_interval);
            ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ping.tick().await;
            // Connections that sent no request release their own events
            // when their opening hold runs out.
            let mut openings = tokio::time::interval(Duration::from_secs(1));
            openings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = rx.changed() => return,
                    _ = ping.tick() => hub.heartbeat(),
                    _ = openings.tick() => hub.end_openings(),
                }
            }
        });
        Heartbeat { stop, task }
    }

    /// Closes every socket with 1001, waits (at most `limit`) for them to
    /// go, then stops.
    pub async fn stop(self, hub: &Hub, limit: Duration) {
        hub.begin_shutdown();
        if !hub.wait_empty(limit).await {
            tracing::warn!(
                open = hub.connections(),
                "WebSocket connections still open at shutdown"
            );
        }
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}
