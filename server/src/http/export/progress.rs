//! `export-progress` events: snapshots of a running export, sent through
//! Postgres (`pg_notify` on the ephemeral channel) to whichever instance
//! holds the user's WebSocket.

use super::format::{ExportFormat, ExportShape};
use super::PROGRESS_INTERVAL;
use crate::events::EPHEMERAL_CHANNEL;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::watch;

#[derive(Debug, Clone, Default, PartialEq)]
pub(super) enum RunState {
    #[default]
    Running,
    Completed,
    Cancelled,
    Failed(String),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Snapshot {
    pub(super) rows: u64,
    pub(super) total: Option<u64>,
    pub(super) state: RunState,
}

impl Snapshot {
    fn percent(&self) -> f64 {
        if self.state == RunState::Completed {
            return 100.0;
        }
        match self.total {
            Some(t) if t > 0 => ((self.rows as f64 * 1000.0 / t as f64).round() / 10.0).min(100.0),
            _ => 0.0,
        }
    }
}

/// The `data` of the `export-progress` message relayed to the user's WebSocket.
pub(super) fn progress_data(
    export_id: &str,
    format: ExportFormat,
    shape: ExportShape,
    s: &Snapshot,
) -> serde_json::Value {
    let (status, error) = match &s.state {
        RunState::Running => ("running", None),
        RunState::Completed => ("completed", None),
        RunState::Cancelled => ("cancelled", None),
        RunState::Failed(e) => ("failed", Some(e.clone())),
    };
    json!({
        "exportId": export_id,
        "format": format.name(),
        "shape": shape.name(),
        "rowsSent": s.rows,
        "estimatedTotal": s.total,
        "percent": s.percent(),
        "done": s.state != RunState::Running,
        "status": status,
        "cancelled": s.state == RunState::Cancelled,
        "error": error,
    })
}

/// Sends progress NOTIFYs: the latest snapshot at most every
/// PROGRESS_INTERVAL, and always the final one, in order, as soon as the
/// export ends (the wait between two updates never delays the last one).
pub(super) async fn notify_progress(
    pool: PgPool,
    user_id: i64,
    export_id: String,
    format: ExportFormat,
    shape: ExportShape,
    mut rx: watch::Receiver<Snapshot>,
) {
    let mut last: Option<Snapshot> = None;
    // Whether a change has been seen but not sent yet (found while waiting
    // out the interval).
    let mut pending = false;
    loop {
        let closed = if pending {
            pending = false;
            rx.has_changed().is_err()
        } else {
            rx.changed().await.is_err()
        };
        let snap = rx.borrow_and_update().clone();
        if last.as_ref() != Some(&snap) && (snap.total.is_some() || snap.state != RunState::Running)
        {
            let payload = crate::events::sealed::seal(
                user_id,
                "export-progress",
                progress_data(&export_id, format, shape, &snap),
            );
            if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(EPHEMERAL_CHANNEL)
                .bind(&payload)
                .execute(&pool)
                .await
            {
                tracing::warn!(error = %e, "could not send export progress");
            }
            last = Some(snap.clone());
        }
        if closed || snap.state != RunState::Running {
            break;
        }
        // Wait out the interval, unless the export ends first.
        let interval = tokio::time::sleep(PROGRESS_INTERVAL);
        tokio::pin!(interval);
        loop {
            tokio::select! {
                _ = &mut interval => break,
                r = rx.changed() => {
                    if r.is_err() || rx.borrow().state != RunState::Running {
                        pending = true;
                        break;
                    }
                }
            }
        }
        if !pending {
            // Changes seen while waiting are still unsent.
            let now = rx.borrow();
            pending = now.state == RunState::Running && last.as_ref() != Some(&*now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent() {
        let mut s = Snapshot {
            rows: 1,
            total: Some(3),
            state: RunState::Running,
        };
        assert_eq!(s.percent(), 33.3);
        s.rows = 5;
        assert_eq!(s.percent(), 100.0);
        s.total = Some(0);
        assert_eq!(s.percent(), 0.0);
        s.state = RunState::Completed;
        assert_eq!(s.percent(), 100.0);
    }
}
