//! Event plumbing that runs once per event row, so it is Rust rather than
//! PL/pgSQL (see `sql/schema.sql` for the event triggers themselves).

use crate::jsonb::{Jb, RawJsonb};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;

const ARMED: &CStr = c"sales.notify_armed";

/// Kept for installations of 0.1.0 (whose script refers to it) until they
/// are updated; 0.2.0 sends the commit's NOTIFY from the pre-commit callback
/// in `delivery.rs` instead.
///
/// True for the first event row of the current transaction, false after:
/// that row gets `wakes = true`, and its deferred trigger sends the
/// transaction's one NOTIFY at commit. The flag is the transaction-local
/// setting `sales.notify_armed` (as `set_config(..., true)`), so a rolled-back
/// savepoint forgets it together with the rows it covered, and it is gone at
/// the next transaction.
#[pg_extern(volatile, parallel_unsafe)]
fn arm_notify() -> bool {
    unsafe {
        let current = pg_sys::GetConfigOption(ARMED.as_ptr(), true, false);
        if !current.is_null() && CStr::from_ptr(current).to_bytes() == b"on" {
            return false;
        }
        pg_sys::set_config_option(
            ARMED.as_ptr(),
            c"on".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            0,
            false,
        );
    }
    true
}

/// The event of one sales row written (`AFTER INSERT OR UPDATE ... FOR EACH
/// ROW` on `sales.monthly_sales`): `sales-data-created` or
/// `sales-data-updated` with the row's new totals, the days that changed and,
/// for a row moved to another store or month, where it was before. An update
/// that left the row unchanged (same version, see `tg_sales_version`) makes
/// no event.
///
/// Every single-row commit pays for this, so it is written against the
/// trigger data directly: the payload is built as a binary jsonb value
/// (no `jsonb_build_object` type lookups, no text round trip), and the row
/// goes in through one statement prepared once per backend.
#[pg_trigger]
fn tg_sales_changed<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
    let td = trigger.trigger_data();
    let op = td.tg_event & pg_sys::TRIGGER_EVENT_OPMASK;
    if td.tg_event & pg_sys::TRIGGER_EVENT_ROW == 0
        || (op != pg_sys::TRIGGER_EVENT_INSERT && op != pg_sys::TRIGGER_EVENT_UPDATE)
    {
        error!("sales.tg_sales_changed must run AFTER INSERT OR UPDATE ... FOR EACH ROW");
    }
    // SAFETY: a row-level INSERT/UPDATE trigger call: the relation and its
    // tuples are valid for the duration of the call.
    unsafe {
        let desc = (*td.tg_relation).rd_att;
        let cols = SalesColumns::of(desc);
        let (old, new) = if op == pg_sys::TRIGGER_EVENT_INSERT {
            (None, td.tg_trigtuple)
        } else {
            (Some(td.tg_trigtuple), td.tg_newtuple)
        };
        let get = |t: *mut pg_sys::HeapTupleData, att: i32| -> Option<pg_sys::Datum> {
            let mut null = false;
            let d = pg_sys::heap_getattr(t, att, desc, &mut null);
            (!null).then_some(d)
        };
        // int8 columns hold the value in the datum; int4 ones its low half.
        let int = |t, att| get(t, att).map(|d| d.value() as i64).unwrap_or(0);
        let int4 = |t, att| get(t, att).map(|d| d.value() as i32 as i64).unwrap_or(0);
        let version = int(new, cols.version);
        if let Some(old) = old {
            if int(old, cols.version) == version {
                return Ok(None);
            }
        }
        let daily = |t| {
            get(t, cols.daily_data)
                .and_then(|d| RawJsonb::from_polymorphic_datum(d, false, pg_sys::JSONBOID))
        };
        let new_daily = daily(new);
        let old_daily = old.and_then(daily);
        let days = crate::validate::changed_day_keys(
            old_daily.as_ref().map(|j| j.root()).unwrap_or(Jb::Null),
            new_daily.as_ref().map(|j| j.root()).unwrap_or(Jb::Null),
        );

        let (id, store) = (int(new, cols.id), int(new, cols.store_id));
        let (year, month) = (int4(new, cols.year), int4(new, cols.month));
        let mut p = Payload::new();
        p.int(c"id", id);
        p.int(c"storeId", store);
        p.int(c"year", year);
        p.int(c"month", month);
        p.int(c"version", version);
        match get(new, cols.total_sales) {
            // A heap tuple may hold it with a short header: detoast to the
            // layout jsonb expects.
            Some(d) => p.numeric(
                c"totalSales",
                pg_sys::pg_detoast_datum(d.cast_mut_ptr()) as pg_sys::Numeric,
            ),
            None => p.null(c"totalSales"),
        }
        match get(new, cols.total_customers) {
            Some(d) => p.int(c"totalCustomers", d.value() as i64),
            None => p.null(c"totalCustomers"),
        }
        match get(new, cols.days_reported) {
            Some(d) => p.int(c"daysReported", d.value() as i32 as i64),
            None => p.null(c"daysReported"),
        }
        p.strings(c"changedDays", &days);
        if let Some(old) = old {
            let old_store = int(old, cols.store_id);
            if old_store != store {
                p.int(c"previousStoreId", old_store);
            }
            let (old_year, old_month) = (int4(old, cols.year), int4(old, cols.month));
            if (old_year, old_month) != (year, month) {
                p.int(c"previousYear", old_year);
                p.int(c"previousMonth", old_month);
            }
        }
        let kind = if old.is_some() {
            c"sales-data-updated"
        } else {
            c"sales-data-created"
        };
        insert_event(kind, store, current_actor(), id, version, p.finish());
    }
    Ok(None)
}

