//! The SQL of an export: the row count and the COPY statement, with the
//! filter rendered as literals (COPY takes no bind parameters).

use super::format::{ExportFormat, ExportShape, RowKey};
use crate::auth::Principal;
use crate::http::filters::SalesFilter;
use sales_core::projection::Projection;
use sales_core::sql::{push_sales_doc, Literals, SqlWriter, SALES_DOC_TEXT};
use std::fmt::Write as _;

/// The filter and the caller's scope as SQL conditions on `m` and `s`, with
/// literal values (COPY cannot take bind parameters).
pub fn where_sql(f: &SalesFilter, who: &Principal) -> String {
    let mut w = Literals(String::from("true"));
    f.push_where(&mut w, who);
    w.0
}

// LEFT JOIN: every row has its store (a NOT NULL foreign key), so the rows
// are those of an inner join, and the planner drops the join altogether when
// no store column is used; an inner join would be planned and executed
// every time (and steers the planner to join orders that skip the period
// indexes).
const FROM_MONTHLY: &str =
    "FROM sales.monthly_sales m LEFT JOIN sales.stores s ON s.id = m.store_id";
const FROM_DAILY: &str =
    "FROM sales.monthly_sales m LEFT JOIN sales.stores s ON s.id = m.store_id \
     CROSS JOIN LATERAL jsonb_each(m.daily_data) AS e(k, v)";
const MONTH_KEY: &str = "m.store_id || ':' || m.year || '-' || lpad(m.month::text, 2, '0')";
const DATE: &str = "m.year || '-' || lpad(m.month::text, 2, '0') || '-' || lpad(e.k, 2, '0')";
const DAY_KEY: &str =
    "m.store_id || ':' || m.year || '-' || lpad(m.month::text, 2, '0') || '-' || lpad(e.k, 2, '0')";

/// Columns of `shape=daily` CSV, in order.
pub const DAILY_CSV_COLUMNS: &[&str] = &[
    "key",
    "store_id",
    "store_code",
    "store_name",
    "date",
    "sales",
    "customers",
    "transactions",
];

/// Columns of `shape=monthly` CSV before the day columns `d1_sales,
/// d1_customers, d1_transactions, ..., d31_transactions`.
pub const MONTHLY_CSV_COLUMNS: &[&str] = &[
    "key",
    "store_id",
    "store_code",
    "store_name",
    "region",
    "year",
    "month",
    "total_sales",
    "total_customers",
    "days_reported",
];

/// What one export runs: the estimate and the COPY statement.
#[derive(Debug, Clone)]
pub struct ExportSql {
    /// `SELECT <rows the COPY will produce>` (bigint).
    pub count: String,
    /// `COPY (...) TO STDOUT ...`.
    pub copy: String,
    /// The row query inside the COPY (for benchmarks against `psql \copy`).
    pub select: String,
}

pub struct ExportSpec<'a> {
    pub format: ExportFormat,
    pub shape: ExportShape,
    pub filter: &'a SalesFilter,
    pub who: &'a Principal,
    pub after: Option<RowKey>,
    pub projection: Option<&'a Projection>,
    pub header: bool,
}

/// The document expression for monthly JSON rows, with literals.
fn doc_expr(p: Option<&Projection>) -> String {
    let mut w = Literals::default();
    match p {
        Some(p) => push_sales_doc(&mut w, p),
        None => w.sql(SALES_DOC_TEXT),
    }
    w.0
}

