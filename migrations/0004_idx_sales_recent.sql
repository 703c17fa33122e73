-- no-transaction
-- Dashboards read recent months far more than old ones: a small partial
-- index for them. The boundary is a constant (index predicates must be
-- immutable); a later migration moves it forward.
CREATE INDEX CONCURRENTLY IF NOT EXISTS monthly_sales_recent_idx
    ON sales.monthly_sales (year, month, store_id)
    INCLUDE (total_sales, total_customers)
    WHERE year >= 2025;
