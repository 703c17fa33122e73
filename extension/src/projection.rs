//! `sales.project()`: field selection applied inside the query, so only the
//! requested bytes leave Postgres.

use crate::error::{OrRaise, SalesError};
use pgrx::prelude::*;
use sales_core::projection::{Projection, ProjectionError, SALES_DOC, STORE_DOC};

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
    let f: Vec<String> = fields.unwrap_or_default().into_iter().flatten().collect();
    let x: Vec<String> = exclude.unwrap_or_default().into_iter().flatten().collect();
    let shape = if store { &STORE_DOC } else { &SALES_DOC };
    Projection::new(shape, &f, &x).or_raise()
}

/// Projects a sales document (`sales.sales_doc(...)`): `fields` picks dotted
/// paths (camelCase or snake_case, `dailyData.1.sales`, `dailyData.*.sales`,
/// `store.name`), then `exclude` removes paths. NULL or empty `fields` keeps
/// everything. An unknown path raises SQLSTATE 22023 naming it.
#[pg_extern(immutable, parallel_safe)]
fn project(
    doc: Option<pgrx::JsonB>,
    fields: default!(Option<Vec<Option<String>>>, "NULL"),
    exclude: default!(Option<Vec<Option<String>>>, "NULL"),
) -> Option<pgrx::JsonB> {
    let p = build(fields, exclude, false);
    doc.map(|d| pgrx::JsonB(p.apply_owned(d.0)))
}

/// Same as `project` for store documents (`sales.store_doc(...)`).
#[pg_extern(immutable, parallel_safe)]
fn project_store(
    doc: Option<pgrx::JsonB>,
    fields: default!(Option<Vec<Option<String>>>, "NULL"),
    exclude: default!(Option<Vec<Option<String>>>, "NULL"),
) -> Option<pgrx::JsonB> {
    let p = build(fields, exclude, true);
    doc.map(|d| pgrx::JsonB(p.apply_owned(d.0)))
}

/// Set-returning form: projects each element of a JSON array of sales
/// documents, checking the paths once. NULL `docs` is an empty set (the
/// other functions here map NULL to NULL, not to an error).
#[pg_extern(immutable, parallel_safe)]
fn project_each(
    docs: Option<pgrx::JsonB>,
    fields: default!(Option<Vec<Option<String>>>, "NULL"),
    exclude: default!(Option<Vec<Option<String>>>, "NULL"),
) -> SetOfIterator<'static, pgrx::JsonB> {
    let p = build(fields, exclude, false);
    let Some(docs) = docs else {
        return SetOfIterator::new(Vec::new());
    };
    let serde_json::Value::Array(items) = docs.0 else {
        SalesError::InvalidParameter("project_each expects a JSON array of documents".into())
            .raise()
    };
    SetOfIterator::new(
        items
            .into_iter()
            .map(move |d| pgrx::JsonB(p.apply_owned(d))),
    )
}

/// Checks a field list without projecting anything; raises 22023 naming the
/// first unknown path. Returns the canonical (camelCase) paths.
#[pg_extern(immutable, parallel_safe)]
fn check_fields(fields: Vec<Option<String>>) -> Vec<String> {
    build(Some(fields), None, false).fields
}
