//! Listing: sort keys, keyset cursors, the list query and its page.

use super::MAX_LIMIT;
use crate::auth::Principal;
use crate::db::sql::Binds;
use crate::http::error::{ApiError, ApiResult};
use crate::http::filters::SalesFilter;
use crate::state::AppState;
use base64::Engine;
use sales_core::projection::Projection;
use sales_core::sql::{push_sales_doc, push_terms, Term};
use serde_json::{json, Value};
use sqlx::{Postgres, QueryBuilder, Row};

/// A sortable key: (name, SQL expression, SQL type for cursor values,
/// whether the column can be NULL). The totals are NULL only for rows written
/// past the row trigger (plain SQL with `session_replication_role = replica`),
/// but a page must still hold them, once each.
const SORT_KEYS: &[(&str, &str, &str, bool)] = &[
    ("id", "m.id", "bigint", false),
    ("storeId", "m.store_id", "bigint", false),
    ("year", "m.year", "integer", false),
    ("month", "m.month", "integer", false),
    ("totalSales", "m.total_sales", "numeric", true),
    ("totalCustomers", "m.total_customers", "bigint", true),
    ("daysReported", "m.days_reported", "integer", true),
    ("updatedAt", "m.updated_at", "timestamptz", false),
    ("createdAt", "m.created_at", "timestamptz", false),
];

#[derive(Debug, Clone)]
pub struct SortKey {
    pub name: &'static str,
    pub expr: &'static str,
    pub ty: &'static str,
    pub desc: bool,
    pub nullable: bool,
}

/// `-year,-month,storeId` -> keys (camelCase or snake_case; `period` = year, month).
pub fn parse_sort(raw: Option<&str>) -> ApiResult<Vec<SortKey>> {
    // Given, it names keys: `sort=` or `sort=,` (an unset variable in a
    // client) is refused rather than read as the default or as `id` alone.
    if raw.is_some_and(|r| r.split(',').all(|p| p.trim().is_empty())) {
        return Err(ApiError::bad_param(
            "sort",
            "names no key (leave the parameter out for the default, storeId,year,month)",
        ));
    }
    if let Some(r) = raw.filter(|r| r.split(',').any(|p| p.trim().is_empty())) {
        return Err(ApiError::bad_param(
            "sort",
            format!("{r:?} has an empty key between commas"),
        ));
    }
    let raw = raw.unwrap_or("storeId,year,month");
    let mut keys: Vec<SortKey> = Vec::new();
    for part in raw.split(',').map(str::trim) {
        let (desc, name) = match part.strip_prefix('-') {
            Some(n) => (true, n),
            None => (false, part.strip_prefix('+').unwrap_or(part)),
        };
        // Exactly camelCase or snake_case (`_store_id` is no name).
        let camel = sales_core::names::camel_of(name).unwrap_or_default();
        let names: Vec<&str> = if camel == "period" {
            vec!["year", "month"]
        } else {
            vec![camel.as_str()]
        };
        for n in names {
            let Some((k, expr, ty, nullable)) = SORT_KEYS.iter().find(|(k, ..)| *k == n) else {
                return Err(ApiError::bad_param(
                    "sort",
                    format!(
                        "cannot sort by {name:?}; allowed: period, {}",
                        SORT_KEYS.iter().map(|k| k.0).collect::<Vec<_>>().join(", ")
                    ),
                ));
            };
            if keys.iter().any(|e| e.name == *k) {
                let by_period = raw
                    .split(',')
                    .any(|p| p.trim().trim_start_matches(['-', '+']) == "period");
                let hint = if by_period && (*k == "year" || *k == "month") {
                    " (period is year, month)"
                } else {
                    ""
                };
                return Err(ApiError::bad_param(
                    "sort",
                    format!("{k} given twice{hint}"),
                ));
            }
            keys.push(SortKey {
                name: k,
                expr,
                ty,
                desc,
                nullable: *nullable,
            });
        }
    }
    if keys.len() > 6 {
        return Err(ApiError::bad_param("sort", "at most 6 keys"));
    }
    // The id makes the order total, so keyset pages never skip or repeat a row.
    if !keys.iter().any(|k| k.name == "id") {
        keys.push(SortKey {
            name: "id",
            expr: "m.id",
            ty: "bigint",
            desc: false,
            nullable: false,
        });
    }
    Ok(keys)
}

