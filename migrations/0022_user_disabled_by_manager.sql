-- Whether a manager may enable the user again: true when a manager
-- disabled them, false when an admin (the API or the command line) did. A
-- manager may disable their staff; undoing an admin's disable was theirs
-- too, so a manager could bring back a user an admin had shut out. Users
-- disabled before this column count as disabled by an admin.
ALTER TABLE auth.user_state
    ADD COLUMN IF NOT EXISTS manager_may_enable boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN auth.user_state.manager_may_enable IS
    'a manager disabled the user, so a manager may enable them again';
