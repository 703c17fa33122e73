//! Revocation, checked from memory on every request: each instance keeps
//! every user's access generation and disabled flag, the users deleted
//! lately and the sessions revoked lately. It is loaded once at start
//! ([`Revocations::load`]) and then moved only by user and session events
//! (`user-created`, `user-updated`, `user-deleted`, `session-revoked`), which
//! reach every instance through the event relay; the instance that makes a
//! change applies it before answering.
//!
//! An access token carries the generation it was issued at (`gen`) and its
//! session (`sid`). It is refused once the user is disabled or deleted, once
//! the user's generation has moved past the token's (role, stores, email or
//! password changed), or once its session was revoked (logout, refresh-token
//! reuse). Tokens of users this instance has never heard of (an outside
//! identity provider's, or users inserted by plain SQL) are judged by their
//! signature alone. A user updated or deleted by plain SQL is revoked like
//! any other: a trigger (migration 0014) moves the generation and writes
//! the event.

use crate::auth::Principal;
use crate::events::{Event, Kind};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::RwLock;

/// Why a token stopped being accepted; WebSocket close codes say the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    Disabled,
    Deleted,
    /// Role, stores or email changed: refresh for a token with the new scope.
    AccessChanged,
    PasswordChanged,
    /// The session ended (logout, or a reused refresh token).
    SessionEnded,
}

impl Revoked {
    pub fn message(self) -> &'static str {
        match self {
            Revoked::Disabled => "account disabled",
            Revoked::Deleted => "account deleted",
            Revoked::AccessChanged => "access changed; refresh the token",
            Revoked::PasswordChanged => "password changed; log in again",
            Revoked::SessionEnded => "session ended; log in again",
        }
    }

    /// The WebSocket close code (see docs/websocket.md).
    pub fn close_code(self) -> u16 {
        match self {
            Revoked::Disabled => 4010,
            Revoked::Deleted => 4011,
            Revoked::AccessChanged => 4012,
            Revoked::PasswordChanged => 4013,
            Revoked::SessionEnded => 4014,
        }
    }

    fn parse(s: &str) -> Revoked {
        match s {
            "disabled" => Revoked::Disabled,
            "password" => Revoked::PasswordChanged,
            "session" => Revoked::SessionEnded,
            _ => Revoked::AccessChanged,
        }
    }
}

/// An outside identity provider's name for a user: the `iss` and `sub` of
/// its tokens. Only a linked identity makes such a token stand for a user
/// here (migration 0019; checked when linked by `Identity::new` in `users`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub issuer: String,
    pub subject: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserAccess {
    pub generation: i64,
    pub disabled: bool,
    /// Why the generation last moved.
    pub why: Revoked,
    pub email: String,
    /// The outside identity linked to the user.
    pub identity: Option<Identity>,
}

/// One change, as applied to the registry (from an event or by the writer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A user created or changed; `why` says what moved the generation.
    User {
        id: i64,
        email: String,
        generation: i64,
        disabled: bool,
        why: Revoked,
        /// The outside identity linked to the user: `None` leaves it as it
        /// was (events written by migration 0014's trigger do not carry it).
        identity: Option<Option<Identity>>,
    },
    Deleted {
        id: i64,
        /// Seconds since the epoch after which no token of the user can be valid.
        until: i64,
    },
    Session {
        user: i64,
        session: String,
        until: i64,
    },
}

/// A user's access as the database holds it: id, email (lowercase),
/// generation, disabled, and the linked outside identity's issuer and
/// subject. Read whole at start ([`Revocations::load`]) and per user for a
/// relayed event ([`Change::verified`]).
const USER_ACCESS_SQL: &str =
    "SELECT u.id, lower(u.email), coalesce(s.generation, 0), coalesce(s.disabled, false),
            i.issuer, i.subject
     FROM sales.users u LEFT JOIN auth.user_state s ON s.user_id = u.id
     LEFT JOIN auth.identities i ON i.user_id = u.id";

/// A row of [`USER_ACCESS_SQL`].
type UserRow = (i64, String, i64, bool, Option<String>, Option<String>);

/// The change that sets a user to `row`, refusing older tokens for `why`.
fn user_change(row: UserRow, why: Revoked) -> Change {
    let (id, email, generation, disabled, issuer, subject) = row;
    Change::User {
        id,
        email,
        generation,
        disabled,
        why,
        identity: Some(
            issuer
                .zip(subject)
                .map(|(issuer, subject)| Identity { issuer, subject }),
        ),
    }
}

impl Change {
    pub fn user_id(&self) -> i64 {
        match self {
            Change::User { id, .. } | Change::Deleted { id, .. } => *id,
            Change::Session { user, .. } => *user,
        }
    }

