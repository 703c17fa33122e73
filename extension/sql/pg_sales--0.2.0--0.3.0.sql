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


---------------------------------------------------------------------------
-- The SQL surface's filter and "needs the stores join" rules come from the
-- Rust rules the server uses (src/surface.rs); period_arg goes with the
-- plpgsql filter_sql.
---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION sales.filter_sql(store_ids bigint[] DEFAULT NULL, region text DEFAULT NULL,
    year integer DEFAULT NULL, month integer DEFAULT NULL,
    from_period text DEFAULT NULL, to_period text DEFAULT NULL,
    min_total_sales numeric DEFAULT NULL, max_total_sales numeric DEFAULT NULL)
RETURNS text IMMUTABLE PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'filter_sql_wrapper';

DROP FUNCTION sales.period_arg(text, text);

CREATE FUNCTION sales.needs_store(fields text[] DEFAULT NULL) RETURNS bool
IMMUTABLE PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'needs_store_wrapper';

CREATE OR REPLACE FUNCTION sales.list_sales(store_ids bigint[] DEFAULT NULL, region text DEFAULT NULL,
    year integer DEFAULT NULL, month integer DEFAULT NULL,
    from_period text DEFAULT NULL, to_period text DEFAULT NULL,
    min_total_sales numeric DEFAULT NULL, max_total_sales numeric DEFAULT NULL,
    fields text[] DEFAULT NULL, exclude text[] DEFAULT NULL,
    sort text DEFAULT 'storeId,year,month', max_rows integer DEFAULT 50, skip_rows bigint DEFAULT 0)
RETURNS SETOF jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    w text := sales.filter_sql(store_ids, region, year, month, from_period, to_period, min_total_sales, max_total_sales);
    o text := sales.sort_sql(sort);
    with_store boolean;
    doc text;
BEGIN
    IF max_rows IS NOT NULL AND max_rows < 1 THEN
        RAISE EXCEPTION 'max_rows: % is not a page size; use 1 or more, or NULL for all', max_rows
            USING ERRCODE = '22023';
    END IF;
    IF skip_rows IS NULL OR skip_rows < 0 THEN
        RAISE EXCEPTION 'skip_rows: must be 0 or more' USING ERRCODE = '22023';
    END IF;
    -- Checks the paths now, even when no row matches.
    PERFORM sales.project('{}'::jsonb, fields, exclude);
    with_store := sales.needs_store(fields);
    doc := CASE WHEN with_store THEN 'sales.sales_doc(m, s)' ELSE 'sales.sales_doc(m)' END;
    IF coalesce(cardinality(fields), 0) > 0 OR coalesce(cardinality(exclude), 0) > 0 THEN
        doc := format('sales.project(%s, %L::text[], %L::text[])', doc, fields, exclude);
    END IF;
    RETURN QUERY EXECUTE format(
        'SELECT %s FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id
         WHERE %s ORDER BY %s LIMIT %s OFFSET %s',
        doc, w, o, coalesce(max_rows::text, 'ALL'), skip_rows);
END $$;

CREATE OR REPLACE FUNCTION sales.get_sales(id bigint, fields text[] DEFAULT NULL, exclude text[] DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE r jsonb;
BEGIN
    IF id IS NULL THEN
        RAISE EXCEPTION 'id must not be NULL' USING ERRCODE = '22023';
    END IF;
    PERFORM sales.project('{}'::jsonb, fields, exclude);
    SELECT sales.project(sales.sales_doc(m, s), fields, exclude) INTO r
    FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id
    WHERE m.id = get_sales.id;
    IF r IS NOT NULL AND NOT sales.needs_store(fields) THEN
        r := r - 'store';
    END IF;
    RETURN r;
END $$;
