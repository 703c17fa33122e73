//! Event plumbing that runs once per event row, so it is Rust rather than
//! PL/pgSQL (see `sql/schema.sql` for the event triggers themselves).

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
