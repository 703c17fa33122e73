//! Delivery order of the event log, kept in shared memory.
//!
//! Every event row gets `seq` from its database's clock as it is written
//! (the column default calls [`event_seq`]; see [`DbClock`]). Readers deliver in `seq` order,
//! and only below the *horizon*: the first `seq` of the oldest event-writing
//! transaction of this database that is still running, or past the clock when
//! there is none. Why this order and this horizon:
//!
//! - An event with `seq` below the horizon can no longer be joined by an
//!   earlier one: every transaction that took a smaller `seq` has ended, and
//!   any transaction that writes its first event later takes a larger `seq`.
//!   So a reader that resumes after the last `seq` it delivered never skips an
//!   event, whatever order transactions commit in.
//! - Only transactions that have written an event hold delivery back, and
//!   only while they run. A transaction that merely holds a transaction id (a
//!   long report into a scratch table, a migration, an idle `BEGIN`) is never
//!   registered here and delays nothing.
//! - A row's versions are written under its row lock, so the next version's
//!   event is written after the previous version's transaction ended: per row,
//!   `seq` order is version order.
//!
//! A transaction registers (without a lock) when it takes its first `seq`, in
//! a slot of its own, and leaves at commit or abort (an xact callback, after
//! the commit is visible to new snapshots). Leaving bumps the database's
//! generation and wakes waiting readers (`sales.events_next` with a wait), so
//! a reader hears of a commit, or of an abort that unblocks others, at once
//! and without NOTIFY.
//!
//! The clocks survive nothing: after a restart, each backend raises its
//! database's clock to the largest `seq` in that database's log before its
//! first event.
//!
//! All of this needs shared memory, so the library must be in
//! `shared_preload_libraries`; without it, writing an event fails with a
//! message that says so.

use crate::error::raise;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{PgBuiltInOids, PgOid};
use std::cell::Cell;
use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};

const SHMEM_NAME: &CStr = c"pg_sales delivery";
/// Wake-up entries: a database uses the one its oid picks (oid modulo
/// this). Databases that pick the same one share its counter and condition
/// variable: their readers wake a little more often, nothing worse. Picked
/// by oid, never claimed, so a dropped database leaves nothing behind (an
/// entry claimed per database was never given back, and after as many
/// databases as entries every later one shared the last).
const DATABASES: usize = 64;

/// One backend's registration. Only its backend writes it; readers scan
/// every slot without a lock (see [`event_seq`] for why that is enough).
#[repr(C)]
struct Slot {
    /// First `seq` of the running transaction (or, for an instant while it
    /// registers, a lower bound of it), 0 when the slot is free.
    first_seq: AtomicU64,
    db: AtomicU32,
    pid: AtomicI32,
    xid: AtomicU64,
    since: AtomicI64,
}

#[repr(C)]
struct DbGeneration {
    generation: AtomicU64,
    /// Broadcast when the generation moves: only this database's readers
    /// wake (one variable for the cluster woke every waiting reader of
    /// every database at each event-writing commit anywhere, each a
    /// signal from the committing backend and a context switch).
    cv: pg_sys::ConditionVariable,
    /// The end of the newest commit record of an event-writing transaction
    /// that committed without waiting for its flush (`synchronous_commit =
    /// off`); 0 for none since the server started. Such a commit is
    /// visible before it is durable: a crash can still take it back, and
    /// the clock would then give its events' seqs again. The horizon
    /// flushes the WAL this far before it lets a reader pass those events
    /// (see [`horizon`]).
    async_commit_end: AtomicU64,
}

/// Clocks: one per database that has backends using events, found or
/// claimed once per backend under [`CLOCK_LOCK`]: the entry holding the
/// database's oid, else one no backend uses (its value set to 0: the first
/// read of the log raises it, as after a restart, which is what a database
/// with no backend left is in). Each entry counts the backends using it;
/// a backend gives its count back as it exits. A database's clock moves
/// only with its own log: a `seq` written there by hand (a role allowed to
/// insert events may override the default) moves no other database's
/// clock. More than `CLOCKS` databases using events at once are refused:
/// a clock shared past that, as a first version did, let a database whose
/// first backends shared it and whose later ones got an entry of their own
/// run on two clocks.
const CLOCKS: usize = 1024;

