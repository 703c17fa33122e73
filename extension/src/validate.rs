//! The CHECK constraint on `monthly_sales.daily_data`.

use pgrx::prelude::*;
use sales_core::daily;

/// True when `daily` is valid for `year`-`month`: day keys that exist in that
/// month, known metrics, non-negative numbers. Backs a CHECK constraint, so
/// every writer, SQL or API, is held to the same rules.
#[pg_extern(immutable, strict, parallel_safe)]
fn daily_data_valid(year: i32, month: i32, daily: pgrx::JsonB) -> bool {
    daily::is_valid(year as i64, month as i64, &daily.0)
}

/// Every problem with one `daily_data` value, as
/// `[{"field": "dailyData.31", "reason": "..."}]` (empty when valid).
#[pg_extern(immutable, strict, parallel_safe)]
fn daily_data_errors(year: i32, month: i32, daily: pgrx::JsonB) -> pgrx::JsonB {
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
    for e in daily::validate(year as i64, month as i64, &daily.0, "dailyData") {
        errors.push(serde_json::json!({"field": e.field, "reason": e.reason}));
    }
    pgrx::JsonB(serde_json::Value::Array(errors))
}
