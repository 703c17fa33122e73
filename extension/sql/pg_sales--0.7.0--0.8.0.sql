-- pg_sales 0.7.0 -> 0.8.0 (ALTER EXTENSION pg_sales UPDATE TO '0.8.0').
--
-- Runs in one transaction inside ALTER EXTENSION; every object created here
-- becomes a member of the extension. It must leave a database exactly as a
-- fresh CREATE EXTENSION pg_sales VERSION '0.8.0' would:
-- tests/tests/extension_upgrade.rs compares the two catalogs.
\echo Use "ALTER EXTENSION pg_sales UPDATE TO '0.8.0'" to load this file. \quit

---------------------------------------------------------------------------
-- History reads walk only as far as they need (history.sql): a record's
-- versions are rebuilt from the newest down to the page asked for, or to
-- the version current at asOf, never all of them on every call; the
-- chain's extent and the record's stores come from the events' columns.
-- A version's time never goes backwards (the running maximum of its
-- writers' start times).
---------------------------------------------------------------------------

DROP FUNCTION sales.record_versions(bigint);

CREATE FUNCTION sales.record_versions(id bigint, down_to bigint DEFAULT NULL)
RETURNS SETOF sales.record_version
LANGUAGE plpgsql STABLE AS $$
DECLARE
    r record;
    o sales.record_version;
    cur_daily jsonb;
    cur_version bigint;
    state jsonb;
    state_known boolean := true;
    expect bigint;
