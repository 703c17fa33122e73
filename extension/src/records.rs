//! Day rows folded into the records `sales.batch_upsert` takes, built in
//! Postgres' in-memory jsonb form and serialised once (imports fold their
//! staged rows with it; in SQL, `jsonb_object_agg` of a `jsonb_build_object`
//! per day, then one per record, builds and takes apart every day's object
//! three times).

use crate::error::SalesError;
use crate::jsonb::{JsonbDatum, NumericArray};
use pgrx::prelude::*;
use std::ffi::CStr;

/// `sales.day_records(store_ids, years, months, days, sales, customers,
/// transactions)`: parallel arrays of day rows, sorted by (store, year,
/// month) and within a month in the order they were written, as the JSON
/// array of records that `sales.batch_upsert` takes: one `{storeId, year,
/// month, dailyData}` per run of rows with the same store, year and month,
/// in the order given. `dailyData` has a member per day, from that day's
/// last row, holding the metrics that are not NULL (NaN and ±Infinity as
/// strings, as `jsonb_build_object` writes them, which `batch_upsert`
/// refuses like any non-numeric value). A metric array given as NULL is
/// that metric not reported on any row. Arrays of different lengths, a
/// NULL key array, or a NULL store, year, month or day, raise SQLSTATE
/// 22023 (the function was STRICT: one NULL metric array made the whole
/// result NULL, silently). Nothing is validated here beyond that:
/// `batch_upsert` validates the records as it does any others.
#[pg_extern(immutable, parallel_safe)]
fn day_records(
    store_ids: Option<Vec<Option<i64>>>,
    years: Option<Vec<Option<i32>>>,
    months: Option<Vec<Option<i32>>>,
    days: Option<Vec<Option<i32>>>,
    sales: Option<NumericArray>,
    customers: Option<NumericArray>,
    transactions: Option<NumericArray>,
) -> JsonbDatum {
    fn given<T>(v: Option<T>, name: &str) -> T {
        v.unwrap_or_else(|| {
            SalesError::InvalidParameter(format!(
                "day_records: {name} is NULL (give an array of one per row)"
            ))
            .raise()
        })
    }
    let store_ids = given(store_ids, "store_ids");
    let (years, months, days) = (
        given(years, "years"),
        given(months, "months"),
        given(days, "days"),
    );
    let n = store_ids.len();
    let metric = |a: Option<NumericArray>| a.map_or_else(|| vec![None; n], |a| a.0);
    let (sales, customers, transactions) = (metric(sales), metric(customers), metric(transactions));
    for (name, len) in [
        ("years", years.len()),
        ("months", months.len()),
        ("days", days.len()),
        ("sales", sales.len()),
        ("customers", customers.len()),
        ("transactions", transactions.len()),
    ] {
        if len != n {
            SalesError::InvalidParameter(format!(
                "day_records: {name} has {len} elements, store_ids {n}"
            ))
            .raise();
        }
    }
    let need = |v: Option<i64>, name: &str, i: usize| -> i64 {
        v.unwrap_or_else(|| {
            SalesError::InvalidParameter(format!("day_records: {name}[{}] is NULL", i + 1)).raise()
        })
    };
    // Day keys and metric values: pushJsonbValue keeps pointers to them
    // until the array is serialised at the end.
    let day_keys: Vec<String> = days
        .iter()
        .enumerate()
        .map(|(i, d)| need(d.map(i64::from), "days", i).to_string())
        .collect();
    let mut b = Builder::new();
    unsafe {
        b.open(pg_sys::JsonbIteratorToken::WJB_BEGIN_ARRAY);
        let mut i = 0;
        while i < n {
            let key = (
                need(store_ids[i], "store_ids", i),
                need(years[i].map(i64::from), "years", i),
                need(months[i].map(i64::from), "months", i),
            );
            b.open(pg_sys::JsonbIteratorToken::WJB_BEGIN_OBJECT);
            b.key(c"storeId".to_bytes());
            b.numeric(pg_sys::int64_to_numeric(key.0));
            b.key(c"year".to_bytes());
            b.numeric(pg_sys::int64_to_numeric(key.1));
            b.key(c"month".to_bytes());
            b.numeric(pg_sys::int64_to_numeric(key.2));
            b.key(c"dailyData".to_bytes());
            b.open(pg_sys::JsonbIteratorToken::WJB_BEGIN_OBJECT);
            while i < n
                && store_ids[i] == Some(key.0)
                && years[i].map(i64::from) == Some(key.1)
                && months[i].map(i64::from) == Some(key.2)
            {
                b.key(day_keys[i].as_bytes());
                b.open(pg_sys::JsonbIteratorToken::WJB_BEGIN_OBJECT);
                for (name, value) in METRICS
                    .iter()
                    .zip([sales[i], customers[i], transactions[i]])
                {
                    if let Some(d) = value {
                        b.key(name.to_bytes());
                        b.metric(d);
                    }
                }
                b.close(pg_sys::JsonbIteratorToken::WJB_END_OBJECT);
                i += 1;
            }
            b.close(pg_sys::JsonbIteratorToken::WJB_END_OBJECT);
            b.close(pg_sys::JsonbIteratorToken::WJB_END_OBJECT);
        }
        let v = b.close(pg_sys::JsonbIteratorToken::WJB_END_ARRAY);
        JsonbDatum::from_value(v)
    }
}