#[repr(C)]
struct DbClock {
    /// The database's oid; 0 for an entry never used.
    db: AtomicU32,
    /// Backends using the entry; only changed under [`CLOCK_LOCK`], but
    /// for the decrement at a backend's exit.
    refs: AtomicU32,
    value: AtomicU64,
}

#[repr(C)]
struct Shared {
    nslots: usize,
    dbs: [DbGeneration; DATABASES],
    clocks: [DbClock; CLOCKS],
    // followed by `nslots` slots
}

static mut SHARED: *mut Shared = std::ptr::null_mut();
/// Taken to find or claim a database's clock (once per backend).
static mut CLOCK_LOCK: *mut pg_sys::LWLock = std::ptr::null_mut();
const CLOCK_TRANCHE: &CStr = c"pg_sales clocks";
static mut PREV_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

thread_local! {
    /// This backend's registration: first and last `seq` of the current
    /// transaction (0 = none yet).
    static FIRST_SEQ: Cell<u64> = const { Cell::new(0) };
    static LAST_SEQ: Cell<u64> = const { Cell::new(0) };
    /// The newest event row this transaction wrote through the sales
    /// trigger, as (seq, id); (0, 0) for none.
    static KNOWN_EVENT: Cell<(u64, i64)> = const { Cell::new((0, 0)) };
    /// Whether a subtransaction of this event-writing transaction rolled
    /// back (so a row noted above may be gone).
    static SUB_ABORTED: Cell<bool> = const { Cell::new(false) };
    /// The subtransaction that took the first `seq` (or, once it was
    /// released, the one it was released into): when it rolls back, every
    /// event of the transaction goes with it, and so does the registration.
    static FIRST_SUB: Cell<pg_sys::SubTransactionId> = const { Cell::new(0) };
    /// This backend's database's clock, once found.
    static MY_CLOCK: Cell<*const AtomicU64> = const { Cell::new(std::ptr::null()) };
    /// The clock entry this backend counts itself in (usize::MAX: none),
    /// and whether its exit callback, which gives the count back, is set.
    static HELD_CLOCK: Cell<usize> = const { Cell::new(usize::MAX) };
    static EXIT_REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// Whether this backend has raised the clock to its database's log
    /// (never during recovery: see [`see_clock`]).
    static CLOCK_SEEN: Cell<bool> = const { Cell::new(false) };
    /// The commit NOTIFY's statement, planned once per backend.
    static NOTIFY_PLAN: std::cell::RefCell<Option<pgrx::spi::OwnedPreparedStatement>> =
        const { std::cell::RefCell::new(None) };
}

fn slots_size(n: usize) -> usize {
    std::mem::size_of::<Shared>() + n * std::mem::size_of::<Slot>()
}