/// Attribute numbers of the `sales.monthly_sales` columns an event reads.
struct SalesColumns {
    id: i32,
    store_id: i32,
    year: i32,
    month: i32,
    daily_data: i32,
    total_sales: i32,
    total_customers: i32,
    days_reported: i32,
    version: i32,
}

impl SalesColumns {
    /// Looked up by name on every call (a dozen short comparisons), so a
    /// column added or dropped later cannot shift them.
    unsafe fn of(desc: pg_sys::TupleDesc) -> Self {
        let mut c = SalesColumns {
            id: 0,
            store_id: 0,
            year: 0,
            month: 0,
            daily_data: 0,
            total_sales: 0,
            total_customers: 0,
            days_reported: 0,
            version: 0,
        };
        let natts = unsafe { (*desc).natts } as usize;
        let attrs = unsafe { (*desc).attrs.as_slice(natts) };
        for (i, a) in attrs.iter().enumerate() {
            if a.attisdropped {
                continue;
            }
            let name = unsafe { CStr::from_ptr(a.attname.data.as_ptr()) }.to_bytes();
            let slot = match name {
                b"id" => &mut c.id,
                b"store_id" => &mut c.store_id,
                b"year" => &mut c.year,
                b"month" => &mut c.month,
                b"daily_data" => &mut c.daily_data,
                b"total_sales" => &mut c.total_sales,
                b"total_customers" => &mut c.total_customers,
                b"days_reported" => &mut c.days_reported,
                b"version" => &mut c.version,
                _ => continue,
            };
            *slot = i as i32 + 1;
        }
        for (n, att) in [
            ("id", c.id),
            ("store_id", c.store_id),
            ("year", c.year),
            ("month", c.month),
            ("daily_data", c.daily_data),
            ("total_sales", c.total_sales),
            ("total_customers", c.total_customers),
            ("days_reported", c.days_reported),
            ("version", c.version),
        ] {
            if att == 0 {
                error!("sales.tg_sales_changed: the table has no column {n}");
            }
        }
        c
    }
}

/// A jsonb object built in Postgres' in-memory form. Keys are static and
/// strings borrow data that outlives the call, as `pushJsonbValue` keeps
/// pointers until [`Payload::finish`] serialises the object.
struct Payload(*mut pg_sys::JsonbParseState);

impl Payload {
    unsafe fn new() -> Self {
        let mut state = std::ptr::null_mut();
        unsafe {
            pg_sys::pushJsonbValue(
                &mut state,
                pg_sys::JsonbIteratorToken::WJB_BEGIN_OBJECT,
                std::ptr::null_mut(),
            )
        };
        Payload(state)
    }

    unsafe fn push(&mut self, token: pg_sys::JsonbIteratorToken::Type, mut v: pg_sys::JsonbValue) {
        unsafe { pg_sys::pushJsonbValue(&mut self.0, token, &mut v) };
    }

    fn string_value(s: &[u8]) -> pg_sys::JsonbValue {
        let mut v: pg_sys::JsonbValue = unsafe { std::mem::zeroed() };
        v.type_ = pg_sys::jbvType::jbvString;
        v.val.string = pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_1 {
            len: s.len() as i32,
            val: s.as_ptr() as *mut std::ffi::c_char,
        };
        v
    }

    unsafe fn key(&mut self, key: &'static CStr) {
        unsafe {
            self.push(
                pg_sys::JsonbIteratorToken::WJB_KEY,
                Self::string_value(key.to_bytes()),
            )
        };
    }

    unsafe fn numeric(&mut self, key: &'static CStr, n: pg_sys::Numeric) {
        unsafe {
            self.key(key);
            let mut v: pg_sys::JsonbValue = std::mem::zeroed();
            v.type_ = pg_sys::jbvType::jbvNumeric;
            v.val.numeric = n;
            self.push(pg_sys::JsonbIteratorToken::WJB_VALUE, v);
        }
    }

