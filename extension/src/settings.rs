//! The extension's own settings, defined when the library loads. A
//! `sales.*` name nothing defines is a placeholder that Postgres finds by a
//! search of every setting by name on each read; a defined one is a
//! variable read in place, and every event reads two of them (the actor and
//! the job) and every event-writing commit a third.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::{pg_guard, pg_sys};
use std::ffi::{CStr, CString};

/// Who causes this transaction's writes (the events' `actor_id`): set by
/// the server per transaction with `set_config('sales.user_id', ..., true)`.
pub static USER_ID: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// The job (import or asynchronous batch) writing in this transaction.
pub static JOB_ID: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Whether a commit skips its NOTIFY while another commit of the database
/// is sending one (see `delivery::notify_at_commit`).
pub static NOTIFY_COALESCE: GucSetting<bool> = GucSetting::<bool>::new(true);

pub fn init() {
    // The actor and the job are claims the events record as facts (a
    // record's history names the actor): only a role trusted to write the
    // event log may make them, and only as ids (see `check_claim`).
    unsafe {
        pg_sys::DefineCustomStringVariable(
            c"sales.user_id".as_ptr(),
            c"The user whose writes this transaction makes (events record it as their actor).".as_ptr(),
            c"Set per transaction by the server; empty when unknown. Only roles that may insert into sales.events may set it."
                .as_ptr(),
            USER_ID.as_ptr(),
            std::ptr::null(),
            pg_sys::GucContext::PGC_USERSET,
            0,
            Some(check_user_id),
            None,
            None,
        );
        pg_sys::DefineCustomStringVariable(
            c"sales.job_id".as_ptr(),
            c"The job (import or asynchronous batch) whose writes this transaction makes.".as_ptr(),
            c"Set per transaction by the server's job workers; events carry it as jobId. Only roles that may insert into sales.events may set it."
                .as_ptr(),
            JOB_ID.as_ptr(),
            std::ptr::null(),
            pg_sys::GucContext::PGC_USERSET,
            0,
            Some(check_job_id),
            None,
            None,
        );
    }
    GucRegistry::define_bool_guc(
        c"sales.notify_coalesce",
        c"Skip a commit's NOTIFY sales_events while another commit of the database sends one.",
        c"Off: one NOTIFY per event-writing transaction, each holding Postgres' notify lock through its commit.",
        &NOTIFY_COALESCE,
        GucContext::Userset,
        GucFlags::default(),
    );
}

/// Calls `f` with a string setting's current value (None: never set). The
/// value may be freed when the setting changes, so it does not outlive `f`,
/// and `f` must not run anything that could change the setting (SQL,
/// another setting's assignment).
pub(crate) fn with_string<R>(
    setting: &'static GucSetting<Option<CString>>,
    f: impl FnOnce(Option<&CStr>) -> R,
) -> R {
    // SAFETY: the variable Postgres keeps the setting's current value in;
    // it is valid (or NULL) until the setting next changes, which cannot
    // happen while `f` runs on this backend's only thread.
    let p = unsafe { *setting.as_ptr() };
    if p.is_null() {
        f(None)
    } else {
        f(Some(unsafe { CStr::from_ptr(p) }))
    }
}

/// The check of `sales.user_id`.
#[pg_guard]
unsafe extern "C-unwind" fn check_user_id(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    unsafe {
        check_claim(
            *newval,
            source,
            c"sales.user_id names the acting user by id: a whole number from 1 up (digits only), or empty for none.",
        )
    }
}

/// The check of `sales.job_id`.
#[pg_guard]
unsafe extern "C-unwind" fn check_job_id(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    unsafe {
        check_claim(
            *newval,
            source,
            c"sales.job_id names the writing job by id: a whole number from 1 up (digits only), or empty for none.",
        )
    }
}

/// Whether `v` (not empty) is an id as the events record one: a whole
/// number from 1 to 2^63 - 1, in ASCII digits.
fn is_id(v: &[u8]) -> bool {
    v.iter().all(u8::is_ascii_digit)
        && std::str::from_utf8(v)
            .ok()
            .and_then(|t| t.parse::<i64>().ok())
            .is_some_and(|id| id > 0)
}

/// The check of `sales.user_id` and `sales.job_id`, wherever a value comes
/// from: empty (none) or an id (`shape` says what one is, in the error's
/// DETAIL), so that a value that could not be recorded is refused when it
/// is set (22023) instead of failing the writes that record it, and a
/// value that could (`-3`) is not recorded as an id. And set to a value in
/// a session, a role's or a database's settings, only by a role that may
/// insert into `sales.events` (the server's; the event log's writers are
/// trusted with what it records). Any other writer could name any user as
/// the author of its writes, which a record's history then shows as fact.
/// What the server's configuration sets (the file, the command line), and
/// a parallel worker restoring its leader's settings, pass that second
/// check.
///
/// # Safety
/// `v` is the proposed value of a check hook call (NULL or a C string).
unsafe fn check_claim(
    v: *const std::ffi::c_char,
    source: pg_sys::GucSource::Type,
    shape: &CStr,
) -> bool {
    unsafe {
        if v.is_null() || *v == 0 {
            return true;
        }
        if !is_id(CStr::from_ptr(v).to_bytes()) {
            pg_sys::GUC_check_errcode(pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE as i32);
            pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(shape.as_ptr());
            return false;
        }
        if source < pg_sys::GucSource::PGC_S_DATABASE
            || !pg_sys::IsTransactionState()
            || pg_sys::ParallelWorkerNumber >= 0
            || crate::delivery::may_insert_events()
        {
            return true;
        }
        pg_sys::GUC_check_errcode(pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE as i32);
        pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(
            c"Only a role that may insert into sales.events may name the acting user or job; the writes of others are recorded without one."
                .as_ptr(),
        );
        false
    }
}
