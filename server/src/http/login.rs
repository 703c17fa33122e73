//! `POST /api/v2/auth/login`: email + password -> JWT.

use super::error::{ApiError, ApiResult};
use super::ApiTags;
use crate::auth::Role;
use crate::state::AppState;
use poem_openapi::{payload::Json, ApiResponse, Object, OpenApi};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

pub struct LoginApi {
    pub state: Arc<AppState>,
    guard: LoginGuard,
}

impl LoginApi {
    pub fn new(state: Arc<AppState>) -> Self {
        let guard = LoginGuard::new(
            state.config.login_attempts_per_minute,
            state.config.password_hash_concurrency,
        );
        Self { state, guard }
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

/// Per-account throttling with a growing delay, and a bound on the number
/// of password hashes computed at once (each holds a blocking thread and
/// ~19 MB for ~50 ms): guessing costs the guesser time, not the server memory.
pub struct LoginGuard {
    free: u32,
    accounts: Mutex<HashMap<String, Failures>>,
    hashing: Semaphore,
}

/// The longest wait between two attempts on one account.
const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);
/// Accounts tracked at most; the oldest quiet ones are forgotten first.
const MAX_TRACKED: usize = 100_000;

impl LoginGuard {
    pub fn new(free: u32, hash_concurrency: usize) -> Self {
        Self {
            free: free.max(1),
            accounts: Mutex::new(HashMap::new()),
            hashing: Semaphore::new(hash_concurrency.max(1)),
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
    pub token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the token expires.
    pub expires_in: i64,
    pub user: UserInfo,
}

#[derive(ApiResponse)]
pub enum LoginResponse {
    /// Logged in.
    #[oai(status = 200)]
    Ok(Json<LoginResponseBody>),
}

// Verifying against this when the email is unknown keeps the response time
// the same as for a wrong password, so emails cannot be probed.
static DUMMY_HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    crate::users::hash_password("not-a-real-password").unwrap_or_default()
});

#[OpenApi(tag = "ApiTags::Auth")]
impl LoginApi {
    /// Exchange email and password for a JWT carrying role and store scope.
    #[oai(path = "/api/v2/auth/login", method = "post")]
    async fn login(&self, body: Json<LoginRequest>) -> ApiResult<LoginResponse> {
        let account = body.email.trim().to_lowercase();
        self.guard
            .admit(&account)
            .map_err(ApiError::too_many_logins)?;
        let row: Option<(i64, String, String, String, Vec<i64>)> = sqlx::query_as(
            "SELECT id, email, password_hash, role, store_ids FROM sales.users WHERE lower(email) = lower($1)",
        )
        .bind(body.email.trim())
        .fetch_optional(&self.state.pool)
        .await?;
        let password = body.password.clone();
        let (hash, found) = match &row {
            Some(r) => (r.2.clone(), true),
            None => (DUMMY_HASH.to_string(), false),
        };
        let permit = tokio::time::timeout(Duration::from_secs(10), self.guard.hashing.acquire())
            .await
            .map_err(|_| ApiError::unavailable("too many logins in progress; retry later"))?
            .map_err(ApiError::internal)?;
        let ok =
            tokio::task::spawn_blocking(move || crate::users::verify_password(&password, &hash))
                .await
                .map_err(ApiError::internal)?;
        drop(permit);
        self.guard.record(&account, ok && found);
        let Some((id, email, _, role, stores)) = row.filter(|_| ok && found) else {
            return Err(ApiError::unauthorized("wrong email or password"));
        };
        let role = Role::parse(&role)
            .ok_or_else(|| ApiError::internal(format!("user {id} has unknown role {role}")))?;
        let (token, _) = self.state.auth.issue(id, &email, role, stores.clone())?;
        Ok(LoginResponse::Ok(Json(LoginResponseBody {
            token,
            token_type: "Bearer".into(),
            expires_in: self.state.auth.expiry_secs(),
            user: UserInfo {
                id,
                email,
                role: role.as_str().into(),
                stores: if role == Role::Admin { vec![] } else { stores },
            },
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_logins_wait_longer_each_time() {
        let g = LoginGuard::new(2, 1);
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
