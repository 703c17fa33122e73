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
--
-- Those functions refuse to run while a table of the schema belongs to a
-- role that is neither the one they run as nor a superuser (whoever owns a
-- table can attach code to it, which they would run with their owner's
-- rights): a database whose tables were given to the server's role by
-- ALTER ... OWNER alone gets 42501 on deletes, store changes and truncates
-- until a superuser runs SELECT sales.hand_over('that role'), which gives
-- it the functions along with the tables.

-- The functions of this schema that run as their owner (SECURITY DEFINER:
-- the event triggers written in plpgsql, sales.event_log_epoch) read and
-- write its tables. Whoever owns one of those tables can attach code to it
-- (a trigger, a rule, a column default, an index expression) that such a
-- function would then run with its owner's rights: a server role given the
-- tables could act as the superuser that created the extension. So each
-- of them first calls this, which refuses (42501) unless every table,
-- view, sequence and composite type of the schema belongs to the role it
-- runs as or to a superuser. sales.hand_over gives one role the tables
-- together with those functions.
CREATE FUNCTION sales.check_owners() RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    me oid := (SELECT r.oid FROM pg_roles r WHERE r.rolname = current_user);
    other text;
BEGIN
    SELECT format('%s is owned by %s', c.oid::regclass, c.relowner::regrole) INTO other
    FROM pg_class c
    WHERE c.relnamespace = 'sales'::regnamespace
      AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f', 'c')
      AND c.relowner <> me
      AND NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = c.relowner AND r.rolsuper)
    ORDER BY c.oid
    LIMIT 1;
    IF other IS NOT NULL THEN
        RAISE EXCEPTION 'pg_sales: % while the functions that write the event log run as %', other, current_user
            USING ERRCODE = '42501',
                  DETAIL = 'Such a function would run code that the owner of that table attached to it with the rights of ' || current_user || '.',
                  HINT = 'A superuser gives one role the schema''s tables and these functions together: SELECT sales.hand_over(''role'').';
    END IF;
END $$;

-- Gives `new_owner` every table, sequence and composite type of the
-- schema with the functions that run as their owner (so that those run as
-- `new_owner`, never as a more privileged role over tables `new_owner`
-- controls; see sales.check_owners), SELECT on its views, and USAGE and
-- CREATE on the schema (the server's migrations add indexes and
-- statistics to its tables). For a superuser, once after CREATE
-- EXTENSION, and again after each ALTER EXTENSION pg_sales UPDATE
-- (whatever an update creates belongs to whoever ran it). The views and
-- the schema's other functions stay their owner's: a view's owner could
-- redefine it to call a function of its own, which would run as whoever
-- reads the view (a superuser looking at the monitoring views), and none
-- of those functions runs code `new_owner` can change when a superuser
-- calls it. Returns the number of objects given.
CREATE FUNCTION sales.hand_over(new_owner regrole) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    o record;
    given integer := 0;
BEGIN
    IF NOT coalesce((SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user), false) THEN
        RAISE EXCEPTION 'pg_sales: sales.hand_over() is for superusers' USING ERRCODE = '42501';
    END IF;
    IF new_owner IS NULL THEN
        RAISE EXCEPTION 'pg_sales: sales.hand_over() needs a role' USING ERRCODE = '22004';
    END IF;
    -- Tables first: a table takes the sequences of its columns along.
    FOR o IN
        SELECT c.oid, c.relkind FROM pg_class c
        WHERE c.relnamespace = 'sales'::regnamespace
          AND c.relkind IN ('r', 'p', 'S', 'f', 'c')
        ORDER BY c.relkind = 'S', c.oid
    LOOP
        CONTINUE WHEN (SELECT c.relowner FROM pg_class c WHERE c.oid = o.oid) = new_owner;
        EXECUTE format('ALTER %s %s OWNER TO %s',
                       CASE o.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'f' THEN 'FOREIGN TABLE'
                                      WHEN 'c' THEN 'TYPE' ELSE 'TABLE' END,
                       o.oid::regclass, new_owner);
        given := given + 1;
    END LOOP;
    FOR o IN
        SELECT c.oid FROM pg_class c
        WHERE c.relnamespace = 'sales'::regnamespace AND c.relkind IN ('v', 'm')
        ORDER BY c.oid
    LOOP
        EXECUTE format('GRANT SELECT ON %s TO %s', o.oid::regclass, new_owner);
    END LOOP;
    FOR o IN
        SELECT p.oid FROM pg_proc p
        WHERE p.pronamespace = 'sales'::regnamespace AND p.prosecdef AND p.proowner <> new_owner
        ORDER BY p.oid
    LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO %s', o.oid::regprocedure, new_owner);
        given := given + 1;
    END LOOP;
    EXECUTE format('GRANT USAGE, CREATE ON SCHEMA sales TO %s', new_owner);
    RETURN given;
