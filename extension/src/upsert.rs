//! Batch writes: `sales.batch_upsert_impl` and `sales.batch_delete_impl`.
//!
//! Both validate every item first and report all problems at once (index,
//! field, reason). The write itself is one set-based statement over all rows,
//! in (store, year, month) or id order, so two concurrent batches lock shared
//! rows in the same order and cannot deadlock. Per-row events come from the
//! table's statement triggers; NOTIFY is deferred so that one batch wakes
//! listeners once, with its `batch-completed` event id.

use crate::error::{OrRaise, SalesError};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use sales_core::record::{parse_id, parse_month_key, parse_record, MonthKey};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashSet};

struct Report {
    errors: Vec<Value>,
    failed: HashSet<usize>,
}

impl Report {
    fn new() -> Self {
        Self { errors: Vec::new(), failed: HashSet::new() }
    }

    fn add(&mut self, index: usize, field: &str, reason: impl Into<String>) {
        self.failed.insert(index);
        self.errors.push(json!({"index": index, "field": field, "reason": reason.into()}));
    }
}

/// Runs `f` with trigger NOTIFYs deferred, restoring the caller's setting.
fn with_deferred_notify<T>(client: &mut SpiClient<'_>, f: impl FnOnce(&mut SpiClient<'_>) -> T) -> T {
    let prev: Option<String> = client
        .update("SELECT current_setting('sales.defer_notify', true)", Some(1), &[])
        .and_then(|t| t.first().get_one())
        .or_raise();
    client
        .update("SELECT set_config('sales.defer_notify', 'on', true)", None, &[])
        .or_raise();
    let out = f(client);
    client
        .update(
            "SELECT set_config('sales.defer_notify', $1, true)",
            None,
            &[prev.unwrap_or_default().into()],
        )
        .or_raise();
    out
}

/// Appends the batch's summary event (which also sends the one NOTIFY).
fn emit_batch_event(client: &mut SpiClient<'_>, payload: &Value) -> i64 {
    client
        .update(
            "SELECT sales.emit('batch-completed', $1)",
            Some(1),
            &[pgrx::JsonB(payload.clone()).into()],
        )
        .and_then(|t| t.first().get_one::<i64>())
        .or_raise()
        .unwrap_or_default()
}

/// Store ids among `ids` that exist.
fn existing_stores(client: &SpiClient<'_>, ids: Vec<i64>) -> HashSet<i64> {
    if ids.is_empty() {
        return HashSet::new();
    }
    client
        .select(
            "SELECT coalesce(array_agg(id), '{}') FROM sales.stores WHERE id = ANY($1)",
            Some(1),
            &[ids.into()],
        )
        .and_then(|t| t.first().get_one::<Vec<i64>>())
        .or_raise()
        .unwrap_or_default()
        .into_iter()
        .collect()
}

fn scope_set(allowed: Option<Vec<Option<i64>>>) -> Option<HashSet<i64>> {
    allowed.map(|a| a.into_iter().flatten().collect())
}

