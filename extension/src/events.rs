//! Event plumbing that runs once per event row, so it is Rust rather than
//! PL/pgSQL (see `sql/events.sql` for the event triggers themselves).

use crate::jsonb::{Jb, RawJsonb, JENTRY_NUMERIC};
use crate::jsonb_text::Node;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::borrow::Cow;
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

/// The event of one sales row inserted (`AFTER INSERT ... FOR EACH ROW` on
/// `sales.monthly_sales`; before 0.7.0 also `OR UPDATE`): see
/// [`write_row_event`]. From 0.7.0 an update's event is written by the
/// row trigger `tg_sales_row` as the row goes in ([`updates_write_events`]),
/// which spares every update the after-trigger queue and the fetch of both
/// versions of the row back from the table at the end of the statement.
#[pg_trigger]
fn tg_sales_changed<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
    let td = trigger.trigger_data();
    // SAFETY: a row-level INSERT/UPDATE trigger call (checked by
    // SalesRow::of): the relation and its tuples are valid for the
    // duration of the call.
    unsafe {
        let row = SalesRow::of(
            td,
            "sales.tg_sales_changed must run AFTER INSERT OR UPDATE ... FOR EACH ROW",
        );
        if CStr::from_ptr((*td.tg_trigger).tgname).to_bytes() == b"monthly_sales_replica_updates"
            && !replica_updates_need_events(td.tg_relation)
        {
            return Ok(None);
        }
        let old_daily = row.old.and_then(|t| row.daily(t));
        write_row_event(
            &row,
            row.new,
            old_daily.as_ref(),
            row.daily(row.new).as_ref(),
        );
    }
    Ok(None)
}

/// Whether `tg_sales_row` writes the events of updates, for a row trigger
/// call on `rel`: when `monthly_sales_events` is defined for inserts only
/// (0.7.0 on; with an older definition it writes them itself, after the
/// row) and fires in this session (enabled, and for this
/// `session_replication_role`), so that `ALTER TABLE ... DISABLE TRIGGER
/// monthly_sales_events` still turns every sales event off.
///
/// # Safety
/// `rel` is the relation of a trigger call in progress.
pub(crate) unsafe fn updates_write_events(rel: pg_sys::Relation) -> bool {
    unsafe {
        let desc = (*rel).trigdesc;
        if desc.is_null() {
            return false;
        }
        let triggers = std::slice::from_raw_parts((*desc).triggers, (*desc).numtriggers as usize);
        let Some(t) = triggers
            .iter()
            .find(|t| CStr::from_ptr(t.tgname).to_bytes() == b"monthly_sales_events")
        else {
            return false;
        };
        let fires = fires_in_session(t.tgenabled as u8);
        let kind = t.tgtype as u32;
        fires
            && kind & pg_sys::TRIGGER_TYPE_ROW != 0
            && kind & pg_sys::TRIGGER_TYPE_INSERT != 0
            && kind & pg_sys::TRIGGER_TYPE_UPDATE == 0
    }
}

/// Refuses, naming it, a `BEFORE UPDATE` row trigger on the sales table
/// that fires after the current one (`monthly_sales_row`; triggers of one
/// kind fire in the order of their names). An update's event is written
/// with the row as `monthly_sales_row` leaves it, so a trigger after it
/// that changed the row or skipped the update would leave an event, and
/// the history built from it, describing a version never stored. One whose
/// name sorts first runs before, and its changes are the row's.
///
/// # Safety
/// `td` is a row trigger call in progress.
pub(crate) unsafe fn refuse_later_before_update_triggers(td: &pg_sys::TriggerData) {
    unsafe {
        let desc = (*td.tg_relation).trigdesc;
        if desc.is_null() || td.tg_trigger.is_null() {
            return;
        }
        let me = CStr::from_ptr((*td.tg_trigger).tgname);
        let triggers = std::slice::from_raw_parts((*desc).triggers, (*desc).numtriggers as usize);
        for t in triggers {
            let kind = t.tgtype as u32;
            let name = CStr::from_ptr(t.tgname);
            if kind & pg_sys::TRIGGER_TYPE_ROW != 0
                && kind & pg_sys::TRIGGER_TYPE_TIMING_MASK == pg_sys::TRIGGER_TYPE_BEFORE
                && kind & pg_sys::TRIGGER_TYPE_UPDATE != 0
                && fires_in_session(t.tgenabled as u8)
                && name.to_bytes() > me.to_bytes()
            {
                crate::error::raise(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!(
                        "pg_sales: the BEFORE UPDATE trigger {} on sales.monthly_sales fires after {}, which writes the update's event: it could change or skip the update after its event is written; rename it to sort before {} (or make it an AFTER trigger)",
                        name.to_string_lossy(),
                        me.to_string_lossy(),
                        me.to_string_lossy()
                    ),
                );
            }
        }
    }
}

