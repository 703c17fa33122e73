-- pg_sales schema, 3 of 4: the event log's triggers and functions, after
-- documents.sql and the Rust functions they call (src/events.rs,
-- src/delivery.rs). Each runs with `search_path = pg_catalog, pg_temp`
-- (see surface.sql), except sales.current_actor(), which is inlined.

---------------------------------------------------------------------------
-- Events: one row per changed row, one NOTIFY per transaction.
---------------------------------------------------------------------------

-- The acting user, when the caller said who it is (the server does, with
-- set_config('sales.user_id', ..., true)). Inlined into its callers'
-- queries (no SET clause), so it names its function and operator with
-- their schema (see documents.sql).
CREATE FUNCTION sales.current_actor() RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN pg_catalog.current_setting('sales.user_id', true) OPERATOR(pg_catalog.<>) ''
                THEN pg_catalog.current_setting('sales.user_id', true)::bigint END
$$;

-- One NOTIFY per writing transaction at most, whatever it does, sent just
-- before commit by the extension (extension/src/delivery.rs,
-- notify_at_commit), coalesced by default. Rolled-back work sends none.

-- Inserts and updates make their events in row-level triggers written in
-- Rust (src/events.rs): a plpgsql statement over a statement trigger's
-- transition tables is planned again on every call, and INSERT ... ON
-- CONFLICT DO UPDATE fires both the INSERT and the UPDATE statement
-- triggers; a plpgsql row trigger still spent most of its time in
-- jsonb_build_object (a type lookup and a numeric-to-text-to-numeric round
-- trip per value). The payload is written in jsonb's binary form and the
-- row goes straight into the table and its indexes.
-- An insert's event comes from monthly_sales_events, after the row (an
-- INSERT ... ON CONFLICT row may still turn into an update after the BEFORE
-- triggers). An update's event is written by the row trigger
-- (sales.tg_sales_row, src/rows.rs) as the row goes in, once its version is
-- set: that spares every update the after-trigger queue and reading both
-- versions of the row back at the end of the statement. The row trigger
-- writes them only while monthly_sales_events fires in the session (it is
-- enabled for the session_replication_role), so disabling that one trigger
-- still turns every sales event off. Within a statement, events of updated
-- rows come in the order the rows were written, before those of inserted
-- rows (batch_upsert writes in (store, year, month) order); a row's own
-- events are always in version order.
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

-- The event triggers written in plpgsql (deletes, stores, truncates) run as
-- their owner (SECURITY DEFINER, with a fixed search_path), as the Rust
-- ones write the log directly: a role that may change sales rows or stores
-- needs no privilege on sales.events, which holds every user's events, to
-- have its changes' events written (src/events.rs, as_log_owner).
-- Deletes stay statement-level (one INSERT ... SELECT per statement). Like
-- an update's `previousDays` (the old value of each changed day), a
-- delete's holds the month's last daily data, so the record's history can
-- be read back from its events; `jobId` names the job (import or
-- asynchronous batch) that wrote, when one did. Called for each row (a
-- logical replication subscriber's `monthly_sales_replica_deletes`, see
-- below: the apply fires row triggers only), it writes that row's event.
CREATE FUNCTION sales.tg_sales_deleted() RETURNS trigger
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

CREATE TRIGGER monthly_sales_events AFTER INSERT ON sales.monthly_sales
    FOR EACH ROW EXECUTE FUNCTION sales.tg_sales_changed();
CREATE TRIGGER monthly_sales_events_del AFTER DELETE ON sales.monthly_sales
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION sales.tg_sales_deleted();

