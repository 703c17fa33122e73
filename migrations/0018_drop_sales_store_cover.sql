-- no-transaction
-- One store's months (listings, exports, per-store summaries) are found by
-- the unique key (store_id, year, month), read backwards for the newest
-- first; the store index of 0003 had the same keys in that order plus the
-- totals. Covering them saved a heap visit for at most a store's few dozen
-- months, and cost an index entry on every insert and update
-- (README: "Indexes").
DROP INDEX CONCURRENTLY IF EXISTS sales.monthly_sales_store_cover_idx;