/// Whether `monthly_sales_replica_updates` (`AFTER UPDATE`, enabled for
/// `session_replication_role = replica` only, as logical replication's
/// apply runs) writes an update's event: when `monthly_sales_events` fires
/// in this session (it was enabled `ALWAYS` or `REPLICA` on a subscriber
/// that wants events) and the row trigger `monthly_sales_row`, which writes
/// updates' events otherwise, does not.
///
/// # Safety
/// `rel` is the relation of a trigger call in progress.
unsafe fn replica_updates_need_events(rel: pg_sys::Relation) -> bool {
    unsafe {
        let desc = (*rel).trigdesc;
        if desc.is_null() {
            return false;
        }
        let triggers = std::slice::from_raw_parts((*desc).triggers, (*desc).numtriggers as usize);
        let fires = |name: &[u8]| {
            triggers
                .iter()
                .find(|t| CStr::from_ptr(t.tgname).to_bytes() == name)
                .is_some_and(|t| fires_in_session(t.tgenabled as u8))
        };
        fires(b"monthly_sales_events") && !fires(b"monthly_sales_row")
    }
}

/// Whether a trigger enabled as `tgenabled` fires in this session.
fn fires_in_session(tgenabled: u8) -> bool {
    let replica = unsafe { pg_sys::SessionReplicationRole }
        == pg_sys::SESSION_REPLICATION_ROLE_REPLICA as i32;
    match tgenabled {
        b'D' => false,
        b'A' => true,
        b'R' => replica,
        _ => !replica,
    }
}

/// Writes the event of one sales row written: `sales-data-created` or
/// `sales-data-updated` with the row's new totals, the days that changed (for
/// an update, with their old values in `previousDays`: history is rebuilt
/// from these, see `sql/history.sql`), the writing job (`jobId`) and, for a
/// row moved to another store or month, where it was before. `new` is the
/// row as stored (its totals and version set by `tg_sales_row`), `row.old`
/// the row before an update. An update that left the row unchanged (same
/// version, see `tg_sales_row`) makes no event.
///
/// Every single-row commit pays for this, so it is written against the
/// tuples directly: the payload is written in jsonb's binary form, and the
/// row goes straight into the table and its indexes ([`insert_event`]).
///
/// # Safety
/// `row` describes a trigger call in progress, `new` is a tuple of its
/// relation's descriptor, and `old_daily` and `new_daily` are the daily data
/// of `row.old` and `new`, detoasted.
pub(crate) unsafe fn write_row_event(
    row: &SalesRow,
    new: *mut pg_sys::HeapTupleData,
    old_daily: Option<&RawJsonb>,
    new_daily: Option<&RawJsonb>,
) {
    unsafe {
        let (cols, old) = (&row.cols, row.old);
        let get = |t, att| row.get(t, att);
        // int8 columns hold the value in the datum; int4 ones its low half.
        let int = |t, att| get(t, att).map(|d| d.value() as i64).unwrap_or(0);
        let int4 = |t, att| get(t, att).map(|d| d.value() as i32 as i64).unwrap_or(0);
        let version = int(new, cols.version);
        if let Some(old) = old {
            if int(old, cols.version) == version {
                return;
            }
        }
        let days = crate::validate::changed_days_with_old(
            old_daily.map(|j| j.root()).unwrap_or(Jb::Null),
            new_daily.map(|j| j.root()).unwrap_or(Jb::Null),
        );

        let (id, store) = (int(new, cols.id), int(new, cols.store_id));
        let (year, month) = (int4(new, cols.year), int4(new, cols.month));
        let key = |k: &'static str| Cow::Borrowed(k.as_bytes());
        let mut p: Vec<(Cow<'_, [u8]>, Node<'_>)> = Vec::with_capacity(16);
        p.push((key("id"), Node::Int(id)));
        p.push((key("storeId"), Node::Int(store)));
        p.push((key("year"), Node::Int(year)));
        p.push((key("month"), Node::Int(month)));
        p.push((key("version"), Node::Int(version)));
        let total_sales = get(new, cols.total_sales).map(|d| {
            // A heap tuple may hold it with a short header: detoast to the
            // layout jsonb stores (a 4-byte header).
            let n = pg_sys::pg_detoast_datum(d.cast_mut_ptr()) as *const u8;
            std::slice::from_raw_parts(n, pgrx::varlena::varsize_any(n.cast()))
        });
        p.push((
            key("totalSales"),
            total_sales.map_or(Node::Null, |n| Node::Stored(JENTRY_NUMERIC, n)),
        ));
        p.push((
            key("totalCustomers"),
            get(new, cols.total_customers).map_or(Node::Null, |d| Node::Int(d.value() as i64)),
        ));
        p.push((
            key("daysReported"),
            get(new, cols.days_reported).map_or(Node::Null, |d| Node::Int(d.value() as i32 as i64)),
        ));
        p.push((
            key("changedDays"),
            Node::Arr(
                days.iter()
                    .map(|(d, _)| Node::Str(Cow::Borrowed(d.as_bytes())))
                    .collect(),
            ),
        ));
        // The old value of each changed day (null: the day was not
        // reported), so the row's history can be read back from its events
        // (sales.history walks back from the current row).
        if old.is_some() {
            p.push((
                key("previousDays"),
                Node::Obj(
                    days.iter()
                        .map(|(d, was)| {
                            (
                                Cow::Borrowed(d.as_bytes()),
                                was.map_or(Node::Null, |m| m.stored()),
                            )
                        })
                        .collect(),
                ),
            ));
        }
        if let Some(job) = current_job() {
            p.push((key("jobId"), Node::Int(job)));
        }
        if let Some(old) = old {
            let old_store = int(old, cols.store_id);
            if old_store != store {
                p.push((key("previousStoreId"), Node::Int(old_store)));
            }
            let (old_year, old_month) = (int4(old, cols.year), int4(old, cols.month));
            if (old_year, old_month) != (year, month) {
                p.push((key("previousYear"), Node::Int(old_year)));
                p.push((key("previousMonth"), Node::Int(old_month)));
            }
        }
        let payload = crate::jsonb_text::document_datum(Node::Obj(p), "an event payload")
            .into_datum()
            .expect("a jsonb datum");
        let kind = if old.is_some() {
            c"sales-data-updated"
        } else {
            c"sales-data-created"
        };
        insert_event(kind, store, current_actor(), id, version, payload);
    }
}

