//! Routes served by plain poem endpoints beside the OpenAPI service
//! (`/ws`, `/metrics`), described here so that
//! the document lists every route. This API is only ever put in the spec;
//! the routes themselves are served by `crate::ws` and `metrics_endpoint`.

use super::error::ErrorBody;
use super::ApiTags;
use poem_openapi::param::Query;
use poem_openapi::payload::{Json, PlainText};
use poem_openapi::{ApiResponse, OpenApi};

pub struct OutsideApi;

#[derive(ApiResponse)]
pub enum WsResponse {
    /// Upgraded: the connection now speaks the event protocol (see README, "WebSocket").
    #[oai(status = 101)]
    SwitchingProtocols,
    /// `Sec-WebSocket-Key` missing, or the connection cannot be upgraded.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// No token, or the token does not verify.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// Not a WebSocket upgrade (or not version 13).
    #[oai(status = 426)]
    UpgradeRequired(Json<ErrorBody>),
    /// Too many upgrades from this address (WS_UPGRADES_PER_MINUTE) or requests (RATE_LIMIT_PER_IP_PER_MINUTE).
    #[oai(status = 429)]
    TooManyRequests(Json<ErrorBody>, #[oai(header = "Retry-After")] u64),
    /// The server is shutting down.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

#[derive(ApiResponse)]
pub enum MetricsResponse {
    /// Prometheus text format 0.0.4.
    #[oai(
        status = 200,
        content_type = "text/plain; version=0.0.4; charset=utf-8"
    )]
    Ok(PlainText<String>),
}

fn not_routed<T>() -> T {
    unreachable!("documentation only; served by its own endpoint")
}

#[OpenApi]
impl OutsideApi {
    /// Live events over WebSocket. The token comes from `?token=`, `Authorization: Bearer`,
    /// or `Sec-WebSocket-Protocol: bearer, <token>`.
    #[oai(path = "/ws", method = "get", tag = "ApiTags::Sales")]
    async fn ws(
        &self,
        /// A JWT, for clients that cannot set headers on the upgrade.
        token: Query<Option<String>>,
    ) -> WsResponse {
        let _ = token;
        not_routed()
    }

    /// Prometheus metrics (request, database, cache, WebSocket and export figures).
    #[oai(path = "/metrics", method = "get", tag = "ApiTags::Health")]
    async fn metrics(&self) -> MetricsResponse {
        not_routed()
    }
}
