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
}

impl Revoking {
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

impl Sink for Revoking {
    fn deliver(&self, e: &Event) -> bool {
        if e.kind.is_user() {
            if let Some(change) = Change::from_event(e, self.token_lifetime) {
                self.apply(&change);
            }
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
