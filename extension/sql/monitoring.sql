-- Monitoring views over the sales tables: read-only, safe to poll, and
-- harmless when an optional piece (pg_stat_statements) is missing.
-- (sales.event_delivery lives with the event machinery.)
--
-- Loaded before tables.sql (see lib.rs): nothing here may name a sales table
-- at creation time; the views read the statistics catalogs by schema name.
--
-- sales.statement_stats() runs with `search_path = pg_catalog, pg_temp`
-- (see surface.sql).
--
-- A change here needs the same change in the next upgrade script
-- (sql/pg_sales--<old>--<new>.sql); tests/tests/extension_upgrade.rs fails
-- when an upgraded database differs from a fresh install.

-- How each index of the sales tables is used, largest first. Scan counts are
-- cumulative since the statistics were last reset
-- (pg_stat_reset / stats_reset of the database).
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
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
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
