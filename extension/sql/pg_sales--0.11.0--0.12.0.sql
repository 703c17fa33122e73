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
        -- The region too: readers give a deleted store's earlier rows,
        -- and their deletions, to that region's followers.
        SELECT 'store-deleted', o.id, sales.current_actor(), o.id, o.version + 1,
               jsonb_build_object('id', o.id, 'code', o.code, 'region', o.region, 'version', o.version + 1)
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

-- The extension's SQL and PL/pgSQL functions resolve names in a fixed
-- search path, not in their caller's: in a privileged caller's search path,
-- a function or operator of another schema taking the exact argument types
-- (`cardinality(text[])`, `unnest(bigint[])`, `jsonb_object_agg(text,
-- jsonb)`, `text[] || text`) was chosen over the polymorphic or "any"
-- built-in even with pg_catalog searched first, and ran with that caller's
-- rights. Each runs with `search_path = pg_catalog, pg_temp` (as the event
-- triggers above do), and so does the SQL they run with EXECUTE and the
-- statements of the Rust functions they call; their bodies are unchanged.
ALTER FUNCTION sales.statement_stats() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.sort_sql(text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.list_sales(bigint[], text, integer, integer, text, text, numeric, numeric, text[], text[], text, integer, bigint) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.get_sales(bigint, text[], text[]) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.sales_summary(text, bigint[], text, integer, integer, text, text, numeric, numeric) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.list_stores(text, text, text[], integer, bigint) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.export_key_arg(text, boolean) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.export_monthly(bigint[], text, integer, integer, text, text, numeric, numeric, text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.export_daily(bigint[], text, integer, integer, text, text, numeric, numeric, text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.summary(text, text, text, integer, text, bigint[], text, integer, integer, text, text, numeric, numeric) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.tg_stores_version() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.emit(text, jsonb, bigint, bigint) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.announce(text, text, jsonb) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.notify_user(bigint, text, jsonb) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.transaction_events() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.event_position(bigint) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.events_after_seq(bigint, integer, integer) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.events_next(bigint, integer, integer) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.events_since(bigint, integer) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.events_head() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.event_holders() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.index_report(bigint, bigint) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.daily_undo(jsonb, jsonb) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.record_versions(bigint, bigint) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.record_chain(bigint) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.record_stores(bigint) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.history_entry(sales.record_version) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.history(bigint, integer, bigint) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.get_sales_as_of(bigint, timestamptz, text[], text[]) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.batch_upsert(jsonb, text, boolean, bigint[]) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.batch_delete(bigint[], jsonb, boolean, bigint[]) SET search_path = pg_catalog, pg_temp;

-- The functions inlined into their callers' queries (a SET clause would
-- prevent that: the API's lists build a document per row) name every
-- function and operator with its schema instead.
CREATE OR REPLACE FUNCTION sales.store_doc(s sales.stores) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT pg_catalog.jsonb_build_object(
        'id', s.id, 'code', s.code, 'name', s.name, 'region', s.region,
        'status', s.status, 'version', s.version,
        'createdAt', s.created_at, 'updatedAt', s.updated_at)
$$;

CREATE OR REPLACE FUNCTION sales.sales_doc(m sales.monthly_sales) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT pg_catalog.jsonb_build_object(
        'id', m.id, 'storeId', m.store_id, 'year', m.year, 'month', m.month,
        'dailyData', m.daily_data, 'totalSales', m.total_sales,
        'totalCustomers', m.total_customers, 'daysReported', m.days_reported,
        'version', m.version, 'createdAt', m.created_at, 'updatedAt', m.updated_at)
$$;

CREATE OR REPLACE FUNCTION sales.sales_doc(m sales.monthly_sales, s sales.stores) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT sales.sales_doc(m) OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('store', sales.store_doc(s))
$$;

CREATE OR REPLACE FUNCTION sales.current_actor() RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN pg_catalog.current_setting('sales.user_id', true) OPERATOR(pg_catalog.<>) ''
                THEN pg_catalog.current_setting('sales.user_id', true)::bigint END
$$;

-- sales.prune_events: a retention reaching back before the earliest time a
-- timestamp holds ('1000000 years') keeps everything it covers, where it
-- failed with 22008 (timestamp out of range).
CREATE OR REPLACE FUNCTION sales.prune_events(retention interval DEFAULT '7 days', history_retention interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint := 0;
    expired bigint;
    horizon bigint;
    last_seq bigint;
    keep_from bigint;
    cut bigint;
    log_since timestamptz;
    history_since timestamptz;
BEGIN
    IF retention IS NULL OR retention < interval '0' THEN
        RAISE EXCEPTION 'retention must be a non-negative interval' USING ERRCODE = '22023';
    END IF;
    IF history_retention IS NOT NULL AND history_retention < retention THEN
        RAISE EXCEPTION 'history_retention must be at least retention (%), not %', retention, history_retention
            USING ERRCODE = '22023';
    END IF;
    -- The oldest times kept; -infinity for a retention that reaches back
    -- past what a timestamp holds (now() - retention is out of range).
    BEGIN
        log_since := now() - retention;
    EXCEPTION WHEN datetime_field_overflow THEN
        log_since := '-infinity';
    END;
    BEGIN
        history_since := now() - coalesce(history_retention, retention);
    EXCEPTION WHEN datetime_field_overflow THEN
        history_since := '-infinity';
    END;
    DELETE FROM sales.event_history h WHERE h.created_at < history_since;
    GET DIAGNOSTICS expired = ROW_COUNT;
    horizon := sales.events_horizon();
    SELECT e.seq INTO last_seq FROM sales.events e WHERE e.seq < horizon ORDER BY e.seq DESC LIMIT 1;
    IF last_seq IS NULL THEN
        IF expired > 0 THEN
            PERFORM sales.emit('events-pruned', jsonb_build_object('pruned', 0, 'expired', expired));
        END IF;
        RETURN 0;
    END IF;
    SELECT e.seq INTO keep_from FROM sales.events e
    WHERE e.created_at >= log_since AND e.seq <= last_seq
    ORDER BY e.seq LIMIT 1;
    cut := least(coalesce(keep_from, last_seq), last_seq);
    IF history_retention IS NOT NULL AND history_retention > retention THEN
        INSERT INTO sales.event_history (row_id, id, kind, store_id, actor_id, row_version, payload, created_at)
        SELECT e.row_id, e.id, e.kind, e.store_id, e.actor_id, e.row_version, e.payload, e.created_at
        FROM sales.events e
        WHERE e.seq < cut AND e.row_id IS NOT NULL
          AND e.kind IN ('sales-data-created', 'sales-data-updated', 'sales-data-deleted')
          AND e.created_at >= history_since
        ON CONFLICT DO NOTHING;
    END IF;
    DELETE FROM sales.events e WHERE e.seq < cut;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 OR expired > 0 THEN
        PERFORM sales.emit('events-pruned', jsonb_build_object('pruned', n, 'expired', expired));
    END IF;
    RETURN n;
END $$;

-- sales.daily_data_valid() is false whenever sales.daily_data_errors()
-- reports something, a year outside 2000..2100 and a month outside 1..12
-- included (it was true for those, leaving them to their own constraints).
-- The CHECK constraint on monthly_sales.daily_data keeps that leniency, so
-- that a bad year or month is refused by its own constraint, which names
-- the column (constraints are checked in name order, and
-- monthly_sales_daily_data_check comes first): it calls
-- sales.daily_data_check(), which is the function it called until now,
-- renamed and pointed at a library entry of the same behaviour. No row is
-- judged differently, so nothing is checked again; sales.daily_data_valid
-- is created anew.
ALTER FUNCTION sales.daily_data_valid(integer, integer, jsonb) RENAME TO daily_data_check;
CREATE OR REPLACE FUNCTION sales.daily_data_check(
	"year" INT, /* i32 */
	"month" INT, /* i32 */
	"daily" jsonb /* RawJsonb */
) RETURNS bool /* bool */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'daily_data_check_wrapper';
CREATE FUNCTION sales.daily_data_valid(
	"year" INT, /* i32 */
	"month" INT, /* i32 */
	"daily" jsonb /* RawJsonb */
) RETURNS bool /* bool */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'daily_data_valid_wrapper';
