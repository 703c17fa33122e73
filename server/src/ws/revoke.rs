//! Revocation reaching open WebSockets: the relay's sink in front of the
//! hub. A user or session event first moves the in-memory revocation state
//! (`crate::access`), then closes the connections whose token it revoked,
//! with a code that says why (4010 disabled, 4011 deleted, 4012 access
//! changed, 4013 password changed, 4014 session ended); then the event is
//! dispatched like any other (the admins' `admin` channel).

use super::Hub;
use crate::access::{Change, Revocations, Revoked};
use crate::events::model::{Ephemeral, Event, Pos};
use crate::events::relay::Sink;
use std::sync::Arc;

pub struct Revoking {
    pub hub: Arc<Hub>,
    pub access: Arc<Revocations>,
    /// Seconds an access token lives (tombstones are kept that long).
    pub token_lifetime: i64,
    /// User and session events to read back and apply (see
    /// [`Revoking::spawn`]).
    verify: tokio::sync::mpsc::UnboundedSender<Claim>,
    /// Announcements from `sales_access`, bounded: any role that can
    /// connect may NOTIFY on that channel, so a flood of them is dropped
    /// past [`HINTS_QUEUED`] (each one's event still follows in delivery
    /// order) rather than growing memory or delaying relayed events, which
    /// the task serves first.
    hints: tokio::sync::mpsc::Sender<Claim>,
    /// When a dropped announcement was last logged (Unix seconds).
    hint_dropped_logged: std::sync::atomic::AtomicI64,
    /// Asks for every user's access to be read back: announcements were
    /// missed (the listener was away, or some were dropped).
    read_back_all: Arc<tokio::sync::Notify>,
}

/// Everyone's access is read back at most this often.
const READ_BACK_ALL_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Announcements waiting to be read back, at most.
const HINTS_QUEUED: usize = 1024;

/// A user or session event to read back: relayed in delivery order, or
/// announced on `sales_access` as its transaction committed.
struct Claim {
    /// The event's id (for logs).
    id: i64,
    kind: crate::events::Kind,
    /// The event's payload, or the announcement (which names the same
    /// user, session, generation and reason).
    payload: serde_json::Value,
    /// What the relayed event takes away, applied when the database cannot
    /// be read back (none for an announcement: its event follows).
    fallback: Option<Change>,
    /// The generation the relayed events of this claim held (the highest,
    /// when several were read back together; none for an announcement):
    /// their read-back releases holds up to it (see
    /// `Revocations::apply_read_back`).
    held: Option<i64>,
}

