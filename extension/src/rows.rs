//! What a sales row derives from what its writer gives: its totals, its
//! version and its timestamps. Every write of `sales.monthly_sales` pays for
//! this, so it is one Rust row trigger rather than generated columns (whose
//! expressions Postgres reads back and plans again for every statement) and
//! a PL/pgSQL trigger.

use crate::events::SalesRow;
use crate::jsonb::{walk_together, Jb, JsonbDatum, NumericSum, RawJsonb};
use crate::jsonb_text::Node;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::borrow::Cow;

/// The highest version a sales row may be inserted with (2^61), far below
/// the CHECK's 2^62 - 1, so that its updates never reach the ceiling.
const INSERT_VERSION_LIMIT: i64 = 1 << 61;

/// `BEFORE INSERT OR UPDATE ... FOR EACH ROW` on `sales.monthly_sales`.
///
/// - `total_sales`, `total_customers` and `days_reported` are computed from
///   `daily_data` (the sum of each metric over the days, exactly; the
///   number of days), whatever the writer put in them.
/// - On update: the id may not change; `version` moves up by one and
///   `updated_at` to the transaction's time (or the old value, if later)
///   only when the store, year, month
///   or daily data changed (jsonb equality: `1.0` and `1.00` are the same
///   value), otherwise both keep their old values, so a no-op update makes
///   no new version and no event; `created_at` never changes.
/// - On update, a value equal to the stored one keeps the stored bytes:
///   daily data equal to the old (`{"1": {"sales": 10.500}}` over
///   `{"1": {"sales": 10.5}}`) is not written at all, and a day equal to its
///   old value in a month that changed elsewhere keeps its old value as
///   stored. So the stored bytes never change without a new version and an
///   event naming the day (which the history is rebuilt from), and plain
///   SQL stores what `sales.batch_upsert` stores: it counts such a record
///   unchanged and leaves it as it was (merge and replace modes alike).
/// - On insert, a version above [`INSERT_VERSION_LIMIT`] is refused.
#[pg_trigger]
fn tg_sales_row<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
    let td = trigger.trigger_data();
    const MISUSE: &str = "sales.tg_sales_row must run BEFORE INSERT OR UPDATE ... FOR EACH ROW";
    if td.tg_event & pg_sys::TRIGGER_EVENT_TIMINGMASK != pg_sys::TRIGGER_EVENT_BEFORE {
        crate::events::misused(MISUSE.to_string());
    }
    // SAFETY: a row-level BEFORE INSERT/UPDATE trigger call (checked by
    // SalesRow::of): the relation, its descriptor and tuples are valid for
    // the duration of the call, and the tuple returned is allocated in the
    // call's memory context.
    unsafe {
        let row = SalesRow::of(td, MISUSE);
        let (desc, cols, old, new) = (row.desc, &row.cols, row.old, row.new);
        let get = |t, att| row.get(t, att);
        let old_daily = old.and_then(|t| row.daily(t));
        // Columns set here, by attribute number, with their values (at most
        // seven: the daily data, the three totals, the version and the two
        // timestamps).
        let mut set = Replacements::default();
        // The daily data as given, and as stored: counts written with a
        // scale as the integers they are, then, on update, the old values
        // where the new ones are equal (see above).
        let given = row.daily(new);
        let whole = given
            .as_ref()
            .and_then(whole_counts)
            .and_then(|d| d.into_datum());
        let whole_raw =
            whole.and_then(|d| RawJsonb::from_polymorphic_datum(d, false, pg_sys::JSONBOID));
        let written = whole_raw.as_ref().or(given.as_ref());
        let same_data = match (written, &old_daily) {
            (Some(n), Some(o)) => n.equals(o),
            (None, None) => true,
            _ => false,
        };
        let mut rebuilt: Option<RawJsonb> = None;
        let mut replaced = false;
        if let (Some(n), Some(o), Some(old)) = (&given, &old_daily, old) {
            if same_data {
                if !n.same_bytes(o) {
                    // The old datum as the old row holds it (a TOAST
                    // pointer stays one: nothing is written again).
                    set.push(cols.daily_data, get(old, cols.daily_data));
                }
                replaced = true;
            } else if let Some(d) = written
                .and_then(|w| keep_equal_days(o, w))
                .and_then(|d| d.into_datum())
            {
                set.push(cols.daily_data, Some(d));
                rebuilt = RawJsonb::from_polymorphic_datum(d, false, pg_sys::JSONBOID);
                replaced = true;
            }
        }
        if let (false, Some(d)) = (replaced, whole) {
            set.push(cols.daily_data, Some(d));
        }
        let new_daily = if same_data && old_daily.is_some() {
            old_daily.as_ref()
        } else if rebuilt.is_some() {
            rebuilt.as_ref()
        } else {
            written
        };
        let (sales, customers, days) = match new_daily {
            Some(j) => totals(j.root()),
            None => (None, None, None),
        };
        set.push(cols.total_sales, sales);
        set.push(cols.total_customers, customers);
        set.push(cols.days_reported, days);

        if let Some(old) = old {
            // int8 columns hold the value in the datum; int4 ones its low half.
            let int = |t, att| get(t, att).map(|d| d.value() as i64);
            let int4 = |t, att| get(t, att).map(|d| d.value() as i32);
            if int(new, cols.id) != int(old, cols.id) {
                ereport!(
                    PgLogLevel::ERROR,
                    PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    "the id of a sales record cannot change"
                );
            }
            let changed = !same_data
                || int(new, cols.store_id) != int(old, cols.store_id)
                || int4(new, cols.year) != int4(old, cols.year)
                || int4(new, cols.month) != int4(old, cols.month);
            let old_version = int(old, cols.version).unwrap_or(0);
            if changed {
                set.push(
                    cols.version,
                    Some(pg_sys::Datum::from(old_version.saturating_add(1))),
                );
                // The transaction's time, or the old version's where that is
                // later: a transaction that waited for this row's lock
                // while a younger one wrote it must not date its newer
                // version before the older one (history dates versions the
                // same way, so `asOf` a record's `updatedAt` finds it).
                let now = pg_sys::GetCurrentTransactionStartTimestamp();
                let before = get(old, cols.updated_at).map(|d| d.value() as i64);
                set.push(
                    cols.updated_at,
                    Some(pg_sys::Datum::from(before.map_or(now, |b| b.max(now)))),
                );
            } else {
                set.push(cols.version, Some(pg_sys::Datum::from(old_version)));
                set.push(cols.updated_at, get(old, cols.updated_at));
            }
            set.push(cols.created_at, get(old, cols.created_at));
        } else if let Some(v) = get(new, cols.version).map(|d| d.value() as i64) {
            // A version chosen on insert leaves room for its updates: at
            // the CHECK's ceiling (2^62 - 1) the row's next version would
            // break it, and every statement touching the row (a whole
            // best-effort batch) would fail. 2^61 updates are far more
            // than any row sees.
            if v > INSERT_VERSION_LIMIT {
                ereport!(
                    PgLogLevel::ERROR,
                    PgSqlErrorCode::ERRCODE_CHECK_VIOLATION,
                    format!(
                        "the version of a new sales record is at most {INSERT_VERSION_LIMIT} (2^61), not {v}: the row's later versions must stay below 2^62"
                    )
                );
            }
        }

        let tuple = pg_sys::heap_modify_tuple_by_cols(
            new,
            desc,
            set.n as i32,
            set.atts.as_mut_ptr(),
            set.values.as_mut_ptr(),
            set.nulls.as_mut_ptr(),
        );
        // An update's event goes in with the row (see
        // events::updates_write_events); an insert's comes after it, from
        // monthly_sales_events, as an ON CONFLICT insert may still turn
        // into an update after this call.
        if old.is_some() && crate::events::updates_write_events(td.tg_relation) {
            crate::events::refuse_later_before_update_triggers(td);
            crate::events::write_row_event(&row, tuple, old_daily.as_ref(), new_daily);
        }
        Ok(Some(PgHeapTuple::from_heap_tuple(
            pgrx::PgTupleDesc::from_pg_unchecked(desc),
            tuple,
        )))
    }
}

