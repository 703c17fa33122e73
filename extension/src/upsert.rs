//! Batch writes: `sales.batch_upsert_impl` and `sales.batch_delete_impl`.
//!
//! Both validate every item first and report all problems at once (index,
//! field, reason). The write itself is one set-based statement over all rows,
//! locking them in (store, year, month) order, so two concurrent batches, or
//! a batch upsert and a batch delete, lock shared rows in the same order and
//! cannot deadlock. Per-row events come from the table's statement triggers;
//! each batch appends one `batch-completed` event after them, and the
//! transaction sends one NOTIFY at commit (see `sales.arm_notify`).

use crate::error::{OrRaise, SalesError};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use sales_core::record::{into_record, parse_id, parse_month_key, MonthKey};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// Problems found in a batch, per item.
struct Report {
    errors: Vec<(usize, String, String)>,
    failed: HashSet<usize>,
}

impl Report {
    fn new() -> Self {
        Self {
            errors: Vec::new(),
            failed: HashSet::new(),
        }
    }

    fn add(&mut self, index: usize, field: &str, reason: impl Into<String>) {
        self.failed.insert(index);
        self.errors.push((index, field.to_string(), reason.into()));
    }

    /// The errors as JSON, by item index (stable: an item's errors keep the
    /// order they were found in).
    fn into_json(mut self) -> Value {
        self.errors.sort_by_key(|e| e.0);
        Value::Array(
            self.errors
                .into_iter()
                .map(|(index, field, reason)| json!({"index": index, "field": field, "reason": reason}))
                .collect(),
        )
    }
}

