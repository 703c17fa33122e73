//! The sales filter and the document expression, rendered into SQL once.
//!
//! The rules (which condition each term becomes, when the document needs
//! the stores join) are written here a single time; a [`SqlWriter`] decides
//! how values reach SQL. The server's list and summary push bind
//! parameters; the export's `COPY`, which takes none, renders literals
//! through [`Literals`]. Both get the same conditions from the same terms,
//! so a rule added for one cannot miss the other.

use crate::decimal::Bound;
use crate::projection::Projection;
use std::fmt::Write as _;

/// A typed value to put into SQL.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SqlValue<'a> {
    /// `bigint[]`.
    Ids(&'a [i64]),
    /// `bigint`.
    Id(i64),
    /// `integer`.
    Int(i32),
    /// `numeric`: a checked decimal (its text is digits and a point only).
    Numeric(&'a Bound),
    Text(&'a str),
    /// `text[]`.
    Texts(&'a [String]),
}

/// Where rendered SQL goes.
pub trait SqlWriter {
    /// Appends SQL text (never caller input).
    fn sql(&mut self, sql: &str);
    /// Appends a value, typed as its variant says.
    fn value(&mut self, v: SqlValue<'_>);
}

/// Renders values as literals into a string.
///
/// Only typed values are rendered: numbers through their `Display` (a
/// [`Bound`] is digits and a point only), text through an escaped `E''`
/// literal. Callers reject control characters in text first (a NUL could
/// not be sent anyway).
#[derive(Debug, Default, Clone)]
pub struct Literals(pub String);

impl SqlWriter for Literals {
    fn sql(&mut self, sql: &str) {
        self.0.push_str(sql);
    }

    fn value(&mut self, v: SqlValue<'_>) {
        let out = &mut self.0;
        match v {
            SqlValue::Ids(ids) => {
                out.push_str("ARRAY[");
                for (i, id) in ids.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{id}");
                }
                out.push_str("]::bigint[]");
            }
            SqlValue::Id(n) => {
                let _ = write!(out, "{n}::bigint");
            }
            SqlValue::Int(n) => {
                let _ = write!(out, "{n}");
            }
            SqlValue::Numeric(n) => {
                let _ = write!(out, "'{}'::numeric", n.as_str());
            }
            SqlValue::Text(t) => out.push_str(&text_lit(t)),
            SqlValue::Texts(items) => {
                out.push_str("ARRAY[");
                for (i, t) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&text_lit(t));
                }
                out.push_str("]::text[]");
            }
        }
    }
}

/// A text literal that is safe whatever `standard_conforming_strings` says:
/// an `E''` string with quotes and backslashes escaped.
pub fn text_lit(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    out.push_str("E'");
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A period like `2024-06` -> (2024, 6): years 2000..=2100, months 1..=12.
/// The API's `from`/`to` and the extension's `from_period`/`to_period`.
pub fn parse_period(raw: &str) -> Option<(i32, i32)> {
    let (y, m) = period_parts(raw)?;
    ((2000..=2100).contains(&y) && (1..=12).contains(&m)).then_some((y, m))
}

/// The year and month a period is written as (four digits, `-`, one or
/// two digits), whatever their range: what [`parse_period`] then checks.
pub fn period_parts(raw: &str) -> Option<(i32, i32)> {
    let (y, m) = raw.trim().split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(y) || !digits(m) || y.len() != 4 || m.len() > 2 {
        return None;
    }
    Some((y.parse().ok()?, m.parse().ok()?))
}

/// One condition of a sales query, on `m` (monthly_sales) and `s` (stores).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Term<'a> {
    /// The rows of these stores (a filter, or the caller's scope).
    StoreIn(&'a [i64]),
    Region(&'a str),
    Year(i32),
    Month(i32),
    /// From this (year, month) on.
    From(i32, i32),
    /// Up to this (year, month), inclusive.
    To(i32, i32),
    MinTotalSales(&'a Bound),
    MaxTotalSales(&'a Bound),
}

/// Appends ` AND <condition>` for each term.
pub fn push_terms(w: &mut impl SqlWriter, terms: &[Term<'_>]) {
    for t in terms {
        match *t {
            // One store (the usual request) as an equality: a prepared
            // statement's generic plan then estimates it as a custom plan
            // does, so Postgres settles on the generic plan and stops
            // planning the query on every execution. With `= ANY($n)` it
            // assumes an array of 10 and keeps planning each time.
            Term::StoreIn(&[id]) => {
                w.sql(" AND m.store_id = ");
                w.value(SqlValue::Id(id));
            }
            Term::StoreIn(ids) => {
                w.sql(" AND m.store_id = ANY(");
                w.value(SqlValue::Ids(ids));
                w.sql(")");
            }
            Term::Region(r) => {
                w.sql(" AND s.region = ");
                w.value(SqlValue::Text(r));
            }
            Term::Year(y) => {
                w.sql(" AND m.year = ");
                w.value(SqlValue::Int(y));
            }
            Term::Month(m) => {
                w.sql(" AND m.month = ");
                w.value(SqlValue::Int(m));
            }
            Term::From(y, m) | Term::To(y, m) => {
                w.sql(if matches!(t, Term::From(..)) {
                    " AND (m.year, m.month) >= ("
                } else {
                    " AND (m.year, m.month) <= ("
                });
                w.value(SqlValue::Int(y));
                w.sql(", ");
                w.value(SqlValue::Int(m));
                w.sql(")");
            }
            Term::MinTotalSales(v) => {
                w.sql(" AND m.total_sales >= ");
                w.value(SqlValue::Numeric(v));
            }
            Term::MaxTotalSales(v) => {
                w.sql(" AND m.total_sales <= ");
                w.value(SqlValue::Numeric(v));
            }
        }
    }
}

/// `sales.sales_doc(m)::text` of row `m`, byte for byte, written as text
/// directly: the same members in jsonb's key order (by length, then
/// bytes), the same separators, numbers and days as `numeric_out` and
/// `jsonb_out` print them, timestamps as `to_json` writes them (the
/// session's time zone, as `jsonb_build_object` does), `null` for a NULL,
/// and a total that is not a finite number (only written past the row
/// trigger) as a string, as jsonb does (printed bare, it was not JSON).
/// Building the jsonb document and printing it cost about a third of a
/// page of full documents (`sales_doc_text_is_sales_doc` compares the two
/// over stored rows).
pub const SALES_DOC_TEXT: &str = "concat('{\"id\": ', m.id, ', \"year\": ', m.year, \
     ', \"month\": ', m.month, ', \"storeId\": ', m.store_id, ', \"version\": ', m.version, \
     ', \"createdAt\": ', to_json(m.created_at), ', \"dailyData\": ', m.daily_data, \
     ', \"updatedAt\": ', to_json(m.updated_at), \
     ', \"totalSales\": ', CASE WHEN m.total_sales IN ('NaN', 'Infinity', '-Infinity') \
                              THEN '\"' || m.total_sales || '\"' \
                              ELSE coalesce(m.total_sales::text, 'null') END, \
     ', \"daysReported\": ', coalesce(m.days_reported::text, 'null'), \
     ', \"totalCustomers\": ', coalesce(m.total_customers::text, 'null'), '}')";

/// The sales document of row `m` (with its store `s` when the projection
/// asks for store fields), projected in Postgres. Callers take it as text
/// (`(...)::text`): unprojected, it is [`SALES_DOC_TEXT`], text already.
pub fn push_sales_doc(w: &mut impl SqlWriter, p: &Projection) {
    if p.is_identity() {
        w.sql(SALES_DOC_TEXT);
        return;
    }
    let doc = if p.needs_store() {
        "sales.sales_doc(m, s)"
    } else {
        "sales.sales_doc(m)"
    };
    push_projected(w, p, doc, "sales.project")
}

/// The store document of row `s`, projected in Postgres.
pub fn push_store_doc(w: &mut impl SqlWriter, p: &Projection) {
    push_projected(w, p, "sales.store_doc(s)", "sales.project_store")
}

fn push_projected(w: &mut impl SqlWriter, p: &Projection, doc: &str, project: &str) {
    if p.is_identity() {
        w.sql(doc);
    } else {
        w.sql(project);
        w.sql("(");
        w.sql(doc);
        w.sql(", ");
        w.value(SqlValue::Texts(&p.fields));
        w.sql(", ");
        w.value(SqlValue::Texts(&p.excluded));
        w.sql(")");
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn periods() {
        assert_eq!(super::parse_period("2024-06"), Some((2024, 6)));
        assert_eq!(super::parse_period(" 2024-6 "), Some((2024, 6)));
        for bad in [
            "2024-13", "1999-01", "june", "2024-", "-06", "+2024-06", "2024-006", "2024-1.5",
        ] {
            assert_eq!(super::parse_period(bad), None, "{bad}");
        }
    }
    use super::*;
    use crate::projection::SALES_DOC;

    fn render(terms: &[Term<'_>]) -> String {
        let mut w = Literals::default();
        push_terms(&mut w, terms);
        w.0
    }

    #[test]
    fn literals_are_escaped() {
        assert_eq!(text_lit("O'Brien \\ x"), "E'O''Brien \\\\ x'");
        let (lo, hi) = (Bound::parse("0.5").unwrap(), Bound::parse("1e21").unwrap());
        let w = render(&[
            Term::StoreIn(&[1, 2]),
            Term::Region("a'); DROP TABLE x; --"),
            Term::From(2024, 1),
            Term::MinTotalSales(&lo),
            Term::MaxTotalSales(&hi),
        ]);
        assert!(w.contains("s.region = E'a''); DROP TABLE x; --'"), "{w}");
        assert!(w.contains("ANY(ARRAY[1,2]::bigint[])"), "{w}");
        assert!(w.contains("m.total_sales >= '0.5'::numeric"), "{w}");
        assert!(w.contains("(m.year, m.month) >= (2024, 1)"), "{w}");
        assert!(w.contains("<= '1000000000000000000000'::numeric"), "{w}");
    }

    #[test]
    fn one_store_is_an_equality() {
        assert_eq!(
            render(&[Term::StoreIn(&[7])]),
            " AND m.store_id = 7::bigint"
        );
        assert_eq!(
            render(&[Term::StoreIn(&[7, 8])]),
            " AND m.store_id = ANY(ARRAY[7,8]::bigint[])"
        );
        // No store: nothing is found (an empty scope), as before.
        assert_eq!(
            render(&[Term::StoreIn(&[])]),
            " AND m.store_id = ANY(ARRAY[]::bigint[])"
        );
    }

    #[test]
    fn the_store_join_only_for_store_fields() {
        let doc = |fields: &[&str]| {
            let p = Projection::new(&SALES_DOC, fields, &[]).unwrap();
            let mut w = Literals::default();
            push_sales_doc(&mut w, &p);
            w.0
        };
        assert_eq!(doc(&[]), SALES_DOC_TEXT);
        assert!(doc(&["storeId"]).starts_with("sales.project(sales.sales_doc(m), "));
        assert!(doc(&["store.name"]).starts_with("sales.project(sales.sales_doc(m, s), "));
        assert!(doc(&["store"]).contains("sales.sales_doc(m, s)"));
    }
}
