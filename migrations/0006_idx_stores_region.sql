-- no-transaction
-- Store lists filtered by region and status, covering what lists show.
CREATE INDEX CONCURRENTLY IF NOT EXISTS stores_region_status_idx
    ON sales.stores (region, status) INCLUDE (code, name);
