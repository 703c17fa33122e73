-- Extended statistics for columns that move together in sales.monthly_sales.
--
-- The planner multiplies the selectivities of separate conditions as if the
-- columns were independent. Here they are not: a store only has months from
-- its opening on, and the data covers a window of months that rarely starts
-- in January, so `year = 2024 AND month = 9` or a GROUP BY year, month is
-- misestimated (by 2x in tests/tests/extension_statistics.rs), which can
-- pick the wrong join or aggregate plan for summaries and exports.
-- ndistinct fixes group counts, dependencies the (store, period) filters,
-- mcv the common (year, month) combinations. ANALYZE of the table
-- (autovacuum, or `sales-server maintain`) rebuilds them.
--
-- A migration rather than part of the extension, like the indexes: it is
-- the layout of this application's data, and CREATE STATISTICS must follow
-- the table, which the extension creates last.
CREATE STATISTICS IF NOT EXISTS sales.monthly_sales_store_period (ndistinct, dependencies, mcv)
    ON store_id, year, month FROM sales.monthly_sales;
-- The (year, month) pair on its own: its MCV list holds every month of a
-- typical window, where the three-column one keeps only the commonest
-- (store, year, month) combinations, which are all unique.
CREATE STATISTICS IF NOT EXISTS sales.monthly_sales_period (ndistinct, mcv)
    ON year, month FROM sales.monthly_sales;
ANALYZE sales.monthly_sales;
