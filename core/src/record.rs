//! Records of a batch as clients send them:
//! `{"storeId": "123", "year": 2024, "month": 1, "dailyData": {...}}`.

use crate::daily::{self, MAX_YEAR, MIN_YEAR};
use crate::json::{JsonRead, Kind};
use crate::names::to_snake;
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

/// Reads a positive integer id given as a JSON number or a numeric string.
pub fn parse_id(v: &Value) -> Result<i64, &'static str> {
    parse_id_json(v)
}

/// [`parse_id`] for any [`JsonRead`] value.
pub fn parse_id_json<'a, J: JsonRead<'a>>(v: J) -> Result<i64, &'static str> {
    let n = match v.kind() {
        Kind::Number => match v.as_i64() {
            Some(n) => n,
            // Whole, but past what an id can be (`99999999999999999999`).
            None if v
                .as_f64()
                .is_some_and(|f| f.fract() == 0.0 && f.abs() >= i64::MAX as f64) =>
            {
                return Err("is out of range")
            }
            None => return Err("must be a whole number"),
        },
        Kind::String => {
            // Spaces around a numeric string are forgiven; only ASCII ones
            // (a no-break space is not part of a number).
            let t = v
                .as_str()
                .unwrap_or_default()
                .trim_matches(|c: char| c.is_ascii_whitespace());
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err("must be a number or a numeric string");
            }
            t.parse::<i64>().map_err(|_| "is out of range")?
        }
        Kind::Null => return Err("is required"),
        _ => return Err("must be a number or a numeric string"),
    };
    if n <= 0 {
        return Err("must be a positive id");
    }
    Ok(n)
}

fn parse_int<'a, J: JsonRead<'a>>(
    v: Option<J>,
    field: &str,
    lo: i64,
    hi: i64,
    errors: &mut Vec<FieldError>,
) -> Option<i64> {
    let Some(v) = v.filter(|v| v.kind() != Kind::Null) else {
        errors.push(FieldError::new(field, "is required"));
        return None;
    };
    if v.kind() != Kind::Number {
        errors.push(FieldError::new(field, "must be a number"));
        return None;
    }
    match v.as_i64() {
        Some(i) if (lo..=hi).contains(&i) => Some(i),
        Some(i) => {
            errors.push(FieldError::new(field, format!("{i} is outside {lo}..{hi}")));
            None
        }
        None => {
            errors.push(FieldError::new(field, "must be a whole number"));
            None
        }
    }
}

/// The one spelling rule for record members, shared by validation and the
/// upsert SQL (which reads `dailyData` or `daily_data`): a member is its
/// camelCase name or that name's snake_case form, exactly. Near misses
/// (`dailyData_`, `_dailyData`, `daily__data`) are unknown fields, never
/// silently taken for the real one.
pub fn spelled_as(member: &str, camel: &str) -> bool {
    member == camel || (member.contains('_') && member == to_snake(camel))
}

/// Errors listed per record at most; the rest are counted in one more entry.
pub const MAX_RECORD_ERRORS: usize = 64;

/// Sorts an object's members into `allowed` slots by [`spelled_as`],
/// reporting unknown and repeated names.
fn normalise<'a, J: JsonRead<'a>, const N: usize>(
    obj: J,
    allowed: &[&str; N],
    errors: &mut Vec<FieldError>,
) -> [Option<J>; N] {
    let mut slots = [None; N];
    obj.each_member(|k, v| {
        let slot = allowed.iter().position(|a| spelled_as(k, a));
        match slot {
            Some(i) if slots[i].is_some() => {
                errors.push(FieldError::new(k, format!("{} given twice", allowed[i])))
            }
            Some(i) => slots[i] = Some(v),
            None => errors.push(FieldError::new(
                k,
                format!(
                    "unknown field; allowed: {} (or their snake_case forms)",
                    allowed.join(", ")
                ),
            )),
        }
    });
    slots
}

/// Keeps the first [`MAX_RECORD_ERRORS`] and says how many more there were.
fn cap(mut errors: Vec<FieldError>) -> Vec<FieldError> {
    if errors.len() > MAX_RECORD_ERRORS {
        let omitted = errors.len() - MAX_RECORD_ERRORS;
        errors.truncate(MAX_RECORD_ERRORS);
        errors.push(FieldError::new(
            "",
            format!("{omitted} more problems in this record not listed"),
        ));
    }
    errors
}

