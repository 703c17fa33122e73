-- pg_sales schema, 4 of 4: batch writes (the SQL face of src/upsert.rs),
-- last of all the extension's SQL (finalize). The wrappers run with
-- `search_path = pg_catalog, pg_temp` (see surface.sql), and so do the
-- statements the Rust functions run under them.

---------------------------------------------------------------------------
-- Batch entry points: the Rust functions validate and write; these wrappers
-- turn a rejected atomic batch into an error with SQLSTATE PS422 and the
-- per-record report as JSON in DETAIL.
---------------------------------------------------------------------------

-- mode: 'merge' (days in the record replace those days, others stay) or
-- 'replace' (the record's daily data replaces the month's). atomic: all or
-- nothing (PS422 with the report) or best effort (valid records are written,
-- the rest reported). allowed_stores: the caller's store scope (NULL = any).
CREATE FUNCTION sales.batch_upsert(records jsonb, mode text DEFAULT 'merge', atomic boolean DEFAULT true,
                                   allowed_stores bigint[] DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE result jsonb;
BEGIN
    IF mode IS NULL OR mode NOT IN ('merge', 'replace') THEN
        RAISE EXCEPTION 'mode must be merge or replace, not %', coalesce(mode, 'NULL') USING ERRCODE = '22023';
    END IF;
    result := sales.batch_upsert_impl(records, mode = 'replace', coalesce(atomic, true), allowed_stores);
    IF coalesce(atomic, true) AND (result ->> 'failed')::int > 0 THEN
        RAISE EXCEPTION 'batch rejected: % of % records are invalid; nothing was written',
            result ->> 'failed', result ->> 'total'
            USING ERRCODE = 'PS422', DETAIL = result::text;
    END IF;
    RETURN result;
END $$;

CREATE FUNCTION sales.batch_delete(ids bigint[] DEFAULT NULL, keys jsonb DEFAULT NULL, atomic boolean DEFAULT true,
                                   allowed_stores bigint[] DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE result jsonb;
BEGIN
    result := sales.batch_delete_impl(ids, keys, coalesce(atomic, true), allowed_stores);
    IF coalesce(atomic, true) AND (result ->> 'failed')::int > 0 THEN
        RAISE EXCEPTION 'batch delete rejected: % of % items are invalid; nothing was deleted',
            result ->> 'failed', result ->> 'total'
            USING ERRCODE = 'PS422', DETAIL = result::text;
    END IF;
    RETURN result;
END $$;
