-- Monitoring views and the index report. Figures vary from run to run, so
-- this checks shapes, names and the behaviour without pg_stat_statements.
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

SELECT table_name, index_name, method, is_unique, is_valid, backs_constraint, definition
FROM sales.index_usage ORDER BY table_name, index_name;
SELECT bool_and(scans >= 0 AND size_bytes > 0 AND size IS NOT NULL) AS figures FROM sales.index_usage;

SELECT table_name FROM sales.table_health ORDER BY table_name;
SELECT bool_and(live_rows >= 0 AND dead_rows >= 0 AND table_bytes >= 0 AND total_bytes >= table_bytes) AS figures
FROM sales.table_health;
ANALYZE sales.monthly_sales;
SELECT bloat_bytes_estimate >= 0 AS estimated_after_analyze, last_analyze IS NOT NULL AS analyzed
FROM sales.table_health WHERE table_name = 'sales.monthly_sales';

-- Without pg_stat_statements created in this database: empty, with a NOTICE
-- and a HINT, and the extension is not created by the read.
SELECT count(*) FROM sales.slow_queries;
SELECT count(*) FROM sales.statement_stats();
SELECT count(*) AS created FROM pg_extension WHERE extname = 'pg_stat_statements';

SELECT index_name, reason, fix FROM sales.index_report(0, 0) WHERE reason <> 'unused' ORDER BY 1;
SELECT count(*) >= 0 AS runs FROM sales.index_report(NULL, NULL);
