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