/// The tuples of a row-level INSERT or UPDATE trigger call on
/// `sales.monthly_sales`, with the table's descriptor and columns.
pub(crate) struct SalesRow {
    pub(crate) desc: pg_sys::TupleDesc,
    pub(crate) cols: SalesColumns,
    /// The row before an update (None for an insert).
    pub(crate) old: Option<*mut pg_sys::HeapTupleData>,
    pub(crate) new: *mut pg_sys::HeapTupleData,
}

impl SalesRow {
    /// Fails with `misuse` unless the call is row-level, for an INSERT or
    /// an UPDATE.
    ///
    /// # Safety
    /// `td` is the trigger data of a call in progress.
    pub(crate) unsafe fn of(td: &pg_sys::TriggerData, misuse: &str) -> Self {
        let op = td.tg_event & pg_sys::TRIGGER_EVENT_OPMASK;
        if td.tg_event & pg_sys::TRIGGER_EVENT_ROW == 0
            || (op != pg_sys::TRIGGER_EVENT_INSERT && op != pg_sys::TRIGGER_EVENT_UPDATE)
        {
            misused(misuse.to_string());
        }
        unsafe {
            if !is_sales_table(td.tg_relation) {
                misused(format!("{misuse} on sales.monthly_sales"));
            }
            let desc = (*td.tg_relation).rd_att;
            let (old, new) = if op == pg_sys::TRIGGER_EVENT_INSERT {
                (None, td.tg_trigtuple)
            } else {
                (Some(td.tg_trigtuple), td.tg_newtuple)
            };
            SalesRow {
                desc,
                cols: SalesColumns::of(desc),
                old,
                new,
            }
        }
    }

    /// Column `att` of tuple `t` (one of this call's), None when null.
    pub(crate) fn get(&self, t: *mut pg_sys::HeapTupleData, att: i32) -> Option<pg_sys::Datum> {
        let mut null = false;
        // SAFETY: t is a tuple of this call, described by desc.
        let d = unsafe { pg_sys::heap_getattr(t, att, self.desc, &mut null) };
        (!null).then_some(d)
    }

    /// The daily data of tuple `t`, detoasted.
    pub(crate) fn daily(&self, t: *mut pg_sys::HeapTupleData) -> Option<RawJsonb> {
        self.get(t, self.cols.daily_data)
            // SAFETY: daily_data is a jsonb column.
            .and_then(|d| unsafe { RawJsonb::from_polymorphic_datum(d, false, pg_sys::JSONBOID) })
    }
}

