//! Records of a batch as clients send them:
//! `{"storeId": "123", "year": 2024, "month": 1, "dailyData": {...}}`.

use crate::daily::{self, MAX_YEAR, MIN_YEAR};
use crate::names::to_camel;
use crate::FieldError;
use serde_json::{Map, Value};

/// A record that passed validation, normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct SalesRecord {
    pub store_id: i64,
    pub year: i32,
    pub month: i32,
    pub daily_data: Map<String, Value>,
}

impl SalesRecord {
    pub fn key(&self) -> (i64, i32, i32) {
        (self.store_id, self.year, self.month)
    }
}

/// A (store, year, month) key, as used by batch deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MonthKey {
    pub store_id: i64,
    pub year: i32,
    pub month: i32,
}

const RECORD_KEYS: &[&str] = &["storeId", "year", "month", "dailyData"];
const KEY_KEYS: &[&str] = &["storeId", "year", "month"];

/// Reads a positive integer id given as a JSON number or a numeric string.
pub fn parse_id(v: &Value) -> Result<i64, &'static str> {
    let n = match v {
        Value::Number(n) => n.as_i64().ok_or("must be a whole number")?,
        Value::String(s) => {
            let t = s.trim();
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err("must be a number or a numeric string");
            }
            t.parse::<i64>().map_err(|_| "is out of range")?
        }
        Value::Null => return Err("is required"),
        _ => return Err("must be a number or a numeric string"),
    };
    if n <= 0 {
        return Err("must be a positive id");
    }
    Ok(n)
}

fn parse_int(
    v: Option<&Value>,
    field: &str,
    lo: i64,
    hi: i64,
    errors: &mut Vec<FieldError>,
) -> Option<i64> {
    match v {
        None | Some(Value::Null) => {
            errors.push(FieldError::new(field, "is required"));
            None
        }
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) if (lo..=hi).contains(&i) => Some(i),
            Some(i) => {
                errors.push(FieldError::new(field, format!("{i} is outside {lo}..{hi}")));
                None
            }
            None => {
                errors.push(FieldError::new(field, "must be a whole number"));
                None
            }
        },
        Some(_) => {
            errors.push(FieldError::new(field, "must be a number"));
            None
        }
    }
}

/// Normalises keys to camelCase and reports keys that are not allowed.
fn normalise(
    obj: Map<String, Value>,
    allowed: &[&str],
    errors: &mut Vec<FieldError>,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in obj {
        let camel = to_camel(&k);
        if allowed.contains(&camel.as_str()) {
            if out.contains_key(&camel) {
                errors.push(FieldError::new(k.as_str(), format!("{camel} given twice")));
            }
            out.insert(camel, v);
        } else {
            errors.push(FieldError::new(
                k.as_str(),
                format!("unknown field; allowed: {}", allowed.join(", ")),
            ));
        }
    }
    out
}

fn parse_key_parts(obj: &Map<String, Value>, errors: &mut Vec<FieldError>) -> Option<MonthKey> {
    let store = match obj.get("storeId") {
        None => {
            errors.push(FieldError::new("storeId", "is required"));
            None
        }
        Some(v) => match parse_id(v) {
            Ok(id) => Some(id),
            Err(reason) => {
                errors.push(FieldError::new("storeId", reason));
                None
            }
        },
    };
    let year = parse_int(obj.get("year"), "year", MIN_YEAR, MAX_YEAR, errors);
    let month = parse_int(obj.get("month"), "month", 1, 12, errors);
    Some(MonthKey {
        store_id: store?,
        year: year? as i32,
        month: month? as i32,
    })
}

/// Validates one record; every problem is reported, not just the first.
pub fn parse_record(v: &Value) -> Result<SalesRecord, Vec<FieldError>> {
    into_record(v.clone())
}

