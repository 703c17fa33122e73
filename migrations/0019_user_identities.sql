-- Outside identity providers' identities linked to users here.
--
-- A token signed by an outside provider (JWKS or JWT_PUBLIC_KEY_FILE) names
-- its holder by issuer (`iss`) and subject (`sub`). It stands for a user
-- here only through a row of this table, which only an admin writes
-- (`PUT /api/v2/users/{id}/identity`, `sales-server user link`); anything
-- else in the token, an email above all, names nobody: a manager can create
-- a user with any address, and must not thereby receive another person's
-- identity. One identity per user, one user per identity.
CREATE TABLE auth.identities (
    user_id bigint PRIMARY KEY REFERENCES sales.users (id) ON DELETE CASCADE,
    issuer text NOT NULL CHECK (issuer <> ''),
    subject text NOT NULL CHECK (subject <> ''),
    linked_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (issuer, subject)
);

-- A link changed by plain SQL (psql, a script) is announced as the server
-- announces its own: the user's generation moves and `user-updated` carries
-- the user's identity as it now is (an object, or null), so every running
-- instance follows at once, as migration 0014 does for users. The server's
-- own changes are marked (`sales_server.users_managed`) and left alone. A
-- row removed with its user (ON DELETE CASCADE) needs nothing: the user's
-- deletion is announced already.
CREATE FUNCTION auth.tg_identities_changed_outside() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    uid bigint;
    u sales.users;
    gen bigint;
    dis boolean;
    ident jsonb;
    ev bigint;
BEGIN
    IF coalesce(current_setting('sales_server.users_managed', true), '') = 'on' THEN
        RETURN NULL;
    END IF;
    FOREACH uid IN ARRAY ARRAY(
        SELECT DISTINCT x FROM unnest(ARRAY[
            CASE WHEN TG_OP <> 'INSERT' THEN OLD.user_id END,
            CASE WHEN TG_OP <> 'DELETE' THEN NEW.user_id END]) x
        WHERE x IS NOT NULL ORDER BY x)
    LOOP
        SELECT * INTO u FROM sales.users WHERE id = uid;
        CONTINUE WHEN NOT FOUND;
        INSERT INTO auth.user_state AS s (user_id, generation) VALUES (uid, 1)
        ON CONFLICT (user_id) DO UPDATE SET generation = s.generation + 1, updated_at = now()
        RETURNING s.generation, s.disabled INTO gen, dis;
        SELECT jsonb_build_object('issuer', i.issuer, 'subject', i.subject) INTO ident
        FROM auth.identities i WHERE i.user_id = uid;
        ev := sales.emit('user-updated',
                         jsonb_build_object('userId', uid, 'email', u.email, 'role', u.role,
                                            'stores', to_jsonb(u.store_ids), 'disabled', dis,
                                            'generation', gen, 'identity', ident,
                                            'changed', '["identity"]'::jsonb,
                                            'revoke', CASE WHEN dis THEN 'disabled' ELSE 'access' END,
                                            'outside', true));
        INSERT INTO auth.user_events (user_id, event_id) VALUES (uid, ev);
    END LOOP;
    RETURN NULL;
END $$;

CREATE TRIGGER identities_changed_outside AFTER INSERT OR UPDATE OR DELETE ON auth.identities
    FOR EACH ROW EXECUTE FUNCTION auth.tg_identities_changed_outside();
