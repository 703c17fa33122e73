-- Events: what writes append, emit / announce / notify_user, events_since,
-- events_head, prune_events, current_actor.
-- Each file runs in a fresh psql session of the same database, in name order.
\set SHOW_CONTEXT never
\pset null (null)
-- Runs one statement and shows its error as SQLSTATE: message, with the
-- DETAIL of pg_sales' own codes (PS...: the JSON report). Other DETAILs can
-- hold timestamps (a failing row), so they are left out.
CREATE FUNCTION pg_temp.err(statement text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE detail text;
BEGIN
    EXECUTE statement;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL;
    RETURN SQLSTATE || ': ' || SQLERRM
        || CASE WHEN SQLSTATE LIKE 'PS%' AND detail <> '' THEN ' [' || detail || ']' ELSE '' END;
END $$;

SELECT count(*) > 0 AS earlier_files_made_events FROM sales.events;
SELECT max(id) AS before FROM sales.events \gset

SELECT set_config('sales.user_id', '42', false);
SELECT sales.current_actor();
INSERT INTO sales.stores (id, code, name, region) OVERRIDING SYSTEM VALUE VALUES (301, 'E1', 'Events', 'West');
SELECT sales.batch_upsert('[{"storeId": 301, "year": 2024, "month": 5, "dailyData": {"1": {"sales": 1}}}]') ->> 'inserted' AS inserted;
UPDATE sales.stores SET status = 'renovating' WHERE id = 301;
UPDATE sales.stores SET status = 'renovating' WHERE id = 301;   -- no change, no event
UPDATE sales.stores SET region = 'East' WHERE id = 301;           -- previousRegion: West
DELETE FROM sales.stores WHERE id = 301;                          -- cascades to its month
SELECT kind, store_id, actor_id, row_version, payload - 'createdAt' - 'updatedAt' AS payload
FROM sales.events WHERE id > :before ORDER BY id;
SELECT set_config('sales.user_id', '', false);
SELECT sales.current_actor();

INSERT INTO sales.users (id, email, password_hash, role) OVERRIDING SYSTEM VALUE
VALUES (7, 'seven@example.com', '$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA', 'staff');
SELECT sales.announce('Inventory tonight', 'warning') > :before AS announced;
SELECT sales.announce('Hello') > :before AS default_level;
SELECT sales.notify_user(7, 'Your export is ready', '{"file": "x.csv"}') > :before AS notified;
SELECT sales.emit('custom-kind', '{"a": 1}', 301) > :before AS emitted;
SELECT sales.emit('custom-null-payload', NULL) > :before AS emitted;
SELECT kind, store_id, user_id, payload FROM sales.events WHERE id > :before AND kind IN
    ('system-announcement', 'user-notification', 'custom-kind', 'custom-null-payload') ORDER BY id;

SELECT pg_temp.err($$SELECT sales.announce('')$$);
SELECT pg_temp.err($$SELECT sales.announce(NULL)$$);
SELECT pg_temp.err($$SELECT sales.announce('x', 'loud')$$);
SELECT pg_temp.err($$SELECT sales.announce('x', NULL)$$);
SELECT pg_temp.err($$SELECT sales.notify_user(12345, 'x')$$);
SELECT pg_temp.err($$SELECT sales.notify_user(NULL, 'x')$$);
SELECT pg_temp.err($$SELECT sales.notify_user(7, ' ')$$);
SELECT pg_temp.err($$SELECT sales.emit(' ', '{}')$$);
SELECT pg_temp.err($$SELECT sales.emit(NULL, '{}')$$);
-- Blank is anything that shows nothing: line breaks, tabs, zero-width
-- and no-break spaces, not spaces alone.
SELECT pg_temp.err($$SELECT sales.announce(E'\n\t ')$$);
SELECT pg_temp.err($$SELECT sales.announce(E'\u200b\u00a0\ufeff')$$);
SELECT pg_temp.err($$SELECT sales.notify_user(7, E'\r\n')$$);
SELECT pg_temp.err($$SELECT sales.emit(E'\t', '{}')$$);

-- Reading the log: everything of finished transactions, in delivery (seq)
-- order. Nothing of this database is running, so that is every event.
SELECT (SELECT array_agg(id ORDER BY seq) FROM sales.events)
     = (SELECT array_agg(id) FROM sales.events_since(0, 100000)) AS all_in_order;
SELECT count(*) FROM sales.events_since(:before, 2);
SELECT sales.events_head() = (SELECT id FROM sales.events ORDER BY seq DESC LIMIT 1) AS head_is_last;
SELECT sales.events_horizon() > (SELECT max(seq) FROM sales.events) AS horizon_past_the_log;
-- The log's epoch: its identity (one row, made with the extension) and the
-- WAL timeline.
SELECT sales.event_log_epoch() ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.[1-9][0-9]*$' AS epoch_shape,
       sales.event_log_epoch() LIKE (SELECT epoch::text FROM sales.event_log_identity) || '.%' AS epoch_is_the_identity;
SELECT pg_temp.err($$INSERT INTO sales.event_log_identity DEFAULT VALUES$$);
SELECT count(*) AS holders FROM sales.event_holders();
SELECT pg_temp.err($$SELECT * FROM sales.events_next(0, 10, -1)$$);
SELECT pg_temp.err($$SELECT * FROM sales.events_after_seq(-1)$$);
SELECT pg_temp.err($$SELECT * FROM sales.events_since(-1)$$);
SELECT pg_temp.err($$SELECT * FROM sales.events_since(NULL)$$);
SELECT pg_temp.err($$SELECT * FROM sales.events_since(0, 0)$$);
SELECT pg_temp.err($$SELECT * FROM sales.events_since(0, 100001)$$);
SELECT pg_temp.err($$SELECT * FROM sales.events_since(0, NULL)$$);
SELECT pg_temp.err($$SELECT * FROM sales.events_since(987654321)$$);

-- Retention: nothing is old enough here; the newest event is always kept.
SELECT sales.prune_events('1 day');
SELECT sales.prune_events('0') < (SELECT count(*) FROM sales.events) AS keeps_the_newest;
SELECT count(*) >= 1 AS something_kept FROM sales.events;
SELECT pg_temp.err($$SELECT sales.prune_events('-1 day')$$);
SELECT pg_temp.err($$SELECT sales.prune_events(NULL)$$);
-- A retention reaching back past what a timestamp holds keeps everything.
SELECT sales.prune_events('1000000 years') AS past_the_earliest_time;
SELECT sales.prune_events('1 day', '1000000 years') AS history_past_the_earliest_time;

-- The library defines its settings: the actor and the job take ids (a
-- whole number from 1 up, or empty for none), refused when set otherwise,
-- and coalescing takes only a Boolean (`false` turns it off as `off` does).
SELECT current_setting('sales.user_id') = '' AS actor_unset, current_setting('sales.job_id') = '' AS job_unset;
SELECT current_setting('sales.notify_coalesce') AS coalesce_default;
SELECT pg_temp.err($$SET sales.notify_coalesce = maybe$$);
SET sales.notify_coalesce = false;
SELECT current_setting('sales.notify_coalesce') AS coalesce_off;
RESET sales.notify_coalesce;
INSERT INTO sales.stores (id, code, name, region) OVERRIDING SYSTEM VALUE VALUES (302, 'E2', 'Settings', 'West');
SELECT pg_temp.err($$SELECT set_config('sales.user_id', 'forty-two', false)$$);
SELECT pg_temp.err($$SET sales.user_id = '-3'$$);
SELECT pg_temp.err($$SET sales.user_id = '0'$$);
SELECT pg_temp.err($$SET sales.job_id = '1.5'$$);
SELECT current_setting('sales.user_id') = '' AS actor_still_unset;
SET sales.user_id = '43';
SET sales.job_id = '8';
SELECT sales.batch_upsert('[{"storeId": 302, "year": 2024, "month": 6, "dailyData": {"1": {"sales": 1}}}]') ->> 'inserted' AS inserted;
SELECT kind, actor_id, payload ->> 'jobId' AS job FROM sales.events
WHERE store_id = 302 AND kind = 'sales-data-created';
RESET sales.user_id;
RESET sales.job_id;
DELETE FROM sales.stores WHERE id = 302;

-- The lock a committing NOTIFY holds, taken to the end of the transaction
-- (superusers; tests show what commits do meanwhile).
BEGIN;
SELECT sales.take_notify_lock() AS taken;
ROLLBACK;