-- Logical replication applies rows with session_replication_role = replica,
-- where the row trigger monthly_sales_row (which writes updates' events)
-- does not fire. A subscriber that wants events enables monthly_sales_events
-- ALWAYS (or REPLICA) and creates, under this name, an AFTER UPDATE trigger
-- that fires in replica mode only:
--   CREATE TRIGGER monthly_sales_replica_updates AFTER UPDATE ON sales.monthly_sales
--       FOR EACH ROW EXECUTE FUNCTION sales.tg_sales_changed();
--   ALTER TABLE sales.monthly_sales ENABLE REPLICA TRIGGER monthly_sales_replica_updates;
-- sales.tg_sales_changed then writes an applied update's event while
-- monthly_sales_events fires and monthly_sales_row does not. It is not
-- created here: an AFTER UPDATE row trigger costs every update a fetch of
-- the old row even where it does not fire. Deletes' events come from a
-- statement trigger, which the apply never fires; the subscriber adds, for
-- replica mode only (monthly_sales_events_del stays as shipped, so no
-- delete gets two events):
--   CREATE TRIGGER monthly_sales_replica_deletes AFTER DELETE ON sales.monthly_sales
--       FOR EACH ROW EXECUTE FUNCTION sales.tg_sales_deleted();
--   ALTER TABLE sales.monthly_sales ENABLE REPLICA TRIGGER monthly_sales_replica_deletes;
-- TRUNCATE triggers are statement triggers too: a truncate applied by
-- replication writes no table-truncated event.

CREATE FUNCTION sales.tg_stores_changed() RETURNS trigger
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

CREATE TRIGGER stores_events_ins AFTER INSERT ON sales.stores
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION sales.tg_stores_changed();
CREATE TRIGGER stores_events_upd AFTER UPDATE ON sales.stores
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION sales.tg_stores_changed();
CREATE TRIGGER stores_events_del AFTER DELETE ON sales.stores
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION sales.tg_stores_changed();

-- TRUNCATE fires no row trigger: one `table-truncated` event per truncated
-- table (payload {"table": ...}) tells readers that everything they hold
-- from it is gone (the server clears its whole cache on it).
--
-- `TRUNCATE sales.monthly_sales RESTART IDENTITY` also sets the id sequence
-- back to its start, so new records would take ids whose events are still
-- in the log (and in sales.event_history), and a record's history would
-- run on into a truncated record's. The sequence is moved past every id
-- the logs hold instead, so that ids are never given twice. (A plain
-- TRUNCATE leaves the sequence where it was; nothing to do then.)
CREATE FUNCTION sales.tg_truncated() RETURNS trigger
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

CREATE TRIGGER monthly_sales_truncated AFTER TRUNCATE ON sales.monthly_sales
    FOR EACH STATEMENT EXECUTE FUNCTION sales.tg_truncated();
CREATE TRIGGER stores_truncated AFTER TRUNCATE ON sales.stores
    FOR EACH STATEMENT EXECUTE FUNCTION sales.tg_truncated();

-- The three plpgsql event triggers above run as their owner: nobody else
-- may attach them to a table (CREATE TRIGGER needs EXECUTE on the
-- function; the triggers made here keep firing for every writer).
REVOKE EXECUTE ON FUNCTION sales.tg_sales_deleted(), sales.tg_stores_changed(), sales.tg_truncated() FROM PUBLIC;

-- Appends one event (announcements, notifications, batch summaries) and
-- returns its id. A kind, like an announcement's or a notification's
-- message, must show something: spaces, line breaks, tabs and zero-width
-- characters only are refused (SQLSTATE 22023). `user_id` makes it a user-only event: set it only for
-- events meant for that one user.
CREATE FUNCTION sales.emit(kind text, payload jsonb, store_id bigint DEFAULT NULL, user_id bigint DEFAULT NULL)
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

-- A system announcement for everyone; returns its event id.
CREATE FUNCTION sales.announce(message text, level text DEFAULT 'info', data jsonb DEFAULT '{}')
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

-- A notification for one user (user_id set: delivered to that user only);
-- returns its event id.
CREATE FUNCTION sales.notify_user(user_id bigint, message text, data jsonb DEFAULT '{}')
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

-- This transaction's own events (the server collects their cache tags
-- before COMMIT): the rows between its first and last seq with its xid.
-- The bounds are scalar subqueries, evaluated once before the scan, so the
-- seq range is an index condition (the volatile functions called directly
-- in the WHERE clause would be evaluated per row, over the whole log).
CREATE FUNCTION sales.transaction_events() RETURNS SETOF sales.events
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT e.* FROM sales.events e
    WHERE e.seq BETWEEN (SELECT sales.transaction_first_seq()) AND (SELECT sales.transaction_last_seq())
      AND e.xid = (SELECT pg_current_xact_id_if_assigned())
    ORDER BY e.seq
$$;

-- The delivery position of a retained event; PS410 when it is not (or no
-- longer) in the table. 0 is the start of the log.
CREATE FUNCTION sales.event_position(event_id bigint) RETURNS bigint
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE pos bigint;
BEGIN
    IF event_id IS NULL OR event_id < 0 THEN
        RAISE EXCEPTION 'after_id must be 0 or an event id' USING ERRCODE = '22023';
    END IF;
    IF event_id = 0 THEN
        RETURN 0;
    END IF;
    SELECT e.seq INTO pos FROM sales.events e WHERE e.id = event_id;
    IF pos IS NULL THEN
        RAISE EXCEPTION 'event % is unknown or no longer retained; resync required', event_id
            USING ERRCODE = 'PS410';
    END IF;
    RETURN pos;