    /// The change a user or session event of `kind` stands for (its
    /// payload, or its announcement on `sales_access`, is `p`), read from
    /// the database: the event only says which user or session to look at.
    /// Any role allowed to write event rows (`sales.emit` takes any kind)
    /// could write one that says a disabled user is enabled, or links an
    /// outside identity to an admin; what this returns is what the
    /// database holds. The reason a token is refused (`revoke`) comes from
    /// the event only when its generation is the stored one.
    pub async fn verified(
        pool: &sqlx::PgPool,
        kind: Kind,
        p: &Value,
        token_lifetime: i64,
    ) -> Result<Option<Change>, sqlx::Error> {
        let Some(id) = p.get("userId").and_then(Value::as_i64) else {
            return Ok(None);
        };
        let keep = token_lifetime + crate::auth::LEEWAY_SECS as i64;
        match kind {
            Kind::UserCreated | Kind::UserUpdated | Kind::UserDeleted => {
                let row: Option<UserRow> =
                    sqlx::query_as(&format!("{USER_ACCESS_SQL} WHERE u.id = $1"))
                        .bind(id)
                        .fetch_optional(pool)
                        .await?;
                if let Some(row) = row {
                    let said = p.get("generation").and_then(Value::as_i64);
                    let why = if said == Some(row.2) {
                        Revoked::parse(p.get("revoke").and_then(Value::as_str).unwrap_or(""))
                    } else {
                        Revoked::parse("")
                    };
                    return Ok(Some(user_change(row, why)));
                }
                let until: Option<i64> = sqlx::query_scalar(
                    "SELECT extract(epoch FROM deleted_at)::bigint + $2
                     FROM auth.deleted_users WHERE user_id = $1",
                )
                .bind(id)
                .bind(tombstone_keep(token_lifetime))
                .fetch_optional(pool)
                .await?;
                Ok(until.map(|until| Change::Deleted { id, until }))
            }
            Kind::SessionRevoked => {
                let Some(session) = p.get("sessionId").and_then(Value::as_str) else {
                    return Ok(None);
                };
                let until: Option<i64> = sqlx::query_scalar(&format!(
                    "SELECT {} FROM auth.sessions
                     WHERE id::text = $3 AND user_id = $4 AND revoked_at IS NOT NULL",
                    session_refused_until("$1", "$2")
                ))
                .bind(keep)
                .bind(crate::auth::LEEWAY_SECS as i64)
                .bind(session)
                .bind(id)
                .fetch_optional(pool)
                .await?;
                Ok(until.map(|until| Change::Session {
                    user: id,
                    session: session.to_string(),
                    until,
                }))
            }
            _ => Ok(None),
        }
    }

    /// The change an event describes, if it is a user or session event.
    /// `token_lifetime` is how long tombstones are kept.
    pub fn from_event(e: &Event, token_lifetime: i64) -> Option<Change> {
        let p = &e.payload.value();
        let id = p.get("userId").and_then(Value::as_i64)?;
        let until = e.created_at.timestamp() + token_lifetime + crate::auth::LEEWAY_SECS as i64;
        match e.kind {
            Kind::UserCreated | Kind::UserUpdated => Some(Change::User {
                id,
                email: p.get("email").and_then(Value::as_str)?.to_lowercase(),
                generation: p.get("generation").and_then(Value::as_i64)?,
                disabled: p.get("disabled").and_then(Value::as_bool)?,
                why: Revoked::parse(p.get("revoke").and_then(Value::as_str).unwrap_or("")),
                identity: p.get("identity").map(|i| {
                    Some(Identity {
                        issuer: i.get("issuer")?.as_str()?.to_string(),
                        subject: i.get("subject")?.as_str()?.to_string(),
                    })
                }),
            }),
            Kind::UserDeleted => Some(Change::Deleted { id, until }),
            Kind::SessionRevoked => Some(Change::Session {
                user: id,
                session: p.get("sessionId").and_then(Value::as_str)?.to_string(),
                until,
            }),
            _ => None,
        }
    }
}

#[derive(Default)]
struct Inner {
    users: HashMap<i64, UserAccess>,
    /// Outside identities -> the users this instance
    /// believes linked to each. The database links an identity to one user
    /// at most; two here means the events of one change have been applied
    /// and those of an earlier one not yet (say, this instance's own link
    /// applied at once, another instance's older link and unlink still on
    /// their way through the relay), and the identity names nobody until
    /// they have.
    by_identity: HashMap<Identity, Vec<i64>>,
    /// Deleted user -> until when its tokens could still be presented.
    deleted: HashMap<i64, i64>,
    /// Revoked session -> until when its access tokens could still be presented.
    sessions: HashMap<String, i64>,
    /// Relayed events' generations not read back yet: user -> each (the
    /// generation an event names, why it moved, until when it is held).
    /// Tokens below one are refused until the read-back of its event (or
    /// what the database is then known to hold reaches it), so a token
    /// whose scope a change narrowed is not accepted again in between (a
    /// client reconnecting at once would otherwise be replayed under its
    /// old scope). Kept one per generation: an event that lied (a
    /// generation the database does not have) only refuses tokens, until
    /// its own read-back or the hold's end, and its release leaves the
    /// holds of other events.
    pending: HashMap<i64, Vec<(i64, Revoked, i64)>>,
    /// Counts changes to users' state; `touched` says when each user's
    /// last changed (see [`Revocations::read_back`]).
    epoch: u64,
    touched: HashMap<i64, u64>,
}

impl Inner {
    /// Whether `id`'s tombstone still refuses their tokens at `now` (read
    /// only when there is one: this is on every request's path).
    fn is_deleted(&self, id: i64, now: impl FnOnce() -> i64) -> bool {
        self.deleted.get(&id).is_some_and(|until| *until > now())
    }

    fn touch(&mut self, id: i64) {
        self.epoch += 1;
        let e = self.epoch;
        self.touched.insert(id, e);
    }

    /// `user` no longer holds `identity`.
    fn unclaim(&mut self, identity: &Identity, user: i64) {
        if let Some(users) = self.by_identity.get_mut(identity) {
            users.retain(|u| *u != user);
            if users.is_empty() {
                self.by_identity.remove(identity);
            }
        }
    }
}