fn parse_key_parts<'a, J: JsonRead<'a>>(
    store: Option<J>,
    year: Option<J>,
    month: Option<J>,
    errors: &mut Vec<FieldError>,
) -> Option<MonthKey> {
    let store = match store {
        None => {
            errors.push(FieldError::new("storeId", "is required"));
            None
        }
        Some(v) => match parse_id_json(v) {
            Ok(id) => Some(id),
            Err(reason) => {
                errors.push(FieldError::new("storeId", reason));
                None
            }
        },
    };
    let year = parse_int(year, "year", MIN_YEAR, MAX_YEAR, errors);
    let month = parse_int(month, "month", 1, 12, errors);
    Some(MonthKey {
        store_id: store?,
        year: year? as i32,
        month: month? as i32,
    })
}

/// A record that passed validation: its key, and its daily data as given.
#[derive(Debug, Clone, Copy)]
pub struct RecordParts<J> {
    pub key: MonthKey,
    pub daily: J,
}

/// Validates one record; every problem is reported, not just the first.
pub fn parse_record(v: &Value) -> Result<SalesRecord, Vec<FieldError>> {
    let parts = check_record(v)?;
    Ok(SalesRecord {
        store_id: parts.key.store_id,
        year: parts.key.year,
        month: parts.key.month,
        daily_data: parts.daily.as_object().cloned().unwrap_or_default(),
    })
}

/// [`parse_record`] for any [`JsonRead`] value, without copying anything.
pub fn check_record<'a, J: JsonRead<'a>>(v: J) -> Result<RecordParts<J>, Vec<FieldError>> {
    let mut errors = Vec::new();
    if v.kind() != Kind::Object {
        return Err(vec![FieldError::new("", "record must be an object")]);
    }
    let [store, year, month, daily] = normalise(v, RECORD_KEYS, &mut errors);
    let key = parse_key_parts(store, year, month, &mut errors);
    let daily = match daily.filter(|d| d.kind() != Kind::Null) {
        None => {
            errors.push(FieldError::new("dailyData", "is required"));
            None
        }
        Some(d) => Some(d),
    };
    match (daily, key) {
        (Some(d), Some(k)) => errors.extend(daily::validate_json(
            k.year as i64,
            k.month as i64,
            d,
            "dailyData",
        )),
        (Some(d), None) if d.kind() != Kind::Object => errors.push(FieldError::new(
            "dailyData",
            "must be an object keyed by day of month",
        )),
        _ => {}
    }
    match (errors.is_empty(), key, daily) {
        (true, Some(key), Some(daily)) => Ok(RecordParts { key, daily }),
        _ => Err(cap(errors)),
    }
}

const RECORD_KEYS: &[&str; 4] = &["storeId", "year", "month", "dailyData"];
const KEY_KEYS: &[&str; 3] = &["storeId", "year", "month"];

/// Where a problem with the `j`-th key of a delete request is reported:
/// `keys[j]`, or `keys[j].<field>` for one of its members.
pub fn key_field(j: usize, field: &str) -> String {
    if field.is_empty() {
        format!("keys[{j}]")
    } else {
        format!("keys[{j}].{field}")
    }
}

/// Validates one delete key `{"storeId", "year", "month"}`.
pub fn parse_month_key(v: &Value) -> Result<MonthKey, Vec<FieldError>> {
    check_month_key(v)
}