pub fn sort_spec(keys: &[SortKey]) -> String {
    keys.iter()
        .map(|k| format!("{}{}", if k.desc { "-" } else { "" }, k.name))
        .collect::<Vec<_>>()
        .join(",")
}

/// Opaque keyset cursor: the sort it belongs to, a digest of the filters it
/// was issued under, and the last row's key values (JSON null for a NULL).
pub fn encode_cursor(spec: &str, filters: &str, values: &[Option<String>]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"s": spec, "f": filters, "v": values}).to_string())
}

/// The digest a cursor carries of the filters its page was read with, so
/// a cursor reused under other filters is refused rather than resuming
/// another listing from this one's position. Each filter given is written
/// by its parameter's name and a canonical value (ids sorted and
/// deduplicated by the parser, `-0` as `0`); filters not given are left
/// out, so a filter added in a later version changes no earlier digest.
pub fn filters_digest(filter: &SalesFilter) -> String {
    use sha2::Digest;
    let SalesFilter {
        store_ids,
        region,
        year,
        month,
        from,
        to,
        min_total_sales,
        max_total_sales,
    } = filter;
    let number = |v: &sales_core::decimal::Bound| v.to_string();
    let parts = [
        store_ids.as_ref().map(|ids| {
            let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
            ("storeId", ids.join(","))
        }),
        region.as_ref().map(|r| ("region", r.clone())),
        year.map(|y| ("year", y.to_string())),
        month.map(|m| ("month", m.to_string())),
        from.map(|(y, m)| ("from", format!("{y}-{m}"))),
        to.map(|(y, m)| ("to", format!("{y}-{m}"))),
        min_total_sales
            .as_ref()
            .map(|v| ("minTotalSales", number(v))),
        max_total_sales
            .as_ref()
            .map(|v| ("maxTotalSales", number(v))),
    ];
    // JSON of the pairs: no value can pass for a separator.
    let text =
        serde_json::to_string(&parts.iter().flatten().collect::<Vec<_>>()).unwrap_or_default();
    let d = sha2::Sha256::digest(text.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&d[..9])
}

pub fn decode_cursor(
    raw: &str,
    spec: &str,
    filters: &str,
    n: usize,
) -> ApiResult<Vec<Option<String>>> {
    let bad = |why: &str| ApiError::bad_param("cursor", why.to_string());
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw.trim())
        .map_err(|_| bad("not a cursor from this API"))?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad("not a cursor from this API"))?;
    if v["s"].as_str() != Some(spec) {
        return Err(bad(
            "the cursor belongs to a different sort; keep `sort` the same across pages",
        ));
    }
    // A cursor without a digest was issued before cursors carried one (a
    // page read from an earlier version during an upgrade): it is taken as
    // it was then, bound to its sort only.
    if v.get("f").is_some() && v["f"].as_str() != Some(filters) {
        return Err(bad(
            "the cursor belongs to other filters; keep storeId, region, year, month, from, to, \
             minTotalSales and maxTotalSales the same across pages",
        ));
    }
    let vals: Vec<Option<String>> = v["v"]
        .as_array()
        .ok_or_else(|| bad("malformed cursor"))?
        .iter()
        .map(|x| match x {
            Value::Null => Some(None),
            x => x.as_str().map(|s| Some(s.to_string())),
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("malformed cursor"))?;
    if vals.len() != n {
        return Err(bad("malformed cursor"));
    }
    Ok(vals)
}