END $$;
REVOKE EXECUTE ON FUNCTION sales.hand_over(regrole) FROM PUBLIC;

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
    PERFORM sales.check_owners();
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
    PERFORM sales.check_owners();
    IF TG_OP = 'INSERT' THEN
        INSERT INTO sales.events (kind, store_id, actor_id, row_id, row_version, payload)
        SELECT 'store-created', n.id, sales.current_actor(), n.id, n.version, sales.store_doc(n)
            FROM new_rows n ORDER BY n.id;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO sales.events (kind, store_id, actor_id, row_id, row_version, payload)
        SELECT CASE WHEN n.status <> o.status THEN 'store-status-changed' ELSE 'store-updated' END,
               n.id, sales.current_actor(), n.id, n.version,
               -- What changed that followers act on: a status, and a
               -- region (a dashboard following regions reloads a store
               -- that moved, without remembering every store's region).
               sales.store_doc(n) || jsonb_build_object('previousStatus', o.status,
                                                        'previousRegion', o.region)
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
    PERFORM sales.check_owners();
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

-- A truncated record's history and `asOf` answer what they answered before
-- the TRUNCATE. The walk back through a record's events starts from its
-- row (an event names the days it changed and their old values, never the
-- new ones): after a TRUNCATE, which writes no delete event, there was
-- none, and every version came out wrong (the newest with every day gone,
-- older ones with only the days they changed, `asOf` a null dailyData).
-- Before a TRUNCATE of sales.monthly_sales, sales.tg_sales_truncating now
-- keeps each row's last state in sales.event_history (kind
-- `sales-data-truncated`), where sales.record_row finds it and the walk
-- starts; the history readers leave those rows out of the events they
-- walk. A row removed without a delete event and without such a copy (a
-- DELETE or TRUNCATE in replica mode, a TRUNCATE before this version) is
-- answered as not known (`known` false, `asOf` PSGON), no longer rebuilt
-- from the changed days alone.
CREATE FUNCTION sales.tg_sales_truncating() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    mark bigint;
BEGIN
    IF TG_RELID <> 'sales.monthly_sales'::regclass THEN
        RAISE EXCEPTION 'pg_sales: sales.tg_sales_truncating() is a trigger of sales.monthly_sales only, not of %', TG_RELID::regclass
            USING ERRCODE = '42501';
    END IF;
    PERFORM sales.check_owners();
    mark := nextval(pg_get_serial_sequence('sales.events', 'id'));
    INSERT INTO sales.event_history (row_id, id, kind, store_id, actor_id, row_version, payload, created_at)
    SELECT m.id, mark, 'sales-data-truncated', m.store_id, sales.current_actor(), m.version, to_jsonb(m),
           greatest(now(), m.updated_at)
    FROM sales.monthly_sales m;
    RETURN NULL;
END $$;

CREATE TRIGGER monthly_sales_truncating BEFORE TRUNCATE ON sales.monthly_sales
    FOR EACH STATEMENT EXECUTE FUNCTION sales.tg_sales_truncating();
REVOKE EXECUTE ON FUNCTION sales.tg_sales_truncating() FROM PUBLIC;

CREATE FUNCTION sales.record_row(id bigint) RETURNS sales.monthly_sales
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m sales.monthly_sales;
    kept jsonb;
    mark bigint;
