//! Postgres: pools, migrations, retries, the write ritual (`write`) and
//! the bind parameters of rendered SQL (`sql`).

pub mod sql;
pub mod write;

pub use write::{set_actor, set_job, Changes, Write};

use crate::config::Config;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::ConnectOptions;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

/// Migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

pub fn connect_options(url: &str, cfg: &Config) -> Result<PgConnectOptions, sqlx::Error> {
    let opts = PgConnectOptions::from_str(url)?
        .application_name("sales-server")
        // DB_QUERY_TIMEOUT bounds every statement on the server side.
        .options([(
            "statement_timeout",
            format!("{}", cfg.db_query_timeout.as_millis()),
        )]);
    Ok(if cfg.log_slow_statements {
        // Every statement slower than SLOW_QUERY_MS is logged (with its
        // SQL, in the request's span), not only those `metrics::timed`
        // names.
        opts.log_slow_statements(
            log::LevelFilter::Warn,
            std::time::Duration::from_millis(cfg.slow_query_ms),
        )
    } else {
        opts
    })
}

/// The primary's pool. See [`checked`] for when a connection is checked
/// before use.
///
/// When no connection can be made, the error says where to and why: the
/// pool's own error says only that it timed out waiting, so one connection
/// is tried on its own for the cause (`Connection refused`, a password
/// refused, a database that does not exist).
pub async fn connect(cfg: &Config) -> anyhow::Result<PgPool> {
    let opts = connect_options(&cfg.database_url, cfg)?;
    let target = format!(
        "{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or_default()
    );
    match pool_for(&cfg.database_url, cfg).await {
        Ok(pool) => Ok(pool),
        Err(sqlx::Error::PoolTimedOut) => {
            use sqlx::Connection;
            let why = match tokio::time::timeout(
                cfg.db_connection_timeout,
                sqlx::PgConnection::connect_with(&opts),
            )
            .await
            {
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(conn)) => {
                    let _ = conn.close().await;
                    "no connection within DB_CONNECTION_TIMEOUT (one made on its own succeeded: try again)".into()
                }
                Err(_) => format!(
                    "no answer within DB_CONNECTION_TIMEOUT ({:?}), twice (the pool's \
                     attempt, then one on its own for the cause)",
                    cfg.db_connection_timeout
                ),
            };
            anyhow::bail!("cannot connect to Postgres at {target} (DATABASE_URL): {why}")
        }
        Err(e) => Err(anyhow::Error::new(e)
            .context(format!("connecting to Postgres at {target} (DATABASE_URL)"))),
    }
}

pub async fn pool_for(url: &str, cfg: &Config) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .min_connections(cfg.db_pool_min)
        .max_connections(cfg.db_pool_max)
        .idle_timeout(cfg.db_idle_timeout)
        .acquire_timeout(cfg.db_connection_timeout)
        .test_before_acquire(false)
        .before_acquire(checked)
        .connect_with(connect_options(url, cfg)?)
        .await
}

/// How long a pooled connection may have been idle and still be handed out
/// without a check.
const TRUST_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Until when (milliseconds on [`clock_ms`]) every connection is checked
/// before use, whatever its idle time: set for [`TRUST_IDLE`] when a
/// statement fails because its connection broke (see [`broken_connection`]).
static CHECK_ALL_UNTIL: AtomicU64 = AtomicU64::new(0);

fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Notes that `e` may have come from a broken connection (Postgres restarted,
/// or its backends were terminated): for the next [`TRUST_IDLE`], every
/// connection is checked before it is handed out, so the pool's other
/// connections, broken the same way, are replaced instead of failing one
/// request each.
pub fn broken_connection(e: &sqlx::Error) {
    if is_broken_connection(e) {
        CHECK_ALL_UNTIL.fetch_max(
            clock_ms() + TRUST_IDLE.as_millis() as u64,
            Ordering::Relaxed,
        );
    }
}

/// Whether `e` says the connection itself is gone (rather than the
/// statement failing, or the pool being busy): an I/O or TLS error, a
/// connection exception (SQLSTATE class 08), or the backend shut down by an
/// administrator, a crash or a restart (57P01–57P03).
pub fn is_broken_connection(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03")),
        // A pool timeout is a busy pool, not a broken connection.
        _ => false,
    }
}

/// Whether an idle connection may be handed out (sqlx's `before_acquire`).
/// The pool already checks every connection as it is returned (a round
/// trip after each use), so one returned within [`TRUST_IDLE`] is handed
/// out as it is: checking it again would add a second round trip to every
/// request. One idle longer (Postgres may have restarted meanwhile) is
/// checked first, and so is every connection for a while after one was
/// found broken ([`broken_connection`]). A statement on a connection that
/// broke within that second fails; reads are retried ([`retry`]), and
/// writes when they certainly did not commit ([`retry_tx`]).
fn checked<'c>(
    conn: &'c mut sqlx::PgConnection,
    meta: sqlx::pool::PoolConnectionMetadata,
) -> futures_util::future::BoxFuture<'c, Result<bool, sqlx::Error>> {
    Box::pin(async move {
        if meta.idle_for < TRUST_IDLE && clock_ms() >= CHECK_ALL_UNTIL.load(Ordering::Relaxed) {
            return Ok(true);
        }
        match sqlx::Connection::ping(conn).await {
            Ok(()) => Ok(true),
            Err(error) => {
                // The pool drops it and takes another.
                tracing::info!(%error, "an idle database connection failed its check");
                Ok(false)
            }
        }
    })
}

