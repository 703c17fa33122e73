-- sales.batch_upsert and sales.batch_delete: happy paths, every option,
-- the rejection report, NULL arguments.
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

INSERT INTO sales.stores (id, code, name, region) OVERRIDING SYSTEM VALUE
VALUES (101, 'B1', 'Batch one', 'North'), (102, 'B2', 'Batch two', 'South');

-- Insert two months (storeId as number or numeric string, camelCase or snake_case).
SELECT sales.batch_upsert('[{"storeId": 101, "year": 2024, "month": 1, "dailyData": {"1": {"sales": 100, "customers": 5}}},
                            {"store_id": "102", "year": 2024, "month": 1, "daily_data": {"2": {"sales": 50}}}]') - 'eventId';
-- Merge (default) keeps other days; unchanged records are reported as such.
SELECT sales.batch_upsert('[{"storeId": 101, "year": 2024, "month": 1, "dailyData": {"2": {"sales": 7}}},
                            {"storeId": 102, "year": 2024, "month": 1, "dailyData": {"2": {"sales": 50}}}]') - 'eventId';
SELECT store_id, daily_data, total_sales, version FROM sales.monthly_sales ORDER BY store_id;
-- Replace swaps the month's daily data.
SELECT sales.batch_upsert('[{"storeId": 101, "year": 2024, "month": 1, "dailyData": {"3": {"sales": 3}}}]', mode => 'replace') - 'eventId';
SELECT daily_data, version FROM sales.monthly_sales WHERE store_id = 101;
-- The same month twice: folded in order, reported in duplicates.
SELECT sales.batch_upsert('[{"storeId": 102, "year": 2024, "month": 2, "dailyData": {"1": {"sales": 1}}},
                            {"storeId": 102, "year": 2024, "month": 2, "dailyData": {"1": {"sales": 2}, "2": {"sales": 2}}}]') - 'eventId';
SELECT daily_data FROM sales.monthly_sales WHERE store_id = 102 AND month = 2;

-- Atomic rejection: nothing written, SQLSTATE PS422, the report in DETAIL.
SELECT pg_temp.err($$SELECT sales.batch_upsert('[{"storeId": 101, "year": 2024, "month": 4, "dailyData": {"31": {"sales": 1}}},
                                                 {"storeId": 999, "year": 2024, "month": 13, "dailyData": {}},
                                                 {"storeId": 101, "year": 2024, "month": 5, "colour": "red", "dailyData": {"1": {"sales": -1}}},
                                                 {"year": 2024, "month": 5},
                                                 {"storeId": 101, "year": 2024, "month": 6, "dailyData": {"1": {"sales": 1}}}]')$$);
SELECT count(*) AS rows_after_rejection FROM sales.monthly_sales;
-- A report lists at most 1,000 errors and counts the rest, in the result
-- and in an atomic batch's DETAIL alike (1,200 records of a year out of
-- range made a DETAIL of every one).
SELECT jsonb_array_length(r -> 'errors') AS listed, r -> 'errorsOmitted' AS omitted, r -> 'failed' AS failed
FROM (SELECT sales.batch_upsert((SELECT jsonb_agg(jsonb_build_object('storeId', 101, 'year', 1999, 'month', 1,
                                                                     'dailyData', '{}'::jsonb))
                                 FROM generate_series(1, 1200)), atomic => false) AS r) x;
DO $$
DECLARE detail text;
BEGIN
    PERFORM sales.batch_upsert((SELECT jsonb_agg(jsonb_build_object('storeId', 101, 'year', 1999, 'month', 1,
                                                                    'dailyData', '{}'::jsonb))
                                FROM generate_series(1, 1200)));
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL;
    RAISE NOTICE 'PS422 DETAIL lists %, omits %', jsonb_array_length(detail::jsonb -> 'errors'),
        detail::jsonb -> 'errorsOmitted';
