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
        // Computed now, not on the first login with an unknown email.
        std::sync::LazyLock::force(&DUMMY_HASH);
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
/// Keys tracked at most: when full, those quiet for MAX_BACKOFF are
/// forgotten, else the one that failed longest ago.
const MAX_TRACKED: usize = 100_000;

impl LoginGuard {
    pub fn new(free: u32) -> Self {
        Self {
            free: free.max(1),
            accounts: Mutex::new(HashMap::new()),
        }
    }

    /// Admits an attempt, or `Err(seconds)` while the key must wait. An
    /// admitted attempt counts as a failure at once (under the lock), so a
    /// burst of parallel attempts cannot all pass before any of them is
    /// verified; [`LoginGuard::succeeded`] or [`LoginGuard::release`] takes
    /// it back. After `free` failures in a row, each further one doubles the
    /// wait (1 s, 2 s, 4 s ... up to 15 min).
    fn admit(&self, key: &str) -> Result<(), u64> {
        let mut map = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some(f) = map.get(key) {
            if f.next > now {
                return Err((f.next - now).as_secs_f64().ceil().max(1.0) as u64);
            }
        }
        if map.len() >= MAX_TRACKED && !map.contains_key(key) {
            map.retain(|_, f| now.duration_since(f.last) < MAX_BACKOFF);
            if map.len() >= MAX_TRACKED {
                // Still full: the key that failed longest ago goes, so
                // throttling never switches itself off.
                if let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, f)| f.last)
                    .map(|(k, _)| k.clone())
                {
                    map.remove(&oldest);
                }
            }
        }
        let f = map.entry(key.to_string()).or_insert(Failures {
            count: 0,
            next: now,
            last: now,
        });
        // A quiet key starts over.
        if now.duration_since(f.last) > MAX_BACKOFF {
            f.count = 0;
        }
        f.count += 1;
        f.last = now;
        if f.count >= self.free {
            let exp = (f.count - self.free).min(20);
            f.next = now + Duration::from_secs(1u64 << exp).min(MAX_BACKOFF);
        }
        Ok(())
    }

    /// A wrong password, once verified: the wait (if any) starts again from
    /// now, so it is not used up by the verification itself.
    fn failed(&self, key: &str) {
        let mut map = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = map.get_mut(key) {
            let now = Instant::now();
            f.last = now;
            if f.count >= self.free {
                let exp = (f.count - self.free).min(20);
                f.next = f
                    .next
                    .max(now + Duration::from_secs(1u64 << exp).min(MAX_BACKOFF));
            }
        }
    }

    /// A right password: the key's failures are forgotten.
    fn succeeded(&self, key: &str) {
        let mut map = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(key);
    }

    /// Takes back the attempt [`LoginGuard::admit`] counted, without
    /// forgetting earlier failures (a success seen from a client address).
    fn release(&self, key: &str) {
        let mut map = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = map.get_mut(key) {
            f.count = f.count.saturating_sub(1);
            if f.count == 0 {
                map.remove(key);
            } else if f.count < self.free {
                f.next = f.last;
            } else {
                let exp = (f.count - self.free).min(20);
                f.next = f.last + Duration::from_secs(1u64 << exp).min(MAX_BACKOFF);
            }
        }
    }
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
#[oai(deny_unknown_fields)]
pub struct LoginRequest {
    #[oai(validator(max_length = 320))]
    pub email: String,
    #[oai(validator(max_length = 1024))]
    pub password: String,
    /// Keep the refresh token in an HttpOnly cookie (`pg_sales_refresh`,
    /// path `/api/v2/auth`, SameSite=Strict) instead of the answer's body,
    /// out of reach of the page's scripts. Refresh, logout and password
    /// changes then read it from the cookie and rotate it there. Default
    /// false.
    pub refresh_cookie: Option<bool>,
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
    /// Absent when the session keeps it in the `pg_sales_refresh` cookie
    /// (see `refreshCookie` at login).
    #[oai(skip_serializing_if_is_none)]
    pub refresh_token: Option<String>,
    /// Seconds the session lasts without a refresh (REFRESH_TOKEN_TTL), never
    /// past SESSION_MAX_AGE from its login.
    pub refresh_expires_in: i64,
    /// The session (refresh-token family) id.
    pub session_id: String,
    pub user: UserInfo,
}

