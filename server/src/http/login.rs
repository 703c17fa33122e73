//! `POST /api/v2/auth/login`: email + password -> JWT.

use super::error::{ApiError, ApiResult};
use super::ApiTags;
use crate::auth::Role;
use crate::state::AppState;
use poem_openapi::{payload::Json, ApiResponse, Object, OpenApi};
use std::sync::Arc;

pub struct LoginApi {
    pub state: Arc<AppState>,
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
        let ok =
            tokio::task::spawn_blocking(move || crate::users::verify_password(&password, &hash))
                .await
                .map_err(ApiError::internal)?;
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
