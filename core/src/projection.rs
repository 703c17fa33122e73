//! Field projection: `fields` / `exclude` lists of dotted paths checked
//! against a known document shape, then applied to JSON documents.
//!
//! Paths are validated against a fixed schema (never against SQL), so an
//! unknown or hostile name is an error that names it and can never reach a
//! query as text.

use crate::daily::parse_day_key;
use crate::names::to_snake;
use serde_json::{Map, Value};

/// The shape of a document: which paths exist.
#[derive(Debug)]
pub enum Shape {
    /// A value taken whole.
    Leaf,
    /// An object with named members.
    Fields(&'static [(&'static str, Shape)]),
    /// An object keyed by day of month (`"1"`..`"31"`, or `*` for every day).
    Days(&'static Shape),
}

static DAY: Shape = Shape::Fields(&[
    ("sales", Shape::Leaf),
    ("customers", Shape::Leaf),
    ("transactions", Shape::Leaf),
]);

/// A store as it appears in documents.
pub static STORE_DOC: Shape = STORE_SHAPE;

/// A monthly sales document (`sales.sales_doc()`), optionally with its store.
pub static SALES_DOC: Shape = Shape::Fields(&[
    ("id", Shape::Leaf),
    ("storeId", Shape::Leaf),
    ("year", Shape::Leaf),
    ("month", Shape::Leaf),
    ("dailyData", Shape::Days(&DAY)),
    ("totalSales", Shape::Leaf),
    ("totalCustomers", Shape::Leaf),
    ("daysReported", Shape::Leaf),
    ("version", Shape::Leaf),
    ("createdAt", Shape::Leaf),
    ("updatedAt", Shape::Leaf),
    ("store", STORE_SHAPE),
]);

// A const, so that it can be embedded in SALES_DOC and exported as STORE_DOC.
const STORE_SHAPE: Shape = Shape::Fields(&[
    ("id", Shape::Leaf),
    ("code", Shape::Leaf),
    ("name", Shape::Leaf),
    ("region", Shape::Leaf),
    ("status", Shape::Leaf),
    ("version", Shape::Leaf),
    ("createdAt", Shape::Leaf),
    ("updatedAt", Shape::Leaf),
]);

pub const MAX_PATHS: usize = 200;
pub const MAX_PATH_LEN: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionError {
    /// The path as the caller wrote it.
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for ProjectionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "field \"{}\": {}", self.field, self.reason)
        }
    }
}

impl std::error::Error for ProjectionError {}

#[derive(Debug, Default, Clone, PartialEq)]
struct Trie {
    terminal: bool,
    children: Vec<(String, Trie)>,
}

impl Trie {
    fn insert(&mut self, segments: &[String]) {
        if self.terminal {
            return;
        }
        let Some((first, rest)) = segments.split_first() else {
            self.terminal = true;
            self.children.clear();
            return;
        };
        let idx = match self.children.iter().position(|(k, _)| k == first) {
            Some(i) => i,
            None => {
                self.children.push((first.clone(), Trie::default()));
                self.children.len() - 1
            }
        };
        self.children[idx].1.insert(rest);
    }

    fn get(&self, key: &str) -> Option<&Trie> {
        self.children.iter().find(|(k, _)| k == key).map(|(_, t)| t)
    }

    /// The sub-trie that applies to member `key`: its own entry merged with `*`.
    fn child_for(&self, key: &str) -> Option<std::borrow::Cow<'_, Trie>> {
        match (self.get(key), self.get("*")) {
            (Some(a), None) => Some(std::borrow::Cow::Borrowed(a)),
            (None, Some(b)) => Some(std::borrow::Cow::Borrowed(b)),
            (None, None) => None,
            (Some(a), Some(b)) => Some(std::borrow::Cow::Owned(a.merged(b))),
        }
    }

    fn merged(&self, other: &Trie) -> Trie {
        if self.terminal || other.terminal {
            return Trie {
                terminal: true,
                children: vec![],
            };
        }
        let mut out = self.clone();
        for (k, t) in &other.children {
            match out.children.iter_mut().find(|(ok, _)| ok == k) {
                Some((_, existing)) => *existing = existing.merged(t),
                None => out.children.push((k.clone(), t.clone())),
            }
        }
        out
    }
}

