-- Statistics of the event log sized to what is asked of it.
--
-- The log is append-only and grows by one row per write, so autovacuum
-- analyzes it after every 10% of growth, while its writers are busiest. With
-- the default target ANALYZE samples 30,000 rows and builds statistics of
-- every column, the jsonb payload included (sorting sampled payloads): about
-- 0.4 s of CPU per run on a 800k-row log, paid on the commit path's CPU.
-- No query filters or groups on the payload, and the other columns are read
-- through their indexes (seq, row_id) or by simple ranges, for which a
-- sample of 3,000 rows (target 10) estimates well enough.
ALTER TABLE sales.events ALTER COLUMN payload SET STATISTICS 0;
ALTER TABLE sales.events ALTER COLUMN id SET STATISTICS 10;
ALTER TABLE sales.events ALTER COLUMN kind SET STATISTICS 10;
ALTER TABLE sales.events ALTER COLUMN store_id SET STATISTICS 10;
ALTER TABLE sales.events ALTER COLUMN user_id SET STATISTICS 10;
ALTER TABLE sales.events ALTER COLUMN actor_id SET STATISTICS 10;
ALTER TABLE sales.events ALTER COLUMN row_id SET STATISTICS 10;
ALTER TABLE sales.events ALTER COLUMN row_version SET STATISTICS 10;
ALTER TABLE sales.events ALTER COLUMN xid SET STATISTICS 10;
ALTER TABLE sales.events ALTER COLUMN created_at SET STATISTICS 10;
ALTER TABLE sales.events ALTER COLUMN seq SET STATISTICS 10;
