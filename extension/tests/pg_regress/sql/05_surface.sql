-- Reads in SQL: list_sales, get_sales, sales_summary, list_stores,
-- export_monthly, export_daily, and their argument checks.
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
VALUES (401, 'S1', 'Surface one', 'North'), (402, 'S2', 'Surface two', 'South'), (403, 'S3', 'Surface three', 'North');
UPDATE sales.stores SET status = 'closed' WHERE id = 403;
SELECT sales.batch_upsert('[
  {"storeId": 401, "year": 2024, "month": 11, "dailyData": {"1": {"sales": 10, "customers": 1}, "2": {"sales": 20, "customers": 2}}},
  {"storeId": 401, "year": 2024, "month": 12, "dailyData": {"1": {"sales": 30, "customers": 3, "transactions": 4}}},
  {"storeId": 402, "year": 2024, "month": 12, "dailyData": {"5": {"sales": 5.5}}},
  {"storeId": 402, "year": 2025, "month": 1, "dailyData": {"31": {"sales": 100, "customers": 9}}},
  {"storeId": 403, "year": 2025, "month": 1, "dailyData": {}}]') ->> 'inserted' AS inserted;

SELECT * FROM sales.list_sales(fields => '{storeId,year,month,totalSales}', max_rows => NULL);
SELECT * FROM sales.list_sales(region => 'North', sort => '-period', fields => '{storeId,year,month,store.code}');
SELECT * FROM sales.list_sales(store_ids => '{402}', from_period => '2024-12', to_period => '2025-01',
                               fields => '{year,month,dailyData.*.sales}');
SELECT * FROM sales.list_sales(year => 2024, month => 12, min_total_sales => 6, fields => '{storeId}');
SELECT * FROM sales.list_sales(max_total_sales => 6, fields => '{storeId,totalSales}', sort => 'total_sales');
SELECT * FROM sales.list_sales(sort => '-totalSales,storeId', max_rows => 2, skip_rows => 1, fields => '{storeId,totalSales}');
SELECT * FROM sales.list_sales(exclude => '{dailyData,createdAt,updatedAt,id,version}', store_ids => '{401}', month => 11);
SELECT count(*) FROM sales.list_sales(store_ids => '{999}');
SELECT count(*) AS defaults_page FROM sales.list_sales();
SELECT count(*) AS all_null_filters FROM sales.list_sales(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);

SELECT pg_temp.err($$SELECT sales.list_sales(store_ids => '{1,NULL}')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(year => 1999)$$);
SELECT pg_temp.err($$SELECT sales.list_sales(month => 0)$$);
SELECT pg_temp.err($$SELECT sales.list_sales(from_period => '2024-1-1')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(to_period => 'June')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(from_period => '2025-01', to_period => '2024-12')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(min_total_sales => -1)$$);
SELECT pg_temp.err($$SELECT sales.list_sales(max_total_sales => 'NaN')$$);
-- Filters mean what the API's parameters mean: a year outside the range,
-- bounds that admit no total, a blank or broken region are refused, not
-- answered with nothing; a region is trimmed.
SELECT pg_temp.err($$SELECT sales.list_sales(year => 2024, from_period => '2025-01')$$);
SELECT pg_temp.err($$SELECT sales.export_monthly(month => 2, from_period => '2024-03', to_period => '2024-04')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(min_total_sales => 10, max_total_sales => 5)$$);
SELECT pg_temp.err($$SELECT sales.list_sales(region => '')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(region => E'  \t')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(region => E'North\n')$$);
-- A direction override, which no region written through the API holds.
SELECT pg_temp.err($$SELECT sales.list_sales(region => E'No\u202Erth')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(region => E'\u200b\u2060')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(region => repeat('n', 101))$$);
SELECT pg_temp.err($$SELECT sales.list_sales(max_total_sales => '1e400')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(min_total_sales => 'Infinity')$$);
SELECT count(*) AS trimmed_region FROM sales.list_sales(region => ' North ');
-- Total bounds keep every digit: the row whose total a bound is stays in.
SELECT sales.batch_upsert('[{"storeId": 402, "year": 2023, "month": 3, "dailyData":
  {"1": {"sales": 617283945061.7283}, "2": {"sales": 617283945061.7284}}}]') ->> 'inserted' AS inserted;
SELECT sales.filter_sql(min_total_sales => 1234567890123.4567, max_total_sales => 99999999999999.999999);
SELECT count(*) AS at_its_own_total FROM sales.list_sales(store_ids => '{402}', year => 2023, month => 3,
    min_total_sales => 1234567890123.4567, max_total_sales => 1234567890123.4567);
SELECT count(*) AS just_above FROM sales.list_sales(store_ids => '{402}', year => 2023,
    min_total_sales => 1234567890123.45670001);
SELECT count(*) AS exported FROM sales.export_monthly(store_ids => '{402}', year => 2023,
    min_total_sales => 1234567890123.4567);
