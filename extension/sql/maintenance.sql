-- Index health for the sales tables: what is wrong and the statement that
-- fixes it. The statements use CONCURRENTLY, which cannot run inside a
-- function or transaction, so `sales-server maintain` (or an operator) runs
-- them one by one.
--
-- reason:
--   invalid    a CREATE/REINDEX ... CONCURRENTLY that failed left it unusable
--   duplicate  same table, access method, key and INCLUDE columns, operator
--              classes, collations, sort options, expressions and predicate as
--              another valid index that is kept (constraint-backed, unique,
--              oldest first); a non-unique index is a duplicate of a unique twin
--   unused     never scanned since statistics were reset (neither it nor any
--              twin it is kept over: the planner may pick either of two
--              identical indexes, and a dropped twin's scans move to the one
--              kept), at least min_unused_bytes, backs no constraint, not
--              marked required (see below)
--              (advisory: `maintain` drops these only when asked)
--   bloated    a btree at least min_bloat_bytes and over twice the size its
--              rows need (estimate from pg_stats widths)
-- Runs with `search_path = pg_catalog, pg_temp` (see surface.sql).
CREATE FUNCTION sales.index_report(min_unused_bytes bigint DEFAULT 1048576, min_bloat_bytes bigint DEFAULT 8388608)
RETURNS TABLE (index_name text, table_name text, size_bytes bigint, reason text, detail text, fix text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
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
                                    ORDER BY backs_constraint DESC, required DESC, uniq DESC, indexrelid) AS keeper,
           sum(scans) OVER (PARTITION BY indrelid, def, valid) AS twin_scans
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
WHERE r.valid AND r.rank_in_twins = 1 AND r.twin_scans = 0 AND NOT r.backs_constraint AND NOT r.uniq AND NOT r.required
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