/// Refuses a row trigger call the function was not made for (another
/// timing, level, event or table): SQLSTATE 39P01, as Postgres' own trigger
/// functions answer one.
pub(crate) fn misused(message: String) -> ! {
    crate::error::raise(
        PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
        message,
    )
}

/// Whether `rel` is `sales.monthly_sales` itself. The row triggers read its
/// columns as the types the extension made them, and write events about its
/// rows straight into the log: attached to any other table (a temporary one
/// with look-alike columns), they would read other types' values as
/// pointers, and write events for rows that never were.
///
/// # Safety
/// `rel` is the open relation of a trigger call in progress.
unsafe fn is_sales_table(rel: pg_sys::Relation) -> bool {
    unsafe {
        let form = (*rel).rd_rel;
        CStr::from_ptr((*form).relname.data.as_ptr()).to_bytes() == b"monthly_sales"
            && (*form).relnamespace == pg_sys::get_namespace_oid(c"sales".as_ptr(), true)
    }
}

/// Attribute numbers of the `sales.monthly_sales` columns the row triggers
/// read or set.
pub(crate) struct SalesColumns {
    pub(crate) id: i32,
    pub(crate) store_id: i32,
    pub(crate) year: i32,
    pub(crate) month: i32,
    pub(crate) daily_data: i32,
    pub(crate) total_sales: i32,
    pub(crate) total_customers: i32,
    pub(crate) days_reported: i32,
    pub(crate) version: i32,
    pub(crate) created_at: i32,
    pub(crate) updated_at: i32,
}

impl SalesColumns {
    /// Looked up by name on every call (a dozen short comparisons), so a
    /// column added or dropped later cannot shift them.
    pub(crate) unsafe fn of(desc: pg_sys::TupleDesc) -> Self {
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
            created_at: 0,
            updated_at: 0,
        };
        let natts = unsafe { (*desc).natts } as usize;
        let attrs = unsafe { (*desc).attrs.as_slice(natts) };
        for (i, a) in attrs.iter().enumerate() {
            if a.attisdropped {
                continue;
            }
            let name = unsafe { CStr::from_ptr(a.attname.data.as_ptr()) }.to_bytes();
            let (slot, ty) = match name {
                b"id" => (&mut c.id, pg_sys::INT8OID),
                b"store_id" => (&mut c.store_id, pg_sys::INT8OID),
                b"year" => (&mut c.year, pg_sys::INT4OID),
                b"month" => (&mut c.month, pg_sys::INT4OID),
                b"daily_data" => (&mut c.daily_data, pg_sys::JSONBOID),
                b"total_sales" => (&mut c.total_sales, pg_sys::NUMERICOID),
                b"total_customers" => (&mut c.total_customers, pg_sys::INT8OID),
                b"days_reported" => (&mut c.days_reported, pg_sys::INT4OID),
                b"version" => (&mut c.version, pg_sys::INT8OID),
                b"created_at" => (&mut c.created_at, pg_sys::TIMESTAMPTZOID),
                b"updated_at" => (&mut c.updated_at, pg_sys::TIMESTAMPTZOID),
                _ => continue,
            };
            // Values are read as these types: any other would be misread.
            if a.atttypid != ty {
                let n = String::from_utf8_lossy(name);
                error!("pg_sales: the sales table's column {n} is not of the type the extension made it");
            }
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
            ("created_at", c.created_at),
            ("updated_at", c.updated_at),
        ] {
            if att == 0 {
                error!("pg_sales: the sales table has no column {n}");
            }
        }
        c
    }
}

/// `sales.current_actor()`: the `sales.user_id` setting as a user id, or
/// NULL when it is not set.
fn current_actor() -> Option<i64> {
    setting_id(c"sales.user_id", &crate::settings::USER_ID)
}

/// The job (import or asynchronous batch) writing in this transaction: the
/// `sales.job_id` setting, set by the server's job workers.
fn current_job() -> Option<i64> {
    setting_id(c"sales.job_id", &crate::settings::JOB_ID)
}

/// A bigint setting, or None when it is not set or empty.
fn setting_id(
    name: &CStr,
    setting: &'static pgrx::guc::GucSetting<Option<std::ffi::CString>>,
) -> Option<i64> {
    let parsed = crate::settings::with_string(setting, |v| {
        let text = v?.to_string_lossy();
        if text.is_empty() {
            return None;
        }
        Some(text.trim().parse::<i64>().map_err(|_| text.into_owned()))
    });
    match parsed? {
        Ok(id) => Some(id),
        Err(text) => {
            pgrx::pg_sys::panic::ErrorReport::new(
                PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
                format!(
                    "invalid input syntax for type bigint: \"{text}\" (setting {})",
                    name.to_string_lossy()
                ),
                "pg_sales",
            )
            .report(PgLogLevel::ERROR);
            unreachable!("ERROR does not return")
        }
    }
}