/// Like [`parse_record`], taking the value (no copy of its daily data).
pub fn into_record(v: Value) -> Result<SalesRecord, Vec<FieldError>> {
    let mut errors = Vec::new();
    let Value::Object(raw) = v else {
        return Err(vec![FieldError::new("", "record must be an object")]);
    };
    let mut obj = normalise(raw, RECORD_KEYS, &mut errors);
    let key = parse_key_parts(&obj, &mut errors);
    let daily = match obj.remove("dailyData") {
        None | Some(Value::Null) => {
            errors.push(FieldError::new("dailyData", "is required"));
            None
        }
        Some(d) => Some(d),
    };
    match (&daily, key) {
        (Some(d), Some(k)) => errors.extend(daily::validate(
            k.year as i64,
            k.month as i64,
            d,
            "dailyData",
        )),
        (Some(d), None) if !d.is_object() => errors.push(FieldError::new(
            "dailyData",
            "must be an object keyed by day of month",
        )),
        _ => {}
    }
    match (errors.is_empty(), key, daily) {
        (true, Some(k), Some(Value::Object(d))) => Ok(SalesRecord {
            store_id: k.store_id,
            year: k.year,
            month: k.month,
            daily_data: d,
        }),
        _ => Err(errors),
    }
}

/// Validates one delete key `{"storeId", "year", "month"}`.
pub fn parse_month_key(v: &Value) -> Result<MonthKey, Vec<FieldError>> {
    let mut errors = Vec::new();
    let Some(raw) = v.as_object() else {
        return Err(vec![FieldError::new(
            "",
            "key must be an object with storeId, year and month",
        )]);
    };
    let obj = normalise(raw.clone(), KEY_KEYS, &mut errors);
    let key = parse_key_parts(&obj, &mut errors);
    match key {
        Some(k) if errors.is_empty() => Ok(k),
        _ => Err(errors),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_api_shape_and_snake_case() {
        let r = parse_record(&json!({"storeId": "123", "year": 2024, "month": 1, "dailyData": {"1": {"sales": 1000, "customers": 52}}})).unwrap();
        assert_eq!(r.key(), (123, 2024, 1));
        let r = parse_record(&json!({"store_id": 7, "year": 2024, "month": 2, "daily_data": {}}))
            .unwrap();
        assert_eq!(r.key(), (7, 2024, 2));
    }

    #[test]
    fn reports_every_problem() {
        let e = parse_record(&json!({"year": 2024, "month": 13, "dailyData": {}, "color": "red"}))
            .unwrap_err();
        let fields: Vec<_> = e.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"storeId"));
        assert!(fields.contains(&"month"));
        assert!(fields.contains(&"color"));
    }

    #[test]
    fn bad_store_ids() {
        assert!(parse_id(&json!("12a")).is_err());
        assert!(parse_id(&json!(-3)).is_err());
        assert!(parse_id(&json!(1.5)).is_err());
        assert!(parse_id(&json!(null)).is_err());
        assert_eq!(parse_id(&json!(" 42 ")), Ok(42));
    }

    #[test]
    fn day_errors_carry_path() {
        let e = parse_record(
            &json!({"storeId": 1, "year": 2023, "month": 4, "dailyData": {"31": {"sales": 1}}}),
        )
        .unwrap_err();
        assert_eq!(e[0].field, "dailyData.31");
        let e = parse_record(&json!([1])).unwrap_err();
        assert_eq!(e[0].reason, "record must be an object");
        let e = parse_record(&json!({"storeId": 1, "year": 2023, "month": 4, "dailyData": null}))
            .unwrap_err();
        assert_eq!(e[0].field, "dailyData");
    }

    #[test]
    fn delete_keys() {
        assert_eq!(
            parse_month_key(&json!({"storeId": 3, "year": 2024, "month": 5})).unwrap(),
            MonthKey {
                store_id: 3,
                year: 2024,
                month: 5
            }
        );
        assert!(parse_month_key(&json!({"storeId": 3, "year": 2024})).is_err());
    }
}
