//! Query parameters shared by list, summary and export: parsed into typed
//! values, checked against the caller's scope, and rendered into SQL by
//! `sales_core::sql` (as bind parameters, or as literals for COPY).

use super::error::{ApiError, ApiResult};
use crate::auth::Principal;
use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::types::{ParseFromParameter, ParseResult, Type};
use sales_core::decimal::Bound;
use sales_core::projection::{Projection, Shape};
use sales_core::sql::{push_terms, SqlWriter, Term};
use std::borrow::Cow;

#[derive(Debug, Clone, Default)]
pub struct SalesFilter {
    pub store_ids: Option<Vec<i64>>,
    pub region: Option<String>,
    pub year: Option<i32>,
    pub month: Option<i32>,
    pub from: Option<(i32, i32)>,
    pub to: Option<(i32, i32)>,
    pub min_total_sales: Option<Bound>,
    pub max_total_sales: Option<Bound>,
}

/// A total bound as it arrives (`minTotalSales=1234567890123.4567`): its
/// text, kept whole so that no digit is lost to a double, checked by
/// [`SalesFilter::parse`] (which names the parameter). Documented as a
/// number of at least 0.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TotalParam(pub String);

impl Type for TotalParam {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        "number_decimal".into()
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            minimum: Some(0.0),
            description: Some("a decimal, compared with totals digit for digit"),
            ..MetaSchema::new("number")
        }))
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        Some(self)
    }

    fn raw_element_iter<'a>(
        &'a self,
    ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }
}

impl ParseFromParameter for TotalParam {
    fn parse_from_parameter(value: &str) -> ParseResult<Self> {
        Ok(TotalParam(value.to_string()))
    }
}

/// Raw filter parameters as they arrive.
#[derive(Debug, Clone, Default)]
pub struct RawFilter {
    pub store_id: Option<String>,
    pub region: Option<String>,
    pub year: Option<i32>,
    pub month: Option<i32>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub min_total_sales: Option<TotalParam>,
    pub max_total_sales: Option<TotalParam>,
}

/// `1,2,3` -> ids; each must be a positive integer; at most 1,000.
pub fn parse_id_list(param: &str, raw: &str) -> ApiResult<Vec<i64>> {
    let mut out = Vec::new();
    if raw.split(',').all(|p| p.trim().is_empty()) {
        return Err(ApiError::bad_param(param, "give at least one id"));
    }
    for part in raw.split(',') {
        let p = part.trim();
        if p.is_empty() {
            // `1,` or `1,,2`: a value the client left out, not "no more".
            return Err(ApiError::bad_param(
                param,
                format!("{raw:?} has an empty item between commas"),
            ));
        }
        match p.parse::<i64>() {
            Ok(v) if v > 0 => out.push(v),
            Err(_) if p.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(ApiError::bad_param(
                    param,
                    format!("{p:?} is out of range (ids are at most {})", i64::MAX),
                ))
            }
            _ => {
                return Err(ApiError::bad_param(
                    param,
                    format!("{p:?} is not a positive integer id"),
                ))
            }
        }
    }
    if out.is_empty() {
        return Err(ApiError::bad_param(param, "give at least one id"));
    }
    if out.len() > 1000 {
        return Err(ApiError::bad_param(param, "at most 1000 ids"));
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The `region` query parameter: trimmed and checked. Given but empty is a
/// 400, as `after=` is for exports: a client that sends an unset variable
/// must not get every region's rows as if it had asked for them.
pub fn region_filter(raw: Option<&str>) -> ApiResult<Option<String>> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    // Characters no region holds are refused before trimming, which would
    // take a line separator or U+0085 at either end off unseen.
    check_region_chars(raw)?;
    let r = raw.trim();
    if r.is_empty() {
        return Err(ApiError::bad_param(
            "region",
            "must not be empty (leave the parameter out for every region)",
        ));
    }
    // As store regions are judged: one of invisible characters only names
    // no region a store can have.
    if shows_nothing(r) {
        return Err(ApiError::bad_param(
            "region",
            "has nothing visible; no store's region is blank",
        ));
    }
    check_region(r)?;
    Ok(Some(r.to_string()))
}

pub(crate) use sales_core::names::{breaks_text, shows_nothing};

