-- Email addresses in Unicode normalization form C. The server stores and
-- looks up addresses composed (a precomposed `ü`, not `u` and a combining
-- diaeresis), so two spellings that look the same are one account. An
-- address stored decomposed before that is composed here, unless its
-- composed form already names another user (then both stay as they are,
-- and an admin tells them apart by changing one). The change goes through
-- the users trigger of 0014 like any change made by SQL: the user's
-- access tokens are refreshed and `user-updated` is written.
DO $$
BEGIN
    -- normalize() needs a UTF8 database; in another encoding no address
    -- holds a character that composes differently.
    IF pg_catalog.getdatabaseencoding() <> 'UTF8' THEN
        RETURN;
    END IF;
    UPDATE sales.users u SET email = pg_catalog.normalize(u.email, 'NFC')
    FROM (SELECT DISTINCT ON (pg_catalog.lower(pg_catalog.normalize(email, 'NFC'))) id
          FROM sales.users
          WHERE email IS NOT NFC NORMALIZED
          ORDER BY pg_catalog.lower(pg_catalog.normalize(email, 'NFC')), id) first
    WHERE u.id = first.id
      AND NOT EXISTS (SELECT FROM sales.users o
                      WHERE o.id <> u.id AND o.email IS NFC NORMALIZED
                        AND pg_catalog.lower(o.email) = pg_catalog.lower(pg_catalog.normalize(u.email, 'NFC')));
END $$;