pub fn build_sql(spec: &ExportSpec<'_>) -> ExportSql {
    let mut w = where_sql(spec.filter, spec.who);
    let after = spec.after;
    match spec.shape {
        ExportShape::Monthly => {
            if let Some(k) = after {
                let _ = write!(
                    w,
                    " AND (m.store_id, m.year, m.month) > ({}, {}, {})",
                    k.store, k.year, k.month
                );
            }
            let count = format!("SELECT count(*)::bigint {FROM_MONTHLY} WHERE {w}");
            let cols = match spec.format {
                ExportFormat::Csv => {
                    let mut c = format!(
                        "{MONTH_KEY} AS key, m.store_id AS store_id, {} AS store_code, \
                         {} AS store_name, {} AS region, m.year AS year, m.month AS month, \
                         m.total_sales AS total_sales, m.total_customers AS total_customers, \
                         m.days_reported AS days_reported",
                        csv_text("s.code"),
                        csv_text("s.name"),
                        csv_text("s.region")
                    );
                    for d in 1..=31 {
                        let _ = write!(
                            c,
                            ", m.daily_data->'{d}'->>'sales' AS d{d}_sales, \
                             m.daily_data->'{d}'->>'customers' AS d{d}_customers, \
                             m.daily_data->'{d}'->>'transactions' AS d{d}_transactions"
                        );
                    }
                    c
                }
                // The key goes first; an empty projection (`{}`) still gets it.
                ExportFormat::Json | ExportFormat::Ndjson => format!(
                    "'{{\"key\":\"' || {MONTH_KEY} || '\"' || \
                     coalesce(nullif(',' || substr(({})::text, 2), ',}}'), '}}')",
                    doc_expr(spec.projection)
                ),
            };
            let select = format!(
                "SELECT {cols} {FROM_MONTHLY} WHERE {w} ORDER BY m.store_id, m.year, m.month"
            );
            ExportSql {
                count,
                copy: copy_statement(&select, spec.format, spec.header),
                select,
            }
        }
        ExportShape::Daily => {
            let count = match after {
                None => format!(
                    "SELECT coalesce(sum(m.days_reported), 0)::bigint {FROM_MONTHLY} WHERE {w}"
                ),
                Some(k) => format!(
                    "SELECT coalesce(sum(CASE WHEN (m.store_id, m.year, m.month) = ({s}, {y}, {mo}) \
                     THEN (SELECT count(*) FROM jsonb_object_keys(m.daily_data) AS d(k) WHERE d.k::int > {d}) \
                     ELSE m.days_reported END), 0)::bigint {FROM_MONTHLY} \
                     WHERE {w} AND (m.store_id, m.year, m.month) >= ({s}, {y}, {mo})",
                    s = k.store,
                    y = k.year,
                    mo = k.month,
                    d = k.day.unwrap_or(0)
                ),
            };
            if let Some(k) = after {
                let _ = write!(
                    w,
                    " AND (m.store_id, m.year, m.month) >= ({s}, {y}, {mo}) \
                     AND ((m.store_id, m.year, m.month) > ({s}, {y}, {mo}) OR e.k::int > {d})",
                    s = k.store,
                    y = k.year,
                    mo = k.month,
                    d = k.day.unwrap_or(0)
                );
            }
            let cols = match spec.format {
                ExportFormat::Csv => format!(
                    "{DAY_KEY} AS key, m.store_id AS store_id, {} AS store_code, \
                     {} AS store_name, {DATE} AS date, e.v->>'sales' AS sales, \
                     e.v->>'customers' AS customers, e.v->>'transactions' AS transactions",
                    csv_text("s.code"),
                    csv_text("s.name")
                ),
                ExportFormat::Json | ExportFormat::Ndjson => format!(
                    "'{{\"key\":\"' || {DAY_KEY} || '\",\"storeId\":' || m.store_id || \
                     ',\"storeCode\":' || to_json(s.code)::text || \
                     ',\"storeName\":' || to_json(s.name)::text || \
                     ',\"date\":\"' || {DATE} || \
                     '\",\"sales\":' || coalesce((e.v->'sales')::text, 'null') || \
                     ',\"customers\":' || coalesce((e.v->'customers')::text, 'null') || \
                     ',\"transactions\":' || coalesce((e.v->'transactions')::text, 'null') || '}}'"
                ),
            };
            let select = format!(
                "SELECT {cols} {FROM_DAILY} WHERE {w} ORDER BY m.store_id, m.year, m.month, e.k::int"
            );
            ExportSql {
                count,
                copy: copy_statement(&select, spec.format, spec.header),
                select,
            }
        }
    }
}

