//! `/api/v2/users`: user management. Admins manage everyone; a manager
//! lists, reads, creates and changes the staff of their own stores (never a
//! role above staff, never a store they do not manage). Every change is one
//! transaction with its `user-*` event (the admins' `admin` channel) and
//! revokes the user's access tokens on every instance (see `crate::access`).

use super::error::{ApiError, ApiResult};
use super::security::BearerAuth;
use super::stores::Preconditions;
use super::ApiTags;
use crate::auth::{Principal, Role};
use crate::state::AppState;
use crate::users::{self, User, UserError, UserPatch};
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::{payload::Json, ApiResponse, Enum, Object, OpenApi};
use std::sync::Arc;

pub struct UsersApi {
    pub state: Arc<AppState>,
}

#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[oai(rename_all = "lowercase")]
pub enum UserRole {
    Admin,
    Manager,
    Staff,
}

impl From<UserRole> for Role {
    fn from(r: UserRole) -> Role {
        match r {
            UserRole::Admin => Role::Admin,
            UserRole::Manager => Role::Manager,
            UserRole::Staff => Role::Staff,
        }
    }
}

/// A user (never the password hash).
#[derive(Object, Debug, Clone)]
#[oai(rename_all = "camelCase")]
pub struct UserDoc {
    pub id: i64,
    pub email: String,
    /// admin, manager or staff.
    pub role: String,
    /// Stores a non-admin may see (empty for admins: all). A manager sees
    /// only the stores they manage.
    pub stores: Vec<i64>,
    /// A disabled user cannot log in and their tokens are refused.
    pub disabled: bool,
    pub created_at: String,
    pub updated_at: String,
    /// The outside identity provider's identity linked to the user (as the
    /// user's history shows it to whoever may read the user): only a token
    /// with this `iss` and `sub` stands for the user.
    #[oai(skip_serializing_if_is_none)]
    pub identity: Option<IdentityDoc>,
}

/// An identity provider's name for a user: its tokens' `iss` and `sub`.
#[derive(Object, Debug, Clone)]
pub struct IdentityDoc {
    /// The tokens' `iss`, exactly.
    pub issuer: String,
    /// The tokens' `sub`, exactly.
    pub subject: String,
}

/// The identity to link. Both parts are required (a missing one is 422
/// naming it) and matched exactly: 1 to 1,000 characters, no surrounding
/// blanks, no control characters.
#[derive(Object, Debug, Clone)]
#[oai(deny_unknown_fields)]
pub struct LinkIdentity {
    /// The provider's tokens' `iss`.
    pub issuer: Option<String>,
    /// The user's `sub` in the provider's tokens.
    pub subject: Option<String>,
}

/// Whether `viewer` is shown store `store` among user `user`'s stores: an
/// admin sees all, a user their own, anyone else only the stores it shares.
fn shows_store(viewer: &Principal, user: i64, store: i64) -> bool {
    viewer.is_admin() || viewer.user_id == user || viewer.stores.contains(&store)
}

fn doc(u: &User, viewer: &Principal) -> UserDoc {
    let stores = u
        .stores
        .iter()
        .copied()
        .filter(|&s| shows_store(viewer, u.id, s))
        .collect();
    UserDoc {
        id: u.id,
        email: u.email.clone(),
        role: u.role.as_str().into(),
        stores,
        disabled: u.disabled,
        created_at: u.created_at.to_rfc3339(),
        updated_at: u.updated_at.to_rfc3339(),
        identity: u.identity.as_ref().map(|i| IdentityDoc {
            issuer: i.issuer.clone(),
            subject: i.subject.clone(),
        }),
    }
}

/// A page of the user list: what it was read with.
#[derive(Object, Debug)]
pub struct UserListMeta {
    pub limit: i64,
    pub offset: i64,
    /// Users on this page (not the total).
    pub count: i64,
}

#[derive(Object, Debug)]
pub struct UserPage {
    pub data: Vec<UserDoc>,
    pub meta: UserListMeta,
}

