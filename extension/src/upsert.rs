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
use crate::jsonb::{Jb, RawJsonb};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use sales_core::json::{JsonRead, Kind};
use sales_core::record::{check_month_key, check_record, parse_id, MonthKey};
use serde_json::{json, Value};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::CString;

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

    /// The report's members: `errors` by item index (stable: an item's
    /// errors keep the order they were found in), at most
    /// [`MAX_LISTED_ERRORS`], and `errorsOmitted` counting the rest when
    /// there are more (a batch of 100,000 bad records made a report of
    /// 7.5 MB, which an atomic batch raises as its DETAIL and Postgres
    /// writes to its log).
    fn add_to(mut self, summary: &mut Value) {
        self.errors.sort_by_key(|e| e.0);
        let omitted = self.errors.len().saturating_sub(MAX_LISTED_ERRORS);
        summary["errors"] = Value::Array(
            self.errors
                .into_iter()
                .take(MAX_LISTED_ERRORS)
                .map(|(index, field, reason)| json!({"index": index, "field": field, "reason": reason}))
                .collect(),
        );
        if omitted > 0 {
            summary["errorsOmitted"] = json!(omitted);
        }
    }
}

/// Errors a batch report lists; `errorsOmitted` counts the rest.
const MAX_LISTED_ERRORS: usize = 1000;

/// Appends the batch's summary event. The transaction's one NOTIFY (sent at
/// commit) carries the highest event id, which is this one when the batch is
/// the transaction's last write.
fn emit_batch_event(client: &mut SpiClient<'_>, payload: Value) -> i64 {
    // As the log's owner: a writer needs no privilege on the log.
    crate::events::as_log_owner(|| {
        EMIT_PLAN.with(|cell| {
            let plan = kept_plan(
                cell,
                client,
                "SELECT sales.emit('batch-completed', $1)",
                PgBuiltInOids::JSONBOID,
                true,
            );
            client
                .update(plan, Some(1), &[pgrx::JsonB(payload).into()])
                .and_then(|t| t.first().get_one::<i64>())
                .or_raise()
                .unwrap_or_default()
        })
    })
}

thread_local! {
    /// The statements every batch runs besides its write, each planned once
    /// per backend (parsing and planning them again cost a small batch
    /// about as much as its write).
    static EMIT_PLAN: std::cell::OnceCell<OwnedPreparedStatement> = const { std::cell::OnceCell::new() };
    static STORES_PLAN: std::cell::OnceCell<OwnedPreparedStatement> = const { std::cell::OnceCell::new() };
    static STORES_KEPT_PLAN: std::cell::OnceCell<OwnedPreparedStatement> = const { std::cell::OnceCell::new() };
}

/// `sql`, taking one argument of type `arg`, prepared in this backend the
/// first time and kept in `cell` (Postgres plans it again by itself when
/// something it depends on changes). `writes`: the statement changes data
/// (it runs read-write, as `SpiClient::update` runs text).
fn kept_plan<'c>(
    cell: &'c std::cell::OnceCell<OwnedPreparedStatement>,
    client: &SpiClient<'_>,
    sql: &str,
    arg: PgBuiltInOids,
    writes: bool,
) -> &'c OwnedPreparedStatement {
    cell.get_or_init(|| {
        let args = [PgOid::BuiltIn(arg)];
        let prepared = if writes {
            client.prepare_mut(sql, &args)
        } else {
            client.prepare(sql, &args)
        };
        prepared.or_raise().keep()
    })
}