unsafe extern "C-unwind" {
    /// commands/sequence.h; not in pgrx's bindings. The executor calls it
    /// the same way for an identity column's default (no permission check).
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

/// Where `sales.events` is, looked up once per backend and kept until a
/// relcache invalidation of that table (dropped, altered, or the extension
/// recreated) or a full reset tells the backend to look again.
#[derive(Clone, Copy)]
struct EventsTable {
    relid: pg_sys::Oid,
    id_seq: pg_sys::Oid,
    /// Its indexes as the executor would insert into them, built once:
    /// None when one of them needs more than plain column values (an
    /// expression, a predicate, an exclusion or deferred constraint), and
    /// the executor's own path is taken.
    indexes: Option<&'static [EventIndex]>,
}

#[derive(Clone, Copy)]
struct EventIndex {
    oid: pg_sys::Oid,
    info: *mut pg_sys::IndexInfo,
    unique: bool,
}

/// Where the cached index descriptions live; deleted when they are rebuilt.
static mut INDEX_CONTEXT: pg_sys::MemoryContext = std::ptr::null_mut();

thread_local! {
    static EVENTS_TABLE: std::cell::Cell<Option<EventsTable>> = const { std::cell::Cell::new(None) };
    static CALLBACK_REGISTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_events_table(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    if let Some(t) = EVENTS_TABLE.get() {
        // The table, or one of the indexes described (an index's own
        // change, such as a rename or a storage parameter, invalidates
        // that index only).
        if relid == pg_sys::InvalidOid
            || relid == t.relid
            || t.indexes
                .is_some_and(|ix| ix.iter().any(|i| i.oid == relid))
        {
            EVENTS_TABLE.set(None);
        }
    }
}

unsafe fn events_table() -> EventsTable {
    if let Some(t) = EVENTS_TABLE.get() {
        return t;
    }
    unsafe {
        if !CALLBACK_REGISTERED.get() {
            pg_sys::CacheRegisterRelcacheCallback(
                Some(forget_events_table),
                pg_sys::Datum::from(0),
            );
            CALLBACK_REGISTERED.set(true);
        }
        let ns = pg_sys::get_namespace_oid(c"sales".as_ptr(), false);
        let relid = pg_sys::get_relname_relid(c"events".as_ptr(), ns);
        if relid == pg_sys::InvalidOid {
            error!("pg_sales: table sales.events does not exist");
        }
        let desc = pg_sys::RelationIdGetRelation(relid);
        let id_att = (0..(*(*desc).rd_att).natts as usize)
            .find(|&i| {
                let a = &(*(*desc).rd_att)
                    .attrs
                    .as_slice((*(*desc).rd_att).natts as usize)[i];
                !a.attisdropped && CStr::from_ptr(a.attname.data.as_ptr()).to_bytes() == b"id"
            })
            .unwrap_or_else(|| error!("pg_sales: sales.events has no id column"));
        let indexes = plain_indexes(desc);
        pg_sys::RelationClose(desc);
        let id_seq = pg_sys::getIdentitySequence(relid, id_att as i16 + 1, false);
        let t = EventsTable {
            relid,
            id_seq,
            indexes,
        };
        EVENTS_TABLE.set(Some(t));
        t
    }
}

/// Runs `f` as the owner of `sales.events`, as a `SECURITY DEFINER`
/// function runs as its owner: the reads and writes of the log that the
/// extension makes on a writer's behalf (the delivery clock's first read,
/// a batch's `batch-completed` event, the commit's NOTIFY lookup) need no
/// privilege on the log, which holds every user's events. A role that may
/// write sales rows may so write them without being able to read, or
/// forge, the log.
///
/// As a `SECURITY DEFINER` function with `SET search_path` does, the
/// search path is `pg_catalog, pg_temp` meanwhile: with the caller's, a
/// function or operator of the caller's own schema placed before
/// `pg_catalog` (`max`, `btrim`, `=`) would run as the owner. The caller's
/// user, security context and search path come back after `f`, also when
/// it raises an error (an aborted transaction restores them as well).
pub fn as_log_owner<R>(f: impl FnOnce() -> R) -> R {
    struct Restore {
        user: pg_sys::Oid,
        context: std::ffi::c_int,
        guc_level: std::ffi::c_int,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            unsafe {
                pg_sys::AtEOXact_GUC(!std::thread::panicking(), self.guc_level);
                pg_sys::SetUserIdAndSecContext(self.user, self.context);
            }
        }
    }
    let owner = unsafe { log_owner() };
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    unsafe { pg_sys::GetUserIdAndSecContext(&mut user, &mut context) };
    let guc_level = unsafe { pg_sys::NewGUCNestLevel() };
    let _restore = Restore {
        user,
        context,
        guc_level,
    };
    unsafe {
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        pg_sys::SetUserIdAndSecContext(
            owner,
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as std::ffi::c_int,
        )
    };
    f()
}

/// The owner of `sales.events`, read from the relation cache. Not through
/// [`events_table`]: a caller of `as_log_owner` may be inside the event
/// row's insert (the clock's first read), which holds that cache's index
/// descriptions, and a rebuild of the cache frees them.
unsafe fn log_owner() -> pg_sys::Oid {
    unsafe {
        let ns = pg_sys::get_namespace_oid(c"sales".as_ptr(), false);
        let relid = pg_sys::get_relname_relid(c"events".as_ptr(), ns);
        if relid == pg_sys::InvalidOid {
            error!("pg_sales: table sales.events does not exist");
        }
        let desc = pg_sys::RelationIdGetRelation(relid);
        if desc.is_null() {
            error!("pg_sales: table sales.events could not be opened");
        }
        let owner = (*(*desc).rd_rel).relowner;
        pg_sys::RelationClose(desc);
        owner
    }
}

/// The indexes of `rel` described once (`BuildIndexInfo`, as
/// `ExecOpenIndices` does for every statement), when every one of them is
/// a plain, immediate btree or hash index on columns; None otherwise. Only
/// those: other access methods keep state in the description
/// (`ii_AmCache`: GIN, GiST and BRIN point it into the index's relation
/// cache entry) that is meant to last one statement, not a session.
unsafe fn plain_indexes(rel: pg_sys::Relation) -> Option<&'static [EventIndex]> {
    unsafe {
        if !INDEX_CONTEXT.is_null() {
            pg_sys::MemoryContextDelete(INDEX_CONTEXT);
        }
        INDEX_CONTEXT = pg_sys::AllocSetContextCreateInternal(
            pg_sys::TopMemoryContext,
            c"pg_sales event indexes".as_ptr(),
            0,
            8 * 1024,
            8 * 1024 * 1024,
        );
        let old = pg_sys::MemoryContextSwitchTo(INDEX_CONTEXT);
        let list = pg_sys::RelationGetIndexList(rel);
        let n = if list.is_null() {
            0
        } else {
            (*list).length as usize
        };
        let out: *mut EventIndex =
            pg_sys::palloc(std::mem::size_of::<EventIndex>() * n.max(1)).cast();
        let mut plain = true;
        for i in 0..n {
            let oid = (*(*list).elements.add(i)).oid_value;
            let irel = pg_sys::index_open(oid, pg_sys::AccessShareLock as i32);
            let info = pg_sys::BuildIndexInfo(irel);
            let form = (*irel).rd_index;
            let am = (*(*irel).rd_rel).relam;
            if (am != pg_sys::BTREE_AM_OID && am != pg_sys::HASH_AM_OID)
                || !(*info).ii_Expressions.is_null()
                || !(*info).ii_Predicate.is_null()
                || !(*info).ii_ExclusionOps.is_null()
                || !(*form).indimmediate
            {
                plain = false;
            }
            out.add(i).write(EventIndex {
                oid,
                info,
                unique: (*form).indisunique,
            });
            pg_sys::index_close(irel, pg_sys::AccessShareLock as i32);
        }
        pg_sys::MemoryContextSwitchTo(old);
        plain.then(|| std::slice::from_raw_parts(out, n))
    }
}