/// A checked `fields` / `exclude` pair, ready to apply to many documents.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    include: Option<Trie>,
    exclude: Option<Trie>,
    /// The canonical (camelCase) paths that were asked for, for metadata.
    pub fields: Vec<String>,
    pub excluded: Vec<String>,
}

/// Splits and checks one path against `shape`, returning canonical segments.
pub fn parse_path(shape: &Shape, raw: &str) -> Result<Vec<String>, ProjectionError> {
    let err = |reason: &str| ProjectionError {
        field: raw.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(err("empty field name"));
    }
    if trimmed.len() > MAX_PATH_LEN {
        return Err(err("field path is too long"));
    }
    let mut out = Vec::new();
    let mut shape = shape;
    for seg in trimmed.split('.') {
        if seg.is_empty()
            || !seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'*')
        {
            return Err(err("unknown field"));
        }
        match shape {
            Shape::Leaf => return Err(err("unknown field (path goes below a plain value)")),
            Shape::Fields(members) => {
                // Exactly the camelCase name or its snake_case form: `storeId`
                // or `store_id`, not `store__id`, `_storeid` or `STOREID`.
                let Some((canonical, next)) = members
                    .iter()
                    .find(|(m, _)| *m == seg || to_snake(m) == seg)
                else {
                    return Err(err("unknown field"));
                };
                out.push((*canonical).to_string());
                shape = next;
            }
            Shape::Days(day) => {
                if seg != "*" && !matches!(parse_day_key(seg), Some(1..=31)) {
                    return Err(err("unknown field (day must be 1..31 or *)"));
                }
                out.push(seg.to_string());
                shape = day;
            }
        }
    }
    Ok(out)
}

impl Projection {
    /// Checks `fields` and `exclude` against `shape`. Empty `fields` means all.
    pub fn new<S: AsRef<str>>(
        shape: &Shape,
        fields: &[S],
        exclude: &[S],
    ) -> Result<Self, ProjectionError> {
        if fields.len() + exclude.len() > MAX_PATHS {
            return Err(ProjectionError {
                field: String::new(),
                reason: format!("at most {MAX_PATHS} fields may be given"),
            });
        }
        let build = |list: &[S]| -> Result<(Option<Trie>, Vec<String>), ProjectionError> {
            if list.is_empty() {
                return Ok((None, vec![]));
            }
            let mut trie = Trie::default();
            let mut names = Vec::new();
            for f in list {
                let segs = parse_path(shape, f.as_ref())?;
                let name = segs.join(".");
                // One path named twice (in any spelling) is refused, as a
                // sort key given twice is: the list is echoed as given.
                if names.contains(&name) {
                    return Err(ProjectionError {
                        field: name,
                        reason: "given twice".into(),
                    });
                }
                names.push(name);
                trie.insert(&segs);
            }
            Ok((Some(trie), names))
        };
        let (include, fields) = build(fields)?;
        let (exclude, excluded) = build(exclude)?;
        Ok(Self {
            include,
            exclude,
            fields,
            excluded,
        })
    }

    /// Whether the asked-for fields include the store (`store` or
    /// `store.*`): only then does a sales document need the stores join.
    /// `storeId` is a member of the sales row itself.
    pub fn needs_store(&self) -> bool {
        self.fields
            .iter()
            .any(|f| f == "store" || f.starts_with("store."))
    }

    /// True when the projection leaves documents as they are.
    pub fn is_identity(&self) -> bool {
        self.include.is_none() && self.exclude.is_none()
    }

    /// Applies `fields` then `exclude` to one document.
    pub fn apply(&self, doc: &Value) -> Value {
        let mut out = match &self.include {
            Some(t) => include(doc, t),
            None => doc.clone(),
        };
        if let Some(t) = &self.exclude {
            exclude(&mut out, t);
        }
        out
    }
}

