//! What the table computes for every row: the CHECK constraint on
//! `monthly_sales.daily_data`, the derived totals (the SQL functions; the row
//! trigger in `rows.rs` computes the same in one pass) and the changed days
//! events report. All read the jsonb in place (see `jsonb.rs`):
//! they run once per row written, whoever writes.

use crate::jsonb::{Jb, JsonbDatum, NumericDatum, NumericSum, RawJsonb, RawMember};
use pgrx::prelude::*;
use sales_core::daily;
use sales_core::json::JsonRead;

/// True when `daily` is valid for `year`-`month`: a year in 2000..2100, a
/// month in 1..12, day keys that exist in that month, known metrics,
/// non-negative numbers. False exactly when [`daily_data_errors`] reports
/// something.
#[pg_extern(immutable, strict, parallel_safe)]
fn daily_data_valid(year: i32, month: i32, daily: RawJsonb) -> bool {
    let (year, month) = (year as i64, month as i64);
    (daily::MIN_YEAR..=daily::MAX_YEAR).contains(&year)
        && daily::days_in_month(year, month).is_some()
        && daily::is_valid_json(year, month, daily.root())
}

/// What the CHECK constraint on `monthly_sales.daily_data` calls, so that
/// every writer, SQL or API, is held to the same rules: [`daily_data_valid`],
/// except that a year or month out of range is left to the constraints on
/// those columns (true here), so that the error names the column that is
/// wrong (Postgres checks a table's constraints in name order, and
/// `monthly_sales_daily_data_check` sorts before the year's and the
/// month's).
#[pg_extern(immutable, strict, parallel_safe)]
fn daily_data_check(year: i32, month: i32, daily: RawJsonb) -> bool {
    daily::is_valid_json(year as i64, month as i64, daily.root())
}

/// Every problem with one `daily_data` value, as
/// `[{"field": "dailyData.31", "reason": "..."}]` (empty when valid).
#[pg_extern(immutable, strict, parallel_safe)]
fn daily_data_errors(year: i32, month: i32, daily: RawJsonb) -> pgrx::JsonB {
    let mut errors = Vec::new();
    if !(daily::MIN_YEAR..=daily::MAX_YEAR).contains(&(year as i64)) {
        errors.push(
            serde_json::json!({"field": "year", "reason": format!("{year} is outside 2000..2100")}),
        );
    }
    if daily::days_in_month(year as i64, month as i64).is_none() {
        errors.push(
            serde_json::json!({"field": "month", "reason": format!("{month} is outside 1..12")}),
        );
    }
    for e in daily::validate_json(year as i64, month as i64, daily.root(), "dailyData") {
        errors.push(serde_json::json!({"field": e.field, "reason": e.reason}));
    }
    pgrx::JsonB(serde_json::Value::Array(errors))
}

/// Sum of one metric over the days of `daily`, exactly (numeric). Days
/// without the metric, and values that are not numbers (which the CHECK
/// constraint refuses), count as nothing: like the row trigger's totals,
/// which run before constraints are checked, this must not fail on invalid
/// data.
#[pg_extern(immutable, strict, parallel_safe)]
fn daily_sum(daily: RawJsonb, metric: &str) -> NumericDatum {
    let mut sum = NumericSum::new();
    daily.root().each_member(|_, day| {
        // A day holds two or three metrics: a scan of its members beats a
        // binary search that builds a lookup value.
        if let Jb::Object(c) = day {
            if let Some((_, Jb::Number(n))) = c.members().find(|(k, _)| *k == metric) {
                sum.add(n);
            }
        }
    });
    sum.finish()
}

/// Number of days reported in `daily` (0 when it is not an object).
#[pg_extern(immutable, strict, parallel_safe)]
fn daily_days(daily: RawJsonb) -> i32 {
    match daily.root() {
        Jb::Object(c) => c.len() as i32,
        _ => 0,
    }
}

