-- Documents and projection: sales_doc, store_doc, project, project_store,
-- project_each, check_fields.
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

-- Fixed timestamps so documents print the same every run.
INSERT INTO sales.stores (id, code, name, region) OVERRIDING SYSTEM VALUE VALUES (201, 'P1', 'Projection', 'East');
INSERT INTO sales.monthly_sales (id, store_id, year, month, daily_data) OVERRIDING SYSTEM VALUE
VALUES (2001, 201, 2024, 3, '{"1": {"sales": 10, "customers": 2}, "2": {"sales": 5, "transactions": 1}}');
ALTER TABLE sales.monthly_sales DISABLE TRIGGER monthly_sales_row;
UPDATE sales.monthly_sales SET created_at = '2024-04-01 00:00Z', updated_at = '2024-04-01 00:00Z' WHERE id = 2001;
ALTER TABLE sales.monthly_sales ENABLE TRIGGER monthly_sales_row;
ALTER TABLE sales.stores DISABLE TRIGGER stores_bump_version;
UPDATE sales.stores SET created_at = '2024-01-01 00:00Z', updated_at = '2024-01-01 00:00Z' WHERE id = 201;
ALTER TABLE sales.stores ENABLE TRIGGER stores_bump_version;
SET TIME ZONE 'UTC';

SELECT jsonb_pretty(sales.sales_doc(m, s)) FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id ORDER BY m.id;
SELECT sales.sales_doc(m) - 'createdAt' - 'updatedAt' FROM sales.monthly_sales m ORDER BY m.id;
SELECT sales.store_doc(s) FROM sales.stores s ORDER BY s.id;

SELECT sales.project(sales.sales_doc(m, s), '{storeId,dailyData.*.sales,store.name}', '{}')
FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id ORDER BY m.id;
SELECT sales.project(sales.sales_doc(m), '{store_id,daily_data.1}') FROM sales.monthly_sales m ORDER BY m.id;
SELECT sales.project(sales.sales_doc(m), NULL, '{dailyData,createdAt,updatedAt}') FROM sales.monthly_sales m ORDER BY m.id;
SELECT sales.project(sales.sales_doc(m), '{dailyData}', '{dailyData.2}') FROM sales.monthly_sales m ORDER BY m.id;
SELECT sales.project(sales.sales_doc(m), '{}', '{}') = sales.sales_doc(m) AS identity FROM sales.monthly_sales m ORDER BY m.id;
SELECT sales.project(NULL, '{id}') AS null_doc, sales.project('{"id": 1}', NULL, NULL) AS no_fields;
SELECT sales.project('{"id": 1, "year": 2024}', '{id,NULL}') AS null_path_ignored;
SELECT pg_temp.err($$SELECT sales.project('{}', '{colour}')$$);
SELECT pg_temp.err($$SELECT sales.project('{}', '{dailyData.32}')$$);
SELECT pg_temp.err($$SELECT sales.project('{}', '{year.value}')$$);
SELECT pg_temp.err($$SELECT sales.project('{}', '{""}')$$);
SELECT pg_temp.err($$SELECT sales.project('{}', '{id}', '{store.colour}')$$);

SELECT sales.project_store(sales.store_doc(s), '{code,status}') FROM sales.stores s ORDER BY s.id;
SELECT pg_temp.err($$SELECT sales.project_store('{}', '{dailyData}')$$);
SELECT sales.project_store(NULL, '{code}') AS null_doc;

SELECT * FROM sales.project_each('[{"id": 1, "totalSales": 5, "year": 2024}, {"id": 2, "totalSales": 6}]', '{id,totalSales}');
SELECT count(*) FROM sales.project_each('[]', '{id}');
SELECT pg_temp.err($$SELECT sales.project_each('{"id": 1}', '{id}')$$);
SELECT pg_temp.err($$SELECT sales.project_each('[]', '{colour}')$$);
SELECT count(*) FROM sales.project_each(NULL, '{id}');

SELECT sales.check_fields('{store_id,dailyData.*.sales,store.name}');
SELECT sales.check_fields('{}');
SELECT sales.check_fields(NULL) IS NULL AS strict;
SELECT pg_temp.err($$SELECT sales.check_fields('{total}')$$);

-- Leave the tables empty for the next file.
DELETE FROM sales.stores;
