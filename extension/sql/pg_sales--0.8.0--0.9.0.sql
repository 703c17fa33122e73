-- pg_sales 0.8.0 -> 0.9.0 (ALTER EXTENSION pg_sales UPDATE TO '0.9.0').
--
-- Runs in one transaction inside ALTER EXTENSION; every object created here
-- becomes a member of the extension. It must leave a database exactly as a
-- fresh CREATE EXTENSION pg_sales VERSION '0.9.0' would:
-- tests/tests/extension_upgrade.rs compares the two catalogs.
\echo Use "ALTER EXTENSION pg_sales UPDATE TO '0.9.0'" to load this file. \quit

---------------------------------------------------------------------------
-- TRUNCATE ... RESTART IDENTITY of the sales table no longer lets new
-- records take ids the event log still holds (events.sql): the id sequence
-- is moved past every id in sales.events and sales.event_history.
---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION sales.tg_truncated() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    seq text;
    restarted boolean;
    top bigint;
BEGIN
    INSERT INTO sales.events (kind, actor_id, payload)
    VALUES ('table-truncated', sales.current_actor(), jsonb_build_object('table', TG_TABLE_NAME));
    IF TG_TABLE_NAME = 'monthly_sales' THEN
        seq := pg_get_serial_sequence('sales.monthly_sales', 'id');
        EXECUTE format('SELECT NOT is_called FROM %s', seq) INTO restarted;
        IF restarted THEN
            SELECT greatest((SELECT max(row_id) FROM sales.events),
                            (SELECT max(row_id) FROM sales.event_history))
            INTO top;
            IF top IS NOT NULL THEN
                PERFORM setval(seq, top);
            END IF;
        END IF;
    END IF;
    RETURN NULL;
END $$;
