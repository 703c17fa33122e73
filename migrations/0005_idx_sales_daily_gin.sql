-- no-transaction
-- Containment queries on daily data (`daily_data @> '{"1": {"sales": 0}}'`).
CREATE INDEX CONCURRENTLY IF NOT EXISTS monthly_sales_daily_data_gin
    ON sales.monthly_sales USING gin (daily_data jsonb_path_ops);
