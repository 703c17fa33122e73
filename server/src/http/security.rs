//! Bearer JWT as a poem-openapi security scheme: handlers that take a
//! [`BearerAuth`] only run for a verified caller.

use super::error::ApiError;
use crate::auth::Principal;
use crate::state::AppState;
use poem::Request;
use poem_openapi::{auth::Bearer, SecurityScheme};
use std::sync::Arc;

/// A JWT from `POST /api/v2/auth/login` (or from the configured identity provider).
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT", checker = "verify_bearer")]
pub struct BearerAuth(pub Principal);

async fn verify_bearer(req: &Request, bearer: Bearer) -> poem::Result<Principal> {
    let state = req.data::<Arc<AppState>>().ok_or_else(|| {
        poem::Error::from_string(
            "state missing",
            poem::http::StatusCode::INTERNAL_SERVER_ERROR,
        )
    })?;
    let digest = crate::auth::Auth::digest(&bearer.token);
    match state.auth.verify_digested(&bearer.token, &digest) {
        Ok(p) => {
            tracing::Span::current().record("user_id", p.user_id);
            // A token spends its user's budget only once it has verified.
            if let Some(limits) = req.data::<Arc<super::middleware::RateLimits>>() {
                if let Err(retry) = limits.check_user(p.user_id) {
                    return Err(poem::Error::from_response(
                        poem::IntoResponse::into_response(ApiError::too_many(retry)),
                    ));
                }
            }
            Ok(p)
        }
        Err(e) => {
            let msg = e.client_message();
            Err(poem::Error::from_response(
                poem::IntoResponse::into_response(ApiError::unauthorized(msg)),
            ))
        }
    }
}

impl BearerAuth {
    /// 403 unless the caller may use `store`.
    pub fn require_store(&self, store: i64) -> Result<(), ApiError> {
        if self.0.can_access_store(store) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "store {store} is outside your scope"
            )))
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.0.is_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden("admin role required"))
        }
    }
}