/// Replaced columns for `heap_modify_tuple_by_cols`, without an allocation.
struct Replacements {
    n: usize,
    atts: [i32; 7],
    values: [pg_sys::Datum; 7],
    nulls: [bool; 7],
}

impl Default for Replacements {
    fn default() -> Self {
        Replacements {
            n: 0,
            atts: [0; 7],
            values: [pg_sys::Datum::from(0); 7],
            nulls: [false; 7],
        }
    }
}

impl Replacements {
    fn push(&mut self, att: i32, value: Option<pg_sys::Datum>) {
        self.atts[self.n] = att;
        self.values[self.n] = value.unwrap_or(pg_sys::Datum::from(0));
        self.nulls[self.n] = value.is_none();
        self.n += 1;
    }
}

/// `new` with the days whose value equals their value in `old` as `old`
/// stores them, or None when it has none stored differently (nothing to
/// rebuild): `{"1": {"sales": 10.500}, "2": ...}` over `{"1": {"sales":
/// 10.5}, ...}` keeps `10.5`. Only for two objects (months).
fn keep_equal_days(old: &RawJsonb, new: &RawJsonb) -> Option<JsonbDatum> {
    let (Jb::Object(a), Jb::Object(b)) = (old.root(), new.root()) else {
        return None;
    };
    let mut rewrite = false;
    walk_together(Some(a.members()), Some(b.members()), |o, n| {
        if let (Some(o), Some(n)) = (o, n) {
            if !rewrite && !o.same_stored(&n) && o.value().equals(n.value()) {
                rewrite = true;
            }
        }
    });
    if !rewrite {
        return None;
    }
    let mut pairs = Vec::with_capacity(b.len());
    walk_together(Some(a.members()), Some(b.members()), |o, n| match (o, n) {
        (Some(o), Some(n)) if o.value().equals(n.value()) => {
            pairs.push((Cow::Borrowed(n.key().as_bytes()), o.stored()))
        }
        (_, Some(n)) => pairs.push((Cow::Borrowed(n.key().as_bytes()), n.stored())),
        _ => {}
    });
    Some(crate::jsonb_text::document_datum(
        Node::Obj(pairs),
        "a month",
    ))
}