#[derive(Object, Debug)]
pub struct UserOne {
    pub data: UserDoc,
}

#[derive(Object, Debug)]
#[oai(deny_unknown_fields)]
pub struct CreateUser {
    #[oai(validator(max_length = 320))]
    pub email: String,
    pub role: UserRole,
    /// Required for managers and staff; ignored for admins.
    #[oai(validator(max_items = 10000))]
    pub stores: Option<Vec<i64>>,
    /// At least 8 characters and 4 different ones, not a common password,
    /// not the email address.
    #[oai(validator(max_length = 1024))]
    pub password: String,
    pub disabled: Option<bool>,
}

#[derive(Object, Debug)]
#[oai(deny_unknown_fields)]
pub struct UpdateUser {
    #[oai(validator(max_length = 320))]
    pub email: Option<String>,
    pub role: Option<UserRole>,
    #[oai(validator(max_items = 10000))]
    pub stores: Option<Vec<i64>>,
    pub disabled: Option<bool>,
    /// A new password (admins only; users change their own at
    /// `POST /api/v2/auth/password`).
    #[oai(validator(max_length = 1024))]
    pub password: Option<String>,
}

#[derive(ApiResponse)]
pub enum ListResponse {
    /// Users by id.
    #[oai(status = 200)]
    Ok(Json<UserPage>),
}

#[derive(ApiResponse)]
pub enum OneResponse {
    /// The user.
    #[oai(status = 200)]
    Ok(Json<UserOne>),
}

#[derive(ApiResponse)]
pub enum CreatedResponse {
    /// Created; `Location` is the new user's URL.
    #[oai(status = 201)]
    Created(Json<UserOne>, #[oai(header = "Location")] String),
}

#[derive(Object, Debug)]
pub struct UserHistory {
    /// Newest first: `{id, event, actorId, data, ts}` (events within EVENT_RETENTION).
    pub data: Vec<serde_json::Value>,
}

#[derive(ApiResponse)]
pub enum HistoryResponse {
    /// The events about the user.
    #[oai(status = 200)]
    Ok(Json<UserHistory>),
}

#[derive(ApiResponse)]
pub enum DeletedResponse {
    /// Deleted: the user's sessions are gone and their tokens refused.
    #[oai(status = 204)]
    Deleted,
}

/// The HTTP answer to a refused user change.
pub fn user_error(e: UserError) -> ApiError {
    match e {
        UserError::Invalid { field, reason } => ApiError::unprocessable(
            format!("{field}: {reason}"),
            Some(serde_json::json!({"field": field, "reason": reason})),
        ),
        UserError::UnknownStores(ids) => ApiError::unprocessable(
            format!("stores: no store with id {ids:?}"),
            Some(serde_json::json!({"field": "stores", "storeIds": ids})),
        ),
        UserError::Duplicate(email) => ApiError::conflict(
            format!("a user with email {email} already exists"),
            Some(serde_json::json!({"field": "email"})),
        ),
        e @ UserError::LastAdmin(_) => ApiError::conflict(e.to_string(), None),
        e @ UserError::NotFound(_) => ApiError::not_found(e.to_string()),
        e @ UserError::IdentityTaken(other) => ApiError::conflict(
            e.to_string(),
            Some(serde_json::json!({"field": "identity", "userId": other})),
        ),
        UserError::Db(e) => e.into(),
    }
}

/// Whether a manager may see and change `u`: staff with one of their stores.
fn manages(who: &Principal, u: &User) -> bool {
    who.role == Role::Manager
        && u.role == Role::Staff
        && u.stores.iter().any(|s| who.stores.contains(s))
}

/// 403 naming the stores a manager gave that they do not manage.
fn require_managed(who: &Principal, stores: &[i64]) -> ApiResult<()> {
    let denied: Vec<i64> = stores
        .iter()
        .copied()
        .filter(|s| !who.stores.contains(s))
        .collect();
    if denied.is_empty() {
        Ok(())
    } else {
        Err(ApiError::outside_scope(denied))
    }
}

impl UsersApi {
    async fn hash(&self, password: String) -> ApiResult<String> {
        self.state
            .with_hashing(move || users::hash_password(&password))
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?
            .map_err(ApiError::from)
    }

