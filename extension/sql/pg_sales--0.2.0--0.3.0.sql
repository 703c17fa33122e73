-- pg_sales 0.2.0 -> 0.3.0 (ALTER EXTENSION pg_sales UPDATE TO '0.3.0').
--
-- Runs in one transaction inside ALTER EXTENSION; every object created here
-- becomes a member of the extension. It must leave a database exactly as a
-- fresh CREATE EXTENSION pg_sales VERSION '0.3.0' would:
-- tests/tests/extension_upgrade.rs compares the two catalogs.
\echo Use "ALTER EXTENSION pg_sales UPDATE TO '0.3.0'" to load this file. \quit

---------------------------------------------------------------------------
-- Sales events from a Rust row trigger (src/events.rs): same events, same
-- payloads, without plpgsql's jsonb_build_object on every row written.
---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION sales.tg_sales_changed() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'tg_sales_changed_wrapper';