#[derive(ApiResponse)]
pub enum LoginResponse {
    /// Logged in.
    #[oai(status = 200)]
    Ok(
        Json<LoginResponseBody>,
        /// The session's refresh token, for a session that keeps it in a cookie.
        #[oai(header = "Set-Cookie")]
        Option<String>,
    ),
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
#[oai(deny_unknown_fields)]
pub struct RefreshRequest {
    /// The refresh token; may be left out when the session keeps it in the
    /// `pg_sales_refresh` cookie.
    #[oai(validator(min_length = 1, max_length = 256))]
    pub refresh_token: Option<String>,
}

/// The cookie a session that asked for it (`refreshCookie`) keeps its
/// refresh token in.
pub const REFRESH_COOKIE: &str = "pg_sales_refresh";

/// Where a request's refresh token came from, and so where the answer puts
/// the next one.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Carrier {
    Body,
    Cookie,
}

impl Carrier {
    fn cookie_if(cookie: bool) -> Self {
        if cookie {
            Carrier::Cookie
        } else {
            Carrier::Body
        }
    }
}

/// Opens a session in a retried transaction ([`crate::db::retry_tx`]): a
/// database error is the transaction's (retried when transient), any other
/// is the answer.
async fn start_session(
    tx: &mut sqlx::PgConnection,
    auth: &crate::auth::Auth,
    user: &crate::users::User,
    lifetimes: crate::sessions::Lifetimes,
) -> Result<ApiResult<crate::sessions::Issued>, crate::db::TxFailure> {
    match crate::sessions::start(tx, auth, user, lifetimes).await {
        Ok(issued) => Ok(Ok(issued)),
        Err(e) => match e.downcast::<sqlx::Error>() {
            Ok(db) => Err(crate::db::TxFailure::BeforeCommit(db)),
            Err(other) => Ok(Err(ApiError::from(other))),
        },
    }
}

/// The refresh token from the request's cookie, if it has one.
fn cookie_token(req: &poem::Request) -> Option<String> {
    req.headers()
        .get_all(poem::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, v)| *k == REFRESH_COOKIE && !v.is_empty())
        .map(|(_, v)| v.to_string())
}

/// What a logout's `Authorization: Bearer` says of the session to end.
enum LogoutBearer {
    /// No bearer token (or another scheme): the body's or the cookie's
    /// refresh token says.
    None,
    /// A token issued here for `session`: that session is ended, and the
    /// cookie left alone when it is another session's.
    Verified { user: i64, session: String },
    /// A verified token of no session here (an identity provider's).
    Sessionless { user: i64 },
    /// A token that does not verify (expired, revoked, forged), with the
    /// session its claims name, unverified (only ever compared with the
    /// cookie's, which its holder may end anyway).
    Refused { sid: Option<String>, why: String },
}

/// The `sid` claim of a token, read without verifying it.
fn unverified_sid(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("sid")?.as_str().map(str::to_string)
}

/// The token a refresh or logout acts on: the body's, else the cookie's.
/// A cookie too long to be a refresh token is refused and removed.
fn presented(
    req: &poem::Request,
    body: &RefreshRequest,
    secure: bool,
) -> ApiResult<(String, Carrier)> {
    if let Some(t) = &body.refresh_token {
        return Ok((t.clone(), Carrier::Body));
    }
    match cookie_token(req) {
        Some(t) if t.len() <= 256 => Ok((t, Carrier::Cookie)),
        Some(_) => Err(ApiError::unauthorized("unknown refresh token")
            .with_cookie(Some(refresh_cookie(None, secure)))),
        None => Err(ApiError::bad_param(
            "refreshToken",
            format!(
                "required: give it in the body, or log in with refreshCookie to keep it in the {REFRESH_COOKIE} cookie"
            ),
        )),
    }
}

/// `Set-Cookie` for a session's refresh token (`None`: removes it), with
/// `Secure` when the client reached the server over HTTPS (see
/// [`LoginApi::secure`]).
fn refresh_cookie(token: Option<(&str, i64)>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match token {
        Some((t, max_age)) => format!(
            "{REFRESH_COOKIE}={t}; Path=/api/v2/auth; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"
        ),
        None => format!(
            "{REFRESH_COOKIE}=; Path=/api/v2/auth; Max-Age=0; HttpOnly; SameSite=Strict{secure}"
        ),
    }
}

