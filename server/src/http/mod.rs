//! HTTP surface: the OpenAPI-described endpoints and the routes around them.

pub mod health;

use crate::state::AppState;
use poem::{EndpointExt, Route};
use poem_openapi::{OpenApiService, Tags};
use std::sync::Arc;

#[derive(Tags)]
pub enum ApiTags {
    /// Liveness, readiness and dependency state.
    Health,
}

pub type Apis = health::HealthApi;

pub fn api_service(state: Arc<AppState>) -> OpenApiService<Apis, ()> {
    OpenApiService::new(health::HealthApi { state }, "pg_sales API", crate::VERSION)
        .description("Store sales: batch writes, projected reads, exports and live events, backed by the pg_sales Postgres extension.")
}

/// The OpenAPI document, as served at `/openapi.json`.
pub fn openapi_json(state: Arc<AppState>) -> String {
    api_service(state).spec()
}

pub fn app(state: Arc<AppState>) -> poem::endpoint::BoxEndpoint<'static> {
    let api = api_service(state.clone());
    let spec = api.spec_endpoint();
    let docs = api.swagger_ui();
    Route::new()
        .at("/openapi.json", spec)
        .nest("/docs", docs)
        .nest("/", api)
        .boxed()
}
