//! `/api/v2/stores`: list, get, create, change (status changes emit
//! `store-status-changed` through the table's triggers).

use super::error::{ApiError, ApiResult};
use super::filters::parse_projection;
use super::raw::RawJson;
use super::security::BearerAuth;
use super::ApiTags;
use crate::db::sql::Binds;
use crate::db::Write;
use crate::state::AppState;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::{payload::Json, ApiResponse, Enum, Object, OpenApi};
use sales_core::projection::STORE_DOC;
use sales_core::sql::push_store_doc;
use sqlx::{Postgres, QueryBuilder, Row};
use std::sync::Arc;

pub struct StoresApi {
    pub state: Arc<AppState>,
}

#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[oai(rename_all = "lowercase")]
pub enum StoreStatus {
    Open,
    Closed,
    Renovating,
}

impl StoreStatus {
    fn as_str(self) -> &'static str {
        match self {
            StoreStatus::Open => "open",
            StoreStatus::Closed => "closed",
            StoreStatus::Renovating => "renovating",
        }
    }
}

/// A store (every member may be projected away with `fields`).
#[derive(Object, Debug, Clone)]
#[oai(rename_all = "camelCase")]
pub struct Store {
    pub id: Option<i64>,
    pub code: Option<String>,
    pub name: Option<String>,
    pub region: Option<String>,
    /// open, closed or renovating.
    pub status: Option<String>,
    pub version: Option<i64>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

/// A page of the store list: what it was read with.
#[derive(Object, Debug)]
pub struct StoreListMeta {
    pub limit: i64,
    pub offset: i64,
    /// The canonical paths of `fields` (empty: all).
    pub fields: Vec<String>,
    /// The canonical paths of `exclude`.
    pub exclude: Vec<String>,
}

#[derive(Object, Debug)]
pub struct StorePage {
    pub data: Vec<Store>,
    pub meta: StoreListMeta,
}

#[derive(Object, Debug)]
pub struct StoreOne {
    pub data: Store,
}

#[derive(Object, Debug)]
#[oai(deny_unknown_fields)]
pub struct CreateStore {
    /// Unique; letters, digits, `_` and `-`, at most 32.
    #[oai(validator(pattern = r"^[A-Za-z0-9_-]{1,32}$"))]
    pub code: String,
    /// No control characters (C0, DEL, C1; Postgres text cannot hold NUL)
    /// nor line or paragraph separators, and something visible.
    #[oai(validator(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]+$"
    ))]
    pub name: String,
    #[oai(validator(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]+$"
    ))]
    pub region: String,
    pub status: Option<StoreStatus>,
}

#[derive(Object, Debug)]
#[oai(deny_unknown_fields)]
pub struct UpdateStore {
    pub status: Option<StoreStatus>,
    #[oai(validator(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]+$"
    ))]
    pub name: Option<String>,
    #[oai(validator(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]+$"
    ))]
    pub region: Option<String>,
}

#[derive(ApiResponse)]
pub enum ListResponse {
    /// Stores in the caller's scope.
    #[oai(status = 200)]
    Ok(RawJson<StorePage>),
}

#[derive(ApiResponse)]
pub enum OneResponse {
    /// The store.
    #[oai(status = 200)]
    Ok(RawJson<StoreOne>),
}

#[derive(ApiResponse)]
pub enum CreatedResponse {
    /// Created; `Location` is the new store's URL.
    #[oai(status = 201)]
    Created(RawJson<StoreOne>, #[oai(header = "Location")] String),
}

/// The preconditions of a write to one resource (RFC 9110 13.1): every
/// line of `If-Match` and of `If-None-Match`, each read as one list (5.3).
/// They are judged against the body the resource's GET would answer now,
/// read under the lock the write holds until it commits.
#[derive(Debug, Default)]
pub struct Preconditions {
    pub if_match: Option<String>,
    pub if_none_match: Option<String>,
}

impl Preconditions {
    pub fn of(req: &poem::Request) -> Self {
        use crate::http::compress::field_list;
        use poem::http::header;
        Preconditions {
            if_match: field_list(req.headers(), header::IF_MATCH),
            if_none_match: field_list(req.headers(), header::IF_NONE_MATCH),
        }
    }

