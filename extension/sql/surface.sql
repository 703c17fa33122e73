-- The SQL form of what the HTTP API reads: filtered, sorted, projected
-- lists; summaries; one record; stores; and exports shaped exactly like the
-- HTTP CSV exports, for `COPY (SELECT * FROM sales.export_monthly(...)) TO ...`.
-- Writes already have their SQL form (sales.batch_upsert, sales.batch_delete,
-- plain INSERT/UPDATE/DELETE on sales.stores, which make the same events).
--
-- The filters mean what the API's query parameters mean (server/src/http/
-- filters.rs) and raise 22023 naming the argument, as the API answers 400
-- naming the parameter. There is no caller scope here: a SQL user's reach is
-- what Postgres grants them (the API adds the token's stores itself).
--
-- All plpgsql: this file may load before tables.sql (see lib.rs), and
-- plpgsql bodies are not resolved until they run. The results are built by
-- EXECUTE from sales.filter_sql(), which turns filters into SQL (values as
-- literals, so a prepared or COPY statement can carry them) by the same
-- rules as the server.
--
-- Every function here runs with `search_path = pg_catalog, pg_temp` and
-- names the extension's objects with their schema, and so does the SQL it
-- runs with EXECUTE: in the caller's search path, a function or operator of
-- another schema taking the exact argument types (`cardinality(text[])`,
-- `text[] || text`) would be chosen over a polymorphic or "any" built-in,
-- even with pg_catalog searched first, and run with the caller's rights.
-- The extension's other SQL and PL/pgSQL functions do the same, except
-- those inlined into their callers' queries (documents.sql,
-- sales.current_actor), which name every function and operator instead.
--
-- A change here needs the same change in the next upgrade script
-- (tests/tests/extension_upgrade.rs compares an upgraded database with a
-- fresh install).

-- sales.filter_sql() (the filters as a WHERE condition, values as
-- literals) and sales.needs_store() (whether a field list needs the stores
-- join) are Rust (src/surface.rs) over the rules the server uses too
-- (sales_core::sql, Projection::needs_store).

-- `-period,storeId` (the API's `sort`) -> an ORDER BY list; the id is added
-- last so the order is total.
CREATE FUNCTION sales.sort_sql(sort text) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
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
        IF part = '' THEN
            RAISE EXCEPTION 'sort: "%" has an empty key between commas', sort USING ERRCODE = '22023';
        END IF;
        dir := CASE WHEN left(part, 1) = '-' THEN ' DESC' ELSE '' END;
        -- One sign at most; a key is its camelCase or exactly its snake_case
        -- spelling, as the API's (`store__id`, `_store_id`, `TotalSales`
        -- and `--totalSales` name none).
        name := CASE WHEN left(part, 1) IN ('-', '+') THEN substr(part, 2) ELSE part END;
        FOREACH k IN ARRAY CASE WHEN name = 'period' THEN ARRAY['year', 'month'] ELSE ARRAY[name] END LOOP
            col := CASE k
                WHEN 'id' THEN 'm.id'
                WHEN 'storeId' THEN 'm.store_id' WHEN 'store_id' THEN 'm.store_id'
                WHEN 'year' THEN 'm.year' WHEN 'month' THEN 'm.month'
                WHEN 'totalSales' THEN 'm.total_sales' WHEN 'total_sales' THEN 'm.total_sales'
                WHEN 'totalCustomers' THEN 'm.total_customers' WHEN 'total_customers' THEN 'm.total_customers'
                WHEN 'daysReported' THEN 'm.days_reported' WHEN 'days_reported' THEN 'm.days_reported'
                WHEN 'updatedAt' THEN 'm.updated_at' WHEN 'updated_at' THEN 'm.updated_at'
                WHEN 'createdAt' THEN 'm.created_at' WHEN 'created_at' THEN 'm.created_at' END;
            IF col IS NULL THEN
                RAISE EXCEPTION 'sort: cannot sort by "%"; allowed: period, id, storeId, year, month, totalSales, totalCustomers, daysReported, updatedAt, createdAt',
                    name USING ERRCODE = '22023';
            END IF;
            IF col = ANY (seen) THEN
                RAISE EXCEPTION 'sort: % given twice%', k,
                    CASE WHEN k IN ('year', 'month')
                              AND 'period' = ANY (SELECT ltrim(btrim(p), '+-') FROM unnest(string_to_array(sort, ',')) p)
                         THEN ' (period is year, month)' ELSE '' END
                    USING ERRCODE = '22023';
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
RETURNS SETOF jsonb LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
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