/// Called from `_PG_init`. Shared memory can only be requested while the
/// library is preloaded; otherwise nothing is set up and event writes fail
/// with a clear message.
pub fn init() {
    unsafe {
        if !pg_sys::process_shared_preload_libraries_in_progress {
            return;
        }
        PREV_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
        PREV_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
        pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(subxact_callback), std::ptr::null_mut());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    unsafe {
        if let Some(prev) = PREV_REQUEST_HOOK {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(slots_size(pg_sys::MaxBackends as usize));
        pg_sys::RequestNamedLWLockTranche(CLOCK_TRANCHE.as_ptr(), 1);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    unsafe {
        if let Some(prev) = PREV_STARTUP_HOOK {
            prev();
        }
        let addin_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(addin_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let n = pg_sys::MaxBackends as usize;
        let mut found = false;
        let p =
            pg_sys::ShmemInitStruct(SHMEM_NAME.as_ptr(), slots_size(n), &mut found) as *mut Shared;
        if !found {
            std::ptr::write_bytes(p as *mut u8, 0, slots_size(n));
            for i in 0..DATABASES {
                pg_sys::ConditionVariableInit(&raw mut (*p).dbs[i].cv);
            }
            (*p).nslots = n;
        }
        SHARED = p;
        CLOCK_LOCK = &raw mut (*pg_sys::GetNamedLWLockTranche(CLOCK_TRANCHE.as_ptr())).lock;
        pg_sys::LWLockRelease(addin_lock);
    }
}

fn shared() -> &'static Shared {
    unsafe {
        if SHARED.is_null() {
            raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "pg_sales is not loaded through shared_preload_libraries; add it there \
                 (shared_preload_libraries = 'pg_sales') and restart Postgres",
            );
        }
        &*SHARED
    }
}

fn slots(s: &Shared) -> *mut Slot {
    unsafe { (s as *const Shared as *mut u8).add(std::mem::size_of::<Shared>()) as *mut Slot }
}

fn my_slot_index(s: &Shared) -> usize {
    let id = unsafe { pg_sys::MyBackendId };
    if id < 1 || id as usize > s.nslots {
        error!("pg_sales: backend id {id} has no delivery slot");
    }
    id as usize - 1
}

fn my_db() -> u32 {
    unsafe { pg_sys::MyDatabaseId.to_u32() }
}

fn generation_entry(s: &Shared, db: u32) -> &DbGeneration {
    &s.dbs[db as usize % DATABASES]
}

/// This backend's database's clock (see [`DbClock`]).
fn my_clock(s: &'static Shared) -> &'static AtomicU64 {
    let known = MY_CLOCK.get();
    if !known.is_null() {
        return unsafe { &*known };
    }
    let db = my_db();
    let start = db as usize % CLOCKS;
    // Registered before the count is taken: registering can fail (a
    // backend has a few such slots), and a count taken without it would
    // never be given back.
    if !EXIT_REGISTERED.get() {
        unsafe { pg_sys::before_shmem_exit(Some(release_clock), pg_sys::Datum::from(0)) };
        EXIT_REGISTERED.set(true);
    }
    let lock = unsafe { CLOCK_LOCK };
    unsafe { pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE) };
    // The database's entry; else one never used; else one no backend uses.
    let probe = |free: &dyn Fn(&DbClock) -> bool| {
        (0..CLOCKS)
            .map(|k| (start + k) % CLOCKS)
            .find(|&i| free(&s.clocks[i]))
    };
    let found = s
        .clocks
        .iter()
        .position(|e| e.db.load(Ordering::Acquire) == db)
        .or_else(|| probe(&|e| e.db.load(Ordering::Acquire) == 0))
        .or_else(|| probe(&|e| e.refs.load(Ordering::Acquire) == 0));
    if let Some(i) = found {
        let entry = &s.clocks[i];
        if entry.db.load(Ordering::Acquire) != db {
            entry.value.store(0, Ordering::Release);
            entry.db.store(db, Ordering::Release);
        }
        entry.refs.fetch_add(1, Ordering::AcqRel);
        HELD_CLOCK.set(i);
    }
    unsafe { pg_sys::LWLockRelease(lock) };
    let Some(i) = found else {
        raise(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            format!("pg_sales: more than {CLOCKS} databases use events at once"),
        );
    };
    let clock = &s.clocks[i].value;
    MY_CLOCK.set(clock as *const AtomicU64);
    clock
}

/// Gives this backend's count of its clock entry back as it exits.
#[pg_guard]
unsafe extern "C-unwind" fn release_clock(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    let i = HELD_CLOCK.replace(usize::MAX);
    unsafe {
        if i < CLOCKS && !SHARED.is_null() {
            (*SHARED).clocks[i].refs.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// After a restart the clock starts at 0: before this backend takes a value
/// from it or reads a horizon, raise it past this database's log (once per
/// backend; a backend serves one database).
///
/// Never during recovery: on a standby the log grows by replay, which
/// moves no clock, so a read there would be outdated by the time the
/// server is promoted. Both callers refuse to run in recovery
/// ([`refuse_in_recovery`]) before they come here; recovery, once ended,
/// does not come back, so a backend that saw the clock has seen it after
/// every replayed event, also a session that outlived a promotion.
fn see_clock(s: &'static Shared) {
    if CLOCK_SEEN.get() {
        return;
    }
    // The entry first, then the log: an entry is given to this database
    // afresh (its value 0) only when no backend counts itself in it, so
    // every transaction that took a value from it has committed (its events
    // are in the log read below) or is aborting (a backend gives its count
    // back as it exits, just before its open transaction is aborted).
    let clock = my_clock(s);
    // As the log's owner: a writer needs no privilege on the log. Read-only
    // (an SPI update takes a transaction id, refused on a standby) and with
    // the latest snapshot, not the statement's or, under REPEATABLE READ,
    // the transaction's: those can predate events committed since, and a
    // clock raised only to the log they show would give those events'
    // values again.
    let max: Option<i64> = crate::events::as_log_owner(|| unsafe {
        pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot());
        let read = Spi::connect(|_client| {
            let rc = pg_sys::SPI_execute(c"SELECT max(seq) FROM sales.events".as_ptr(), true, 1);
            let table = pg_sys::SPI_tuptable;
            if rc != pg_sys::SPI_OK_SELECT as i32 || table.is_null() || (*table).numvals < 1 {
                return Err(format!("SPI_execute returned {rc}"));
            }
            let mut null = false;
            let d = pg_sys::SPI_getbinval(*(*table).vals, (*table).tupdesc, 1, &mut null);
            Ok((!null).then(|| d.value() as i64))
        });
        pg_sys::PopActiveSnapshot();
        read
    })
    .unwrap_or_else(|e| error!("pg_sales: reading the event log's last seq: {e}"));
    let max = max.unwrap_or(0).max(0) as u64;
    // A seq near the end of the range can only have been written by hand
    // (`seq` is a column default a role allowed to insert events may
    // override), unless this database's clock has given it since the
    // server started. Taken into the clock, it would make the next values
    // wrap to negative ones, below every horizon: no event of the database
    // would be delivered again.
    if max > SEQ_LOG_LIMIT && max > clock.load(Ordering::Acquire) {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "pg_sales: sales.events holds seq {max}, beyond {SEQ_LOG_LIMIT}, past which only a seq \
                 written by hand (and the events after it, since the server started) takes the clock; \
                 delete the event rows above {SEQ_LOG_LIMIT}"
            ),
        );
    }
    clock.fetch_max(max, Ordering::AcqRel);
    CLOCK_SEEN.set(true);
}

/// Refuses, saying why, what the delivery clock serves only on a primary:
/// taking an event `seq` and reading the horizon. A standby registers none
/// of the primary's running transactions (a horizon computed there would
/// pass an event one of them may yet commit below it), writes no events,
/// and its log grows by replay, which moves no clock.
fn refuse_in_recovery(code: PgSqlErrorCode, what: &str) {
    if unsafe { pg_sys::RecoveryInProgress() } {
        raise(
            code,
            format!(
                "pg_sales: {what} is kept on the primary only; this server is a standby in recovery \
                 (it knows nothing of the primary's running transactions)"
            ),
        );
    }
}

/// The highest `seq` the clock gives (2^62), far from where an `i64` wraps.
const SEQ_LIMIT: u64 = 1 << 62;

/// The highest `seq` a clock takes from a log it has not given since the
/// server started (2^61: at a million events a second, about 73,000 years
/// of them). Far below [`SEQ_LIMIT`], so a value written by hand just under
/// the limit the clock refuses to pass cannot bring the database to it:
/// between the two lie 2^61 values.
const SEQ_LOG_LIMIT: u64 = 1 << 61;

/// The next `seq` for an event row of the current transaction (the default
/// of `sales.events.seq`). The first one registers the transaction.
///
/// Registering takes no lock. The backend first publishes a lower bound of
/// the value it is about to take (the clock plus one), then takes the value
/// and publishes it. All of it is sequentially consistent, so a reader that
/// computes a horizon (clock first, then the slots) either read the clock
/// before this backend took its value, and then the horizon is at most that
/// value, or it reads the slot after the lower bound was published, and the
/// slot holds the horizon down to at most the value. Either way no event of
/// this transaction can fall below a horizon some reader computed.
///
/// Only a role allowed to insert event rows may take one: a value taken
/// registers the transaction as an event writer, whose events the
/// delivery horizon then waits for while it runs, so a role that may only
/// read (or nothing at all) could otherwise hold every later event of the
/// database back by leaving such a transaction open.
#[pg_extern(volatile, parallel_unsafe)]
fn event_seq() -> i64 {
    if !may_insert_events() {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "pg_sales: permission denied: sales.event_seq() is for roles that may insert into sales.events",
        );
    }
    next_seq()
}

