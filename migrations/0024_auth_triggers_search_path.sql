-- The users triggers of 0014, 0015 and 0019 run as whoever writes
-- `sales.users` or `auth.user_identities` by hand, with that writer's
-- search_path. Their bodies call built-ins unqualified (current_setting,
-- cardinality, jsonb_build_object, now, the operators), so a function or
-- operator of the same name in a schema of the writer's path would run
-- as the writer. Pinned as the extension's own functions are.
ALTER FUNCTION auth.tg_users_changed_outside() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION auth.tg_users_truncated_outside() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION auth.tg_identities_changed_outside() SET search_path = pg_catalog, pg_temp;
