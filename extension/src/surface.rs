//! The rules `sql/surface.sql` shares with the server, taken from `core` so
//! they are written once: the filter as a WHERE condition
//! (`sales_core::sql`, rendered as literals) and whether a field list needs
//! the stores join (`Projection::needs_store`).

use crate::error::{OrRaise, SalesError};
use pgrx::prelude::*;
use sales_core::projection::{Projection, SALES_DOC};
use sales_core::sql::{parse_period, push_terms, Literals, Term};

fn invalid(msg: String) -> ! {
    SalesError::InvalidParameter(msg).raise()
}

fn period(arg: &str, value: Option<&str>) -> Option<(i32, i32)> {
    value.map(|v| {
        parse_period(v)
            .unwrap_or_else(|| invalid(format!("{arg}: \"{v}\" is not a month like 2024-06")))
    })
}

fn total(arg: &str, v: Option<AnyNumeric>) -> Option<f64> {
    v.map(|n| {
        let f: f64 = n.clone().try_into().unwrap_or(f64::NAN);
        if f.is_nan() || f < 0.0 || !f.is_finite() {
            invalid(format!("{arg}: must be a non-negative number"));
        }
        f
    })
}

/// The filters as a WHERE condition on `m` (sales.monthly_sales) and `s`
/// (sales.stores), values as literals. Every argument is checked (SQLSTATE
/// 22023 naming it); NULL means "no filter".
#[pg_extern(immutable, parallel_safe)]
#[allow(clippy::too_many_arguments)]
fn filter_sql(
    store_ids: default!(Option<Vec<Option<i64>>>, "NULL"),
    region: default!(Option<&str>, "NULL"),
    year: default!(Option<i32>, "NULL"),
    month: default!(Option<i32>, "NULL"),
    from_period: default!(Option<&str>, "NULL"),
    to_period: default!(Option<&str>, "NULL"),
    min_total_sales: default!(Option<AnyNumeric>, "NULL"),
    max_total_sales: default!(Option<AnyNumeric>, "NULL"),
) -> String {
    let from = period("from_period", from_period);
    let to = period("to_period", to_period);
    let ids: Option<Vec<i64>> = store_ids.map(|ids| {
        ids.into_iter()
            .map(|i| i.unwrap_or_else(|| invalid("store_ids: NULL is not a store id".into())))
            .collect()
    });
    if let Some(y) = year.filter(|y| !(2000..=2100).contains(y)) {
        invalid(format!("year: {y} is outside 2000..2100"));
    }
    if let Some(m) = month.filter(|m| !(1..=12).contains(m)) {
        invalid(format!("month: {m} is not a month (1..12)"));
    }
    if let (Some(f), Some(t)) = (from, to) {
        if f > t {
            invalid(format!(
                "from_period: {} is after to_period ({})",
                from_period.unwrap_or_default(),
                to_period.unwrap_or_default()
            ));
        }
    }
    let min = total("min_total_sales", min_total_sales);
    let max = total("max_total_sales", max_total_sales);

    let mut terms = Vec::new();
    if let Some(ids) = &ids {
        terms.push(Term::StoreIn(ids));
    }
    if let Some(r) = region {
        terms.push(Term::Region(r));
    }
    if let Some(y) = year {
        terms.push(Term::Year(y));
    }
    if let Some(m) = month {
        terms.push(Term::Month(m));
    }
    if let Some((y, m)) = from {
        terms.push(Term::From(y, m));
    }
    if let Some((y, m)) = to {
        terms.push(Term::To(y, m));
    }
    if let Some(v) = min {
        terms.push(Term::MinTotalSales(v));
    }
    if let Some(v) = max {
        terms.push(Term::MaxTotalSales(v));
    }
    let mut w = Literals("true".into());
    push_terms(&mut w, &terms);
    w.0
}

/// Whether a sales field list asks for the store (`store` or `store.*`):
/// only then does a document need the stores join. Checks the paths
/// (SQLSTATE 22023 naming the first unknown one).
#[pg_extern(immutable, parallel_safe)]
fn needs_store(fields: default!(Option<Vec<Option<String>>>, "NULL")) -> bool {
    let f: Vec<String> = fields.unwrap_or_default().into_iter().flatten().collect();
    Projection::new(&SALES_DOC, &f, &[] as &[String])
        .or_raise()
        .needs_store()
}
