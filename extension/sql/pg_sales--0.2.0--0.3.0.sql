-- pg_sales 0.2.0 -> 0.3.0 (ALTER EXTENSION pg_sales UPDATE TO '0.3.0').
--
-- Runs in one transaction inside ALTER EXTENSION; every object created here
-- becomes a member of the extension. It must leave a database exactly as a
-- fresh CREATE EXTENSION pg_sales VERSION '0.3.0' would:
-- tests/tests/extension_upgrade.rs compares the two catalogs.
\echo Use "ALTER EXTENSION pg_sales UPDATE TO '0.3.0'" to load this file. \quit

---------------------------------------------------------------------------
-- Sales events from a Rust row trigger (src/events.rs): same events, same
-- payloads, without plpgsql's jsonb_build_object on every row written.
---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION sales.tg_sales_changed() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'tg_sales_changed_wrapper';


---------------------------------------------------------------------------
-- The SQL surface's filter and "needs the stores join" rules come from the
-- Rust rules the server uses (src/surface.rs); period_arg goes with the
-- plpgsql filter_sql.
---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION sales.filter_sql(store_ids bigint[] DEFAULT NULL, region text DEFAULT NULL,
    year integer DEFAULT NULL, month integer DEFAULT NULL,
    from_period text DEFAULT NULL, to_period text DEFAULT NULL,
    min_total_sales numeric DEFAULT NULL, max_total_sales numeric DEFAULT NULL)
RETURNS text IMMUTABLE PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'filter_sql_wrapper';

DROP FUNCTION sales.period_arg(text, text);

CREATE FUNCTION sales.needs_store(fields text[] DEFAULT NULL) RETURNS bool
IMMUTABLE PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'needs_store_wrapper';

CREATE OR REPLACE FUNCTION sales.list_sales(store_ids bigint[] DEFAULT NULL, region text DEFAULT NULL,
    year integer DEFAULT NULL, month integer DEFAULT NULL,
    from_period text DEFAULT NULL, to_period text DEFAULT NULL,
    min_total_sales numeric DEFAULT NULL, max_total_sales numeric DEFAULT NULL,
    fields text[] DEFAULT NULL, exclude text[] DEFAULT NULL,
    sort text DEFAULT 'storeId,year,month', max_rows integer DEFAULT 50, skip_rows bigint DEFAULT 0)
RETURNS SETOF jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    w text := sales.filter_sql(store_ids, region, year, month, from_period, to_period, min_total_sales, max_total_sales);
    o text := sales.sort_sql(sort);
    with_store boolean;
    doc text;
BEGIN
    IF max_rows IS NOT NULL AND max_rows < 1 THEN
        RAISE EXCEPTION 'max_rows: % is not a page size; use 1 or more, or NULL for all', max_rows
            USING ERRCODE = '22023';
    END IF;
    IF skip_rows IS NULL OR skip_rows < 0 THEN
        RAISE EXCEPTION 'skip_rows: must be 0 or more' USING ERRCODE = '22023';
    END IF;
    -- Checks the paths now, even when no row matches.
    PERFORM sales.project('{}'::jsonb, fields, exclude);
    with_store := sales.needs_store(fields);
    doc := CASE WHEN with_store THEN 'sales.sales_doc(m, s)' ELSE 'sales.sales_doc(m)' END;
    IF coalesce(cardinality(fields), 0) > 0 OR coalesce(cardinality(exclude), 0) > 0 THEN
        doc := format('sales.project(%s, %L::text[], %L::text[])', doc, fields, exclude);
    END IF;
    RETURN QUERY EXECUTE format(
        'SELECT %s FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id
         WHERE %s ORDER BY %s LIMIT %s OFFSET %s',
        doc, w, o, coalesce(max_rows::text, 'ALL'), skip_rows);
END $$;