    async fn set_identity(
        &self,
        who: &Principal,
        id: i64,
        identity: Option<users::Identity>,
    ) -> ApiResult<OneResponse> {
        let mut tx = crate::db::Write::begin(&self.state.pool, who.user_id).await?;
        users::lock(tx.conn()).await?;
        let patch = UserPatch {
            identity: Some(identity),
            ..Default::default()
        };
        self.apply(tx, who, id, patch).await
    }

    /// Changes user `id` in `tx` (which holds [`users::lock`]), commits,
    /// applies the change to this instance's access state at once and
    /// answers with the user as `who` may see them.
    async fn apply(
        &self,
        mut tx: crate::db::Write,
        who: &Principal,
        id: i64,
        patch: UserPatch,
    ) -> ApiResult<OneResponse> {
        let (user, change) = users::update(tx.conn(), id, patch)
            .await
            .map_err(user_error)?;
        // The histories that name this user are stale at once (the relay
        // may deliver the event much later: behind a running writer).
        let changes = tx.commit().await?;
        if let Some(c) = change {
            self.state.access.apply(&c);
        }
        self.state.publish(changes).await;
        Ok(OneResponse::Ok(Json(UserOne {
            data: doc(&user, who),
        })))
    }

    /// With `If-Match`, 412 unless it names the state of user `id` that a
    /// GET by `who` answers now; with `If-None-Match`, 412 when it names
    /// that state or is `*` (read on `conn`, under the users' lock the
    /// change holds until it commits, so two writers holding one ETag
    /// cannot both pass).
    async fn require_match(
        conn: &mut sqlx::PgConnection,
        who: &Principal,
        id: i64,
        conditions: &Preconditions,
    ) -> ApiResult<()> {
        if !conditions.any() {
            return Ok(());
        }
        let u = users::get(conn, id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no user {id}")))?;
        if !who.is_admin() && who.user_id != u.id && !manages(who, &u) {
            // As for an id no user has (see get_one).
            return Err(ApiError::not_found(format!("no user {id}")));
        }
        use poem_openapi::types::ToJSON;
        let body = serde_json::to_vec(&UserOne { data: doc(&u, who) }.to_json())
            .map_err(ApiError::internal)?;
        conditions.check(&format!("user {id}"), &body)
    }

    async fn load(&self, id: i64) -> ApiResult<User> {
        let pool = &self.state.pool;
        crate::db::retry("users_get", true, || users::get(pool, id))
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no user {id}")))
    }
}

#[allow(clippy::too_many_arguments)]
#[OpenApi(tag = "ApiTags::Users")]
impl UsersApi {
    /// Users by id: every user for admins, the staff of their stores for managers.
    #[oai(path = "/api/v2/users", method = "get")]
    async fn list(
        &self,
        auth: BearerAuth,
        /// Default 100, at most 1000.
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<i64>>,
        /// Rows to skip.
        #[oai(validator(minimum(value = "0"), maximum(value = "1000000")))]
        offset: Query<Option<i64>>,
    ) -> ApiResult<ListResponse> {
        let who = &auth.0;
        let staff_of = match who.role {
            Role::Admin => None,
            Role::Manager => who.scope(),
            Role::Staff => return Err(ApiError::forbidden("admin or manager role required")),
        };
        let (limit, offset) = (limit.0.unwrap_or(100), offset.0.unwrap_or(0));
        let pool = &self.state.pool;
        let rows = crate::db::retry("users_list", true, || {
            users::list(pool, staff_of.as_deref(), limit, offset)
        })
        .await?;
        Ok(ListResponse::Ok(Json(UserPage {
            data: rows.iter().map(|u| doc(u, who)).collect(),
            meta: UserListMeta {
                limit,
                offset,
                count: rows.len() as i64,
            },
        })))
    }

