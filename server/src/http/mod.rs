//! HTTP surface: the OpenAPI-described endpoints and the routes around them.

// ApiError variants carry the whole JSON error body so that poem-openapi can
// document each status; they are built once per failed request, so their
// size costs nothing that boxing would save.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod body_check;
pub mod cached;
pub mod compress;
pub mod dashboard;
pub mod error;
pub mod export;
pub mod filters;
pub mod health;
pub mod imports;
pub mod login;
pub mod middleware;
pub mod outside;
pub mod raw;
pub mod routes;
pub mod sales;
pub mod security;
pub mod slots;
pub mod stores;
pub mod users;
pub mod websocket;

use crate::state::AppState;
use poem::middleware::Cors;
use poem::{EndpointExt, Route};
use poem_openapi::{OpenApiService, Tags};
use std::sync::Arc;

#[derive(Tags)]
pub enum ApiTags {
    /// Liveness, readiness and dependency state.
    Health,
    /// Log in, refresh and end sessions; one's own account.
    Auth,
    /// Monthly sales per store: read, write, summarise.
    Sales,
    /// Stores and their status.
    Stores,
    /// Announcements, notifications, maintenance (admin only).
    Admin,
    /// File imports and background jobs (asynchronous batches too).
    Imports,
    /// User management (admins; managers for the staff of their stores).
    Users,
}

pub type Apis = (
    health::HealthApi,
    login::LoginApi,
    sales::SalesApi,
    export::ExportApi,
    stores::StoresApi,
    admin::AdminApi,
    imports::ImportsApi,
    users::UsersApi,
);

fn apis(state: Arc<AppState>) -> Apis {
    (
        health::HealthApi::new(state.clone()),
        login::LoginApi::new(state.clone()),
        sales::SalesApi {
            state: state.clone(),
        },
        export::ExportApi::new(state.clone()),
        stores::StoresApi {
            state: state.clone(),
        },
        admin::AdminApi {
            state: state.clone(),
        },
        imports::ImportsApi::new(state.clone()),
        users::UsersApi { state },
    )
}

const DESCRIPTION: &str = "Store sales: batch writes, projected reads, exports and live events, backed by the pg_sales Postgres extension. \
     Every error has the shape {\"error\": {\"code\", \"message\", \"details\", \"requestId\"}}. \
     Requests are rate limited per IP, and per user once their token verifies (429 with Retry-After); \
     bodies are limited to BODY_LIMIT bytes (413), query parameters an operation does not declare are 400.";

/// The routed OpenAPI service.
pub fn api_service(state: Arc<AppState>) -> OpenApiService<Apis, ()> {
    OpenApiService::new(apis(state), "pg_sales API", crate::VERSION).description(DESCRIPTION)
}

/// The document: the routed operations plus the routes served beside them.
pub fn documented_service(state: Arc<AppState>) -> OpenApiService<(Apis, outside::OutsideApi), ()> {
    OpenApiService::new(
        (apis(state), outside::OutsideApi),
        "pg_sales API",
        crate::VERSION,
    )
    .description(DESCRIPTION)
}

/// Prometheus text format.
#[poem::handler]
async fn metrics_endpoint(
    req: &poem::Request,
    state: poem::web::Data<&Arc<AppState>>,
) -> poem::Response {
    // With METRICS_TOKEN set, only a scraper bearing it gets the figures
    // (backend pids, transaction ages, connection counts).
    if let Some(want) = &state.config.metrics_token {
        use sha2::Digest;
        let given = req
            .header(poem::http::header::AUTHORIZATION)
            .and_then(crate::auth::bearer)
            .unwrap_or_default();
        // Compared by digest, so the time taken says nothing of the token.
        if sha2::Sha256::digest(given.as_bytes()) != sha2::Sha256::digest(want.as_bytes()) {
            return error::ErrorBody::response(
                poem::http::StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send Authorization: Bearer <METRICS_TOKEN>",
                None,
            );
        }
    }
    poem::Response::builder()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(crate::metrics::render(&state).await)
}

