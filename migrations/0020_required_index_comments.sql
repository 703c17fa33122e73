-- The two indexes migrations 0002 and 0006 add serve queries the product
-- issues (tests/tests/indexes_used.rs), but only when the data is large
-- enough or the reads reach this server: with DATABASE_REPLICA_URL the
-- list, summary and store reads scan them on the replica, and the primary
-- counts no scans. Marked required, `sales.index_report()` never proposes
-- dropping them (`maintain --drop-unused` did, and `migrate` made them
-- again at the next start).
--
-- Either may be missing here (dropped by an earlier `maintain
-- --drop-unused`, or left out of a restored dump): the server then makes it
-- again, with its comment, right after the migrations (restore_table_settings).
DO $$
BEGIN
    IF to_regclass('sales.monthly_sales_period_idx') IS NOT NULL THEN
        COMMENT ON INDEX sales.monthly_sales_period_idx IS
            'pg_sales: required by lists, summaries and exports filtered by period across stores';
    END IF;
    IF to_regclass('sales.stores_region_status_idx') IS NOT NULL THEN
        COMMENT ON INDEX sales.stores_region_status_idx IS
            'pg_sales: required by region filters and the stores list';
    END IF;
END $$;