/// A pool that connects on first use (for the replica, which may be down at start).
pub fn lazy_pool_for(url: &str, cfg: &Config) -> Result<PgPool, sqlx::Error> {
    Ok(PgPoolOptions::new()
        .min_connections(0)
        .max_connections(cfg.db_pool_max)
        .idle_timeout(cfg.db_idle_timeout)
        .acquire_timeout(cfg.db_connection_timeout)
        .test_before_acquire(false)
        .before_acquire(checked)
        .connect_lazy_with(connect_options(url, cfg)?))
}

/// Applies the migrations, after moving an installed pg_sales to the version
/// whose files this Postgres has (see `update_extension`), so that deploying
/// a new release on an existing database upgrades it in place.
/// Brings the database to what this binary needs: the extension updated,
/// the migrations applied, and what a restored dump or a recreated
/// extension lacks put back. Runs on one connection of its own, without
/// DB_QUERY_TIMEOUT (an index built on a large table, or an extension
/// update, takes longer than a request may; a build cut short leaves an
/// invalid index behind). Instances starting together take turns under
/// the migration lock, which is polled rather than waited for: a statement
/// waiting for it would hold a snapshot, and an index built CONCURRENTLY
/// by the instance holding the lock waits for every such snapshot, so the
/// two would deadlock.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    use sqlx::migrate::MigrateError::Execute;
    let mut conn = pool.acquire().await.map_err(Execute)?.detach();
    let out = async {
        sqlx::query("SET statement_timeout = 0")
            .execute(&mut conn)
            .await
            .map_err(Execute)?;
        let key = migration_lock_key(&mut conn).await.map_err(Execute)?;
        let started = std::time::Instant::now();
        let mut said = false;
        while !sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut conn)
            .await
            .map_err(Execute)?
        {
            if !said && started.elapsed() > std::time::Duration::from_secs(2) {
                tracing::info!("waiting for another instance's migrations to finish");
                said = true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let done = async {
            not_mid_restore(&mut conn).await?;
            extension_present(&mut conn).await?;
            update_extension(&mut conn).await.map_err(Execute)?;
            // The lock is held already: the migrator must not wait for it.
            let mut migrator = sqlx::migrate!("../migrations");
            migrator.set_locking(false);
            // Migrations applied by a newer release (a rollback, or a rolling
            // deploy's old instances) are left as they are, as a newer
            // extension is: this binary's own are all that it checks.
            migrator.set_ignore_missing(true);
            migrator.run_direct(&mut conn).await?;
            restore_after_dump(&mut conn).await.map_err(Execute)
        }
        .await;
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(key)
            .execute(&mut conn)
            .await;
        done
    }
    .await;
    let _ = sqlx::Connection::close(conn).await;
    out
}

/// Refuses a database whose migrations are recorded but whose extension
/// is gone (`DROP EXTENSION pg_sales CASCADE`): the first migration, which
/// creates it, is not run again, and the later ones failed on a missing
/// table ("relation sales.users does not exist"). Its data went with it,
/// so it is not made again behind the operator's back.
async fn extension_present(conn: &mut PgConnection) -> Result<(), sqlx::migrate::MigrateError> {
    use sqlx::migrate::MigrateError::Execute;
    let recorded = migrations_recorded(&mut *conn).await.map_err(Execute)?;
    if !recorded {
        return Ok(());
    }
    let (created, present): (bool, bool) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM _sqlx_migrations WHERE version = 1 AND success),
                EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_sales')",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(Execute)?;
    if created && !present {
        return Err(Execute(sqlx::Error::Configuration(
            "extension pg_sales is not installed in this database, though its migrations are \
             recorded (was it dropped? its tables and their data went with it): to start over \
             empty, run CREATE EXTENSION pg_sales as its owner and migrate again; to get the \
             data back, restore a dump (README, Operations, \"Backups\")"
                .into(),
        )));
    }
    Ok(())
}

/// Refuses a database that a `pg_restore` is still filling: its first step
/// (`--section=pre-data`) makes the server's tables, `_sqlx_migrations`
/// among them, without their keys, which come with the last step
/// (`--section=post-data`). Migrating in between recorded every migration
/// in the empty table; the data step then added the dump's records beside
/// them, and the last step failed to make the key over the duplicates.
async fn not_mid_restore(conn: &mut PgConnection) -> Result<(), sqlx::migrate::MigrateError> {
    use sqlx::migrate::MigrateError::Execute;
    let keyless: bool = sqlx::query_scalar(
        "SELECT to_regclass('_sqlx_migrations') IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM pg_constraint
                            WHERE conrelid = to_regclass('_sqlx_migrations') AND contype = 'p')",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(Execute)?;
    if keyless {
        return Err(Execute(sqlx::Error::Configuration(
            "this database is being restored: _sqlx_migrations has no primary key yet \
             (pg_restore's --section=post-data step has not run); finish the restore's steps \
             (README, Operations, \"Backups\"), then migrate"
                .into(),
        )));
    }
    Ok(())
}

