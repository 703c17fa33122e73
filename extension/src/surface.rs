//! The rules `sql/surface.sql` shares with the server, taken from `core` so
//! they are written once: the filter as a WHERE condition
//! (`sales_core::sql`, rendered as literals) and whether a field list needs
//! the stores join (`Projection::needs_store`).

use crate::error::{OrRaise, SalesError};
use pgrx::prelude::*;
use sales_core::decimal::Bound;
use sales_core::projection::{Projection, SALES_DOC};
use sales_core::sql::{parse_period, push_terms, Literals, Term};
use sales_core::summary::{self, Summary, SummaryError};

fn invalid(msg: String) -> ! {
    SalesError::InvalidParameter(msg).raise()
}

/// The SQL argument a parameter of the API is.
fn sql_arg(param: &str) -> &str {
    match param {
        "groupBy" => "group_by",
        "compareTo" => "compare_to",
        "orderBy" => "order_by",
        "from" => "from_period",
        "to" => "to_period",
        "minTotalSales" => "min_total_sales",
        "maxTotalSales" => "max_total_sales",
        other => other,
    }
}

fn period(arg: &str, value: Option<&str>) -> Option<(i32, i32)> {
    value.map(|v| {
        parse_period(v)
            .unwrap_or_else(|| invalid(format!("{arg}: \"{v}\" is not a month like 2024-06")))
    })
}

/// A total bound, every digit kept (`numeric_out` writes it plainly; a
/// double would keep 15–17 significant digits and miss the row whose total
/// it is), checked as the API checks `minTotalSales`.
fn total(arg: &str, v: Option<AnyNumeric>) -> Option<Bound> {
    v.map(|n| Bound::parse(&n.to_string()).unwrap_or_else(|e| invalid(format!("{arg}: {e}"))))
}

/// A region argument as the API reads `region`: trimmed; a blank one, one
/// of invisible characters only, one with a control character, line
/// separator or direction override, or one longer than a region can be
/// names no store's region, and is refused (SQLSTATE 22023 naming `region`).
fn region_arg(r: &str) -> &str {
    if r.chars().any(sales_core::names::breaks_text) {
        invalid(
            "region: must not contain control characters, line separators or direction overrides"
                .into(),
        );
    }
    let r = r.trim();
    if r.is_empty() {
        invalid("region: must not be empty (NULL for every region)".into());
    }
    if r.chars()
        .all(|c| c.is_whitespace() || sales_core::names::invisible(c))
    {
        invalid("region: has nothing visible; no store's region is blank".into());
    }
    if r.chars().count() > 100 {
        invalid("region: at most 100 characters".into());
    }
    r
}

/// The region filter of `sales.list_stores`, checked and trimmed as the
/// other functions' `region` is (see [`region_arg`]).
#[pg_extern(immutable, parallel_safe, strict)]
fn region_filter(region: &str) -> String {
    region_arg(region).to_string()
}

/// The filter arguments of the SQL surface, checked (SQLSTATE 22023
/// naming the argument).
struct Filters<'a> {
    ids: Option<Vec<i64>>,
    region: Option<&'a str>,
    year: Option<i32>,
    month: Option<i32>,
    from: Option<(i32, i32)>,
    to: Option<(i32, i32)>,
    min: Option<Bound>,
    max: Option<Bound>,
}

impl<'a> Filters<'a> {
    #[allow(clippy::too_many_arguments)]
    fn check(
        store_ids: Option<Vec<Option<i64>>>,
        region: Option<&'a str>,
        year: Option<i32>,
        month: Option<i32>,
        from_period: Option<&str>,
        to_period: Option<&str>,
        min_total_sales: Option<AnyNumeric>,
        max_total_sales: Option<AnyNumeric>,
    ) -> Self {
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
        // A year or month outside from..to selects no month: refused as
        // the API refuses it (a list of nothing would hide the mistake).
        if let Err(e) = summary::period(year, month, from, to) {
            invalid(format!("{}: {}", sql_arg(e.param), e.reason));
        }
        let min = total("min_total_sales", min_total_sales);
        let max = total("max_total_sales", max_total_sales);
        if let (Some(lo), Some(hi)) = (&min, &max) {
            if lo > hi {
                invalid("min_total_sales: must not be above max_total_sales".into());
            }
        }
        let region = region.map(region_arg);
        Filters {
            ids,
            region,
            year,
            month,
            from,
            to,
            min,
            max,
        }
    }