    /// One user: any for admins, staff of their stores for managers, oneself for everyone.
    #[oai(path = "/api/v2/users/:id", method = "get")]
    async fn get_one(&self, auth: BearerAuth, id: Path<i64>) -> ApiResult<OneResponse> {
        let who = &auth.0;
        if !who.is_admin() && who.user_id != id.0 && who.role != Role::Manager {
            return Err(ApiError::forbidden("admin or manager role required"));
        }
        let u = self.load(id.0).await?;
        if !who.is_admin() && who.user_id != u.id && !manages(who, &u) {
            // The same answer as for an id no user has: a manager learns
            // nothing about users outside their staff.
            return Err(ApiError::not_found(format!("no user {}", id.0)));
        }
        Ok(OneResponse::Ok(Json(UserOne { data: doc(&u, who) })))
    }

    /// A user's history: their creation, changes (what changed, who changed
    /// it) and ended sessions, newest first. Who may read it: as for the user.
    #[oai(path = "/api/v2/users/:id/history", method = "get")]
    async fn history(
        &self,
        auth: BearerAuth,
        id: Path<i64>,
        /// Default 100, at most 1000.
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<i64>>,
    ) -> ApiResult<HistoryResponse> {
        let who = auth.0.clone();
        self.get_one(auth, Path(id.0)).await?;
        let (pool, limit) = (&self.state.pool, limit.0.unwrap_or(100));
        let mut data =
            crate::db::retry("users_history", true, || users::history(pool, id.0, limit)).await?;
        // The stores in each change as the user's document shows them; an
        // event without stores (such as `session-revoked`) is left as it is.
        for entry in &mut data {
            let stores = entry
                .get_mut("data")
                .and_then(|d| d.get_mut("stores"))
                .and_then(|s| s.as_array_mut());
            if let Some(stores) = stores {
                stores.retain(|s| s.as_i64().is_some_and(|s| shows_store(&who, id.0, s)));
            }
        }
        Ok(HistoryResponse::Ok(Json(UserHistory { data })))
    }

    /// Create a user. Duplicate email 409; unknown store 422 naming it; a
    /// weak password 422 saying why; a manager creating anything but staff
    /// of their own stores 403.
    #[oai(path = "/api/v2/users", method = "post")]
    async fn create(&self, auth: BearerAuth, body: Json<CreateUser>) -> ApiResult<CreatedResponse> {
        let who = &auth.0;
        let role: Role = body.role.into();
        let stores = body.stores.clone().unwrap_or_default();
        match who.role {
            Role::Admin => {}
            Role::Manager => {
                if role != Role::Staff {
                    return Err(ApiError::forbidden("managers may only create staff"));
                }
                require_managed(who, &stores)?;
            }
            Role::Staff => return Err(ApiError::forbidden("admin or manager role required")),
        }
        let email = users::check_email(&body.email).map_err(user_error)?;
        users::check_password(&body.password, &email).map_err(user_error)?;
        let hash = self.hash(body.password.clone()).await?;
        let mut tx = crate::db::Write::begin(&self.state.pool, who.user_id).await?;
        users::lock(tx.conn()).await?;
        let (user, change) = users::create(
            tx.conn(),
            users::NewUser {
                email,
                role,
                stores,
                password_hash: hash,
                disabled: body.disabled.unwrap_or(false),
                by_manager: who.role == Role::Manager,
            },
        )
        .await
        .map_err(user_error)?;
        let changes = tx.commit().await?;
        self.state.access.apply(&change);
        self.state.publish(changes).await;
        let location = format!("/api/v2/users/{}", user.id);
        Ok(CreatedResponse::Created(
            Json(UserOne {
                data: doc(&user, who),
            }),
            location,
        ))
    }

