//! Rules for `daily_data`: `{"<day>": {"sales": n, "customers": n}, ...}`.
//!
//! The same function backs the table's CHECK constraint (through the
//! extension) and the per-record report of `batch_upsert`, so a row refused by
//! one is refused by the other.

use crate::json::{JsonRead, Kind};
use crate::FieldError;
use serde_json::Value;

pub const MIN_YEAR: i64 = 2000;
pub const MAX_YEAR: i64 = 2100;
/// Largest value accepted for any metric; keeps totals far inside `numeric`
/// and JavaScript's exact integer range.
pub const MAX_METRIC: f64 = 1e12;

/// Metrics a day may carry, and whether each must be a whole number.
pub const METRICS: &[(&str, bool)] = &[
    ("sales", false),
    ("customers", true),
    ("transactions", true),
];

pub fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// Days in `month` of `year`, or `None` when the month is not 1..=12.
pub fn days_in_month(year: i64, month: i64) -> Option<u32> {
    Some(match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => return None,
    })
}

/// Parses a day key: canonical decimal (`"7"`, not `"07"` or `" 7"`).
pub fn parse_day_key(key: &str) -> Option<u32> {
    if key.is_empty()
        || key.len() > 2
        || key.starts_with('0')
        || !key.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    key.parse().ok()
}

/// Every problem with `daily` for the given month, with paths under `prefix`
/// (usually `dailyData`). An empty result means valid.
pub fn validate(year: i64, month: i64, daily: &Value, prefix: &str) -> Vec<FieldError> {
    validate_json(year, month, daily, prefix)
}

/// [`validate`] for any [`JsonRead`] value (the extension passes binary
/// jsonb). Paths are only built for values that are refused: a valid month
/// is checked without allocating.
pub fn validate_json<'a, J: JsonRead<'a>>(
    year: i64,
    month: i64,
    daily: J,
    prefix: &str,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let Some(days) = days_in_month(year, month) else {
        // The month itself is reported by the caller; day keys cannot be judged.
        return errors;
    };
    if daily.kind() != Kind::Object {
        errors.push(FieldError::new(
            prefix,
            "must be an object keyed by day of month",
        ));
        return errors;
    }
    daily.each_member(|key, value| match parse_day_key(key) {
        None => errors.push(FieldError::new(
            format!("{prefix}.{key}"),
            format!("day key must be a number from 1 to {days}"),
        )),
        Some(d) if d == 0 || d > days => errors.push(FieldError::new(
            format!("{prefix}.{key}"),
            format!("day {d} does not exist in {year}-{month:02} ({days} days)"),
        )),
        Some(_) => validate_day(value, prefix, key, &mut errors),
    });
    errors
}

fn validate_day<'a, J: JsonRead<'a>>(
    value: J,
    prefix: &str,
    key: &str,
    errors: &mut Vec<FieldError>,
) {
    if value.kind() != Kind::Object {
        errors.push(FieldError::new(
            format!("{prefix}.{key}"),
            "must be an object like {\"sales\": 1000, \"customers\": 52}",
        ));
        return;
    }
    if value.is_empty() {
        errors.push(FieldError::new(
            format!("{prefix}.{key}"),
            "must hold at least one metric (sales, customers, transactions)",
        ));
    }
    value.each_member(|metric, v| {
        let path = || format!("{prefix}.{key}.{metric}");
        let Some(&(_, whole)) = METRICS.iter().find(|(m, _)| *m == metric) else {
            errors.push(FieldError::new(
                path(),
                "unknown metric; allowed: sales, customers, transactions",
            ));
            return;
        };
        // Judged exactly where the reader holds the number's digits (the
        // extension's jsonb: what is stored is what is checked), else by
        // its f64 value.
        let reason = match v.number_class() {
            None => Some("must be a number"),
            Some(c) if c.special => Some("must be a number"),
            Some(c) if c.negative => Some("must not be negative"),
            Some(c) if c.above_max => Some("is larger than 1e12"),
            Some(c) if whole && c.fractional => Some("must be a whole number"),
            Some(_) => None,
        };
        if let Some(reason) = reason {
            errors.push(FieldError::new(path(), reason));
        }
    });
}

/// Boolean form used by the table's CHECK constraint on `daily_data`. A bad
/// year or month is left to their own constraints (true here), so the error
/// names the column that is wrong.
pub fn is_valid(year: i64, month: i64, daily: &Value) -> bool {
    is_valid_json(year, month, daily)
}

