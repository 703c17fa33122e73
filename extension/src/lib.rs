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
mod projection;
mod upsert;
mod validate;

pgrx::pg_module_magic!(name, version);

/// Loaded once per process; with `shared_preload_libraries = 'pg_sales'`
/// (required) this sets up the event log's delivery order in shared memory.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    delivery::init();
}

extension_sql_file!("../sql/schema.sql", name = "schema", finalize);
extension_sql_file!(
    "../sql/maintenance.sql",
    name = "maintenance",
    requires = ["schema"]
);
// `finalize` puts schema.sql after every other SQL file, whatever their
// `requires` say, so monitoring.sql creates nothing that names a sales table
// at creation time (its views read the statistics catalogs), and surface.sql
// is plpgsql, whose bodies are resolved only when they run.
extension_sql_file!("../sql/monitoring.sql", name = "monitoring");
extension_sql_file!("../sql/surface.sql", name = "surface");

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