/// Checks each cursor value against its key's SQL type, so a tampered
/// cursor is a 400 naming `cursor`, not a failed cast in Postgres.
pub fn check_cursor_values(keys: &[SortKey], vals: &[Option<String>]) -> ApiResult<()> {
    for (k, v) in keys.iter().zip(vals) {
        let Some(v) = v else {
            if k.nullable {
                continue;
            }
            return Err(ApiError::bad_param(
                "cursor",
                format!("not a cursor from this API ({} is never null)", k.name),
            ));
        };
        let ok = match k.ty {
            "bigint" => v.parse::<i64>().is_ok(),
            "integer" => v.parse::<i32>().is_ok(),
            // NaN and the infinities too: a total written past the row
            // trigger may be one, and Postgres sorts them like values.
            "numeric" => {
                v.parse::<f64>().is_ok_and(f64::is_finite)
                    || matches!(v.as_str(), "NaN" | "Infinity" | "-Infinity")
            }
            "timestamptz" => chrono::DateTime::parse_from_str(v, "%Y-%m-%d %H:%M:%S%.f%#z")
                .is_ok_and(|t| (1..=9999).contains(&chrono::Datelike::year(&t))),
            _ => false,
        };
        if !ok {
            return Err(ApiError::bad_param(
                "cursor",
                format!(
                    "not a cursor from this API ({} is not a valid {})",
                    k.name, k.ty
                ),
            ));
        }
    }
    Ok(())
}

/// `(k1, k2, ...) after (v1, v2, ...)` for mixed directions, as an OR chain.
/// NULLs sort as Postgres sorts them: last ascending, first descending.
fn push_keyset(qb: &mut QueryBuilder<'_, Postgres>, keys: &[SortKey], vals: &[Option<String>]) {
    let cast = |qb: &mut QueryBuilder<'_, Postgres>, k: &SortKey, v: &str| {
        qb.push("CAST(")
            .push_bind(v.to_string())
            .push(format!(" AS {})", k.ty));
    };
    qb.push(" AND (");
    for i in 0..keys.len() {
        if i > 0 {
            qb.push(" OR ");
        }
        qb.push("(");
        for (j, k) in keys.iter().enumerate().take(i) {
            qb.push(k.expr);
            match &vals[j] {
                Some(v) => {
                    qb.push(" = ");
                    cast(qb, k, v);
                }
                None => {
                    qb.push(" IS NULL");
                }
            }
            qb.push(" AND ");
        }
        let k = &keys[i];
        match (&vals[i], k.desc) {
            // Ascending: greater values, then the NULLs.
            (Some(v), false) => {
                qb.push("(").push(k.expr).push(" > ");
                cast(qb, k, v);
                if k.nullable {
                    qb.push(" OR ").push(k.expr).push(" IS NULL");
                }
                qb.push(")");
            }
            // Nothing sorts after a NULL ascending.
            (None, false) => {
                qb.push("false");
            }
            // Descending: the NULLs came first; then smaller values.
            (Some(v), true) => {
                qb.push(k.expr).push(" < ");
                cast(qb, k, v);
            }
            (None, true) => {
                qb.push(k.expr).push(" IS NOT NULL");
            }
        }
        qb.push(")");
    }
    qb.push(")");
}

/// Everything a list query needs, checked.
pub struct ListQuery<'a> {
    pub who: &'a Principal,
    pub filter: &'a SalesFilter,
    pub projection: &'a Projection,
    pub keys: &'a [SortKey],
    pub spec: &'a str,
    pub limit: i64,
    pub requested: i64,
    pub offset: i64,
    pub after: Option<&'a Vec<Option<String>>>,
    pub include_meta: bool,
}