/// Whether the current role may INSERT into `sales.events` (the table, or
/// any of its columns).
pub(crate) fn may_insert_events() -> bool {
    unsafe {
        let ns = pg_sys::get_namespace_oid(c"sales".as_ptr(), true);
        let rel = pg_sys::get_relname_relid(c"events".as_ptr(), ns);
        let (role, insert) = (pg_sys::GetUserId(), pg_sys::ACL_INSERT as pg_sys::AclMode);
        rel != pg_sys::InvalidOid
            && (pg_sys::pg_class_aclcheck(rel, role, insert) == pg_sys::AclResult::ACLCHECK_OK
                || pg_sys::pg_attribute_aclcheck_all(
                    rel,
                    role,
                    insert,
                    pg_sys::AclMaskHow::ACLMASK_ANY,
                ) == pg_sys::AclResult::ACLCHECK_OK)
    }
}

/// [`event_seq`], for event rows the extension writes itself.
pub fn next_seq() -> i64 {
    // As Postgres refuses `nextval()` there: 25006.
    refuse_in_recovery(
        PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
        "the event clock (sales.event_seq)",
    );
    let s = shared();
    see_clock(s);
    let seq = if FIRST_SEQ.get() == 0 {
        let i = my_slot_index(s);
        let slot = unsafe { &*slots(s).add(i) };
        slot.db.store(my_db(), Ordering::Relaxed);
        slot.pid
            .store(unsafe { pg_sys::MyProcPid }, Ordering::Relaxed);
        slot.xid.store(
            unsafe { pg_sys::GetTopFullTransactionId().value },
            Ordering::Relaxed,
        );
        slot.since
            .store(unsafe { pg_sys::GetCurrentTimestamp() }, Ordering::Relaxed);
        let clock = my_clock(s);
        slot.first_seq
            .store(clock.load(Ordering::SeqCst) + 1, Ordering::SeqCst);
        let seq = clock.fetch_add(1, Ordering::SeqCst) + 1;
        slot.first_seq.store(seq, Ordering::SeqCst);
        FIRST_SEQ.set(seq);
        FIRST_SUB.set(unsafe { pg_sys::GetCurrentSubTransactionId() });
        seq
    } else {
        my_clock(s).fetch_add(1, Ordering::SeqCst) + 1
    };
    if seq > SEQ_LIMIT {
        // Never reached by values the clock gave; refuse rather than wrap.
        error!("pg_sales: the event clock is past {SEQ_LIMIT}");
    }
    LAST_SEQ.set(seq);
    seq as i64
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    use pg_sys::XactEvent::*;
    if FIRST_SEQ.get() == 0 {
        return;
    }
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            // Runs after the commit is visible to new snapshots: a reader
            // that sees the slot gone also sees the transaction's events,
            // and the end of an asynchronous commit noted before it.
            note_async_commit();
            leave();
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => leave(),
        XACT_EVENT_PRE_COMMIT => notify_at_commit(),
        XACT_EVENT_PRE_PREPARE => {
            // A prepared transaction outlives its backend's slot, and its
            // events could then commit below a horizon readers have passed.
            raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "pg_sales: a transaction that wrote sales events cannot be prepared (PREPARE TRANSACTION)",
            );
        }
        _ => {}
    }
}

