-- The event log's payload compressed with lz4 instead of pglz.
--
-- An update event carries the old value of every changed day
-- (`previousDays`), so a batch or import that replaces whole months writes
-- payloads of about 2 KB, just over the size at which Postgres compresses a
-- row. With pglz, the default, compressing them took a sixth of the CPU of a
-- 1,000-record batch_upsert; lz4 compresses several times faster and
-- decompresses faster for the relay and for history. Existing rows keep
-- their pglz payloads (both decompress transparently). A server built
-- without lz4 keeps pglz, as for daily_data.
DO $$
BEGIN
    ALTER TABLE sales.events ALTER COLUMN payload SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    NULL;
END $$;