/// [`extension_present`] for a command that does not migrate (`maintain`):
/// a dropped extension is named, not failed on as a missing function.
pub async fn check_extension(pool: &PgPool) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    extension_present(&mut conn).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(sqlx::Error::Configuration(m)) => {
            anyhow::anyhow!("{m}")
        }
        other => other.into(),
    })
}

/// What `seed`, `import` and the `user` commands need before they work on
/// the database. A database never migrated (no migration recorded as
/// applied) is migrated: nothing serves it yet, and a command run on a new
/// database sets it up. Any other is left at its extension version and
/// migrations ([`require_migrated`]: an `ALTER EXTENSION pg_sales UPDATE`
/// run by a newer binary's `user list` would leave the instances serving
/// the database on an extension newer than theirs, not ready, before their
/// deploy), and what a restored dump or a recreated extension lacks is put
/// back first, as `migrate` does (a user added over a recreated extension's
/// fresh id sequence took the id of a user whose sessions and identity
/// link were still there).
pub async fn prepare_for_command(pool: &PgPool) -> anyhow::Result<()> {
    let recorded = migrations_recorded(pool).await?;
    let applied = recorded
        && sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM _sqlx_migrations WHERE success)",
        )
        .fetch_one(pool)
        .await?;
    if !applied {
        migrate(pool).await?;
    }
    require_migrated(pool).await?;
    if applied {
        let mut conn = pool.acquire().await?;
        not_mid_restore(&mut conn).await?;
        restore_after_dump(&mut conn).await?;
    }
    Ok(())
}

/// Refuses, changing nothing, a database that lacks one of this release's
/// migrations or whose extension is older than this release, saying what
/// to run (`maintain`, and the other commands after a database's first
/// migration; see [`prepare_for_command`]).
pub async fn require_migrated(pool: &PgPool) -> anyhow::Result<()> {
    check_extension(pool).await?;
    // A migration run outside a transaction that stopped midway is
    // recorded as not successful; `migrate` refuses it too (sqlx's
    // "partially applied"), so running it is no advice.
    let recorded = migrations_recorded(pool).await?;
    if recorded {
        let dirty: Option<(i64, String)> = sqlx::query_as(
            "SELECT version, description FROM _sqlx_migrations WHERE NOT success ORDER BY version LIMIT 1",
        )
        .fetch_optional(pool)
        .await?;
        if let Some((version, description)) = dirty {
            anyhow::bail!(
                "migration {version:04} {description} was left partly applied (a run stopped inside it): \
                 finish or undo what it did, delete its row from _sqlx_migrations, then run `sales-server migrate`"
            );
        }
    }
    let pending = pending_migrations(pool).await?;
    if let Some(first) = pending.first() {
        anyhow::bail!(
            "the database lacks {} of this release's migrations (first: {first}); run `sales-server migrate` first",
            pending.len()
        );
    }
    if let Some(have) = extension_version(pool).await? {
        if version_older(&have, crate::VERSION) {
            anyhow::bail!(
                "extension pg_sales in the database is {have} and this release needs {}; run `sales-server migrate` first, \
                 which updates it (where its role may not, the extension's owner or a superuser runs ALTER EXTENSION pg_sales UPDATE)",
                crate::VERSION
            );
        }
    }
    Ok(())
}

/// Whether the database has sqlx's record of migrations (any migration
/// was ever run on it).
async fn migrations_recorded<'e>(exec: impl sqlx::PgExecutor<'e>) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(exec)
        .await
}

/// This binary's migrations the database has not applied yet (version and
/// description), in order; all of them when it was never migrated.
pub async fn pending_migrations(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    let applied: Vec<i64> = if migrations_recorded(pool).await? {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await?
    } else {
        Vec::new()
    };
    Ok(sqlx::migrate!("../migrations")
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
        .map(|m| format!("{:04} {}", m.version, m.description))
        .collect())
}

/// The advisory lock sqlx's migrator takes for this database (the same key,
/// so an older server migrating with sqlx's own lock takes turns too).
async fn migration_lock_key(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut *conn)
        .await?;
    const CRC_IEEE: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    Ok(0x3d32ad9e * (CRC_IEEE.checksum(db.as_bytes()) as i64))
}

/// Key of the advisory lock under which instances put back what a restored
/// dump lacks, one at a time: two instances starting together on a
/// restored database would otherwise both find an index missing and both
/// create it, and one would fail.
pub const RESTORE_LOCK: i64 = 0x5A1E_5002;