/// Refuses, naming it, what the executor would run for an event row and
/// [`insert_event`] does not: a CHECK constraint of `sales.events`, a rule
/// on its inserts, or a trigger on its inserts that fires in this session
/// (a foreign key from it is such a trigger). Left alone: migration 0025's `access_notify`,
/// whose `WHEN` clause takes access events only, never the sales events
/// written here, and a deferrable unique constraint's recheck, whose
/// duplicate the insert refuses at once.
///
/// # Safety
/// `rel` is `sales.events`, open.
unsafe fn refuse_what_the_insert_skips(rel: pg_sys::Relation) {
    unsafe {
        let constr = (*(*rel).rd_att).constr;
        if !constr.is_null() && (*constr).num_check > 0 {
            let name = CStr::from_ptr((*(*constr).check).ccname).to_string_lossy();
            crate::error::raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "pg_sales: sales.events has the CHECK constraint {name}, which the sales event trigger's rows (written straight into the table) would not be checked against; drop it to write sales events"
                ),
            );
        }
        // A rule on the log's inserts (`CREATE RULE ... ON INSERT TO
        // sales.events DO ALSO ...`) is the rewriter's, which this insert
        // never goes through.
        let rules = (*rel).rd_rules;
        if !rules.is_null() {
            let rules = std::slice::from_raw_parts((*rules).rules, (*rules).numLocks as usize);
            if rules.iter().any(|r| {
                (**r).event == pg_sys::CmdType::CMD_INSERT && fires_in_session((**r).enabled as u8)
            }) {
                crate::error::raise(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    "pg_sales: sales.events has a rule on its inserts, which the sales event trigger's rows (written straight into the table) would not go through; drop it to write sales events",
                );
            }
        }
        let desc = (*rel).trigdesc;
        if desc.is_null() {
            return;
        }
        let triggers = std::slice::from_raw_parts((*desc).triggers, (*desc).numtriggers as usize);
        for t in triggers {
            let name = CStr::from_ptr(t.tgname);
            // A deferrable unique constraint's own recheck trigger: a
            // duplicate it would find is refused by the insert itself.
            let recheck =
                t.tgisinternal && t.tgfoid == pg_sys::Oid::from(pg_sys::F_UNIQUE_KEY_RECHECK);
            if t.tgtype as u32 & pg_sys::TRIGGER_TYPE_INSERT != 0
                && fires_in_session(t.tgenabled as u8)
                && name.to_bytes() != b"access_notify"
                && !recheck
            {
                crate::error::raise(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!(
                        "pg_sales: the trigger {} on sales.events would not run for the sales event trigger's rows (written straight into the table); drop or disable it to write sales events (a foreign key from sales.events is such a trigger)",
                        name.to_string_lossy()
                    ),
                );
            }
        }
    }
}