    /// Change a user's email, role, stores, disabled flag or (admins)
    /// password; one's own password is changed at `/api/v2/auth/password`
    /// (422 here). The user's access tokens are refused from then on, on every
    /// instance, and their WebSockets closed; a refresh gives the new scope.
    /// Leaving no enabled admin is 409.
    #[oai(path = "/api/v2/users/:id", method = "patch")]
    async fn update(
        &self,
        auth: BearerAuth,
        id: Path<i64>,
        body: Json<UpdateUser>,
        /// Change the user only in the state this ETag (from a GET of the
        /// user) names; else 412 with the current one. Several lines make
        /// one list.
        #[oai(name = "If-Match")]
        _if_match: Header<Option<String>>,
        /// Change the user only if they are in none of the states these
        /// ETags name (`*` names any state: the change is refused); else
        /// 412 with the current one. Several lines make one list.
        #[oai(name = "If-None-Match")]
        _if_none_match: Header<Option<String>>,
        req: &poem::Request,
    ) -> ApiResult<OneResponse> {
        // Read from the request, not the parameters above (which document
        // them): those hold the first line only.
        let conditions = Preconditions::of(req);
        let who = &auth.0;
        let b = &body.0;
        if b.email.is_none()
            && b.role.is_none()
            && b.stores.is_none()
            && b.disabled.is_none()
            && b.password.is_none()
        {
            return Err(ApiError::bad_param(
                "body",
                "give email, role, stores, disabled or password",
            ));
        }
        if b.password.is_some() && id.0 == who.user_id {
            // Changing one's own password asks for the current one.
            return Err(ApiError::unprocessable(
                "password: to change your own password use POST /api/v2/auth/password \
                 (it asks for the current one)",
                Some(serde_json::json!({
                    "field": "password",
                    "reason": "use POST /api/v2/auth/password for your own password",
                })),
            ));
        }
        match who.role {
            Role::Admin => {}
            Role::Manager => {
                if b.role.is_some_and(|r| Role::from(r) != Role::Staff) {
                    return Err(ApiError::forbidden(
                        "managers may only grant the staff role",
                    ));
                }
                if b.password.is_some() {
                    return Err(ApiError::forbidden(
                        "only admins set other users' passwords",
                    ));
                }
            }
            Role::Staff => return Err(ApiError::forbidden("admin or manager role required")),
        }
        let hash = match &b.password {
            Some(p) => {
                let email = match &b.email {
                    Some(e) => e.clone(),
                    None => self.load(id.0).await?.email,
                };
                users::check_password(p, &email).map_err(user_error)?;
                Some(self.hash(p.clone()).await?)
            }
            None => None,
        };
        let mut tx = crate::db::Write::begin(&self.state.pool, who.user_id).await?;
        users::lock(tx.conn()).await?;
        let mut stores = b.stores.clone();
        if who.role == Role::Manager {
            // Read under the lock: the user cannot move out of the
            // manager's stores between the check and the change.
            let old = users::get(tx.conn(), id.0)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("no user {}", id.0)))?;
            if old.id == who.user_id {
                return Err(ApiError::forbidden(
                    "managers do not change their own email, role, stores or state",
                ));
            }
            if !manages(who, &old) {
                // As for an id no user has (see get_one).
                return Err(ApiError::not_found(format!("no user {}", id.0)));
            }
            if b.disabled == Some(false)
                && old.disabled
                && !users::manager_may_enable(tx.conn(), id.0).await?
            {
                return Err(ApiError::forbidden(format!(
                    "user {} was disabled by an admin; only an admin may enable them",
                    id.0
                )));
            }
            if let Some(given) = &stores {
                require_managed(who, given)?;
                // Stores the manager does not manage stay as they are.
                let mut all: Vec<i64> = old
                    .stores
                    .iter()
                    .copied()
                    .filter(|s| !who.stores.contains(s))
                    .collect();
                all.extend(given);
                stores = Some(all);
            }
        }
        // After the refusals that do not depend on the user's state, so a
        // stale ETag does not hide them.
        Self::require_match(tx.conn(), who, id.0, &conditions).await?;
        let patch = UserPatch {
            email: b.email.clone(),
            role: b.role.map(Role::from),
            stores,
            disabled: b.disabled,
            password_hash: hash,
            identity: None,
            by_manager: who.role == Role::Manager,
        };
        self.apply(tx, who, id.0, patch).await
    }

