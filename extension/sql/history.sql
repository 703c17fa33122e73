-- pg_sales schema: the history of a sales record, read back from its events.
--
-- Every write of a record makes an event (src/events.rs, events.sql) that
-- carries what history needs: the version, the acting user, the job that
-- wrote (`jobId`), the days that changed and, for updates and deletes, the
-- old value of each of those days (`previousDays`). Walking a record's
-- events from the newest back, starting from the row as it is now (or from
-- nothing after a delete), gives the daily data before and after every
-- retained version: no copy of the month is stored per version.
--
-- The walk needs the record's last daily data whole: an event names the
-- days it changed and their old values, never their new ones (an insert's
-- names its days only). A TRUNCATE of sales.monthly_sales writes no delete
-- event (no row trigger fires), so before it runs the last state of each
-- row it removes is kept in sales.event_history (kind
-- `sales-data-truncated`, see sales.tg_sales_truncating below), where the
-- walk of a truncated record starts: its history and `asOf` answer what
-- they answered before the truncate. A row removed with nothing of the kind
-- (a DELETE or TRUNCATE run with session_replication_role = replica, which
-- fires neither trigger; a TRUNCATE before pg_sales 0.12.0; or a kept state
-- pruned before the record's events) has lost its last daily data, and with
-- it every version's: those versions are answered with `known` false, and
-- `asOf` raises PSGON saying so, rather than with days rebuilt from the
-- changed days alone.
--
-- The event log is pruned (sales.prune_events): versions older than what
-- sales.events and sales.event_history still hold are gone, and the
-- functions here say so rather than answer as if the record had no past.
-- A version's time is its writing transaction's start
-- (`sales.events.created_at`), or the time of the version before it when
-- that is later: a transaction that started first may write a row after
-- one that started later (it waited for the row's lock), and times must not
-- go backwards, or `asOf` would show a version before its predecessor was
-- written.
--
-- The walk from the row as it is now back to a version costs one step per
-- newer version, so every reader here walks only as far as it needs; what
-- the whole retained chain tells (its oldest version, the stores the record
-- was in) is read from the events' columns, without rebuilding any month.
--
-- plpgsql, resolved when it runs, with `search_path = pg_catalog, pg_temp`
-- (see surface.sql); a change here needs the same change in the next
-- upgrade script.

-- `daily` with the days of `previous` put back: a day whose old value is
-- null was not reported before, and is removed.
CREATE FUNCTION sales.daily_undo(daily jsonb, previous jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(jsonb_object_agg(k, v), '{}'::jsonb) FROM (
        SELECT d.key AS k, d.value AS v FROM jsonb_each(coalesce(daily, '{}'::jsonb)) d
        WHERE NOT coalesce(previous, '{}'::jsonb) ? d.key
        UNION ALL
        SELECT p.key, p.value FROM jsonb_each(coalesce(previous, '{}'::jsonb)) p
        WHERE jsonb_typeof(p.value) <> 'null'
    ) x
$$;

-- TRUNCATE fires no row trigger and writes no delete event (events.sql:
-- one `table-truncated` event for the table). Before it runs, the last
-- state of every row of sales.monthly_sales is kept in
-- sales.event_history: one row per record, kind `sales-data-truncated`,
-- `row_version` the row's version (no new version: the history ends at the
-- record's last one), the row (`to_jsonb`) as payload, under one id taken
-- from the event log's sequence (no event has it), dated no earlier than
-- the row's last write. sales.prune_events deletes it with the rest of
-- sales.event_history (after `history_retention`). Runs as its owner (the
-- truncating role needs no privilege on sales.event_history), on
-- sales.monthly_sales only (a trigger on another table would write
-- forged history with the owner's rights), with EXECUTE revoked from
-- PUBLIC. Not in replica mode (a TRUNCATE applied by replication fires no
-- ordinary trigger): such a record's last daily data is then lost (see
-- sales.record_versions).
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

-- A sales record's row as it is now or, when a TRUNCATE removed it, as it
-- was then (the newest state sales.tg_sales_truncating kept); a row of
-- NULLs when there is neither (never inserted, deleted, or removed
-- without a trace).
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

-- One retained version of a sales record (sales.record_versions).
CREATE TYPE sales.record_version AS (version bigint, at timestamptz, event_id bigint, kind text,
    actor_id bigint, job_id bigint, store_id bigint, year integer, month integer, daily_after jsonb,
    before_store_id bigint, before_year integer, before_month integer, daily_before jsonb, known boolean);

-- The retained versions of one sales record, newest first, down to
-- version `down_to` (NULL: all of them): who wrote each (actor, job), when,
-- where the record was after and before it (store, year, month) and its
-- daily data after and before it. `known` is false where the old values
-- are not in the events (written before pg_sales 0.3.0): the daily data
-- before that version, and of every older one, is then NULL. It is false
-- for every version, and every daily data NULL, when the record's row is
-- gone without a delete event and without a state kept by a TRUNCATE
-- (sales.record_row): its last daily data is lost, and the older ones
-- are rebuilt from it. The walk starts at the version of the row (as
-- sales.record_row gives it) and stops at the first missing version
-- (pruned).
CREATE FUNCTION sales.record_versions(id bigint, down_to bigint DEFAULT NULL)
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

-- The retained chain of a sales record's versions, read from the events'
-- columns alone (no month rebuilt): the newest and oldest version the walk
-- of sales.record_versions would reach, and the oldest one's kind. NULLs
-- when it reaches none.
CREATE FUNCTION sales.record_chain(id bigint, OUT newest bigint, OUT oldest bigint, OUT oldest_kind text)
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

-- Every store a record belonged to, now and in its retained events of its
-- current life (sales.record_life; a caller sees a record's history only
-- when all of them are in its scope). Read from the events' columns and
-- the stores a move names, never by rebuilding versions: every retained
-- event of the life counts, also those past a gap in the versions, so the
-- answer is never narrower than the history shown. (The life is a scalar
-- subquery, computed once, not once per event.)
CREATE FUNCTION sales.record_stores(id bigint) RETURNS bigint[]
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

-- One history entry as a document: version, time, actor ({"type": "user",
-- "userId", "email"}, or {"type": "sql"} for a write that named no user),
-- operation (insert, update, delete), jobId (import or asynchronous batch),
-- where the record was (storeId, year, month; `previous` when the version
-- moved it), and each changed day with its old and new value (null: not
-- reported).
CREATE FUNCTION sales.history_entry(v sales.record_version) RETURNS jsonb
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    changes jsonb;
    actor jsonb;
BEGIN
    SELECT coalesce(jsonb_agg(jsonb_build_object('day', d, 'old', v.daily_before -> d, 'new', v.daily_after -> d)
                              ORDER BY d::int), '[]')
    INTO changes
    FROM (SELECT jsonb_object_keys(coalesce(v.daily_before, '{}'::jsonb)) AS d
          UNION
          SELECT jsonb_object_keys(coalesce(v.daily_after, '{}'::jsonb))) k
    WHERE (v.daily_before -> d) IS DISTINCT FROM (v.daily_after -> d);
    IF v.actor_id IS NULL THEN
        actor := jsonb_build_object('type', 'sql');
    ELSE
        actor := jsonb_build_object('type', 'user', 'userId', v.actor_id,
                                    'email', (SELECT u.email FROM sales.users u WHERE u.id = v.actor_id));
    END IF;
    RETURN jsonb_build_object(
        'version', v.version, 'at', v.at, 'eventId', v.event_id,
        'operation', CASE v.kind WHEN 'sales-data-created' THEN 'insert'
                                 WHEN 'sales-data-deleted' THEN 'delete' ELSE 'update' END,
        'actor', actor, 'jobId', v.job_id,
        'storeId', v.store_id, 'year', v.year, 'month', v.month,
        'previous', CASE WHEN v.kind = 'sales-data-updated'
                          AND (v.before_store_id, v.before_year, v.before_month)
                              IS DISTINCT FROM (v.store_id, v.year, v.month)
                         THEN jsonb_build_object('storeId', v.before_store_id, 'year', v.before_year,
                                                 'month', v.before_month) END,
        'valuesKnown', v.known,
        'changes', CASE WHEN v.known THEN changes END);
END $$;

-- The history of a sales record (`GET /api/v2/sales/{id}/history`), newest
-- first, `max_rows` versions older than `before_version` (NULL: from the
-- newest):
--   {"id", "currentVersion" (NULL when deleted), "deleted",
--    "versions": [entry, ...], "nextBeforeVersion" (NULL on the last page),
--    "complete" (the retained versions reach back to the insert),
--    "gone": NULL, or {"throughVersion": k, "message"} when versions 1..k
--    are no longer retained}.
-- NULL when nothing is known of the record (no row, no retained event).
CREATE FUNCTION sales.history(id bigint, max_rows integer DEFAULT 50, before_version bigint DEFAULT NULL)
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

-- A sales record as it was at `as_of` (`GET /api/v2/sales/{id}?asOf=`), as
-- the document sales.sales_doc builds (totals recomputed from the daily
-- data of that version; `createdAt` from its insert, `updatedAt` the
-- version's time), projected by `fields` / `exclude`. The store, when a
-- field asks for it, is the store as it is now. A record removed by a
-- TRUNCATE is read from the state the TRUNCATE kept (sales.record_row):
-- its last version is answered from then on. NULL when nothing is known
-- of the record. Raises PS404 when the record did not exist at `as_of`
-- (not yet inserted, or deleted), and PSGON when that version is older
-- than the retained history, or its daily data is not known (events
-- written before pg_sales 0.3.0, or a row removed without a trace: see
-- sales.record_versions).
CREATE FUNCTION sales.get_sales_as_of(id bigint, as_of timestamptz, fields text[] DEFAULT NULL,
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
