-- pg_sales 0.10.0 -> 0.11.0.
--
-- sales.export_monthly gives each day's transactions (dN_transactions after
-- dN_customers), as the API's monthly CSV export now does: an export
-- imported back no longer deletes them (an import replaces each day of the
-- file whole). The row type gains 31 columns, so the function and its type
-- are made again.
--
-- The rest of 0.11.0 is in the library (no SQL change): the row triggers act
-- only on sales.monthly_sales; a hand-written seq beyond 2^62 no longer
-- reaches the shared delivery clock; sales.event_seq() is for roles that may
-- insert events; the NOTIFY coalescing lock is out of SQL's reach;
-- sales.parse_json hands texts over 16 MiB to jsonb input. That lock is
-- taken from SQL only through sales.take_notify_lock() (superusers; tests).

DROP FUNCTION sales.export_monthly(bigint[], text, integer, integer, text, text, numeric, numeric, text);
DROP TYPE sales.export_monthly_row;

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

CREATE FUNCTION sales."take_notify_lock"() RETURNS bool
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'take_notify_lock_wrapper';
