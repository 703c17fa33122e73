//! `/api/v2/auth`: login (email + password -> a short access token and a
//! refresh token), refresh, logout, the caller's own account (`me`) and
//! password change.

use super::error::{ApiError, ApiResult};
use super::security::BearerAuth;
use super::ApiTags;
use crate::state::AppState;
use poem_openapi::{payload::Json, ApiResponse, Object, OpenApi};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct LoginApi {
    pub state: Arc<AppState>,
    /// Failed logins per account (by email, known or not).
    guard: LoginGuard,
    /// Failed logins per client address, whatever the accounts.
    ip_guard: LoginGuard,
}

impl LoginApi {
    pub fn new(state: Arc<AppState>) -> Self {
        let guard = LoginGuard::new(state.config.login_attempts_per_minute);
        let ip_guard = LoginGuard::new(state.config.login_attempts_per_ip);
        Self {
            state,
            guard,
            ip_guard,
        }
    }
}

/// Failed logins of one account (by email, known or not, so that throttling
/// tells nothing about which emails exist).
struct Failures {
    count: u32,
    /// No attempt is verified before this.
    next: Instant,
    last: Instant,
}

/// Throttling with a growing delay, by key (an account, or a client
/// address): guessing costs the guesser time. The number of password hashes
/// computed at once is bounded separately (`AppState::with_hashing`), so it
/// costs the server no more memory either.
pub struct LoginGuard {
    free: u32,
    accounts: Mutex<HashMap<String, Failures>>,
}

/// The longest wait between two attempts on one account.
const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);
/// Accounts tracked at most; the oldest quiet ones are forgotten first.
const MAX_TRACKED: usize = 100_000;