fn copy_statement(select: &str, format: ExportFormat, header: bool) -> String {
    match format {
        ExportFormat::Csv => {
            format!("COPY ({select}) TO STDOUT WITH (FORMAT csv, HEADER {header})")
        }
        // JSON text never holds a raw control character, so with these as
        // quote and delimiter COPY never quotes: each row arrives as-is.
        ExportFormat::Json | ExportFormat::Ndjson => format!(
            "COPY ({select}) TO STDOUT WITH (FORMAT csv, DELIMITER E'\\x02', QUOTE E'\\x01')"
        ),
    }
}

/// A free-text column as a CSV cell: text that a spreadsheet would take for
/// a formula (starting with `=`, `+`, `-`, `@`, a tab or a carriage
/// return) gets a leading `'`, which spreadsheets show as text (OWASP's
/// advice on CSV injection). Store codes, names and regions: keys, dates
/// and numbers cannot start so. A code may start with `-` (`-A1` is a
/// formula to a spreadsheet); the import takes a code's leading `'` back off
/// (codes never contain one), so an export still imports back by code.
fn csv_text(col: &str) -> String {
    format!(
        "CASE WHEN left({col}, 1) IN ('=', '+', '-', '@', chr(9), chr(13)) \
         THEN '''' || {col} ELSE {col} END"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    fn admin() -> Principal {
        Principal {
            user_id: 1,
            email: None,
            role: Role::Admin,
            stores: Default::default(),
            exp: None,
            generation: 0,
            session: None,
            outside: false,
            identity: None,
        }
    }

    #[test]
    fn literals_are_escaped() {
        let f = SalesFilter {
            region: Some("a'); DROP TABLE x; --".into()),
            store_ids: Some(vec![1, 2]),
            min_total_sales: Some(sales_core::decimal::Bound::parse("0.5").unwrap()),
            from: Some((2024, 1)),
            ..Default::default()
        };
        let w = where_sql(&f, &admin());
        assert!(w.contains("s.region = E'a''); DROP TABLE x; --'"), "{w}");
        assert!(w.contains("ANY(ARRAY[1,2]::bigint[])"), "{w}");
        assert!(w.contains("m.total_sales >= '0.5'::numeric"), "{w}");
        assert!(w.contains("(m.year, m.month) >= (2024, 1)"), "{w}");
        let big = SalesFilter {
            max_total_sales: Some(sales_core::decimal::Bound::parse("1e21").unwrap()),
            ..Default::default()
        };
        assert!(where_sql(&big, &admin()).contains("<= '1000000000000000000000'::numeric"));
    }

    #[test]
    fn scope_is_applied() {
        let manager = Principal {
            user_id: 2,
            email: None,
            role: Role::Manager,
            stores: [3, 1].into_iter().collect(),
            exp: None,
            generation: 0,
            session: None,
            outside: false,
            identity: None,
        };
        assert!(where_sql(&SalesFilter::default(), &manager)
            .contains("m.store_id = ANY(ARRAY[1,3]::bigint[])"));
    }

    #[test]
    fn statements() {
        let f = SalesFilter::default();
        let who = admin();
        let s = build_sql(&ExportSpec {
            format: ExportFormat::Csv,
            shape: ExportShape::Daily,
            filter: &f,
            who: &who,
            after: Some(RowKey::parse("3:2024-02-10", ExportShape::Daily).unwrap()),
            projection: None,
            header: true,
        });
        assert!(s.copy.starts_with("COPY (SELECT "));
        assert!(s.copy.ends_with("WITH (FORMAT csv, HEADER true)"));
        assert!(s.copy.contains("e.k::int > 10"));
        assert!(s.count.contains("d.k::int > 10"));
        let j = build_sql(&ExportSpec {
            format: ExportFormat::Ndjson,
            shape: ExportShape::Monthly,
            filter: &f,
            who: &who,
            after: None,
            projection: None,
            header: true,
        });
        assert!(j.copy.contains("QUOTE E'\\x01'"), "{}", j.copy);
        assert!(j.copy.contains(SALES_DOC_TEXT));
    }
}
