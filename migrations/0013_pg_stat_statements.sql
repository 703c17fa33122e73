-- pg_stat_statements in the application's database, for
-- GET /api/admin/queries (which only reads it). Created here, by the role
-- that migrates, rather than on the first request to that endpoint: a GET
-- never changes the database. Creating it needs a superuser and the
-- contrib package; without either, the migration goes on and the endpoint
-- answers `enabled: false` with how to enable it. The module must also be
-- in shared_preload_libraries for the view to return rows (make run sets
-- that in the cluster it manages).
DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
EXCEPTION WHEN insufficient_privilege OR undefined_file OR feature_not_supported THEN
    RAISE NOTICE 'pg_stat_statements not created (%): GET /api/admin/queries reports it disabled', SQLERRM;
END $$;
