-- pg_sales 0.1.0 -> 0.2.0 (ALTER EXTENSION pg_sales UPDATE TO '0.2.0').
--
-- Runs in one transaction inside ALTER EXTENSION; every object created here
-- becomes a member of the extension. It must leave a database exactly as a
-- fresh CREATE EXTENSION pg_sales VERSION '0.2.0' would:
-- tests/tests/extension_upgrade.rs compares the two catalogs.
\echo Use "ALTER EXTENSION pg_sales UPDATE TO '0.2.0'" to load this file. \quit

---------------------------------------------------------------------------
-- Monitoring views (sql/monitoring.sql)
---------------------------------------------------------------------------

CREATE VIEW sales.index_usage AS
SELECT format('sales.%I', s.relname) AS table_name,
       format('sales.%I', s.indexrelname) AS index_name,
       am.amname::text AS method,
       s.idx_scan AS scans,
       s.idx_tup_read AS tuples_read,
       s.idx_tup_fetch AS tuples_fetched,
       pg_relation_size(s.indexrelid) AS size_bytes,
       pg_size_pretty(pg_relation_size(s.indexrelid)) AS size,
       i.indisunique AS is_unique,
       i.indisvalid AS is_valid,
       EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = s.indexrelid) AS backs_constraint,
       pg_get_indexdef(s.indexrelid) AS definition
FROM pg_stat_all_indexes s
JOIN pg_index i ON i.indexrelid = s.indexrelid
JOIN pg_class c ON c.oid = s.indexrelid
JOIN pg_am am ON am.oid = c.relam
WHERE s.schemaname = 'sales'
ORDER BY pg_relation_size(s.indexrelid) DESC, s.relname, s.indexrelname;

COMMENT ON VIEW sales.index_usage IS
    'pg_sales: scans, tuples and size of every index on the sales tables (cumulative since the last statistics reset)';

-- Dead tuples, an estimate of bloat, and when each table was last vacuumed
-- and analyzed. The bloat estimate compares the main fork with the pages the
-- live rows need (pg_stats widths + tuple header + line pointer, at the
-- table's fillfactor); it is NULL until the table has been analyzed, and
-- rough for rows whose jsonb is compressed or TOASTed.
CREATE VIEW sales.table_health AS
WITH t AS (
    SELECT s.relid, s.relname, s.n_live_tup, s.n_dead_tup, s.n_mod_since_analyze,
           s.last_vacuum, s.last_autovacuum, s.last_analyze, s.last_autoanalyze,
           s.vacuum_count, s.autovacuum_count, s.analyze_count, s.autoanalyze_count,
           c.reltuples, c.relpages,
           coalesce((SELECT substring(o FROM 'fillfactor=([0-9]+)')::int
                     FROM unnest(c.reloptions) AS o WHERE o LIKE 'fillfactor=%'), 100) AS fillfactor,
           (SELECT sum(st.avg_width) FROM pg_stats st
            WHERE st.schemaname = 'sales' AND st.tablename = s.relname) AS row_width,
           (SELECT count(*) FROM pg_stats st
            WHERE st.schemaname = 'sales' AND st.tablename = s.relname) AS stat_columns,
           (SELECT count(*) FROM pg_attribute a
            WHERE a.attrelid = s.relid AND a.attnum > 0 AND NOT a.attisdropped) AS columns
    FROM pg_stat_all_tables s
    JOIN pg_class c ON c.oid = s.relid
    WHERE s.schemaname = 'sales' AND c.relkind = 'r'
), e AS (
    SELECT t.*,
           CASE WHEN t.reltuples >= 0 AND t.stat_columns = t.columns
                -- 24 bytes of tuple header, 4 of line pointer, 24 of page header
                THEN ceil(t.reltuples * (t.row_width + 28) / ((8192 - 24) * t.fillfactor / 100.0))::bigint
           END AS expected_pages
    FROM t
)
SELECT format('sales.%I', e.relname) AS table_name,
       e.n_live_tup AS live_rows,
       e.n_dead_tup AS dead_rows,
       round(100.0 * e.n_dead_tup / nullif(e.n_live_tup + e.n_dead_tup, 0), 1) AS dead_pct,
       pg_relation_size(e.relid) AS table_bytes,
       pg_total_relation_size(e.relid) AS total_bytes,
       CASE WHEN e.expected_pages IS NOT NULL
            THEN greatest(pg_relation_size(e.relid) - e.expected_pages * 8192, 0) END AS bloat_bytes_estimate,
       CASE WHEN e.expected_pages IS NOT NULL AND pg_relation_size(e.relid) > 0
            THEN round(100.0 * greatest(pg_relation_size(e.relid) - e.expected_pages * 8192, 0)
                       / pg_relation_size(e.relid), 1) END AS bloat_pct_estimate,
       e.n_mod_since_analyze AS modified_since_analyze,
       greatest(e.last_vacuum, e.last_autovacuum) AS last_vacuum,
       greatest(e.last_analyze, e.last_autoanalyze) AS last_analyze,
       e.vacuum_count + e.autovacuum_count AS vacuums,
       e.analyze_count + e.autoanalyze_count AS analyzes
FROM e
ORDER BY e.n_dead_tup DESC, e.relname;

COMMENT ON VIEW sales.table_health IS
    'pg_sales: dead tuples, estimated bloat and last vacuum/analyze of every sales table';

-- Statement statistics of this database from pg_stat_statements, when it is
-- there. It is optional: it must be preloaded (shared_preload_libraries) and
-- created in the database. Without it this returns no rows and a NOTICE that
-- says how to enable it; it never creates the extension itself (a monitoring
-- read must not change the database, and creating it needs a superuser).
CREATE FUNCTION sales.statement_stats()
RETURNS TABLE (query_id bigint, query text, calls bigint, total_ms double precision,
               mean_ms double precision, max_ms double precision, rows bigint,
               shared_blks_hit bigint, shared_blks_read bigint, touches_sales boolean)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    nsp text;
    hint constant text := 'add shared_preload_libraries = ''pg_stat_statements'' to postgresql.conf, '
        'restart Postgres, then run CREATE EXTENSION pg_stat_statements in this database as a superuser';
BEGIN
    SELECT n.nspname INTO nsp
    FROM pg_extension x JOIN pg_namespace n ON n.oid = x.extnamespace
    WHERE x.extname = 'pg_stat_statements';
    IF nsp IS NULL THEN
        RAISE NOTICE 'no statement statistics: pg_stat_statements is not created in this database'
            USING HINT = hint;
        RETURN;
    END IF;
    BEGIN
        RETURN QUERY EXECUTE format(
            'SELECT s.queryid, s.query, s.calls, s.total_exec_time, s.mean_exec_time, s.max_exec_time,
                    s.rows, s.shared_blks_hit, s.shared_blks_read, s.query ~* %L
             FROM %I.pg_stat_statements s
             WHERE s.dbid = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())',
            '\msales\.', nsp);
    EXCEPTION WHEN object_not_in_prerequisite_state THEN
        -- created, but the library is not preloaded in this server
        RAISE NOTICE 'no statement statistics: %', SQLERRM USING HINT = hint;
    END;