/// Notes the end of this transaction's commit record when the commit did
/// not wait for its flush (`synchronous_commit = off`: the setting is still
/// the transaction's when the commit callbacks run). A synchronous commit
/// is flushed before it becomes visible, so it needs nothing.
fn note_async_commit() {
    unsafe {
        if pg_sys::synchronous_commit != pg_sys::SyncCommitLevel::SYNCHRONOUS_COMMIT_OFF as i32 {
            return;
        }
        let end = pg_sys::XactLastCommitEnd;
        if end != 0 {
            generation_entry(&*SHARED, my_db())
                .async_commit_end
                .fetch_max(end, Ordering::SeqCst);
        }
    }
}

/// Ends this backend's registration: the transaction ended, or every
/// event it wrote was rolled back with a subtransaction. Readers waiting
/// for it wake.
fn leave() {
    FIRST_SEQ.set(0);
    LAST_SEQ.set(0);
    KNOWN_EVENT.set((0, 0));
    SUB_ABORTED.set(false);
    FIRST_SUB.set(0);
    let s = unsafe { &*SHARED };
    let db = my_db();
    let i = my_slot_index(s);
    unsafe { (*slots(s).add(i)).first_seq.store(0, Ordering::SeqCst) };
    let entry = generation_entry(s, db);
    entry.generation.fetch_add(1, Ordering::AcqRel);
    unsafe { pg_sys::ConditionVariableBroadcast(&raw const entry.cv as *mut _) };
}