const METRICS: [&CStr; 3] = [c"sales", c"customers", c"transactions"];

/// A jsonb value under construction (`pushJsonbValue`'s parse state).
struct Builder(*mut pg_sys::JsonbParseState);

impl Builder {
    fn new() -> Self {
        Builder(std::ptr::null_mut())
    }

    unsafe fn open(&mut self, token: pg_sys::JsonbIteratorToken::Type) {
        unsafe { pg_sys::pushJsonbValue(&mut self.0, token, std::ptr::null_mut()) };
    }

    unsafe fn close(&mut self, token: pg_sys::JsonbIteratorToken::Type) -> *mut pg_sys::JsonbValue {
        unsafe { pg_sys::pushJsonbValue(&mut self.0, token, std::ptr::null_mut()) }
    }

    /// A key; `s` outlives the serialisation.
    unsafe fn key(&mut self, s: &[u8]) {
        unsafe { self.text(pg_sys::JsonbIteratorToken::WJB_KEY, s) };
    }

    /// A key or string value (`token`); `s` outlives the serialisation.
    unsafe fn text(&mut self, token: pg_sys::JsonbIteratorToken::Type, s: &[u8]) {
        let mut v: pg_sys::JsonbValue = unsafe { std::mem::zeroed() };
        v.type_ = pg_sys::jbvType::jbvString;
        v.val.string = pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_1 {
            len: s.len() as i32,
            val: s.as_ptr() as *mut std::ffi::c_char,
        };
        unsafe { pg_sys::pushJsonbValue(&mut self.0, token, &mut v) };
    }

    /// A metric: a number, or for NaN and ±Infinity, which JSON has no
    /// number for, its text as a string (as `jsonb_build_object` does), so
    /// that `batch_upsert` refuses it as it refuses any non-numeric value.
    unsafe fn metric(&mut self, n: pg_sys::Numeric) {
        unsafe {
            if pg_sys::numeric_is_nan(n) || pg_sys::numeric_is_inf(n) {
                let text = pgrx::direct_function_call_as_datum(
                    pg_sys::numeric_out,
                    &[Some(pg_sys::Datum::from(n))],
                )
                .map(|d| std::ffi::CStr::from_ptr(d.cast_mut_ptr::<std::ffi::c_char>()))
                .unwrap_or(c"NaN");
                self.text(pg_sys::JsonbIteratorToken::WJB_VALUE, text.to_bytes());
            } else {
                self.numeric(n);
            }
        }
    }

    /// A numeric value (a datum with a 4-byte header that outlives the
    /// serialisation).
    unsafe fn numeric(&mut self, n: pg_sys::Numeric) {
        let mut v: pg_sys::JsonbValue = unsafe { std::mem::zeroed() };
        v.type_ = pg_sys::jbvType::jbvNumeric;
        v.val.numeric = n;
        unsafe {
            pg_sys::pushJsonbValue(&mut self.0, pg_sys::JsonbIteratorToken::WJB_VALUE, &mut v)
        };
    }
}
