//! Revocation reaching open WebSockets: the relay's sink in front of the
//! hub. A user or session event first moves the in-memory revocation state
//! (`crate::access`), then closes the connections whose token it revoked,
//! with a code that says why (4010 disabled, 4011 deleted, 4012 access
//! changed, 4013 password changed, 4014 session ended); then the event is
//! dispatched like any other (the admins' `admin` channel).

use super::Hub;
use crate::access::{Change, Revocations};
use crate::events::model::{Ephemeral, Event, Pos};
use crate::events::relay::Sink;
use std::sync::Arc;

pub struct Revoking {
    pub hub: Arc<Hub>,
    pub access: Arc<Revocations>,
    /// Seconds an access token lives (tombstones are kept that long).
    pub token_lifetime: i64,
    /// User and session events to read back and apply, one at a time in
    /// delivery order (see [`Revoking::spawn`]).
    verify: tokio::sync::mpsc::UnboundedSender<Event>,
}

impl Revoking {
    /// The sink, with the task that applies relayed user and session events
    /// as the database holds them (see [`Change::from_event_verified`]), in
    /// the order they were delivered.
    pub fn spawn(
        hub: Arc<Hub>,
        access: Arc<Revocations>,
        token_lifetime: i64,
        pool: sqlx::PgPool,
    ) -> Self {
        let (verify, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
        let (h, a) = (hub.clone(), access.clone());
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                apply_verified(&h, &a, &pool, &e, token_lifetime).await;
            }
        });
        Self {
            hub,
            access,
            token_lifetime,
            verify,
        }
    }

    /// Applies a change and closes what it revoked on this instance. The
    /// instance that made the change calls this right after its commit;
    /// every instance calls it again when the event arrives (idempotent).
    pub fn apply(&self, change: &Change) {
        self.access.apply(change);
        close_if_revoked(&self.hub, &self.access, change.user_id());
    }
}

/// Closes the user's connections whose token `access` now refuses, each
/// with the code that says why. Returns how many it closed.
pub fn close_if_revoked(hub: &Hub, access: &Revocations, user: i64) -> usize {
    hub.close_user(user, |p| {
        access
            .check_token(p)
            .err()
            .map(|why| (why.close_code(), why.message()))
    })
}

/// Applies the change a relayed user or session event stands for, as the
/// database holds it (a few tries over about three seconds). When the
/// database cannot be read, only what the event takes away is applied (a
/// user disabled or deleted, a session ended): a forged event can then at
/// worst refuse tokens, never accept one.
async fn apply_verified(
    hub: &Hub,
    access: &Revocations,
    pool: &sqlx::PgPool,
    e: &Event,
    token_lifetime: i64,
) {
    let mut wait = std::time::Duration::from_millis(100);
    for attempt in 1..=5 {
        match Change::from_event_verified(pool, e, token_lifetime).await {
            Ok(Some(change)) => {
                access.apply(&change);
                close_if_revoked(hub, access, change.user_id());
                return;
            }
            Ok(None) => {
                tracing::warn!(event = e.id, kind = %e.kind_name,
                    "a user or session event the database does not bear out; not applied");
                return;
            }
            Err(err) if attempt == 5 => {
                let Some(change) = Change::from_event(e, token_lifetime) else {
                    return;
                };
                let takes_away = match &change {
                    Change::User { disabled, .. } => *disabled,
                    Change::Deleted { .. } | Change::Session { .. } => true,
                };
                tracing::warn!(event = e.id, error = %err, applied = takes_away,
                    "could not read a user event's change back; applying only what it takes away");
                if takes_away {
                    access.apply(&change);
                    close_if_revoked(hub, access, change.user_id());
                }
                return;
            }
            Err(_) => {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
}

impl Sink for Revoking {
    fn deliver(&self, e: &Event) -> bool {
        if e.kind.is_user() && Change::from_event(e, self.token_lifetime).is_some() {
            let _ = self.verify.send(e.clone());
        }
        self.hub.deliver(e)
    }

    fn ephemeral(&self, e: &Ephemeral) {
        self.hub.ephemeral(e)
    }

    fn connected(&self, up: bool) {
        self.hub.connected(up)
    }

    fn reconnected(&self) {
        self.hub.reconnected()
    }

    fn position(&self) -> Pos {
        Sink::position(&*self.hub)
    }
}