/// The metrics that count (whole numbers).
const COUNTS: [&str; 2] = ["customers", "transactions"];

/// Whether `v`, the value of metric `k`, is a count written with a scale.
fn scaled_count(k: &str, v: Jb<'_>) -> bool {
    COUNTS.contains(&k) && matches!(v, Jb::Number(n) if n.scaled_integer().is_some())
}

/// `month` with its counts written with a scale (`"customers": 2.0`, or
/// `1.0e3`: whole numbers, which the rules accept) as the integers they
/// are, or None when it has none (nothing to rebuild). The OpenAPI document
/// types counts as integers, and a strict decoder refuses `2.0` for one;
/// every other value is kept as written.
fn whole_counts(month: &RawJsonb) -> Option<JsonbDatum> {
    let Jb::Object(m) = month.root() else {
        return None;
    };
    let has_scaled =
        |day: Jb<'_>| matches!(day, Jb::Object(d) if d.members().any(|(k, v)| scaled_count(k, v)));
    if !m.members().any(|(_, day)| has_scaled(day)) {
        return None;
    }
    let mut days = Vec::with_capacity(m.len());
    let mut each_day = m.members();
    while let Some(day) = each_day.next_raw() {
        let node = match day.value() {
            Jb::Object(d) if has_scaled(day.value()) => {
                let mut metrics = Vec::with_capacity(d.len());
                let mut each_metric = d.members();
                while let Some(x) = each_metric.next_raw() {
                    let v = match x.value() {
                        Jb::Number(n) if COUNTS.contains(&x.key()) => {
                            n.scaled_integer().map(Node::Int)
                        }
                        _ => None,
                    };
                    metrics.push((
                        Cow::Borrowed(x.key().as_bytes()),
                        v.unwrap_or_else(|| x.stored()),
                    ));
                }
                Node::Obj(metrics)
            }
            _ => day.stored(),
        };
        days.push((Cow::Borrowed(day.key().as_bytes()), node));
    }
    Some(crate::jsonb_text::document_datum(
        Node::Obj(days),
        "a month",
    ))
}

/// One pass over a month's days: the sum of `sales` (numeric), of
/// `customers` (as `bigint`, rounded as a cast rounds) and the number of
/// days. Days without a metric, and values that are not numbers (which the
/// CHECK constraint refuses after this trigger), count as nothing; a
/// document that is not an object has no days.
fn totals(
    root: Jb<'_>,
) -> (
    Option<pg_sys::Datum>,
    Option<pg_sys::Datum>,
    Option<pg_sys::Datum>,
) {
    let mut sales = NumericSum::new();
    let mut customers = NumericSum::new();
    let mut days = 0i32;
    if let Jb::Object(month) = root {
        for (_, day) in month.members() {
            days += 1;
            let Jb::Object(metrics) = day else { continue };
            for (k, v) in metrics.members() {
                if let Jb::Number(n) = v {
                    match k {
                        "sales" => sales.add(n),
                        "customers" => customers.add(n),
                        _ => {}
                    }
                }
            }
        }
    }
    // A sum past the bigint range (a day of 1e20 customers) is stored as
    // the range's end rather than failing here with "bigint out of range",
    // which names neither the field nor the rule: such a day breaks the
    // daily data's CHECK constraint, which then refuses the row by name.
    let fits = customers.fits_int8();
    let customers = customers.finish();
    let customers = if fits {
        // SAFETY: numeric_int8 takes one numeric argument, which fits.
        unsafe {
            pgrx::direct_function_call_as_datum(pg_sys::numeric_int8, &[customers.into_datum()])
        }
    } else {
        Some(pg_sys::Datum::from(if customers.is_negative() {
            i64::MIN
        } else {
            i64::MAX
        }))
    };
    (
        sales.finish().into_datum(),
        customers,
        Some(pg_sys::Datum::from(days)),
    )
}