END $$;

-- Events after the delivery position `after_seq`, in delivery order (seq),
-- only below the horizon (sales.events_horizon: no running transaction can
-- still add an event before them), at most `max_rows`. With `wait_ms` > 0
-- and nothing to return yet, waits up to that long for an event-writing
-- transaction of this database to end and looks again: a long poll that
-- wakes the moment something becomes deliverable (or an abort stops holding
-- something back), with no NOTIFY involved.
--
-- VOLATILE on purpose: the generation and the horizon are read before the
-- rows, and each statement here takes a new snapshot (at READ COMMITTED), so
-- every transaction that ended before the horizon was read is visible to the
-- row query. Under REPEATABLE READ (or SERIALIZABLE) the snapshot would be
-- older than the horizon, so it is refused; READ UNCOMMITTED runs as READ
-- COMMITTED and is taken.
CREATE FUNCTION sales.events_after_seq(after_seq bigint, max_rows integer DEFAULT 1000, wait_ms integer DEFAULT 0)
RETURNS SETOF sales.events LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    g bigint;
    h bigint;
    deadline timestamptz;
BEGIN
    IF after_seq IS NULL OR after_seq < 0 THEN
        RAISE EXCEPTION 'after_seq must be 0 or a delivery position' USING ERRCODE = '22023';
    END IF;
    IF max_rows IS NULL OR max_rows < 1 OR max_rows > 100000 THEN
        RAISE EXCEPTION 'max_rows must be between 1 and 100000' USING ERRCODE = '22023';
    END IF;
    IF wait_ms IS NULL OR wait_ms < 0 OR wait_ms > 600000 THEN
        RAISE EXCEPTION 'wait_ms must be between 0 and 600000' USING ERRCODE = '22023';
    END IF;
    IF current_setting('transaction_isolation') IN ('repeatable read', 'serializable') THEN
        RAISE EXCEPTION 'reading the event log needs READ COMMITTED, not %', current_setting('transaction_isolation')
            USING ERRCODE = '25000';
    END IF;
    deadline := clock_timestamp() + make_interval(secs => wait_ms / 1000.0);
    LOOP
        g := sales.events_generation();
        h := sales.events_horizon();
        RETURN QUERY
            SELECT e.* FROM sales.events e
            WHERE e.seq > after_seq AND e.seq < h
            ORDER BY e.seq
            LIMIT max_rows;
        IF FOUND OR clock_timestamp() >= deadline THEN
            RETURN;
        END IF;
        PERFORM sales.events_wait(g, greatest(1, ceil(extract(epoch FROM deadline - clock_timestamp()) * 1000))::int);
    END LOOP;
END $$;

-- The same after an event id (0 = from the start). An id that is not (or no
-- longer) in the table raises SQLSTATE PS410 (resync required).
CREATE FUNCTION sales.events_next(after_id bigint, max_rows integer DEFAULT 1000, wait_ms integer DEFAULT 0)
RETURNS SETOF sales.events LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM sales.events_after_seq(sales.event_position(after_id), max_rows, wait_ms)
$$;

-- Events after `after_id`, in delivery order, without waiting.
CREATE FUNCTION sales.events_since(after_id bigint, max_rows integer DEFAULT 1000)
RETURNS SETOF sales.events LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM sales.events_after_seq(sales.event_position(after_id), max_rows, 0)
$$;

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

-- The position a new reader starts from: the last event that events_since
-- would return, or 0 when there is none. It reads the horizon, then the log
-- with a snapshot taken after it, so it needs READ COMMITTED, as
-- events_after_seq does: under REPEATABLE READ the snapshot predates the
-- horizon, and an event committed in between, below the head, would be
-- neither in what the caller reads nor after the head.
CREATE FUNCTION sales.events_head() RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE h bigint;
BEGIN
    IF current_setting('transaction_isolation') IN ('repeatable read', 'serializable') THEN
        RAISE EXCEPTION 'reading the event log needs READ COMMITTED, not %', current_setting('transaction_isolation')
            USING ERRCODE = '25000';
    END IF;
    h := sales.events_horizon();
    RETURN coalesce((SELECT e.id FROM sales.events e WHERE e.seq < h ORDER BY e.seq DESC LIMIT 1), 0);
END $$;

