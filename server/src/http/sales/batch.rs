//! Batch reports: the store a record names, and the extension's report
//! merged with the records refused before it.

use serde_json::{json, Value};

/// The store a record or key names, by the one spelling rule (the first
/// member spelled as `storeId`, if it holds an id).
pub(super) fn named_store<'a, J: sales_core::json::JsonRead<'a>>(v: J) -> Option<i64> {
    let mut named: Option<Option<i64>> = None;
    v.each_member(|k, m| {
        if named.is_none() && sales_core::record::spelled_as(k, "storeId") {
            named = Some(sales_core::record::parse_id_json(m).ok());
        }
    });
    named.flatten()
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