CREATE OR REPLACE FUNCTION sales.get_sales(id bigint, fields text[] DEFAULT NULL, exclude text[] DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE r jsonb;
BEGIN
    IF id IS NULL THEN
        RAISE EXCEPTION 'id must not be NULL' USING ERRCODE = '22023';
    END IF;
    PERFORM sales.project('{}'::jsonb, fields, exclude);
    SELECT sales.project(sales.sales_doc(m, s), fields, exclude) INTO r
    FROM sales.monthly_sales m JOIN sales.stores s ON s.id = m.store_id
    WHERE m.id = get_sales.id;
    IF r IS NOT NULL AND NOT sales.needs_store(fields) THEN
        r := r - 'store';
    END IF;
    RETURN r;
END $$;


---------------------------------------------------------------------------
-- History: update and delete events carry the old values of the days they
-- change (`previousDays`) and the writing job (`jobId`); an index finds a
-- record's events; sales.event_history keeps them past the log's
-- retention; sales.history and sales.get_sales_as_of read them back.
---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION sales.tg_sales_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE job bigint := nullif(current_setting('sales.job_id', true), '')::bigint;
BEGIN
    INSERT INTO sales.events (kind, store_id, actor_id, row_id, row_version, payload)
    SELECT 'sales-data-deleted', o.store_id, sales.current_actor(), o.id, o.version + 1,
           jsonb_build_object('id', o.id, 'storeId', o.store_id, 'year', o.year, 'month', o.month,
                              'version', o.version + 1, 'previousDays', o.daily_data)
           || CASE WHEN job IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('jobId', job) END
    FROM old_rows o;
    RETURN NULL;
END $$;

CREATE INDEX events_row_idx ON sales.events (row_id, row_version);
COMMENT ON INDEX sales.events_row_idx IS 'pg_sales: required by sales.history and sales.get_sales_as_of';

-- Sales events kept for history after they leave the event log:
-- sales.prune_events(retention, history_retention) moves the sales events
-- it prunes here while they are younger than history_retention, and
-- deletes them from here after. The key leads with the record, the way
-- history reads them.
CREATE TABLE sales.event_history (
    row_id       bigint NOT NULL,
    id           bigint NOT NULL,
    kind         text NOT NULL,
    store_id     bigint,
    actor_id     bigint,
    row_version  bigint,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL,
    CONSTRAINT event_history_pkey PRIMARY KEY (row_id, id)
);
SELECT pg_catalog.pg_extension_config_dump('sales.event_history', '');

DROP FUNCTION sales.prune_events(interval);

CREATE FUNCTION sales.prune_events(retention interval DEFAULT '7 days', history_retention interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
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
    horizon := sales.events_horizon();
    SELECT e.seq INTO last_seq FROM sales.events e WHERE e.seq < horizon ORDER BY e.seq DESC LIMIT 1;
    IF last_seq IS NULL THEN
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
    RETURN n;
END $$;

-- `daily` with the days of `previous` put back: a day whose old value is
-- null was not reported before, and is removed.
CREATE FUNCTION sales.daily_undo(daily jsonb, previous jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(jsonb_object_agg(k, v), '{}'::jsonb) FROM (
        SELECT d.key AS k, d.value AS v FROM jsonb_each(coalesce(daily, '{}'::jsonb)) d
        WHERE NOT coalesce(previous, '{}'::jsonb) ? d.key
        UNION ALL
        SELECT p.key, p.value FROM jsonb_each(coalesce(previous, '{}'::jsonb)) p
        WHERE jsonb_typeof(p.value) <> 'null'
    ) x
$$;

-- One retained version of a sales record (sales.record_versions).
CREATE TYPE sales.record_version AS (version bigint, at timestamptz, event_id bigint, kind text,
    actor_id bigint, job_id bigint, store_id bigint, year integer, month integer, daily_after jsonb,
    before_store_id bigint, before_year integer, before_month integer, daily_before jsonb, known boolean);

-- The retained versions of one sales record, newest first: who wrote each
-- (actor, job), when, where the record was after and before it (store,
-- year, month) and its daily data after and before it. `known` is false
-- where the old values are not in the events (written before pg_sales
-- 0.3.0): the daily data before that version, and of every older one, is
-- then NULL. The walk stops at the first missing version (pruned).
CREATE FUNCTION sales.record_versions(id bigint) RETURNS SETOF sales.record_version
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
        SELECT e.id AS eid, e.kind AS ekind, e.actor_id AS eactor, e.row_version AS ever,
               e.payload AS p, e.created_at AS eat
        FROM sales.events e
        WHERE e.row_id = record_versions.id
          AND e.kind IN ('sales-data-created', 'sales-data-updated', 'sales-data-deleted')
        UNION ALL
        SELECT h.id, h.kind, h.actor_id, h.row_version, h.payload, h.created_at
        FROM sales.event_history h
        WHERE h.row_id = record_versions.id
        ORDER BY 4 DESC, 1 DESC
    LOOP
        -- Versions are consecutive; a gap is where pruning cut.
        EXIT WHEN expect IS NOT NULL AND r.ever <> expect;
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

-- Every store a record belonged to, now and in its retained history (a
-- caller sees a record's history only when all of them are in its scope).
CREATE FUNCTION sales.record_stores(id bigint) RETURNS bigint[]
LANGUAGE sql STABLE AS $$
    SELECT coalesce(array_agg(DISTINCT s ORDER BY s), '{}') FROM (
        SELECT m.store_id AS s FROM sales.monthly_sales m WHERE m.id = record_stores.id
        UNION ALL
        SELECT unnest(ARRAY[v.store_id, v.before_store_id]) FROM sales.record_versions(record_stores.id) v
    ) x WHERE s IS NOT NULL
$$;

-- One history entry as a document: version, time, actor ({"type": "user",
-- "userId", "email"}, or {"type": "sql"} for a write that named no user),
-- operation (insert, update, delete), jobId (import or asynchronous batch),
-- where the record was (storeId, year, month; `previous` when the version
-- moved it), and each changed day with its old and new value (null: not
-- reported).
CREATE FUNCTION sales.history_entry(v sales.record_version) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
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
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    cur_version bigint;
    vs sales.record_version;
    entries jsonb := '[]';
    n integer := 0;
    more boolean := false;
    oldest bigint;
    oldest_kind text;
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
    FOR vs IN SELECT * FROM sales.record_versions(history.id) LOOP
        oldest := vs.version;
        oldest_kind := vs.kind;
        CONTINUE WHEN before_version IS NOT NULL AND vs.version >= before_version;
        IF n >= max_rows THEN
            more := true;
            CONTINUE;
        END IF;
        entries := entries || sales.history_entry(vs);
        last_version := vs.version;
        n := n + 1;
    END LOOP;
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

-- A sales record as it was at `as_of` (`GET /api/v2/sales/{id}?asOf=`), as
-- the document sales.sales_doc builds (totals recomputed from the daily
-- data of that version; `createdAt` from its insert, `updatedAt` the
-- version's time), projected by `fields` / `exclude`. The store, when a
-- field asks for it, is the store as it is now. NULL when nothing is known
-- of the record. Raises PS404 when the record did not exist at `as_of`
-- (not yet inserted, or deleted), and PSGON when that version is older
-- than the retained history.
CREATE FUNCTION sales.get_sales_as_of(id bigint, as_of timestamptz, fields text[] DEFAULT NULL,
    exclude text[] DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    m sales.monthly_sales;
    v sales.record_version;
    hit sales.record_version;
    have boolean := false;
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
    FOR v IN SELECT * FROM sales.record_versions(get_sales_as_of.id) LOOP
        n := n + 1;
        oldest_version := v.version;
        oldest_at := v.at;
        IF NOT have AND v.at <= as_of THEN
            hit := v;
            have := true;
        END IF;
        IF v.kind = 'sales-data-created' THEN
            created := v.at;
        END IF;
    END LOOP;
    IF n = 0 AND m.id IS NULL THEN
        RETURN NULL;
    END IF;
    IF NOT have THEN
        -- Nothing retained at or before as_of.
        IF n = 0 AND m.updated_at <= as_of THEN
            -- Unchanged since before as_of: the row as it is.
            doc := sales.sales_doc(m);
        ELSIF created IS NOT NULL OR m.created_at > as_of THEN
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
-- Summaries over any dimensions and metrics, with comparison and top N
-- (the statement from Rust, src/surface.rs, over sales_core::summary).
---------------------------------------------------------------------------

CREATE FUNCTION sales.summary_sql(group_by text DEFAULT NULL, metrics text DEFAULT NULL,
    compare_to text DEFAULT NULL, top integer DEFAULT NULL, order_by text DEFAULT NULL,
    store_ids bigint[] DEFAULT NULL, region text DEFAULT NULL,
    year integer DEFAULT NULL, month integer DEFAULT NULL,
    from_period text DEFAULT NULL, to_period text DEFAULT NULL,
    min_total_sales numeric DEFAULT NULL, max_total_sales numeric DEFAULT NULL)
RETURNS text IMMUTABLE PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'summary_sql_wrapper';

-- Summaries (`GET /api/v2/sales/summary`): `group_by` any of store, region,
-- year, quarter, month, week, weekday, day (comma-separated); `metrics`
-- (totalSales, totalCustomers, months, stores by default; count,
-- {sum|avg|min|max}{Sales|Customers|Transactions}, salesPerCustomer);
-- `compare_to` previousPeriod or previousYear (`previous` and `changePct`
-- in each row); `top` groups by `order_by`; and the filters of
-- sales.list_sales. The statement comes from sales.summary_sql (Rust, the
-- rules the server uses). Returns {"rows": [...], "groups": n}.
CREATE FUNCTION sales.summary(group_by text DEFAULT NULL, metrics text DEFAULT NULL,
    compare_to text DEFAULT NULL, top integer DEFAULT NULL, order_by text DEFAULT NULL,
    store_ids bigint[] DEFAULT NULL, region text DEFAULT NULL,
    year integer DEFAULT NULL, month integer DEFAULT NULL,
    from_period text DEFAULT NULL, to_period text DEFAULT NULL,
    min_total_sales numeric DEFAULT NULL, max_total_sales numeric DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    q text := sales.summary_sql(group_by, metrics, compare_to, top, order_by, store_ids, region,
                                year, month, from_period, to_period, min_total_sales, max_total_sales);
    r text;
    n bigint;
BEGIN
    EXECUTE q INTO r, n;
    RETURN jsonb_build_object('rows', r::jsonb, 'groups', n);
END $$;

-- This transaction's own events, by an index condition on seq (the bounds
-- as scalar subqueries, evaluated once, rather than per row of the log).
CREATE OR REPLACE FUNCTION sales.transaction_events() RETURNS SETOF sales.events
LANGUAGE sql VOLATILE AS $$
    SELECT e.* FROM sales.events e
    WHERE e.seq BETWEEN (SELECT sales.transaction_first_seq()) AND (SELECT sales.transaction_last_seq())
      AND e.xid = (SELECT pg_current_xact_id_if_assigned())
    ORDER BY e.seq
$$;