    /// Whether the write has a condition to judge.
    pub fn any(&self) -> bool {
        self.if_match.is_some() || self.if_none_match.is_some()
    }

    /// 412 (with the current ETag) unless both conditions hold for
    /// `what` (`store 3`), whose GET would answer `current`: If-Match
    /// first, then If-None-Match (13.2.2), which is false when `*` is
    /// listed (the resource exists) or a tag naming `current` is, by weak
    /// comparison (`W/` ignored) and in any content coding.
    pub fn check(&self, what: &str, current: &[u8]) -> ApiResult<()> {
        use crate::http::middleware::{etag_of, if_match_holds};
        if let Some(wanted) = &self.if_match {
            if !if_match_holds(wanted, current) {
                return Err(ApiError::precondition_failed(
                    format!("If-Match: {what} changed since that ETag was read; GET it again"),
                    &etag_of(current),
                ));
            }
        }
        if let Some(unwanted) = &self.if_none_match {
            let hit = unwanted.split(',').any(|t| {
                let t = t.trim();
                !t.is_empty() && if_match_holds(t.strip_prefix("W/").unwrap_or(t), current)
            });
            if hit {
                return Err(ApiError::precondition_failed(
                    format!(
                        "If-None-Match: {what} exists in a state the header lists (or `*`), \
                         so nothing was changed"
                    ),
                    &etag_of(current),
                ));
            }
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
#[OpenApi(tag = "ApiTags::Stores")]
impl StoresApi {
    /// Stores in the caller's scope, by id; filter by region and status.
    /// Read from the replica only once it has replayed this instance's last
    /// write (read_conn), so a store just created or changed is never missing.
    #[oai(path = "/api/v2/stores", method = "get")]
    async fn list(
        &self,
        auth: BearerAuth,
        region: Query<Option<String>>,
        status: Query<Option<StoreStatus>>,
        fields: Query<Option<String>>,
        exclude: Query<Option<String>>,
        /// Default 200, at most 1000.
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<i64>>,
        /// Rows to skip.
        #[oai(validator(minimum(value = "0"), maximum(value = "1000000")))]
        offset: Query<Option<i64>>,
    ) -> ApiResult<ListResponse> {
        let projection = parse_projection(&STORE_DOC, fields.0.as_deref(), exclude.0.as_deref())?;
        let limit = limit.0.unwrap_or(200);
        if !(1..=1000).contains(&limit) {
            return Err(ApiError::bad_param("limit", "must be between 1 and 1000"));
        }
        let offset = offset.0.unwrap_or(0);
        if !(0..=1_000_000).contains(&offset) {
            return Err(ApiError::bad_param(
                "offset",
                "must be between 0 and 1000000",
            ));
        }
        let scope = auth.0.scope();
        let region = crate::http::filters::region_filter(region.0.as_deref())?;
        let region = region.as_deref();
        let data: String = crate::db::retry("stores_list", true, || async {
            let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(
                "SELECT coalesce(jsonb_agg(d ORDER BY id), '[]')::text FROM (SELECT s.id, ",
            );
            push_store_doc(&mut Binds(&mut qb), &projection);
            qb.push(" AS d FROM sales.stores s WHERE true");
            if let Some(scope) = scope.clone() {
                qb.push(" AND s.id = ANY(").push_bind(scope).push(")");
            }
            if let Some(r) = region {
                qb.push(" AND s.region = ").push_bind(r.to_string());
            }
            if let Some(st) = status.0 {
                qb.push(" AND s.status = ").push_bind(st.as_str());
            }
            qb.push(" ORDER BY s.id LIMIT ")
                .push_bind(limit)
                .push(" OFFSET ")
                .push_bind(offset)
                .push(") t");
            qb.build_query_scalar()
                .fetch_one(&mut *self.state.read_conn().await?)
                .await
        })
        .await?;
        let meta = serde_json::json!({"limit": limit, "offset": offset,
            "fields": projection.fields, "exclude": projection.excluded});
        Ok(ListResponse::Ok(RawJson::new(format!(
            "{{\"data\":{data},\"meta\":{meta}}}"
        ))))
    }

    /// One store (403 outside the caller's scope).
    #[oai(path = "/api/v2/stores/:id", method = "get")]
    async fn get_one(
        &self,
        auth: BearerAuth,
        id: Path<i64>,
        fields: Query<Option<String>>,
        exclude: Query<Option<String>>,
    ) -> ApiResult<OneResponse> {
        let projection = parse_projection(&STORE_DOC, fields.0.as_deref(), exclude.0.as_deref())?;
        auth.require_store(id.0)?;
        let doc: Option<String> = crate::db::retry("stores_get", true, || async {
            let mut qb: QueryBuilder<Postgres> = QueryBuilder::new("SELECT (");
            push_store_doc(&mut Binds(&mut qb), &projection);
            qb.push(")::text FROM sales.stores s WHERE s.id = ")
                .push_bind(id.0);
            qb.build_query_scalar()
                .fetch_optional(&mut *self.state.read_conn().await?)
                .await
        })
        .await?;
        let doc = doc.ok_or_else(|| ApiError::not_found(format!("no store {}", id.0)))?;
        Ok(OneResponse::Ok(RawJson::new(format!("{{\"data\":{doc}}}"))))
    }

    /// Create a store (admin only). A duplicate code is 409.
    #[oai(path = "/api/v2/stores", method = "post")]
    async fn create(
        &self,
        auth: BearerAuth,
        body: Json<CreateStore>,
    ) -> ApiResult<CreatedResponse> {
        auth.require_admin()?;
        not_blank("name", Some(&body.name))?;
        not_blank("region", Some(&body.region))?;
        let mut w = Write::begin(&self.state.pool, auth.0.user_id).await?;
        let (id, doc): (i64, String) = sqlx::query_as(
            "INSERT INTO sales.stores AS s (code, name, region, status) VALUES ($1, $2, $3, $4) RETURNING s.id, sales.store_doc(s)::text",
        )
        .bind(body.code.trim())
        .bind(body.name.trim())
        .bind(body.region.trim())
        .bind(body.status.unwrap_or(StoreStatus::Open).as_str())
        .fetch_one(w.conn())
        .await
        .map_err(|e| match e.as_database_error().and_then(|d| d.code()).as_deref() {
            Some("23505") => ApiError::conflict(format!("store code {} already exists", body.code), None),
            _ => e.into(),
        })?;
        let changes = w.commit().await?;
        self.state.publish(changes).await;
        Ok(CreatedResponse::Created(
            RawJson::new(format!("{{\"data\":{doc}}}")),
            format!("/api/v2/stores/{id}"),
        ))
    }

    /// Change a store. Admins may change anything; managers only the status of their stores.
    /// A status change emits `store-status-changed`.
    #[oai(path = "/api/v2/stores/:id", method = "patch")]
    async fn update(
        &self,
        auth: BearerAuth,
        id: Path<i64>,
        body: Json<UpdateStore>,
        /// Change the store only in the state this ETag (from a GET of it)
        /// names; else 412 with the current one. Several lines make one list.
        #[oai(name = "If-Match")]
        _if_match: Header<Option<String>>,
        /// Change the store only if it is in none of the states these ETags
        /// name (`*` names any state: the change is refused); else 412 with
        /// the current one. Several lines make one list.
        #[oai(name = "If-None-Match")]
        _if_none_match: Header<Option<String>>,
        req: &poem::Request,
    ) -> ApiResult<OneResponse> {
        // Read from the request, not the parameters above (which document
        // them): those hold the first line only.
        let conditions = Preconditions::of(req);
        if body.status.is_none() && body.name.is_none() && body.region.is_none() {
            return Err(ApiError::bad_param("body", "give status, name or region"));
        }
        not_blank("name", body.name.as_ref())?;
        not_blank("region", body.region.as_ref())?;
        if !auth.0.is_admin() {
            if !auth.0.can_manage_store(id.0) {
                return Err(ApiError::forbidden(format!(
                    "you may not change store {}",
                    id.0
                )));
            }
            if body.name.is_some() || body.region.is_some() {
                return Err(ApiError::forbidden("only admins change name or region"));
            }
        }
        let mut w = Write::begin(&self.state.pool, auth.0.user_id).await?;
        if conditions.any() {
            // The state the GET answers, locked until the update commits,
            // so that two writers holding the same ETag cannot both pass.
            let doc: Option<String> = sqlx::query_scalar(
                "SELECT sales.store_doc(s)::text FROM sales.stores s WHERE s.id = $1 FOR UPDATE",
            )
            .bind(id.0)
            .fetch_optional(w.conn())
            .await?;
            let doc = doc.ok_or_else(|| ApiError::not_found(format!("no store {}", id.0)))?;
            let current = format!("{{\"data\":{doc}}}");
            conditions.check(&format!("store {}", id.0), current.as_bytes())?;
        }
        let row = sqlx::query(
            "UPDATE sales.stores AS s SET status = coalesce($2, status), name = coalesce($3, name), region = coalesce($4, region)
             WHERE id = $1 RETURNING sales.store_doc(s)::text",
        )
        .bind(id.0)
        .bind(body.status.map(StoreStatus::as_str))
        .bind(body.name.as_deref().map(str::trim))
        .bind(body.region.as_deref().map(str::trim))
        .fetch_optional(w.conn())
        .await?;
        let Some(row) = row else {
            return Err(ApiError::not_found(format!("no store {}", id.0)));
        };
        let changes = w.commit().await?;
        self.state.publish(changes).await;
        Ok(OneResponse::Ok(RawJson::new(format!(
            "{{\"data\":{}}}",
            row.get::<&str, _>(0)
        ))))
    }
}

/// Names and regions are stored trimmed: one of spaces only would be
/// empty, and one of characters that show as nothing (a zero-width space)
/// names nothing a person can read. Invisible characters between visible
/// ones (the joiners of an emoji sequence) are kept. What the schema's
/// pattern refuses is checked here too, for callers of this function that
/// are not the endpoints.
fn not_blank(field: &str, value: Option<&String>) -> ApiResult<()> {
    let Some(v) = value else { return Ok(()) };
    if v.chars().any(crate::http::filters::breaks_text) {
        return Err(ApiError::bad_param(
            field,
            "must not contain control characters, line separators or direction overrides",
        ));
    }
    if crate::http::filters::shows_nothing(v) {
        return Err(ApiError::bad_param(field, "must not be blank"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preconditions_of_a_write() {
        let body = b"{\"data\":{\"id\":1}}";
        let tag = crate::http::middleware::etag_of(body);
        let bare = tag.trim_matches('"');
        let given = |im: Option<&str>, inm: Option<&str>| Preconditions {
            if_match: im.map(str::to_string),
            if_none_match: inm.map(str::to_string),
        };
        let holds = |p: Preconditions| p.check("store 1", body).is_ok();
        assert!(holds(given(None, None)));
        assert!(holds(given(Some(&tag), None)));
        assert!(holds(given(None, Some("\"zz\""))));
        assert!(holds(given(None, Some(""))));
        assert!(!holds(given(None, Some("*"))));
        assert!(!holds(given(None, Some(&tag))));
        assert!(!holds(given(None, Some(&format!("W/{tag}")))));
        assert!(!holds(given(None, Some(&format!("\"zz\", \"{bare}-br\"")))));
        assert!(!holds(given(Some("\"zz\""), Some("\"yy\""))));
        assert!(!holds(given(Some(&tag), Some("*"))));
        let e = given(None, Some("*")).check("store 1", body).unwrap_err();
        assert_eq!(e.status(), 412);
    }
}
