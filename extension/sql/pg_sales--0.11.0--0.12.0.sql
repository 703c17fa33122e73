-- pg_sales 0.11.0 -> 0.12.0.
--
-- A role that may write sales rows or stores needs no privilege on
-- sales.events (which holds every user's events, emails and private
-- notifications included) to have its changes' events written. The event
-- triggers written in plpgsql (deletes, stores, truncates) run as their
-- owner, with a fixed search_path; the library reads and writes the log as
-- its owner where it does so on a writer's behalf (the delivery clock's
-- first read, a batch's batch-completed event, the commit's NOTIFY lookup).
-- Before, deletes and store writes needed INSERT on the log, and every
-- write SELECT on it.

ALTER FUNCTION sales.tg_sales_deleted() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.tg_stores_changed() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sales.tg_truncated() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
