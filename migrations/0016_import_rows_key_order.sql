-- An import merges its staged rows in month and store order rather than in
-- file order: each chunk takes whole store-months, so a month is written
-- once however its days are spread over the file (a file sorted by date
-- rewrote each store-month once per chunk that touched it). The index below
-- replaces the (job_id, line, day) primary key as the table's only index: it is
-- what the chunks walk. Its entries for one store-month are equal, so
-- Postgres keeps them as one key with a list of rows (deduplication), which
-- keeps the COPY's inserts cheap. The store is its id (a code is staged
-- with the id its store had at upload) or, for a code no store had, a hash
-- of the code: all rows of a store-month share it, which is all the chunks
-- need (a hash equal to an id only puts both in the same chunk), and
-- integers compare cheaply. Month first: a file in date order inserts
-- near the same place.
CREATE INDEX import_rows_key_idx ON jobs.import_rows
    (job_id, year, month, (coalesce(store_id, hashtext(store_code), 0)));
ALTER TABLE jobs.import_rows DROP CONSTRAINT import_rows_pkey;

COMMENT ON COLUMN jobs.jobs.last_line IS
    'the highest input line merged so far (chunks merge in month and store order)';