SELECT sales.batch_delete(ARRAY(SELECT id FROM sales.monthly_sales WHERE store_id = 402 AND year = 2023)) ->> 'deleted' AS deleted;
SELECT pg_temp.err($$SELECT sales.list_sales(sort => 'colour')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(sort => 'year,-period')$$);
-- A key is its camelCase or exactly its snake_case spelling, one sign at most.
SELECT pg_temp.err($$SELECT sales.list_sales(sort => 'store__id')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(sort => '_store_id')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(sort => 'year_')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(sort => 'TotalSales')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(sort => '--totalSales')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(sort => 'storeId,store_id')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(sort => 'period,storeId,storeId')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(sort => 'year,,month')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(sort => ',')$$);
SELECT sales.sort_sql('-total_sales,+storeId,days_reported');
SELECT pg_temp.err($$SELECT sales.list_sales(fields => '{colour}')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(exclude => '{store.colour}')$$);
SELECT pg_temp.err($$SELECT sales.list_sales(max_rows => 0)$$);
SELECT pg_temp.err($$SELECT sales.list_sales(skip_rows => -1)$$);
SELECT pg_temp.err($$SELECT sales.list_sales(skip_rows => NULL)$$);

SELECT sales.get_sales(id, '{storeId,month,totalSales,store.name}') FROM sales.monthly_sales WHERE store_id = 401 ORDER BY id;
SELECT sales.get_sales(id) ? 'store' AS has_store, sales.get_sales(id) - 'createdAt' - 'updatedAt' - 'id' AS doc
FROM sales.monthly_sales WHERE store_id = 402 AND month = 12;
SELECT sales.get_sales(-1) AS missing;
SELECT pg_temp.err($$SELECT sales.get_sales(NULL)$$);
SELECT pg_temp.err($$SELECT sales.get_sales(1, '{colour}')$$);

SELECT * FROM sales.sales_summary();
SELECT * FROM sales.sales_summary('region');
SELECT * FROM sales.sales_summary('month', from_period => '2024-12');
SELECT * FROM sales.sales_summary('store', store_ids => '{999}');
SELECT pg_temp.err($$SELECT * FROM sales.sales_summary('week')$$);
SELECT pg_temp.err($$SELECT * FROM sales.sales_summary(NULL)$$);
-- A comparison given but empty is refused, as by the API.
SELECT pg_temp.err($$SELECT sales.summary(compare_to => '', year => 2024)$$);
SELECT pg_temp.err($$SELECT sales.summary(compare_to => '  ', year => 2024)$$);
-- A day of customers past the bigint range breaks the daily data's CHECK,
-- which names the rule, rather than failing in the totals.
SELECT pg_temp.err($$INSERT INTO sales.monthly_sales (store_id, year, month, daily_data)
                     VALUES (401, 2023, 11, '{"1": {"customers": 1e20}}')$$);
SELECT pg_temp.err($$UPDATE sales.monthly_sales SET daily_data = '{"1": {"customers": 99999999999999999999}}'
                     WHERE store_id = 401 AND year = 2024 AND month = 11$$);

SELECT s - 'createdAt' - 'updatedAt' FROM sales.list_stores() s WHERE (s ->> 'id')::int > 400;
SELECT * FROM sales.list_stores(region => 'North', status => 'open', fields => '{code,region,status}');
SELECT * FROM sales.list_stores(fields => '{code}', max_rows => 1, skip_rows => 1) s;
SELECT pg_temp.err($$SELECT sales.list_stores(status => 'gone')$$);
SELECT pg_temp.err($$SELECT sales.list_stores(fields => '{dailyData}')$$);
SELECT pg_temp.err($$SELECT sales.list_stores(max_rows => -5)$$);
SELECT pg_temp.err($$SELECT sales.list_stores(skip_rows => NULL)$$);

SELECT key, store_id, store_code, region, year, month, total_sales, total_customers, days_reported,
       d1_sales, d1_customers, d1_transactions, d2_sales, d5_sales, d31_sales, d31_customers, d31_transactions
FROM sales.export_monthly(store_ids => '{401,402}');
SELECT key FROM sales.export_monthly(after_key => '401:2024-12', store_ids => '{401,402}');
SELECT count(*) AS columns FROM pg_attribute WHERE attrelid = 'sales.export_monthly_row'::regclass AND attnum > 0;
COPY (SELECT key, store_code, total_sales, d1_sales FROM sales.export_monthly(region => 'North')) TO STDOUT WITH (FORMAT csv, HEADER);
SELECT * FROM sales.export_daily(store_ids => '{401,402}');
SELECT key FROM sales.export_daily(after_key => '401:2024-11-01', store_ids => '{401}');
COPY (SELECT * FROM sales.export_daily(year => 2025)) TO STDOUT WITH (FORMAT csv, HEADER);
SELECT pg_temp.err($$SELECT * FROM sales.export_monthly(after_key => '401:2024-12-01')$$);
SELECT pg_temp.err($$SELECT * FROM sales.export_daily(after_key => '401:2024-12')$$);
SELECT pg_temp.err($$SELECT * FROM sales.export_daily(after_key => '401:2024-13-01')$$);
SELECT pg_temp.err($$SELECT * FROM sales.export_daily(after_key => '401:2023-02-29')$$);
SELECT count(*) FROM sales.export_daily(after_key => '401:2024-02-29');
SELECT pg_temp.err($$SELECT * FROM sales.export_monthly(month => 13)$$);

-- Leave the tables empty for the next file.
DELETE FROM sales.stores;