/// The days whose data differ between `old` and `new` (added, removed or
/// changed), as a JSON array of day keys in day order. For events.
#[pg_extern(immutable, parallel_safe)]
fn changed_days(old: Option<RawJsonb>, new: Option<RawJsonb>) -> pgrx::JsonB {
    let old_root = old.as_ref().map(|o| o.root()).unwrap_or(Jb::Null);
    let new_root = new.as_ref().map(|n| n.root()).unwrap_or(Jb::Null);
    pgrx::JsonB(serde_json::Value::Array(
        changed_day_keys(old_root, new_root)
            .into_iter()
            .map(|d| serde_json::Value::String(d.to_string()))
            .collect(),
    ))
}

/// The day keys whose data differ between `old` and `new`, in day order.
pub fn changed_day_keys<'a>(old: Jb<'a>, new: Jb<'a>) -> Vec<&'a str> {
    changed_days_with_old(old, new)
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// The days whose data differ between `old` and `new`, in day order, each
/// with its member in `old` (None: the day was not there). One pass over
/// the two months: both keep their keys in the same order (by length, then
/// bytes). Anything but an object (no old row) has no days.
pub fn changed_days_with_old<'a>(
    old: Jb<'a>,
    new: Jb<'a>,
) -> Vec<(&'a str, Option<RawMember<'a>>)> {
    let members = |j: Jb<'a>| match j {
        Jb::Object(c) => Some(c.members()),
        _ => None,
    };
    let mut days = Vec::new();
    crate::jsonb::walk_together(members(old), members(new), |o, n| match (o, n) {
        (Some(a), Some(b)) => {
            if !a.value().equals(b.value()) {
                days.push((b.key(), Some(a)));
            }
        }
        (Some(a), None) => days.push((a.key(), Some(a))),
        (None, Some(b)) => days.push((b.key(), None)),
        (None, None) => {}
    });
    days.sort_by_key(|(k, _)| (daily::parse_day_key(k).unwrap_or(u32::MAX), *k));
    days
}

/// `old || new` for months: the days of both, `new`'s data winning for a
/// day in both (what batch_upsert's merge mode writes). The same value, and
/// the same bytes, as jsonb's `||`, without its re-sorting and re-encoding
/// of every day ([`crate::jsonb::merge_objects`]). Anything but two objects
/// goes to `||` itself.
#[pg_extern(immutable, strict, parallel_safe)]
fn daily_merge(old: RawJsonb, new: RawJsonb) -> JsonbDatum {
    match (old.root(), new.root()) {
        (Jb::Object(a), Jb::Object(b)) => crate::jsonb::merge_objects(a, b),
        _ => {
            // SAFETY: jsonb_concat takes two jsonb datums.
            let d = unsafe {
                pgrx::direct_function_call_as_datum(
                    pg_sys::jsonb_concat,
                    &[old.datum().into_datum(), new.datum().into_datum()],
                )
            };
            JsonbDatum::from_datum(d.expect("jsonb || never returns NULL"))
        }
    }
}

/// True when merging `new` into `old` (`old || new`, day by day) would
/// change `old`: some day of `new` is missing from `old` or differs. Used by
/// batch_upsert's ON CONFLICT ... WHERE, which would otherwise build the
/// merged month a second time only to compare it.
#[pg_extern(immutable, strict, parallel_safe)]
fn daily_merge_changes(old: RawJsonb, new: RawJsonb) -> bool {
    let (Jb::Object(a), Jb::Object(b)) = (old.root(), new.root()) else {
        return true;
    };
    let mut changes = false;
    if b.len() <= 4 {
        // A day or a few: a binary search of the old month each.
        return b
            .members()
            .any(|(k, v)| !Jb::Object(a).get(k).is_some_and(|o| o.equals(v)));
    }
    // Most of a month: one pass over both months' members (the same
    // storage order) beats a binary search per day.
    crate::jsonb::walk_together(Some(a.members()), Some(b.members()), |o, n| match (o, n) {
        (_, None) => {}
        (None, Some(_)) => changes = true,
        (Some(a), Some(b)) => {
            if !changes && !a.value().equals(b.value()) {
                changes = true;
            }
        }
    });
    changes
}
