//! Sessions: one per login, each a family of rotating refresh tokens.
//!
//! A refresh token is 32 random bytes (base64url); only its SHA-256 is
//! stored. Refreshing marks the token used and hands out its successor in
//! the same session, with a new short access token carrying the user's
//! current role, stores and access generation. Presenting a token that was
//! already used means it was copied: the whole session is revoked (every
//! access token of it is refused on every instance through
//! `session-revoked`), also when the used token comes back to a logout.
//! A logout revokes its session the same way.

use crate::access::Change;
use crate::auth::{Auth, Role};
use crate::users::User;
use base64::Engine;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use std::time::Duration;

/// What a login or a refresh hands out.
#[derive(Debug, Clone)]
pub struct Issued {
    pub access_token: String,
    pub expires_in: i64,
    pub refresh_token: String,
    pub refresh_expires_in: i64,
    pub session: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("unknown refresh token")]
    Unknown,
    #[error("the session has ended; log in again")]
    Ended,
    #[error("the session has expired; log in again")]
    Expired,
    /// Older than SESSION_MAX_AGE, however recently refreshed.
    #[error("the session is older than SESSION_MAX_AGE; log in again")]
    TooOld,
    /// A used token came back: the session is revoked now.
    #[error("refresh token already used; the session is revoked, log in again")]
    Reused(Change),
    #[error("account disabled")]
    Disabled,
    /// Before COMMIT: nothing was written.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// At COMMIT: whether the token was used up is unknown.
    #[error(transparent)]
    AtCommit(sqlx::Error),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// A new refresh token of `session`: 32 random bytes, of which only the
/// hash is stored. Returns the token.
async fn new_refresh_token(conn: &mut PgConnection, session: &str) -> sqlx::Result<String> {
    let bytes: [u8; 32] = rand::random();
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    sqlx::query("INSERT INTO auth.refresh_tokens (token_hash, session_id) VALUES ($1, $2::uuid)")
        .bind(hash(&token))
        .bind(session)
        .execute(conn)
        .await?;
    Ok(token)
}

pub fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn access(auth: &Auth, user: &User, session: &str) -> anyhow::Result<String> {
    let stores = if user.role == Role::Admin {
        vec![]
    } else {
        user.stores.clone()
    };
    let (token, _) = auth.issue_session(
        user.id,
        &user.email,
        user.role,
        stores,
        user.generation,
        Some(session.to_string()),
    )?;
    Ok(token)
}

/// How long sessions live: `idle` without a refresh (REFRESH_TOKEN_TTL),
/// `max_age` at most since the login (SESSION_MAX_AGE).
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    pub idle: Duration,
    pub max_age: Duration,
}

impl Lifetimes {
    pub fn of(config: &crate::config::Config) -> Self {
        Lifetimes {
            idle: config.refresh_token_ttl,
            max_age: config.session_max_age,
        }
    }
}

/// Starts a session for `user` in the caller's transaction.
pub async fn start(
    conn: &mut PgConnection,
    auth: &Auth,
    user: &User,
    lifetimes: Lifetimes,
) -> anyhow::Result<Issued> {
    let ttl_s = lifetimes.idle.min(lifetimes.max_age).as_secs() as i64;
    // Sessions over, and past every access token of theirs, go.
    sqlx::query(&format!(
        "DELETE FROM auth.sessions WHERE user_id = $1 AND {}",
        crate::maintain::session_gone("$2")
    ))
    .bind(user.id)
    .bind(auth.expiry_secs() as f64)
    .execute(&mut *conn)
    .await?;
    let session: String = sqlx::query_scalar(
        "INSERT INTO auth.sessions (user_id, expires_at, access_until)
         VALUES ($1, now() + make_interval(secs => $2), now() + make_interval(secs => $3))
         RETURNING id::text",
    )
    .bind(user.id)
    .bind(ttl_s as f64)
    .bind(auth.expiry_secs() as f64)
    .fetch_one(&mut *conn)
    .await?;
    let refresh_token = new_refresh_token(&mut *conn, &session).await?;
    Ok(Issued {
        access_token: access(auth, user, &session)?,
        expires_in: auth.expiry_secs(),
        refresh_token,
        refresh_expires_in: ttl_s,
        session,
    })
}

/// Revokes a session and writes `session-revoked` (in the caller's transaction).
async fn revoke(
    conn: &mut PgConnection,
    session: &str,
    user: i64,
    reason: &str,
    token_lifetime: i64,
) -> Result<Change, sqlx::Error> {
    sqlx::query(
        "UPDATE auth.sessions SET revoked_at = now(), revoked_reason = $2
         WHERE id = $1::uuid AND revoked_at IS NULL",
    )
    .bind(session)
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    crate::users::emit(
        conn,
        "session-revoked",
        serde_json::json!({"userId": user, "sessionId": session, "reason": reason}),
    )
    .await?;
    Ok(Change::Session {
        user,
        session: session.to_string(),
        until: chrono::Utc::now().timestamp() + token_lifetime + crate::auth::LEEWAY_SECS as i64,
    })
}

