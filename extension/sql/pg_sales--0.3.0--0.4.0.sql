-- pg_sales 0.3.0 -> 0.4.0 (ALTER EXTENSION pg_sales UPDATE TO '0.4.0').
--
-- Runs in one transaction inside ALTER EXTENSION; every object created here
-- becomes a member of the extension. It must leave a database exactly as a
-- fresh CREATE EXTENSION pg_sales VERSION '0.4.0' would:
-- tests/tests/extension_upgrade.rs compares the two catalogs.
\echo Use "ALTER EXTENSION pg_sales UPDATE TO '0.4.0'" to load this file. \quit

---------------------------------------------------------------------------
-- Day rows folded into batch_upsert's records in Rust (src/records.rs), for
-- imports.
---------------------------------------------------------------------------

CREATE FUNCTION sales.day_records(store_ids bigint[], years integer[], months integer[],
    days integer[], sales numeric[], customers numeric[], transactions numeric[])
RETURNS jsonb IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'day_records_wrapper';

---------------------------------------------------------------------------
-- A database that installed 0.3.0 before transaction_events read the log by
-- an index condition on seq still has the body that scans the whole log.
---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION sales.transaction_events() RETURNS SETOF sales.events
LANGUAGE sql VOLATILE AS $$
    SELECT e.* FROM sales.events e
    WHERE e.seq BETWEEN (SELECT sales.transaction_first_seq()) AND (SELECT sales.transaction_last_seq())
      AND e.xid = (SELECT pg_current_xact_id_if_assigned())
    ORDER BY e.seq
$$;