/// [`is_valid`] for any [`JsonRead`] value.
pub fn is_valid_json<'a, J: JsonRead<'a>>(year: i64, month: i64, daily: J) -> bool {
    if !(MIN_YEAR..=MAX_YEAR).contains(&year) || days_in_month(year, month).is_none() {
        return true;
    }
    validate_json(year, month, daily, "dailyData").is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn month_lengths() {
        assert_eq!(days_in_month(2024, 2), Some(29));
        assert_eq!(days_in_month(2023, 2), Some(28));
        assert_eq!(days_in_month(1900, 2), Some(28));
        assert_eq!(days_in_month(2000, 2), Some(29));
        assert_eq!(days_in_month(2024, 4), Some(30));
        assert_eq!(days_in_month(2024, 13), None);
        assert_eq!(days_in_month(2024, 0), None);
    }

    #[test]
    fn day_keys() {
        assert_eq!(parse_day_key("1"), Some(1));
        assert_eq!(parse_day_key("31"), Some(31));
        assert_eq!(parse_day_key("01"), None);
        assert_eq!(parse_day_key("0"), None);
        assert_eq!(parse_day_key("x"), None);
        assert_eq!(parse_day_key("123"), None);
        assert_eq!(parse_day_key(""), None);
    }

    #[test]
    fn valid_month() {
        let d = json!({"1": {"sales": 1000, "customers": 52}, "30": {"sales": 0.5}});
        assert!(validate(2024, 4, &d, "dailyData").is_empty());
        assert!(is_valid(2024, 4, &d));
        assert!(is_valid(2024, 4, &json!({})));
    }

    #[test]
    fn refusals_name_the_field() {
        let e = validate(2024, 4, &json!({"31": {"sales": 1}}), "dailyData");
        assert_eq!(e[0].field, "dailyData.31");
        assert!(e[0].reason.contains("does not exist"));

        let e = validate(2023, 2, &json!({"29": {"sales": 1}}), "dailyData");
        assert_eq!(e[0].field, "dailyData.29");
        assert!(validate(2024, 2, &json!({"29": {"sales": 1}}), "dailyData").is_empty());
        assert_eq!(
            validate(2024, 2, &json!({"30": {"sales": 1}}), "dailyData").len(),
            1
        );

        let e = validate(2024, 1, &json!({"1": {"sales": -1}}), "dailyData");
        assert_eq!(e[0].field, "dailyData.1.sales");
        assert!(e[0].reason.contains("negative"));

        let e = validate(2024, 1, &json!({"1": {"sales": "100"}}), "dailyData");
        assert_eq!(e[0].reason, "must be a number");

        let e = validate(
            2024,
            1,
            &json!({"1": {"sales": 1, "profit": 2}}),
            "dailyData",
        );
        assert_eq!(e[0].field, "dailyData.1.profit");

        let e = validate(2024, 1, &json!({"1": {"customers": 1.5}}), "dailyData");
        assert!(e[0].reason.contains("whole"));

        let e = validate(2024, 1, &json!([1, 2]), "dailyData");
        assert_eq!(e[0].field, "dailyData");

        let e = validate(2024, 1, &json!({"1": {}}), "dailyData");
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn every_error_is_reported() {
        let e = validate(
            2024,
            4,
            &json!({"31": {"sales": 1}, "2": {"sales": -1}, "x": {}}),
            "dailyData",
        );
        assert_eq!(e.len(), 3);
    }

    #[test]
    fn year_and_month_left_to_their_own_checks() {
        assert!(is_valid(1999, 1, &json!({})));
        assert!(is_valid(2024, 13, &json!({"40": 1})));
        assert!(!is_valid(2024, 1, &json!({"40": 1})));
    }

    #[test]
    fn bounds_of_metrics() {
        assert!(validate(2024, 1, &json!({"1": {"sales": 1e12}}), "d").is_empty());
        assert_eq!(
            validate(2024, 1, &json!({"1": {"sales": 1000000000001u64}}), "d")[0].reason,
            "is larger than 1e12"
        );
        assert!(validate(2024, 1, &json!({"1": {"customers": 2.0}}), "d").is_empty());
        assert_eq!(
            validate(2024, 1, &json!({"1": {"sales": null}}), "d")[0].reason,
            "must be a number"
        );
        assert_eq!(validate(2024, 1, &json!({"1": 5}), "d")[0].field, "d.1");
        // A month outside 1..12 cannot judge days; the caller reports the month.
        assert!(validate(2024, 13, &json!({"40": 1}), "d").is_empty());
    }
}