/// The list query for `q`, built fresh for each attempt (binds are consumed).
fn list_query(q: &ListQuery<'_>) -> QueryBuilder<'static, Postgres> {
    let mut qb: QueryBuilder<Postgres> = QueryBuilder::new("SELECT (");
    push_sales_doc(&mut Binds(&mut qb), q.projection);
    qb.push(")::text AS doc, ARRAY[");
    for (i, k) in q.keys.iter().enumerate() {
        if i > 0 {
            qb.push(", ");
        }
        qb.push(k.expr).push("::text");
    }
    // LEFT JOIN: the same rows as an inner join (store_id is a NOT NULL
    // foreign key), and dropped by the planner when no store column is used
    // (see export/sql.rs).
    qb.push(
        "] AS cur FROM sales.monthly_sales m LEFT JOIN sales.stores s ON s.id = m.store_id WHERE true",
    );
    q.filter.push_where(&mut Binds(&mut qb), q.who);
    if let Some(vals) = q.after {
        push_keyset(&mut qb, q.keys, vals);
    }
    qb.push(" ORDER BY ");
    for (i, k) in q.keys.iter().enumerate() {
        if i > 0 {
            qb.push(", ");
        }
        qb.push(k.expr).push(if k.desc { " DESC" } else { " ASC" });
    }
    qb.push(" LIMIT ").push_bind(q.limit + 1);
    if q.offset > 0 {
        qb.push(" OFFSET ").push_bind(q.offset);
    }
    qb
}

/// Runs a list query; the body is the page as JSON text.
pub async fn list_body(state: &AppState, q: ListQuery<'_>) -> ApiResult<String> {
    let rows = crate::db::retry("sales_list", true, || async {
        let mut conn = state.read_conn().await?;
        let mut qb = list_query(&q);
        crate::metrics::timed("sales_list", qb.build().fetch_all(&mut *conn)).await
    })
    .await?;
    let has_more = rows.len() as i64 > q.limit;
    let rows = &rows[..rows.len().min(q.limit as usize)];
    let mut body = String::with_capacity(
        rows.iter()
            .map(|r| r.get::<&str, _>(0).len() + 1)
            .sum::<usize>()
            + 256,
    );
    body.push_str("{\"data\":[");
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(r.get::<&str, _>(0));
    }
    body.push(']');
    if q.include_meta {
        let next = if has_more {
            rows.last().map(|r| {
                encode_cursor(
                    q.spec,
                    &filters_digest(q.filter),
                    &r.get::<Vec<Option<String>>, _>(1),
                )
            })
        } else {
            None
        };
        let meta = json!({
            "fields": q.projection.fields, "exclude": q.projection.excluded, "count": rows.len(),
            "limit": q.limit, "limitClamped": q.requested > MAX_LIMIT, "nextCursor": next, "sort": q.spec,
        });
        body.push_str(",\"meta\":");
        body.push_str(&meta.to_string());
    }
    body.push('}');
    Ok(body)
}

