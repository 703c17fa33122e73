-- pg_sales 0.13.0 -> 0.14.0.
--
-- sales.events_head() refuses REPEATABLE READ and SERIALIZABLE (25000), as
-- sales.events_after_seq does: it reads the horizon, then the log with a
-- snapshot taken after it, and under those the transaction's snapshot
-- predates the horizon. sales.events_after_seq now takes READ UNCOMMITTED,
-- which Postgres runs as READ COMMITTED (it was refused).
--
-- The view sales.event_delivery reads its head, newest event and held-back
-- count together, after its horizon, through the new
-- sales.event_delivery_state(); its newest_id is the newest event in
-- delivery order (it was the highest id, read with the statement's older
-- snapshot, and could be below head_id).

CREATE OR REPLACE FUNCTION sales.events_after_seq(after_seq bigint, max_rows integer DEFAULT 1000, wait_ms integer DEFAULT 0)
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

CREATE OR REPLACE FUNCTION sales.events_head() RETURNS bigint
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

CREATE OR REPLACE VIEW sales.event_delivery AS
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