/// [`restore_users_triggers`], [`restore_table_settings`],
/// [`restore_user_keys`] and [`restore_sequences`] in one transaction,
/// under [`RESTORE_LOCK`].
async fn restore_after_dump(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(RESTORE_LOCK)
        .execute(&mut *tx)
        .await?;
    // What is put back takes strong locks (an index dropped and built
    // again holds its table ACCESS EXCLUSIVE to the end). Waiting for them
    // behind a long transaction (an export's snapshot) queued every query
    // of every instance on those tables behind this one: the start fails
    // instead, saying why, and the next start tries again.
    sqlx::query(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        RESTORE_LOCK_TIMEOUT.as_millis()
    ))
    .execute(&mut *tx)
    .await?;
    let restored = restore_in(&mut tx).await;
    if let Err(e) = &restored {
        if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("55P03") {
            tracing::error!(
                "putting back what a restored dump lacks waited {} s for a lock on the extension's tables \
                 (a long transaction holds one: see pg_locks); nothing was changed, the next start tries again",
                RESTORE_LOCK_TIMEOUT.as_secs()
            );
        }
    }
    restored?;
    tx.commit().await
}

/// How long [`restore_after_dump`] waits for each lock it takes.
const RESTORE_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The statements of [`restore_after_dump`], in its transaction.
async fn restore_in(tx: &mut PgConnection) -> Result<(), sqlx::Error> {
    restore_users_triggers(tx).await?;
    restore_table_settings(tx).await?;
    restore_user_keys(tx).await?;
    let moved = restore_sequences(tx).await?;
    if !moved.is_empty() {
        // A dump from before 0.8.0 (its sequences were not in it). Up to
        // 0.4.0 the totals were generated columns, which pg_dump leaves
        // out, and the data step runs with triggers off: written again
        // here through the row trigger, which computes them (equal daily
        // data makes no new version and no event).
        let n = sqlx::query(
            "UPDATE sales.monthly_sales SET daily_data = daily_data
             WHERE total_sales IS NULL OR days_reported IS NULL",
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n > 0 {
            tracing::warn!(rows = n, "sales records restored without their totals (a dump from extension 0.4.0 or older); computed them");
        }
    }
    Ok(())
}

/// The foreign keys from the server's `auth` tables to `sales.users` (a
/// table of the extension), as migrations 0010 and 0019 create them.
const USER_KEYS: [(&str, &str); 4] = [
    ("auth.user_state", "user_state_user_id_fkey"),
    ("auth.sessions", "sessions_user_id_fkey"),
    ("auth.user_events", "user_events_user_id_fkey"),
    ("auth.identities", "identities_user_id_fkey"),
];

/// Puts back the foreign keys from the `auth` tables to `sales.users` when
/// they are missing: `DROP EXTENSION pg_sales CASCADE` drops them and keeps
/// the rows. Rows of users that are gone go first (they would otherwise
/// pass to whoever gets the id next: a provider identity, a disabled state,
/// sessions). Returns how many keys were made again.
pub async fn restore_user_keys(conn: &mut PgConnection) -> Result<usize, sqlx::Error> {
    let mut made = 0;
    for (table, name) in USER_KEYS {
        let present: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_constraint
                            WHERE conrelid = to_regclass($1) AND conname = $2 AND contype = 'f')",
        )
        .bind(table)
        .bind(name)
        .fetch_one(&mut *conn)
        .await?;
        if present {
            continue;
        }
        let gone = sqlx::query(&format!(
            "DELETE FROM {table} t WHERE NOT EXISTS (SELECT 1 FROM sales.users u WHERE u.id = t.user_id)"
        ))
        .execute(&mut *conn)
        .await?
        .rows_affected();
        sqlx::query(&format!(
            "ALTER TABLE {table} ADD CONSTRAINT {name}
             FOREIGN KEY (user_id) REFERENCES sales.users (id) ON DELETE CASCADE"
        ))
        .execute(&mut *conn)
        .await?;
        tracing::warn!(table, removed_rows = gone, "the key from {table} to sales.users was missing (the extension dropped and created again?); rows of users no longer there were removed and the key made again");
        made += 1;
    }
    Ok(made)
}

/// Ids a table gives out that other tables go on naming after the row is
/// gone: a new row given such an id again would take over what they say of
/// the old one. A record deleted, or lost with a dump taken before
/// extension 0.8.0, keeps its versions in the event log and the event
/// history (a new record with its id showed an empty history, "older than
/// the retained history"); a user gone with `DROP EXTENSION pg_sales
/// CASCADE` keeps their jobs (a new user with the id was shown them) and
/// their tombstone. Each column leads an index, so its `max` is read from
/// the index's end. Store ids are named by events too, but by no index.
/// Each reference is (table, column, which of its rows): the log's
/// `row_id` names a store in store events, and only sales records'
/// events count (the newest such from the index's end, past at most the
/// store events above it).
const ID_REFERENCES: [(&str, &str, &[Reference]); 2] = [
    (
        "sales.monthly_sales",
        "id",
        &[
            (
                "sales.events",
                "row_id",
                "kind IN ('sales-data-created', 'sales-data-updated', 'sales-data-deleted')",
            ),
            ("sales.event_history", "row_id", "true"),
        ],
    ),
    (
        "sales.users",
        "id",
        &[
            ("jobs.jobs", "user_id", "true"),
            ("auth.deleted_users", "user_id", "true"),
        ],
    ),
];