/// [`parse_month_key`] for any [`JsonRead`] value.
pub fn check_month_key<'a, J: JsonRead<'a>>(v: J) -> Result<MonthKey, Vec<FieldError>> {
    let mut errors = Vec::new();
    if v.kind() != Kind::Object {
        return Err(vec![FieldError::new(
            "",
            "key must be an object with storeId, year and month",
        )]);
    }
    let [store, year, month] = normalise(v, KEY_KEYS, &mut errors);
    let key = parse_key_parts(store, year, month, &mut errors);
    match key {
        Some(k) if errors.is_empty() => Ok(k),
        _ => Err(cap(errors)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_ids_allow_ascii_spaces_only() {
        assert_eq!(parse_id(&serde_json::json!(" 12 ")), Ok(12));
        assert!(parse_id(&serde_json::json!("\u{a0}12")).is_err());
        assert!(parse_id(&serde_json::json!("12\u{2003}")).is_err());
    }

    #[test]
    fn ids_past_i64_are_out_of_range_in_either_form() {
        let big: serde_json::Value = serde_json::from_str("99999999999999999999").unwrap();
        assert_eq!(parse_id(&big), Err("is out of range"));
        assert_eq!(
            parse_id(&json!(10_000_000_000_000_000_000u64)),
            Err("is out of range")
        );
        assert_eq!(
            parse_id(&json!("99999999999999999999")),
            Err("is out of range")
        );
        assert_eq!(parse_id(&json!(12.5)), Err("must be a whole number"));
        assert_eq!(parse_id(&json!(12.0)), Err("must be a whole number"));
    }

    #[test]
    fn delete_key_fields() {
        assert_eq!(key_field(2, ""), "keys[2]");
        assert_eq!(key_field(0, "month"), "keys[0].month");
    }
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

    #[test]
    fn names_given_twice_and_whole_numbers() {
        let e = parse_record(
            &json!({"storeId": 1, "store_id": 2, "year": 2024, "month": 1, "dailyData": {}}),
        )
        .unwrap_err();
        assert!(e.iter().any(|e| e.reason.contains("given twice")), "{e:?}");
        let e = parse_record(&json!({"storeId": 1, "year": 2024.0, "month": 1, "dailyData": {}}))
            .unwrap_err();
        assert_eq!(
            (e[0].field.as_str(), e[0].reason.as_str()),
            ("year", "must be a whole number")
        );
        let e = parse_record(&json!({"storeId": 1, "year": "2024", "month": 1, "dailyData": {}}))
            .unwrap_err();
        assert_eq!(e[0].reason, "must be a number");
        let e = parse_record(&json!({"storeId": true, "year": 2024, "month": 1, "dailyData": {}}))
            .unwrap_err();
        assert_eq!(e[0].field, "storeId");
    }

    #[test]
    fn one_spelling_rule() {
        for bad in [
            "dailyData_",
            "_dailyData",
            "daily__data",
            "Daily_data",
            "dailydata",
        ] {
            let e = parse_record(&json!({"storeId": 1, "year": 2024, "month": 1, bad: {}}))
                .unwrap_err();
            assert!(
                e.iter()
                    .any(|e| e.field == bad && e.reason.starts_with("unknown field")),
                "{bad}: {e:?}"
            );
            assert!(e.iter().any(|e| e.field == "dailyData"), "{bad}: {e:?}");
        }
        for bad in ["storeId_", "_store_id", "store__id"] {
            let e = parse_record(&json!({bad: 1, "year": 2024, "month": 1, "dailyData": {}}))
                .unwrap_err();
            assert!(e.iter().any(|e| e.field == "storeId"), "{bad}: {e:?}");
        }
        assert!(spelled_as("daily_data", "dailyData"));
        assert!(spelled_as("dailyData", "dailyData"));
        assert!(!spelled_as("dailyData_", "dailyData"));
        assert!(spelled_as("year", "year"));
    }

    #[test]
    fn reports_are_capped() {
        let mut rec = serde_json::Map::new();
        for i in 0..1000 {
            rec.insert(format!("k{i}"), json!(0));
        }
        let e = parse_record(&Value::Object(rec)).unwrap_err();
        assert_eq!(e.len(), MAX_RECORD_ERRORS + 1);
        assert!(e.last().unwrap().reason.contains("more problems"), "{e:?}");
    }

    #[test]
    fn check_record_borrows_the_daily_data() {
        let v =
            json!({"store_id": "9", "year": 2024, "month": 2, "daily_data": {"29": {"sales": 1}}});
        let parts = check_record(&v).unwrap();
        assert_eq!(
            parts.key,
            MonthKey {
                store_id: 9,
                year: 2024,
                month: 2
            }
        );
        assert!(std::ptr::eq(parts.daily, &v["daily_data"]));
        assert!(check_month_key(&json!({"storeId": 1, "year": 2024, "month": 1, "x": 1})).is_err());
    }
}