/// The OpenAPI document, as served at `/openapi.json`.
pub fn openapi_json(state: Arc<AppState>) -> String {
    finish_spec(&documented_service(state).spec())
}

/// Three facts poem-openapi leaves out of the generated document:
/// * an `Option` member is sent as `null` when absent (and accepted as
///   `null`), so every member that is not required is `nullable`;
/// * every operation that takes a body answers 415 to a body that is not
///   JSON (poem-openapi's own check, before the handler);
/// * a JSON request body's objects take no members but their own
///   (`additionalProperties: false`): each is parsed with
///   `deny_unknown_fields`, so a misspelt member (`atomc`, `regoin`) is a
///   400 naming it rather than a request that silently does something else.
pub fn finish_spec(raw: &str) -> String {
    use serde_json::{json, Value};
    let Ok(mut doc) = serde_json::from_str::<Value>(raw) else {
        return raw.to_string();
    };
    let closed = request_body_objects(&doc);
    if let Some(schemas) = doc["components"]["schemas"].as_object_mut() {
        for name in &closed {
            if let Some(o) = schemas.get_mut(name).and_then(Value::as_object_mut) {
                if o.get("type") == Some(&json!("object")) && o.contains_key("properties") {
                    o.entry("additionalProperties")
                        .or_insert(Value::Bool(false));
                }
            }
        }
    }
    if let Some(schemas) = doc["components"]["schemas"].as_object_mut() {
        for schema in schemas.values_mut() {
            let required: Vec<String> = schema["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
                continue;
            };
            for (name, prop) in props.iter_mut() {
                if required.contains(name) {
                    continue;
                }
                if let Some(r) = prop.get("$ref").cloned() {
                    // OpenAPI 3.0 ignores siblings of `$ref`.
                    let mut wrapped = json!({"allOf": [{"$ref": r}], "nullable": true});
                    if let Some(d) = prop.get("description") {
                        wrapped["description"] = d.clone();
                    }
                    *prop = wrapped;
                } else if let Some(o) = prop.as_object_mut() {
                    o.insert("nullable".into(), Value::Bool(true));
                }
            }
        }
    }
    if let Some(paths) = doc["paths"].as_object_mut() {
        for ops in paths.values_mut().filter_map(Value::as_object_mut) {
            for op in ops.values_mut() {
                let Some(content) = op
                    .get_mut("requestBody")
                    .and_then(|b| b.get_mut("content"))
                    .and_then(Value::as_object_mut)
                else {
                    continue;
                };
                // Every media type an upload is taken in, beside the one
                // its payload type names.
                for family in [&imports::CSV_TYPES, &imports::NDJSON_TYPES] {
                    if let Some(first) = content.get(family[0]).cloned() {
                        for other in &family[1..] {
                            content
                                .entry(other.to_string())
                                .or_insert_with(|| first.clone());
                        }
                    }
                }
                // Without parameters: `application/json` is taken with or
                // without `; charset=utf-8`.
                let mut media: Vec<String> = Vec::new();
                for m in content.keys() {
                    let bare = format!("`{}`", m.split(';').next().unwrap_or(m).trim());
                    if !media.contains(&bare) {
                        media.push(bare);
                    }
                }
                let described = format!("The body's media type is not {}.", or_list(&media));
                if let Some(responses) = op["responses"].as_object_mut() {
                    responses
                        .entry("415")
                        .or_insert_with(|| error_response(&described));
                }
            }
        }
    }
    outside_statuses(&mut doc);
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| raw.to_string())
}