-- One record as a document (`GET /api/v2/sales/{id}`); NULL when there is none.
CREATE FUNCTION sales.get_sales(id bigint, fields text[] DEFAULT NULL, exclude text[] DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
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

-- Totals per store, region or month over the filtered records
-- (`GET /api/v2/sales/summary`). `key` is the store id, the region, or
-- 'YYYY-MM'; store_code and store_name only when grouping by store.
CREATE FUNCTION sales.sales_summary(group_by text DEFAULT 'store', store_ids bigint[] DEFAULT NULL, region text DEFAULT NULL,
    year integer DEFAULT NULL, month integer DEFAULT NULL,
    from_period text DEFAULT NULL, to_period text DEFAULT NULL,
    min_total_sales numeric DEFAULT NULL, max_total_sales numeric DEFAULT NULL)
RETURNS TABLE (key text, total_sales numeric, total_customers numeric, months bigint, stores bigint,
               store_code text, store_name text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
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

-- Stores as documents (`GET /api/v2/stores`), in id order. The region is
-- read as the API and sales.list_sales read it: trimmed, and refused when
-- blank, too long or holding control characters (sales.region_filter).
CREATE FUNCTION sales.list_stores(region text DEFAULT NULL, status text DEFAULT NULL,
    fields text[] DEFAULT NULL, max_rows integer DEFAULT NULL, skip_rows bigint DEFAULT 0)
RETURNS SETOF jsonb LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    list_stores.region := sales.region_filter(list_stores.region);
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
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE p text[];
BEGIN
    IF after_key IS NULL THEN
        RETURN NULL;
    END IF;
    p := CASE WHEN daily THEN regexp_match(after_key, '^([0-9]{1,18}):([0-9]{4})-([0-9]{2})-([0-9]{2})$')
              ELSE regexp_match(after_key, '^([0-9]{1,18}):([0-9]{4})-([0-9]{2})$') END;
    -- A daily key's day must exist in its month (2024-02-30 is no row's key).
    IF p IS NULL OR p[3]::int NOT BETWEEN 1 AND 12
       OR (daily AND p[4]::int NOT BETWEEN 1 AND extract(day FROM
               make_date(greatest(p[2]::int, 1), p[3]::int, 1) + interval '1 month' - interval '1 day')) THEN
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
    d1_sales text, d1_customers text, d1_transactions text,
    d2_sales text, d2_customers text, d2_transactions text,
    d3_sales text, d3_customers text, d3_transactions text,
    d4_sales text, d4_customers text, d4_transactions text,
    d5_sales text, d5_customers text, d5_transactions text,
    d6_sales text, d6_customers text, d6_transactions text,
    d7_sales text, d7_customers text, d7_transactions text,
    d8_sales text, d8_customers text, d8_transactions text,
    d9_sales text, d9_customers text, d9_transactions text,
    d10_sales text, d10_customers text, d10_transactions text,
    d11_sales text, d11_customers text, d11_transactions text,
    d12_sales text, d12_customers text, d12_transactions text,
    d13_sales text, d13_customers text, d13_transactions text,
    d14_sales text, d14_customers text, d14_transactions text,
    d15_sales text, d15_customers text, d15_transactions text,
    d16_sales text, d16_customers text, d16_transactions text,
    d17_sales text, d17_customers text, d17_transactions text,
    d18_sales text, d18_customers text, d18_transactions text,
    d19_sales text, d19_customers text, d19_transactions text,
    d20_sales text, d20_customers text, d20_transactions text,
    d21_sales text, d21_customers text, d21_transactions text,
    d22_sales text, d22_customers text, d22_transactions text,
    d23_sales text, d23_customers text, d23_transactions text,
    d24_sales text, d24_customers text, d24_transactions text,
    d25_sales text, d25_customers text, d25_transactions text,
    d26_sales text, d26_customers text, d26_transactions text,
    d27_sales text, d27_customers text, d27_transactions text,
    d28_sales text, d28_customers text, d28_transactions text,
    d29_sales text, d29_customers text, d29_transactions text,
    d30_sales text, d30_customers text, d30_transactions text,
    d31_sales text, d31_customers text, d31_transactions text);

-- One row per store-month in key order, the columns of the API's monthly CSV
-- export (`GET /api/v2/sales/export?shape=monthly&format=csv`): key,
-- store, totals, then d1_sales, d1_customers, d1_transactions ..
-- d31_transactions (NULL where a day does not give it). `after_key`
-- resumes after a row.
--   COPY (SELECT * FROM sales.export_monthly(from_period => '2024-01')) TO STDOUT WITH (FORMAT csv, HEADER);
CREATE FUNCTION sales.export_monthly(store_ids bigint[] DEFAULT NULL, region text DEFAULT NULL,
    year integer DEFAULT NULL, month integer DEFAULT NULL,
    from_period text DEFAULT NULL, to_period text DEFAULT NULL,
    min_total_sales numeric DEFAULT NULL, max_total_sales numeric DEFAULT NULL, after_key text DEFAULT NULL)