END $$;
-- Every kind of record-level mistake, one report.
SELECT jsonb_pretty((sales.batch_upsert_impl('[
    "not an object",
    {"storeId": "abc", "year": "2024", "month": 1.5, "dailyData": []},
    {"storeId": 101, "store_id": 101, "year": 2024, "month": 1, "dailyData": {}},
    {"storeId": -4, "year": 1999, "month": 0, "dailyData": {"1": {"sales": 1e13, "customers": -2, "transactions": 0.5}}},
    {"storeId": 101, "year": 2024, "month": 2, "dailyData": {"30": {}, "1": {"visitors": 3}}},
    {"storeId": 101, "year": 2024, "month": 3},
    {"storeId": 101, "year": 2024, "month": 4, "dailyData": {"1": {"sales": 1e13, "customers": -2, "transactions": 0.5}}}
  ]') -> 'errors'));
-- Best effort: the valid record is written, the rest reported.
SELECT sales.batch_upsert('[{"storeId": 101, "year": 2024, "month": 6, "dailyData": {"1": {"sales": 1}}},
                            {"storeId": 101, "year": 2024, "month": 4, "dailyData": {"31": {"sales": 1}}}]', atomic => false) - 'eventId';
-- Scope: a store outside allowed_stores is refused.
SELECT pg_temp.err($$SELECT sales.batch_upsert('[{"storeId": 102, "year": 2024, "month": 7, "dailyData": {}}]', allowed_stores => '{101}')$$);
SELECT sales.batch_upsert('[{"storeId": 101, "year": 2024, "month": 7, "dailyData": {}}]', allowed_stores => '{101}') - 'eventId';

-- Arguments.
SELECT pg_temp.err($$SELECT sales.batch_upsert('[]', mode => 'upsert')$$);
SELECT pg_temp.err($$SELECT sales.batch_upsert('[]', mode => NULL)$$);
SELECT pg_temp.err($$SELECT sales.batch_upsert('{"storeId": 101}')$$);
SELECT pg_temp.err($$SELECT sales.batch_upsert(NULL)$$);
SELECT sales.batch_upsert('[]') - 'eventId';
SELECT sales.batch_upsert('[{"storeId": 101, "year": 2024, "month": 8, "dailyData": {}}]', atomic => NULL) - 'eventId';

-- Deletes by id and by key; unknown ones are reported.
SELECT sales.batch_delete(ids => ARRAY[(SELECT id FROM sales.monthly_sales WHERE store_id = 101 AND month = 8)]) - 'eventId';
SELECT sales.batch_delete(keys => '[{"storeId": 101, "year": 2024, "month": 7}]') - 'eventId';
SELECT pg_temp.err($$SELECT sales.batch_delete(ids => '{987654}', keys => '[{"storeId": 101, "year": 2030, "month": 1}]')$$);
SELECT sales.batch_delete(ids => '{987654}', keys => '[{"storeId": 101, "year": 2024, "month": 6}]', atomic => false) - 'eventId';
-- One row named three times (its id twice, its key): deleted once, the
-- other two counted as duplicates, so the counts add up to total.
SELECT sales.batch_upsert('[{"storeId": 101, "year": 2024, "month": 11, "dailyData": {"1": {"sales": 1}}}]') -> 'inserted' AS inserted;
SELECT sales.batch_delete(ids => ARRAY[(SELECT id FROM sales.monthly_sales WHERE store_id = 101 AND month = 11),
                                       (SELECT id FROM sales.monthly_sales WHERE store_id = 101 AND month = 11)],
                          keys => '[{"storeId": 101, "year": 2024, "month": 11}]') - 'eventId';
SELECT pg_temp.err($$SELECT sales.batch_delete(keys => '[{"storeId": 102, "year": 2024, "month": 1}]', allowed_stores => '{101}')$$);
SELECT pg_temp.err($$SELECT sales.batch_delete(ids => '{1,NULL}')$$);
SELECT pg_temp.err($$SELECT sales.batch_delete(keys => '{"storeId": 1}')$$);
SELECT pg_temp.err($$SELECT sales.batch_delete()$$);
SELECT pg_temp.err($$SELECT sales.batch_delete(NULL, NULL)$$);
SELECT store_id, year, month FROM sales.monthly_sales ORDER BY 1, 2, 3;

-- The functions behind the wrappers report instead of raising (the server
-- calls them and maps the report to 422 itself).
SELECT sales.batch_upsert_impl('[{"storeId": 101, "year": 2024, "month": 4, "dailyData": {"31": {"sales": 1}}}]') - 'eventId';
SELECT sales.batch_upsert_impl('[{"storeId": 101, "year": 2024, "month": 9, "dailyData": {"1": {"sales": 9}}}]', replace => true, atomic => true, allowed_stores => NULL) - 'eventId';
SELECT pg_temp.err($$SELECT sales.batch_upsert_impl(NULL)$$);
SELECT sales.batch_upsert_impl('[]', NULL, NULL) - 'eventId' AS null_options_mean_defaults;
SELECT sales.batch_delete_impl(NULL, '[{"storeId": 101, "year": 2024, "month": 9}]') - 'eventId';
SELECT sales.batch_delete_impl('{987654}', NULL) - 'eventId';
SELECT pg_temp.err($$SELECT sales.batch_delete_impl(NULL, NULL)$$);
SELECT sales.batch_delete_impl('{}', NULL, NULL) - 'eventId' AS null_atomic_means_true;

-- day_records: day rows sorted by (store, year, month) as batch_upsert's
-- records, one per run; a later row of a day replaces the earlier one
-- whole; NULL metrics are left out.
SELECT sales.day_records('{1,1,1,2}', '{2024,2024,2024,2024}', '{1,1,1,1}', '{3,1,3,2}',
                         '{1.50,2,007,NULL}', '{NULL,3,4,NULL}', '{5,NULL,NULL,NULL}');
SELECT sales.day_records('{1,1}', '{2024,2024}', '{1,2}', '{1,1}', '{1,2}', '{NULL,NULL}', '{NULL,NULL}');
SELECT sales.day_records('{}', '{}', '{}', '{}', '{}', '{}', '{}') AS no_rows;
-- The same records as the plain-SQL fold (jsonb_object_agg in line order,
-- NULLs stripped) over 50,000 random rows with many repeated days.
SELECT setseed(0.42);
WITH r AS (
  SELECT (random() * 4)::int + 1 AS sid, 2024 AS year, (random())::int + 1 AS month,
         (random() * 27)::int + 1 AS day, g AS line,
         CASE WHEN random() < 0.2 THEN NULL ELSE round((random() * 1000)::numeric, (random() * 3)::int) END AS sales,
         CASE WHEN random() < 0.3 THEN NULL ELSE (random() * 100)::int::numeric END AS customers,
         CASE WHEN random() < 0.5 THEN NULL ELSE (random() * 100)::int::numeric END AS transactions
  FROM generate_series(1, 50000) g),
g AS (SELECT sid, year, month,
             jsonb_object_agg(day::text, jsonb_strip_nulls(jsonb_build_object('sales', sales, 'customers', customers,
                                                                              'transactions', transactions))
                              ORDER BY line, day) AS daily
      FROM r GROUP BY sid, year, month),
plain AS (SELECT jsonb_agg(jsonb_build_object('storeId', sid, 'year', year, 'month', month, 'dailyData', daily)
                           ORDER BY sid, year, month) AS j FROM g),
fold AS (SELECT sales.day_records(array_agg(sid::bigint), array_agg(year), array_agg(month), array_agg(day),
                                  array_agg(sales), array_agg(customers), array_agg(transactions)) AS j
         FROM (SELECT * FROM r ORDER BY sid, year, month, line, day) o)
SELECT plain.j::text = fold.j::text AS same_records, jsonb_array_length(fold.j) AS records FROM plain, fold;

-- NaN and infinities become strings, which batch_upsert refuses.
SELECT sales.day_records('{101}', '{2024}', '{1}', '{1}', '{NaN}', '{Infinity}', '{-Infinity}');
SELECT jsonb_path_query(sales.batch_upsert_impl(
    sales.day_records('{101}', '{2024}', '{1}', '{1}', '{NaN}', '{1}', '{1}')), '$.errors') AS nan_refused;
-- A NULL metric array is that metric not reported; a NULL key array is refused.
SELECT sales.day_records('{1,1}', '{2024,2024}', '{1,1}', '{1,2}', '{5,6}', NULL, NULL);
SELECT sales.day_records('{1}', '{2024}', '{1}', '{1}', NULL, NULL, NULL);
SELECT pg_temp.err($$SELECT sales.day_records(NULL, '{}', '{}', '{}', '{}', '{}', '{}')$$);
SELECT pg_temp.err($$SELECT sales.day_records('{1}', '{2024}', '{1}', NULL, '{1}', '{1}', '{1}')$$);
SELECT pg_temp.err($$SELECT sales.day_records('{1,1}', '{2024}', '{1,1}', '{1,2}', '{1,2}', '{1,2}', '{1,2}')$$);
SELECT pg_temp.err($$SELECT sales.day_records('{1,NULL}', '{2024,2024}', '{1,1}', '{1,2}', '{1,2}', '{1,2}', '{1,2}')$$);
SELECT pg_temp.err($$SELECT sales.day_records('{1}', '{2024}', '{1}', '{NULL}', '{1}', '{1}', '{1}')$$);

-- A batch that writes nothing (sent again as stored) announces nothing:
-- eventId null, no batch-completed event; a delete of nothing likewise.
SELECT count(*) AS batches_before FROM sales.events WHERE kind = 'batch-completed' \gset
SELECT sales.batch_upsert('[{"storeId": 101, "year": 2024, "month": 9, "dailyData": {"1": {"sales": 9}}}]') ? 'eventId' AS has_event,
       sales.batch_upsert('[{"storeId": 101, "year": 2024, "month": 9, "dailyData": {"1": {"sales": 9}}}]') -> 'eventId' AS again;
SELECT count(*) - :batches_before AS new_batch_events FROM sales.events WHERE kind = 'batch-completed';
SELECT sales.batch_delete(ids => '{999999999}', atomic => false) -> 'eventId' AS deleted_nothing;

-- arm_notify: true for the first event row of a transaction only.
BEGIN;
SELECT sales.arm_notify() AS first, sales.arm_notify() AS second;
ROLLBACK;

-- Leave the tables empty for the next file.
DELETE FROM sales.stores;
