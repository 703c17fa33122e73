-- The cache tags an asynchronous batch's transaction touched, written in
-- that transaction: the commit makes the job's end visible on every
-- instance before the instance that ran it has invalidated those tags, so
-- an instance that shows the job ended applies them itself first (once),
-- and a client that saw the job end reads the new values wherever it asks.
ALTER TABLE jobs.jobs ADD COLUMN IF NOT EXISTS cache_tags text[];
