//! The routes the OpenAPI document declares, read back from it once at
//! start: which query parameters each operation takes (anything else is a
//! 400 naming it, so a parameter the handler ignores cannot slip into a
//! cache key), and a bounded set of route labels for metrics: the
//! document's own templates (`/api/v2/sales/{id}`).

use std::collections::{HashMap, HashSet};

/// Label of every request that matches no route: unknown paths and methods
/// must not each become a metrics series.
pub const UNMATCHED: &str = "unmatched";

struct Route {
    /// The document's template (`/api/v2/sales/{id}`), also the metrics label.
    template: String,
    segments: Vec<Option<String>>,
    /// Method (upper case) -> what it takes.
    methods: HashMap<String, Operation>,
}

struct Operation {
    /// Its query parameters' names.
    params: HashSet<String>,
    /// Each query parameter's schema.
    param_schemas: HashMap<String, serde_json::Value>,
    /// The schema of its JSON body, if it takes one.
    body: Option<serde_json::Value>,
}

pub struct Routes {
    routes: Vec<Route>,
    /// `components.schemas`, which the schemas above refer to.
    schemas: serde_json::Map<String, serde_json::Value>,
}

/// What the table says about one request.
pub enum Match<'a> {
    /// A route and method of the document, with its query parameters.
    Operation(&'a str, &'a HashSet<String>),
    /// A route of the document, but not this method.
    Route(&'a str),
    /// No route of the document.
    None,
}

