//! `sales.project()`: field selection applied inside the query, so only the
//! requested bytes leave Postgres.

use crate::error::{OrRaise, SalesError};
use crate::jsonb::{Container, Jb, JsonbDatum, RawJsonb};
use crate::jsonb_text::Node;
use pgrx::prelude::*;
use sales_core::projection::{Keep, Projection, ProjectionError, Step, SALES_DOC, STORE_DOC};
use std::borrow::Cow;

impl From<ProjectionError> for SalesError {
    fn from(e: ProjectionError) -> Self {
        SalesError::InvalidParameter(e.to_string())
    }
}

fn build(
    fields: Option<Vec<Option<String>>>,
    exclude: Option<Vec<Option<String>>>,
    store: bool,
) -> Projection {
    // A list of NULLs names nothing, as an API `fields=` naming nothing
    // does; read as "every field" (what an empty list means), it leaked
    // the whole document where the caller asked for a selection.
    if fields
        .as_ref()
        .is_some_and(|f| !f.is_empty() && f.iter().all(Option::is_none))
    {
        crate::error::raise(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "fields names nothing (only NULLs): give paths, or NULL or an empty array for every field",
        );
    }
    let f: Vec<String> = fields.unwrap_or_default().into_iter().flatten().collect();
    let x: Vec<String> = exclude.unwrap_or_default().into_iter().flatten().collect();
    let shape = if store { &STORE_DOC } else { &SALES_DOC };
    Projection::new(shape, &f, &x).or_raise()
}

/// Projects a sales document (`sales.sales_doc(...)`): `fields` picks dotted
/// paths (camelCase or snake_case, `dailyData.1.sales`, `dailyData.*.sales`,
/// `store.name`), then `exclude` removes paths. NULL or empty `fields` keeps
/// everything; NULL entries are passed over, and a list of NULLs only is
/// refused (22004). An unknown path raises SQLSTATE 22023 naming it. Values are
/// copied as the document stores them (numbers keep their digits and
/// scale: `10.50` stays `10.50`).
#[pg_extern(immutable, parallel_safe)]
fn project(
    doc: Option<RawJsonb>,
    fields: default!(Option<Vec<Option<String>>>, "NULL"),
    exclude: default!(Option<Vec<Option<String>>>, "NULL"),
) -> Option<JsonbDatum> {
    let p = build(fields, exclude, false);
    doc.map(|d| project_in_place(&d, &p))
}

/// Same as `project` for store documents (`sales.store_doc(...)`).
#[pg_extern(immutable, parallel_safe)]
fn project_store(
    doc: Option<RawJsonb>,
    fields: default!(Option<Vec<Option<String>>>, "NULL"),
    exclude: default!(Option<Vec<Option<String>>>, "NULL"),
) -> Option<JsonbDatum> {
    let p = build(fields, exclude, true);
    doc.map(|d| project_in_place(&d, &p))
}

/// `p` applied to `doc` without leaving jsonb's binary form: the members it
/// keeps are copied as stored into a new document. A document that is not
/// an object (or an identity projection) comes back as it is.
fn project_in_place(doc: &RawJsonb, p: &Projection) -> JsonbDatum {
    match doc.root() {
        Jb::Object(c) if !p.is_identity() => {
            crate::jsonb_text::document_datum(pick(c, &p.step()), "a projected document")
        }
        _ => doc.datum(),
    }
}

/// The members of object `c` that `step` keeps.
fn pick<'a>(c: Container<'a>, step: &Step<'_>) -> Node<'a> {
    let mut out = Vec::new();
    let mut members = c.members();
    while let Some(m) = members.next_raw() {
        let node = match step.member(m.key()) {
            Keep::Drop => continue,
            Keep::Whole => m.stored(),
            Keep::Part(next) => match m.value() {
                Jb::Object(inner) => pick(inner, &next),
                _ => m.stored(),
            },
        };
        out.push((Cow::Borrowed(m.key().as_bytes()), node));
    }
    Node::Obj(out)
}

/// Set-returning form: projects each element of a JSON array of sales
/// documents, checking the paths once. NULL `docs` is an empty set (the
/// other functions here map NULL to NULL, not to an error).
#[pg_extern(immutable, parallel_safe)]
fn project_each(
    docs: Option<RawJsonb>,
    fields: default!(Option<Vec<Option<String>>>, "NULL"),
    exclude: default!(Option<Vec<Option<String>>>, "NULL"),
) -> SetOfIterator<'static, JsonbDatum> {
    let p = build(fields, exclude, false);
    let Some(docs) = docs else {
        return SetOfIterator::new(Vec::new());
    };
    let n = match docs.root() {
        Jb::Array(c) => c.len(),
        _ => SalesError::InvalidParameter("project_each expects a JSON array of documents".into())
            .raise(),
    };
    // Each element as a document of its own (jsonb's `->`, which copies it
    // as stored), projected like `project`'s; all of them built in this
    // first call, which runs in the set's own memory context.
    let items: Vec<JsonbDatum> = (0..n)
        .map(|i| {
            // SAFETY: jsonb_array_element takes (jsonb, int4); an index
            // inside the array never gives NULL.
            let element = unsafe {
                pgrx::direct_function_call_as_datum(
                    pg_sys::jsonb_array_element,
                    &[docs.datum().into_datum(), (i as i32).into_datum()],
                )
            }
            .expect("an element of the array");
            // SAFETY: a jsonb datum.
            let element =
                unsafe { RawJsonb::from_polymorphic_datum(element, false, pg_sys::JSONBOID) }
                    .expect("not null");
            project_in_place(&element, &p)
        })
        .collect();
    SetOfIterator::new(items)
}

/// Checks a field list without projecting anything; raises 22023 naming the
/// first unknown path. Returns the canonical (camelCase) paths.
#[pg_extern(immutable, parallel_safe)]
fn check_fields(fields: Vec<Option<String>>) -> Vec<String> {
    build(Some(fields), None, false).fields
}
