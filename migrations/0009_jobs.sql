-- The durable job queue behind imports and asynchronous batches.
--
-- Its own schema, not `sales`: that schema is the extension's, and its
-- monitoring (sales.table_health, sales.index_report) reports every table
-- and index in it; a queue's churn is not the sales data's health, and its
-- indexes must never be proposed for dropping.
--
-- Workers of every server instance take jobs with FOR UPDATE SKIP LOCKED.
-- A running job carries a lease: a random token, the worker's backend
-- (pid + start time) and an expiry that the worker renews with every chunk.
-- A job whose lease expired, or whose worker's session is gone, is taken
-- again by any instance; the new token fences the old worker out (every
-- chunk's commit checks the token under the job's row lock).
CREATE SCHEMA IF NOT EXISTS jobs;

CREATE TABLE jobs.jobs (
    id bigserial PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('import', 'batch')),
    state text NOT NULL DEFAULT 'queued'
        CHECK (state IN ('uploading', 'queued', 'running', 'completed', 'failed', 'cancelled')),
    -- The user who queued it (NULL: the command line, acting as no user).
    user_id bigint,
    -- The stores the job may write (NULL: any), fixed when it is queued.
    scope bigint[],
    -- import: {format, dryRun, maxErrors, fileName}; batch: {mode, atomic}.
    params jsonb NOT NULL DEFAULT '{}',
    -- batch: the records; import: NULL (its rows are in jobs.import_rows).
    input jsonb,
    rows_read bigint NOT NULL DEFAULT 0,
    rows_written bigint NOT NULL DEFAULT 0,
    rows_rejected bigint NOT NULL DEFAULT 0,
    -- The last input line whose chunk committed; a restarted job continues after it.
    last_line bigint NOT NULL DEFAULT 0,
    chunks bigint NOT NULL DEFAULT 0,
    result jsonb,
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    cancel_requested boolean NOT NULL DEFAULT false,
    lease_token uuid,
    lease_until timestamptz,
    worker text,
    worker_pid integer,
    worker_backend_start timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);

CREATE INDEX jobs_open_idx ON jobs.jobs (id) WHERE state IN ('uploading', 'queued', 'running');
CREATE INDEX jobs_user_idx ON jobs.jobs (user_id, id);

-- An import's rows, one per (input line, day), as parsed before queueing.
-- Values stay text: they were checked by the parser and are cast to numeric
-- by the merge, so numbers reach the table exactly as written in the file.
-- A chunk deletes its rows in the transaction that merges them. No foreign
-- key to jobs.jobs: its check, once per row, was most of the cost of the
-- COPY; rows of a job that ends early are removed by the server in slices.
CREATE TABLE jobs.import_rows (
    job_id bigint NOT NULL,
    line bigint NOT NULL,
    day integer NOT NULL,
    store_code text,
    store_id bigint,
    year integer NOT NULL,
    month integer NOT NULL,
    sales text,
    customers text,
    transactions text,
    -- The CSV column the day came from (`d5_sales` in the monthly shape), for reports.
    col text,
    PRIMARY KEY (job_id, line, day)
);

-- Rejected rows (the first 1000 of a job are kept; rows_rejected counts all).
CREATE TABLE jobs.job_errors (
    job_id bigint NOT NULL REFERENCES jobs.jobs (id) ON DELETE CASCADE,
    n bigserial,
    line bigint NOT NULL,
    col text,
    reason text NOT NULL,
    PRIMARY KEY (job_id, n)
);
CREATE INDEX job_errors_line_idx ON jobs.job_errors (job_id, line);
