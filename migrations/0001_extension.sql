-- The pg_sales extension holds the schema `sales`: tables, constraints,
-- triggers and functions.
CREATE EXTENSION IF NOT EXISTS pg_sales;