END $$;

-- Slowest statements first (mean time). Empty, with a NOTICE, without
-- pg_stat_statements.
CREATE VIEW sales.slow_queries AS
SELECT q.query_id, q.query, q.calls, round(q.mean_ms::numeric, 3) AS mean_ms,
       round(q.max_ms::numeric, 3) AS max_ms, round(q.total_ms::numeric, 3) AS total_ms,
       q.rows, q.shared_blks_hit, q.shared_blks_read, q.touches_sales
FROM sales.statement_stats() q
ORDER BY q.mean_ms DESC, q.query_id;

COMMENT ON VIEW sales.slow_queries IS
    'pg_sales: statements of this database by mean time, from pg_stat_statements when it is loaded (else empty, with a NOTICE)';

---------------------------------------------------------------------------
-- Reads, summaries and exports in SQL (sql/surface.sql)
---------------------------------------------------------------------------

-- 'YYYY-MM' -> {year, month}; `arg` names the argument in the error.
CREATE FUNCTION sales.period_arg(arg text, value text) RETURNS integer[]
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE parts text[];
BEGIN
    IF value IS NULL THEN
        RETURN NULL;
    END IF;
    parts := regexp_match(btrim(value), '^([0-9]{4})-([0-9]{1,2})$');
    IF parts IS NULL OR parts[1]::int NOT BETWEEN 2000 AND 2100 OR parts[2]::int NOT BETWEEN 1 AND 12 THEN
        RAISE EXCEPTION '%: "%" is not a month like 2024-06', arg, value USING ERRCODE = '22023';
    END IF;
    RETURN ARRAY[parts[1]::int, parts[2]::int];
END $$;

-- The filters as a WHERE condition on `m` (sales.monthly_sales) and `s`
-- (sales.stores). Every argument is checked; NULL means "no filter".
CREATE FUNCTION sales.filter_sql(store_ids bigint[] DEFAULT NULL, region text DEFAULT NULL,
    year integer DEFAULT NULL, month integer DEFAULT NULL,
    from_period text DEFAULT NULL, to_period text DEFAULT NULL,
    min_total_sales numeric DEFAULT NULL, max_total_sales numeric DEFAULT NULL)
RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    w text := 'true';
    f integer[] := sales.period_arg('from_period', from_period);
    t integer[] := sales.period_arg('to_period', to_period);
BEGIN
    IF store_ids IS NOT NULL THEN
        IF array_position(store_ids, NULL) IS NOT NULL THEN
            RAISE EXCEPTION 'store_ids: NULL is not a store id' USING ERRCODE = '22023';
        END IF;
        w := w || format(' AND m.store_id = ANY(%L::bigint[])', store_ids);
    END IF;
    IF region IS NOT NULL THEN
        w := w || format(' AND s.region = %L', region);
    END IF;
    IF year IS NOT NULL THEN
        IF year NOT BETWEEN 2000 AND 2100 THEN
            RAISE EXCEPTION 'year: % is outside 2000..2100', year USING ERRCODE = '22023';
        END IF;
        w := w || format(' AND m.year = %s', year);
    END IF;
    IF month IS NOT NULL THEN
        IF month NOT BETWEEN 1 AND 12 THEN
            RAISE EXCEPTION 'month: % is not a month (1..12)', month USING ERRCODE = '22023';
        END IF;
        w := w || format(' AND m.month = %s', month);
    END IF;
    IF f IS NOT NULL THEN
        w := w || format(' AND (m.year, m.month) >= (%s, %s)', f[1], f[2]);
    END IF;
    IF t IS NOT NULL THEN
        w := w || format(' AND (m.year, m.month) <= (%s, %s)', t[1], t[2]);
    END IF;
    IF f IS NOT NULL AND t IS NOT NULL AND (f[1], f[2]) > (t[1], t[2]) THEN
        RAISE EXCEPTION 'from_period: % is after to_period (%)', from_period, to_period USING ERRCODE = '22023';
    END IF;
    IF min_total_sales IS NOT NULL THEN
        IF min_total_sales < 0 OR min_total_sales = 'NaN' THEN
            RAISE EXCEPTION 'min_total_sales: must be a non-negative number' USING ERRCODE = '22023';
        END IF;
        w := w || format(' AND m.total_sales >= %L::numeric', min_total_sales);
    END IF;
    IF max_total_sales IS NOT NULL THEN
        IF max_total_sales < 0 OR max_total_sales = 'NaN' THEN
            RAISE EXCEPTION 'max_total_sales: must be a non-negative number' USING ERRCODE = '22023';
        END IF;
        w := w || format(' AND m.total_sales <= %L::numeric', max_total_sales);
    END IF;
    RETURN w;
END $$;