RETURNS SETOF sales.export_monthly_row
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
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
               m.daily_data->'1'->>'sales', m.daily_data->'1'->>'customers', m.daily_data->'1'->>'transactions',
               m.daily_data->'2'->>'sales', m.daily_data->'2'->>'customers', m.daily_data->'2'->>'transactions',
               m.daily_data->'3'->>'sales', m.daily_data->'3'->>'customers', m.daily_data->'3'->>'transactions',
               m.daily_data->'4'->>'sales', m.daily_data->'4'->>'customers', m.daily_data->'4'->>'transactions',
               m.daily_data->'5'->>'sales', m.daily_data->'5'->>'customers', m.daily_data->'5'->>'transactions',
               m.daily_data->'6'->>'sales', m.daily_data->'6'->>'customers', m.daily_data->'6'->>'transactions',
               m.daily_data->'7'->>'sales', m.daily_data->'7'->>'customers', m.daily_data->'7'->>'transactions',
               m.daily_data->'8'->>'sales', m.daily_data->'8'->>'customers', m.daily_data->'8'->>'transactions',
               m.daily_data->'9'->>'sales', m.daily_data->'9'->>'customers', m.daily_data->'9'->>'transactions',
               m.daily_data->'10'->>'sales', m.daily_data->'10'->>'customers', m.daily_data->'10'->>'transactions',
               m.daily_data->'11'->>'sales', m.daily_data->'11'->>'customers', m.daily_data->'11'->>'transactions',
               m.daily_data->'12'->>'sales', m.daily_data->'12'->>'customers', m.daily_data->'12'->>'transactions',
               m.daily_data->'13'->>'sales', m.daily_data->'13'->>'customers', m.daily_data->'13'->>'transactions',
               m.daily_data->'14'->>'sales', m.daily_data->'14'->>'customers', m.daily_data->'14'->>'transactions',
               m.daily_data->'15'->>'sales', m.daily_data->'15'->>'customers', m.daily_data->'15'->>'transactions',
               m.daily_data->'16'->>'sales', m.daily_data->'16'->>'customers', m.daily_data->'16'->>'transactions',
               m.daily_data->'17'->>'sales', m.daily_data->'17'->>'customers', m.daily_data->'17'->>'transactions',
               m.daily_data->'18'->>'sales', m.daily_data->'18'->>'customers', m.daily_data->'18'->>'transactions',
               m.daily_data->'19'->>'sales', m.daily_data->'19'->>'customers', m.daily_data->'19'->>'transactions',
               m.daily_data->'20'->>'sales', m.daily_data->'20'->>'customers', m.daily_data->'20'->>'transactions',
               m.daily_data->'21'->>'sales', m.daily_data->'21'->>'customers', m.daily_data->'21'->>'transactions',
               m.daily_data->'22'->>'sales', m.daily_data->'22'->>'customers', m.daily_data->'22'->>'transactions',
               m.daily_data->'23'->>'sales', m.daily_data->'23'->>'customers', m.daily_data->'23'->>'transactions',
               m.daily_data->'24'->>'sales', m.daily_data->'24'->>'customers', m.daily_data->'24'->>'transactions',
               m.daily_data->'25'->>'sales', m.daily_data->'25'->>'customers', m.daily_data->'25'->>'transactions',
               m.daily_data->'26'->>'sales', m.daily_data->'26'->>'customers', m.daily_data->'26'->>'transactions',
               m.daily_data->'27'->>'sales', m.daily_data->'27'->>'customers', m.daily_data->'27'->>'transactions',
               m.daily_data->'28'->>'sales', m.daily_data->'28'->>'customers', m.daily_data->'28'->>'transactions',
               m.daily_data->'29'->>'sales', m.daily_data->'29'->>'customers', m.daily_data->'29'->>'transactions',
               m.daily_data->'30'->>'sales', m.daily_data->'30'->>'customers', m.daily_data->'30'->>'transactions',
               m.daily_data->'31'->>'sales', m.daily_data->'31'->>'customers', m.daily_data->'31'->>'transactions'
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
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
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

-- Summaries (`GET /api/v2/sales/summary`): `group_by` any of store, region,
-- year, quarter, month, week, weekday, day (comma-separated); `metrics`
-- (totalSales, totalCustomers, months, stores by default; count,
-- {sum|avg|min|max}{Sales|Customers|Transactions}, salesPerCustomer);
-- `compare_to` previousPeriod or previousYear (`previous` and `changePct`
-- in each row); `top` groups by `order_by`; and the filters of
-- sales.list_sales. The statement comes from sales.summary_sql (Rust, the
-- rules the server uses). Returns {"rows": [...], "groups": n}.
CREATE FUNCTION sales.summary(group_by text DEFAULT NULL, metrics text DEFAULT NULL,
    compare_to text DEFAULT NULL, top integer DEFAULT NULL, order_by text DEFAULT NULL,
    store_ids bigint[] DEFAULT NULL, region text DEFAULT NULL,
    year integer DEFAULT NULL, month integer DEFAULT NULL,
    from_period text DEFAULT NULL, to_period text DEFAULT NULL,
    min_total_sales numeric DEFAULT NULL, max_total_sales numeric DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    q text := sales.summary_sql(group_by, metrics, compare_to, top, order_by, store_ids, region,
                                year, month, from_period, to_period, min_total_sales, max_total_sales);
    r text;
    n bigint;
BEGIN
    EXECUTE q INTO r, n;
    RETURN jsonb_build_object('rows', r::jsonb, 'groups', n);
END $$;
