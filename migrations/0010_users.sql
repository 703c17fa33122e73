-- Sessions and per-user access state, owned by the server.
--
-- Its own schema, not `sales` (the extension's): rows here are keyed by the
-- user id of `sales.users` and go with the user (ON DELETE CASCADE), except
-- the short-lived tombstones of deleted users below.

CREATE SCHEMA IF NOT EXISTS auth;

-- Per-user state beyond sales.users. A missing row means generation 0, not
-- disabled. `generation` moves with every change of the user (role, stores,
-- email, disabled, password): an access token carries the generation it was
-- issued at and stops being accepted once the user's has moved past it.
CREATE TABLE auth.user_state (
    user_id bigint PRIMARY KEY REFERENCES sales.users (id) ON DELETE CASCADE,
    generation bigint NOT NULL DEFAULT 0,
    disabled boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Deleted users, kept only as long as an access token issued before the
-- deletion could still be presented (JWT_EXPIRY), so that an instance
-- started after the deletion refuses those tokens too. Pruned by the server.
CREATE TABLE auth.deleted_users (
    user_id bigint PRIMARY KEY,
    deleted_at timestamptz NOT NULL DEFAULT now()
);

-- One session (refresh-token family) per login. Revoked by a logout, by the
-- reuse of an already rotated refresh token, or by a password change.
CREATE TABLE auth.sessions (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id bigint NOT NULL REFERENCES sales.users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz NOT NULL DEFAULT now(),
    -- Past this without a refresh, the session is over.
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz,
    revoked_reason text CHECK (revoked_reason IN ('logout', 'reuse', 'password', 'admin'))
);
CREATE INDEX sessions_user_idx ON auth.sessions (user_id);
CREATE INDEX sessions_revoked_idx ON auth.sessions (revoked_at) WHERE revoked_at IS NOT NULL;

-- Refresh tokens, stored as the SHA-256 of the token (never the token).
-- A refresh marks the token used and adds its successor to the same
-- session; presenting a used token again revokes the whole session.
CREATE TABLE auth.refresh_tokens (
    token_hash bytea PRIMARY KEY,
    session_id uuid NOT NULL REFERENCES auth.sessions (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    used_at timestamptz
);
CREATE INDEX refresh_tokens_session_idx ON auth.refresh_tokens (session_id);

-- Each user's history: the events about them (`user-*`, `session-revoked`),
-- written in the transaction that writes the event. The events themselves
-- stay in sales.events (and go with its retention).
CREATE TABLE auth.user_events (
    user_id bigint NOT NULL REFERENCES sales.users (id) ON DELETE CASCADE,
    event_id bigint NOT NULL,
    PRIMARY KEY (user_id, event_id)
);
