//! The live dashboard: static files from `dashboard/`, embedded in the binary
//! so the server needs nothing beside itself (and the page works offline).
//! `/` is the page, `/assets/<file>` its script and stylesheet.
//!
//! `/` cannot be a plain route: the API is nested at `/`, and poem's router
//! prefers a nest's catch-all over an exact `/` route, so [`with_index`] wraps
//! the routes and answers `GET /` itself.

use poem::http::{header, Method, StatusCode};
use poem::web::Path;
use poem::{handler, Endpoint, IntoResponse, Request, Response};
use std::sync::Arc;

pub const INDEX_HTML: &str = include_str!("../../../dashboard/index.html");
pub const APP_JS: &str = include_str!("../../../dashboard/app.js");
pub const STYLES_CSS: &str = include_str!("../../../dashboard/styles.css");

/// The embedded asset called `name`, with its content type.
pub fn asset(name: &str) -> Option<(&'static str, &'static str)> {
    match name {
        "app.js" => Some((APP_JS, "text/javascript; charset=utf-8")),
        "styles.css" => Some((STYLES_CSS, "text/css; charset=utf-8")),
        _ => None,
    }
}

fn page(body: &'static str, content_type: &'static str) -> Response {
    Response::builder()
        .content_type(content_type)
        // Revalidate every time (cheap: the ETag layer answers 304), so a new
        // server version is picked up on the next load.
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
}

/// The dashboard page.
pub fn index() -> Response {
    page(INDEX_HTML, "text/html; charset=utf-8")
}

/// Answers `GET /` (and `HEAD /`) with the page; everything else goes on to `ep`.
pub async fn with_index<E: Endpoint>(ep: Arc<E>, req: Request) -> poem::Result<Response> {
    if req.uri().path() == "/" && (req.method() == Method::GET || req.method() == Method::HEAD) {
        return Ok(index());
    }
    ep.call(req).await.map(IntoResponse::into_response)
}

/// `GET /assets/:file`: the page's script and stylesheet.
#[handler]
pub fn assets(Path(file): Path<String>) -> poem::Result<Response> {
    match asset(&file) {
        Some((body, ct)) => Ok(page(body, ct)),
        None => Err(poem::Error::from_string(
            format!("no asset {file:?}"),
            StatusCode::NOT_FOUND,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_are_embedded() {
        assert!(INDEX_HTML.contains("/assets/app.js"));
        assert!(INDEX_HTML.contains("/assets/styles.css"));
        assert!(asset("app.js").unwrap().1.starts_with("text/javascript"));
        assert!(asset("styles.css").unwrap().1.starts_with("text/css"));
        assert!(asset("../Cargo.toml").is_none());
    }
}