/// Appends the batch's summary event. The transaction's one NOTIFY (sent at
/// commit) carries the highest event id, which is this one when the batch is
/// the transaction's last write.
fn emit_batch_event(client: &mut SpiClient<'_>, payload: Value) -> i64 {
    client
        .update(
            "SELECT sales.emit('batch-completed', $1)",
            Some(1),
            &[pgrx::JsonB(payload).into()],
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

fn outside_scope(store: i64) -> String {
    format!("store {store} is outside the caller's scope")
}

/// One statement for the whole batch. Rows arrive sorted by key (`o`), and
/// `INSERT ... SELECT ... ORDER BY` inserts, and on conflict locks, in that
/// order. `WHERE ... IS DISTINCT FROM` skips rows the batch would not change
/// (still locked, but not rewritten: no new version, no event), so they count
/// as unchanged. `xmax = 0` tells a fresh insert from an update.
const UPSERT_SQL: &str = r#"
WITH up AS (
    INSERT INTO sales.monthly_sales AS t (store_id, year, month, daily_data)
    SELECT r.s, r.y, r.m, r.d
    FROM jsonb_to_recordset($1) AS r(s bigint, y integer, m integer, d jsonb, o integer)
    ORDER BY r.o
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
/// duplicates}`, where `total = inserted + updated + unchanged + merged +
/// failed`. With `atomic` and any invalid record nothing is written
/// (`sales.batch_upsert` then raises PS422 with this report). Records for the
/// same (store, year, month) are folded in input order, the later winning
/// (day by day when merging); each fold is listed in `duplicates`.
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
    for (i, item) in items.into_iter().enumerate() {
        match into_record(item) {
            Ok(r) => match &scope {
                Some(s) if !s.contains(&r.store_id) => {
                    report.add(i, "storeId", outside_scope(r.store_id))
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
        let wanted: Vec<i64> = valid
            .iter()
            .map(|(_, r)| r.store_id)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
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
            let key = r.key();
            match by_key.get_mut(&key) {
                Some((last, data)) => {
                    duplicates.push(json!({"index": *last, "supersededBy": i}));
                    if replace {
                        *data = r.daily_data;
                    } else {
                        data.extend(r.daily_data);
                    }
                    *last = i;
                }
                None => {
                    by_key.insert(key, (i, r.daily_data));
                }
            }
        }
        let failed = report.failed.len();
        let mut summary = json!({
            "total": total, "inserted": 0, "updated": 0, "unchanged": 0, "failed": failed,
            "merged": duplicates.len(), "eventId": null,
            "errors": report.into_json(), "duplicates": duplicates,
        });
        if (atomic && failed > 0) || by_key.is_empty() {
            return pgrx::JsonB(summary);
        }

        let n = by_key.len() as i64;
        let stores: Vec<i64> = by_key
            .keys()
            .map(|k| k.0)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let rows: Vec<Value> = by_key
            .into_iter()
            .enumerate()
            .map(|(o, ((s, y, m), (_, d)))| json!({"s": s, "y": y, "m": m, "d": d, "o": o}))
            .collect();
        let (inserted, updated) = client
            .update(
                UPSERT_SQL,
                None,
                &[pgrx::JsonB(Value::Array(rows)).into(), replace.into()],
            )
            .and_then(|t| t.first().get_two::<i64, i64>())
            .or_raise();
        let inserted = inserted.unwrap_or_default();
        let updated = updated.unwrap_or_default();
        let unchanged = n - inserted - updated;
        summary["inserted"] = json!(inserted);
        summary["updated"] = json!(updated);
        summary["unchanged"] = json!(unchanged);
        let event = json!({
            "operation": "upsert", "mode": if replace { "replace" } else { "merge" },
            "total": total, "inserted": inserted, "updated": updated,
            "unchanged": unchanged, "failed": failed, "storeIds": stores,
        });
        summary["eventId"] = json!(emit_batch_event(client, event));
        pgrx::JsonB(summary)
    })
}

/// Finds and locks the rows named by ids and keys, in (store, year, month)
/// order (the order `batch_upsert` locks in). Returns (id, store, year, month).
const LOCK_SQL: &str = r#"
SELECT m.id, m.store_id, m.year, m.month
FROM sales.monthly_sales m
WHERE m.id IN (SELECT unnest($1::bigint[])
               UNION ALL
               SELECT x.id FROM unnest($2::bigint[], $3::integer[], $4::integer[]) AS k(s, y, mo)
               JOIN sales.monthly_sales x ON x.store_id = k.s AND x.year = k.y AND x.month = k.mo)
ORDER BY m.store_id, m.year, m.month
FOR UPDATE OF m
"#;

/// Deletes monthly records by id and/or by `{storeId, year, month}` keys.
/// Unknown ids or keys are reported; with `atomic` nothing is deleted when
/// any item fails. Item `i` of the report is `ids[i]` for the ids, then
/// `keys[i - len(ids)]`. Returns `{total, deleted, failed, eventId, errors}`.
/// Both NULL is a mistake (22023); empty arrays delete nothing.
#[pg_extern(volatile)]
fn batch_delete_impl(
    ids: Option<Vec<Option<i64>>>,
    keys: Option<pgrx::JsonB>,
    atomic: default!(bool, true),
    allowed_stores: default!(Option<Vec<Option<i64>>>, "NULL"),
) -> pgrx::JsonB {
    let keys = match keys.map(|k| k.0) {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(a),
        Some(_) => SalesError::InvalidParameter(
            "keys must be a JSON array of {storeId, year, month}".into(),
        )
        .raise(),
    };
    if ids.is_none() && keys.is_none() {
        SalesError::InvalidParameter("give ids or keys to delete".into()).raise();
    }
    let ids = ids.unwrap_or_default();
    let keys = keys.unwrap_or_default();
    let scope = scope_set(allowed_stores);
    let total = ids.len() + keys.len();
    let mut report = Report::new();
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
                    let field = if e.field.is_empty() {
                        format!("keys[{j}]")
                    } else {
                        format!("keys[{j}].{}", e.field)
                    };
                    report.add(i, &field, e.reason);
                }
            }
        }
    }

    Spi::connect_mut(|client| {
        // Lock first, then judge: a row found here exists until the end of
        // the transaction, so the report cannot go stale before the delete.
        let mut by_id: HashMap<i64, (i64, MonthKey)> = HashMap::new();
        if !wanted_ids.is_empty() || !wanted_keys.is_empty() {
            let table = client
                .update(
                    LOCK_SQL,
                    None,
                    &[
                        wanted_ids
                            .iter()
                            .map(|(_, id)| *id)
                            .collect::<Vec<i64>>()
                            .into(),
                        wanted_keys
                            .iter()
                            .map(|(_, k)| k.store_id)
                            .collect::<Vec<i64>>()
                            .into(),
                        wanted_keys
                            .iter()
                            .map(|(_, k)| k.year)
                            .collect::<Vec<i32>>()
                            .into(),
                        wanted_keys
                            .iter()
                            .map(|(_, k)| k.month)
                            .collect::<Vec<i32>>()
                            .into(),
                    ],
                )
                .or_raise();
            for row in table {
                let id: i64 = row.get(1).or_raise().unwrap_or_default();
                let store: i64 = row.get(2).or_raise().unwrap_or_default();
                let year: i32 = row.get(3).or_raise().unwrap_or_default();
                let month: i32 = row.get(4).or_raise().unwrap_or_default();
                by_id.insert(
                    id,
                    (
                        store,
                        MonthKey {
                            store_id: store,
                            year,
                            month,
                        },
                    ),
                );
            }
        }
        let by_key: HashMap<MonthKey, i64> = by_id.iter().map(|(id, (_, k))| (*k, *id)).collect();
        let mut targets: Vec<i64> = Vec::new();
        let mut judge =
            |i: usize, field: String, found: Option<(i64, i64)>, report: &mut Report| match found {
                Some((id, store)) => match &scope {
                    Some(s) if !s.contains(&store) => report.add(i, &field, outside_scope(store)),
                    _ => targets.push(id),
                },
                None => report.add(i, &field, "no such sales record"),
            };
        for (i, id) in &wanted_ids {
            let found = by_id.get(id).map(|(store, _)| (*id, *store));
            judge(*i, format!("ids[{i}]"), found, &mut report);
        }
        for (i, k) in &wanted_keys {
            let found = by_key.get(k).map(|id| (*id, k.store_id));
            judge(*i, format!("keys[{}]", i - ids.len()), found, &mut report);
        }
        targets.sort_unstable();
        targets.dedup();
        let failed = report.failed.len();
        let mut summary = json!({
            "total": total, "deleted": 0, "failed": failed, "eventId": null, "errors": report.into_json(),
        });
        if (atomic && failed > 0) || targets.is_empty() {
            return pgrx::JsonB(summary);
        }
        let (count, stores) = client
            .update(
                "WITH gone AS (DELETE FROM sales.monthly_sales WHERE id = ANY($1) RETURNING store_id)
                 SELECT count(*), coalesce(array_agg(DISTINCT store_id ORDER BY store_id), '{}') FROM gone",
                None,
                &[targets.into()],
            )
            .and_then(|t| t.first().get_two::<i64, Vec<i64>>())
            .or_raise();
        let (count, stores) = (count.unwrap_or_default(), stores.unwrap_or_default());
        summary["deleted"] = json!(count);
        let event = json!({"operation": "delete", "total": total, "deleted": count, "failed": failed, "storeIds": stores});
        summary["eventId"] = json!(emit_batch_event(client, event));
        pgrx::JsonB(summary)
    })
}
