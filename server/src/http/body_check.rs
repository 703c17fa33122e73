//! What exactly is wrong with a JSON body or a query value the typed
//! extractors refused, read against the operation's schema in the OpenAPI
//! document. poem-openapi's own refusal of an object names its type but not
//! the field (`Expected input type "string", found null. (occurred while
//! parsing "CreateStore")`), and an enum's names none of its values; this
//! finds the first field that breaks the schema and says why, in the words
//! the rest of the API uses (`code: required`, `role: must be one of admin,
//! manager, staff`). It runs only after a refusal, on the body already read.

use serde_json::{Map, Value};

/// Schemas nest this deep at most before the walk gives up (a `$ref` cycle
/// or a body nested past any schema).
const MAX_DEPTH: usize = 64;

/// The first place `body` breaks `schema` (a schema of the document, whose
/// `$ref`s point into `defs`): the field's path (`salesDataArray`,
/// `stores[2]`; `body` for the whole) and the reason. None when the body is
/// valid JSON that meets every rule checked here.
pub fn body_problem(
    body: &[u8],
    schema: &Value,
    defs: &Map<String, Value>,
) -> Option<(String, String)> {
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Some(("body".into(), format!("is not valid JSON: {e}"))),
    };
    // A rule the body breaks first; then a key given twice (which the
    // typed parse refuses for a batch's own members).
    check(&value, schema, defs, "", 0).or_else(|| {
        sales_core::json::repeated_key(body).map(|path| (path, sales_core::json::REPEATED.into()))
    })
}

/// The values an enum schema (directly, through `$ref` or `allOf`) allows.
pub fn enum_values(schema: &Value, defs: &Map<String, Value>) -> Option<Vec<String>> {
    enum_of(schema, defs, 0)
}

fn enum_of(s: &Value, defs: &Map<String, Value>, depth: usize) -> Option<Vec<String>> {
    if depth > MAX_DEPTH {
        return None;
    }
    if let Some(target) = resolve(s, defs) {
        return enum_of(target, defs, depth + 1);
    }
    if let Some(values) = s.get("enum").and_then(Value::as_array) {
        return Some(values.iter().map(shown).collect());
    }
    s.get("allOf")
        .and_then(Value::as_array)?
        .iter()
        .find_map(|sub| enum_of(sub, defs, depth + 1))
}

fn resolve<'a>(s: &Value, defs: &'a Map<String, Value>) -> Option<&'a Value> {
    let r = s.get("$ref")?.as_str()?;
    defs.get(r.strip_prefix("#/components/schemas/")?)
}

fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn field(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn named(path: &str) -> String {
    if path.is_empty() {
        "body".to_string()
    } else {
        path.to_string()
    }
}

/// A key of `obj` that the closed object schema `s` does not know and that
/// reads as `name` misspelt: the same letters in another case or with
/// separators (`sales_data_array`), or at most two edits away (`regoin`).
fn misspelling_of<'a>(name: &str, obj: &'a Map<String, Value>, s: &Value) -> Option<&'a str> {
    if s.get("additionalProperties") != Some(&Value::Bool(false)) {
        return None;
    }
    let props = s.get("properties").and_then(Value::as_object);
    let squash = |k: &str| -> String {
        k.chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .collect()
    };
    let wanted = squash(name);
    obj.keys()
        .filter(|k| !props.is_some_and(|p| p.contains_key(*k)))
        .find(|k| {
            let k = squash(k);
            k == wanted || (wanted.len() > 3 && strsim::osa_distance(&k, &wanted) <= 2)
        })
        .map(String::as_str)
}

