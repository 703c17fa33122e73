-- no-transaction
-- The partial index for recent months (0004) had the keys of the period
-- index (0002) and a subset of its INCLUDE columns, so every query it served
-- the period index serves as well, by an index-only scan of the same shape.
-- Recent months are where nearly every write lands, so it cost an index
-- entry on almost every insert and update for no plan the period index
-- cannot give (README: "Indexes").
DROP INDEX CONCURRENTLY IF EXISTS sales.monthly_sales_recent_idx;
