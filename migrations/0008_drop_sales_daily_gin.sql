-- no-transaction
-- The GIN index on daily_data (0005) served no query the product issues
-- (tests/tests/indexes_used.rs): jsonb_path_ops answers containment and
-- equality (`@>`), not the day-level questions a chain asks ("days with
-- sales above X"), which the period and store indexes serve by narrowing to
-- the months asked for. It wrote about 60 entries per row and took about
-- half of a batch upsert's CPU (README: Batch upsert).
DROP INDEX CONCURRENTLY IF EXISTS sales.monthly_sales_daily_data_gin;