/// A table's column that names ids, and which of its rows do (SQL).
type Reference = (&'static str, &'static str, &'static str);

/// Moves every id sequence of the product's tables past the ids its table
/// holds. A dump taken before extension 0.8.0 did not carry the
/// extension's sequences, so after a restore they started again at 1 and
/// every write failed on a duplicate key. Runs at every start, so only
/// columns an index leads are read (a `max` from the index's end): that
/// covers every id a key is made of alone; `jobs.job_errors.n` is unique
/// only with its job, whose id is covered. The event history needs no look
/// of its own: its ids came from the log, and a prune keeps the log's
/// newest event. Ids that only other tables still name count too
/// ([`ID_REFERENCES`]). Returns the sequences moved.
pub async fn restore_sequences(conn: &mut PgConnection) -> Result<Vec<String>, sqlx::Error> {
    let owned: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT s.oid::regclass::text, t.oid::regclass::text, quote_ident(a.attname),
                n.nspname || '.' || t.relname
         FROM pg_class s
         JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.oid
              AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
         JOIN pg_class t ON t.oid = d.refobjid
         JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid
         JOIN pg_namespace n ON n.oid = t.relnamespace
         WHERE s.relkind = 'S' AND n.nspname IN ('sales', 'auth', 'jobs')
           AND EXISTS (SELECT 1 FROM pg_index i
                       WHERE i.indrelid = t.oid AND i.indkey[0] = a.attnum)
         ORDER BY 1",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut moved = Vec::new();
    for (seq, table, column, name) in owned {
        let mut top: Option<i64> =
            sqlx::query_scalar(&format!("SELECT max({column}) FROM {table}"))
                .fetch_one(&mut *conn)
                .await?;
        let column_only = column.trim_matches('"');
        for (t, c, others) in ID_REFERENCES {
            if (t, c) != (name.as_str(), column_only) {
                continue;
            }
            for (other, other_column, which) in others {
                // Some are there only from some extension version on.
                let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                    .bind(other)
                    .fetch_one(&mut *conn)
                    .await?;
                if !exists {
                    continue;
                }
                let there: Option<i64> = sqlx::query_scalar(&format!(
                    "SELECT {other_column} FROM {other}
                     WHERE {other_column} IS NOT NULL AND {which}
                     ORDER BY {other_column} DESC LIMIT 1"
                ))
                .fetch_optional(&mut *conn)
                .await?;
                top = top.max(there);
            }
        }
        let Some(top) = top else { continue };
        if let Some(next) = move_past(conn, &seq, top).await? {
            tracing::warn!(sequence = %seq, from = next, to = top + 1, "an id sequence was behind its table's ids (a dump restored from an older extension?); moved it past them");
            moved.push(seq);
        }
    }
    if !moved.is_empty() {
        // A dump from before 0.8.0 was restored. Its events also name
        // stores deleted before it was taken, which no index leads with (a
        // scan of the log, so only now, not at every start): a new store
        // must not take such an id, or it would inherit that store's
        // history and replayed events.
        let named: Option<i64> = sqlx::query_scalar(
            "SELECT greatest((SELECT max(store_id) FROM sales.events),
                             (SELECT max(store_id) FROM sales.event_history))",
        )
        .fetch_one(&mut *conn)
        .await?;
        let seq: Option<String> =
            sqlx::query_scalar("SELECT pg_get_serial_sequence('sales.stores', 'id')")
                .fetch_one(&mut *conn)
                .await?;
        if let (Some(top), Some(seq)) = (named, seq) {
            if let Some(next) = move_past(conn, &seq, top).await? {
                tracing::warn!(sequence = %seq, from = next, to = top + 1, "store ids that only the event log names (deleted stores of a restored dump); moved the store sequence past them");
                moved.push(seq);
            }
        }
    }
    Ok(moved)
}

/// Moves sequence `seq` past `top` when its next value is not past it;
/// returns the next value it had then (None: it was already past).
async fn move_past(
    conn: &mut PgConnection,
    seq: &str,
    top: i64,
) -> Result<Option<i64>, sqlx::Error> {
    let (last, called): (i64, bool) =
        sqlx::query_as(&format!("SELECT last_value, is_called FROM {seq}"))
            .fetch_one(&mut *conn)
            .await?;
    let next = if called { last + 1 } else { last };
    if next > top {
        return Ok(None);
    }
    sqlx::query("SELECT setval($1::regclass, $2)")
        .bind(seq)
        .bind(top)
        .execute(&mut *conn)
        .await?;
    Ok(Some(next))
}