/// Statuses given before or after an operation's handler, by the layers
/// every request passes through (see `middleware`), listed on the
/// operations they reach:
/// * 501 to a request with a transfer coding other than `chunked`;
/// * 415 to a request with a body-bearing method whose Content-Type names
///   a charset other than UTF-8, or that has a Content-Encoding;
/// * 304 and 412 to a GET whose `If-None-Match` / `If-Match` names (or
///   fails to name) the body's ETag: every GET answered 200 with a
///   buffered body, so every one but the export (streamed) and `/ws`;
/// * 400 to a query parameter an operation does not declare, also on the
///   health checks and `/metrics`, and 401 on `/metrics` when
///   `METRICS_TOKEN` is set and not given;
/// * 413 to a body past `BODY_LIMIT`, on any method (the API's operations
///   list it already), and 403 to an `Origin` that `CORS_ORIGINS` does not
///   list (likewise), on the routes beside the API.
fn outside_statuses(doc: &mut serde_json::Value) {
    use serde_json::json;
    let error = error_response;
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, ops) in paths.iter_mut() {
        let Some(ops) = ops.as_object_mut() else {
            continue;
        };
        for (method, op) in ops.iter_mut() {
            let Some(responses) = op["responses"].as_object_mut() else {
                continue;
            };
            responses.entry("501").or_insert_with(|| {
                error(
                    "The request has a transfer coding other than `chunked` \
                     (`Transfer-Encoding: gzip, chunked`): the server does not undo it.",
                )
            });
            let get = method == "get";
            const CODED: &str = "The request declares a charset other than UTF-8, or a \
                                 Content-Encoding: bodies are read as sent, in UTF-8.";
            if !get {
                match responses.get_mut("415") {
                    Some(r) => {
                        if let Some(d) = r["description"].as_str() {
                            r["description"] = json!(format!("{d} Or: {CODED}"));
                        }
                    }
                    None => {
                        responses.insert("415".into(), error(CODED));
                    }
                }
            }
            let buffered = get
                && responses.contains_key("200")
                && path != "/api/v2/sales/export"
                && path != "/ws";
            if path == "/api/v2/sales/export" {
                // Streamed: no ETag, so no precondition is judged (the
                // error type every operation shares lists it).
                responses.remove("412");
            }
            if buffered {
                responses.entry("304").or_insert_with(|| {
                    json!({"description": "Not Modified: `If-None-Match` names the \
                        current representation's ETag (a strong tag of the body's \
                        digest and content coding)."})
                });
                responses.entry("412").or_insert_with(|| {
                    error("`If-Match` names no current representation of the resource.")
                });
            }
            let outside_api = path.starts_with("/health") || path == "/metrics";
            if outside_api {
                responses
                    .entry("400")
                    .or_insert_with(|| error("A query parameter the operation does not take."));
                responses
                    .entry("413")
                    .or_insert_with(|| error("The request has a body larger than `BODY_LIMIT`."));
            }
            if outside_api || path == "/ws" {
                responses.entry("403").or_insert_with(|| {
                    error(
                        "`CORS_ORIGINS` is set and the request's `Origin` is neither \
                         listed nor the server's own.",
                    )
                });
            }
            if path == "/metrics" {
                responses.entry("401").or_insert_with(|| {
                    error(
                        "`METRICS_TOKEN` is set and the request does not give it as \
                         `Authorization: Bearer <token>`.",
                    )
                });
            }
        }
    }
}