fn check(
    v: &Value,
    s: &Value,
    defs: &Map<String, Value>,
    path: &str,
    depth: usize,
) -> Option<(String, String)> {
    if depth > MAX_DEPTH {
        return None;
    }
    if let Some(target) = resolve(s, defs) {
        return check(v, target, defs, path, depth + 1);
    }
    if v.is_null() {
        // An optional field may be null; a required one was reported by its
        // object as required.
        return if s.get("nullable") == Some(&Value::Bool(true)) {
            None
        } else {
            Some((named(path), "must not be null".into()))
        };
    }
    if let Some(all) = s.get("allOf").and_then(Value::as_array) {
        for sub in all {
            if let Some(p) = check(v, sub, defs, path, depth + 1) {
                return Some(p);
            }
        }
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(alts) = s.get(key).and_then(Value::as_array) {
            if !alts.is_empty()
                && alts
                    .iter()
                    .all(|a| check(v, a, defs, path, depth + 1).is_some())
            {
                return Some((
                    named(path),
                    "matches none of the shapes this field takes".into(),
                ));
            }
        }
    }
    if let Some(values) = s.get("enum").and_then(Value::as_array) {
        if !values.contains(v) {
            let allowed: Vec<String> = values.iter().map(shown).collect();
            return Some((
                named(path),
                format!("must be one of {}", allowed.join(", ")),
            ));
        }
    }
    match s.get("type").and_then(Value::as_str) {
        Some("object") => {
            let Some(obj) = v.as_object() else {
                return Some((named(path), "must be an object".into()));
            };
            for name in s
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(name) = name.as_str() else { continue };
                if obj.get(name).is_none_or(Value::is_null) {
                    // A member this closed object does not know, given
                    // instead (`sales_data_array`, `regoin`): named as
                    // what it most likely is.
                    if let Some(k) = misspelling_of(name, obj, s) {
                        return Some((
                            field(path, k),
                            format!("unknown field; did you mean {name} (required)?"),
                        ));
                    }
                    return Some((field(path, name), "required".into()));
                }
            }
            let props = s.get("properties").and_then(Value::as_object);
            for (name, ps) in props.into_iter().flatten() {
                if let Some(x) = obj.get(name) {
                    if let Some(p) = check(x, ps, defs, &field(path, name), depth + 1) {
                        return Some(p);
                    }
                }
            }
            match s.get("additionalProperties") {
                Some(Value::Bool(false)) => {
                    let known = |k: &String| props.is_some_and(|p| p.contains_key(k));
                    if let Some(k) = obj.keys().find(|k| !known(k)) {
                        let mut allowed: Vec<&str> = props
                            .into_iter()
                            .flatten()
                            .map(|(k, _)| k.as_str())
                            .collect();
                        allowed.sort_unstable();
                        return Some((
                            field(path, k),
                            format!("unknown field; allowed: {}", allowed.join(", ")),
                        ));
                    }
                }
                Some(extra @ Value::Object(_)) => {
                    for (k, x) in obj {
                        if props.is_some_and(|p| p.contains_key(k)) {
                            continue;
                        }
                        if let Some(p) = check(x, extra, defs, &field(path, k), depth + 1) {
                            return Some(p);
                        }
                    }
                }
                _ => {}
            }
            None
        }
        Some("array") => {
            let Some(items) = v.as_array() else {
                return Some((named(path), "must be an array".into()));
            };
            if let Some(n) = s.get("minItems").and_then(Value::as_u64) {
                if (items.len() as u64) < n {
                    return Some((named(path), format!("must hold at least {n} items")));
                }
            }
            if let Some(n) = s.get("maxItems").and_then(Value::as_u64) {
                if items.len() as u64 > n {
                    return Some((named(path), format!("must hold at most {n} items")));
                }
            }
            let each = s.get("items")?;
            items.iter().enumerate().find_map(|(i, x)| {
                check(x, each, defs, &format!("{}[{i}]", named(path)), depth + 1)
            })
        }
        Some("string") => {
            let Some(text) = v.as_str() else {
                return Some((named(path), "must be a string".into()));
            };
            let chars = text.chars().count() as u64;
            if let Some(n) = s.get("minLength").and_then(Value::as_u64) {
                if chars < n {
                    return Some((named(path), format!("must be at least {n} characters")));
                }
            }
            if let Some(n) = s.get("maxLength").and_then(Value::as_u64) {
                if chars > n {
                    return Some((named(path), format!("must be at most {n} characters")));
                }
            }
            if let Some(p) = s.get("pattern").and_then(Value::as_str) {
                if regex::Regex::new(p).is_ok_and(|re| !re.is_match(text)) {
                    return Some((named(path), format!("must match {p}")));
                }
            }
            match s.get("format").and_then(Value::as_str) {
                Some("date-time") if chrono::DateTime::parse_from_rfc3339(text).is_err() => Some((
                    named(path),
                    "must be a date and time (RFC 3339, e.g. 2026-01-31T12:00:00Z)".into(),
                )),
                Some("date") if chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").is_err() => {
                    Some((named(path), "must be a date (YYYY-MM-DD)".into()))
                }
                _ => None,
            }
        }
        Some("integer") => {
            let whole = match s.get("format").and_then(Value::as_str) {
                Some("int32") => v.as_i64().is_some_and(|n| i32::try_from(n).is_ok()),
                Some("uint64") => v.as_u64().is_some(),
                Some("uint32") => v.as_u64().is_some_and(|n| u32::try_from(n).is_ok()),
                _ => v.as_i64().is_some(),
            };
            if !whole {
                return Some((
                    named(path),
                    if v.is_number() {
                        "must be a whole number in range".into()
                    } else {
                        "must be a whole number".into()
                    },
                ));
            }
            bounds(v, s, path)
        }
        Some("number") => {
            if !v.is_number() {
                return Some((named(path), "must be a number".into()));
            }
            bounds(v, s, path)
        }
        Some("boolean") if !v.is_boolean() => Some((named(path), "must be true or false".into())),
        _ => None,
    }
}