impl Routes {
    /// Reads the `paths` of an OpenAPI document.
    pub fn from_spec(spec: &str) -> Self {
        let doc: serde_json::Value = serde_json::from_str(spec).unwrap_or_default();
        let mut routes = Vec::new();
        if let Some(paths) = doc["paths"].as_object() {
            for (template, ops) in paths {
                let segments = template
                    .split('/')
                    .map(|s| {
                        if s.starts_with('{') && s.ends_with('}') {
                            None
                        } else {
                            Some(s.to_string())
                        }
                    })
                    .collect();
                let mut methods = HashMap::new();
                for (method, op) in ops.as_object().into_iter().flatten() {
                    let query = || {
                        op["parameters"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter(|p| p["in"] == "query")
                    };
                    let params = query()
                        .filter_map(|p| p["name"].as_str().map(str::to_string))
                        .collect();
                    let param_schemas = query()
                        .filter_map(|p| {
                            Some((p["name"].as_str()?.to_string(), p["schema"].clone()))
                        })
                        .collect();
                    let body = op["requestBody"]["content"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .find(|(mime, _)| mime.starts_with("application/json"))
                        .map(|(_, c)| c["schema"].clone());
                    methods.insert(
                        method.to_ascii_uppercase(),
                        Operation {
                            params,
                            param_schemas,
                            body,
                        },
                    );
                }
                routes.push(Route {
                    template: template.clone(),
                    segments,
                    methods,
                });
            }
        }
        // Literal segments first, so `/api/v2/sales/summary` is not taken for `{id}`.
        routes
            .sort_by_key(|r| std::cmp::Reverse(r.segments.iter().filter(|s| s.is_some()).count()));
        let schemas = doc["components"]["schemas"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        Self { routes, schemas }
    }

    fn operation(&self, method: &str, path: &str) -> Option<&Operation> {
        let m = if method == "HEAD" { "GET" } else { method };
        self.route(path)?.methods.get(m)
    }

    /// The first place a JSON body the operation refused breaks its schema:
    /// the field and why (see [`super::body_check`]).
    pub fn body_problem(&self, method: &str, path: &str, body: &[u8]) -> Option<(String, String)> {
        let schema = self.operation(method, path)?.body.as_ref()?;
        super::body_check::body_problem(body, schema, &self.schemas)
    }

    /// The values a query parameter of an enum type allows.
    pub fn param_values(&self, method: &str, path: &str, param: &str) -> Option<Vec<String>> {
        let schema = self.operation(method, path)?.param_schemas.get(param)?;
        super::body_check::enum_values(schema, &self.schemas)
    }

    /// The route of the document `path` falls under; literal segments win
    /// over parameters (the list is sorted so).
    fn route(&self, path: &str) -> Option<&Route> {
        let segs: Vec<&str> = path.split('/').collect();
        self.routes.iter().find(|r| {
            r.segments.len() == segs.len()
                && r.segments.iter().zip(&segs).all(|(want, got)| match want {
                    Some(w) => w == got,
                    None => !got.is_empty(),
                })
        })
    }

    pub fn find(&self, method: &str, path: &str) -> Match<'_> {
        let Some(r) = self.route(path) else {
            return Match::None;
        };
        let m = if method == "HEAD" { "GET" } else { method };
        match r.methods.get(m) {
            Some(op) => Match::Operation(&r.template, &op.params),
            None => Match::Route(&r.template),
        }
    }

    /// The methods a documented route answers (`Allow`), or None for a path
    /// the document does not list.
    pub fn allowed(&self, path: &str) -> Option<Vec<&str>> {
        let r = self.route(path)?;
        let mut m: Vec<&str> = r.methods.keys().map(String::as_str).collect();
        if m.contains(&"GET") {
            m.push("HEAD");
        }
        m.sort_unstable();
        Some(m)
    }

    /// The methods a route answers, the document's or one served beside it
    /// (GET and HEAD, see [`beside`]), or None for a path the server does
    /// not serve.
    pub fn allowed_any(&self, path: &str) -> Option<Vec<&str>> {
        self.allowed(path)
            .or_else(|| beside(path).map(|_| vec!["GET", "HEAD"]))
    }

    /// A label from a bounded set: a template of the document, one of the
    /// routes served beside it, or [`UNMATCHED`].
    pub fn label<'a>(&'a self, path: &'a str) -> &'a str {
        match self.route(path) {
            Some(r) => &r.template,
            None => beside(path).unwrap_or(UNMATCHED),
        }
    }
}

/// The label of a route served beside the document, the same to every
/// caller (the dashboard, its assets, the API explorer, the document
/// itself; GET and HEAD), when `path` is one.
pub fn beside(path: &str) -> Option<&str> {
    match path {
        "/" | "/index.html" | "/openapi.json" => Some(path),
        p if p == "/docs" || p.starts_with("/docs/") => Some("/docs"),
        p if p.starts_with("/assets/") => Some("/assets/{file}"),
        _ => None,
    }
}

/// Methods outside this set share one label.
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_templates_and_parameters() {
        let spec = r#"{"paths": {
            "/api/v2/sales": {"get": {"parameters": [{"name": "limit", "in": "query"}, {"name": "x", "in": "header"}]}},
            "/api/v2/sales/{id}": {"get": {"parameters": [{"name": "id", "in": "path"}]}, "delete": {}},
            "/api/v2/sales/summary": {"get": {}}
        }}"#;
        let r = Routes::from_spec(spec);
        match r.find("GET", "/api/v2/sales") {
            Match::Operation(t, p) => {
                assert_eq!(t, "/api/v2/sales");
                assert!(p.contains("limit") && !p.contains("x"));
            }
            _ => panic!(),
        }
        assert!(matches!(
            r.find("GET", "/api/v2/sales/summary"),
            Match::Operation("/api/v2/sales/summary", _)
        ));
        assert!(matches!(
            r.find("GET", "/api/v2/sales/7"),
            Match::Operation("/api/v2/sales/{id}", _)
        ));
        assert!(matches!(r.find("POST", "/api/v2/sales/7"), Match::Route(_)));
        assert!(matches!(r.find("GET", "/api/v2/sales//"), Match::None));
        assert_eq!(r.label("/nope/123"), UNMATCHED);
        assert_eq!(r.label("/api/v2/sales/99"), "/api/v2/sales/{id}");
        assert_eq!(r.label("/api/v2/sales/summary"), "/api/v2/sales/summary");
        assert_eq!(r.label("/assets/app.js"), "/assets/{file}");
        assert_eq!(method_label("BREW"), "OTHER");
    }
}
