-- pg_sales 0.5.0 -> 0.6.0 (ALTER EXTENSION pg_sales UPDATE TO '0.6.0').
--
-- Runs in one transaction inside ALTER EXTENSION; every object created here
-- becomes a member of the extension. It must leave a database exactly as a
-- fresh CREATE EXTENSION pg_sales VERSION '0.6.0' would:
-- tests/tests/extension_upgrade.rs compares the two catalogs.
\echo Use "ALTER EXTENSION pg_sales UPDATE TO '0.6.0'" to load this file. \quit

---------------------------------------------------------------------------
-- Event payloads compressed with lz4 instead of pglz (as daily_data already
-- is): a month rewritten day by day makes an event of about 2 KB, which
-- Postgres compresses on insert. Payloads already stored keep pglz (both
-- read the same); nothing is rewritten. A server built without lz4 keeps
-- pglz.
---------------------------------------------------------------------------

DO $$
BEGIN
    ALTER TABLE sales.events ALTER COLUMN payload SET COMPRESSION lz4;
    ALTER TABLE sales.event_history ALTER COLUMN payload SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    NULL;
END $$;

---------------------------------------------------------------------------
-- sales.daily_merge(old, new): old || new for months, written straight in
-- jsonb's binary form (src/jsonb.rs, merge_objects). batch_upsert's merge
-- mode uses it once this version is installed.
---------------------------------------------------------------------------

CREATE FUNCTION sales."daily_merge"(
	"old" jsonb, /* RawJsonb */
	"new" jsonb /* RawJsonb */
) RETURNS jsonb /* pg_sales::jsonb::JsonbDatum */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'daily_merge_wrapper';

---------------------------------------------------------------------------
-- sales.parse_json(doc): doc::jsonb written straight in jsonb's binary form
-- (src/jsonb_text.rs); the API hands batches to batch_upsert_impl with it.
---------------------------------------------------------------------------

CREATE FUNCTION sales."parse_json"(
	"doc" TEXT /* &str */
) RETURNS jsonb /* JsonbDatum */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'parse_json_wrapper';