/// `minimum` / `maximum`, with OpenAPI 3.0's boolean `exclusiveMinimum` /
/// `exclusiveMaximum`.
fn bounds(v: &Value, s: &Value, path: &str) -> Option<(String, String)> {
    let x = v.as_f64()?;
    let excl = |k: &str| s.get(k) == Some(&Value::Bool(true));
    if let Some(min) = s.get("minimum") {
        let m = min.as_f64()?;
        if x < m || (excl("exclusiveMinimum") && x == m) {
            let word = if excl("exclusiveMinimum") {
                "more than"
            } else {
                "at least"
            };
            return Some((named(path), format!("must be {word} {}", number(min))));
        }
    }
    if let Some(max) = s.get("maximum") {
        let m = max.as_f64()?;
        if x > m || (excl("exclusiveMaximum") && x == m) {
            let word = if excl("exclusiveMaximum") {
                "less than"
            } else {
                "at most"
            };
            return Some((named(path), format!("must be {word} {}", number(max))));
        }
    }
    None
}

/// A bound as written for people: the document spells `2000` as `2000.0`.
fn number(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{}", x as i64),
        _ => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn defs() -> Map<String, Value> {
        json!({
            "Role": {"type": "string", "enum": ["admin", "manager", "staff"]},
            "Status": {"type": "string", "enum": ["open", "closed"]},
            "User": {
                "type": "object",
                "required": ["email", "role"],
                "properties": {
                    "email": {"type": "string", "minLength": 3, "maxLength": 10},
                    "role": {"$ref": "#/components/schemas/Role"},
                    "stores": {"type": "array", "items": {"type": "integer", "format": "int64", "minimum": 1}, "maxItems": 3, "nullable": true},
                    "status": {"allOf": [{"$ref": "#/components/schemas/Status"}], "nullable": true},
                    "code": {"type": "string", "pattern": "^[a-z]{1,4}$"},
                    "size": {"type": "integer", "format": "int32"},
                    "ratio": {"type": "number", "minimum": 0, "exclusiveMinimum": true},
                    "year": {"type": "integer", "format": "int32", "minimum": 2000.0, "maximum": 2100.0},
                    "on": {"type": "boolean"},
                    "at": {"type": "string", "format": "date-time"}
                }
            },
            "Strict": {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": false}
        })
        .as_object()
        .unwrap()
        .clone()
    }

    fn problem(body: &str, schema: &str) -> Option<String> {
        let s = json!({"$ref": format!("#/components/schemas/{schema}")});
        body_problem(body.as_bytes(), &s, &defs()).map(|(p, r)| format!("{p}: {r}"))
    }

    #[test]
    fn names_the_field_and_the_rule() {
        let p = |b| problem(b, "User");
        assert_eq!(
            p(r#"{"role": "admin"}"#).as_deref(),
            Some("email: required")
        );
        assert_eq!(
            p(r#"{"email": null, "role": "admin"}"#).as_deref(),
            Some("email: required")
        );
        assert_eq!(p(r#"{"email": "abc"}"#).as_deref(), Some("role: required"));
        assert_eq!(
            p(r#"{"email": "abc", "role": "king"}"#).as_deref(),
            Some("role: must be one of admin, manager, staff")
        );
        assert_eq!(
            p(r#"{"email": "ab", "role": "staff"}"#).as_deref(),
            Some("email: must be at least 3 characters")
        );
        assert_eq!(
            p(r#"{"email": "ééééééééééé", "role": "staff"}"#).as_deref(),
            Some("email: must be at most 10 characters")
        );
        assert_eq!(
            p(r#"{"email": "ééééééééé", "role": "staff"}"#),
            None,
            "counted in characters"
        );
        assert_eq!(
            p(r#"{"email": "abc", "role": "staff", "stores": [1, "2"]}"#).as_deref(),
            Some("stores[1]: must be a whole number")
        );
        assert_eq!(
            p(r#"{"email": "abc", "role": "staff", "stores": [1, 0]}"#).as_deref(),
            Some("stores[1]: must be at least 1")
        );
        assert_eq!(
            p(r#"{"email": "abc", "role": "staff", "stores": [1, 2, 3, 4]}"#).as_deref(),
            Some("stores: must hold at most 3 items")
        );
        assert_eq!(
            p(r#"{"email": "abc", "role": "staff", "stores": null}"#),
            None
        );
        assert_eq!(
            p(r#"{"email": "abc", "role": "staff", "status": "ajar"}"#).as_deref(),
            Some("status: must be one of open, closed")
        );
        assert_eq!(
            p(r#"{"email": "abc", "role": "staff", "status": null}"#),
            None
        );
        assert_eq!(
            p(r#"{"email": "abc", "role": "staff", "code": "ABC"}"#).as_deref(),
            Some("code: must match ^[a-z]{1,4}$")
        );
        assert_eq!(
            p(r#"{"email": "abc", "role": "staff", "size": 3000000000}"#).as_deref(),
            Some("size: must be a whole number in range")
        );
        assert_eq!(
            p(r#"{"email": "abc", "role": "staff", "size": 1.5}"#).as_deref(),
            Some("size: must be a whole number in range")
        );
        assert_eq!(
            p(r#"{"email": "abc", "role": "staff", "ratio": 0}"#).as_deref(),
            Some("ratio: must be more than 0")
        );
        assert_eq!(
            p(r#"{"email": "abc", "role": "staff", "year": 1999}"#).as_deref(),
            Some("year: must be at least 2000")
        );
        assert_eq!(
            p(r#"{"email": "abc", "role": "staff", "on": "yes"}"#).as_deref(),
            Some("on: must be true or false")
        );
        assert_eq!(
            p(r#"{"email": "abc", "role": "staff", "at": "yesterday"}"#).as_deref(),
            Some("at: must be a date and time (RFC 3339, e.g. 2026-01-31T12:00:00Z)")
        );
        assert_eq!(p(r#"[1]"#).as_deref(), Some("body: must be an object"));
        assert!(p(r#"{"email": "#)
            .unwrap()
            .starts_with("body: is not valid JSON: "));
        assert_eq!(
            p(r#"{"email": "abc", "role": "staff", "size": 7, "at": "2026-01-31T12:00:00Z"}"#),
            None
        );
    }

    #[test]
    fn unknown_fields_where_the_schema_closes_the_object() {
        assert_eq!(
            problem(r#"{"a": 1, "b": 2}"#, "Strict").as_deref(),
            Some("b: unknown field; allowed: a")
        );
        assert_eq!(problem(r#"{"a": 1}"#, "Strict"), None);
    }

    #[test]
    fn a_misspelt_required_member_is_named_as_such() {
        let defs = json!({
            "Req": {
                "type": "object",
                "additionalProperties": false,
                "required": ["salesDataArray", "region"],
                "properties": {
                    "salesDataArray": {"type": "array"},
                    "region": {"type": "string"},
                    "mode": {"type": "string"},
                },
            },
        });
        let defs = defs.as_object().unwrap();
        let p = |body: &str| {
            body_problem(
                body.as_bytes(),
                &json!({"$ref": "#/components/schemas/Req"}),
                defs,
            )
            .map(|(f, why)| format!("{f}: {why}"))
        };
        assert_eq!(
            p(r#"{"sales_data_array": [], "region": "N"}"#).as_deref(),
            Some("sales_data_array: unknown field; did you mean salesDataArray (required)?")
        );
        assert_eq!(
            p(r#"{"salesDataArray": [], "regoin": "N"}"#).as_deref(),
            Some("regoin: unknown field; did you mean region (required)?")
        );
        // Nothing like it given: the required member is named.
        assert_eq!(
            p(r#"{"salesDataArray": [], "colour": "N"}"#).as_deref(),
            Some("region: required")
        );
        // A known member is never taken for a misspelling.
        assert_eq!(
            p(r#"{"salesDataArray": [], "mode": "N"}"#).as_deref(),
            Some("region: required")
        );
    }

    #[test]
    fn enum_values_through_refs() {
        let s = json!({"allOf": [{"$ref": "#/components/schemas/Status"}], "nullable": true});
        assert_eq!(
            enum_values(&s, &defs()),
            Some(vec!["open".into(), "closed".into()])
        );
        assert_eq!(enum_values(&json!({"type": "string"}), &defs()), None);
    }
}
