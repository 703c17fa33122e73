-- pg_sales 0.6.0 -> 0.7.0 (ALTER EXTENSION pg_sales UPDATE TO '0.7.0').
--
-- Runs in one transaction inside ALTER EXTENSION; every object created here
-- becomes a member of the extension. It must leave a database exactly as a
-- fresh CREATE EXTENSION pg_sales VERSION '0.7.0' would:
-- tests/tests/extension_upgrade.rs compares the two catalogs.
\echo Use "ALTER EXTENSION pg_sales UPDATE TO '0.7.0'" to load this file. \quit

---------------------------------------------------------------------------
-- An update's event is written by the row trigger (sales.tg_sales_row) as
-- the row goes in, instead of by monthly_sales_events after the statement:
-- monthly_sales_events now fires on INSERT only. (The 0.7.0 library reads
-- the trigger's definition: under the 0.6.0 one, which still fires on
-- UPDATE, the row trigger leaves updates' events to it, so no event is
-- written twice while the library is newer than the SQL.) The trigger keeps
-- its enabled state (disabled, ALWAYS or REPLICA); a database that dropped it
-- stays without it.
---------------------------------------------------------------------------

DO $$
DECLARE state "char";
BEGIN
    SELECT tgenabled INTO state FROM pg_trigger
    WHERE tgrelid = 'sales.monthly_sales'::regclass AND tgname = 'monthly_sales_events';
    IF state IS NULL THEN
        -- Dropped on purpose (no sales events wanted): leave it so.
        RETURN;
    END IF;
    DROP TRIGGER monthly_sales_events ON sales.monthly_sales;
    CREATE TRIGGER monthly_sales_events AFTER INSERT ON sales.monthly_sales
        FOR EACH ROW EXECUTE FUNCTION sales.tg_sales_changed();
    IF state = 'D' THEN
        ALTER TABLE sales.monthly_sales DISABLE TRIGGER monthly_sales_events;
    ELSIF state = 'A' THEN
        ALTER TABLE sales.monthly_sales ENABLE ALWAYS TRIGGER monthly_sales_events;
    ELSIF state = 'R' THEN
        ALTER TABLE sales.monthly_sales ENABLE REPLICA TRIGGER monthly_sales_events;
    END IF;
END $$;