#[derive(Default)]
pub struct Revocations {
    inner: RwLock<Inner>,
}

impl Revocations {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// For tokens of an outside identity provider (which know nothing of
    /// generations or sessions here): only a disabled or deleted user is refused.
    /// A token that stands for its user through a linked identity loses
    /// its access once that link is gone (unlinked, or moved to another
    /// identity): an open WebSocket is closed as for a change of access.
    pub fn check_account(&self, p: &Principal) -> Result<(), Revoked> {
        let inner = self.read();
        if inner.is_deleted(p.user_id, || chrono::Utc::now().timestamp()) {
            return Err(Revoked::Deleted);
        }
        let user = inner.users.get(&p.user_id);
        if user.is_some_and(|u| u.disabled) {
            return Err(Revoked::Disabled);
        }
        if let Some(identity) = &p.identity {
            if user.and_then(|u| u.identity.as_ref()) != Some(&**identity) {
                return Err(Revoked::AccessChanged);
            }
        }
        Ok(())
    }

    /// The check for a verified token: [`Revocations::check_account`] for
    /// an outside identity provider's, [`Revocations::check`] for this
    /// server's. REST and open WebSockets use the same.
    pub fn check_token(&self, p: &Principal) -> Result<(), Revoked> {
        if p.outside {
            self.check_account(p)
        } else {
            self.check(p)
        }
    }

    /// Whether a verified token's holder still has access.
    pub fn check(&self, p: &Principal) -> Result<(), Revoked> {
        let inner = self.read();
        if inner.is_deleted(p.user_id, || chrono::Utc::now().timestamp()) {
            return Err(Revoked::Deleted);
        }
        if let Some(u) = inner.users.get(&p.user_id) {
            if u.disabled {
                return Err(Revoked::Disabled);
            }
            if p.generation < u.generation {
                return Err(u.why);
            }
        }
        if let Some(holds) = inner.pending.get(&p.user_id) {
            let now = chrono::Utc::now().timestamp();
            if let Some((_, why, _)) = holds
                .iter()
                .filter(|(g, _, until)| p.generation < *g && *until > now)
                .max_by_key(|(g, ..)| *g)
            {
                return Err(*why);
            }
        }
        if let Some(s) = &p.session {
            if inner.sessions.contains_key(s) {
                return Err(Revoked::SessionEnded);
            }
        }
        Ok(())
    }

    /// The user an outside identity provider's (issuer, subject) is
    /// linked to (migration 0019), when there is one.
    pub fn user_by_identity(&self, issuer: &str, subject: &str) -> Option<i64> {
        match self
            .read()
            .by_identity
            .get(&Identity {
                issuer: issuer.to_string(),
                subject: subject.to_string(),
            })
            .map(Vec::as_slice)
        {
            Some(&[user]) => Some(user),
            _ => None,
        }
    }

    pub fn user(&self, id: i64) -> Option<UserAccess> {
        self.read().users.get(&id).cloned()
    }

    /// Marks a user disabled, their generation left as it is: what a
    /// relayed event that takes access away applies at once, before the
    /// database is read back (see `ws::revoke`). The read-back then sets
    /// what the database holds (enabled again, for an event that lied).
    /// An event older than what is known (its `generation` below the
    /// user's: a later change, announced at its commit, was applied
    /// already) changes nothing.
    pub fn mark_disabled(&self, id: i64, generation: i64) {
        let mut inner = self.write();
        inner.touch(id);
        match inner.users.get_mut(&id) {
            Some(u) if u.generation > generation => {}
            Some(u) => u.disabled = true,
            None => {
                inner.users.insert(
                    id,
                    UserAccess {
                        generation: 0,
                        disabled: true,
                        why: Revoked::Disabled,
                        email: String::new(),
                        identity: None,
                    },
                );
            }
        }
    }

    /// Holds a relayed event's generation until the read-back (see
    /// `Inner::pending`), for no longer than `until` (seconds since the
    /// epoch).
    pub fn hold_generation(&self, id: i64, generation: i64, why: Revoked, until: i64) {
        let mut inner = self.write();
        inner.touch(id);
        let now = chrono::Utc::now().timestamp();
        let holds = inner.pending.entry(id).or_default();
        holds.retain(|(g, _, u)| *g != generation && *u > now);
        holds.push((generation, why, until));
    }

    /// Drops `id`'s holds at or below `upto`.
    fn release(inner: &mut Inner, id: i64, upto: i64) {
        if let Some(holds) = inner.pending.get_mut(&id) {
            holds.retain(|(g, ..)| *g > upto);
            if holds.is_empty() {
                inner.pending.remove(&id);
            }
        }
    }

    /// Where this instance's changes to users' state stand: what a
    /// read-back notes before it reads (see [`Self::apply_read_back`]).
    pub fn epoch(&self) -> u64 {
        self.read().epoch
    }