/// What migrations 0002, 0006, 0007, 0011 and 0020 add to the extension's tables
/// (indexes, extended statistics, the event log's statistics targets): the
/// name to look for, the catalog query that finds it, and the statements
/// that make it, as the migrations do. An index left invalid (its build
/// concurrently was cut short) counts as missing: it is dropped and built
/// again.
const TABLE_SETTINGS: [(&str, &str, &str); 5] = [
    (
        "monthly_sales_period_idx",
        "SELECT coalesce((SELECT indisvalid FROM pg_index
                          WHERE indexrelid = to_regclass('sales.monthly_sales_period_idx')), false)",
        "DROP INDEX IF EXISTS sales.monthly_sales_period_idx;
         CREATE INDEX IF NOT EXISTS monthly_sales_period_idx
             ON sales.monthly_sales (year, month, store_id)
             INCLUDE (total_sales, total_customers, days_reported, version);
         COMMENT ON INDEX sales.monthly_sales_period_idx IS
             'pg_sales: required by lists, summaries and exports filtered by period across stores'",
    ),
    (
        "stores_region_status_idx",
        "SELECT coalesce((SELECT indisvalid FROM pg_index
                          WHERE indexrelid = to_regclass('sales.stores_region_status_idx')), false)",
        "DROP INDEX IF EXISTS sales.stores_region_status_idx;
         CREATE INDEX IF NOT EXISTS stores_region_status_idx
             ON sales.stores (region, status) INCLUDE (code, name);
         COMMENT ON INDEX sales.stores_region_status_idx IS
             'pg_sales: required by region filters and the stores list'",
    ),
    (
        "monthly_sales_store_period",
        "SELECT EXISTS (SELECT 1 FROM pg_statistic_ext WHERE stxname = 'monthly_sales_store_period'
                        AND stxnamespace = 'sales'::regnamespace)",
        "CREATE STATISTICS IF NOT EXISTS sales.monthly_sales_store_period (ndistinct, dependencies, mcv)
             ON store_id, year, month FROM sales.monthly_sales",
    ),
    (
        "monthly_sales_period",
        "SELECT EXISTS (SELECT 1 FROM pg_statistic_ext WHERE stxname = 'monthly_sales_period'
                        AND stxnamespace = 'sales'::regnamespace)",
        "CREATE STATISTICS IF NOT EXISTS sales.monthly_sales_period (ndistinct, mcv)
             ON year, month FROM sales.monthly_sales",
    ),
    (
        "sales.events statistics targets",
        "SELECT attstattarget = 0 FROM pg_attribute
         WHERE attrelid = 'sales.events'::regclass AND attname = 'payload'",
        "ALTER TABLE sales.events ALTER COLUMN payload SET STATISTICS 0,
             ALTER COLUMN id SET STATISTICS 10, ALTER COLUMN kind SET STATISTICS 10,
             ALTER COLUMN store_id SET STATISTICS 10, ALTER COLUMN user_id SET STATISTICS 10,
             ALTER COLUMN actor_id SET STATISTICS 10, ALTER COLUMN row_id SET STATISTICS 10,
             ALTER COLUMN row_version SET STATISTICS 10, ALTER COLUMN xid SET STATISTICS 10,
             ALTER COLUMN created_at SET STATISTICS 10, ALTER COLUMN seq SET STATISTICS 10",
    ),
];

/// Puts back what migrations added to the extension's tables when it is
/// missing: `pg_dump` leaves out whatever sits on an extension's tables
/// (indexes, statistics, column settings) though it keeps their data, so a
/// restored database has the migrations recorded but not these. Returns
/// whether anything had to be made again.
pub async fn restore_table_settings(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    let mut made = false;
    for (name, present, make) in TABLE_SETTINGS {
        let there: Option<bool> = sqlx::query_scalar(present)
            .fetch_optional(&mut *conn)
            .await?;
        if there != Some(true) {
            // One statement or several, separated by `;` (none inside).
            for stmt in make.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                sqlx::query(stmt).execute(&mut *conn).await?;
            }
            tracing::warn!(object = name, "an index or setting a migration puts on the extension's tables was missing (a restored dump?); made it again");
            made = true;
        }
    }
    Ok(made)
}

/// The triggers of migrations 0014 and 0015 (revocation of users changed
/// by plain SQL) and 0025 (access changes announced at commit), with their
/// tables, as those migrations create them.
const USERS_TRIGGERS: [(&str, &str, &str); 3] = [
    (
        "sales.users",
        "users_changed_outside",
        "CREATE OR REPLACE TRIGGER users_changed_outside AFTER UPDATE OR DELETE ON sales.users
             FOR EACH ROW EXECUTE FUNCTION auth.tg_users_changed_outside()",
    ),
    (
        "sales.users",
        "users_truncated_outside",
        "CREATE OR REPLACE TRIGGER users_truncated_outside BEFORE TRUNCATE ON sales.users
             FOR EACH STATEMENT EXECUTE FUNCTION auth.tg_users_truncated_outside()",
    ),
    (
        "sales.events",
        "access_notify",
        "CREATE OR REPLACE TRIGGER access_notify AFTER INSERT ON sales.events FOR EACH ROW
             WHEN (NEW.kind IN ('user-created', 'user-updated', 'user-deleted', 'session-revoked'))
             EXECUTE FUNCTION auth.tg_access_notify()",
    ),
];

/// Puts back the triggers of migrations 0014, 0015 and 0025 when they are
/// missing. They sit on `sales.users` and `sales.events`, tables of the
/// extension, and `pg_dump` leaves out triggers on extension tables, so a
/// restored database has the migrations recorded but not the triggers.
/// Returns whether any had to be created.
pub async fn restore_users_triggers(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    let mut created = false;
    for (table, name, create) in USERS_TRIGGERS {
        let present: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = $1
                            AND tgrelid = $2::regclass)",
        )
        .bind(name)
        .bind(table)
        .fetch_one(&mut *conn)
        .await?;
        if !present {
            sqlx::query(create).execute(&mut *conn).await?;
            tracing::warn!(trigger = name, table, "a trigger that revokes users changed by plain SQL, or announces access changes, was missing (a restored dump?); created it again");
            created = true;
        }
    }
    Ok(created)
}

