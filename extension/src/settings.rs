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
    // event log may make them (see `check_claim`).
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
            Some(check_claim),
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
            Some(check_claim),
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

/// The check of `sales.user_id` and `sales.job_id`: set to a value (not
/// cleared) in a session, a role's or a database's settings, only by a
/// role that may insert into `sales.events` (the server's; the event log's
/// writers are trusted with what it records). Any other writer could name
/// any user as the author of its writes, which a record's history then
/// shows as fact. What the server's configuration sets (the file, the
/// command line), and a parallel worker restoring its leader's settings,
/// pass.
#[pg_guard]
unsafe extern "C-unwind" fn check_claim(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    unsafe {
        let v = *newval;
        if v.is_null()
            || *v == 0
            || source < pg_sys::GucSource::PGC_S_DATABASE
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
