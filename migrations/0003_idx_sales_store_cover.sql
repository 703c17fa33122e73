-- no-transaction
-- Per-store listing sorted by period with the totals the list and summary
-- endpoints read, without touching the heap.
CREATE INDEX CONCURRENTLY IF NOT EXISTS monthly_sales_store_cover_idx
    ON sales.monthly_sales (store_id, year DESC, month DESC)
    INCLUDE (total_sales, total_customers, version);