/// Store ids among `ids` that exist. With `keep` (a best-effort batch),
/// each is kept so to the end of the transaction (the lock the records'
/// foreign key takes anyway, taken first, in id order): a store deleted by
/// a transaction still running is waited for, and found gone, its records
/// are reported by index. Checked without the lock, such a store passed,
/// and the foreign key then failed the whole statement: a best-effort
/// batch lost its valid records too. An atomic batch fails whole either
/// way, so it takes no lock (a locked row is a WAL record and a dirtied
/// page of `sales.stores` per store and batch). The lock is taken as the
/// tables' owner, as the foreign key's own check runs: a lock needs UPDATE
/// on the table, which a writer of sales rows need not have.
fn existing_stores(client: &mut SpiClient<'_>, ids: Vec<i64>, keep: bool) -> HashSet<i64> {
    if ids.is_empty() {
        return HashSet::new();
    }
    let found = |client: &mut SpiClient<'_>, plan: &OwnedPreparedStatement| {
        let rows = if keep {
            client.update(plan, Some(1), &[ids.into()])
        } else {
            client.select(plan, Some(1), &[ids.into()])
        };
        rows.and_then(|t| t.first().get_one::<Vec<i64>>())
            .or_raise()
            .unwrap_or_default()
            .into_iter()
            .collect()
    };
    if keep {
        crate::events::as_log_owner(|| {
            STORES_KEPT_PLAN.with(|cell| {
                let plan = kept_plan(
                    cell,
                    client,
                    "SELECT coalesce(pg_catalog.array_agg(id), '{}') FROM (
                         SELECT id FROM sales.stores WHERE id = ANY($1) ORDER BY id FOR KEY SHARE) s",
                    PgBuiltInOids::INT8ARRAYOID,
                    true,
                );
                found(client, plan)
            })
        })
    } else {
        STORES_PLAN.with(|cell| {
            let plan = kept_plan(
                cell,
                client,
                "SELECT coalesce(pg_catalog.array_agg(id), '{}') FROM sales.stores WHERE id = ANY($1)",
                PgBuiltInOids::INT8ARRAYOID,
                false,
            );
            found(client, plan)
        })
    }
}

fn scope_set(allowed: Option<Vec<Option<i64>>>) -> Option<HashSet<i64>> {
    allowed.map(|a| a.into_iter().flatten().collect())
}

fn outside_scope(store: i64) -> String {
    format!("store {store} is outside the caller's scope")
}

