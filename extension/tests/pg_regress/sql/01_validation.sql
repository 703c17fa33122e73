-- Daily-data validation and the derived columns' helpers.
-- Each file runs in a fresh psql session of the same database, in name order.
\set SHOW_CONTEXT never
\pset null (null)
-- Runs one statement and shows its error as SQLSTATE: message, with the
-- DETAIL of pg_sales' own codes (PS...: the JSON report). Other DETAILs can
-- hold timestamps (a failing row), so they are left out.
CREATE FUNCTION pg_temp.err(statement text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE detail text;
BEGIN
    EXECUTE statement;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL;
    RETURN SQLSTATE || ': ' || SQLERRM
        || CASE WHEN SQLSTATE LIKE 'PS%' AND detail <> '' THEN ' [' || detail || ']' ELSE '' END;
END $$;

SELECT sales.daily_data_valid(2024, 2, '{"29": {"sales": 1}}');   -- leap day
SELECT sales.daily_data_valid(2023, 2, '{"29": {"sales": 1}}');   -- no 29 February in 2023
SELECT sales.daily_data_valid(2024, 4, '{"30": {"sales": 1.5, "customers": 2, "transactions": 3}}');
SELECT sales.daily_data_valid(2024, 4, '{"31": {"sales": 1}}');
SELECT sales.daily_data_valid(2024, 4, '{}');
SELECT sales.daily_data_valid(2024, 4, '[]');
SELECT sales.daily_data_valid(NULL, 4, '{}'), sales.daily_data_valid(2024, NULL, '{}'), sales.daily_data_valid(2024, 4, NULL);
-- A year or month out of range is invalid too, as daily_data_errors says;
-- the CHECK constraint's daily_data_check leaves those to the year's and
-- the month's own constraints.
SELECT sales.daily_data_valid(1900, 2, '{"29": {"sales": 1}}'), sales.daily_data_check(1900, 2, '{"29": {"sales": 1}}');
SELECT sales.daily_data_valid(2024, 13, '{"31": {"sales": 1}}'), sales.daily_data_check(2024, 13, '{"31": {"sales": 1}}');
SELECT sales.daily_data_valid(1999, 1, '{}'), sales.daily_data_check(1999, 1, '{}');
SELECT sales.daily_data_check(2024, 4, '{"31": {"sales": 1}}'), sales.daily_data_check(2024, 4, '{"30": {"sales": 1}}');
SELECT sales.daily_data_check(NULL, 4, '{}') IS NULL AS strict;

SELECT sales.daily_data_errors(2024, 4, '{"1": {"sales": 1}}');
SELECT jsonb_pretty(sales.daily_data_errors(2024, 4,
    '{"31": {"sales": 1}, "x": {}, "2": {"sales": -1, "customers": 1.5, "colour": 1}, "3": {"sales": "ten"}, "4": 5}'));
SELECT sales.daily_data_errors(1999, 13, '{}');
SELECT sales.daily_data_errors(NULL, 1, '{}') IS NULL AS strict;

SELECT sales.daily_sum('{"1": {"sales": 1.25}, "2": {"sales": 2, "customers": 3}}', 'sales'),
       sales.daily_sum('{"1": {"sales": 1.25}, "2": {"sales": 2, "customers": 3}}', 'customers'),
       sales.daily_sum('{}', 'sales'),
       sales.daily_sum(NULL, 'sales'),
       sales.daily_sum('{}', NULL);
-- Sums are exact and keep the largest display scale, as numeric + does:
-- small values are added as integers, others (over eight decimal places,
-- 10^28 or more) in numeric arithmetic.
SELECT sales.daily_sum('{"1": {"sales": 0.1}, "2": {"sales": 0.2}}', 'sales'),
       sales.daily_sum('{"1": {"sales": 1.50}, "2": {"sales": 2}}', 'sales'),
       sales.daily_sum('{"1": {"sales": -5.5}, "2": {"sales": 2.25}}', 'sales'),
       sales.daily_sum('{"1": {"sales": 0.00}}', 'sales'),
       sales.daily_sum('{"1": {"sales": 1.0000000000}, "2": {"sales": 2}}', 'sales'),
       sales.daily_sum('{"1": {"sales": 0.123456789}, "2": {"sales": 1}}', 'sales'),
       sales.daily_sum('{"1": {"sales": 99999999999999999999999999999999}, "2": {"sales": 1}}', 'sales');
-- Against numeric's own sum over 600 months of random values of every
-- size and scale (both ways of adding, and the switch between them).
SELECT setseed(0.42);
SELECT count(*) AS months,
       count(*) FILTER (WHERE sales.daily_sum(d, 'sales')::text IS DISTINCT FROM
                              (SELECT sum((v->>'sales')::numeric)::text FROM jsonb_each(d) e(k, v))) AS differ
FROM (SELECT m, jsonb_object_agg(day, jsonb_build_object('sales',
             round(((random() - 0.3) * 10 ^ (random() * 34 - 4))::numeric, (random() * 12)::int))) AS d
      FROM generate_series(1, 600) m, generate_series(1, 28) day
      GROUP BY m) x;
SELECT sales.daily_days('{"1": {}, "5": {}}'), sales.daily_days('{}'), sales.daily_days('[]'), sales.daily_days(NULL);

SELECT sales.changed_days(NULL, '{"1": {"sales": 1}, "2": {"sales": 2}}');
SELECT sales.changed_days('{"1": {"sales": 1}, "2": {"sales": 2}}', '{"1": {"sales": 1}, "2": {"sales": 3}, "3": {}}');
SELECT sales.changed_days('{"1": {"sales": 1}}', NULL), sales.changed_days(NULL, NULL);
SELECT sales.daily_merge_changes('{"1": {"sales": 1}}', '{"1": {"sales": 1}}'),
       sales.daily_merge_changes('{"1": {"sales": 1}}', '{"1": {"sales": 2}}'),
       sales.daily_merge_changes('{"1": {"sales": 1}}', '{"2": {"sales": 1}}'),
       sales.daily_merge_changes(NULL, '{}');
-- daily_merge is jsonb's ||, written directly: the same value, the same
-- size (jsonb's layout is canonical), every key found by its binary search,
-- for objects of up to 90 keys (past the 32-entry offset stride) holding
-- every kind of value; anything but two objects is || itself.
SELECT sales.daily_merge('{"1": {"sales": 1}, "3": {"sales": 3}}', '{"2": {"sales": 2}, "3": {"sales": 4}, "10": {}}'),
       sales.daily_merge('{}', '{"1": {"sales": 1}}'), sales.daily_merge('{"1": {"sales": 1}}', '{}'),
       sales.daily_merge('[1]', '{"a": 2}'), sales.daily_merge('{"1": 1}', NULL);
SELECT setseed(0.25);
CREATE TEMP TABLE merge_sample AS
SELECT g, coalesce(jsonb_object_agg(repeat(chr(97 + (k % 26)), 1 + (k % 5)) || (k * 7 % 13)::text,
         CASE t WHEN 0 THEN to_jsonb(round((x * 1e6)::numeric, k % 4))
                WHEN 1 THEN to_jsonb(repeat('s', k % 9))
                WHEN 2 THEN 'true'::jsonb WHEN 3 THEN 'false'::jsonb WHEN 4 THEN 'null'::jsonb
                WHEN 5 THEN jsonb_build_object('sales', round((x * 1000)::numeric, 2), 'customers', k)
                ELSE jsonb_build_array(k, 'a', x > 0.5, jsonb_build_object('z', k)) END), '{}') AS o
FROM (SELECT g, k, (random() * 7)::int AS t, random() AS x
      FROM generate_series(1, 200) g, generate_series(1, (random() * 45)::int) k) v
GROUP BY g;
SELECT count(*) AS pairs,
       count(*) FILTER (WHERE sales.daily_merge(a.o, b.o)::text <> (a.o || b.o)::text) AS text_differs,
       count(*) FILTER (WHERE pg_column_size(sales.daily_merge(a.o, b.o)) <> pg_column_size(a.o || b.o)) AS size_differs,
       count(*) FILTER (WHERE jsonb_typeof(sales.daily_merge(a.o, b.o)) <> 'object') AS not_objects
FROM merge_sample a, merge_sample b WHERE a.g % 7 = b.g % 11;
SELECT count(*) FILTER (WHERE m -> e.key IS DISTINCT FROM e.value) AS lookups_wrong, count(*) > 10000 AS many
FROM (SELECT sales.daily_merge(a.o, b.o) AS m, a.o || b.o AS c
      FROM merge_sample a, merge_sample b WHERE a.g % 13 = b.g % 5) s, jsonb_each(s.c) e;
-- daily_merge_changes(old, new) is (old || new) <> old: a lookup per day
-- when new has a few days, one walk over both months when it has more. The
-- pairs: random ones, a month with itself, with every other day of its own
-- and with its first three.
SELECT count(*) AS pairs,
       count(*) FILTER (WHERE sales.daily_merge_changes(a.o, b.o) <> ((a.o || b.o) <> a.o)) AS wrong,
       count(*) FILTER (WHERE NOT sales.daily_merge_changes(a.o, b.o)) > 400 AS many_unchanged,
       count(*) FILTER (WHERE (SELECT count(*) FROM jsonb_object_keys(b.o)) > 4) > 1000 AS many_long
FROM merge_sample a, LATERAL (
    SELECT s.o FROM merge_sample s WHERE a.g % 7 = s.g % 11
    UNION ALL SELECT a.o
    UNION ALL SELECT coalesce(jsonb_object_agg(e.key, e.value) FILTER (WHERE length(e.key) % 2 = 0), '{}')
              FROM jsonb_each(a.o) e
    UNION ALL SELECT coalesce(jsonb_object_agg(e.key, e.value), '{}')
              FROM (SELECT * FROM jsonb_each(a.o) LIMIT 3) e) b;
-- parse_json is text::jsonb: the same value and the same size, for
-- documents of every kind; what it does not read itself (an exponent, a \u
-- escape, a syntax error) goes to jsonb_in, errors included.
SELECT sales.parse_json(t) = t::jsonb AS same, pg_column_size(sales.parse_json(t)) = pg_column_size(t::jsonb) AS same_size,
       sales.parse_json(t)::text AS parsed
FROM (VALUES ('{"b": [1, -0.50, "x\n\"\\/", true, null, {}], "a": {"z": 1, "a": 2, "z": 3}, "aa": 0.0001}'),
             ('[]'), ('{}'), ('12.5'), ('"s"'), ('null'), (' true '), ('{"a": 1e3, "b": 2E-2}'), ('["\u00e9"]'),
             ('[-0, 0.00, -0.0, 99999999.99999999, 100000000, 0.000012, -123456789012345678901234567890.5]'),
             ('{"ü": "é", "k": "日本"}')) v(t);
SELECT pg_temp.err($$SELECT sales.parse_json('{"a": 1,}')$$), pg_temp.err($$SELECT sales.parse_json('[01]')$$),
       pg_temp.err($$SELECT sales.parse_json('{"a": "\u0000"}')$$);
SELECT count(*) AS docs,
       count(*) FILTER (WHERE sales.parse_json(t) <> t::jsonb) AS values_differ,
       count(*) FILTER (WHERE sales.parse_json(t)::text <> t::jsonb::text) AS text_differs,
       count(*) FILTER (WHERE pg_column_size(sales.parse_json(t)) <> pg_column_size(t::jsonb)) AS size_differs
FROM (SELECT o::text AS t FROM merge_sample
      UNION ALL
      SELECT jsonb_agg(round(((random() - 0.3) * 10 ^ (random() * 34 - 4))::numeric, (random() * 12)::int))::text
      FROM generate_series(1, 300) m, generate_series(1, 40) k GROUP BY m) d;

-- The CHECK constraint uses the same validation, whoever writes.
INSERT INTO sales.stores (code, name, region) VALUES ('V1', 'Validation store', 'North');
SELECT pg_temp.err($$INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
                      VALUES (1, 2024, 4, '{"31": {"sales": 1}}')$$);
SELECT pg_temp.err($$INSERT INTO sales.monthly_sales (store_id, year, month) VALUES (1, 1999, 1)$$);
SELECT pg_temp.err($$INSERT INTO sales.monthly_sales (store_id, year, month) VALUES (1, 2024, 13)$$);
SELECT pg_temp.err($$INSERT INTO sales.stores (code, name, region) VALUES ('bad code!', 'x', 'y')$$);
SELECT pg_temp.err($$INSERT INTO sales.stores (code, name, region, status) VALUES ('V2', 'x', 'y', 'gone')$$);
INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
VALUES (1, 2024, 2, '{"29": {"sales": 10.5, "customers": 4}, "1": {"sales": 1}}')
RETURNING total_sales, total_customers, days_reported, version;
-- A real change bumps the version; a no-op UPDATE does not.
UPDATE sales.monthly_sales SET daily_data = daily_data RETURNING version;
UPDATE sales.monthly_sales SET daily_data = daily_data || '{"2": {"sales": 1}}' RETURNING version, total_sales, days_reported;
-- The totals are derived whatever a writer gives; equal jsonb (10.5 and
-- 10.50) is no change of the data, so no new version, and the data stays
-- as stored (10.5, and its totals: the bytes never change without a
-- version and an event); a version or timestamps a writer sets are
-- ignored.
UPDATE sales.monthly_sales SET total_sales = 1, total_customers = 2, days_reported = 3
RETURNING version, total_sales, total_customers, days_reported;
UPDATE sales.monthly_sales SET daily_data = '{"29": {"sales": 10.50, "customers": 4}, "1": {"sales": 1.0}, "2": {"sales": 1}}'
RETURNING version, total_sales, daily_data;
-- A day equal to its stored value keeps it in a month that changes.
UPDATE sales.monthly_sales SET daily_data = '{"29": {"sales": 10.50, "customers": 4}, "1": {"sales": 1.0}, "2": {"sales": 2}}'
RETURNING version, total_sales, daily_data;
UPDATE sales.monthly_sales SET version = 42, created_at = '2000-01-01', updated_at = '2000-01-01'
RETURNING version, created_at = '2000-01-01' AS created_moved, updated_at = '2000-01-01' AS updated_moved;
UPDATE sales.monthly_sales SET daily_data = '{}' RETURNING version, total_sales, total_customers, days_reported;
INSERT INTO sales.monthly_sales (store_id, year, month, daily_data, total_sales, total_customers, days_reported)
VALUES (1, 2024, 3, '{"1": {"customers": 3}, "2": {"sales": 0.25, "transactions": 1}}', 999, 999, 999)
RETURNING total_sales, total_customers, days_reported, version;
SELECT pg_temp.err($$UPDATE sales.monthly_sales SET id = 99$$);
SELECT pg_temp.err($$UPDATE sales.stores SET id = 99$$);
DELETE FROM sales.monthly_sales;
DELETE FROM sales.stores;
