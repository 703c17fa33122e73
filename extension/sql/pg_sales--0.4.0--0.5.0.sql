-- pg_sales 0.4.0 -> 0.5.0 (ALTER EXTENSION pg_sales UPDATE TO '0.5.0').
--
-- Runs in one transaction inside ALTER EXTENSION; every object created here
-- becomes a member of the extension. It must leave a database exactly as a
-- fresh CREATE EXTENSION pg_sales VERSION '0.5.0' would:
-- tests/tests/extension_upgrade.rs compares the two catalogs.
\echo Use "ALTER EXTENSION pg_sales UPDATE TO '0.5.0'" to load this file. \quit

---------------------------------------------------------------------------
-- A sales row's totals, version and timestamps kept by one Rust row trigger
-- (src/rows.rs) instead of three generated columns and a PL/pgSQL trigger.
-- The totals keep their stored values (DROP EXPRESSION rewrites nothing);
-- from now on the trigger computes them on every insert and update.
---------------------------------------------------------------------------

ALTER TABLE sales.monthly_sales
    ALTER COLUMN total_sales DROP EXPRESSION,
    ALTER COLUMN total_customers DROP EXPRESSION,
    ALTER COLUMN days_reported DROP EXPRESSION;

DROP TRIGGER monthly_sales_bump_version ON sales.monthly_sales;
DROP FUNCTION sales.tg_sales_version();

CREATE FUNCTION sales."tg_sales_row"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', 'tg_sales_row_wrapper';

CREATE TRIGGER monthly_sales_row BEFORE INSERT OR UPDATE ON sales.monthly_sales
    FOR EACH ROW EXECUTE FUNCTION sales.tg_sales_row();