    fn terms(&self) -> Vec<Term<'_>> {
        let mut terms = Vec::new();
        if let Some(ids) = &self.ids {
            terms.push(Term::StoreIn(ids));
        }
        if let Some(r) = self.region {
            terms.push(Term::Region(r));
        }
        terms.extend(self.year.map(Term::Year));
        terms.extend(self.month.map(Term::Month));
        terms.extend(self.from.map(|(y, m)| Term::From(y, m)));
        terms.extend(self.to.map(|(y, m)| Term::To(y, m)));
        terms.extend(self.min.as_ref().map(Term::MinTotalSales));
        terms.extend(self.max.as_ref().map(Term::MaxTotalSales));
        terms
    }
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
    let f = Filters::check(
        store_ids,
        region,
        year,
        month,
        from_period,
        to_period,
        min_total_sales,
        max_total_sales,
    );
    let mut w = Literals("true".into());
    push_terms(&mut w, &f.terms());
    w.0
}

/// The statement of a summary (`sales.summary`, `GET /api/v2/sales/summary`),
/// values as literals: one row of `rows` (a JSON array as text) and
/// `groups`. The same rules as the API (`sales_core::summary`); a refused
/// argument is SQLSTATE 22023 naming it.
#[pg_extern(immutable, parallel_safe)]
#[allow(clippy::too_many_arguments)]
fn summary_sql(
    group_by: default!(Option<&str>, "NULL"),
    metrics: default!(Option<&str>, "NULL"),
    compare_to: default!(Option<&str>, "NULL"),
    top: default!(Option<i32>, "NULL"),
    order_by: default!(Option<&str>, "NULL"),
    store_ids: default!(Option<Vec<Option<i64>>>, "NULL"),
    region: default!(Option<&str>, "NULL"),
    year: default!(Option<i32>, "NULL"),
    month: default!(Option<i32>, "NULL"),
    from_period: default!(Option<&str>, "NULL"),
    to_period: default!(Option<&str>, "NULL"),
    min_total_sales: default!(Option<AnyNumeric>, "NULL"),
    max_total_sales: default!(Option<AnyNumeric>, "NULL"),
) -> String {
    let f = Filters::check(
        store_ids,
        region,
        year,
        month,
        from_period,
        to_period,
        min_total_sales,
        max_total_sales,
    );
    let arg = |e: SummaryError| -> ! { invalid(format!("{}: {}", sql_arg(e.param), e.reason)) };
    let period = summary::period(f.year, f.month, f.from, f.to).unwrap_or_else(|e| arg(e));
    let spec = Summary::parse(
        group_by,
        metrics,
        compare_to,
        top.map(i64::from),
        order_by,
        period,
    )
    .unwrap_or_else(|e| arg(e));
    if spec.compare.is_some() && f.month.is_some() && f.year.is_none() {
        invalid(
            "month: with compare_to, give year too (a month of every year is not one period)"
                .into(),
        );
    }
    let compared = spec.compared_period().map(|p| Filters {
        ids: f.ids.clone(),
        region: f.region,
        year: None,
        month: None,
        from: Some(p.from),
        to: Some(p.to),
        min: f.min.clone(),
        max: f.max.clone(),
    });
    let mut w = Literals::default();
    spec.render(
        &mut w,
        &f.terms(),
        &compared.as_ref().map(|c| c.terms()).unwrap_or_default(),
    );
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