    /// Applies what the database holds for a user or session event, read
    /// back after `since` (the [`Self::epoch`] noted before the read).
    /// A user's row is not applied when the user's state changed on this
    /// instance after `since` (a newer event's disable, deletion or hold,
    /// the writer's own change, another read-back) and the row's generation
    /// is not past every one known for the user (or the user was deleted
    /// here): the row may be older than that change; nothing is done and
    /// false is returned, to read again. Otherwise the holds of the relayed
    /// events it was read for go (`held`, their highest generation; None:
    /// they held none), also when
    /// the database does not bear them out (an event that lied refuses
    /// tokens only until its read-back), a user the database has loses a
    /// tombstone a relayed deletion left (ids are never reused), and `c` is
    /// applied. A deletion or a session's end the database holds is final
    /// and always applied. None for `c`: the database has nothing to apply
    /// (no such user or session); only the holds go.
    pub fn apply_read_back(
        &self,
        c: Option<&Change>,
        user: i64,
        held: Option<i64>,
        since: u64,
    ) -> bool {
        let now = chrono::Utc::now().timestamp();
        let mut inner = self.write();
        if let Some(Change::User { id, generation, .. }) = c {
            // A row past every generation this instance knows of the user
            // (stored or held) is newer than whatever touched it: applied
            // however busy the user is (a stream of changes would
            // otherwise keep every read-back from being applied).
            let known = inner
                .pending
                .get(id)
                .into_iter()
                .flatten()
                .map(|(g, ..)| *g)
                .chain(inner.users.get(id).map(|u| u.generation))
                .max();
            // (Never over a deletion: a row read before it would undo it.)
            let newer = !inner.is_deleted(*id, || now) && known.is_none_or(|k| *generation > k);
            if !newer && inner.touched.get(id).is_some_and(|t| *t > since) {
                return false;
            }
            inner.deleted.remove(id);
        }
        if let Some(held) = held {
            Self::release(&mut inner, user, held);
        }
        if let Some(c) = c {
            Self::apply_to(&mut inner, c, now);
            Self::forget_past(&mut inner, now);
        }
        true
    }

    /// Applies a change; a user's state only moves forward (events may be
    /// seen again after the start-up load).
    pub fn apply(&self, c: &Change) {
        let now = chrono::Utc::now().timestamp();
        let mut inner = self.write();
        Self::apply_to(&mut inner, c, now);
        Self::forget_past(&mut inner, now);
    }

    fn apply_to(inner: &mut Inner, c: &Change, now: i64) {
        if let Change::User { id, .. } | Change::Deleted { id, .. } = c {
            inner.touch(*id);
        }
        match c {
            Change::User {
                id,
                email,
                generation,
                disabled,
                why,
                identity,
            } => {
                // What the database holds now stands: a generation held
                // from an event is no longer needed once reached. A hold
                // past it stays: a newer change's, whose own read-back
                // clears it (see `apply_read_back`).
                Self::release(inner, *id, *generation);
                if inner.is_deleted(*id, || now) {
                    return;
                }
                // A tombstone past its time refuses nothing: no token of
                // a user really deleted can be presented any more, and a
                // deletion the database did not bear out (see `undelete`)
                // ends there at the latest.
                inner.deleted.remove(id);
                let newer = inner
                    .users
                    .get(id)
                    .is_none_or(|u| u.generation <= *generation);
                if newer {
                    let kept = inner.users.get(id).and_then(|u| u.identity.clone());
                    let identity = identity.clone().unwrap_or(kept.clone());
                    if kept != identity {
                        if let Some(k) = &kept {
                            inner.unclaim(k, *id);
                        }
                        if let Some(i) = &identity {
                            inner.by_identity.entry(i.clone()).or_default().push(*id);
                        }
                    }
                    // At the generation already held, a reason known from
                    // the change itself (its event, or the writer) stands
                    // over the default an older event of the same user
                    // reads the row with: its generation no longer being
                    // the stored one, it cannot say why the row moved last.
                    let why = match inner.users.get(id) {
                        Some(u)
                            if u.generation == *generation && *why == Revoked::AccessChanged =>
                        {
                            u.why
                        }
                        _ => *why,
                    };
                    inner.users.insert(
                        *id,
                        UserAccess {
                            generation: *generation,
                            disabled: *disabled,
                            why,
                            email: email.clone(),
                            identity,
                        },
                    );
                }
            }
            Change::Deleted { id, until } => {
                if let Some(old) = inner.users.remove(id) {
                    if let Some(i) = old.identity {
                        inner.unclaim(&i, *id);
                    }
                }
                if *until > now {
                    inner.deleted.insert(*id, *until);
                }
            }
            Change::Session { session, until, .. } => {
                if *until > now {
                    inner.sessions.insert(session.clone(), *until);
                }
            }
        }
    }

    /// Forgets what can no longer matter.
    fn forget_past(inner: &mut Inner, now: i64) {
        if inner.sessions.len() + inner.deleted.len() > 1024 {
            inner.sessions.retain(|_, u| *u > now);
            inner.deleted.retain(|_, u| *u > now);
        }
    }

    /// Loads every user's state, the users deleted and the sessions revoked
    /// within `token_lifetime` seconds (older ones can have no valid token
    /// left). Prunes older tombstones.
    pub async fn load(&self, pool: &sqlx::PgPool, token_lifetime: i64) -> Result<(), sqlx::Error> {
        let state = read_state(pool, token_lifetime).await?;
        self.apply_state(state, None);
        Ok(())
    }

    /// As [`Self::load`], while events are applied meanwhile (announcements
    /// were missed): a user whose state this instance changed after the
    /// read began (a relayed event's disable or held generation, another
    /// read-back) keeps it, since the rows read may be older than that
    /// change; their own read-back follows. A user whose generation and
    /// disabled flag are as known keeps why they were last refused.
    pub async fn read_back(
        &self,
        pool: &sqlx::PgPool,
        token_lifetime: i64,
    ) -> Result<(), sqlx::Error> {
        let since = self.read().epoch;
        let state = read_state(pool, token_lifetime).await?;
        self.apply_state(state, Some(since));
        Ok(())
    }