/// Remembers the event row the sales trigger just wrote, so the commit's
/// NOTIFY can name it without a lookup.
pub fn note_event(id: i64, seq: i64) {
    KNOWN_EVENT.set((seq as u64, id));
}

#[pg_guard]
unsafe extern "C-unwind" fn subxact_callback(
    event: pg_sys::SubXactEvent::Type,
    mine: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut c_void,
) {
    if FIRST_SEQ.get() == 0 {
        return;
    }
    match event {
        // Its events now belong to the parent.
        pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB if mine == FIRST_SUB.get() => {
            FIRST_SUB.set(parent)
        }
        // The first event went with it, and every later one too (written
        // in it, or in subtransactions of it, which end first): nothing of
        // the transaction can commit any more, so it holds nothing back
        // (it held every later event back until it ended).
        pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB if mine == FIRST_SUB.get() => leave(),
        pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => SUB_ABORTED.set(true),
        _ => {}
    }
}

/// pg_sales' advisory lock key for "a NOTIFY is being committed".
const NOTIFY_LOCK_KEY: u32 = 0x5A1E5;

/// The advisory lock tag's fourth field for [`NOTIFY_LOCK_KEY`] (see
/// [`try_notify_lock`]).
const NOTIFY_LOCK_SPACE: u16 = 0x5A;

