-- no-transaction
-- Listing and summaries by period across stores; covers totals so summaries
-- need not visit the heap.
CREATE INDEX CONCURRENTLY IF NOT EXISTS monthly_sales_period_idx
    ON sales.monthly_sales (year, month, store_id)
    INCLUDE (total_sales, total_customers, days_reported, version);
