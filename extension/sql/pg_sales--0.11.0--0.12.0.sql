-- pg_sales 0.11.0 -> 0.12.0.
--
-- A role that may write sales rows or stores needs no privilege on
-- sales.events (which holds every user's events, emails and private
-- notifications included) to have its changes' events written. The event
-- triggers written in plpgsql (deletes, stores, truncates) run as their
-- owner, with a fixed search_path, refuse to run for any other table than
-- the extension's, and may be attached to a table by nobody else (EXECUTE
-- revoked from PUBLIC); the library reads and writes the log as its owner,
-- with a fixed search_path, where it does so on a writer's behalf (the
-- delivery clock's first read, a batch's batch-completed event, the
-- commit's NOTIFY lookup). Before, deletes and store writes needed INSERT
-- on the log, and every write SELECT on it.

CREATE OR REPLACE FUNCTION sales.tg_sales_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE job bigint := nullif(current_setting('sales.job_id', true), '')::bigint;
BEGIN
    -- Runs as its owner: only on the tables the extension attaches it to
    -- (a trigger on another table, say a temporary look-alike, would
    -- write forged events with the owner's rights).
    IF TG_RELID <> 'sales.monthly_sales'::regclass THEN
        RAISE EXCEPTION 'pg_sales: sales.tg_sales_deleted() is a trigger of sales.monthly_sales only, not of %', TG_RELID::regclass
            USING ERRCODE = '42501';
    END IF;
    IF TG_LEVEL = 'ROW' THEN
        INSERT INTO sales.events (kind, store_id, actor_id, row_id, row_version, payload)
        VALUES ('sales-data-deleted', OLD.store_id, sales.current_actor(), OLD.id, OLD.version + 1,
                jsonb_build_object('id', OLD.id, 'storeId', OLD.store_id, 'year', OLD.year,
                                   'month', OLD.month, 'version', OLD.version + 1,
                                   'previousDays', OLD.daily_data)
                || CASE WHEN job IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('jobId', job) END);
        RETURN NULL;
    END IF;
    INSERT INTO sales.events (kind, store_id, actor_id, row_id, row_version, payload)
    SELECT 'sales-data-deleted', o.store_id, sales.current_actor(), o.id, o.version + 1,
           jsonb_build_object('id', o.id, 'storeId', o.store_id, 'year', o.year, 'month', o.month,
                              'version', o.version + 1, 'previousDays', o.daily_data)
           || CASE WHEN job IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('jobId', job) END
    FROM old_rows o;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION sales.tg_stores_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- Runs as its owner: only on the tables the extension attaches it to
    -- (a trigger on another table, say a temporary look-alike, would
    -- write forged events with the owner's rights).
    IF TG_RELID <> 'sales.stores'::regclass THEN
        RAISE EXCEPTION 'pg_sales: sales.tg_stores_changed() is a trigger of sales.stores only, not of %', TG_RELID::regclass
            USING ERRCODE = '42501';
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO sales.events (kind, store_id, actor_id, row_id, row_version, payload)
        SELECT 'store-created', n.id, sales.current_actor(), n.id, n.version, sales.store_doc(n)
            FROM new_rows n ORDER BY n.id;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO sales.events (kind, store_id, actor_id, row_id, row_version, payload)
        SELECT CASE WHEN n.status <> o.status THEN 'store-status-changed' ELSE 'store-updated' END,
               n.id, sales.current_actor(), n.id, n.version,
               sales.store_doc(n) || jsonb_build_object('previousStatus', o.status)
            FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.version <> o.version ORDER BY n.id;
    ELSE
        INSERT INTO sales.events (kind, store_id, actor_id, row_id, row_version, payload)
        SELECT 'store-deleted', o.id, sales.current_actor(), o.id, o.version + 1,
               jsonb_build_object('id', o.id, 'code', o.code, 'version', o.version + 1)
            FROM old_rows o ORDER BY o.id;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION sales.tg_truncated() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    seq text;
    restarted boolean;
    top bigint;
BEGIN
    -- Runs as its owner: only on the tables the extension attaches it to
    -- (a trigger on another table, say a temporary look-alike, would
    -- write forged events with the owner's rights).
    IF TG_RELID NOT IN ('sales.monthly_sales'::regclass, 'sales.stores'::regclass) THEN
        RAISE EXCEPTION 'pg_sales: sales.tg_truncated() is a trigger of sales.monthly_sales and sales.stores only, not of %', TG_RELID::regclass
            USING ERRCODE = '42501';
    END IF;
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

REVOKE EXECUTE ON FUNCTION sales.tg_sales_deleted(), sales.tg_stores_changed(), sales.tg_truncated() FROM PUBLIC;

-- A version is below 2^62 (it is 1 on insert and grows by one a change), so
-- that no update or delete event's version + 1 overflows: a writer that
-- chose a version of 2^63 - 1 on insert planted a row whose updates wrote
-- no event and which nobody could delete. Checked against the rows there.
ALTER TABLE sales.stores
    ADD CONSTRAINT stores_version_check CHECK (version BETWEEN 1 AND 4611686018427387903);
ALTER TABLE sales.monthly_sales
    ADD CONSTRAINT monthly_sales_version_check CHECK (version BETWEEN 1 AND 4611686018427387903);