/// `ALTER EXTENSION pg_sales UPDATE` when the database holds an older version
/// than the installed extension files: the upgrade scripts keep every row and
/// event. Returns (from, to) when it updated. Without the right to update
/// (only the extension's owner or a superuser may), it logs a warning and
/// leaves it: readiness then reports the version mismatch. Two instances
/// starting together are safe: the second waits for the first's lock and
/// finds nothing to do.
pub async fn update_extension(
    conn: &mut PgConnection,
) -> Result<Option<(String, String)>, sqlx::Error> {
    let versions: Option<(String, Option<String>)> = sqlx::query_as(
        "SELECT x.extversion::text, a.default_version::text
         FROM pg_extension x LEFT JOIN pg_available_extensions a ON a.name = x.extname
         WHERE x.extname = 'pg_sales'",
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some((have, Some(want))) = versions else {
        return Ok(None);
    };
    if have == want {
        return Ok(None);
    }
    // Only forward: a database whose extension is newer than the files
    // installed here (another server updated it) is left as it is.
    let path: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_extension_update_paths('pg_sales')
                        WHERE source = $1 AND target = $2 AND path IS NOT NULL)",
    )
    .bind(&have)
    .bind(&want)
    .fetch_one(&mut *conn)
    .await?;
    if !path {
        tracing::warn!(installed = %have, files = %want,
            "extension pg_sales in the database has no update path to the version of its installed files (is it newer?); left as it is");
        return Ok(None);
    }
    match sqlx::query("ALTER EXTENSION pg_sales UPDATE")
        .execute(&mut *conn)
        .await
    {
        Ok(_) => {
            tracing::info!(from = %have, to = %want, "extension pg_sales updated");
            Ok(Some((have, want)))
        }
        Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42501") => {
            tracing::warn!(from = %have, to = %want, error = %e,
                "extension pg_sales is older than its installed files; its owner must run ALTER EXTENSION pg_sales UPDATE");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The installed version of pg_sales in the database, None without it.
pub async fn extension_version(pool: &PgPool) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT extversion::text FROM pg_extension WHERE extname = 'pg_sales'")
        .fetch_optional(pool)
        .await
}

/// Whether version `a` (`major.minor.patch`) comes before `b`; a version
/// that is not three numbers compares as neither.
pub fn version_older(a: &str, b: &str) -> bool {
    let parse = |v: &str| -> Option<Vec<u64>> {
        let parts: Vec<u64> = v
            .split('.')
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        (parts.len() == 3).then_some(parts)
    };
    matches!((parse(a), parse(b)), (Some(a), Some(b)) if a < b)
}

/// `16/B374D848` -> a comparable number.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

pub fn format_lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xffff_ffff)
}

/// Whether the database has a function of a newer extension version than
/// the oldest one the server works with. Asked on first use; a "no" is
/// asked again after [`Feature::RECHECK`], so a server started against a
/// database whose extension was not updated yet takes the function up soon
/// after `ALTER EXTENSION pg_sales UPDATE`; and a call that finds the
/// function gone (the extension recreated at an older version) turns the
/// answer to "no" at once ([`Feature::missing`]).
pub struct Feature {
    /// `to_regprocedure` of this signature tells.
    signature: &'static str,
    known: std::sync::Mutex<Option<(bool, std::time::Instant)>>,
}

impl Feature {
    pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