    fn apply_state(&self, state: State, since: Option<u64>) {
        let now = chrono::Utc::now().timestamp();
        let mut inner = self.write();
        for row in state.users {
            if let Some(since) = since {
                if inner.touched.get(&row.0).is_some_and(|t| *t > since) {
                    continue;
                }
                let identity = row
                    .4
                    .clone()
                    .zip(row.5.clone())
                    .map(|(issuer, subject)| Identity { issuer, subject });
                let same = inner.users.get(&row.0).is_some_and(|u| {
                    u.generation == row.2
                        && u.disabled == row.3
                        && u.email == row.1
                        && u.identity == identity
                });
                if same {
                    continue;
                }
            }
            let why = if row.3 {
                Revoked::Disabled
            } else {
                Revoked::AccessChanged
            };
            Self::apply_to(&mut inner, &user_change(row, why), now);
        }
        for (id, until) in state.deleted {
            Self::apply_to(&mut inner, &Change::Deleted { id, until }, now);
        }
        for (session, user, until) in state.sessions {
            Self::apply_to(
                &mut inner,
                &Change::Session {
                    user,
                    session,
                    until,
                },
                now,
            );
        }
        Self::forget_past(&mut inner, now);
    }
}

/// What [`Revocations::load`] reads.
struct State {
    users: Vec<UserRow>,
    deleted: Vec<(i64, i64)>,
    sessions: Vec<(String, i64, i64)>,
}

async fn read_state(pool: &sqlx::PgPool, token_lifetime: i64) -> Result<State, sqlx::Error> {
    let keep = token_lifetime + crate::auth::LEEWAY_SECS as i64;
    let users: Vec<UserRow> = sqlx::query_as(USER_ACCESS_SQL).fetch_all(pool).await?;
    let tombstone = tombstone_keep(token_lifetime);
    sqlx::query(
        "DELETE FROM auth.deleted_users WHERE deleted_at < now() - make_interval(secs => $1)",
    )
    .bind(tombstone as f64)
    .execute(pool)
    .await?;
    let deleted: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT user_id, extract(epoch FROM deleted_at)::bigint + $1 FROM auth.deleted_users",
    )
    .bind(tombstone)
    .fetch_all(pool)
    .await?;
    // Revoked sessions whose tokens may still be presented (see
    // `session_refused_until`).
    let sessions: Vec<(String, i64, i64)> = sqlx::query_as(&format!(
        "SELECT id::text, user_id, {until} FROM auth.sessions
         WHERE revoked_at IS NOT NULL AND {until} > extract(epoch FROM now())",
        until = session_refused_until("$1", "$2")
    ))
    .bind(keep)
    .bind(crate::auth::LEEWAY_SECS as i64)
    .fetch_all(pool)
    .await?;
    Ok(State {
        users,
        deleted,
        sessions,
    })
}

/// Until when (Unix seconds) a revoked session's tokens are refused: the
/// later of `keep` (this instance's token lifetime and the leeway) past
/// the revocation and `leeway` past the expiry of the last token any
/// instance issued for it (`access_until`): another instance, with a
/// longer JWT_EXPIRY, may have issued it. Used at start and for a relayed
/// revocation alike.
fn session_refused_until(keep: &str, leeway: &str) -> String {
    format!(
        "greatest(extract(epoch FROM revoked_at)::bigint + {keep},
                  coalesce(extract(epoch FROM access_until)::bigint + {leeway}, 0))"
    )
}

