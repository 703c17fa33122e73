//! Batch reports: the store a record names, and the extension's report
//! merged with the records refused before it.

use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::sync::Arc;

/// What checking one record of a batch found.
pub(super) enum Checked {
    /// A valid record of `store`, with the numbers Postgres' `numeric`
    /// would refuse (none: it goes on to the extension).
    Valid {
        store: i64,
        unstorable: Vec<sales_core::FieldError>,
    },
    /// A refused record, and every store it names (the scope check covers
    /// refused records too).
    Refused {
        stores: Vec<i64>,
        errors: Vec<sales_core::FieldError>,
    },
}

/// Records checked on the request's own task; a larger batch is split over
/// the blocking pool, one part per core, so that its check neither holds
/// up the other requests on this worker nor runs on one core while the
/// others wait (about 11 µs per 28-day record).
const CHECKED_INLINE: usize = 256;

/// Checks every record with the rules the extension applies (one
/// `sales_core` for both). A record the tape cannot read is that record's
/// error (field ""), like any other.
pub(super) async fn check_records(
    records: Arc<Vec<Box<RawValue>>>,
) -> crate::http::error::ApiResult<Vec<Checked>> {
    use crate::http::error::ApiError;
    let n = records.len();
    if n <= CHECKED_INLINE {
        return Ok(check_range(&records, 0..n));
    }
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let parts = cores.min(n.div_ceil(CHECKED_INLINE)).max(1);
    let per = n.div_ceil(parts);
    let tasks: Vec<_> = (0..parts)
        .map(|p| {
            let records = records.clone();
            let range = p * per..((p + 1) * per).min(n);
            tokio::task::spawn_blocking(move || check_range(&records, range))
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        // A part that panicked is the server's failure, not the request's.
        out.extend(t.await.map_err(ApiError::internal)?);
    }
    Ok(out)
}

fn check_range(records: &[Box<RawValue>], range: std::ops::Range<usize>) -> Vec<Checked> {
    let mut out = Vec::with_capacity(range.len());
    for raw in &records[range] {
        let tape = match sales_core::json::Tape::parse(raw.get()) {
            Ok(t) => t,
            // What the tape cannot read in a record the body's parser
            // took: that record's error, so the others of an `atomic:
            // false` batch still go through.
            Err(e) => {
                out.push(Checked::Refused {
                    stores: stores_named(raw.get()),
                    errors: vec![unreadable(raw.get(), &e.to_string())],
                });
                continue;
            }
        };
        let r = tape.root();
        // A key given twice: jsonb would keep its last value, which the
        // sender may not have meant.
        if let Some(path) = tape.repeated() {
            let e = sales_core::FieldError::new(path, sales_core::json::REPEATED);
            out.push(Checked::Refused {
                stores: stores_named(raw.get()),
                errors: vec![e],
            });
            continue;
        }
        out.push(match sales_core::record::check_record(r) {
            Ok(parts) => Checked::Valid {
                store: parts.key.store_id,
                unstorable: super::numbers_numeric_refuses(raw.get()),
            },
            Err(errors) => Checked::Refused {
                stores: stores_named(raw.get()),
                errors,
            },
        });
    }
    out
}

/// The error of one item (a record, a delete key) that parsed as part of
/// the body but cannot be read on its own, from the reader's message
/// `why`: a number a double cannot hold (`1e309`) is named by its path;
/// anything else (a lone surrogate escape, `"\ud800"`) is the item's own,
/// without the reader's position (counted from the item's start, not the
/// body's).
pub(super) fn unreadable(raw: &str, why: &str) -> sales_core::FieldError {
    if why.starts_with("number out of range") {
        let path = number_past_double(raw, "").unwrap_or_default();
        return sales_core::FieldError::new(path, "number out of range (beyond ±1.8e308)");
    }
    let why = why.split(" at line ").next().unwrap_or(why);
    let reason = if why.contains("escape") || why.contains("surrogate") {
        format!("cannot be read: {why} (an escape that is no Unicode character, such as a lone surrogate \\ud800)")
    } else {
        format!("cannot be read: {why}")
    };
    sales_core::FieldError::new("", reason)
}

/// The dotted path (as the record rules name fields) of the first number
/// in `raw`, one JSON value, that a double cannot hold; objects are read
/// in key order.
fn number_past_double(raw: &str, path: &str) -> Option<String> {
    use std::collections::BTreeMap;
    let t = raw.trim();
    match t.as_bytes().first()? {
        b'{' => {
            let members: BTreeMap<String, Box<RawValue>> = serde_json::from_str(t).ok()?;
            members.iter().find_map(|(k, v)| {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                number_past_double(v.get(), &p)
            })
        }
        b'[' => {
            let items: Vec<Box<RawValue>> = serde_json::from_str(t).ok()?;
            items.iter().find_map(|v| number_past_double(v.get(), path))
        }
        b'-' | b'0'..=b'9' => {
            let v: f64 = t.parse().ok()?;
            (!v.is_finite()).then(|| path.to_string())
        }
        _ => None,
    }
}

/// Every store a refused record names, for the scope check: each member
/// spelled as `storeId` (`store_id`, ...), a key given twice counted each
/// time, its value read as an id or, past that, as any whole positive
/// number it could be taken for (`"404"`, `404.0`). Read from the text, so
/// a record the tape could not read whole (a number past the double
/// range elsewhere in it) is covered too. A store named in any of these
/// ways that the caller may not write refuses the whole batch, as one
/// named plainly does.
pub(super) fn stores_named(raw: &str) -> Vec<i64> {
    struct Members(Vec<(String, Box<RawValue>)>);
    impl<'de> serde::Deserialize<'de> for Members {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Members;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut a: A,
                ) -> Result<Members, A::Error> {
                    let mut out = Vec::new();
                    while let Some(m) = a.next_entry::<String, Box<RawValue>>()? {
                        out.push(m);
                    }
                    Ok(Members(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    let members = match serde_json::from_str::<Members>(raw) {
        Ok(Members(m)) => m,
        // A surrogate escape that is no character (`"\ud800"`) elsewhere in
        // the record: read again with each such escape as U+FFFD, so the
        // stores it names are still found.
        Err(_) => {
            static SURROGATE: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
                regex::Regex::new(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}").expect("pattern")
            });
            let mended = SURROGATE.replace_all(raw, r"\ufffd");
            match serde_json::from_str::<Members>(&mended) {
                Ok(Members(m)) => m,
                Err(_) => return Vec::new(),
            }
        }
    };
    members
        .iter()
        .filter(|(k, _)| sales_core::record::spelled_as(k, "storeId"))
        .filter_map(|(_, v)| {
            let v: Value = serde_json::from_str(v.get()).ok()?;
            sales_core::record::parse_id_json(&v).ok().or_else(|| {
                let f = match &v {
                    Value::Number(n) => n.as_f64()?,
                    Value::String(s) => s.trim().parse::<f64>().ok()?,
                    _ => return None,
                };
                (f.fract() == 0.0 && f >= 1.0 && f < i64::MAX as f64).then_some(f as i64)
            })
        })
        .collect()
}

/// The report of the records sent to the extension (numbered among
/// `kept`), with the records refused before it, numbered as in the request.
pub(crate) fn merge_report(
    mut summary: Value,
    kept: &[usize],
    rejected: Vec<(usize, Vec<sales_core::FieldError>)>,
    total: usize,
) -> Value {
    if rejected.is_empty() {
        return summary;
    }
    let at = |v: &Value| {
        v.as_u64()
            .and_then(|i| kept.get(i as usize))
            .map(|&i| Value::from(i))
            .unwrap_or(Value::Null)
    };
    let mut errors: Vec<Value> = Vec::new();
    for e in summary["errors"].as_array().cloned().unwrap_or_default() {
        let mut e = e;
        e["index"] = at(&e["index"]);
        errors.push(e);
    }
    for (i, errs) in &rejected {
        for e in errs {
            errors.push(json!({"index": i, "field": e.field, "reason": e.reason}));
        }
    }
    errors.sort_by_key(|e| e["index"].as_u64().unwrap_or(u64::MAX));
    if let Some(dups) = summary["duplicates"].as_array_mut() {
        for d in dups {
            d["index"] = at(&d["index"]);
            d["supersededBy"] = at(&d["supersededBy"]);
        }
    }
    summary["errors"] = Value::Array(errors);
    summary["total"] = Value::from(total);
    summary["failed"] =
        Value::from(summary["failed"].as_u64().unwrap_or(0) + rejected.len() as u64);
    summary
}