/// The transaction's one `NOTIFY sales_events` (payload: its highest event
/// id), sent just before commit, after deferred triggers.
///
/// Every NOTIFY serialises commits cluster-wide: Postgres holds a global
/// lock from queueing the notification until the commit record is flushed,
/// so with one NOTIFY per transaction many small concurrent writers would
/// commit one flush at a time. So by default NOTIFYs are coalesced: a
/// transaction that finds another one of its database committing a NOTIFY
/// (the advisory lock below, held to the end of that transaction) sends none,
/// and under load almost no commit waits for the lock. The NOTIFY is then a
/// hint that may arrive before this transaction's events are readable;
/// readers that must not miss anything wait in `sales.events_next`, which
/// wakes for every commit. `SET sales.notify_coalesce = off` sends one per
/// transaction.
fn notify_at_commit() {
    if crate::settings::NOTIFY_COALESCE.get() && !try_notify_lock() {
        return;
    }
    let (known_seq, known_id) = KNOWN_EVENT.get();
    if !SUB_ABORTED.get() && known_seq != 0 && known_seq == LAST_SEQ.get() {
        // The transaction's newest event is one the sales trigger wrote and
        // noted (the common case): no lookup needed.
        unsafe {
            pgrx::direct_function_call_as_datum(
                pg_sys::pg_notify,
                &[
                    "sales_events".into_datum(),
                    known_id.to_string().into_datum(),
                ],
            );
        }
        return;
    }
    let (first, last) = (FIRST_SEQ.get() as i64, LAST_SEQ.get() as i64);
    // The newest event row of this transaction that a savepoint did not roll
    // back: normally the row of its last seq (an equality on a unique index,
    // planned once per backend); after a rolled-back savepoint, the newest
    // of its rows between its first and last seq. At pre-commit the portal
    // (and its snapshot) may be gone already.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    // As the log's owner (see `as_log_owner`); a kept plan's privileges
    // are checked as whoever runs it, each time.
    let sent = crate::events::as_log_owner(|| {
        Spi::connect_mut(|client| {
            NOTIFY_PLAN.with(|plan| -> Result<(), pgrx::spi::Error> {
                let mut plan = plan.borrow_mut();
                if plan.is_none() {
                    *plan = Some(
                        client
                            .prepare_mut(
                                "SELECT pg_notify('sales_events', id::text) FROM sales.events
                             WHERE seq = $1 AND xid = pg_current_xact_id()",
                                &[PgOid::BuiltIn(PgBuiltInOids::INT8OID)],
                            )?
                            .keep(),
                    );
                }
                let stmt = plan.as_ref().expect("prepared above");
                if client.update(stmt, None, &[last.into()])?.is_empty() {
                    client.update(
                        "SELECT pg_notify('sales_events', e.id::text) FROM (
                         SELECT id FROM sales.events
                         WHERE seq BETWEEN $1 AND $2 AND xid = pg_current_xact_id()
                         ORDER BY seq DESC LIMIT 1) e",
                        None,
                        &[first.into(), last.into()],
                    )?;
                }
                Ok(())
            })
        })
    });
    unsafe { pg_sys::PopActiveSnapshot() };
    sent.unwrap_or_else(|e| error!("pg_sales: sending the commit's NOTIFY: {e}"));
}

/// Takes, to the end of the current transaction, the lock a transaction
/// committing its NOTIFY holds (see [`notify_at_commit`]): a test holds it
/// to show what commits do meanwhile, which SQL's advisory functions can no
/// longer do. Superusers only. True when taken.
#[pg_extern(volatile, parallel_unsafe)]
fn take_notify_lock() -> bool {
    if !unsafe { pg_sys::superuser() } {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "pg_sales: permission denied: sales.take_notify_lock() is for superusers (tests)",
        );
    }
    try_notify_lock()
}

/// A transaction-scoped advisory lock of the current database, keyed so
/// that no SQL function can take it: the SQL advisory functions set the
/// tag's fourth field to 1 (one int8 key) or 2 (two int4 keys), this one to
/// [`NOTIFY_LOCK_SPACE`]. Any role that can connect could otherwise hold
/// `pg_advisory_lock(369125)` and every commit would leave its NOTIFY to
/// the holder, which sends none: LISTEN clients would hear nothing.
fn try_notify_lock() -> bool {
    unsafe {
        let mut tag: pg_sys::LOCKTAG = std::mem::zeroed();
        tag.locktag_field1 = pg_sys::MyDatabaseId.to_u32();
        tag.locktag_field2 = 0;
        tag.locktag_field3 = NOTIFY_LOCK_KEY;
        tag.locktag_field4 = NOTIFY_LOCK_SPACE;
        tag.locktag_type = pg_sys::LockTagType::LOCKTAG_ADVISORY as u8;
        tag.locktag_lockmethodid = pg_sys::USER_LOCKMETHOD as u8;
        pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as i32, false, true)
            != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
    }
}

/// The `seq` below which every event of this database is final, and
/// durable: every event below it was committed by a transaction that has
/// left its slot, and the WAL is flushed past the newest asynchronous commit
/// noted before it left (see [`DbGeneration::async_commit_end`]). So no
/// reader is handed an event a crash could take back, and whose seq the
/// clock would then give again to a new event, which a reader already past
/// it would skip. With every commit synchronous there is nothing to flush.
/// (An event whose `seq` was written by hand, not taken from the clock, is
/// outside this as it is outside the horizon: its transaction never
/// registered, so an asynchronous commit of it is not noted.)
fn horizon(s: &'static Shared) -> u64 {
    refuse_in_recovery(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        "the delivery horizon",
    );
    see_clock(s);
    let db = my_db();
    let mut h = my_clock(s).load(Ordering::SeqCst) + 1;
    let slots = slots(s);
    for i in 0..s.nslots {
        let slot = unsafe { &*slots.add(i) };
        let first = slot.first_seq.load(Ordering::SeqCst);
        if first != 0 && first < h && slot.db.load(Ordering::Relaxed) == db {
            h = first;
        }
    }
    // Read after the slots: a transaction seen gone from its slot noted
    // its commit's end before it left.
    let async_end = generation_entry(s, db)
        .async_commit_end
        .load(Ordering::SeqCst);
    if async_end != 0 {
        // Returns at once when the WAL is flushed that far already.
        unsafe { pg_sys::XLogFlush(async_end) };
    }
    h
}