/// How long a deleted user's tombstone refuses their tokens: as long as
/// any instance's tokens may live (the longest `JWT_EXPIRY` allows, or
/// this instance's own when longer), with the leeway. A deleted user's
/// sessions go with the user, so when their last token expires is not
/// known; and without its row, a token of theirs would be judged by its
/// signature alone. Pruned by the same measure, so an instance with short
/// tokens does not delete what another's still need.
pub fn tombstone_keep(token_lifetime: i64) -> i64 {
    token_lifetime.max(crate::auth::LONGEST_TOKEN_SECS) + crate::auth::LEEWAY_SECS as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    fn principal(user: i64, generation: i64, session: Option<&str>) -> Principal {
        Principal {
            user_id: user,
            email: None,
            role: Role::Staff,
            stores: [1].into_iter().collect(),
            exp: None,
            generation,
            session: session.map(str::to_string),
            outside: false,
            identity: None,
        }
    }

    fn user(id: i64, generation: i64, disabled: bool, why: Revoked) -> Change {
        Change::User {
            id,
            email: format!("u{id}@x.io"),
            generation,
            disabled,
            why,
            identity: None,
        }
    }

    /// An older event of a user, read after a newer change was applied
    /// (the row it reads is the newer one's, the reason unknown), leaves
    /// that change's reason: a token from before a disable since undone
    /// still says to log in again.
    #[test]
    fn an_older_event_leaves_the_reason_of_the_change_applied() {
        let r = Revocations::default();
        r.apply(&user(1, 3, false, Revoked::SessionEnded));
        r.apply(&user(1, 3, false, Revoked::AccessChanged));
        assert_eq!(r.check(&principal(1, 2, None)), Err(Revoked::SessionEnded));
        // A newer generation's reason is its own.
        r.apply(&user(1, 4, false, Revoked::AccessChanged));
        assert_eq!(r.check(&principal(1, 3, None)), Err(Revoked::AccessChanged));
    }

    /// A read-back of everyone leaves alone the users this instance changed
    /// after it began (their rows may be older than that change), and keeps
    /// why a user was last refused when nothing about them moved.
    #[test]
    fn a_read_back_leaves_users_changed_since_it_began() {
        let r = Revocations::default();
        r.apply(&user(1, 3, false, Revoked::AccessChanged));
        r.apply(&user(2, 3, false, Revoked::PasswordChanged));
        r.apply(&user(3, 3, false, Revoked::AccessChanged));
        let since = r.read().epoch;
        // While the rows are read: a relayed disable of user 1 (generation
        // 4) and a held generation of user 3.
        r.mark_disabled(1, 4);
        let far = chrono::Utc::now().timestamp() + 600;
        r.hold_generation(3, 4, Revoked::AccessChanged, far);
        let row = |id: i64, generation: i64| -> UserRow {
            (id, format!("u{id}@x.io"), generation, false, None, None)
        };
        r.apply_state(
            State {
                users: vec![row(1, 3), row(2, 3), row(3, 3), row(4, 7)],
                deleted: vec![],
                sessions: vec![],
            },
            Some(since),
        );
        assert_eq!(
            r.check(&principal(1, 3, None)),
            Err(Revoked::Disabled),
            "the disable stands over the older row"
        );
        assert_eq!(
            r.check(&principal(3, 3, None)),
            Err(Revoked::AccessChanged),
            "the held generation stands"
        );
        assert_eq!(
            r.check(&principal(2, 2, None)),
            Err(Revoked::PasswordChanged),
            "why is kept when nothing moved"
        );
        assert_eq!(r.check(&principal(4, 6, None)), Err(Revoked::AccessChanged));
        assert_eq!(r.check(&principal(4, 7, None)), Ok(()), "a new user read");
        // The start-up load applies every row.
        r.apply_state(
            State {
                users: vec![row(1, 4)],
                deleted: vec![],
                sessions: vec![],
            },
            None,
        );
        assert_eq!(r.check(&principal(1, 4, None)), Ok(()));
    }

    #[test]
    fn generations_disable_delete_and_sessions() {
        let r = Revocations::default();
        let far = chrono::Utc::now().timestamp() + 600;
        assert_eq!(
            r.check(&principal(1, 0, None)),
            Ok(()),
            "unknown users pass"
        );
        r.apply(&user(1, 0, false, Revoked::AccessChanged));
        assert_eq!(r.check(&principal(1, 0, Some("s1"))), Ok(()));
        r.apply(&user(1, 1, false, Revoked::PasswordChanged));
        assert_eq!(
            r.check(&principal(1, 0, None)),
            Err(Revoked::PasswordChanged)
        );
        assert_eq!(r.check(&principal(1, 1, None)), Ok(()));
        // An older event seen again does not move the state back.
        r.apply(&user(1, 0, true, Revoked::Disabled));
        assert_eq!(r.check(&principal(1, 1, None)), Ok(()));
        r.apply(&Change::Session {
            user: 1,
            session: "s1".into(),
            until: far,
        });
        assert_eq!(
            r.check(&principal(1, 1, Some("s1"))),
            Err(Revoked::SessionEnded)
        );
        assert_eq!(r.check(&principal(1, 1, Some("s2"))), Ok(()));
        r.apply(&user(1, 2, true, Revoked::Disabled));
        assert_eq!(r.check(&principal(1, 2, None)), Err(Revoked::Disabled));
        r.apply(&Change::Deleted { id: 1, until: far });
        assert_eq!(r.check(&principal(1, 9, None)), Err(Revoked::Deleted));
        // A late user-updated event does not bring a deleted user back.
        r.apply(&user(1, 3, false, Revoked::AccessChanged));
        assert_eq!(r.check(&principal(1, 3, None)), Err(Revoked::Deleted));
    }

    /// A tombstone refuses tokens until its time only (however many
    /// others there are): one applied from an event the database could
    /// not be asked about, and never borne out, ends there.
    #[test]
    fn a_tombstone_past_its_time_refuses_nothing() {
        let r = Revocations::default();
        let now = chrono::Utc::now().timestamp();
        r.apply(&user(1, 2, false, Revoked::AccessChanged));
        r.apply(&Change::Deleted {
            id: 1,
            until: now + 600,
        });
        assert_eq!(r.check(&principal(1, 2, None)), Err(Revoked::Deleted));
        // Its time passes (set here rather than waited for).
        r.write().deleted.insert(1, now - 1);
        assert_eq!(r.check(&principal(1, 2, None)), Ok(()));
        assert_eq!(r.check_account(&principal(1, 2, None)), Ok(()));
        // The user's next change applies again, and refuses what it should.
        r.apply(&user(1, 3, true, Revoked::Disabled));
        assert_eq!(r.check(&principal(1, 3, None)), Err(Revoked::Disabled));
        assert!(!r.read().deleted.contains_key(&1));
    }

    #[test]
    fn identities_follow_links_unlinks_and_deletes() {
        let r = Revocations::default();
        let far = chrono::Utc::now().timestamp() + 600;
        let idp = |s: &str| {
            Some(Identity {
                issuer: "https://idp".into(),
                subject: s.into(),
            })
        };
        let linked = |id: i64, generation, identity| Change::User {
            id,
            email: format!("u{id}@x.io"),
            generation,
            disabled: false,
            why: Revoked::AccessChanged,
            identity: Some(identity),
        };
        r.apply(&linked(1, 1, idp("a")));
        assert_eq!(r.user_by_identity("https://idp", "a"), Some(1));
        assert_eq!(r.user_by_identity("https://other", "a"), None);
        // An event that does not carry the identity keeps it.
        r.apply(&user(1, 2, false, Revoked::AccessChanged));
        assert_eq!(r.user_by_identity("https://idp", "a"), Some(1));
        // Relinked: the old identity names nobody.
        r.apply(&linked(1, 3, idp("b")));
        assert_eq!(r.user_by_identity("https://idp", "a"), None);
        assert_eq!(r.user_by_identity("https://idp", "b"), Some(1));
        // Moved to another user: user 1's later unlink does not take it away.
        r.apply(&linked(2, 1, idp("a")));
        r.apply(&linked(1, 4, None));
        assert_eq!(r.user_by_identity("https://idp", "b"), None);
        assert_eq!(r.user_by_identity("https://idp", "a"), Some(2));
        // Events from behind: user 3's link of "a" and its unlink, both
        // older than user 2's link applied above. Meanwhile "a" names
        // nobody (never user 3), then user 2 again.
        r.apply(&linked(3, 1, idp("a")));
        assert_eq!(r.user_by_identity("https://idp", "a"), None);
        r.apply(&linked(3, 2, None));
        assert_eq!(r.user_by_identity("https://idp", "a"), Some(2));
        // An older event seen again changes nothing.
        r.apply(&linked(1, 3, idp("b")));
        assert_eq!(r.user_by_identity("https://idp", "b"), None);
        // A token that came in through identity "a" (now user 2's) keeps
        // its access while the link stands, and loses it when it goes.
        let mut p = principal(2, 0, None);
        p.outside = true;
        p.identity = idp("a").map(std::sync::Arc::new);
        assert_eq!(r.check_token(&p), Ok(()));
        r.apply(&linked(2, 2, idp("c")));
        assert_eq!(r.check_token(&p), Err(Revoked::AccessChanged));
        r.apply(&Change::Deleted { id: 2, until: far });
        assert_eq!(r.user_by_identity("https://idp", "a"), None);
        assert_eq!(r.check_token(&p), Err(Revoked::Deleted));
    }

    /// A generation held from a relayed event refuses older tokens until
    /// the read-back applies what the database holds (which clears it), or
    /// until the hold runs out; a token at that generation passes.
    #[test]
    fn a_held_generation_refuses_older_tokens_until_the_read_back() {
        let r = Revocations::default();
        let now = chrono::Utc::now().timestamp();
        r.apply(&user(7, 1, false, Revoked::AccessChanged));
        assert_eq!(r.check(&principal(7, 1, None)), Ok(()));
        r.hold_generation(7, 2, Revoked::AccessChanged, now + 600);
        assert_eq!(r.check(&principal(7, 1, None)), Err(Revoked::AccessChanged));
        assert_eq!(r.check(&principal(7, 2, None)), Ok(()));
        // An older hold does not lower it.
        r.hold_generation(7, 1, Revoked::AccessChanged, now + 600);
        assert_eq!(r.check(&principal(7, 1, None)), Err(Revoked::AccessChanged));
        // The read-back: the database says generation 1 (the event lied).
        let since = r.epoch();
        assert!(r.apply_read_back(
            Some(&user(7, 1, false, Revoked::AccessChanged)),
            7,
            Some(2),
            since
        ));
        assert_eq!(r.check(&principal(7, 1, None)), Ok(()));
        // A hold that ran out refuses nothing.
        r.hold_generation(8, 5, Revoked::PasswordChanged, now - 1);
        assert_eq!(r.check(&principal(8, 1, None)), Ok(()));
    }

    /// Two changes of a user relayed one after the other: the read-back
    /// of the first, begun before the second reached this instance, may
    /// have read the first's row. It is not applied (it is read again), so
    /// the second's hold stays, and a token the second change refused is
    /// not accepted again in between (the first's read-back used to apply
    /// its row and release every hold: a client reconnecting then was
    /// replayed events under the scope the second change took away).
    #[test]
    fn an_older_read_back_leaves_a_newer_hold() {
        let r = Revocations::default();
        let now = chrono::Utc::now().timestamp();
        r.apply(&user(7, 3, false, Revoked::AccessChanged));
        r.hold_generation(7, 4, Revoked::AccessChanged, now + 600);
        let since = r.epoch();
        r.hold_generation(7, 5, Revoked::AccessChanged, now + 600);
        // The first event's read-back: the row at generation 4.
        let row4 = user(7, 4, false, Revoked::AccessChanged);
        assert!(!r.apply_read_back(Some(&row4), 7, Some(4), since));
        assert_eq!(r.check(&principal(7, 4, None)), Err(Revoked::AccessChanged));
        // The writer's own change, applied at its commit, leaves the
        // newer hold too.
        r.apply(&row4);
        assert_eq!(r.check(&principal(7, 4, None)), Err(Revoked::AccessChanged));
        // Read again: the row at generation 5 releases both holds.
        let since = r.epoch();
        let row5 = user(7, 5, false, Revoked::AccessChanged);
        assert!(r.apply_read_back(Some(&row5), 7, Some(4), since));
        assert_eq!(r.check(&principal(7, 4, None)), Err(Revoked::AccessChanged));
        assert_eq!(r.check(&principal(7, 5, None)), Ok(()));
        assert!(!r.read().pending.contains_key(&7));
    }

    /// A disable or a deletion relayed while an older change's read-back
    /// is under way is not undone by it (the row it read predates them),
    /// nor, for the disable, by the writer's own older change applied at
    /// its commit: older tokens stay refused until their own read-back.
    #[test]
    fn an_older_read_back_undoes_no_disable_or_deletion() {
        let r = Revocations::default();
        let now = chrono::Utc::now().timestamp();
        r.apply(&user(7, 5, false, Revoked::AccessChanged));
        r.apply(&user(8, 5, false, Revoked::AccessChanged));
        let since = r.epoch();
        // User 7 disabled (generation 7), as `ws::revoke` takes it away.
        r.mark_disabled(7, 7);
        r.hold_generation(7, 7, Revoked::Disabled, now + 600);
        // User 8 deleted.
        r.apply(&Change::Deleted {
            id: 8,
            until: now + 600,
        });
        let old7 = user(7, 6, false, Revoked::AccessChanged);
        let old8 = user(8, 6, false, Revoked::AccessChanged);
        assert!(!r.apply_read_back(Some(&old7), 7, Some(6), since));
        assert!(!r.apply_read_back(Some(&old8), 8, Some(6), since));
        assert_eq!(r.check(&principal(7, 6, None)), Err(Revoked::Disabled));
        assert_eq!(r.check(&principal(8, 6, None)), Err(Revoked::Deleted));
        r.apply(&old7);
        assert_eq!(r.check(&principal(7, 6, None)), Err(Revoked::Disabled));
        // The disable's own read-back.
        let since = r.epoch();
        assert!(r.apply_read_back(
            Some(&user(7, 7, true, Revoked::Disabled)),
            7,
            Some(7),
            since
        ));
        assert_eq!(r.check(&principal(7, 7, None)), Err(Revoked::Disabled));
    }

    /// A user changed again and again while rows are read back: a row
    /// past every generation this instance knows is applied all the same
    /// (it is newer than whatever touched the user), so a stream of
    /// changes does not keep every read-back from being applied.
    #[test]
    fn a_row_newer_than_everything_known_is_applied_however_busy() {
        let r = Revocations::default();
        let now = chrono::Utc::now().timestamp();
        r.apply(&user(7, 5, false, Revoked::AccessChanged));
        let since = r.epoch();
        r.hold_generation(7, 6, Revoked::AccessChanged, now + 600);
        assert!(r.apply_read_back(
            Some(&user(7, 7, false, Revoked::AccessChanged)),
            7,
            Some(6),
            since
        ));
        assert_eq!(r.check(&principal(7, 6, None)), Err(Revoked::AccessChanged));
        assert_eq!(r.check(&principal(7, 7, None)), Ok(()));
        // At the generation held, it is read again.
        let since = r.epoch();
        r.hold_generation(7, 8, Revoked::AccessChanged, now + 600);
        let row8 = user(7, 8, false, Revoked::AccessChanged);
        assert!(!r.apply_read_back(Some(&row8), 7, Some(8), since));
        assert!(r.apply_read_back(Some(&row8), 7, Some(8), r.epoch()));
        assert_eq!(r.check(&principal(7, 8, None)), Ok(()));
    }

    /// Holds are kept one per event: the read-back of an event that lied
    /// (a generation the database does not have) releases its own hold,
    /// and a user event naming a user the database does not have holds
    /// nothing after its read-back, so a user created later with that id
    /// is not refused.
    #[test]
    fn a_lying_event_holds_only_until_its_read_back() {
        let r = Revocations::default();
        let now = chrono::Utc::now().timestamp();
        r.apply(&user(7, 5, false, Revoked::AccessChanged));
        r.hold_generation(7, 1000, Revoked::AccessChanged, now + 600);
        r.hold_generation(7, 6, Revoked::AccessChanged, now + 600);
        assert_eq!(r.check(&principal(7, 6, None)), Err(Revoked::AccessChanged));
        // The lie's read-back, begun after both: the row at generation 6.
        let since = r.epoch();
        assert!(r.apply_read_back(
            Some(&user(7, 6, false, Revoked::AccessChanged)),
            7,
            Some(1000),
            since
        ));
        assert_eq!(r.check(&principal(7, 5, None)), Err(Revoked::AccessChanged));
        assert_eq!(r.check(&principal(7, 6, None)), Ok(()));
        // No such user yet.
        r.hold_generation(9, 1000, Revoked::AccessChanged, now + 600);
        let since = r.epoch();
        assert!(r.apply_read_back(None, 9, Some(1000), since));
        r.apply(&user(9, 1, false, Revoked::AccessChanged));
        assert_eq!(r.check(&principal(9, 1, None)), Ok(()));
    }

    /// A disable relayed after a later change was already applied (it
    /// was announced at its commit while the disable's event waited behind
    /// an open transaction) does not refuse the newer token: a user
    /// disabled and enabled again stays enabled.
    #[test]
    fn a_disable_older_than_what_is_known_changes_nothing() {
        let r = Revocations::default();
        r.apply(&user(7, 3, false, Revoked::AccessChanged));
        r.mark_disabled(7, 2);
        assert_eq!(r.check(&principal(7, 3, None)), Ok(()));
        r.mark_disabled(7, 3);
        assert_eq!(r.check(&principal(7, 3, None)), Err(Revoked::Disabled));
    }
}
