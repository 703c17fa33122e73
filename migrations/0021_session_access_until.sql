-- When the last access token issued for a session expires (set at login and
-- at every refresh). A session that ended (revoked, or past its refresh
-- window) is kept until then: an instance that starts meanwhile learns of
-- the revocation from this row, and without it would accept the token.
-- Before, `maintain` judged that by its own JWT_EXPIRY, which need not be
-- the servers'.
ALTER TABLE auth.sessions ADD COLUMN IF NOT EXISTS access_until timestamptz;
COMMENT ON COLUMN auth.sessions.access_until IS
    'when the last access token issued for the session expires';