-- `-period,storeId` (the API's `sort`) -> an ORDER BY list; the id is added
-- last so the order is total.
CREATE FUNCTION sales.sort_sql(sort text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    part text;
    name text;
    dir text;
    col text;
    cols text[] := '{}';
    seen text[] := '{}';
    k text;
BEGIN
    FOREACH part IN ARRAY string_to_array(coalesce(nullif(btrim(sort), ''), 'storeId,year,month'), ',') LOOP
        part := btrim(part);
        CONTINUE WHEN part = '';
        dir := CASE WHEN left(part, 1) = '-' THEN ' DESC' ELSE '' END;
        name := ltrim(part, '+-');
        -- snake_case and camelCase alike
        name := lower(replace(name, '_', ''));
        FOREACH k IN ARRAY CASE WHEN name = 'period' THEN ARRAY['year', 'month'] ELSE ARRAY[name] END LOOP
            col := CASE k
                WHEN 'id' THEN 'm.id' WHEN 'storeid' THEN 'm.store_id'
                WHEN 'year' THEN 'm.year' WHEN 'month' THEN 'm.month'
                WHEN 'totalsales' THEN 'm.total_sales' WHEN 'totalcustomers' THEN 'm.total_customers'
                WHEN 'daysreported' THEN 'm.days_reported'
                WHEN 'updatedat' THEN 'm.updated_at' WHEN 'createdat' THEN 'm.created_at' END;
            IF col IS NULL THEN
                RAISE EXCEPTION 'sort: cannot sort by "%"; allowed: period, id, storeId, year, month, totalSales, totalCustomers, daysReported, updatedAt, createdAt',
                    ltrim(part, '+-') USING ERRCODE = '22023';
            END IF;
            IF col = ANY (seen) THEN
                RAISE EXCEPTION 'sort: % given twice', k USING ERRCODE = '22023';
            END IF;
            seen := seen || col;
            cols := cols || (col || dir);
        END LOOP;
    END LOOP;
    IF NOT 'm.id' = ANY (seen) THEN
        cols := cols || 'm.id'::text;
    END IF;
    RETURN array_to_string(cols, ', ');
END $$;

-- Sales records as the API's documents (`GET /api/v2/sales`): filtered,
-- sorted, projected (`fields` / `exclude` as in sales.project; the store is
-- joined when a field asks for it), then `skip_rows` and `max_rows` (NULL: all).
CREATE FUNCTION sales.list_sales(store_ids bigint[] DEFAULT NULL, region text DEFAULT NULL,
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
    with_store := EXISTS (SELECT 1 FROM unnest(sales.check_fields(coalesce(fields, '{}'))) AS p
                          WHERE p = 'store' OR p LIKE 'store.%');
    doc := CASE WHEN with_store THEN 'sales.sales_doc(m, s)' ELSE 'sales.sales_doc(m)' END;
    IF coalesce(cardinality(fields), 0) > 0 OR coalesce(cardinality(exclude), 0) > 0 THEN
        doc := format('sales.project(%s, %L::text[], %L::text[])', doc, fields, exclude);
    END IF;
    RETURN QUERY EXECUTE format(
        'SELECT %s FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id
         WHERE %s ORDER BY %s LIMIT %s OFFSET %s',
        doc, w, o, coalesce(max_rows::text, 'ALL'), skip_rows);
END $$;

-- One record as a document (`GET /api/v2/sales/{id}`); NULL when there is none.
CREATE FUNCTION sales.get_sales(id bigint, fields text[] DEFAULT NULL, exclude text[] DEFAULT NULL)
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
    IF r IS NOT NULL AND NOT EXISTS (SELECT 1 FROM unnest(sales.check_fields(coalesce(fields, '{}'))) AS p
                                     WHERE p = 'store' OR p LIKE 'store.%') THEN
        r := r - 'store';
    END IF;
    RETURN r;
END $$;

-- Totals per store, region or month over the filtered records
-- (`GET /api/v2/sales/summary`). `key` is the store id, the region, or
-- 'YYYY-MM'; store_code and store_name only when grouping by store.
CREATE FUNCTION sales.sales_summary(group_by text DEFAULT 'store', store_ids bigint[] DEFAULT NULL, region text DEFAULT NULL,
    year integer DEFAULT NULL, month integer DEFAULT NULL,
    from_period text DEFAULT NULL, to_period text DEFAULT NULL,
    min_total_sales numeric DEFAULT NULL, max_total_sales numeric DEFAULT NULL)
RETURNS TABLE (key text, total_sales numeric, total_customers numeric, months bigint, stores bigint,
               store_code text, store_name text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    w text := sales.filter_sql(store_ids, region, year, month, from_period, to_period, min_total_sales, max_total_sales);
    k text;
    g text;
    extra text := 'NULL::text, NULL::text';
BEGIN
    CASE group_by
        WHEN 'store' THEN
            k := 'm.store_id::text'; g := 'm.store_id'; extra := 'min(s.code), min(s.name)';
        WHEN 'region' THEN
            k := 's.region'; g := 's.region';
        WHEN 'month' THEN
            k := 'format(''%s-%s'', m.year, lpad(m.month::text, 2, ''0''))'; g := 'm.year, m.month';
        ELSE
            RAISE EXCEPTION 'group_by must be store, region or month, not %', coalesce(group_by, 'NULL')
                USING ERRCODE = '22023';
    END CASE;
    RETURN QUERY EXECUTE format(
        'SELECT %s, sum(m.total_sales), sum(m.total_customers)::numeric, count(*), count(DISTINCT m.store_id), %s
         FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id
         WHERE %s GROUP BY %s ORDER BY %s',
        k, extra, w, g, g);
END $$;

-- Stores as documents (`GET /api/v2/stores`), in id order.
CREATE FUNCTION sales.list_stores(region text DEFAULT NULL, status text DEFAULT NULL,
    fields text[] DEFAULT NULL, max_rows integer DEFAULT NULL, skip_rows bigint DEFAULT 0)
RETURNS SETOF jsonb LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF status IS NOT NULL AND status NOT IN ('open', 'closed', 'renovating') THEN
        RAISE EXCEPTION 'status must be open, closed or renovating, not %', status USING ERRCODE = '22023';
    END IF;
    IF max_rows IS NOT NULL AND max_rows < 1 THEN
        RAISE EXCEPTION 'max_rows: % is not a page size; use 1 or more, or NULL for all', max_rows
            USING ERRCODE = '22023';
    END IF;
    IF skip_rows IS NULL OR skip_rows < 0 THEN
        RAISE EXCEPTION 'skip_rows: must be 0 or more' USING ERRCODE = '22023';
    END IF;
    PERFORM sales.project_store('{}'::jsonb, fields, NULL);
    RETURN QUERY
        SELECT sales.project_store(sales.store_doc(s), fields, NULL)
        FROM sales.stores s
        WHERE (list_stores.region IS NULL OR s.region = list_stores.region)
          AND (list_stores.status IS NULL OR s.status = list_stores.status)
        ORDER BY s.id
        LIMIT max_rows OFFSET skip_rows;
END $$;

-- A resume key ('12:2024-03', daily '12:2024-03-05') -> {store, year, month, day}.
CREATE FUNCTION sales.export_key_arg(after_key text, daily boolean) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE p text[];
BEGIN
    IF after_key IS NULL THEN
        RETURN NULL;
    END IF;
    p := CASE WHEN daily THEN regexp_match(after_key, '^([0-9]{1,18}):([0-9]{4})-([0-9]{2})-([0-9]{2})$')
              ELSE regexp_match(after_key, '^([0-9]{1,18}):([0-9]{4})-([0-9]{2})$') END;
    IF p IS NULL OR p[3]::int NOT BETWEEN 1 AND 12 OR (daily AND p[4]::int NOT BETWEEN 1 AND 31) THEN
        RAISE EXCEPTION 'after_key: "%" is not a % row key like %', after_key,
            CASE WHEN daily THEN 'daily' ELSE 'monthly' END,
            CASE WHEN daily THEN '12:2024-03-05' ELSE '12:2024-03' END
            USING ERRCODE = '22023';
    END IF;
    RETURN ARRAY[p[1]::bigint, p[2]::bigint, p[3]::bigint, coalesce(p[4]::bigint, 0)];
END $$;

-- The row of sales.export_monthly (a type, not RETURNS TABLE: its region,
-- year and month columns share their names with filter arguments).
CREATE TYPE sales.export_monthly_row AS (key text, store_id bigint, store_code text, store_name text, region text,
    year integer, month integer, total_sales numeric, total_customers bigint, days_reported integer,
    d1_sales text, d1_customers text,
    d2_sales text, d2_customers text,
    d3_sales text, d3_customers text,
    d4_sales text, d4_customers text,
    d5_sales text, d5_customers text,
    d6_sales text, d6_customers text,
    d7_sales text, d7_customers text,
    d8_sales text, d8_customers text,
    d9_sales text, d9_customers text,
    d10_sales text, d10_customers text,
    d11_sales text, d11_customers text,
    d12_sales text, d12_customers text,
    d13_sales text, d13_customers text,
    d14_sales text, d14_customers text,
    d15_sales text, d15_customers text,
    d16_sales text, d16_customers text,
    d17_sales text, d17_customers text,
    d18_sales text, d18_customers text,
    d19_sales text, d19_customers text,
    d20_sales text, d20_customers text,
    d21_sales text, d21_customers text,
    d22_sales text, d22_customers text,
    d23_sales text, d23_customers text,
    d24_sales text, d24_customers text,
    d25_sales text, d25_customers text,
    d26_sales text, d26_customers text,
    d27_sales text, d27_customers text,
    d28_sales text, d28_customers text,
    d29_sales text, d29_customers text,
    d30_sales text, d30_customers text,
    d31_sales text, d31_customers text);

-- One row per store-month in key order, the columns of the API's monthly CSV
-- export (`GET /api/v2/sales/export?shape=monthly&format=csv`): key,
-- store, totals, then d1_sales, d1_customers .. d31_sales, d31_customers
-- (NULL where a day is not reported). `after_key` resumes after a row.
--   COPY (SELECT * FROM sales.export_monthly(from_period => '2024-01')) TO STDOUT WITH (FORMAT csv, HEADER);
CREATE FUNCTION sales.export_monthly(store_ids bigint[] DEFAULT NULL, region text DEFAULT NULL,
    year integer DEFAULT NULL, month integer DEFAULT NULL,
    from_period text DEFAULT NULL, to_period text DEFAULT NULL,
    min_total_sales numeric DEFAULT NULL, max_total_sales numeric DEFAULT NULL, after_key text DEFAULT NULL)
RETURNS SETOF sales.export_monthly_row
LANGUAGE plpgsql STABLE AS $$
DECLARE
    w text := sales.filter_sql(store_ids, region, year, month, from_period, to_period, min_total_sales, max_total_sales);
    a bigint[] := sales.export_key_arg(after_key, false);
BEGIN
    IF a IS NOT NULL THEN
        w := w || format(' AND (m.store_id, m.year, m.month) > (%s, %s, %s)', a[1], a[2], a[3]);
    END IF;
    RETURN QUERY EXECUTE format(
        $q$SELECT m.store_id || ':' || m.year || '-' || lpad(m.month::text, 2, '0'),
               m.store_id, s.code, s.name, s.region, m.year, m.month,
               m.total_sales, m.total_customers, m.days_reported,
               m.daily_data->'1'->>'sales', m.daily_data->'1'->>'customers',
               m.daily_data->'2'->>'sales', m.daily_data->'2'->>'customers',
               m.daily_data->'3'->>'sales', m.daily_data->'3'->>'customers',
               m.daily_data->'4'->>'sales', m.daily_data->'4'->>'customers',
               m.daily_data->'5'->>'sales', m.daily_data->'5'->>'customers',
               m.daily_data->'6'->>'sales', m.daily_data->'6'->>'customers',
               m.daily_data->'7'->>'sales', m.daily_data->'7'->>'customers',
               m.daily_data->'8'->>'sales', m.daily_data->'8'->>'customers',
               m.daily_data->'9'->>'sales', m.daily_data->'9'->>'customers',
               m.daily_data->'10'->>'sales', m.daily_data->'10'->>'customers',
               m.daily_data->'11'->>'sales', m.daily_data->'11'->>'customers',
               m.daily_data->'12'->>'sales', m.daily_data->'12'->>'customers',
               m.daily_data->'13'->>'sales', m.daily_data->'13'->>'customers',
               m.daily_data->'14'->>'sales', m.daily_data->'14'->>'customers',
               m.daily_data->'15'->>'sales', m.daily_data->'15'->>'customers',
               m.daily_data->'16'->>'sales', m.daily_data->'16'->>'customers',
               m.daily_data->'17'->>'sales', m.daily_data->'17'->>'customers',
               m.daily_data->'18'->>'sales', m.daily_data->'18'->>'customers',
               m.daily_data->'19'->>'sales', m.daily_data->'19'->>'customers',
               m.daily_data->'20'->>'sales', m.daily_data->'20'->>'customers',
               m.daily_data->'21'->>'sales', m.daily_data->'21'->>'customers',
               m.daily_data->'22'->>'sales', m.daily_data->'22'->>'customers',
               m.daily_data->'23'->>'sales', m.daily_data->'23'->>'customers',
               m.daily_data->'24'->>'sales', m.daily_data->'24'->>'customers',
               m.daily_data->'25'->>'sales', m.daily_data->'25'->>'customers',
               m.daily_data->'26'->>'sales', m.daily_data->'26'->>'customers',
               m.daily_data->'27'->>'sales', m.daily_data->'27'->>'customers',
               m.daily_data->'28'->>'sales', m.daily_data->'28'->>'customers',
               m.daily_data->'29'->>'sales', m.daily_data->'29'->>'customers',
               m.daily_data->'30'->>'sales', m.daily_data->'30'->>'customers',
               m.daily_data->'31'->>'sales', m.daily_data->'31'->>'customers'
        FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id
        WHERE %s ORDER BY m.store_id, m.year, m.month$q$, w);
END $$;

-- One row per reported store-day in key order, the columns of the API's
-- daily CSV export (`shape=daily`): key, store, date, sales, customers,
-- transactions (as the JSON holds them). `after_key` resumes after a row.
CREATE FUNCTION sales.export_daily(store_ids bigint[] DEFAULT NULL, region text DEFAULT NULL,
    year integer DEFAULT NULL, month integer DEFAULT NULL,
    from_period text DEFAULT NULL, to_period text DEFAULT NULL,
    min_total_sales numeric DEFAULT NULL, max_total_sales numeric DEFAULT NULL, after_key text DEFAULT NULL)
RETURNS TABLE (key text, store_id bigint, store_code text, store_name text, date text,
               sales text, customers text, transactions text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    w text := sales.filter_sql(store_ids, region, year, month, from_period, to_period, min_total_sales, max_total_sales);
    a bigint[] := sales.export_key_arg(after_key, true);
BEGIN
    IF a IS NOT NULL THEN
        w := w || format(' AND (m.store_id, m.year, m.month) >= (%s, %s, %s)
                           AND ((m.store_id, m.year, m.month) > (%s, %s, %s) OR e.k::int > %s)',
                         a[1], a[2], a[3], a[1], a[2], a[3], a[4]);
    END IF;
    RETURN QUERY EXECUTE format(
        $q$SELECT m.store_id || ':' || m.year || '-' || lpad(m.month::text, 2, '0') || '-' || lpad(e.k, 2, '0'),
               m.store_id, s.code, s.name,
               m.year || '-' || lpad(m.month::text, 2, '0') || '-' || lpad(e.k, 2, '0'),
               e.v->>'sales', e.v->>'customers', e.v->>'transactions'
        FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id
             CROSS JOIN LATERAL jsonb_each(m.daily_data) AS e(k, v)
        WHERE %s ORDER BY m.store_id, m.year, m.month, e.k::int$q$, w);
END $$;

---------------------------------------------------------------------------
-- Event delivery in commit-safe order from a shared-memory clock (see
-- docs/events.md): events get `seq`, readers deliver in seq order below the
-- horizon of running event-writing transactions, the NOTIFY moves from a
-- deferred trigger to the extension's pre-commit callback. Needs
-- shared_preload_libraries = 'pg_sales'.

CREATE FUNCTION sales.delivery_ready() RETURNS bool /* bool */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'delivery_ready_wrapper';

CREATE FUNCTION sales.event_seq() RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'event_seq_wrapper';

CREATE FUNCTION sales.events_generation() RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'events_generation_wrapper';

CREATE FUNCTION sales.events_wait(
	"known" bigint, /* i64 */
	"wait_ms" INT /* i32 */
) RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'events_wait_wrapper';

CREATE FUNCTION sales.transaction_first_seq() RETURNS bigint /* Option < i64 > */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'transaction_first_seq_wrapper';

CREATE FUNCTION sales.transaction_last_seq() RETURNS bigint /* Option < i64 > */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'transaction_last_seq_wrapper';

CREATE FUNCTION sales.event_holders_raw() RETURNS TABLE (
	"pid" INT,  /* i32 */
	"xid" bigint,  /* i64 */
	"first_seq" bigint,  /* i64 */
	"since_us" bigint  /* i64 */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'event_holders_raw_wrapper';


DO $$
BEGIN
    IF NOT sales.delivery_ready() THEN
        RAISE EXCEPTION 'pg_sales must be loaded at server start'
            USING ERRCODE = '55000',
                  HINT = 'add pg_sales to shared_preload_libraries in postgresql.conf and restart Postgres';
    END IF;
END $$;

-- The delivery position of existing events follows their old delivery
-- order (xid, id); new events continue from the largest value.
ALTER TABLE sales.events ADD COLUMN seq bigint;
UPDATE sales.events e SET seq = o.n
FROM (SELECT id, row_number() OVER (ORDER BY xid, id) AS n FROM sales.events) o
WHERE o.id = e.id;
ALTER TABLE sales.events ALTER COLUMN seq SET NOT NULL;
ALTER TABLE sales.events ALTER COLUMN seq SET DEFAULT sales.event_seq();
CREATE UNIQUE INDEX events_seq_idx ON sales.events (seq);
COMMENT ON INDEX sales.events_seq_idx IS 'pg_sales: required by events_since, events_head and the NOTIFY trigger';
DROP TRIGGER events_wake ON sales.events;
DROP FUNCTION sales.tg_events_wake();
DROP INDEX sales.events_xid_id_idx;
-- prune_events walks the seq index; the BRIN index cost every event a summary update.
DROP INDEX sales.events_created_at_idx;
ALTER TABLE sales.events DROP COLUMN wakes;
-- events_horizon() returned xid8; it is now the seq bound (Rust).
DROP FUNCTION sales.events_horizon();

CREATE FUNCTION sales.events_horizon() RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'events_horizon_wrapper';

DROP TRIGGER monthly_sales_events_ins ON sales.monthly_sales;
DROP TRIGGER monthly_sales_events_upd ON sales.monthly_sales;
DROP FUNCTION sales.tg_sales_inserted();
DROP FUNCTION sales.tg_sales_updated();
-- Inserts and updates make their events in a row-level trigger: a plpgsql
-- statement that reads a statement trigger's transition tables is planned
-- again on every call, and INSERT ... ON CONFLICT DO UPDATE fires both the
-- INSERT and the UPDATE statement triggers; together that was about 35 µs of
-- CPU on every small commit. Here the INSERT's plan is cached, and an upsert
-- that updates fires the UPDATE row trigger only. (A batch pays one trigger
-- call per row instead: a few per cent of batch_upsert's cost per row.)
-- Events follow the order the statement wrote the rows (batch_upsert writes
-- in (store, year, month) order).
CREATE FUNCTION sales.tg_sales_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO sales.events (kind, store_id, actor_id, row_id, row_version, payload)
        VALUES ('sales-data-created', NEW.store_id, sales.current_actor(), NEW.id, NEW.version,
                jsonb_build_object('id', NEW.id, 'storeId', NEW.store_id, 'year', NEW.year, 'month', NEW.month,
                                   'version', NEW.version, 'totalSales', NEW.total_sales,
                                   'totalCustomers', NEW.total_customers, 'daysReported', NEW.days_reported,
                                   'changedDays', sales.changed_days(NULL, NEW.daily_data)));
    -- unchanged rows (a no-op UPDATE, see tg_sales_version) make no event
    ELSIF NEW.version <> OLD.version THEN
        INSERT INTO sales.events (kind, store_id, actor_id, row_id, row_version, payload)
        VALUES ('sales-data-updated', NEW.store_id, sales.current_actor(), NEW.id, NEW.version,
                jsonb_build_object('id', NEW.id, 'storeId', NEW.store_id, 'year', NEW.year, 'month', NEW.month,
                                   'version', NEW.version, 'totalSales', NEW.total_sales,
                                   'totalCustomers', NEW.total_customers, 'daysReported', NEW.days_reported,
                                   'changedDays', sales.changed_days(OLD.daily_data, NEW.daily_data))
                || CASE WHEN OLD.store_id <> NEW.store_id
                        THEN jsonb_build_object('previousStoreId', OLD.store_id) ELSE '{}'::jsonb END
                || CASE WHEN (OLD.year, OLD.month) <> (NEW.year, NEW.month)
                        THEN jsonb_build_object('previousYear', OLD.year, 'previousMonth', OLD.month)
                        ELSE '{}'::jsonb END);
    END IF;
    RETURN NULL;
END $$;

-- Deletes stay statement-level (one INSERT ... SELECT per statement).
CREATE TRIGGER monthly_sales_events AFTER INSERT OR UPDATE ON sales.monthly_sales
    FOR EACH ROW EXECUTE FUNCTION sales.tg_sales_changed();

CREATE OR REPLACE FUNCTION sales.tg_sales_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sales.events (kind, store_id, actor_id, row_id, row_version, payload)
    SELECT 'sales-data-deleted', o.store_id, sales.current_actor(), o.id, o.version + 1,
           jsonb_build_object('id', o.id, 'storeId', o.store_id, 'year', o.year, 'month', o.month,
                              'version', o.version + 1)
    FROM old_rows o;
    RETURN NULL;
END $$;


CREATE OR REPLACE FUNCTION sales.tg_stores_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO sales.events (kind, store_id, actor_id, row_id, row_version, payload)
        SELECT 'store-created', n.id, sales.current_actor(), n.id, n.version, sales.store_doc(n)
            FROM new_rows n ORDER BY n.id;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO sales.events (kind, store_id, actor_id, row_id, row_version, payload)
        SELECT CASE WHEN n.status <> o.status THEN 'store-status-changed' ELSE 'store-updated' END,
               n.id, sales.current_actor(), n.id, n.version,
               sales.store_doc(n) || jsonb_build_object('previousStatus', o.status)
            FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.version <> o.version ORDER BY n.id;
    ELSE
        INSERT INTO sales.events (kind, store_id, actor_id, row_id, row_version, payload)
        SELECT 'store-deleted', o.id, sales.current_actor(), o.id, o.version + 1,
               jsonb_build_object('id', o.id, 'code', o.code, 'version', o.version + 1)
            FROM old_rows o ORDER BY o.id;
    END IF;
    RETURN NULL;
END $$;


CREATE OR REPLACE FUNCTION sales.emit(kind text, payload jsonb, store_id bigint DEFAULT NULL, user_id bigint DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE new_id bigint;
BEGIN
    IF kind IS NULL OR length(btrim(kind)) = 0 THEN
        RAISE EXCEPTION 'event kind must not be empty' USING ERRCODE = '22023';
    END IF;
    INSERT INTO sales.events (kind, store_id, user_id, actor_id, payload)
    VALUES (kind, store_id, user_id, sales.current_actor(), coalesce(payload, '{}'))
    RETURNING id INTO new_id;
    RETURN new_id;
END $$;


CREATE FUNCTION sales.transaction_events() RETURNS SETOF sales.events
LANGUAGE sql VOLATILE AS $$
    SELECT e.* FROM sales.events e
    WHERE e.seq BETWEEN sales.transaction_first_seq() AND sales.transaction_last_seq()
      AND e.xid = pg_current_xact_id_if_assigned()
    ORDER BY e.seq
$$;


CREATE FUNCTION sales.event_position(event_id bigint) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE pos bigint;
BEGIN
    IF event_id IS NULL OR event_id < 0 THEN
        RAISE EXCEPTION 'after_id must be 0 or an event id' USING ERRCODE = '22023';
    END IF;
    IF event_id = 0 THEN
        RETURN 0;
    END IF;
    SELECT e.seq INTO pos FROM sales.events e WHERE e.id = event_id;
    IF pos IS NULL THEN
        RAISE EXCEPTION 'event % is unknown or no longer retained; resync required', event_id
            USING ERRCODE = 'PS410';
    END IF;
    RETURN pos;
END $$;


CREATE FUNCTION sales.events_after_seq(after_seq bigint, max_rows integer DEFAULT 1000, wait_ms integer DEFAULT 0)
RETURNS SETOF sales.events LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    g bigint;
    h bigint;
    deadline timestamptz;
BEGIN
    IF after_seq IS NULL OR after_seq < 0 THEN
        RAISE EXCEPTION 'after_seq must be 0 or a delivery position' USING ERRCODE = '22023';
    END IF;
    IF max_rows IS NULL OR max_rows < 1 OR max_rows > 100000 THEN
        RAISE EXCEPTION 'max_rows must be between 1 and 100000' USING ERRCODE = '22023';
    END IF;
    IF wait_ms IS NULL OR wait_ms < 0 OR wait_ms > 600000 THEN
        RAISE EXCEPTION 'wait_ms must be between 0 and 600000' USING ERRCODE = '22023';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'reading the event log needs READ COMMITTED, not %', current_setting('transaction_isolation')
            USING ERRCODE = '25000';
    END IF;
    deadline := clock_timestamp() + make_interval(secs => wait_ms / 1000.0);
    LOOP
        g := sales.events_generation();
        h := sales.events_horizon();
        RETURN QUERY
            SELECT e.* FROM sales.events e
            WHERE e.seq > after_seq AND e.seq < h
            ORDER BY e.seq
            LIMIT max_rows;
        IF FOUND OR clock_timestamp() >= deadline THEN
            RETURN;
        END IF;
        PERFORM sales.events_wait(g, greatest(1, ceil(extract(epoch FROM deadline - clock_timestamp()) * 1000))::int);
    END LOOP;
END $$;


CREATE FUNCTION sales.events_next(after_id bigint, max_rows integer DEFAULT 1000, wait_ms integer DEFAULT 0)
RETURNS SETOF sales.events LANGUAGE sql VOLATILE AS $$
    SELECT * FROM sales.events_after_seq(sales.event_position(after_id), max_rows, wait_ms)
$$;


CREATE OR REPLACE FUNCTION sales.events_since(after_id bigint, max_rows integer DEFAULT 1000)
RETURNS SETOF sales.events LANGUAGE sql VOLATILE AS $$
    SELECT * FROM sales.events_after_seq(sales.event_position(after_id), max_rows, 0)
$$;


CREATE OR REPLACE FUNCTION sales.events_head() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE h bigint := sales.events_horizon();
BEGIN
    RETURN coalesce((SELECT e.id FROM sales.events e WHERE e.seq < h ORDER BY e.seq DESC LIMIT 1), 0);
END $$;


CREATE FUNCTION sales.event_holders()
RETURNS TABLE (pid integer, xid xid8, first_seq bigint, since timestamptz, held_for interval,
               query_start timestamptz, state text, query text)
LANGUAGE sql VOLATILE AS $$
    SELECT h.pid, (h.xid::text)::xid8, h.first_seq,
           timestamptz '2000-01-01 00:00:00+00' + h.since_us * interval '1 microsecond',
           clock_timestamp() - (timestamptz '2000-01-01 00:00:00+00' + h.since_us * interval '1 microsecond'),
           a.query_start, a.state, a.query
    FROM sales.event_holders_raw() h
    LEFT JOIN pg_stat_activity a ON a.pid = h.pid
    ORDER BY h.first_seq
$$;


CREATE VIEW sales.event_delivery AS
    SELECT d.head_id,
           d.horizon,
           (SELECT max(e.id) FROM sales.events e) AS newest_id,
           (SELECT count(*) FROM sales.events e WHERE e.seq >= d.horizon) AS held_back,
           (SELECT e.id FROM sales.events e WHERE e.seq >= d.horizon ORDER BY e.seq LIMIT 1) AS oldest_held_id,
           h.pid AS holder_pid,
           h.since AS holder_since,
           h.held_for AS holder_held_for,
           h.query_start AS holder_query_start,
           h.state AS holder_state,
           h.query AS holder_query
    FROM (SELECT sales.events_horizon() AS horizon, sales.events_head() AS head_id) d
    LEFT JOIN LATERAL (SELECT * FROM sales.event_holders() LIMIT 1) h ON true;


CREATE OR REPLACE FUNCTION sales.prune_events(retention interval DEFAULT '7 days') RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
    horizon bigint;
    last_seq bigint;
    keep_from bigint;
BEGIN
    IF retention IS NULL OR retention < interval '0' THEN
        RAISE EXCEPTION 'retention must be a non-negative interval' USING ERRCODE = '22023';
    END IF;
    horizon := sales.events_horizon();
    SELECT e.seq INTO last_seq FROM sales.events e WHERE e.seq < horizon ORDER BY e.seq DESC LIMIT 1;
    IF last_seq IS NULL THEN
        RETURN 0;
    END IF;
    SELECT e.seq INTO keep_from FROM sales.events e
    WHERE e.created_at >= now() - retention AND e.seq <= last_seq
    ORDER BY e.seq LIMIT 1;
    DELETE FROM sales.events e WHERE e.seq < least(coalesce(keep_from, last_seq), last_seq);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;


-- index_report names the event log's new required index in a comment.
CREATE OR REPLACE FUNCTION sales.index_report(min_unused_bytes bigint DEFAULT 1048576, min_bloat_bytes bigint DEFAULT 8388608)
RETURNS TABLE (index_name text, table_name text, size_bytes bigint, reason text, detail text, fix text)
LANGUAGE sql STABLE AS $$
WITH idx AS (
    SELECT i.indexrelid, i.indrelid, c.relname::text AS iname, t.relname::text AS tname,
           i.indisvalid AS valid, i.indisunique AS uniq,
           i.indkey::text AS keys,
           coalesce(pg_get_expr(i.indexprs, i.indrelid), '') AS exprs,
           coalesce(pg_get_expr(i.indpred, i.indrelid), '') AS pred,
           -- Everything that makes two indexes interchangeable. DESC / NULLS
           -- FIRST (indoption) and INCLUDE columns (indnkeyatts) matter:
           -- (a, b DESC) is not a twin of (a, b), nor (a) INCLUDE (b) of (a, b).
           concat_ws('|', am.amname, i.indkey::text, i.indnkeyatts, i.indclass::text, i.indcollation::text,
                     i.indoption::text, i.indnullsnotdistinct,
                     coalesce(pg_get_expr(i.indexprs, i.indrelid), ''),
                     coalesce(pg_get_expr(i.indpred, i.indrelid), '')) AS def,
           pg_relation_size(i.indexrelid) AS size, c.relpages, t.reltuples,
           coalesce(s.idx_scan, 0) AS scans, am.amname,
           EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid) AS backs_constraint,
           NOT i.indisvalid AND c.relname ~ '_cc(new|old)[0-9]*$' AS leftover,
           -- Marked as part of the design (COMMENT ON INDEX ... IS 'pg_sales: required ...'):
           -- e.g. events_since needs events_seq_idx however rarely it runs.
           -- Never proposed for dropping; kept first among twins.
           coalesce(obj_description(i.indexrelid, 'pg_class') LIKE 'pg_sales: required%', false) AS required
    FROM pg_index i
    JOIN pg_class c ON c.oid = i.indexrelid
    JOIN pg_class t ON t.oid = i.indrelid
    JOIN pg_namespace n ON n.oid = t.relnamespace
    JOIN pg_am am ON am.oid = c.relam
    LEFT JOIN pg_stat_all_indexes s ON s.indexrelid = i.indexrelid
    WHERE n.nspname = 'sales'
), ranked AS (
    SELECT idx.*,
           row_number() OVER (PARTITION BY indrelid, def, valid
                              ORDER BY backs_constraint DESC, required DESC, uniq DESC, indexrelid) AS rank_in_twins,
           first_value(iname) OVER (PARTITION BY indrelid, def, valid
                                    ORDER BY backs_constraint DESC, required DESC, uniq DESC, indexrelid) AS keeper
    FROM idx
), widths AS (
    SELECT idx.indexrelid,
           sum(st.avg_width) AS key_width,
           count(st.avg_width) = count(*) AS all_known
    FROM idx
    CROSS JOIN LATERAL unnest(string_to_array(idx.keys, ' ')::int2[]) AS k(attnum)
    LEFT JOIN pg_attribute a ON a.attrelid = idx.indrelid AND a.attnum = k.attnum
    LEFT JOIN pg_stats st ON st.schemaname = 'sales' AND st.tablename = idx.tname AND st.attname = a.attname
    GROUP BY idx.indexrelid
)
SELECT format('sales.%I', r.iname), format('sales.%I', r.tname), r.size, 'invalid',
       CASE WHEN r.leftover THEN 'unusable: left behind by a REINDEX ... CONCURRENTLY that failed'
            WHEN v.iname IS NOT NULL THEN format('unusable; a valid twin exists (sales.%I)', v.iname)
            WHEN r.uniq THEN 'unusable: a concurrent build or reindex did not finish (a unique index '
                             'rebuilds only once the duplicate keys are gone)'
            ELSE 'unusable: a concurrent build or reindex did not finish' END,
       -- A REINDEX leftover (<name>_ccnew / _ccold) is dropped, never rebuilt:
       -- rebuilding it would only leave another copy behind.
       CASE WHEN (r.leftover OR v.iname IS NOT NULL) AND NOT r.required
            THEN format('DROP INDEX CONCURRENTLY sales.%I', r.iname)
            ELSE format('REINDEX INDEX CONCURRENTLY sales.%I', r.iname) END
FROM ranked r
LEFT JOIN LATERAL (SELECT o.iname FROM idx o
                   WHERE o.valid AND o.indrelid = r.indrelid AND o.def = r.def LIMIT 1) v ON true
WHERE NOT r.valid
UNION ALL
SELECT format('sales.%I', r.iname), format('sales.%I', r.tname), r.size, 'duplicate',
       format('same definition as sales.%I, which is kept', r.keeper),
       format('DROP INDEX CONCURRENTLY sales.%I', r.iname)
FROM ranked r
WHERE r.valid AND r.rank_in_twins > 1 AND NOT r.backs_constraint AND NOT r.required
UNION ALL
SELECT format('sales.%I', r.iname), format('sales.%I', r.tname), r.size, 'unused',
       'no scans since statistics were last reset',
       format('DROP INDEX CONCURRENTLY sales.%I', r.iname)
FROM ranked r
WHERE r.valid AND r.rank_in_twins = 1 AND r.scans = 0 AND NOT r.backs_constraint AND NOT r.uniq AND NOT r.required
  AND r.size >= min_unused_bytes
UNION ALL
SELECT format('sales.%I', r.iname), format('sales.%I', r.tname), r.size, 'bloated',
       format('%s bytes where about %s would do', r.size,
              ((ceil(r.reltuples * (w.key_width + 16) / (8192 * 0.9)) + 1) * 8192)::bigint),
       format('REINDEX INDEX CONCURRENTLY sales.%I', r.iname)
FROM ranked r JOIN widths w USING (indexrelid)
WHERE r.valid AND r.amname = 'btree' AND r.exprs = '' AND w.all_known AND r.reltuples > 0
  AND r.size >= min_bloat_bytes
  AND r.relpages > 2 * (ceil(r.reltuples * (w.key_width + 16) / (8192 * 0.9)) + 1)
ORDER BY 4, 1
$$;