/// The `seq` below which every event of this database is final: no
/// transaction still running can add an event below it.
#[pg_extern(volatile, parallel_unsafe)]
fn events_horizon() -> i64 {
    horizon(shared()) as i64
}

/// A counter that moves whenever an event-writing transaction of this
/// database ends (read it before the horizon, then wait on it).
#[pg_extern(volatile, parallel_unsafe)]
fn events_generation() -> i64 {
    generation_entry(shared(), my_db())
        .generation
        .load(Ordering::Acquire) as i64
}

/// Waits until this database's generation differs from `known` or
/// `wait_ms` has passed; returns the generation then.
#[pg_extern(volatile, parallel_unsafe)]
fn events_wait(known: i64, wait_ms: i32) -> i64 {
    let s = shared();
    let entry = generation_entry(s, my_db());
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_millis(wait_ms.max(0) as u64);
    let cv = &raw const entry.cv as *mut pg_sys::ConditionVariable;
    unsafe { pg_sys::ConditionVariablePrepareToSleep(cv) };
    let g = loop {
        let g = entry.generation.load(Ordering::Acquire) as i64;
        if g != known {
            break g;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break g;
        }
        unsafe {
            pg_sys::ConditionVariableTimedSleep(
                cv,
                left.as_millis().clamp(1, i32::MAX as u128) as std::ffi::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            );
        }
    };
    unsafe { pg_sys::ConditionVariableCancelSleep() };
    g
}

/// First `seq` this transaction has taken (NULL before its first event).
#[pg_extern(volatile, parallel_unsafe)]
fn transaction_first_seq() -> Option<i64> {
    let first = FIRST_SEQ.get();
    (first != 0).then_some(first as i64)
}

/// Last `seq` this transaction has taken (NULL before its first event): its
/// own events are the rows between the two with its xid.
#[pg_extern(volatile, parallel_unsafe)]
fn transaction_last_seq() -> Option<i64> {
    let last = LAST_SEQ.get();
    (last != 0).then_some(last as i64)
}

/// The running event-writing transactions of this database, oldest first:
/// what holds delivery back.
#[pg_extern(volatile, parallel_unsafe)]
fn event_holders_raw() -> TableIterator<
    'static,
    (
        name!(pid, i32),
        name!(xid, i64),
        name!(first_seq, i64),
        name!(since_us, i64),
    ),
> {
    let s = shared();
    let db = my_db();
    let mut rows = Vec::new();
    // A slot read while its backend registers or leaves may mix two
    // transactions' details; this is a report, read again on every call.
    let slots = slots(s);
    for i in 0..s.nslots {
        let slot = unsafe { &*slots.add(i) };
        let first = slot.first_seq.load(Ordering::SeqCst);
        if first != 0 && slot.db.load(Ordering::Relaxed) == db {
            rows.push((
                slot.pid.load(Ordering::Relaxed),
                slot.xid.load(Ordering::Relaxed) as i64,
                first as i64,
                slot.since.load(Ordering::Relaxed),
            ));
        }
    }
    rows.sort_by_key(|r| r.2);
    // `since` is Postgres' TimestampTz: microseconds since 2000-01-01 UTC.
    TableIterator::new(rows)
}

/// Whether shared memory is there (the library was preloaded).
#[pg_extern(volatile, parallel_unsafe)]
fn delivery_ready() -> bool {
    unsafe { !SHARED.is_null() }
}