/// A response of the document answered with the API's error body.
fn error_response(description: &str) -> serde_json::Value {
    serde_json::json!({
        "description": description,
        "content": {"application/json; charset=utf-8": {
            "schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    })
}

/// `a`, `a or b`, `a, b or c`.
fn or_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// The schemas a JSON request body refers to, directly or through
/// another schema's `$ref`.
fn request_body_objects(doc: &serde_json::Value) -> std::collections::BTreeSet<String> {
    use serde_json::Value;
    fn refs(v: &Value, schemas: &Value, found: &mut std::collections::BTreeSet<String>) {
        match v {
            Value::Object(o) => {
                if let Some(name) = o
                    .get("$ref")
                    .and_then(Value::as_str)
                    .and_then(|r| r.strip_prefix("#/components/schemas/"))
                {
                    if found.insert(name.to_string()) {
                        refs(&schemas[name], schemas, found);
                    }
                }
                o.values().for_each(|x| refs(x, schemas, found));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, schemas, found)),
            _ => {}
        }
    }
    let schemas = &doc["components"]["schemas"];
    let mut found = std::collections::BTreeSet::new();
    for op in doc["paths"]
        .as_object()
        .into_iter()
        .flat_map(|p| p.values())
        .filter_map(Value::as_object)
        .flat_map(|ops| ops.values())
    {
        let content = op["requestBody"]["content"].as_object();
        for (media, c) in content.into_iter().flatten() {
            if media.starts_with("application/json") {
                refs(&c["schema"], schemas, &mut found);
            }
        }
    }
    found
}

pub fn app(state: Arc<AppState>) -> poem::endpoint::BoxEndpoint<'static> {
    let api = api_service(state.clone());
    let documented = documented_service(state.clone());
    let spec_json = openapi_json(state.clone());
    let routes_table = Arc::new(routes::Routes::from_spec(&spec_json));
    let spec = poem::endpoint::make_sync(move |_| {
        poem::Response::builder()
            .content_type("application/json; charset=utf-8")
            .body(spec_json.clone())
    });
    let docs = documented.swagger_ui();
    let limits = Arc::new(middleware::RateLimits::from_config(&state.config));
    let hsts = state.config.hsts;
    let mut cors = Cors::new()
        .allow_methods(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
        .allow_headers([
            "authorization",
            "content-type",
            "if-match",
            "if-none-match",
            "x-request-id",
        ])
        .expose_headers([
            "etag",
            "x-request-id",
            "retry-after",
            "content-disposition",
            "x-export-id",
            "x-export-estimated-rows",
            "location",
        ])
        .max_age(600);
    for origin in &state.config.cors_origins {
        cors = cors.allow_origin(origin.as_str());
    }
    let (s1, s2) = (state.clone(), state.clone());
    let routes = Route::new()
        .at("/assets/:file", poem::get(dashboard::assets))
        .at("/openapi.json", poem::get(spec))
        .at("/metrics", poem::get(metrics_endpoint))
        .nest("/docs", docs)
        .at("/ws", websocket::endpoint(state.ws_context()))
        .nest("/", api)
        .around(dashboard::with_index);
    let routes = routes
        .around({
            let table = routes_table.clone();
            move |ep, req| middleware::with_representation(ep, req, s1.clone(), table.clone())
        })
        .around({
            let (limits, table) = (limits.clone(), routes_table.clone());
            move |ep, req| {
                middleware::with_limits(ep, req, s2.clone(), limits.clone(), table.clone())
            }
        });
    // CORS is for other origins: a request from the server's own origin
    // (the dashboard at `/`, its login and its WebSocket) carries `Origin`
    // too, and passes whatever CORS_ORIGINS lists.
    let routes = if state.config.cors_origins.is_empty() {
        routes.boxed()
    } else {
        let plain = Arc::new(routes.boxed());
        plain
            .clone()
            .with(cors)
            .around(move |ep, req| {
                let plain = plain.clone();
                async move {
                    if same_origin(&req) {
                        poem::Endpoint::call(&*plain, req).await
                    } else {
                        // The CORS layer's own answers (a preflight) vary
                        // by origin too, as every answer says. A refusal
                        // (origin, method or header not allowed) is an
                        // error here: answered in the API's shape and
                        // marked like every refusal.
                        let mut r = match poem::Endpoint::call(&*ep, req).await {
                            Ok(r) => poem::IntoResponse::into_response(r),
                            Err(e) => middleware::error_response(e),
                        };
                        middleware::mark(&mut r, true);
                        Ok(r)
                    }
                }
            })
            .boxed()
    };
    routes
        .around(move |ep, req| middleware::with_security_headers(ep, req, hsts))
        .around(move |ep, req| middleware::with_request_id(ep, req, routes_table.clone()))
        .data(state)
        .data(limits)
        .boxed()
}

/// Whether the request's `Origin` is the server's own, as the browser saw
/// it: `http://` or `https://` and the `Host` the request was sent to.
fn same_origin(req: &poem::Request) -> bool {
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &poem::http::HeaderValue| v.to_str().ok())
    };
    let (Some(origin), Some(host)) = (
        header(poem::http::header::ORIGIN),
        header(poem::http::header::HOST),
    ) else {
        return false;
    };
    origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .is_some_and(|o| o.eq_ignore_ascii_case(host))
}