fn check_region_chars(r: &str) -> ApiResult<()> {
    if r.chars().any(breaks_text) {
        return Err(ApiError::bad_param(
            "region",
            "must not contain control characters, line separators or direction overrides",
        ));
    }
    Ok(())
}

/// A region as a filter: what a store's region can be (1..100 characters,
/// counted as Postgres counts them), so a filter no store can match is a 400
/// naming `region` rather than an empty page or an encoding error.
fn check_region(r: &str) -> ApiResult<()> {
    // The characters a store's region may not hold (controls and line
    // separators, as the store endpoints' pattern has it).
    check_region_chars(r)?;
    if r.chars().count() > 100 {
        return Err(ApiError::bad_param("region", "at most 100 characters"));
    }
    Ok(())
}

/// `2024-06` -> (2024, 6).
pub fn parse_period(param: &str, raw: &str) -> ApiResult<(i32, i32)> {
    sales_core::sql::parse_period(raw).ok_or_else(|| {
        // A month written right but outside what a record can hold says
        // which part is out of range.
        let why = match sales_core::sql::period_parts(raw) {
            Some((y, _)) if !(2000..=2100).contains(&y) => {
                format!("{raw:?}: the year must be between 2000 and 2100")
            }
            Some(_) => format!("{raw:?}: the month must be between 01 and 12"),
            None => format!("{raw:?} is not a month like 2024-06"),
        };
        ApiError::bad_param(param, why)
    })
}

/// Comma-separated field paths -> a checked projection (400 naming the field).
pub fn parse_projection(
    shape: &Shape,
    fields: Option<&str>,
    exclude: Option<&str>,
) -> ApiResult<Projection> {
    // Given, a list names a field in every place: `fields=` (an unset
    // variable) is not the whole document, nor `id,,year` the two names.
    let split = |param: &str, s: Option<&str>| -> ApiResult<Vec<String>> {
        let Some(v) = s else { return Ok(Vec::new()) };
        let names: Vec<String> = v.split(',').map(|p| p.trim().to_string()).collect();
        if names.iter().all(String::is_empty) {
            return Err(ApiError::bad_param(
                param,
                "give at least one field path (leave the parameter out for the whole document)",
            ));
        }
        if names.iter().any(String::is_empty) {
            return Err(ApiError::bad_param(
                param,
                format!("{v:?} has an empty name between commas"),
            ));
        }
        Ok(names)
    };
    let f = split("fields", fields)?;
    let x = split("exclude", exclude)?;
    Projection::new(shape, &f, &x).map_err(|mut e| {
        let param = if e.field.is_empty() {
            // The bound on both lists together: named by the list given,
            // `fields` when both are.
            if !f.is_empty() && !x.is_empty() {
                e.reason = format!("{} (fields and exclude together)", e.reason);
            }
            if f.is_empty() {
                "exclude"
            } else {
                "fields"
            }
        } else if f.iter().any(|p| p == &e.field) {
            "fields"
        } else {
            "exclude"
        };
        ApiError::bad_param_with(
            format!("{param}: {e}"),
            if e.field.is_empty() {
                // A bound on the lists, not on one path.
                serde_json::json!({"parameter": param, "reason": e.reason})
            } else {
                serde_json::json!({"parameter": param, "field": e.field, "reason": e.reason})
            },
        )
    })
}