/// One record as `{"data": ...}`; outside the caller's scope is the same
/// 404 as missing: the answer must not tell which store owns a record the
/// caller may not see.
pub(super) async fn one_body(
    state: &AppState,
    id: i64,
    projection: &Projection,
    who: &Principal,
) -> ApiResult<String> {
    let scope = who.scope();
    let doc: Option<String> = crate::db::retry("sales_get", true, || async {
        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new("SELECT (");
        push_sales_doc(&mut Binds(&mut qb), projection);
        qb.push(
            ")::text FROM sales.monthly_sales m LEFT JOIN sales.stores s ON s.id = m.store_id WHERE m.id = ",
        )
        .push_bind(id);
        if let Some(scope) = &scope {
            push_terms(&mut Binds(&mut qb), &[Term::StoreIn(scope)]);
        }
        let mut conn = state.read_conn().await?;
        crate::metrics::timed(
            "sales_get",
            qb.build_query_scalar().fetch_optional(&mut *conn),
        )
        .await
    })
    .await?;
    let doc = doc.ok_or_else(|| ApiError::not_found(format!("no sales record {id}")))?;
    Ok(format!("{{\"data\":{doc}}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_parsing() {
        let k = parse_sort(Some("-period,store_id")).unwrap();
        assert_eq!(sort_spec(&k), "-year,-month,storeId,id");
        assert!(parse_sort(Some("name")).is_err());
        assert!(parse_sort(Some("year,-year")).is_err());
        assert!(parse_sort(Some("year,,month")).is_err());
        assert!(parse_sort(Some("year,")).is_err());
        // A key that `period` holds too is named with what period is.
        let twice = |raw| format!("{:?}", parse_sort(Some(raw)).unwrap_err());
        assert!(twice("year,-period").contains("year given twice (period is year, month)"));
        assert!(!twice("year,-year").contains("period"));
        assert!(!twice("period,storeId,storeId").contains("period is"));
        assert_eq!(
            sort_spec(&parse_sort(None).unwrap()),
            "storeId,year,month,id"
        );
    }

    fn some(v: &[&str]) -> Vec<Option<String>> {
        v.iter().map(|s| Some(s.to_string())).collect()
    }

    #[test]
    fn cursor_values_are_typed() {
        let keys = parse_sort(Some("-updatedAt,totalSales")).unwrap();
        let ok = some(&["2024-01-05 10:11:12.123456+00", "12.5", "9"]);
        assert!(check_cursor_values(&keys, &ok).is_ok());
        // A NULL total is a value of the sort; a NULL time or id is not.
        let null_total = vec![
            Some("2024-01-05 10:11:12+00".to_string()),
            None,
            Some("9".into()),
        ];
        assert!(check_cursor_values(&keys, &null_total).is_ok());
        for bad in [
            some(&["2024-13-45 10:11:12+00", "1", "9"]),
            some(&["2024-01-05 10:11:12+00", "1e999", "9"]),
            some(&["2024-01-05 10:11:12+00", "1", "99999999999999999999"]),
            vec![None, Some("1".into()), Some("9".into())],
            vec![
                Some("2024-01-05 10:11:12+00".into()),
                Some("1".into()),
                None,
            ],
        ] {
            assert!(check_cursor_values(&keys, &bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cursor_round_trip() {
        let c = encode_cursor("storeId,id", "f1", &some(&["1", "9"]));
        assert_eq!(
            decode_cursor(&c, "storeId,id", "f1", 2).unwrap(),
            some(&["1", "9"])
        );
        let c = encode_cursor("totalSales,id", "f2", &[None, Some("9".into())]);
        assert_eq!(
            decode_cursor(&c, "totalSales,id", "f2", 2).unwrap(),
            vec![None, Some("9".to_string())]
        );
        assert!(decode_cursor(&c, "-storeId,id", "f2", 2).is_err());
        // Other filters than the page was read with.
        assert!(decode_cursor(&c, "totalSales,id", "f1", 2).is_err());
        assert!(decode_cursor("garbage!", "storeId,id", "f1", 2).is_err());
        // Filters that differ digest differently; equal ones alike.
        let a = SalesFilter {
            store_ids: Some(vec![1, 2]),
            ..Default::default()
        };
        let b = SalesFilter {
            store_ids: Some(vec![1]),
            ..Default::default()
        };
        assert_ne!(filters_digest(&a), filters_digest(&b));
        assert_eq!(filters_digest(&a), filters_digest(&a.clone()));
        let zero = |v: &str| SalesFilter {
            min_total_sales: Some(sales_core::decimal::Bound::parse(v).unwrap()),
            ..Default::default()
        };
        assert_eq!(filters_digest(&zero("0")), filters_digest(&zero("-0")));
        assert_eq!(filters_digest(&zero("10")), filters_digest(&zero("1e1")));
        assert_ne!(filters_digest(&zero("0")), filters_digest(&zero("0.5")));
        assert_ne!(
            filters_digest(&zero("1234567890123.4567")),
            filters_digest(&zero("1234567890123.4568"))
        );
        // A year is not a month, nor a region a store.
        let year = SalesFilter {
            year: Some(2024),
            ..Default::default()
        };
        let month = SalesFilter {
            month: Some(2024),
            ..Default::default()
        };
        assert_ne!(filters_digest(&year), filters_digest(&month));
        // A cursor from before digests: bound to its sort only.
        let legacy = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(r#"{"s":"storeId,id","v":["1","9"]}"#);
        assert!(decode_cursor(&legacy, "storeId,id", "any", 2).is_ok());
    }
}