-- What holds delivery back: the event-writing transactions of this database
-- still running, oldest first. Each holds back every event ordered after its
-- first one until it commits or rolls back.
CREATE FUNCTION sales.event_holders()
RETURNS TABLE (pid integer, xid xid8, first_seq bigint, since timestamptz, held_for interval,
               query_start timestamptz, state text, query text)
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT h.pid, (h.xid::text)::xid8, h.first_seq,
           timestamptz '2000-01-01 00:00:00+00' + h.since_us * interval '1 microsecond',
           clock_timestamp() - (timestamptz '2000-01-01 00:00:00+00' + h.since_us * interval '1 microsecond'),
           a.query_start, a.state, a.query
    FROM sales.event_holders_raw() h
    LEFT JOIN pg_stat_activity a ON a.pid = h.pid
    ORDER BY h.first_seq
$$;

-- The head, the horizon, the newest event (in delivery order) and the
-- committed events held back, read together: the horizon first, then the
-- log with one snapshot taken after it (READ COMMITTED, as events_head).
-- Subqueries of a view would read the log with the calling statement's
-- snapshot, older than the horizon, and could show a head newer than the
-- newest event.
CREATE FUNCTION sales.event_delivery_state(OUT head_id bigint, OUT horizon bigint, OUT newest_id bigint,
                                           OUT held_back bigint, OUT oldest_held_id bigint)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF current_setting('transaction_isolation') IN ('repeatable read', 'serializable') THEN
        RAISE EXCEPTION 'reading the event log needs READ COMMITTED, not %', current_setting('transaction_isolation')
            USING ERRCODE = '25000';
    END IF;
    horizon := sales.events_horizon();
    SELECT coalesce((SELECT e.id FROM sales.events e WHERE e.seq < event_delivery_state.horizon
                     ORDER BY e.seq DESC LIMIT 1), 0),
           (SELECT e.id FROM sales.events e ORDER BY e.seq DESC LIMIT 1),
           (SELECT count(*) FROM sales.events e WHERE e.seq >= event_delivery_state.horizon),
           (SELECT e.id FROM sales.events e WHERE e.seq >= event_delivery_state.horizon ORDER BY e.seq LIMIT 1)
    INTO head_id, newest_id, held_back, oldest_held_id;
END $$;

-- Delivery at a glance (monitoring): the last deliverable event, the
-- horizon, the newest event, committed events that are held back and the
-- oldest transaction holding them.
CREATE VIEW sales.event_delivery AS
    SELECT d.head_id,
           d.horizon,
           d.newest_id,
           d.held_back,
           d.oldest_held_id,
           h.pid AS holder_pid,
           h.since AS holder_since,
           h.held_for AS holder_held_for,
           h.query_start AS holder_query_start,
           h.state AS holder_state,
           h.query AS holder_query
    FROM sales.event_delivery_state() d
    LEFT JOIN LATERAL (SELECT * FROM sales.event_holders() LIMIT 1) h ON true;

-- Deletes events older than `retention`; returns how many went.
--
-- It deletes a prefix of the delivery order (seq), never a hole: everything
-- before the first final event, in seq order, that is younger than
-- `retention`. (created_at is the transaction's start, which is not
-- monotonic in seq, so deleting by created_at alone could remove an event
-- that sorts after one that is kept, and a reader would skip it silently.)
-- So no event younger than `retention` is ever deleted, a reader positioned
-- on a kept event finds every later event, and one positioned on a pruned
-- event gets PS410. The newest final event is always kept, so a reader that
-- is up to date is never told to resync. The search walks the seq index
-- from the oldest event: it reads what it deletes, plus one row.
--
-- History: with `history_retention` longer than `retention`, the sales
-- events it deletes that are younger than `history_retention` move to
-- sales.event_history, where sales.history still reads them; what is
-- older than `history_retention` (or `retention` when it is NULL) leaves
-- sales.event_history.
--
-- A run that deletes anything, from the log or from sales.event_history,
-- ends by writing an `events-pruned` event (payload: `pruned`, the events
-- deleted from the log, and `expired`, the versions that left
-- sales.event_history) in the same transaction: histories and past
-- versions that readers cached are then shorter than they were, whoever ran
-- the pruning (the server's maintenance or a scheduled SQL call).
--
-- A retention reaching back before the earliest time a timestamp holds (a
-- million years) keeps everything it covers, as a long one does.
CREATE FUNCTION sales.prune_events(retention interval DEFAULT '7 days', history_retention interval DEFAULT NULL)
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