impl SalesFilter {
    pub fn parse(raw: &RawFilter) -> ApiResult<Self> {
        if let Some(y) = raw.year {
            if !(2000..=2100).contains(&y) {
                return Err(ApiError::bad_param(
                    "year",
                    format!("{y} is outside 2000..2100"),
                ));
            }
        }
        if let Some(m) = raw.month {
            if !(1..=12).contains(&m) {
                return Err(ApiError::bad_param(
                    "month",
                    format!("{m} is outside 1..12"),
                ));
            }
        }
        let from = raw
            .from
            .as_deref()
            .map(|v| parse_period("from", v))
            .transpose()?;
        let to = raw
            .to
            .as_deref()
            .map(|v| parse_period("to", v))
            .transpose()?;
        if let (Some(f), Some(t)) = (from, to) {
            if f > t {
                return Err(ApiError::bad_param("from", "must not be after `to`"));
            }
        }
        // year/month and from/to that select no month at all: the same
        // refusal as summaries give (a list or export of nothing, answered
        // 200, would hide the mistake).
        sales_core::summary::period(raw.year, raw.month, from, to)
            .map_err(|e| ApiError::bad_param(e.param, e.reason))?;
        let bound = |name: &str, v: &Option<TotalParam>| {
            v.as_ref()
                .map(|v| Bound::parse(&v.0).map_err(|e| ApiError::bad_param(name, e.to_string())))
                .transpose()
        };
        let min_total_sales = bound("minTotalSales", &raw.min_total_sales)?;
        let max_total_sales = bound("maxTotalSales", &raw.max_total_sales)?;
        // Bounds that admit no total: refused like a period that selects
        // no month.
        if let (Some(lo), Some(hi)) = (&min_total_sales, &max_total_sales) {
            if lo > hi {
                return Err(ApiError::bad_param(
                    "minTotalSales",
                    "must not be above maxTotalSales",
                ));
            }
        }
        let region = region_filter(raw.region.as_deref())?;
        Ok(Self {
            store_ids: raw
                .store_id
                .as_deref()
                .map(|s| parse_id_list("storeId", s))
                .transpose()?,
            region,
            year: raw.year,
            month: raw.month,
            from,
            to,
            min_total_sales,
            max_total_sales,
        })
    }

    /// 403 when the caller names a store outside its scope.
    pub fn check_scope(&self, who: &Principal) -> ApiResult<()> {
        if let Some(ids) = &self.store_ids {
            let denied: Vec<i64> = ids
                .iter()
                .copied()
                .filter(|id| !who.can_access_store(*id))
                .collect();
            if !denied.is_empty() {
                return Err(ApiError::outside_scope(denied));
            }
        }
        Ok(())
    }

    /// Appends the filter and the caller's scope as `AND ...` conditions on
    /// `m` (monthly_sales) and `s` (stores): the one place that says which
    /// conditions a sales read gets, for list, summary and export alike.
    pub fn push_where(&self, w: &mut impl SqlWriter, who: &Principal) {
        let scope = who.scope();
        push_terms(w, &self.terms(scope.as_deref()));
    }

    /// The filter and the caller's scope (`who.scope()`) as terms.
    pub fn terms<'a>(&'a self, scope: Option<&'a [i64]>) -> Vec<Term<'a>> {
        let mut terms = Vec::with_capacity(8);
        if let Some(ids) = &self.store_ids {
            terms.push(Term::StoreIn(ids));
        }
        if let Some(scope) = scope {
            terms.push(Term::StoreIn(scope));
        }
        if let Some(r) = &self.region {
            terms.push(Term::Region(r));
        }
        terms.extend(self.year.map(Term::Year));
        terms.extend(self.month.map(Term::Month));
        terms.extend(self.from.map(|(y, m)| Term::From(y, m)));
        terms.extend(self.to.map(|(y, m)| Term::To(y, m)));
        terms.extend(self.min_total_sales.as_ref().map(Term::MinTotalSales));
        terms.extend(self.max_total_sales.as_ref().map(Term::MaxTotalSales));
        terms
    }

    /// The stores a write or read touches, for cache tags (None = many).
    pub fn single_store(&self) -> Option<i64> {
        match self.store_ids.as_deref() {
            Some([one]) => Some(*one),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_lists() {
        assert_eq!(parse_id_list("storeId", "3, 1,3").unwrap(), vec![1, 3]);
        assert!(parse_id_list("storeId", "1,x").is_err());
        assert!(parse_id_list("storeId", "-1").is_err());
        assert!(parse_id_list("storeId", ",").is_err());
        for gap in ["1,", ",1", "1,,2", "1, ,2"] {
            let e = parse_id_list("storeId", gap).unwrap_err();
            assert!(format!("{e:?}").contains("empty item"), "{gap}: {e:?}");
        }
    }

    #[test]
    fn periods() {
        assert_eq!(parse_period("from", "2024-06").unwrap(), (2024, 6));
        assert!(parse_period("from", "2024-13").is_err());
        assert!(parse_period("from", "june").is_err());
    }
}
