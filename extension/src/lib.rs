//! pg_sales: the work of the sales backend, inside Postgres.
//!
//! Each capability lives in its own module; this file only wires them. The
//! schema (tables, triggers, event functions, index report) is hand-written
//! SQL in `sql/`, loaded after the Rust functions it calls.

use pgrx::prelude::*;

mod delivery;
mod error;
mod events;
mod jsonb;
mod jsonb_text;
mod projection;
mod records;
mod rows;
mod settings;
mod surface;
mod upsert;
mod validate;

pgrx::pg_module_magic!(name, version);

/// Loaded once per process; with `shared_preload_libraries = 'pg_sales'`
/// (required) this sets up the event log's delivery order in shared memory.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::init();
    delivery::init();
}

// The schema, by concern, in dependency order: tables (after the Rust
// functions their constraints, triggers and defaults call),
// documents, events (after the Rust trigger and delivery functions), batch
// (`finalize`: last of all).
extension_sql_file!(
    "../sql/tables.sql",
    name = "tables",
    requires = [
        validate::daily_data_check,
        rows::tg_sales_row,
        delivery::event_seq,
        delivery::delivery_ready
    ]
);
extension_sql_file!(
    "../sql/documents.sql",
    name = "documents",
    requires = ["tables"]
);
extension_sql_file!(
    "../sql/events.sql",
    name = "events",
    requires = [
        "documents",
        events::tg_sales_changed,
        delivery::events_horizon,
        delivery::events_generation,
        delivery::events_wait,
        delivery::transaction_first_seq,
        delivery::transaction_last_seq,
        delivery::event_holders_raw
    ]
);
// history.sql: its SQL functions read the tables, and a record's totals as
// of a time come from sales.daily_sum() and sales.daily_days(), when they
// are created.
extension_sql_file!(
    "../sql/history.sql",
    name = "history",
    requires = ["events", validate::daily_sum, validate::daily_days]
);
extension_sql_file!("../sql/batch.sql", name = "batch", finalize);
extension_sql_file!(
    "../sql/maintenance.sql",
    name = "maintenance",
    requires = ["events"]
);
// monitoring.sql creates nothing that names a sales table at creation time
// (its views read the statistics catalogs), and surface.sql is plpgsql,
// whose bodies are resolved only when they run: neither needs an order.
extension_sql_file!("../sql/monitoring.sql", name = "monitoring");
extension_sql_file!("../sql/surface.sql", name = "surface");

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