    unsafe fn int(&mut self, key: &'static CStr, n: i64) {
        unsafe { self.numeric(key, pg_sys::int64_to_numeric(n)) };
    }

    unsafe fn null(&mut self, key: &'static CStr) {
        unsafe {
            self.key(key);
            let mut v: pg_sys::JsonbValue = std::mem::zeroed();
            v.type_ = pg_sys::jbvType::jbvNull;
            self.push(pg_sys::JsonbIteratorToken::WJB_VALUE, v);
        }
    }

    unsafe fn strings(&mut self, key: &'static CStr, items: &[&str]) {
        unsafe {
            self.key(key);
            pg_sys::pushJsonbValue(
                &mut self.0,
                pg_sys::JsonbIteratorToken::WJB_BEGIN_ARRAY,
                std::ptr::null_mut(),
            );
            for s in items {
                self.push(
                    pg_sys::JsonbIteratorToken::WJB_ELEM,
                    Self::string_value(s.as_bytes()),
                );
            }
            pg_sys::pushJsonbValue(
                &mut self.0,
                pg_sys::JsonbIteratorToken::WJB_END_ARRAY,
                std::ptr::null_mut(),
            );
        }
    }

    unsafe fn finish(mut self) -> pg_sys::Datum {
        unsafe {
            let v = pg_sys::pushJsonbValue(
                &mut self.0,
                pg_sys::JsonbIteratorToken::WJB_END_OBJECT,
                std::ptr::null_mut(),
            );
            pg_sys::Datum::from(pg_sys::JsonbValueToJsonb(v))
        }
    }
}

/// `sales.current_actor()`: the `sales.user_id` setting as a user id, or
/// NULL when it is not set.
fn current_actor() -> Option<i64> {
    unsafe {
        let v = pg_sys::GetConfigOption(c"sales.user_id".as_ptr(), true, false);
        if v.is_null() {
            return None;
        }
        let text = CStr::from_ptr(v).to_string_lossy();
        if text.is_empty() {
            return None;
        }
        match text.trim().parse::<i64>() {
            Ok(id) => Some(id),
            Err(_) => {
                pgrx::pg_sys::panic::ErrorReport::new(
                    PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
                    format!(
                        "invalid input syntax for type bigint: \"{text}\" (setting sales.user_id)"
                    ),
                    "pg_sales",
                )
                .report(PgLogLevel::ERROR);
                unreachable!("ERROR does not return")
            }
        }
    }
}

thread_local! {
    /// The event INSERT, prepared once per backend (`SPI_keepplan`).
    static INSERT_PLAN: std::cell::Cell<pg_sys::SPIPlanPtr> =
        const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// Appends one row to `sales.events` (its id, `seq`, `xid` and time come
/// from the column defaults, as for every other event writer).
unsafe fn insert_event(
    kind: &CStr,
    store_id: i64,
    actor: Option<i64>,
    row_id: i64,
    row_version: i64,
    payload: pg_sys::Datum,
) {
    unsafe {
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            error!("pg_sales: SPI_connect failed");
        }
        let mut plan = INSERT_PLAN.get();
        if plan.is_null() {
            let mut types = [
                pg_sys::TEXTOID,
                pg_sys::INT8OID,
                pg_sys::INT8OID,
                pg_sys::INT8OID,
                pg_sys::INT8OID,
                pg_sys::JSONBOID,
            ];
            let p = pg_sys::SPI_prepare(
                c"INSERT INTO sales.events (kind, store_id, actor_id, row_id, row_version, payload)
                  VALUES ($1, $2, $3, $4, $5, $6)"
                    .as_ptr(),
                types.len() as i32,
                types.as_mut_ptr(),
            );
            if p.is_null() || pg_sys::SPI_keepplan(p) != 0 {
                error!("pg_sales: preparing the event insert failed");
            }
            INSERT_PLAN.set(p);
            plan = p;
        }
        let mut values = [
            pg_sys::Datum::from(pg_sys::cstring_to_text(kind.as_ptr())),
            pg_sys::Datum::from(store_id),
            pg_sys::Datum::from(actor.unwrap_or(0)),
            pg_sys::Datum::from(row_id),
            pg_sys::Datum::from(row_version),
            payload,
        ];
        let nulls = [
            b' ' as std::ffi::c_char,
            b' ' as std::ffi::c_char,
            if actor.is_some() { b' ' } else { b'n' } as std::ffi::c_char,
            b' ' as std::ffi::c_char,
            b' ' as std::ffi::c_char,
            b' ' as std::ffi::c_char,
        ];
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, 0);
        if rc != pg_sys::SPI_OK_INSERT as i32 {
            error!("pg_sales: writing the sales event failed (SPI code {rc})");
        }
        pg_sys::SPI_finish();
    }
}
