-- Access changes reach every server instance at their commit.
--
-- A user or session event (`user-created`, `user-updated`, `user-deleted`,
-- `session-revoked`) is relayed in delivery order like every event, so
-- while another event-writing transaction runs (a long batch, a bulk load
-- in psql), it waits behind it, and instances other than the one that made
-- the change kept accepting the user's older tokens until then. This
-- trigger also announces each such event on the channel `sales_access` as
-- its transaction commits (NOTIFY is delivered at commit, whatever other
-- transactions are open). The announcement names the user or session and
-- carries the event's generation and reason; an instance reads the user's
-- state back from the database before applying anything, so a NOTIFY sent
-- by hand can at most make it read again.
CREATE FUNCTION auth.tg_access_notify() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_notify('sales_access',
                      jsonb_build_object('id', NEW.id, 'kind', NEW.kind,
                                         'userId', NEW.payload -> 'userId',
                                         'sessionId', NEW.payload -> 'sessionId',
                                         'generation', NEW.payload -> 'generation',
                                         'revoke', NEW.payload -> 'revoke')::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER access_notify AFTER INSERT ON sales.events
FOR EACH ROW
WHEN (NEW.kind IN ('user-created', 'user-updated', 'user-deleted', 'session-revoked'))
EXECUTE FUNCTION auth.tg_access_notify();
