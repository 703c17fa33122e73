-- The definition of every object of the installed pg_sales extension (see
-- BareDb::extension_fingerprint): an upgraded database must match a fresh one.
WITH members AS (
    SELECT d.classid, d.objid
    FROM pg_depend d JOIN pg_extension x ON x.oid = d.refobjid
    WHERE d.refclassid = 'pg_extension'::regclass AND x.extname = 'pg_sales' AND d.deptype = 'e'
), rels AS (
    SELECT c.oid, c.relkind FROM members m JOIN pg_class c ON c.oid = m.objid
    WHERE m.classid = 'pg_class'::regclass
)
SELECT pg_describe_object(m.classid, m.objid, 0) AS object,
       coalesce(obj_description(m.objid, (SELECT relname FROM pg_class WHERE oid = m.classid)), '') AS comment,
       CASE m.classid
           WHEN 'pg_proc'::regclass THEN pg_get_functiondef(m.objid)
               || coalesce((SELECT E'\nacl ' || p.proacl::text FROM pg_proc p WHERE p.oid = m.objid), '')
           WHEN 'pg_statistic_ext'::regclass THEN pg_get_statisticsobjdef(m.objid)
           WHEN 'pg_event_trigger'::regclass THEN (SELECT concat_ws(' ', evtevent, evtfoid::regproc, evtenabled, evttags::text) FROM pg_event_trigger WHERE oid = m.objid)
           WHEN 'pg_type'::regclass THEN format_type(m.objid, NULL) || coalesce(
               (SELECT E'\n' || string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), E'\n' ORDER BY a.attnum)
                FROM pg_type t JOIN pg_attribute a ON a.attrelid = t.typrelid
                WHERE t.oid = m.objid AND a.attnum > 0 AND NOT a.attisdropped), '')
           WHEN 'pg_class'::regclass THEN
               (SELECT concat_ws(E'\n', c.relkind, c.reloptions::text, c.relacl::text,
                    CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END,
                    (SELECT string_agg(concat_ws(' ', a.attname, format_type(a.atttypid, a.atttypmod),
                                                 a.attnotnull, a.attidentity, a.attgenerated, a.attcompression,
                                                 pg_get_expr(ad.adbin, ad.adrelid)), E'\n' ORDER BY a.attnum)
                     FROM pg_attribute a LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
                     WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
                    (SELECT string_agg(k.conname || ' ' || pg_get_constraintdef(k.oid), E'\n' ORDER BY k.conname)
                     FROM pg_constraint k WHERE k.conrelid = c.oid),
                    (SELECT string_agg(pg_get_indexdef(i.indexrelid) || ' ' || coalesce(obj_description(i.indexrelid, 'pg_class'), ''), E'\n' ORDER BY pg_get_indexdef(i.indexrelid))
                     FROM pg_index i WHERE i.indrelid = c.oid),
                    (SELECT string_agg(pg_get_triggerdef(t.oid), E'\n' ORDER BY t.tgname)
                     FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal),
                    (SELECT string_agg(pol.polname || ' ' || pg_get_expr(pol.polqual, pol.polrelid), E'\n')
                     FROM pg_policy pol WHERE pol.polrelid = c.oid))
                FROM pg_class c WHERE c.oid = m.objid)
           ELSE ''
       END AS definition
FROM members m
UNION ALL
SELECT 'extension config', '', (SELECT string_agg(t::regclass::text || ' ' || coalesce(x.extcondition[i], ''), ', ' ORDER BY t::regclass::text)
                               FROM pg_extension x, unnest(x.extconfig) WITH ORDINALITY AS u(t, i) WHERE x.extname = 'pg_sales')
ORDER BY 1;