const UPSERT_SQL: &str = r#"
WITH input AS (
    SELECT r.s, r.y, r.m, r.d, r.o
    FROM jsonb_to_recordset($1) AS r(s bigint, y integer, m integer, d jsonb, o integer)
), up AS (
    INSERT INTO sales.monthly_sales AS t (store_id, year, month, daily_data)
    SELECT s, y, m, d FROM input ORDER BY o
    ON CONFLICT (store_id, year, month) DO UPDATE
        SET daily_data = CASE WHEN $2 THEN EXCLUDED.daily_data ELSE t.daily_data || EXCLUDED.daily_data END
        WHERE t.daily_data IS DISTINCT FROM
              (CASE WHEN $2 THEN EXCLUDED.daily_data ELSE t.daily_data || EXCLUDED.daily_data END)
    RETURNING (t.xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM up
"#;

/// Validates and upserts many monthly records in one statement. Returns
/// `{total, inserted, updated, unchanged, failed, merged, eventId, errors,
/// duplicates}`. With `atomic` and any invalid record nothing is written
/// (`sales.batch_upsert` then raises PS422 with this report).
/// `allowed_stores` (NULL = any) refuses records of other stores.
#[pg_extern(volatile)]
fn batch_upsert_impl(
    records: Option<pgrx::JsonB>,
    replace: default!(bool, false),
    atomic: default!(bool, true),
    allowed_stores: default!(Option<Vec<Option<i64>>>, "NULL"),
) -> pgrx::JsonB {
    let Some(pgrx::JsonB(Value::Array(items))) = records else {
        SalesError::InvalidParameter("records must be a JSON array of sales records".into()).raise()
    };
    let scope = scope_set(allowed_stores);
    let total = items.len();
    let mut report = Report::new();
    let mut valid = Vec::with_capacity(total);
    for (i, item) in items.iter().enumerate() {
        match parse_record(item) {
            Ok(r) => match &scope {
                Some(s) if !s.contains(&r.store_id) => {
                    report.add(i, "storeId", format!("store {} is outside the caller's scope", r.store_id))
                }
                _ => valid.push((i, r)),
            },
            Err(errs) => {
                for e in errs {
                    report.add(i, &e.field, e.reason);
                }
            }
        }
    }

    Spi::connect_mut(|client| {
        let wanted: Vec<i64> = valid.iter().map(|(_, r)| r.store_id).collect::<HashSet<_>>().into_iter().collect();
        let exists = existing_stores(client, wanted);
        // Fold records by key in input order: later records win, day by day
        // when merging, whole when replacing.
        let mut by_key: BTreeMap<(i64, i32, i32), (usize, Map<String, Value>)> = BTreeMap::new();
        let mut duplicates = Vec::new();
        for (i, r) in valid {
            if !exists.contains(&r.store_id) {
                report.add(i, "storeId", format!("store {} does not exist", r.store_id));
                continue;
            }
            match by_key.get_mut(&r.key()) {
                Some((first, data)) => {
                    duplicates.push(json!({"index": *first, "supersededBy": i}));
                    if replace {
                        *data = r.daily_data;
                    } else {
                        data.extend(r.daily_data);
                    }
                    *first = i;
                }
                None => {
                    by_key.insert(r.key(), (i, r.daily_data));
                }
            }
        }
        let failed = report.failed.len();
        let mut summary = json!({
            "total": total, "inserted": 0, "updated": 0, "unchanged": 0, "failed": failed,
            "merged": duplicates.len(), "eventId": null,
            "errors": report.errors, "duplicates": duplicates,
        });
        if (atomic && failed > 0) || by_key.is_empty() {
            return pgrx::JsonB(summary);
        }

        let rows: Vec<Value> = by_key
            .iter()
            .enumerate()
            .map(|(o, ((s, y, m), (_, d)))| json!({"s": s, "y": y, "m": m, "d": d, "o": o}))
            .collect();
        let n = rows.len();
        let stores: Vec<i64> = by_key.keys().map(|k| k.0).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        let (inserted, updated) = with_deferred_notify(client, |c| {
            c.update(UPSERT_SQL, None, &[pgrx::JsonB(Value::Array(rows)).into(), replace.into()])
                .and_then(|t| t.first().get_two::<i64, i64>())
                .or_raise()
        });
        let inserted = inserted.unwrap_or_default();
        let updated = updated.unwrap_or_default();
        summary["inserted"] = json!(inserted);
        summary["updated"] = json!(updated);
        summary["unchanged"] = json!(n as i64 - inserted - updated);
        let event = json!({
            "operation": "upsert", "mode": if replace { "replace" } else { "merge" },
            "total": total, "inserted": inserted, "updated": updated,
            "unchanged": n as i64 - inserted - updated, "failed": failed, "storeIds": stores,
        });
        summary["eventId"] = json!(emit_batch_event(client, &event));
        pgrx::JsonB(summary)
    })
}

/// Deletes monthly records by id and/or by `{storeId, year, month}` keys.
/// Unknown ids or keys are reported; with `atomic` nothing is deleted when
/// any item fails. Returns `{total, deleted, failed, eventId, errors}`.
#[pg_extern(volatile)]
fn batch_delete_impl(
    ids: Option<Vec<Option<i64>>>,
    keys: Option<pgrx::JsonB>,
    atomic: default!(bool, true),
    allowed_stores: default!(Option<Vec<Option<i64>>>, "NULL"),
) -> pgrx::JsonB {
    let ids = ids.unwrap_or_default();
    let keys = match keys.map(|k| k.0) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => SalesError::InvalidParameter("keys must be a JSON array of {storeId, year, month}".into()).raise(),
    };
    if ids.is_empty() && keys.is_empty() {
        SalesError::InvalidParameter("give ids or keys to delete".into()).raise();
    }
    let scope = scope_set(allowed_stores);
    let total = ids.len() + keys.len();
    let mut report = Report::new();
    // Item index i < ids.len() is ids[i]; after that, keys[i - ids.len()].
    let mut wanted_ids: Vec<(usize, i64)> = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        match id.map(|v| parse_id(&json!(v))) {
            Some(Ok(v)) => wanted_ids.push((i, v)),
            Some(Err(reason)) => report.add(i, &format!("ids[{i}]"), reason),
            None => report.add(i, &format!("ids[{i}]"), "is null"),
        }
    }
    let mut wanted_keys: Vec<(usize, MonthKey)> = Vec::new();
    for (j, k) in keys.iter().enumerate() {
        let i = ids.len() + j;
        match parse_month_key(k) {
            Ok(mk) => wanted_keys.push((i, mk)),
            Err(errs) => {
                for e in errs {
                    report.add(i, &format!("keys[{j}].{}", e.field).trim_end_matches('.').to_string(), e.reason);
                }
            }
        }
    }

    Spi::connect_mut(|client| {
        // Resolve everything to (item, row id, store id) in one query.
        let lookup: Vec<Value> = wanted_ids
            .iter()
            .map(|(i, id)| json!({"o": i, "id": id}))
            .chain(wanted_keys.iter().map(|(i, k)| json!({"o": i, "s": k.store_id, "y": k.year, "m": k.month})))
            .collect();
        let mut resolved: Vec<(usize, Option<i64>, Option<i64>)> = Vec::new();
        if !lookup.is_empty() {
            let table = client
                .select(
                    "SELECT k.o, m.id, m.store_id
                     FROM jsonb_to_recordset($1) AS k(o integer, id bigint, s bigint, y integer, m integer)
                     LEFT JOIN sales.monthly_sales m
                       ON (k.id IS NOT NULL AND m.id = k.id)
                       OR (k.id IS NULL AND m.store_id = k.s AND m.year = k.y AND m.month = k.m)
                     ORDER BY k.o",
                    None,
                    &[pgrx::JsonB(Value::Array(lookup)).into()],
                )
                .or_raise();
            for row in table {
                let o: i32 = row.get(1).or_raise().unwrap_or_default();
                resolved.push((o as usize, row.get(2).or_raise(), row.get(3).or_raise()));
            }
        }
        let mut targets: Vec<i64> = Vec::new();
        for (i, id, store) in resolved {
            let field = if i < ids.len() { format!("ids[{i}]") } else { format!("keys[{}]", i - ids.len()) };
            match (id, store) {
                (Some(id), Some(store)) => match &scope {
                    Some(s) if !s.contains(&store) => {
                        report.add(i, &field, format!("store {store} is outside the caller's scope"))
                    }
                    _ => targets.push(id),
                },
                _ => report.add(i, &field, "no such sales record"),
            }
        }
        targets.sort_unstable();
        targets.dedup();
        let failed = report.failed.len();
        let mut summary = json!({
            "total": total, "deleted": 0, "failed": failed, "eventId": null, "errors": report.errors,
        });
        if (atomic && failed > 0) || targets.is_empty() {
            return pgrx::JsonB(summary);
        }
        let deleted = with_deferred_notify(client, |c| {
            c.update(
                "WITH locked AS (
                     SELECT id FROM sales.monthly_sales WHERE id = ANY($1) ORDER BY id FOR UPDATE
                 ), gone AS (
                     DELETE FROM sales.monthly_sales m USING locked l WHERE m.id = l.id RETURNING m.store_id
                 )
                 SELECT count(*), coalesce(array_agg(DISTINCT store_id), '{}') FROM gone",
                None,
                &[targets.into()],
            )
            .and_then(|t| t.first().get_two::<i64, Vec<i64>>())
            .or_raise()
        });
        let (count, stores) = (deleted.0.unwrap_or_default(), deleted.1.unwrap_or_default());
        summary["deleted"] = json!(count);
        let event = json!({"operation": "delete", "total": total, "deleted": count, "failed": failed, "storeIds": stores});
        summary["eventId"] = json!(emit_batch_event(client, &event));
        pgrx::JsonB(summary)
    })
}
