//! The extension's own settings, defined when the library loads. A
//! `sales.*` name nothing defines is a placeholder that Postgres finds by a
//! search of every setting by name on each read; a defined one is a
//! variable read in place, and every event reads two of them (the actor and
//! the job) and every event-writing commit a third.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
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
    GucRegistry::define_string_guc(
        c"sales.user_id",
        c"The user whose writes this transaction makes (events record it as their actor).",
        c"Set per transaction by the server; empty when unknown. It restricts nothing.",
        &USER_ID,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"sales.job_id",
        c"The job (import or asynchronous batch) whose writes this transaction makes.",
        c"Set per transaction by the server's job workers; events carry it as jobId.",
        &JOB_ID,
        GucContext::Userset,
        GucFlags::default(),
    );
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