#[derive(Object, Debug)]
#[oai(rename_all = "camelCase")]
#[oai(deny_unknown_fields)]
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
    Done(
        /// Removes the refresh cookie, for a session that kept its token there.
        #[oai(header = "Set-Cookie")]
        Option<String>,
    ),
}

/// A new token pair, its refresh token where `carrier` says.
fn answer(
    issued: crate::sessions::Issued,
    u: &crate::users::User,
    carrier: Carrier,
    secure: bool,
) -> LoginResponse {
    let cookie = (carrier == Carrier::Cookie).then(|| {
        refresh_cookie(
            Some((&issued.refresh_token, issued.refresh_expires_in)),
            secure,
        )
    });
    LoginResponse::Ok(
        Json(LoginResponseBody {
            token: issued.access_token,
            token_type: "Bearer".into(),
            expires_in: issued.expires_in,
            refresh_token: (carrier == Carrier::Body).then_some(issued.refresh_token),
            refresh_expires_in: issued.refresh_expires_in,
            session_id: issued.session,
            user: UserInfo {
                id: u.id,
                email: u.email.clone(),
                role: u.role.as_str().into(),
                stores: u.stores.clone(),
            },
        }),
        cookie,
    )
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
    /// The address login failures are counted under: the client's, an
    /// IPv6 client's /64.
    fn throttled_as(&self, req: &poem::Request) -> String {
        super::middleware::throttle_key(super::middleware::client_ip(
            req,
            &self.state.config.trusted_proxies,
        ))
        .to_string()
    }

    /// Checks a password against the account of `email`: the same work
    /// (one argon2 verification) whether or not the email exists, so timing
    /// tells nothing; failures count against the account and the address.
    /// The account's throttle is keyed by the email as Postgres' `lower`
    /// gives it (as the unique index compares), whether or not an account
    /// has it: every spelling that finds the same account shares one count,
    /// and an unknown address is counted the same way. Returns the user's
    /// id and the password hash that was verified.
    async fn check_credentials(
        &self,
        email: &str,
        password: &str,
        ip: &str,
    ) -> ApiResult<Option<(i64, String)>> {
        self.ip_guard
            .admit(ip)
            .map_err(ApiError::too_many_logins_from_address)?;
        let (account, row) = match self.lookup(email).await {
            Ok(found) => found,
            Err(e) => {
                self.ip_guard.release(ip);
                return Err(e);
            }
        };
        if let Err(wait) = self.guard.admit(&account) {
            self.ip_guard.release(ip);
            return Err(ApiError::too_many_logins(wait));
        }
        let verified = self.verify(row, password).await;
        match &verified {
            Ok(Some(_)) => {
                self.guard.succeeded(&account);
                // A success does not clear the address: one right password
                // does not excuse many wrong ones for other accounts.
                self.ip_guard.release(ip);
            }
            Ok(None) => {
                self.guard.failed(&account);
                self.ip_guard.failed(ip);
            }
            // Nothing was verified: the attempt does not count.
            Err(_) => {
                self.guard.release(&account);
                self.ip_guard.release(ip);
            }
        }
        verified
    }

    /// Whether the client reached the server over HTTPS, as far as it can
    /// tell: HSTS is on (the server is only reached that way), or a trusted
    /// proxy (TRUSTED_PROXIES) says so in `X-Forwarded-Proto`.
    fn secure(&self, req: &poem::Request) -> bool {
        self.state.config.hsts
            || super::middleware::forwarded_https(req, &self.state.config.trusted_proxies)
    }

    /// What the request's `Authorization: Bearer` access token says of the
    /// session a logout ends (see [`LogoutBearer`]).
    fn bearer_session(&self, req: &poem::Request) -> LogoutBearer {
        let Some(token) = req
            .headers()
            .get(poem::http::header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(crate::auth::bearer)
        else {
            // None, or another scheme (a proxy's Basic): not the caller's
            // access token.
            return LogoutBearer::None;
        };
        match self.state.auth.verify_once(token) {
            Ok(p) => match p.session.filter(|_| !p.outside) {
                Some(session) => LogoutBearer::Verified {
                    user: p.user_id,
                    session,
                },
                None => LogoutBearer::Sessionless { user: p.user_id },
            },
            Err(e) => LogoutBearer::Refused {
                sid: unverified_sid(token),
                why: e.client_message(),
            },
        }
    }

    /// The session of the refresh token in the request's cookie, and its
    /// user, if it has one that was issued.
    async fn cookie_owner(&self, req: &poem::Request) -> ApiResult<Option<(String, i64)>> {
        let Some(token) = cookie_token(req).filter(|t| t.len() <= 256) else {
            return Ok(None);
        };
        let hash = crate::sessions::hash(&token);
        let pool = &self.state.pool;
        Ok(crate::db::retry("logout_cookie_session", true, || {
            sqlx::query_as(
                "SELECT r.session_id::text, s.user_id FROM auth.refresh_tokens r
                 JOIN auth.sessions s ON s.id = r.session_id WHERE r.token_hash = $1",
            )
            .bind(&hash)
            .fetch_optional(pool)
        })
        .await?)
    }

    /// Ends `session` of `user` (a logout by its access token), leaving
    /// any cookie as it is. Ending an ended session again is no error.
    async fn end_session(&self, user: i64, session: &str) -> ApiResult<LoggedOut> {
        let pool = &self.state.pool;
        let lifetime = self.state.auth.expiry_secs();
        let ended = crate::db::retry_tx("logout", || {
            crate::sessions::end_by_id(pool, session, user, lifetime)
        })
        .await?;
        if let Some(change) = ended {
            self.state.access.apply(&change);
        }
        Ok(LoggedOut::Done(None))
    }

    /// The email as the unique index compares it (Postgres' `lower`), the
    /// throttle's key for known and unknown addresses alike, and the
    /// account it names.
    async fn lookup(&self, email: &str) -> ApiResult<(String, Option<(i64, String)>)> {
        let pool = &self.state.pool;
        let sql = format!(
            "SELECT lower($1), u.id, u.password_hash FROM (SELECT) one \
             LEFT JOIN sales.users u ON u.id = ({})",
            crate::users::USER_BY_EMAIL
        );
        let (key, id, hash): (String, Option<i64>, Option<String>) =
            crate::db::retry("login_user", true, || {
                sqlx::query_as(&sql)
                    .bind(crate::users::normal_email(email))
                    .bind(email.trim())
                    .fetch_one(pool)
            })
            .await?;
        Ok((key, id.zip(hash)))
    }

    async fn verify(
        &self,
        row: Option<(i64, String)>,
        password: &str,
    ) -> ApiResult<Option<(i64, String)>> {
        let hash = match &row {
            Some((_, h)) => h.clone(),
            None => DUMMY_HASH.to_string(),
        };
        let password = password.to_string();
        let ok = self
            .state
            .with_hashing(move || crate::users::verify_password(&password, &hash))
            .await
            .map_err(busy)?;
        Ok(row.filter(|_| ok))
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
        let ip = self.throttled_as(req);
        if body.email.contains('\0') {
            // No account has one (emails are checked when set), and
            // Postgres' text cannot hold it: a wrong email.
            return Err(ApiError::unauthorized("wrong email or password"));
        }
        let Some((id, verified)) = self
            .check_credentials(&body.email, &body.password, &ip)
            .await?
        else {
            return Err(ApiError::unauthorized("wrong email or password"));
        };
        // Retried on another connection when the one it got was broken
        // (nothing was committed then); a connection lost at COMMIT is not.
        let (pool, auth) = (&self.state.pool, &self.state.auth);
        let lifetimes = crate::sessions::Lifetimes::of(&self.state.config);
        let opened = crate::db::retry_tx("login", || async {
            let mut tx = pool.begin().await?;
            crate::db::write::set_actor(&mut *tx, id).await?;
            // The password was verified outside this transaction: the user's
            // row is locked against changes (a password reset, disabling
            // them, which end every session) until the session is
            // committed, and the hash must still be the one verified.
            let current: Option<String> =
                sqlx::query_scalar("SELECT password_hash FROM sales.users WHERE id = $1 FOR SHARE")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            if current.as_deref() != Some(verified.as_str()) {
                return Ok(Err(ApiError::unauthorized("wrong email or password")));
            }
            let Some(user) = crate::users::get(&mut *tx, id).await? else {
                return Ok(Err(ApiError::unauthorized("wrong email or password")));
            };
            if user.disabled {
                return Ok(Err(ApiError::forbidden("account disabled")));
            }
            let issued = match start_session(&mut tx, auth, &user, lifetimes).await? {
                Ok(issued) => issued,
                Err(e) => return Ok(Err(e)),
            };
            tx.commit().await.map_err(crate::db::TxFailure::AtCommit)?;
            Ok(Ok((issued, user)))
        })
        .await?;
        let (issued, user) = opened?;
        // The access line names who logged in, as it names who a token is.
        tracing::Span::current().record("user_id", user.id);
        let carrier = Carrier::cookie_if(body.refresh_cookie.unwrap_or(false));
        Ok(answer(issued, &user, carrier, self.secure(req)))
    }

    /// Exchange a refresh token for a new access token and a new refresh
    /// token (the old one is used up). The new access token carries the
    /// user's current role and stores. Presenting a refresh token a second
    /// time revokes its whole session (401). The token comes in the body
    /// or, for a session that keeps it there (`refreshCookie` at login),
    /// in the `pg_sales_refresh` cookie with the body `{}`; the new one
    /// goes back the same way.
    #[oai(path = "/api/v2/auth/refresh", method = "post")]
    async fn refresh(
        &self,
        req: &poem::Request,
        body: Json<RefreshRequest>,
    ) -> ApiResult<LoginResponse> {
        use crate::sessions::RefreshError as E;
        let secure = self.secure(req);
        let (token, carrier) = presented(req, &body, secure)?;
        // A token refused for good leaves the cookie that held it useless:
        // the answer removes it.
        let clear = (carrier == Carrier::Cookie).then(|| refresh_cookie(None, secure));
        // Retried on another connection when the one it got was broken
        // before COMMIT (the token is still unused then); not after a
        // connection lost at COMMIT, when it may be used up already and
        // presenting it again would revoke the session as a reuse.
        let (pool, auth) = (&self.state.pool, &self.state.auth);
        let lifetimes = crate::sessions::Lifetimes::of(&self.state.config);
        let refreshed = crate::db::retry_tx("refresh", || async {
            match crate::sessions::refresh(pool, auth, &token, lifetimes).await {
                Err(E::Db(e)) => Err(crate::db::TxFailure::BeforeCommit(e)),
                Err(E::AtCommit(e)) => Err(crate::db::TxFailure::AtCommit(e)),
                other => Ok(other),
            }
        })
        .await?;
        match refreshed {
            Ok((issued, user)) => {
                tracing::Span::current().record("user_id", user.id);
                Ok(answer(issued, &user, carrier, secure))
            }
            Err(E::Reused(change)) => {
                self.state.access.apply(&change);
                Err(ApiError::unauthorized(E::Reused(change).to_string()).with_cookie(clear))
            }
            Err(E::Db(e) | E::AtCommit(e)) => Err(e.into()),
            Err(E::Other(e)) => Err(e.into()),
            Err(e) => Err(ApiError::unauthorized(e.to_string()).with_cookie(clear)),
        }
    }

    /// End the session of a refresh token: the refresh token and every
    /// access token of the session are refused from now on, on every
    /// server instance. Ending an ended session again is no error. The
    /// token comes as for a refresh (body, or the cookie with `{}`); a
    /// cookie is removed. With `{}` and an `Authorization: Bearer` access
    /// token, the session that token belongs to is ended: a browser's tabs
    /// share one cookie, which names the session of whoever logged in there
    /// last. When the cookie holds another session's token, that session
    /// and the cookie are left alone. A bearer token that no longer
    /// verifies ends the cookie's session only when it is the same
    /// session (401 otherwise); a header of another scheme is ignored.
    #[oai(path = "/api/v2/auth/logout", method = "post")]
    async fn logout(
        &self,
        req: &poem::Request,
        body: Json<RefreshRequest>,
    ) -> ApiResult<LoggedOut> {
        use crate::sessions::{Ended, RefreshError};
        let secure = self.secure(req);
        if body.refresh_token.is_none() {
            let cookie = || self.cookie_owner(req);
            match self.bearer_session(req) {
                LogoutBearer::None => {}
                LogoutBearer::Verified { user, session } => {
                    if cookie().await?.map(|(s, _)| s) != Some(session.clone()) {
                        return self.end_session(user, &session).await;
                    }
                }
                // Only the cookie's own session, by whoever holds it (a
                // logout with `{}` and the cookie alone ends it too): one
                // the token names, or, for a token of no session here
                // (an identity provider's), one of the token's user.
                LogoutBearer::Refused { sid, why } => {
                    let mine = matches!((cookie().await?, sid), (Some((c, _)), Some(t)) if c == t);
                    if !mine {
                        return Err(ApiError::unauthorized(why));
                    }
                }
                LogoutBearer::Sessionless { user } => {
                    if cookie().await?.is_some_and(|(_, u)| u != user) {
                        return Err(ApiError::forbidden(
                            "the refresh cookie is another user's session; log out with its own token",
                        ));
                    }
                }
            }
        }
        let (token, carrier) = presented(req, &body, secure)?;
        let clear = (carrier == Carrier::Cookie).then(|| refresh_cookie(None, secure));
        // Ending a session twice is no error, so a logout is retried on a
        // broken connection before COMMIT as well as a refresh is.
        let ended = crate::db::retry_tx("logout", || {
            crate::sessions::end(&self.state.pool, &token, self.state.auth.expiry_secs())
        })
        .await?;
        match ended {
            Ended::Unknown => {
                Err(ApiError::unauthorized("unknown refresh token").with_cookie(clear))
            }
            Ended::Already => Ok(LoggedOut::Done(clear)),
            Ended::LoggedOut(change) => {
                self.state.access.apply(&change);
                Ok(LoggedOut::Done(clear))
            }
            // A token a refresh already used up was copied: the session is
            // revoked as a reuse, and answered as a refresh answers one.
            Ended::Reused(change) => {
                self.state.access.apply(&change);
                Err(
                    ApiError::unauthorized(RefreshError::Reused(change).to_string())
                        .with_cookie(clear),
                )
            }
        }
    }

    /// The caller as the token and the users table say.
    #[oai(path = "/api/v2/auth/me", method = "get")]
    async fn me(&self, auth: BearerAuth) -> ApiResult<MeResponse> {
        let p = &auth.0;
        let user = crate::users::get(&self.state.pool, p.user_id).await?;
        let me = match user {
            // An identity provider's token grants the role and stores it
            // carries (every check reads those), whatever the linked local
            // user's are: answer what the caller may do.
            Some(u) if p.outside => Me {
                id: u.id,
                email: Some(u.email),
                role: p.role.as_str().into(),
                stores: p.scope().unwrap_or_default(),
                registered: true,
                session_id: p.session.clone(),
                expires_at: p.exp,
            },
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
    /// session (its refresh token in the `pg_sales_refresh` cookie when the
    /// request carried that cookie). A weak new password is 422 saying why.
    #[oai(path = "/api/v2/auth/password", method = "post")]
    async fn password(
        &self,
        req: &poem::Request,
        auth: BearerAuth,
        body: Json<PasswordChange>,
    ) -> ApiResult<LoginResponse> {
        let pool = &self.state.pool;
        let Some(user) = crate::db::retry("password_user", true, || {
            crate::users::get(pool, auth.0.user_id)
        })
        .await?
        else {
            return Err(ApiError::forbidden(
                "this account has no password here (its tokens come from an identity provider)",
            ));
        };
        let ip = self.throttled_as(req);
        let verified = match self
            .check_credentials(&user.email, &body.current_password, &ip)
            .await?
        {
            Some((id, hash)) if id == user.id => hash,
            _ => {
                return Err(ApiError::Forbidden(super::error::ErrorBody::new(
                    "forbidden",
                    "currentPassword: wrong password",
                    Some(
                        serde_json::json!({"field": "currentPassword", "reason": "wrong password"}),
                    ),
                )))
            }
        };
        crate::users::check_password_field("newPassword", &body.new_password, &user.email)
            .map_err(super::users::user_error)?;
        if body.new_password == body.current_password {
            // Nothing would change but every other session would end.
            return Err(super::users::user_error(crate::users::UserError::invalid(
                "newPassword",
                "is the current password; choose another",
            )));
        }
        let new = body.new_password.clone();
        let hash = self
            .state
            .with_hashing(move || crate::users::hash_password(&new))
            .await
            .map_err(busy)??;
        // Retried on another connection when the one it got was broken
        // before COMMIT (nothing was written then); not after a connection
        // lost at COMMIT.
        let (pool, auth, user_id) = (&self.state.pool, &self.state.auth, user.id);
        let lifetimes = crate::sessions::Lifetimes::of(&self.state.config);
        let changed = crate::db::retry_tx("password", || {
            let hash = hash.clone();
            let verified = verified.as_str();
            async move {
                let mut tx = pool.begin().await?;
                crate::db::write::set_actor(&mut *tx, user_id).await?;
                crate::users::lock(&mut tx).await?;
                // Verified outside this transaction: a password reset or a
                // disable committed meanwhile wins (the current password is
                // no longer it).
                let now: Option<(String, bool)> = sqlx::query_as(
                    "SELECT u.password_hash, coalesce(s.disabled, false)
                     FROM sales.users u LEFT JOIN auth.user_state s ON s.user_id = u.id
                     WHERE u.id = $1",
                )
                .bind(user_id)
                .fetch_optional(&mut *tx)
                .await?;
                match now {
                    Some((_, true)) => return Ok(Err(ApiError::forbidden("account disabled"))),
                    Some((current, false)) if current == verified => {}
                    _ => return Ok(Err(ApiError::forbidden("currentPassword: wrong password"))),
                }
                let patch = crate::users::UserPatch {
                    password_hash: Some(hash),
                    ..Default::default()
                };
                let (user, change) = match crate::users::update(&mut tx, user_id, patch).await {
                    Ok(done) => done,
                    Err(crate::users::UserError::Db(e)) => {
                        return Err(crate::db::TxFailure::BeforeCommit(e))
                    }
                    Err(e) => return Ok(Err(super::users::user_error(e))),
                };
                let issued = match start_session(&mut tx, auth, &user, lifetimes).await? {
                    Ok(issued) => issued,
                    Err(e) => return Ok(Err(e)),
                };
                tx.commit().await.map_err(crate::db::TxFailure::AtCommit)?;
                Ok(Ok((user, change, issued)))
            }
        })
        .await?;
        let (user, change, issued) = changed?;
        if let Some(c) = change {
            self.state.access.apply(&c);
        }
        // A session that kept its refresh token in the cookie gets the new
        // session's there too.
        let carrier = Carrier::cookie_if(cookie_token(req).is_some());
        Ok(answer(issued, &user, carrier, self.secure(req)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lets the wait of `key` run out without sleeping.
    fn wait_over(g: &LoginGuard, key: &str) -> Duration {
        let mut map = g.accounts.lock().unwrap();
        let f = map.get_mut(key).unwrap();
        let left = f.next.saturating_duration_since(Instant::now());
        f.next = Instant::now();
        f.last = Instant::now();
        left
    }

    #[test]
    fn failed_logins_wait_longer_each_time() {
        let g = LoginGuard::new(2);
        assert!(g.admit("a@x.io").is_ok());
        assert!(g.admit("a@x.io").is_ok());
        // Admitting counts: the third attempt waits before any was verified.
        assert!(g.admit("a@x.io").is_err(), "admitted attempts count");
        // The second failure used up the free attempts: 1 s, then 2 s, 4 s.
        let first = wait_over(&g, "a@x.io");
        assert!(g.admit("a@x.io").is_ok());
        let second = wait_over(&g, "a@x.io");
        assert!(g.admit("a@x.io").is_ok());
        let third = g.admit("a@x.io").unwrap_err();
        assert!(first <= Duration::from_secs(1), "{first:?}");
        assert!(
            second > first && second <= Duration::from_secs(2),
            "{second:?}"
        );
        assert!(third > 2, "{third}");
        assert!(g.admit("b@x.io").is_ok(), "other accounts are not affected");
        g.succeeded("a@x.io");
        assert!(g.admit("a@x.io").is_ok(), "a success clears the wait");
    }

    #[test]
    fn a_released_attempt_does_not_count() {
        let g = LoginGuard::new(2);
        assert!(g.admit("10.0.0.1").is_ok());
        assert!(g.admit("10.0.0.1").is_ok());
        assert!(g.admit("10.0.0.1").is_err());
        g.release("10.0.0.1");
        assert!(g.admit("10.0.0.1").is_ok(), "one failure left, not two");
        assert!(g.admit("10.0.0.1").is_err());
    }

    #[test]
    fn a_full_table_forgets_the_oldest_key() {
        let g = LoginGuard::new(1);
        for i in 0..MAX_TRACKED {
            assert!(g.admit(&format!("{i}@x.io")).is_ok());
        }
        assert!(g.admit("new@x.io").is_ok());
        assert!(
            g.admit("new@x.io").is_err(),
            "a full table still throttles new keys"
        );
        assert_eq!(g.accounts.lock().unwrap().len(), MAX_TRACKED);
    }
}