impl Revoking {
    /// The sink, with the task that applies relayed user and session events
    /// as the database holds them (see [`Change::verified`]).
    /// Events queued meanwhile are read back together, once per user and
    /// per session (what is applied is the database's state, whichever
    /// event named it).
    pub fn spawn(
        hub: Arc<Hub>,
        access: Arc<Revocations>,
        token_lifetime: i64,
        pool: sqlx::PgPool,
    ) -> Self {
        let (verify, mut rx) = tokio::sync::mpsc::unbounded_channel::<Claim>();
        let (hints, mut hints_rx) = tokio::sync::mpsc::channel::<Claim>(HINTS_QUEUED);
        let (h, a) = (hub.clone(), access.clone());
        let read_back_all = Arc::new(tokio::sync::Notify::new());
        {
            // Everyone's access read back, at most once a second, in a task
            // of its own: relayed revocations are not held up meanwhile.
            let (h, a, pool, everyone) = (
                hub.clone(),
                access.clone(),
                pool.clone(),
                read_back_all.clone(),
            );
            tokio::spawn(async move {
                let mut last: Option<tokio::time::Instant> = None;
                loop {
                    everyone.notified().await;
                    if let Some(t) = last {
                        tokio::time::sleep_until(t + READ_BACK_ALL_EVERY).await;
                    }
                    last = Some(tokio::time::Instant::now());
                    read_back_everyone(&h, &a, &pool, token_lifetime).await;
                }
            });
        }
        tokio::spawn(async move {
            loop {
                // Relayed events first: announcements are hints that their
                // events follow anyway.
                let first = tokio::select! {
                    biased;
                    c = rx.recv() => match c {
                        Some(c) => c,
                        None => break,
                    },
                    Some(c) = hints_rx.recv() => c,
                };
                let mut batch = vec![first];
                while batch.len() < 1000 {
                    match rx.try_recv() {
                        Ok(e) => batch.push(e),
                        Err(_) => break,
                    }
                }
                while batch.len() < 1000 {
                    match hints_rx.try_recv() {
                        Ok(e) => batch.push(e),
                        Err(_) => break,
                    }
                }
                // The latest claim per user or session (its `revoke`
                // reason matches the stored generation most often).
                let mut latest: Vec<(String, Claim)> = Vec::new();
                for c in batch {
                    let key = match c.kind {
                        crate::events::Kind::SessionRevoked => format!(
                            "s:{}",
                            c.payload
                                .get("sessionId")
                                .unwrap_or(&serde_json::Value::Null)
                        ),
                        _ => format!(
                            "u:{}",
                            c.payload.get("userId").unwrap_or(&serde_json::Value::Null)
                        ),
                    };
                    match latest.iter_mut().find(|(k, _)| *k == key) {
                        Some(slot) => {
                            // The newer claim, keeping a relayed one's
                            // fallback when the newer is an announcement.
                            let fallback = c.fallback.clone().or(slot.1.fallback.take());
                            let held = c.held.max(slot.1.held);
                            slot.1 = Claim {
                                fallback,
                                held,
                                ..c
                            };
                        }
                        None => latest.push((key, c)),
                    }
                }
                for (_, c) in latest {
                    apply_verified(&h, &a, &pool, &c, token_lifetime).await;
                }
            }
        });
        Self {
            hub,
            access,
            token_lifetime,
            verify,
            hints,
            hint_dropped_logged: std::sync::atomic::AtomicI64::new(0),
            read_back_all,
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
    e: &Claim,
    token_lifetime: i64,
) {
    let mut wait = std::time::Duration::from_millis(100);
    let user = e.payload.get("userId").and_then(serde_json::Value::as_i64);
    for attempt in 1..=5 {
        let since = access.epoch();
        match Change::verified(pool, e.kind, &e.payload, token_lifetime).await {
            Ok(Some(change)) => {
                // A deletion applied at once from the event, a forged one,
                // goes when the user is there. A row read while a newer
                // change of the user reached this instance is read again
                // (see `Revocations::apply_read_back`); after the last try
                // the holds stay, to their end or a change that reaches
                // them.
                let applied =
                    access.apply_read_back(Some(&change), change.user_id(), e.held, since);
                if !applied && attempt < 5 {
                    // Read again once the change that touched the user
                    // has had a moment to commit its neighbours.
                    tokio::time::sleep(std::time::Duration::from_millis(5 << attempt)).await;
                    continue;
                }
                if !applied {
                    tracing::debug!(event = e.id, user = change.user_id(),
                        "a user's row read back kept being older than changes applied meanwhile;                          their own read-backs follow");
                }
                close_if_revoked(hub, access, change.user_id());
                return;
            }
            Ok(None) => {
                if let Some(user) = user {
                    // What the event held is not borne out.
                    access.apply_read_back(None, user, e.held, since);
                }
                // An announcement naming no such user or session is one
                // sent by hand (or its transaction's change is already
                // gone): not worth a warning each, since anyone who can
                // connect may send them.
                if e.fallback.is_some() {
                    tracing::warn!(event = e.id, kind = ?e.kind,
                        "a user or session event the database does not bear out; not applied");
                } else {
                    tracing::debug!(event = e.id, kind = ?e.kind,
                        "an access announcement the database does not bear out; ignored");
                }
                return;
            }
            Err(err) if attempt == 5 => {
                // Only what the event takes away, and never for longer than
                // a token lives: a forged event can then refuse tokens for a
                // while, never move a user's generation or accept a token.
                let Some(change) = e.fallback.clone() else {
                    return;
                };
                tracing::warn!(event = e.id, error = %err,
                    "could not read a user event's change back; applying only what it takes away");
                if let Change::Session {
                    user,
                    session,
                    until,
                } = change
                {
                    let cap = chrono::Utc::now().timestamp() + token_lifetime;
                    access.apply(&Change::Session {
                        user,
                        session,
                        until: until.min(cap),
                    });
                    close_if_revoked(hub, access, user);
                } else {
                    take_away(hub, access, change, token_lifetime);
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

/// Reads every user's access back (what the start-up load reads, leaving
/// the users changed meanwhile to their own read-back: see
/// [`Revocations::read_back`]) and closes the connections it now refuses:
/// after announcements were missed, so that a change whose event an open
/// transaction holds back in delivery order is applied anyway. A few tries
/// over about three seconds; then the events, in delivery order, are what
/// remains.
async fn read_back_everyone(
    hub: &Hub,
    access: &Revocations,
    pool: &sqlx::PgPool,
    token_lifetime: i64,
) {
    let mut wait = std::time::Duration::from_millis(100);
    for attempt in 1..=5 {
        match access.read_back(pool, token_lifetime).await {
            Ok(()) => {
                let mut closed = 0;
                for user in hub.connected_users() {
                    closed += close_if_revoked(hub, access, user);
                }
                tracing::debug!(closed, "every user's access read back");
                return;
            }
            Err(e) if attempt == 5 => {
                tracing::warn!(error = %e,
                    "could not read users' access back after missed announcements; their events still apply in delivery order");
                return;
            }
            Err(_) => {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
}

/// What a relayed user event takes away, applied at once (before the
/// events after it go out, and as all that is applied when the database
/// cannot be read back): a user disabled is marked so, their generation
/// left as it is; a user deleted gets a tombstone for no longer than a token
/// lives; a user whose generation moved (role, stores, email, password)
/// loses the open connections whose tokens are older, so none of them gets
/// an event the change put out of its scope (the change and a write in one
/// transaction reach the relay together, the change first). The read-back
/// then sets what the database holds, so an event that lied refuses tokens
/// only until then, and closes nothing more than connections.
fn take_away(hub: &Hub, access: &Revocations, change: Change, token_lifetime: i64) {
    match change {
        Change::User {
            id,
            disabled: true,
            generation,
            ..
        } => {
            access.mark_disabled(id, generation);
            // Older tokens stay refused until the read-back also when an
            // older change of the user is applied meanwhile (the writer's
            // own, at its commit), which sets the user enabled.
            let cap = chrono::Utc::now().timestamp() + token_lifetime;
            access.hold_generation(id, generation, Revoked::Disabled, cap);
            close_if_revoked(hub, access, id);
        }
        Change::User {
            id,
            generation,
            why,
            ..
        } => {
            // The tokens too, until the read-back: a client that reconnects
            // at once is not served under its old scope meanwhile.
            let cap = chrono::Utc::now().timestamp() + token_lifetime;
            access.hold_generation(id, generation, why, cap);
            // Tokens of an outside identity provider carry no generation
            // of ours (`Revocations::check_account`).
            hub.close_user(id, |p| {
                (!p.outside && p.generation < generation).then(|| (why.close_code(), why.message()))
            });
        }
        Change::Deleted { id, until } => {
            let cap = chrono::Utc::now().timestamp() + token_lifetime;
            access.apply(&Change::Deleted {
                id,
                until: until.min(cap),
            });
            close_if_revoked(hub, access, id);
        }
        _ => {}
    }
}

impl Sink for Revoking {
    fn deliver(&self, e: &Event) -> bool {
        if e.kind.is_user() {
            if let Some(change) = Change::from_event(e, self.token_lifetime) {
                // What the event takes away (a user disabled or deleted)
                // holds at once, before the events after it go out; the
                // rest (a moved generation, a session's end) after the
                // read-back, which sets what the database holds.
                let held = match &change {
                    Change::User { generation, .. } => Some(*generation),
                    _ => None,
                };
                take_away(&self.hub, &self.access, change.clone(), self.token_lifetime);
                let claim = Claim {
                    id: e.id,
                    kind: e.kind,
                    payload: e.payload.value(),
                    fallback: Some(change),
                    held,
                };
                if self.verify.send(claim).is_err() {
                    tracing::error!(
                        event = e.id,
                        "the revocation task is gone; a user event was not applied"
                    );
                }
            }
        }
        self.hub.deliver(e)
    }

    fn ephemeral(&self, e: &Ephemeral) {
        self.hub.ephemeral(e)
    }

    /// A user or session event announced as it committed: its user's
    /// access is read back and applied now, and the connections it revoked
    /// closed, while the event itself may still wait its turn behind an
    /// open transaction. Only the database's state is applied, so a NOTIFY
    /// sent by hand makes this instance read a user again, nothing more.
    fn access(&self, hint: &serde_json::Value) {
        let kind = crate::events::Kind::parse(hint["kind"].as_str().unwrap_or(""));
        let Some(user) = hint["userId"].as_i64() else {
            return;
        };
        if !kind.is_user() {
            return;
        }
        // Only what names the change, each part bounded: nothing else of
        // an announcement is read.
        let mut payload = serde_json::json!({ "userId": user });
        if let Some(g) = hint["generation"].as_i64() {
            payload["generation"] = g.into();
        }
        if let Some(r) = hint["revoke"].as_str().filter(|r| r.len() <= 32) {
            payload["revoke"] = r.into();
        }
        if let Some(s) = hint["sessionId"].as_str().filter(|s| s.len() <= 64) {
            payload["sessionId"] = s.into();
        }
        let claim = Claim {
            id: hint["id"].as_i64().unwrap_or(0),
            kind,
            payload,
            fallback: None,
            held: None,
        };
        if let Err(e) = self.hints.try_send(claim) {
            use std::sync::atomic::Ordering;
            // Read back with everyone else's (at most once a second).
            self.read_back_all.notify_one();
            let now = chrono::Utc::now().timestamp();
            let last = self.hint_dropped_logged.load(Ordering::Relaxed);
            if now > last
                && self
                    .hint_dropped_logged
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                let why = match e {
                    tokio::sync::mpsc::error::TrySendError::Full(_) => {
                        "too many announcements queued"
                    }
                    tokio::sync::mpsc::error::TrySendError::Closed(_) => {
                        "the revocation task is gone"
                    }
                };
                tracing::warn!(
                    why,
                    "an access announcement was dropped (its event still applies in delivery order)"
                );
            }
        }
    }

    fn announcements_missed(&self) {
        self.read_back_all.notify_one();
    }

    fn listening(&self, up: bool) {
        self.hub.listening(up)
    }

    fn connected(&self, up: bool) {
        self.hub.connected(up)
    }

    fn reconnected(&self) {
        self.hub.reconnected()
    }

    fn epoch(&self) -> std::sync::Arc<str> {
        Sink::epoch(&*self.hub)
    }

    fn log_replaced(&self, epoch: &str, head: Pos) {
        Sink::log_replaced(&*self.hub, epoch, head)
    }

    fn position(&self) -> Pos {
        Sink::position(&*self.hub)
    }
}