BEGIN
    IF id IS NULL THEN
        RAISE EXCEPTION 'id must not be NULL' USING ERRCODE = '22023';
    END IF;
    SELECT m.daily_data, m.version INTO cur_daily, cur_version
    FROM sales.monthly_sales m WHERE m.id = record_versions.id;
    state := cur_daily;
    expect := cur_version;
    FOR r IN
        SELECT x.eid, x.ekind, x.eactor, x.ever, x.p,
               max(x.eat) OVER (ORDER BY x.ever, x.eid ROWS UNBOUNDED PRECEDING) AS eat
        FROM (
            SELECT e.id AS eid, e.kind AS ekind, e.actor_id AS eactor, e.row_version AS ever,
                   e.payload AS p, e.created_at AS eat
            FROM sales.events e
            WHERE e.row_id = record_versions.id
              AND e.kind IN ('sales-data-created', 'sales-data-updated', 'sales-data-deleted')
            UNION ALL
            SELECT h.id, h.kind, h.actor_id, h.row_version, h.payload, h.created_at
            FROM sales.event_history h
            WHERE h.row_id = record_versions.id
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

CREATE FUNCTION sales.record_chain(id bigint, OUT newest bigint, OUT oldest bigint, OUT oldest_kind text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    r record;
    expect bigint;
BEGIN
    SELECT m.version INTO expect FROM sales.monthly_sales m WHERE m.id = record_chain.id;
    FOR r IN
        SELECT e.row_version AS v, e.kind AS k, e.id AS eid FROM sales.events e
        WHERE e.row_id = record_chain.id
          AND e.kind IN ('sales-data-created', 'sales-data-updated', 'sales-data-deleted')
        UNION ALL
        SELECT h.row_version, h.kind, h.id FROM sales.event_history h WHERE h.row_id = record_chain.id
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

CREATE OR REPLACE FUNCTION sales.record_stores(id bigint) RETURNS bigint[]
LANGUAGE sql STABLE AS $$
    SELECT coalesce(array_agg(DISTINCT s ORDER BY s), '{}') FROM (
        SELECT m.store_id AS s FROM sales.monthly_sales m WHERE m.id = record_stores.id
        UNION ALL
        SELECT unnest(ARRAY[e.store_id, (e.payload->>'previousStoreId')::bigint]) FROM sales.events e
        WHERE e.row_id = record_stores.id
          AND e.kind IN ('sales-data-created', 'sales-data-updated', 'sales-data-deleted')
        UNION ALL
        SELECT unnest(ARRAY[h.store_id, (h.payload->>'previousStoreId')::bigint]) FROM sales.event_history h
        WHERE h.row_id = record_stores.id
    ) x WHERE s IS NOT NULL
$$;

CREATE OR REPLACE FUNCTION sales.history(id bigint, max_rows integer DEFAULT 50, before_version bigint DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    cur_version bigint;
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
    IF oldest IS NULL AND cur_version IS NULL THEN
        RETURN NULL;
    END IF;
    IF oldest IS NULL THEN
        gone_through := cur_version;
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
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
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
BEGIN
    IF id IS NULL THEN
        RAISE EXCEPTION 'id must not be NULL' USING ERRCODE = '22023';
    END IF;
    IF as_of IS NULL THEN
        RAISE EXCEPTION 'as_of must not be NULL' USING ERRCODE = '22023';
    END IF;
    PERFORM sales.project('{}'::jsonb, fields, exclude);
    SELECT * INTO m FROM sales.monthly_sales x WHERE x.id = get_sales_as_of.id;
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
                WHERE e.row_id = get_sales_as_of.id
                  AND e.kind IN ('sales-data-created', 'sales-data-updated', 'sales-data-deleted')
                UNION ALL
                SELECT h.id, h.row_version, h.created_at FROM sales.event_history h
                WHERE h.row_id = get_sales_as_of.id
            ) x
        ) y;
        IF target IS NOT NULL THEN
            SELECT * INTO hit FROM sales.record_versions(get_sales_as_of.id, target) rv
            WHERE rv.version = target;
            have := FOUND;
        END IF;
    END IF;
    SELECT x.at INTO created FROM (
        SELECT e.created_at AS at FROM sales.events e
        WHERE e.row_id = get_sales_as_of.id AND e.kind = 'sales-data-created'
        UNION ALL
        SELECT h.created_at FROM sales.event_history h
        WHERE h.row_id = get_sales_as_of.id AND h.kind = 'sales-data-created'
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

---------------------------------------------------------------------------
-- TRUNCATE of the sales or store table writes a `table-truncated` event
-- (events.sql), so readers' caches hear of it.
---------------------------------------------------------------------------

-- TRUNCATE fires no row trigger: one `table-truncated` event per truncated
-- table (payload {"table": ...}) tells readers that everything they hold
-- from it is gone (the server clears its whole cache on it).
CREATE FUNCTION sales.tg_truncated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sales.events (kind, actor_id, payload)
    VALUES ('table-truncated', sales.current_actor(), jsonb_build_object('table', TG_TABLE_NAME));
    RETURN NULL;
END $$;

CREATE TRIGGER monthly_sales_truncated AFTER TRUNCATE ON sales.monthly_sales
    FOR EACH STATEMENT EXECUTE FUNCTION sales.tg_truncated();
CREATE TRIGGER stores_truncated AFTER TRUNCATE ON sales.stores
    FOR EACH STATEMENT EXECUTE FUNCTION sales.tg_truncated();

---------------------------------------------------------------------------
-- The id sequences of the tables a dump keeps are dumped too (tables.sql).
---------------------------------------------------------------------------
SELECT pg_catalog.pg_extension_config_dump('sales.stores_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('sales.monthly_sales_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('sales.users_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('sales.events_id_seq', '');

---------------------------------------------------------------------------
-- Pruning that deletes anything writes an events-pruned event itself, so a
-- scheduled SQL call invalidates cached histories as the server's
-- maintenance does (events.sql).
---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION sales.prune_events(retention interval DEFAULT '7 days', history_retention interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n bigint := 0;
    expired bigint;
    horizon bigint;
    last_seq bigint;
    keep_from bigint;
    cut bigint;
BEGIN
    IF retention IS NULL OR retention < interval '0' THEN
        RAISE EXCEPTION 'retention must be a non-negative interval' USING ERRCODE = '22023';
    END IF;
    IF history_retention IS NOT NULL AND history_retention < retention THEN
        RAISE EXCEPTION 'history_retention must be at least retention (%), not %', retention, history_retention
            USING ERRCODE = '22023';
    END IF;
    DELETE FROM sales.event_history h WHERE h.created_at < now() - coalesce(history_retention, retention);
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
    WHERE e.created_at >= now() - retention AND e.seq <= last_seq
    ORDER BY e.seq LIMIT 1;
    cut := least(coalesce(keep_from, last_seq), last_seq);
    IF history_retention IS NOT NULL AND history_retention > retention THEN
        INSERT INTO sales.event_history (row_id, id, kind, store_id, actor_id, row_version, payload, created_at)
        SELECT e.row_id, e.id, e.kind, e.store_id, e.actor_id, e.row_version, e.payload, e.created_at
        FROM sales.events e
        WHERE e.seq < cut AND e.row_id IS NOT NULL
          AND e.kind IN ('sales-data-created', 'sales-data-updated', 'sales-data-deleted')
          AND e.created_at >= now() - history_retention
        ON CONFLICT DO NOTHING;
    END IF;
    DELETE FROM sales.events e WHERE e.seq < cut;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 OR expired > 0 THEN
        PERFORM sales.emit('events-pruned', jsonb_build_object('pruned', n, 'expired', expired));
    END IF;
    RETURN n;
END $$;

---------------------------------------------------------------------------
-- Deletes applied by logical replication can get their events: the
-- function also runs as a row trigger, which a subscriber creates for
-- replica mode (events.sql), since the apply fires row triggers only.
---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION sales.tg_sales_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE job bigint := nullif(current_setting('sales.job_id', true), '')::bigint;
BEGIN
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
