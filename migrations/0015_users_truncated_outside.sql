-- `TRUNCATE sales.users` fires no row trigger, so migration 0014's trigger
-- never sees it. This statement trigger runs before the table is emptied
-- and does for every user what 0014 does for a deleted one: a tombstone
-- and `user-deleted`, so their tokens are refused from then on.
CREATE FUNCTION auth.tg_users_truncated_outside() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('sales_server.users_managed', true), '') = 'on' THEN
        RETURN NULL;
    END IF;
    INSERT INTO auth.deleted_users (user_id)
    SELECT id FROM sales.users
    ON CONFLICT (user_id) DO UPDATE SET deleted_at = now();
    PERFORM sales.emit('user-deleted',
                       jsonb_build_object('userId', u.id, 'email', u.email, 'role', u.role,
                                          'outside', true))
    FROM sales.users u ORDER BY u.id;
    RETURN NULL;
END $$;

CREATE TRIGGER users_truncated_outside BEFORE TRUNCATE ON sales.users
    FOR EACH STATEMENT EXECUTE FUNCTION auth.tg_users_truncated_outside();