/// Appends one row to `sales.events`, filling the columns as their defaults
/// would (id from its identity sequence, `seq` from the delivery clock, the
/// transaction id and start time), straight into the table and its indexes:
/// a statement through SPI spent more on setting up its executor than on
/// the insert. What is bypassed: permission checks on `sales.events` (the
/// trigger writes the extension's own log). What the executor would also
/// run for the row, a CHECK constraint or a trigger someone added to
/// `sales.events` (a foreign key from it is one), is refused rather than
/// skipped ([`refuse_what_the_insert_skips`]), and so is a column of
/// another type than the extension made it (its value would be misread).
unsafe fn insert_event(
    kind: &CStr,
    store_id: i64,
    actor: Option<i64>,
    row_id: i64,
    row_version: i64,
    payload: pg_sys::Datum,
) {
    unsafe {
        let rel = pg_sys::table_open(events_table().relid, pg_sys::RowExclusiveLock as i32);
        // Taking the lock processed any pending invalidation (an index
        // added or dropped): describe the table as it is under the lock.
        let table = events_table();
        if table.relid != (*rel).rd_id {
            error!("pg_sales: sales.events was replaced during the write; retry");
        }
        refuse_what_the_insert_skips(rel);
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0usize); natts];
        let mut nulls = vec![true; natts];
        let id = pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| {
            nextval_internal(table.id_seq, false)
        });
        let seq = crate::delivery::next_seq();
        for (i, a) in (*desc).attrs.as_slice(natts).iter().enumerate() {
            if a.attisdropped {
                continue;
            }
            let name = CStr::from_ptr(a.attname.data.as_ptr()).to_bytes();
            let (v, ty) = match name {
                b"id" => (Some(pg_sys::Datum::from(id)), pg_sys::INT8OID),
                b"kind" => (None, pg_sys::TEXTOID),
                b"store_id" => (Some(pg_sys::Datum::from(store_id)), pg_sys::INT8OID),
                b"user_id" => (None, pg_sys::INT8OID),
                b"actor_id" => (actor.map(pg_sys::Datum::from), pg_sys::INT8OID),
                b"row_id" => (Some(pg_sys::Datum::from(row_id)), pg_sys::INT8OID),
                b"row_version" => (Some(pg_sys::Datum::from(row_version)), pg_sys::INT8OID),
                b"payload" => (Some(payload), pg_sys::JSONBOID),
                b"xid" => (
                    Some(pg_sys::Datum::from(pg_sys::GetTopFullTransactionId().value)),
                    pg_sys::XID8OID,
                ),
                b"created_at" => (
                    Some(pg_sys::Datum::from(
                        pg_sys::GetCurrentTransactionStartTimestamp(),
                    )),
                    pg_sys::TIMESTAMPTZOID,
                ),
                b"seq" => (Some(pg_sys::Datum::from(seq)), pg_sys::INT8OID),
                other => error!(
                    "pg_sales: sales.events has a column the sales event trigger does not fill: {}",
                    String::from_utf8_lossy(other)
                ),
            };
            // Values are written as these types: a column of another type
            // would take an integer as a pointer, or the reverse.
            if a.atttypid != ty {
                crate::error::raise(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!(
                        "pg_sales: the column {} of sales.events is not of the type the extension made it; the sales event trigger cannot write events until it is",
                        String::from_utf8_lossy(name)
                    ),
                );
            }
            let v = if name == b"kind" {
                Some(pg_sys::Datum::from(pg_sys::cstring_to_text(kind.as_ptr())))
            } else {
                v
            };
            if v.is_none() && a.attnotnull {
                crate::error::raise(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!(
                        "pg_sales: the column {} of sales.events is NOT NULL, and the sales event trigger leaves it empty for sales events; drop the constraint",
                        String::from_utf8_lossy(name)
                    ),
                );
            }
            if let Some(v) = v {
                values[i] = v;
                nulls[i] = false;
            }
        }

        let slot = pg_sys::MakeSingleTupleTableSlot(desc, &raw const pg_sys::TTSOpsVirtual);
        pg_sys::ExecClearTuple(slot);
        std::ptr::copy_nonoverlapping(values.as_ptr(), (*slot).tts_values, natts);
        std::ptr::copy_nonoverlapping(nulls.as_ptr(), (*slot).tts_isnull, natts);
        pg_sys::ExecStoreVirtualTuple(slot);
        pg_sys::table_tuple_insert(
            rel,
            slot,
            pg_sys::GetCurrentCommandId(true),
            0,
            std::ptr::null_mut(),
        );
        match table.indexes {
            // What ExecInsertIndexTuples does for plain indexes, without
            // opening and describing every index again for each row.
            Some(indexes) => {
                let mut ivalues = [pg_sys::Datum::from(0usize); pg_sys::INDEX_MAX_KEYS as usize];
                let mut inulls = [false; pg_sys::INDEX_MAX_KEYS as usize];
                for ix in indexes {
                    let irel = pg_sys::index_open(ix.oid, pg_sys::RowExclusiveLock as i32);
                    // Readiness as the index stands now, not as described:
                    // a concurrent build marks its index ready by updating
                    // the index's own catalog row.
                    if !(*(*irel).rd_index).indisready {
                        pg_sys::index_close(irel, pg_sys::NoLock as i32);
                        continue;
                    }
                    pg_sys::FormIndexDatum(
                        ix.info,
                        slot,
                        std::ptr::null_mut(),
                        ivalues.as_mut_ptr(),
                        inulls.as_mut_ptr(),
                    );
                    pg_sys::index_insert(
                        irel,
                        ivalues.as_mut_ptr(),
                        inulls.as_mut_ptr(),
                        &raw mut (*slot).tts_tid,
                        rel,
                        if ix.unique {
                            pg_sys::IndexUniqueCheck::UNIQUE_CHECK_YES
                        } else {
                            pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO
                        },
                        false,
                        ix.info,
                    );
                    pg_sys::index_close(irel, pg_sys::NoLock as i32);
                }
            }
            None => {
                let estate = pg_sys::CreateExecutorState();
                let rri: *mut pg_sys::ResultRelInfo =
                    pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>()).cast();
                (*rri).type_ = pg_sys::NodeTag::T_ResultRelInfo;
                pg_sys::InitResultRelInfo(rri, rel, 1, std::ptr::null_mut(), 0);
                pg_sys::ExecOpenIndices(rri, false);
                let recheck = pg_sys::ExecInsertIndexTuples(
                    rri,
                    slot,
                    estate,
                    false,
                    false,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                );
                // A deferrable unique index checks a possible duplicate
                // at commit through an AFTER trigger the executor queues;
                // this insert queues none, so such a row is refused now.
                if !recheck.is_null() {
                    crate::error::raise(
                        PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION,
                        "pg_sales: an event row may duplicate another under a deferrable unique index of sales.events, which the sales event trigger cannot check at commit",
                    );
                }
                pg_sys::list_free(recheck);
                pg_sys::ExecCloseIndices(rri);
                pg_sys::FreeExecutorState(estate);
            }
        }
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
        crate::delivery::note_event(id, seq);
    }
}