    pub const fn new(signature: &'static str) -> Self {
        Self {
            signature,
            known: std::sync::Mutex::new(None),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Option<(bool, std::time::Instant)>> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the function is there (false while the database cannot be
    /// asked: asked again on the next call).
    pub async fn has(&self, pool: &PgPool) -> bool {
        if let Some((has, at)) = *self.known() {
            if has || at.elapsed() < Self::RECHECK {
                return has;
            }
        }
        match sqlx::query_scalar::<_, bool>("SELECT to_regprocedure($1) IS NOT NULL")
            .bind(self.signature)
            .fetch_one(pool)
            .await
        {
            Ok(has) => {
                *self.known() = Some((has, std::time::Instant::now()));
                has
            }
            Err(_) => false,
        }
    }

    /// A call found the function missing.
    pub fn missing(&self) {
        *self.known() = Some((false, std::time::Instant::now()));
    }
}

/// Postgres' `undefined_function`: a call named a function the database
/// does not have (with these argument types).
pub fn is_undefined_function(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42883")
}

/// Errors worth another try: serialization failures and deadlocks (the
/// transaction was rolled back), and lost or refused connections.
/// A pool that timed out is busy, not broken: trying again would queue the
/// same work behind the same load (four times over), so it is not retried.
pub fn is_transient(e: &sqlx::Error, connection_errors: bool) -> bool {
    match e {
        sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("40001" | "40P01")) => true,
        _ => connection_errors && is_broken_connection(e),
    }
}

/// Runs `f` up to 4 times with exponential backoff and jitter (25 ms, 50 ms,
/// 100 ms, each +0..50%) while it fails transiently. `idempotent` work is
/// retried after connection errors too (a COMMIT whose outcome is unknown
/// may have happened, so only work that can safely run twice qualifies).
pub async fn retry<T, F, Fut>(
    what: &'static str,
    idempotent: bool,
    mut f: F,
) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    use rand::Rng;
    let mut attempt = 0u32;
    loop {
        let out = f().await;
        if let Err(e) = &out {
            broken_connection(e);
        }
        match out {
            Err(e) if attempt < 3 && is_transient(&e, idempotent) => {
                let base = 25u64 << attempt;
                let jitter = rand::thread_rng().gen_range(0..=base / 2);
                tracing::warn!(operation = what, attempt = attempt + 1, error = %e, "transient database error; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(base + jitter)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Where an attempt at a write transaction failed.
#[derive(Debug)]
pub enum TxFailure {
    /// Before COMMIT was sent: the transaction certainly did not commit.
    BeforeCommit(sqlx::Error),
    /// At COMMIT: after a lost connection its outcome is unknown.
    AtCommit(sqlx::Error),
}

impl From<sqlx::Error> for TxFailure {
    fn from(e: sqlx::Error) -> Self {
        TxFailure::BeforeCommit(e)
    }
}

/// Runs a write transaction up to 4 times (backoff as [`retry`]), retrying
/// only what certainly did not commit: any transient failure before COMMIT
/// (a lost connection aborts the transaction), and at COMMIT only a
/// serialization failure or deadlock (reported after the rollback). A
/// connection lost at COMMIT is returned as is: the write may have
/// happened, and running it again would repeat its event and could
/// overwrite a newer write.
pub async fn retry_tx<T, F, Fut>(what: &'static str, mut f: F) -> Result<T, TxFailure>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, TxFailure>>,
{
    use rand::Rng;
    let mut attempt = 0u32;
    loop {
        let out = f().await;
        if let Err(TxFailure::BeforeCommit(e) | TxFailure::AtCommit(e)) = &out {
            broken_connection(e);
        }
        let again = match out {
            Err(TxFailure::BeforeCommit(e)) if attempt < 3 && is_transient(&e, true) => e,
            Err(TxFailure::AtCommit(e)) if attempt < 3 && is_transient(&e, false) => e,
            other => return other,
        };
        let base = 25u64 << attempt;
        let jitter = rand::thread_rng().gen_range(0..=base / 2);
        tracing::warn!(operation = what, attempt = attempt + 1, error = %again, "transient database error; retrying");
        tokio::time::sleep(std::time::Duration::from_millis(base + jitter)).await;
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn versions_compare_by_number() {
        assert!(version_older("0.11.0", "0.12.0"));
        assert!(version_older("0.9.0", "0.12.0"));
        assert!(version_older("0.12.0", "1.0.0"));
        assert!(!version_older("0.12.0", "0.12.0"));
        assert!(!version_older("0.12.1", "0.12.0"));
        assert!(!version_older("99.0.0", "0.12.0"));
        assert!(!version_older("0.12", "0.13.0"));
        assert!(!version_older("0.12.0-dev", "0.13.0"));
    }

    #[test]
    fn lsn_round_trip() {
        let v = parse_lsn("16/B374D848").unwrap();
        assert_eq!(v, (0x16 << 32) | 0xB374D848);
        assert_eq!(format_lsn(v), "16/B374D848");
        assert!(parse_lsn("x").is_none());
    }

    #[test]
    fn only_a_lost_connection_counts_as_broken() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(is_broken_connection(&io));
        assert!(!is_broken_connection(&sqlx::Error::PoolTimedOut));
        assert!(!is_broken_connection(&sqlx::Error::RowNotFound));
    }

    fn reset() -> sqlx::Error {
        sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
    }

    #[tokio::test]
    async fn retries_transient_then_succeeds() {
        let calls = AtomicU32::new(0);
        let out = retry("t", true, || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(reset())
            } else {
                Ok(7)
            }
        })
        .await
        .unwrap();
        assert_eq!(out, 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn does_not_retry_connection_errors_for_non_idempotent_work() {
        let calls = AtomicU32::new(0);
        let out: Result<(), _> = retry("t", false, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(reset())
        })
        .await;
        assert!(out.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_busy_pool_is_not_retried() {
        let calls = AtomicU32::new(0);
        let out: Result<(), _> = retry("t", true, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(sqlx::Error::PoolTimedOut)
        })
        .await;
        assert!(matches!(out, Err(sqlx::Error::PoolTimedOut)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_lost_commit_is_not_retried() {
        let calls = AtomicU32::new(0);
        let out: Result<(), _> = retry_tx("t", || async {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(TxFailure::BeforeCommit(reset()))
            } else {
                Err(TxFailure::AtCommit(sqlx::Error::Io(std::io::Error::other(
                    "reset",
                ))))
            }
        })
        .await;
        assert!(matches!(out, Err(TxFailure::AtCommit(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn gives_up_after_four_attempts() {
        let calls = AtomicU32::new(0);
        let out: Result<(), _> = retry("t", true, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(reset())
        })
        .await;
        assert!(out.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }
}