/// One statement for the whole batch. The records stay in the caller's jsonb
/// (`$1`): each row names its record by index (`$5`) and the field holding
/// its days (`$6`, `dailyData` or `daily_data`), so no JSON is rebuilt or
/// reparsed and numbers reach the table exactly as sent. A key given several
/// times in merge mode lists all its records in `$7` ('{2,7}'): their days
/// are folded in input order, later days winning (jsonb_object_agg keeps the
/// last of equal keys).
///
/// Rows arrive sorted by key (`WITH ORDINALITY` over sorted arrays), and
/// `INSERT ... SELECT ... ORDER BY` inserts, and on conflict locks, in that
/// order. The WHERE skips rows the batch would not change (still locked, but
/// not rewritten: no new version, no event), so they count as unchanged; in
/// merge mode it compares day by day (sales.daily_merge_changes) instead of
/// building the merged month twice. `xmax = 0` tells a fresh insert from an
/// update.
///
/// Polymorphic built-ins (`unnest`, the aggregates) are named with their
/// schema: a function of the caller's search path taking the exact types
/// would be chosen over them, even with `pg_catalog` searched first.
const UPSERT_SQL: &str = r#"
WITH input AS (
    SELECT k.s, k.y, k.m, k.o,
           CASE WHEN k.srcs IS NULL THEN $1 #> ARRAY[k.i::text, k.f]
                ELSE (SELECT coalesce(pg_catalog.jsonb_object_agg(e.key, e.value ORDER BY src.n), '{}')
                      FROM pg_catalog.unnest(k.srcs::int[]) WITH ORDINALITY AS src(i, n),
                           pg_catalog.jsonb_each(coalesce($1 #> ARRAY[src.i::text, 'dailyData'],
                                               $1 #> ARRAY[src.i::text, 'daily_data'])) AS e)
           END AS d
    FROM ROWS FROM (pg_catalog.unnest($2::bigint[]), pg_catalog.unnest($3::integer[]), pg_catalog.unnest($4::integer[]),
                    pg_catalog.unnest($5::integer[]), pg_catalog.unnest($6::text[]), pg_catalog.unnest($7::text[]))
         WITH ORDINALITY AS k(s, y, m, i, f, srcs, o)
), up AS (
    INSERT INTO sales.monthly_sales AS t (store_id, year, month, daily_data)
    SELECT s, y, m, d FROM input ORDER BY o
    ON CONFLICT (store_id, year, month) DO UPDATE
        SET daily_data = CASE WHEN $8 THEN EXCLUDED.daily_data ELSE MERGE_DAYS(t.daily_data, EXCLUDED.daily_data) END
        WHERE CASE WHEN $8 THEN t.daily_data IS DISTINCT FROM EXCLUDED.daily_data
                   ELSE sales.daily_merge_changes(t.daily_data, EXCLUDED.daily_data) END
    RETURNING (t.xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM up
"#;

/// What merges a month's days in UPSERT_SQL: `sales.daily_merge` (0.6.0
/// on), or jsonb's `||` (the same result, slower) in a database whose
/// extension has not been updated to this library's version yet.
fn merge_days_function() -> &'static str {
    let exists = Spi::get_one::<bool>(
        "SELECT pg_catalog.to_regprocedure('sales.daily_merge(jsonb,jsonb)') IS NOT NULL",
    );
    if matches!(exists, Ok(Some(true))) {
        "sales.daily_merge"
    } else {
        "pg_catalog.jsonb_concat"
    }
}

thread_local! {
    /// UPSERT_SQL, planned once per backend, and generically: a custom plan
    /// would take the batch's records as a constant and copy them through
    /// every planning step, on every call (about 5% of a 1,000-record batch).
    static UPSERT_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
}

/// Runs UPSERT_SQL with `args` (`$1`..`$8`, NULL for `None`) in the current
/// SPI connection. Returns (inserted, updated).
fn run_upsert(args: &[Option<pg_sys::Datum>; 8]) -> (i64, i64) {
    let plan = UPSERT_PLAN.with(|cell| {
        if cell.get().is_null() {
            let sql = CString::new(UPSERT_SQL.replace("MERGE_DAYS", merge_days_function()))
                .expect("no NUL in the statement");
            let mut types = [
                pg_sys::JSONBOID,
                pg_sys::INT8ARRAYOID,
                pg_sys::INT4ARRAYOID,
                pg_sys::INT4ARRAYOID,
                pg_sys::INT4ARRAYOID,
                pg_sys::TEXTARRAYOID,
                pg_sys::TEXTARRAYOID,
                pg_sys::BOOLOID,
            ];
            // SAFETY: inside an SPI connection; SPI_prepare_cursor raises an
            // ERROR rather than return NULL for a statement that fails to
            // parse, and SPI_keepplan moves the plan out of the procedure's
            // memory so it outlives this call.
            unsafe {
                let plan = pg_sys::SPI_prepare_cursor(
                    sql.as_ptr(),
                    types.len() as i32,
                    types.as_mut_ptr(),
                    pg_sys::CURSOR_OPT_GENERIC_PLAN as i32,
                );
                if plan.is_null() || pg_sys::SPI_keepplan(plan) != 0 {
                    error!("sales.batch_upsert: could not plan its statement");
                }
                cell.set(plan);
            }
        }
        cell.get()
    });
    let mut values: Vec<pg_sys::Datum> = args
        .iter()
        .map(|a| a.unwrap_or(pg_sys::Datum::from(0)))
        .collect();
    let nulls: Vec<std::ffi::c_char> = args
        .iter()
        .map(|a| if a.is_some() { b' ' } else { b'n' } as std::ffi::c_char)
        .collect();
    // SAFETY: the plan takes exactly these 8 arguments, of these types; its
    // one result row has two bigint columns (the counts, never NULL).
    unsafe {
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, 0);
        if rc != pg_sys::SPI_OK_SELECT as i32 || pg_sys::SPI_processed != 1 {
            error!("sales.batch_upsert: unexpected result {rc} from its statement");
        }
        let table = &*pg_sys::SPI_tuptable;
        let row = *table.vals;
        let count = |col: i32| {
            let mut null = false;
            let d = pg_sys::SPI_getbinval(row, table.tupdesc, col, &mut null);
            if null {
                0
            } else {
                d.value() as i64
            }
        };
        (count(1), count(2))
    }
}

/// The records of one (store, year, month) key, in input order.
struct Sources {
    /// Record indexes, first to last.
    records: Vec<usize>,
    /// Where the last record keeps its days: "dailyData" or "daily_data".
    field: &'static str,
}

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
    records: Option<RawJsonb>,
    replace: default!(Option<bool>, false),
    atomic: default!(Option<bool>, true),
    allowed_stores: default!(Option<Vec<Option<i64>>>, "NULL"),
) -> pgrx::JsonB {
    // NULL options mean their defaults, as in the sales.batch_upsert wrapper
    // (a plain bool would make NULL an internal error).
    let (replace, atomic) = (replace.unwrap_or(false), atomic.unwrap_or(true));
    let not_array = || -> ! {
        SalesError::InvalidParameter("records must be a JSON array of sales records".into()).raise()
    };
    let Some(records) = records else { not_array() };
    let root = records.root();
    if root.kind() != Kind::Array {
        not_array()
    }
    let scope = scope_set(allowed_stores);
    let total = root.len();
    let mut report = Report::new();
    // (index, key, field holding the days) of each record that passed.
    let mut valid: Vec<(usize, MonthKey, &'static str)> = Vec::with_capacity(total);
    root.each_element(|i, item| match check_record(item) {
        Ok(parts) => match &scope {
            Some(s) if !s.contains(&parts.key.store_id) => {
                report.add(i, "storeId", outside_scope(parts.key.store_id))
            }
            _ => {
                let field = if item.get("dailyData").is_some() {
                    "dailyData"
                } else {
                    "daily_data"
                };
                valid.push((i, parts.key, field))
            }
        },
        Err(errs) => {
            for e in errs {
                report.add(i, &e.field, e.reason);
            }
        }
    });

    Spi::connect_mut(|client| {
        let wanted: Vec<i64> = valid
            .iter()
            .map(|(_, k, _)| k.store_id)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let exists = existing_stores(client, wanted, !atomic);
        let mut by_key: BTreeMap<MonthKey, Sources> = BTreeMap::new();
        let mut duplicates = Vec::new();
        for (i, key, field) in valid {
            if !exists.contains(&key.store_id) {
                report.add(
                    i,
                    "storeId",
                    format!("store {} does not exist", key.store_id),
                );
                continue;
            }
            let sources = by_key.entry(key).or_insert_with(|| Sources {
                records: Vec::new(),
                field,
            });
            if let Some(last) = sources.records.last() {
                duplicates.push(json!({"index": last, "supersededBy": i}));
            }
            sources.records.push(i);
            sources.field = field;
        }
        let failed = report.failed.len();
        let mut summary = json!({
            "total": total, "inserted": 0, "updated": 0, "unchanged": 0, "failed": failed,
            "merged": duplicates.len(), "eventId": null,
            "errors": [], "duplicates": [],
        });
        // Listed as errors are: the first MAX_LISTED_ERRORS, `merged`
        // counting them all.
        let omitted = duplicates.len().saturating_sub(MAX_LISTED_ERRORS);
        duplicates.truncate(MAX_LISTED_ERRORS);
        summary["duplicates"] = Value::Array(duplicates);
        if omitted > 0 {
            summary["duplicatesOmitted"] = json!(omitted);
        }
        report.add_to(&mut summary);
        if (atomic && failed > 0) || by_key.is_empty() {
            return pgrx::JsonB(summary);
        }

        let n = by_key.len();
        let mut stores = Vec::with_capacity(n);
        let mut years = Vec::with_capacity(n);
        let mut months = Vec::with_capacity(n);
        let mut indexes = Vec::with_capacity(n);
        let mut fields = Vec::with_capacity(n);
        let mut folds: Vec<Option<String>> = Vec::with_capacity(n);
        for (key, src) in &by_key {
            stores.push(key.store_id);
            years.push(key.year);
            months.push(key.month);
            indexes.push(*src.records.last().expect("a key has a record") as i32);
            fields.push(src.field.to_string());
            // Replacing keeps only the last record; merging folds them all.
            folds.push((!replace && src.records.len() > 1).then(|| {
                let list: Vec<String> = src.records.iter().map(|i| i.to_string()).collect();
                format!("{{{}}}", list.join(","))
            }));
        }
        let batch_stores: Vec<i64> = stores
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let (inserted, updated) = run_upsert(&[
            records.datum().into_datum(),
            stores.into_datum(),
            years.into_datum(),
            months.into_datum(),
            indexes.into_datum(),
            fields.into_datum(),
            folds.into_datum(),
            replace.into_datum(),
        ]);
        let unchanged = n as i64 - inserted - updated;
        summary["inserted"] = json!(inserted);
        summary["updated"] = json!(updated);
        summary["unchanged"] = json!(unchanged);
        // A batch that wrote nothing (every record as stored already, as
        // when one is sent again) has nothing to announce: no
        // `batch-completed`, and `eventId` stays null.
        if inserted + updated > 0 {
            let event = json!({
                "operation": "upsert", "mode": if replace { "replace" } else { "merge" },
                "total": total, "inserted": inserted, "updated": updated,
                "unchanged": unchanged, "failed": failed, "storeIds": batch_stores,
            });
            summary["eventId"] = json!(emit_batch_event(client, event));
        }
        pgrx::JsonB(summary)
    })
}

/// Finds and locks the rows named by ids and keys, in (store, year, month)
/// order (the order `batch_upsert` locks in). Returns (id, store, year, month).
const LOCK_SQL: &str = r#"
SELECT m.id, m.store_id, m.year, m.month
FROM sales.monthly_sales m
WHERE m.id IN (SELECT pg_catalog.unnest($1::bigint[])
               UNION ALL
               SELECT x.id FROM ROWS FROM (pg_catalog.unnest($2::bigint[]), pg_catalog.unnest($3::integer[]),
                                         pg_catalog.unnest($4::integer[])) AS k(s, y, mo)
               JOIN sales.monthly_sales x ON x.store_id = k.s AND x.year = k.y AND x.month = k.mo)
  AND ($5::bigint[] IS NULL OR m.store_id = ANY($5))
ORDER BY m.store_id, m.year, m.month
FOR UPDATE OF m
"#;

/// Deletes monthly records by id and/or by `{storeId, year, month}` keys.
/// Unknown ids or keys are reported; with `atomic` nothing is deleted when
/// any item fails. Item `i` of the report is `ids[i]` for the ids, then
/// `keys[i - len(ids)]`. Returns `{total, deleted, failed, duplicates, eventId, errors}`.
/// Both NULL is a mistake (22023); empty arrays delete nothing.
#[pg_extern(volatile)]
fn batch_delete_impl(
    ids: Option<Vec<Option<i64>>>,
    keys: Option<RawJsonb>,
    atomic: default!(Option<bool>, true),
    allowed_stores: default!(Option<Vec<Option<i64>>>, "NULL"),
) -> pgrx::JsonB {
    let atomic = atomic.unwrap_or(true);
    // Read in place, like the records of batch_upsert: a key with a number
    // no f64 holds is reported as any bad key is.
    let keys = match keys.as_ref().map(RawJsonb::root) {
        None | Some(Jb::Null) => None,
        Some(a @ Jb::Array(_)) => {
            let mut items = Vec::with_capacity(a.len());
            a.each_element(|_, e| items.push(e));
            Some(items)
        }
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
        match check_month_key(*k) {
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
        // Only rows in the caller's scope are locked (a row of another
        // store is neither locked nor named: its id is reported missing,
        // as one that does not exist, so the answer does not tell who owns
        // it; a key names its store itself, and is reported outside).
        let scope_ids: Option<Vec<i64>> = scope.as_ref().map(|s| {
            let mut v: Vec<i64> = s.iter().copied().collect();
            v.sort_unstable();
            v
        });
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
                        scope_ids.clone().into(),
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
        for (i, id) in &wanted_ids {
            match by_id.get(id) {
                Some(_) => targets.push(*id),
                None => report.add(*i, &format!("ids[{i}]"), "no such sales record"),
            }
        }
        for (i, k) in &wanted_keys {
            let field = format!("keys[{}]", i - ids.len());
            match (&scope, by_key.get(k)) {
                (Some(s), _) if !s.contains(&k.store_id) => {
                    report.add(*i, &field, outside_scope(k.store_id))
                }
                (_, Some(id)) => targets.push(*id),
                (_, None) => report.add(*i, &field, "no such sales record"),
            }
        }
        // Items naming a row another item named already (an id twice, or
        // an id and its row's key): counted, so that deleted, failed and
        // duplicates add up to total.
        let named = targets.len();
        targets.sort_unstable();
        targets.dedup();
        let duplicates = named - targets.len();
        let failed = report.failed.len();
        let mut summary = json!({
            "total": total, "deleted": 0, "failed": failed, "duplicates": duplicates,
            "eventId": null, "errors": [],
        });
        report.add_to(&mut summary);
        if (atomic && failed > 0) || targets.is_empty() {
            return pgrx::JsonB(summary);
        }
        let (count, stores) = client
            .update(
                "WITH gone AS (DELETE FROM sales.monthly_sales WHERE id = ANY($1) RETURNING store_id)
                 SELECT count(*), coalesce(pg_catalog.array_agg(DISTINCT store_id ORDER BY store_id), '{}') FROM gone",
                None,
                &[targets.into()],
            )
            .and_then(|t| t.first().get_two::<i64, Vec<i64>>())
            .or_raise();
        let (count, stores) = (count.unwrap_or_default(), stores.unwrap_or_default());
        summary["deleted"] = json!(count);
        if count > 0 {
            let event = json!({"operation": "delete", "total": total, "deleted": count, "failed": failed, "storeIds": stores});
            summary["eventId"] = json!(emit_batch_event(client, event));
        }
        pgrx::JsonB(summary)
    })
}