impl LoginGuard {
    pub fn new(free: u32) -> Self {
        Self {
            free: free.max(1),
            accounts: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(seconds)` while the account must wait.
    fn admit(&self, account: &str) -> Result<(), u64> {
        let map = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(account) {
            Some(f) if f.next > Instant::now() => {
                Err((f.next - Instant::now()).as_secs_f64().ceil().max(1.0) as u64)
            }
            _ => Ok(()),
        }
    }

    /// After `free` failures in a row, each further one doubles the wait
    /// (1 s, 2 s, 4 s ... up to 15 min); a success clears it.
    fn record(&self, account: &str, ok: bool) {
        let mut map = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            map.remove(account);
            return;
        }
        let now = Instant::now();
        if map.len() >= MAX_TRACKED && !map.contains_key(account) {
            map.retain(|_, f| now.duration_since(f.last) < MAX_BACKOFF);
            if map.len() >= MAX_TRACKED {
                return;
            }
        }
        let f = map.entry(account.to_string()).or_insert(Failures {
            count: 0,
            next: now,
            last: now,
        });
        // A quiet account starts over.
        if now.duration_since(f.last) > MAX_BACKOFF {
            f.count = 0;
        }
        f.count += 1;
        f.last = now;
        if f.count >= self.free {
            let exp = (f.count - self.free).min(20);
            f.next = now + Duration::from_secs(1u64 << exp).min(MAX_BACKOFF);
        }
    }
}

#[derive(Object, Debug)]
pub struct LoginRequest {
    #[oai(validator(max_length = 320))]
    pub email: String,
    #[oai(validator(max_length = 1024))]
    pub password: String,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct UserInfo {
    pub id: i64,
    pub email: String,
    /// admin, manager or staff.
    pub role: String,
    /// Stores a non-admin may see (empty for admins: all).
    pub stores: Vec<i64>,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct LoginResponseBody {
    /// The access token (a JWT) for `Authorization: Bearer`.
    pub token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the access token expires (JWT_EXPIRY).
    pub expires_in: i64,
    /// Exchanged for a new pair at `POST /api/v2/auth/refresh`; usable once.
    pub refresh_token: String,
    /// Seconds the session lasts without a refresh (REFRESH_TOKEN_TTL).
    pub refresh_expires_in: i64,
    /// The session (refresh-token family) id.
    pub session_id: String,
    pub user: UserInfo,
}

#[derive(ApiResponse)]
pub enum LoginResponse {
    /// Logged in.
    #[oai(status = 200)]
    Ok(Json<LoginResponseBody>),
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct RefreshRequest {
    #[oai(validator(min_length = 1, max_length = 256))]
    pub refresh_token: String,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct PasswordChange {
    #[oai(validator(max_length = 1024))]
    pub current_password: String,
    /// At least 8 characters and 4 different ones, not a common password,
    /// not the email address.
    #[oai(validator(max_length = 1024))]
    pub new_password: String,
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
pub struct Me {
    pub id: i64,
    pub email: Option<String>,
    /// admin, manager or staff.
    pub role: String,
    /// Stores a non-admin may see (empty for admins: all).
    pub stores: Vec<i64>,
    /// Whether `sales.users` has this user (tokens of an outside identity
    /// provider may name users it does not have).
    pub registered: bool,
    /// The session of the token, when it belongs to one.
    pub session_id: Option<String>,
    /// When the token expires (seconds since the epoch).
    pub expires_at: Option<i64>,
}

#[derive(ApiResponse)]
pub enum MeResponse {
    /// The caller.
    #[oai(status = 200)]
    Ok(Json<Me>),
}

#[derive(ApiResponse)]
pub enum LoggedOut {
    /// The session is over: its refresh token and access tokens are refused.
    #[oai(status = 204)]
    Done,
}

fn answer(issued: crate::sessions::Issued, u: &crate::users::User) -> LoginResponse {
    LoginResponse::Ok(Json(LoginResponseBody {
        token: issued.access_token,
        token_type: "Bearer".into(),
        expires_in: issued.expires_in,
        refresh_token: issued.refresh_token,
        refresh_expires_in: issued.refresh_expires_in,
        session_id: issued.session,
        user: UserInfo {
            id: u.id,
            email: u.email.clone(),
            role: u.role.as_str().into(),
            stores: u.stores.clone(),
        },
    }))
}

fn busy(e: crate::state::HashingBusy) -> ApiError {
    ApiError::unavailable(e.to_string())
}

// Verifying against this when the email is unknown keeps the response time
// the same as for a wrong password, so emails cannot be probed.
static DUMMY_HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    crate::users::hash_password("not-a-real-password").unwrap_or_default()
});

impl LoginApi {
    /// Checks a password against the account of `email`: the same work
    /// (one argon2 verification) whether or not the email exists, so timing
    /// tells nothing; failures count against the account and the address.
    async fn check_credentials(
        &self,
        email: &str,
        password: &str,
        ip: &str,
    ) -> ApiResult<Option<i64>> {
        let account = email.trim().to_lowercase();
        self.guard
            .admit(&account)
            .map_err(ApiError::too_many_logins)?;
        self.ip_guard
            .admit(ip)
            .map_err(ApiError::too_many_logins_from_address)?;
        let row: Option<(i64, String)> = sqlx::query_as(
            "SELECT id, password_hash FROM sales.users WHERE lower(email) = lower($1)",
        )
        .bind(email.trim())
        .fetch_optional(&self.state.pool)
        .await?;
        let (hash, id) = match &row {
            Some((id, h)) => (h.clone(), Some(*id)),
            None => (DUMMY_HASH.to_string(), None),
        };
        let password = password.to_string();
        let ok = self
            .state
            .with_hashing(move || crate::users::verify_password(&password, &hash))
            .await
            .map_err(busy)?;
        let ok = ok && id.is_some();
        self.guard.record(&account, ok);
        // A success does not clear the address: one right password does
        // not excuse many wrong ones for other accounts.
        if !ok {
            self.ip_guard.record(ip, false);
        }
        Ok(id.filter(|_| ok))
    }
}

#[OpenApi(tag = "ApiTags::Auth")]
impl LoginApi {
    /// Exchange email and password for a short access token (a JWT
    /// carrying role and store scope) and a refresh token. Failed attempts
    /// wait longer and longer, per account and per client address (429 with
    /// Retry-After); a wrong email and a wrong password answer alike.
    #[oai(path = "/api/v2/auth/login", method = "post")]
    async fn login(
        &self,
        req: &poem::Request,
        body: Json<LoginRequest>,
    ) -> ApiResult<LoginResponse> {
        let ip = super::middleware::client_ip(req).to_string();
        let Some(id) = self
            .check_credentials(&body.email, &body.password, &ip)
            .await?
        else {
            return Err(ApiError::unauthorized("wrong email or password"));
        };
        let mut tx = self.state.pool.begin().await?;
        crate::db::write::set_actor(&mut *tx, id).await?;
        let user = crate::users::get(&mut *tx, id)
            .await?
            .ok_or_else(|| ApiError::unauthorized("wrong email or password"))?;
        if user.disabled {
            return Err(ApiError::forbidden("account disabled"));
        }
        let issued = crate::sessions::start(
            &mut tx,
            &self.state.auth,
            &user,
            self.state.config.refresh_token_ttl,
        )
        .await?;
        tx.commit().await?;
        Ok(answer(issued, &user))
    }

    /// Exchange a refresh token for a new access token and a new refresh
    /// token (the old one is used up). The new access token carries the
    /// user's current role and stores. Presenting a refresh token a second
    /// time revokes its whole session (401).
    #[oai(path = "/api/v2/auth/refresh", method = "post")]
    async fn refresh(&self, body: Json<RefreshRequest>) -> ApiResult<LoginResponse> {
        use crate::sessions::RefreshError as E;
        match crate::sessions::refresh(
            &self.state.pool,
            &self.state.auth,
            &body.refresh_token,
            self.state.config.refresh_token_ttl,
        )
        .await
        {
            Ok((issued, user)) => Ok(answer(issued, &user)),
            Err(E::Reused(change)) => {
                self.state.access.apply(&change);
                Err(ApiError::unauthorized(E::Reused(change).to_string()))
            }
            Err(E::Db(e)) => Err(e.into()),
            Err(E::Other(e)) => Err(e.into()),
            Err(e) => Err(ApiError::unauthorized(e.to_string())),
        }
    }

    /// End the session of a refresh token: the refresh token and every
    /// access token of the session are refused from now on, on every
    /// server instance. Ending an ended session again is no error.
    #[oai(path = "/api/v2/auth/logout", method = "post")]
    async fn logout(&self, body: Json<RefreshRequest>) -> ApiResult<LoggedOut> {
        match crate::sessions::end(
            &self.state.pool,
            &body.refresh_token,
            self.state.auth.expiry_secs(),
        )
        .await?
        {
            None => Err(ApiError::unauthorized("unknown refresh token")),
            Some(change) => {
                if let Some(c) = change {
                    self.state.access.apply(&c);
                }
                Ok(LoggedOut::Done)
            }
        }
    }

    /// The caller as the token and the users table say.
    #[oai(path = "/api/v2/auth/me", method = "get")]
    async fn me(&self, auth: BearerAuth) -> ApiResult<MeResponse> {
        let p = &auth.0;
        let user = crate::users::get(&self.state.pool, p.user_id).await?;
        let me = match user {
            Some(u) => Me {
                id: u.id,
                email: Some(u.email),
                role: u.role.as_str().into(),
                stores: u.stores,
                registered: true,
                session_id: p.session.clone(),
                expires_at: p.exp,
            },
            None => Me {
                id: p.user_id,
                email: p.email.clone(),
                role: p.role.as_str().into(),
                stores: p.scope().unwrap_or_default(),
                registered: false,
                session_id: p.session.clone(),
                expires_at: p.exp,
            },
        };
        Ok(MeResponse::Ok(Json(me)))
    }

    /// Change one's own password (the current one is required). Every
    /// session of the user ends, on every instance; the answer is a new
    /// session. A weak new password is 422 saying why.
    #[oai(path = "/api/v2/auth/password", method = "post")]
    async fn password(
        &self,
        req: &poem::Request,
        auth: BearerAuth,
        body: Json<PasswordChange>,
    ) -> ApiResult<LoginResponse> {
        let Some(user) = crate::users::get(&self.state.pool, auth.0.user_id).await? else {
            return Err(ApiError::forbidden(
                "this account has no password here (its tokens come from an identity provider)",
            ));
        };
        let ip = super::middleware::client_ip(req).to_string();
        if self
            .check_credentials(&user.email, &body.current_password, &ip)
            .await?
            != Some(user.id)
        {
            return Err(ApiError::forbidden("currentPassword: wrong password"));
        }
        crate::users::check_password_field("newPassword", &body.new_password, &user.email)
            .map_err(super::users::user_error)?;
        let new = body.new_password.clone();
        let hash = self
            .state
            .with_hashing(move || crate::users::hash_password(&new))
            .await
            .map_err(busy)??;
        let mut tx = self.state.pool.begin().await?;
        crate::db::write::set_actor(&mut *tx, user.id).await?;
        crate::users::lock(&mut tx).await?;
        let (user, change) = crate::users::update(
            &mut tx,
            user.id,
            crate::users::UserPatch {
                password_hash: Some(hash),
                ..Default::default()
            },
        )
        .await
        .map_err(super::users::user_error)?;
        let issued = crate::sessions::start(
            &mut tx,
            &self.state.auth,
            &user,
            self.state.config.refresh_token_ttl,
        )
        .await?;
        tx.commit().await?;
        if let Some(c) = change {
            self.state.access.apply(&c);
        }
        Ok(answer(issued, &user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_logins_wait_longer_each_time() {
        let g = LoginGuard::new(2);
        for _ in 0..2 {
            assert!(g.admit("a@x.io").is_ok());
            g.record("a@x.io", false);
        }
        // The second failure used up the free attempts: 1 s, then 2 s, 4 s.
        let first = g.admit("a@x.io").unwrap_err();
        g.record("a@x.io", false);
        let second = g.admit("a@x.io").unwrap_err();
        g.record("a@x.io", false);
        let third = g.admit("a@x.io").unwrap_err();
        assert!(
            first <= second && second < third,
            "{first} {second} {third}"
        );
        assert!(g.admit("b@x.io").is_ok(), "other accounts are not affected");
        g.record("a@x.io", true);
        assert!(g.admit("a@x.io").is_ok(), "a success clears the wait");
    }
}