/// What a projection does with one member of an object (see [`Step`]).
pub enum Keep<'p> {
    Drop,
    /// The member's value as it is.
    Whole,
    /// The parts of the member's value that this step picks, when the value
    /// is an object; anything else is kept whole.
    Part(Step<'p>),
}

/// A place in a document, as a projection sees it: what is still to be
/// included below it (None: everything) and excluded (None: nothing). For
/// readers that walk a document member by member instead of building a
/// [`Value`] (the extension projects jsonb in place); the result is what
/// [`Projection::apply`] gives.
#[derive(Clone)]
pub struct Step<'p> {
    include: Option<std::borrow::Cow<'p, Trie>>,
    exclude: Option<std::borrow::Cow<'p, Trie>>,
}

impl Projection {
    /// The step at the top of a document. `Keep::Whole` for every member
    /// when the projection is the identity.
    pub fn step(&self) -> Step<'_> {
        Step {
            include: self.include.as_ref().map(std::borrow::Cow::Borrowed),
            exclude: self.exclude.as_ref().map(std::borrow::Cow::Borrowed),
        }
    }
}

impl Step<'_> {
    /// What becomes of member `key` of the object at this step: `fields`
    /// first (a member they do not name is dropped, one they name whole is
    /// kept whole), then `exclude` (a member it names whole is dropped).
    pub fn member(&self, key: &str) -> Keep<'_> {
        let include = match &self.include {
            None => None,
            Some(t) => match t.child_for(key) {
                None => return Keep::Drop,
                Some(c) if c.terminal => None,
                Some(c) => Some(c),
            },
        };
        let exclude = match &self.exclude {
            None => None,
            Some(t) => match t.child_for(key) {
                Some(c) if c.terminal => return Keep::Drop,
                other => other,
            },
        };
        match (include, exclude) {
            (None, None) => Keep::Whole,
            (include, exclude) => Keep::Part(Step { include, exclude }),
        }
    }
}