/// Exchanges a refresh token for a new pair. On reuse the session is
/// revoked (committed) and `Reused` carries the change to apply.
pub async fn refresh(
    pool: &PgPool,
    auth: &Auth,
    token: &str,
    lifetimes: Lifetimes,
) -> Result<(Issued, User), RefreshError> {
    let mut tx = pool.begin().await?;
    let row: Option<(String, i64, bool, bool, bool, bool)> = sqlx::query_as(
        "SELECT s.id::text, s.user_id, t.used_at IS NOT NULL, s.revoked_at IS NOT NULL,
                s.expires_at < now(), s.created_at + make_interval(secs => $2) <= now()
         FROM auth.refresh_tokens t JOIN auth.sessions s ON s.id = t.session_id
         WHERE t.token_hash = $1
         FOR UPDATE OF t, s",
    )
    .bind(hash(token))
    .bind(lifetimes.max_age.as_secs() as f64)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((session, user_id, used, revoked, expired, too_old)) = row else {
        return Err(RefreshError::Unknown);
    };
    crate::db::write::set_actor(&mut *tx, user_id).await?;
    if revoked {
        return Err(RefreshError::Ended);
    }
    if used {
        let change = revoke(&mut tx, &session, user_id, "reuse", auth.expiry_secs()).await?;
        tx.commit().await.map_err(RefreshError::AtCommit)?;
        tracing::warn!(user_id, session = %session, "refresh token reused; session revoked");
        return Err(RefreshError::Reused(change));
    }
    // A session's expiry never passes SESSION_MAX_AGE from its login, so
    // one that reached that bound has also expired: it is named by the
    // bound, which refreshing could not have moved.
    if too_old {
        return Err(RefreshError::TooOld);
    }
    if expired {
        return Err(RefreshError::Expired);
    }
    let user = crate::users::get(&mut *tx, user_id)
        .await?
        .ok_or(RefreshError::Ended)?;
    if user.disabled {
        return Err(RefreshError::Disabled);
    }
    sqlx::query("UPDATE auth.refresh_tokens SET used_at = now() WHERE token_hash = $1")
        .bind(hash(token))
        .execute(&mut *tx)
        .await?;
    let refresh_token = new_refresh_token(&mut tx, &session).await?;
    // Refreshing extends the session by `idle`, never past `max_age` from
    // its login.
    let refresh_expires_in: i64 = sqlx::query_scalar(
        "UPDATE auth.sessions
         SET last_used_at = now(),
             expires_at = least(now() + make_interval(secs => $2),
                                created_at + make_interval(secs => $3)),
             access_until = greatest(access_until, now() + make_interval(secs => $4))
         WHERE id = $1::uuid
         RETURNING greatest(0, floor(extract(epoch FROM expires_at - now())))::bigint",
    )
    .bind(&session)
    .bind(lifetimes.idle.as_secs() as f64)
    .bind(lifetimes.max_age.as_secs() as f64)
    .bind(auth.expiry_secs() as f64)
    .fetch_one(&mut *tx)
    .await?;
    let issued = Issued {
        access_token: access(auth, &user, &session)?,
        expires_in: auth.expiry_secs(),
        refresh_token,
        refresh_expires_in,
        session,
    };
    tx.commit().await.map_err(RefreshError::AtCommit)?;
    Ok((issued, user))
}

/// What a logout did.
#[derive(Debug)]
pub enum Ended {
    /// No such refresh token.
    Unknown,
    /// The session had already ended: nothing was revoked again.
    Already,
    /// The session is revoked now (`logout`).
    LoggedOut(Change),
    /// The token had been used by a refresh: it was copied, and the session
    /// is revoked now as for a reuse at refresh (`reuse`).
    Reused(Change),
}

/// Ends `session` of `user` by its id (a logout by the session's access
/// token). None when it is not the user's or already ended.
pub async fn end_by_id(
    pool: &PgPool,
    session: &str,
    user: i64,
    token_lifetime: i64,
) -> Result<Option<Change>, crate::db::TxFailure> {
    let mut tx = pool.begin().await?;
    let live: Option<bool> = sqlx::query_scalar(
        "SELECT revoked_at IS NULL FROM auth.sessions
         WHERE id = $1::uuid AND user_id = $2 FOR UPDATE",
    )
    .bind(session)
    .bind(user)
    .fetch_optional(&mut *tx)
    .await?;
    if live != Some(true) {
        return Ok(None);
    }
    crate::db::write::set_actor(&mut *tx, user).await?;
    let change = revoke(&mut tx, session, user, "logout", token_lifetime).await?;
    tx.commit().await.map_err(crate::db::TxFailure::AtCommit)?;
    Ok(Some(change))
}

/// Ends the session of a refresh token (logout). A session already ended
/// is not revoked twice. A token already used up by a refresh is a reuse,
/// as at [`refresh`]: the session is revoked with the reason `reuse`.
pub async fn end(
    pool: &PgPool,
    token: &str,
    token_lifetime: i64,
) -> Result<Ended, crate::db::TxFailure> {
    let mut tx = pool.begin().await?;
    // The token's row is locked too, so that a refresh using it up
    // concurrently is seen (as `refresh` locks both).
    let row: Option<(String, i64, bool, bool)> = sqlx::query_as(
        "SELECT s.id::text, s.user_id, t.used_at IS NOT NULL, s.revoked_at IS NOT NULL
         FROM auth.refresh_tokens t JOIN auth.sessions s ON s.id = t.session_id
         WHERE t.token_hash = $1 FOR UPDATE OF t, s",
    )
    .bind(hash(token))
    .fetch_optional(&mut *tx)
    .await?;
    let Some((session, user, used, revoked)) = row else {
        return Ok(Ended::Unknown);
    };
    if revoked {
        return Ok(Ended::Already);
    }
    crate::db::write::set_actor(&mut *tx, user).await?;
    let reason = if used { "reuse" } else { "logout" };
    let change = revoke(&mut tx, &session, user, reason, token_lifetime).await?;
    tx.commit().await.map_err(crate::db::TxFailure::AtCommit)?;
    if used {
        tracing::warn!(user_id = user, session = %session, "refresh token reused; session revoked");
        return Ok(Ended::Reused(change));
    }
    Ok(Ended::LoggedOut(change))
}