BEGIN
    SELECT * INTO m FROM sales.monthly_sales x WHERE x.id = record_row.id;
    IF NOT FOUND THEN
        SELECT h.payload, h.id INTO kept, mark
        FROM sales.event_history h
        WHERE h.row_id = record_row.id AND h.kind = 'sales-data-truncated'
        ORDER BY h.id DESC LIMIT 1;
        m := jsonb_populate_record(NULL::sales.monthly_sales, kept);
        -- Not when an event was written after the TRUNCATE (the id was
        -- given again, by hand): that record's walk does not start here.
        -- By event id (the kept state's id comes from the same sequence),
        -- not by version: a record given the id again starts at version 1.
        IF m.version IS NOT NULL AND EXISTS (
            SELECT 1 FROM sales.events e
            WHERE e.row_id = record_row.id AND e.id > mark
              AND e.kind IN ('sales-data-created', 'sales-data-updated', 'sales-data-deleted')
            UNION ALL
            SELECT 1 FROM sales.event_history h
            WHERE h.row_id = record_row.id AND h.id > mark
              AND h.kind IN ('sales-data-created', 'sales-data-updated', 'sales-data-deleted'))
        THEN
            m := NULL;
        END IF;
    END IF;
    RETURN m;
END $$;

-- Where a sales record's current life begins: the id of its newest
-- retained insert event (0 when none is retained). An id given again by
-- hand after a delete (`INSERT ... (id, ...)`, a row restored from a
-- backup) starts a record of its own at version 1; the events of the
-- record that had the id before are not its history, so every reader here
-- reads the events from this one on. (Within one life a record has one
-- insert, and its events' ids grow with its versions: each version is
-- written under the row's lock, after the one before it committed.)
CREATE FUNCTION sales.record_life(id bigint) RETURNS bigint
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(max(x.eid), 0) FROM (
        SELECT max(e.id) AS eid FROM sales.events e
        WHERE e.row_id = record_life.id AND e.kind = 'sales-data-created'
        UNION ALL
        SELECT max(h.id) FROM sales.event_history h
        WHERE h.row_id = record_life.id AND h.kind = 'sales-data-created'
    ) x
$$;

-- Every store a record belonged to, now and in its retained events of its
-- current life (sales.record_life; a caller sees a record's history only
-- when all of them are in its scope). Read from the events' columns and
-- the stores a move names, never by rebuilding versions: every retained
-- event of the life counts, also those past a gap in the versions, so the
-- answer is never narrower than the history shown. (The life is a scalar
-- subquery, computed once, not once per event.)
CREATE OR REPLACE FUNCTION sales.record_stores(id bigint) RETURNS bigint[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(DISTINCT s ORDER BY s), '{}') FROM (
        SELECT m.store_id AS s FROM sales.monthly_sales m WHERE m.id = record_stores.id
        UNION ALL
        SELECT unnest(ARRAY[e.store_id, (e.payload->>'previousStoreId')::bigint]) FROM sales.events e
        WHERE e.row_id = record_stores.id AND e.id >= (SELECT sales.record_life(record_stores.id))
          AND e.kind IN ('sales-data-created', 'sales-data-updated', 'sales-data-deleted')
        UNION ALL
        SELECT unnest(ARRAY[h.store_id, (h.payload->>'previousStoreId')::bigint]) FROM sales.event_history h
        WHERE h.row_id = record_stores.id AND h.id >= (SELECT sales.record_life(record_stores.id))
    ) x WHERE s IS NOT NULL
$$;

CREATE OR REPLACE FUNCTION sales.record_versions(id bigint, down_to bigint DEFAULT NULL)
RETURNS SETOF sales.record_version
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    o sales.record_version;
    cur_daily jsonb;
    cur_version bigint;
    state jsonb;
    state_known boolean := true;
    expect bigint;
    life bigint;
BEGIN
    IF id IS NULL THEN
        RAISE EXCEPTION 'id must not be NULL' USING ERRCODE = '22023';
    END IF;
    SELECT m.daily_data, m.version INTO cur_daily, cur_version
    FROM sales.record_row(record_versions.id) m;
    life := sales.record_life(record_versions.id);
    state := cur_daily;
    -- No row: after a delete, its event holds the last daily data (and
    -- sets state_known below); otherwise it is lost.
    state_known := cur_version IS NOT NULL;
    expect := cur_version;
    FOR r IN
        SELECT x.eid, x.ekind, x.eactor, x.ever, x.p,
               max(x.eat) OVER (ORDER BY x.ever, x.eid ROWS UNBOUNDED PRECEDING) AS eat
        FROM (
            SELECT e.id AS eid, e.kind AS ekind, e.actor_id AS eactor, e.row_version AS ever,
                   e.payload AS p, e.created_at AS eat
            FROM sales.events e
            WHERE e.row_id = record_versions.id AND e.id >= life
              AND e.kind IN ('sales-data-created', 'sales-data-updated', 'sales-data-deleted')
            UNION ALL
            SELECT h.id, h.kind, h.actor_id, h.row_version, h.payload, h.created_at
            FROM sales.event_history h
            WHERE h.row_id = record_versions.id AND h.id >= life
              AND h.kind IN ('sales-data-created', 'sales-data-updated', 'sales-data-deleted')
        ) x
        ORDER BY x.ever DESC, x.eid DESC
    LOOP
        -- Versions are consecutive; a gap is where pruning cut.
        EXIT WHEN expect IS NOT NULL AND r.ever <> expect;
        EXIT WHEN down_to IS NOT NULL AND r.ever < down_to;
        o.version := r.ever;
        o.at := r.eat;
        o.event_id := r.eid;
        o.kind := r.ekind;
        o.actor_id := r.eactor;
        o.job_id := (r.p->>'jobId')::bigint;
        o.store_id := (r.p->>'storeId')::bigint;
        o.year := (r.p->>'year')::int;
        o.month := (r.p->>'month')::int;
        o.before_store_id := coalesce((r.p->>'previousStoreId')::bigint, o.store_id);
        o.before_year := coalesce((r.p->>'previousYear')::int, o.year);
        o.before_month := coalesce((r.p->>'previousMonth')::int, o.month);
        IF r.ekind = 'sales-data-deleted' THEN
            o.daily_after := NULL;
            state_known := r.p ? 'previousDays';
            o.daily_before := r.p->'previousDays';
            o.known := state_known;
        ELSIF r.ekind = 'sales-data-created' THEN
            o.daily_after := CASE WHEN state_known THEN state END;
            o.daily_before := NULL;
            o.before_store_id := NULL;
            o.before_year := NULL;
            o.before_month := NULL;
            o.known := state_known;
        ELSE
            o.daily_after := CASE WHEN state_known THEN state END;
            state_known := state_known AND r.p ? 'previousDays';
            o.daily_before := CASE WHEN state_known THEN sales.daily_undo(state, r.p->'previousDays') END;
            o.known := state_known;
        END IF;
        RETURN NEXT o;
        state := o.daily_before;
        expect := r.ever - 1;
        EXIT WHEN r.ekind = 'sales-data-created';
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION sales.record_chain(id bigint, OUT newest bigint, OUT oldest bigint, OUT oldest_kind text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    expect bigint;
    life bigint := sales.record_life(record_chain.id);
BEGIN
    SELECT m.version INTO expect FROM sales.record_row(record_chain.id) m;
    FOR r IN
        SELECT e.row_version AS v, e.kind AS k, e.id AS eid FROM sales.events e
        WHERE e.row_id = record_chain.id AND e.id >= life
          AND e.kind IN ('sales-data-created', 'sales-data-updated', 'sales-data-deleted')
        UNION ALL
        SELECT h.row_version, h.kind, h.id FROM sales.event_history h
        WHERE h.row_id = record_chain.id AND h.id >= life
          AND h.kind IN ('sales-data-created', 'sales-data-updated', 'sales-data-deleted')
        ORDER BY 1 DESC, 3 DESC
    LOOP
        EXIT WHEN expect IS NOT NULL AND r.v <> expect;
        newest := coalesce(newest, r.v);
        oldest := r.v;
        oldest_kind := r.k;
        expect := r.v - 1;
        EXIT WHEN r.k = 'sales-data-created';
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION sales.history(id bigint, max_rows integer DEFAULT 50, before_version bigint DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cur_version bigint;
    kept_version bigint;
    vs sales.record_version;
    entries jsonb := '[]';
    n integer := 0;
    more boolean := false;
    newest bigint;
    oldest bigint;
    oldest_kind text;
    top bigint;
    last_version bigint;
    gone_through bigint;
BEGIN
    IF id IS NULL THEN
        RAISE EXCEPTION 'id must not be NULL' USING ERRCODE = '22023';
    END IF;
    IF max_rows IS NULL OR max_rows < 1 OR max_rows > 1000 THEN
        RAISE EXCEPTION 'max_rows: must be between 1 and 1000' USING ERRCODE = '22023';
    END IF;
    IF before_version IS NOT NULL AND before_version < 1 THEN
        RAISE EXCEPTION 'before_version: must be 1 or more' USING ERRCODE = '22023';
    END IF;
    SELECT m.version INTO cur_version FROM sales.monthly_sales m WHERE m.id = history.id;
    -- A truncated record's last version, as the TRUNCATE kept it.
    SELECT m.version INTO kept_version FROM sales.record_row(history.id) m;
    SELECT c.newest, c.oldest, c.oldest_kind INTO newest, oldest, oldest_kind
    FROM sales.record_chain(history.id) c;
    -- The page: versions below before_version, from the newest retained.
    top := least(newest, before_version - 1);
    IF top IS NULL THEN
        top := newest;
    END IF;
    FOR vs IN SELECT * FROM sales.record_versions(history.id, top - max_rows + 1) LOOP
        CONTINUE WHEN vs.version > top;
        entries := entries || sales.history_entry(vs);
        last_version := vs.version;
        n := n + 1;
    END LOOP;
    more := n > 0 AND last_version > oldest;
    IF oldest IS NULL AND kept_version IS NULL THEN
        RETURN NULL;
    END IF;
    IF oldest IS NULL THEN
        gone_through := kept_version;
    ELSIF oldest_kind <> 'sales-data-created' AND oldest > 1 THEN
        gone_through := oldest - 1;
    END IF;
    RETURN jsonb_build_object(
        'id', history.id,
        'currentVersion', cur_version,
        'deleted', cur_version IS NULL,
        'versions', entries,
        'nextBeforeVersion', CASE WHEN more THEN last_version END,
        'complete', gone_through IS NULL,
        'gone', CASE WHEN gone_through IS NOT NULL THEN jsonb_build_object(
            'throughVersion', gone_through,
            'message', format('versions 1 to %s of sales record %s are older than the retained history '
                              '(the event log and sales.event_history are pruned by sales.prune_events)',
                              gone_through, history.id)) END);
END $$;

CREATE OR REPLACE FUNCTION sales.get_sales_as_of(id bigint, as_of timestamptz, fields text[] DEFAULT NULL,
    exclude text[] DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m sales.monthly_sales;
    hit sales.record_version;
    have boolean := false;
    newest bigint;
    target bigint;
    oldest_version bigint;
    oldest_at timestamptz;
    created timestamptz;
    doc jsonb;
    n integer := 0;
    life bigint;
BEGIN
    IF id IS NULL THEN
        RAISE EXCEPTION 'id must not be NULL' USING ERRCODE = '22023';
    END IF;
    life := sales.record_life(get_sales_as_of.id);
    IF as_of IS NULL THEN
        RAISE EXCEPTION 'as_of must not be NULL' USING ERRCODE = '22023';
    END IF;
    PERFORM sales.project('{}'::jsonb, fields, exclude);
    -- The row, or as a TRUNCATE left it: asOf after the truncate still
    -- answers its last version.
    m := sales.record_row(get_sales_as_of.id);
    -- Which version was current at as_of is read from the events' columns
    -- (their times, made monotonic as sales.record_versions makes them);
    -- the walk then goes only as far down as that version.
    SELECT c.newest, c.oldest INTO newest, oldest_version FROM sales.record_chain(get_sales_as_of.id) c;
    IF newest IS NOT NULL THEN
        n := 1;
        SELECT max(y.ever) FILTER (WHERE y.eff <= as_of AND y.ever BETWEEN oldest_version AND newest),
               max(y.eff) FILTER (WHERE y.ever = oldest_version)
        INTO target, oldest_at
        FROM (
            SELECT x.ever, max(x.eat) OVER (ORDER BY x.ever, x.eid ROWS UNBOUNDED PRECEDING) AS eff
            FROM (
                SELECT e.id AS eid, e.row_version AS ever, e.created_at AS eat FROM sales.events e
                WHERE e.row_id = get_sales_as_of.id AND e.id >= life
                  AND e.kind IN ('sales-data-created', 'sales-data-updated', 'sales-data-deleted')
                UNION ALL
                SELECT h.id, h.row_version, h.created_at FROM sales.event_history h
                WHERE h.row_id = get_sales_as_of.id AND h.id >= life
                  AND h.kind IN ('sales-data-created', 'sales-data-updated', 'sales-data-deleted')
            ) x
        ) y;
        IF target IS NOT NULL THEN
            SELECT * INTO hit FROM sales.record_versions(get_sales_as_of.id, target) rv
            WHERE rv.version = target;
            have := FOUND;
        END IF;
    END IF;
    -- The insert that began this life (none retained: the row's own
    -- created_at is used).
    SELECT x.at INTO created FROM (
        SELECT e.created_at AS at FROM sales.events e
        WHERE e.row_id = get_sales_as_of.id AND e.id = life AND e.kind = 'sales-data-created'
        UNION ALL
        SELECT h.created_at FROM sales.event_history h
        WHERE h.row_id = get_sales_as_of.id AND h.id = life AND h.kind = 'sales-data-created'
    ) x LIMIT 1;
    IF n = 0 AND m.id IS NULL THEN
        RETURN NULL;
    END IF;
    IF NOT have THEN
        -- Nothing retained at or before as_of.
        IF n = 0 AND m.updated_at <= as_of THEN
            -- Unchanged since before as_of: the row as it is.
            doc := sales.sales_doc(m);
        ELSIF coalesce(created, m.created_at) > as_of THEN
            RAISE EXCEPTION 'sales record % did not exist yet at %: it was created at %', id, as_of,
                coalesce(created, m.created_at) USING ERRCODE = 'PS404';
        ELSE
            RAISE EXCEPTION 'the version of sales record % at % is older than the retained history (oldest retained: version % at %)',
                id, as_of, coalesce(oldest_version, m.version), coalesce(oldest_at, m.updated_at)
                USING ERRCODE = 'PSGON';
        END IF;
    ELSIF hit.kind = 'sales-data-deleted' THEN
        RAISE EXCEPTION 'sales record % did not exist at %: it was deleted at %', id, as_of, hit.at
            USING ERRCODE = 'PS404';
    ELSIF NOT hit.known AND m.id IS NULL AND NOT EXISTS (
        SELECT 1 FROM sales.events e
        WHERE e.row_id = get_sales_as_of.id AND e.id >= life AND e.row_version = newest
          AND e.kind = 'sales-data-deleted'
        UNION ALL
        SELECT 1 FROM sales.event_history h
        WHERE h.row_id = get_sales_as_of.id AND h.id >= life AND h.row_version = newest
          AND h.kind = 'sales-data-deleted')
    THEN
        RAISE EXCEPTION 'the daily data of sales record % at % is not known: its row was removed without a delete event and without a copy of its last daily data (a DELETE or TRUNCATE run with session_replication_role = replica, a TRUNCATE before pg_sales 0.12.0, or a copy pruned before the events), and the events hold only the days each version changed',
            id, as_of USING ERRCODE = 'PSGON';
    ELSIF NOT hit.known THEN
        RAISE EXCEPTION 'the daily data of sales record % at % is not in its events (written before pg_sales 0.3.0)',
            id, as_of USING ERRCODE = 'PSGON';
    ELSE
        doc := jsonb_build_object(
            'id', get_sales_as_of.id, 'storeId', hit.store_id, 'year', hit.year, 'month', hit.month,
            'dailyData', hit.daily_after,
            'totalSales', sales.daily_sum(hit.daily_after, 'sales'),
            'totalCustomers', sales.daily_sum(hit.daily_after, 'customers')::bigint,
            'daysReported', sales.daily_days(hit.daily_after),
            'version', hit.version,
            'createdAt', coalesce(created, m.created_at), 'updatedAt', hit.at);
    END IF;
    IF sales.needs_store(fields) THEN
        doc := doc || jsonb_build_object('store',
            (SELECT sales.store_doc(s) FROM sales.stores s WHERE s.id = (doc->>'storeId')::bigint));
    END IF;
    RETURN sales.project(doc, fields, exclude);
END $$;

-- A sort key is its camelCase or exactly its snake_case spelling, as the
-- API's: `store__id`, `_store_id`, `TotalSales` and `--totalSales` were
-- folded into a key.
CREATE OR REPLACE FUNCTION sales.sort_sql(sort text) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    part text;
    name text;
    dir text;
    col text;
    cols text[] := '{}';
    seen text[] := '{}';
    k text;
BEGIN
    FOREACH part IN ARRAY string_to_array(coalesce(nullif(btrim(sort), ''), 'storeId,year,month'), ',') LOOP
        part := btrim(part);
        IF part = '' THEN
            RAISE EXCEPTION 'sort: "%" has an empty key between commas', sort USING ERRCODE = '22023';
        END IF;
        dir := CASE WHEN left(part, 1) = '-' THEN ' DESC' ELSE '' END;
        -- One sign at most; a key is its camelCase or exactly its snake_case
        -- spelling, as the API's (`store__id`, `_store_id`, `TotalSales`
        -- and `--totalSales` name none).
        name := CASE WHEN left(part, 1) IN ('-', '+') THEN substr(part, 2) ELSE part END;
        FOREACH k IN ARRAY CASE WHEN name = 'period' THEN ARRAY['year', 'month'] ELSE ARRAY[name] END LOOP
            col := CASE k
                WHEN 'id' THEN 'm.id'
                WHEN 'storeId' THEN 'm.store_id' WHEN 'store_id' THEN 'm.store_id'
                WHEN 'year' THEN 'm.year' WHEN 'month' THEN 'm.month'
                WHEN 'totalSales' THEN 'm.total_sales' WHEN 'total_sales' THEN 'm.total_sales'
                WHEN 'totalCustomers' THEN 'm.total_customers' WHEN 'total_customers' THEN 'm.total_customers'
                WHEN 'daysReported' THEN 'm.days_reported' WHEN 'days_reported' THEN 'm.days_reported'
                WHEN 'updatedAt' THEN 'm.updated_at' WHEN 'updated_at' THEN 'm.updated_at'
                WHEN 'createdAt' THEN 'm.created_at' WHEN 'created_at' THEN 'm.created_at' END;
            IF col IS NULL THEN
                RAISE EXCEPTION 'sort: cannot sort by "%"; allowed: period, id, storeId, year, month, totalSales, totalCustomers, daysReported, updatedAt, createdAt',
                    name USING ERRCODE = '22023';
            END IF;
            IF col = ANY (seen) THEN
                RAISE EXCEPTION 'sort: % given twice%', k,
                    CASE WHEN k IN ('year', 'month')
                              AND 'period' = ANY (SELECT ltrim(btrim(p), '+-') FROM unnest(string_to_array(sort, ',')) p)
                         THEN ' (period is year, month)' ELSE '' END
                    USING ERRCODE = '22023';
            END IF;
            seen := seen || col;
            cols := cols || (col || dir);
        END LOOP;
    END LOOP;
    IF NOT 'm.id' = ANY (seen) THEN
        cols := cols || 'm.id'::text;
    END IF;
    RETURN array_to_string(cols, ', ');
END $$;

-- A metric array given as NULL is that metric not reported on any row
-- (STRICT made one NULL metric array turn the whole result NULL); a NULL
-- key array is refused naming it.
ALTER FUNCTION sales.day_records(bigint[], integer[], integer[], integer[], numeric[], numeric[], numeric[])
    CALLED ON NULL INPUT;

-- A daily after_key naming a day its month lacks (2023-02-29) is refused
-- like any other malformed key, rather than read as the next day's start.
CREATE OR REPLACE FUNCTION sales.export_key_arg(after_key text, daily boolean) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE p text[];
BEGIN
    IF after_key IS NULL THEN
        RETURN NULL;
    END IF;
    p := CASE WHEN daily THEN regexp_match(after_key, '^([0-9]{1,18}):([0-9]{4})-([0-9]{2})-([0-9]{2})$')
              ELSE regexp_match(after_key, '^([0-9]{1,18}):([0-9]{4})-([0-9]{2})$') END;
    -- A daily key's day must exist in its month (2024-02-30 is no row's key).
    IF p IS NULL OR p[3]::int NOT BETWEEN 1 AND 12
       OR (daily AND p[4]::int NOT BETWEEN 1 AND extract(day FROM
               make_date(greatest(p[2]::int, 1), p[3]::int, 1) + interval '1 month' - interval '1 day')) THEN
        RAISE EXCEPTION 'after_key: "%" is not a % row key like %', after_key,
            CASE WHEN daily THEN 'daily' ELSE 'monthly' END,
            CASE WHEN daily THEN '12:2024-03-05' ELSE '12:2024-03' END
            USING ERRCODE = '22023';
    END IF;
    RETURN ARRAY[p[1]::bigint, p[2]::bigint, p[3]::bigint, coalesce(p[4]::bigint, 0)];
END $$;

-- A blank kind or message is one of spaces, line breaks, tabs or
-- zero-width characters, not of spaces only.
CREATE OR REPLACE FUNCTION sales.emit(kind text, payload jsonb, store_id bigint DEFAULT NULL, user_id bigint DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE new_id bigint;
BEGIN
    IF kind IS NULL OR kind ~ '^[[:space:]\u0085\u00A0\u1680\u180E\u2000-\u200F\u2028-\u202F\u205F-\u2064\u3000\uFEFF]*$' THEN
        RAISE EXCEPTION 'event kind must not be blank' USING ERRCODE = '22023';
    END IF;
    INSERT INTO sales.events (kind, store_id, user_id, actor_id, payload)
    VALUES (kind, store_id, user_id, sales.current_actor(), coalesce(payload, '{}'))
    RETURNING id INTO new_id;
    RETURN new_id;
END $$;

CREATE OR REPLACE FUNCTION sales.announce(message text, level text DEFAULT 'info', data jsonb DEFAULT '{}')
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF message IS NULL OR message ~ '^[[:space:]\u0085\u00A0\u1680\u180E\u2000-\u200F\u2028-\u202F\u205F-\u2064\u3000\uFEFF]*$' THEN
        RAISE EXCEPTION 'announcement message must not be blank' USING ERRCODE = '22023';
    END IF;
    IF level IS NULL OR level NOT IN ('info', 'warning', 'critical') THEN
        RAISE EXCEPTION 'announcement level must be info, warning or critical, not %', coalesce(level, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    RETURN sales.emit('system-announcement',
                      jsonb_build_object('message', message, 'level', level, 'data', coalesce(data, '{}'),
                                         'from', sales.current_actor()));
END $$;

CREATE OR REPLACE FUNCTION sales.notify_user(user_id bigint, message text, data jsonb DEFAULT '{}')
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF user_id IS NULL OR NOT EXISTS (SELECT 1 FROM sales.users u WHERE u.id = notify_user.user_id) THEN
        RAISE EXCEPTION 'user % does not exist', coalesce(user_id::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    IF message IS NULL OR message ~ '^[[:space:]\u0085\u00A0\u1680\u180E\u2000-\u200F\u2028-\u202F\u205F-\u2064\u3000\uFEFF]*$' THEN
        RAISE EXCEPTION 'notification message must not be blank' USING ERRCODE = '22023';
    END IF;
    RETURN sales.emit('user-notification',
                      jsonb_build_object('message', message, 'data', coalesce(data, '{}'), 'from', sales.current_actor()),
                      NULL, notify_user.user_id);
END $$;

-- Which event log this is. Event ids are numbered again after a restore
-- (the log goes on from the dump's newest event), so an id alone does not
-- say which event a client last had. The row is made as the extension is
-- created and is left out of dumps on purpose (the table is not marked for
-- pg_dump): a database restored from a dump gets a new one. See
-- sales.event_log_epoch().
CREATE TABLE sales.event_log_identity (
    epoch  uuid NOT NULL DEFAULT gen_random_uuid(),
    one    boolean PRIMARY KEY DEFAULT true CHECK (one)
);
INSERT INTO sales.event_log_identity DEFAULT VALUES;
-- Owned like the log: a database whose tables were given to the server's
-- role (sales.hand_over) keeps them all with one owner.
DO $$
BEGIN
    EXECUTE format('ALTER TABLE sales.event_log_identity OWNER TO %s',
                   (SELECT c.relowner::regrole FROM pg_class c WHERE c.oid = 'sales.events'::regclass));
END $$;

-- Names the event log that event ids are numbers of: this log's identity
-- (made anew when a dump is restored) and the WAL timeline (a new one after
-- a point-in-time recovery or a standby's promotion, which can lose the
-- newest events, whose ids are then given again). An id is only meaningful
-- with the epoch it was read under: a consumer that resumes from an id
-- read under another epoch reloads instead (the WebSocket resume does).
CREATE FUNCTION sales.event_log_epoch() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM sales.check_owners();
    RETURN (SELECT i.epoch::text || '.' ||
                   CASE WHEN pg_is_in_recovery() THEN (pg_control_checkpoint()).timeline_id::text
                        ELSE (('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int)::text
                   END
            FROM sales.event_log_identity i);
END $$;