fn include(v: &Value, t: &Trie) -> Value {
    if t.terminal {
        return v.clone();
    }
    match v {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, mv) in m {
                if let Some(child) = t.child_for(k) {
                    out.insert(k.clone(), include(mv, &child));
                }
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

fn exclude(v: &mut Value, t: &Trie) {
    let Value::Object(m) = v else { return };
    let keys: Vec<String> = m.keys().cloned().collect();
    for k in keys {
        if let Some(child) = t.child_for(&k) {
            if child.terminal {
                m.remove(&k);
            } else if let Some(mv) = m.get_mut(&k) {
                exclude(mv, &child);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> Value {
        json!({
            "id": 1, "storeId": 7, "year": 2024, "month": 1,
            "dailyData": {"1": {"sales": 10, "customers": 2}, "2": {"sales": 20, "customers": 3}},
            "totalSales": 30, "version": 1,
            "store": {"id": 7, "name": "Main St", "region": "North"}
        })
    }

    fn p(fields: &[&str], exclude: &[&str]) -> Result<Projection, ProjectionError> {
        Projection::new(&SALES_DOC, fields, exclude)
    }

    #[test]
    fn top_level_and_snake_case() {
        let out = p(&["id", "store_id", "total_sales"], &[])
            .unwrap()
            .apply(&doc());
        assert_eq!(out, json!({"id": 1, "storeId": 7, "totalSales": 30}));
    }

    #[test]
    fn nested_paths() {
        let out = p(&["dailyData.1.sales", "store.name"], &[])
            .unwrap()
            .apply(&doc());
        assert_eq!(
            out,
            json!({"dailyData": {"1": {"sales": 10}}, "store": {"name": "Main St"}})
        );
    }

    #[test]
    fn wildcard_days() {
        let out = p(&["daily_data.*.sales"], &[]).unwrap().apply(&doc());
        assert_eq!(
            out,
            json!({"dailyData": {"1": {"sales": 10}, "2": {"sales": 20}}})
        );
    }

    #[test]
    fn exclude_after_fields() {
        let out = p(
            &["id", "dailyData"],
            &["dailyData.2", "dailyData.1.customers"],
        )
        .unwrap()
        .apply(&doc());
        assert_eq!(out, json!({"id": 1, "dailyData": {"1": {"sales": 10}}}));
        let out = p(&[], &["dailyData", "store"]).unwrap().apply(&doc());
        assert_eq!(
            out,
            json!({"id": 1, "storeId": 7, "year": 2024, "month": 1, "totalSales": 30, "version": 1})
        );
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = p(&["id", "colour"], &[]).unwrap_err();
        assert_eq!(e.field, "colour");
        let e = p(&["id; DROP TABLE sales.stores"], &[]).unwrap_err();
        assert_eq!(e.field, "id; DROP TABLE sales.stores");
        assert!(p(&["dailyData.32"], &[]).is_err());
        assert!(p(&["dailyData.1.profit"], &[]).is_err());
        assert!(p(&["year.x"], &[]).is_err());
        assert!(p(&[""], &[]).is_err());
        assert!(p(&[], &["nope"]).is_err());
    }

    #[test]
    fn a_path_named_twice_is_refused() {
        for list in [
            &["id", "totalSales", "id"][..],
            &["total_sales", "totalSales"][..],
            &["dailyData.1", "dailyData.*", "dailyData.1"][..],
        ] {
            let e = p(list, &[]).unwrap_err();
            assert_eq!(e.reason, "given twice", "{list:?}");
        }
        assert_eq!(p(&[], &["year", "year"]).unwrap_err().field, "year");
        // A path and a part of it are two names.
        assert!(p(&["store", "store.name"], &[]).is_ok());
    }

    #[test]
    fn parent_then_child_keeps_parent() {
        let out = p(&["store", "store.name"], &[]).unwrap().apply(&doc());
        assert_eq!(
            out,
            json!({"store": {"id": 7, "name": "Main St", "region": "North"}})
        );
    }

    #[test]
    fn canonical_names_reported() {
        let pr = p(&["store_id", "daily_data.1.sales"], &[]).unwrap();
        assert_eq!(pr.fields, vec!["storeId", "dailyData.1.sales"]);
        assert!(p(&[], &[]).unwrap().is_identity());
    }

    /// `Step` walks give what `apply` gives, for every projection the
    /// tests above use and a few more.
    #[test]
    fn steps_agree_with_apply() {
        fn walk(v: &Value, step: &Step<'_>) -> Value {
            let Value::Object(m) = v else {
                return v.clone();
            };
            let mut out = Map::new();
            for (k, mv) in m {
                match step.member(k) {
                    Keep::Drop => {}
                    Keep::Whole => {
                        out.insert(k.clone(), mv.clone());
                    }
                    Keep::Part(next) => {
                        out.insert(k.clone(), walk(mv, &next));
                    }
                }
            }
            Value::Object(out)
        }
        let cases: &[(&[&str], &[&str])] = &[
            (&[], &[]),
            (&["id", "storeId"], &[]),
            (&["dailyData"], &[]),
            (&["dailyData.1"], &[]),
            (&["dailyData.*.sales"], &[]),
            (&["dailyData.*.sales", "dailyData.2"], &[]),
            (&["dailyData.9.sales"], &[]),
            (&[], &["dailyData"]),
            (&[], &["dailyData.*.customers", "store.region"]),
            (&["dailyData", "store"], &["dailyData.1", "store.name"]),
            (&["dailyData.*"], &["dailyData.2.sales"]),
            (&["id", "store.name"], &["store"]),
            (&["totalSales", "version"], &["version"]),
        ];
        for (fields, exclude) in cases {
            let proj = p(fields, exclude).unwrap();
            let d = doc();
            let got = if proj.is_identity() {
                d.clone()
            } else {
                walk(&d, &proj.step())
            };
            assert_eq!(got, proj.apply(&d), "{fields:?} / {exclude:?}");
        }
    }
}
