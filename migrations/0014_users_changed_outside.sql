-- Users changed outside the server (psql, a script, a restore tool).
--
-- The server changes a user in a transaction that moves the user's access
-- generation and writes the event every instance revokes tokens from
-- (`user-updated`, `user-deleted`; server/src/users.rs). A change made by
-- plain SQL did neither, so the user's access tokens kept working until
-- they expired. This trigger does for such a change what the server does:
--
-- * DELETE: a tombstone in auth.deleted_users and `user-deleted`;
-- * UPDATE of email, role, store_ids or password_hash: the generation moves
--   (older tokens are refused; a refresh gives one with the new scope), a
--   password change ends every session, and `user-updated` is written (into
--   the user's history too).
--
-- The server marks its own changes (the transaction-local setting
-- `sales_server.users_managed`, see users::managed) and the trigger leaves
-- them alone: they are already complete. INSERT needs nothing: a new user
-- has generation 0 and no tokens yet.
CREATE FUNCTION auth.tg_users_changed_outside() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed text[] := '{}';
    gen bigint;
    dis boolean;
    ev bigint;
BEGIN
    IF coalesce(current_setting('sales_server.users_managed', true), '') = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        INSERT INTO auth.deleted_users (user_id) VALUES (OLD.id)
        ON CONFLICT (user_id) DO UPDATE SET deleted_at = now();
        PERFORM sales.emit('user-deleted',
                           jsonb_build_object('userId', OLD.id, 'email', OLD.email, 'role', OLD.role,
                                              'outside', true));
        RETURN NULL;
    END IF;
    IF NEW.email IS DISTINCT FROM OLD.email THEN changed := changed || 'email'::text; END IF;
    IF NEW.role IS DISTINCT FROM OLD.role THEN changed := changed || 'role'::text; END IF;
    IF NEW.store_ids IS DISTINCT FROM OLD.store_ids THEN changed := changed || 'stores'::text; END IF;
    IF NEW.password_hash IS DISTINCT FROM OLD.password_hash THEN changed := changed || 'password'::text; END IF;
    IF NEW.id IS DISTINCT FROM OLD.id THEN
        RAISE EXCEPTION 'the id of a user cannot change' USING ERRCODE = '22023';
    END IF;
    IF cardinality(changed) = 0 THEN
        RETURN NULL;
    END IF;
    INSERT INTO auth.user_state AS s (user_id, generation) VALUES (NEW.id, 1)
    ON CONFLICT (user_id) DO UPDATE SET generation = s.generation + 1, updated_at = now()
    RETURNING s.generation, s.disabled INTO gen, dis;
    IF 'password' = ANY (changed) THEN
        UPDATE auth.sessions SET revoked_at = now(), revoked_reason = 'password'
        WHERE user_id = NEW.id AND revoked_at IS NULL;
    END IF;
    ev := sales.emit('user-updated',
                     jsonb_build_object('userId', NEW.id, 'email', NEW.email, 'role', NEW.role,
                                        'stores', to_jsonb(NEW.store_ids), 'disabled', dis,
                                        'generation', gen, 'changed', to_jsonb(changed),
                                        'revoke', CASE WHEN dis THEN 'disabled'
                                                       WHEN 'password' = ANY (changed) THEN 'password'
                                                       ELSE 'access' END,
                                        'outside', true));
    INSERT INTO auth.user_events (user_id, event_id) VALUES (NEW.id, ev);
    RETURN NULL;
END $$;

CREATE TRIGGER users_changed_outside AFTER UPDATE OR DELETE ON sales.users
    FOR EACH ROW EXECUTE FUNCTION auth.tg_users_changed_outside();