    /// Link an outside identity provider's identity to a user (admins
    /// only): from then on a token of that provider with this `iss` and
    /// `sub` stands for the user, and for nobody else; the user's previous
    /// identity, if any, stops being theirs. An identity linked to another
    /// user is 409 (unlink it there first).
    #[oai(path = "/api/v2/users/:id/identity", method = "put")]
    async fn link_identity(
        &self,
        auth: BearerAuth,
        id: Path<i64>,
        body: Json<LinkIdentity>,
    ) -> ApiResult<OneResponse> {
        auth.require_admin()?;
        let given = |v: Option<String>, field| {
            v.ok_or_else(|| {
                user_error(UserError::Invalid {
                    field,
                    reason: "is required".into(),
                })
            })
        };
        let LinkIdentity { issuer, subject } = body.0;
        let issuer = given(issuer, "issuer")?;
        let subject = given(subject, "subject")?;
        let required = self.state.config.jwt_issuer.as_deref();
        let identity = users::Identity::new(&issuer, &subject, required).map_err(user_error)?;
        self.set_identity(&auth.0, id.0, Some(identity)).await
    }

    /// Unlink a user's outside identity (admins only): its tokens are
    /// refused from then on.
    #[oai(path = "/api/v2/users/:id/identity", method = "delete")]
    async fn unlink_identity(&self, auth: BearerAuth, id: Path<i64>) -> ApiResult<OneResponse> {
        auth.require_admin()?;
        self.set_identity(&auth.0, id.0, None).await
    }

    /// Delete a user (admins only): their sessions go, their tokens are
    /// refused on every instance. Deleting the last enabled admin is 409.
    #[oai(path = "/api/v2/users/:id", method = "delete")]
    async fn delete(
        &self,
        auth: BearerAuth,
        id: Path<i64>,
        /// Delete the user only in the state this ETag (from a GET of the
        /// user) names; else 412 with the current one. Several lines make
        /// one list.
        #[oai(name = "If-Match")]
        _if_match: Header<Option<String>>,
        /// Delete the user only if they are in none of the states these
        /// ETags name (`*` names any state: the deletion is refused); else
        /// 412 with the current one. Several lines make one list.
        #[oai(name = "If-None-Match")]
        _if_none_match: Header<Option<String>>,
        req: &poem::Request,
    ) -> ApiResult<DeletedResponse> {
        auth.require_admin()?;
        let conditions = Preconditions::of(req);
        let mut tx = crate::db::Write::begin(&self.state.pool, auth.0.user_id).await?;
        users::lock(tx.conn()).await?;
        Self::require_match(tx.conn(), &auth.0, id.0, &conditions).await?;
        let (_, change) = users::delete(tx.conn(), id.0, self.state.auth.expiry_secs())
            .await
            .map_err(user_error)?;
        let changes = tx.commit().await?;
        self.state.access.apply(&change);
        self.state.publish(changes).await;
        Ok(DeletedResponse::Deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn managers_manage_staff_of_their_stores() {
        let manager = Principal {
            user_id: 1,
            email: None,
            role: Role::Manager,
            stores: HashSet::from([1, 2]),
            exp: None,
            generation: 0,
            session: None,
            outside: false,
            identity: None,
        };
        let user = |role, stores: Vec<i64>| User {
            id: 9,
            email: "s@x.io".into(),
            role,
            stores,
            disabled: false,
            generation: 0,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            identity: None,
        };
        assert!(manages(&manager, &user(Role::Staff, vec![2, 7])));
        assert!(!manages(&manager, &user(Role::Staff, vec![7])));
        assert!(!manages(&manager, &user(Role::Manager, vec![1])));
        assert_eq!(
            doc(&user(Role::Staff, vec![2, 7]), &manager).stores,
            vec![2]
        );
        assert!(require_managed(&manager, &[1, 2]).is_ok());
        assert_eq!(
            require_managed(&manager, &[2, 5]).unwrap_err().status(),
            403
        );
    }
}
