-- pg_sales 0.12.0 -> 0.13.0.
--
-- sales.list_stores reads its region as the API and sales.list_sales do:
-- trimmed, and refused (22023 naming `region`) when blank, of invisible
-- characters only, longer than 100 characters or holding a control
-- character, line separator or direction override. Before, ' North ' named
-- no store and '' none either, silently.
--
-- A store inserted with a version above 2^61 is refused (23514), as a sales
-- record is: at the CHECK's ceiling its next change would break the CHECK.

CREATE FUNCTION sales.region_filter(
	"region" TEXT /* &str */
) RETURNS TEXT /* alloc::string::String */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'region_filter_wrapper';

CREATE OR REPLACE FUNCTION sales.list_stores(region text DEFAULT NULL, status text DEFAULT NULL,
    fields text[] DEFAULT NULL, max_rows integer DEFAULT NULL, skip_rows bigint DEFAULT 0)
RETURNS SETOF jsonb LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    list_stores.region := sales.region_filter(list_stores.region);
    IF status IS NOT NULL AND status NOT IN ('open', 'closed', 'renovating') THEN
        RAISE EXCEPTION 'status must be open, closed or renovating, not %', status USING ERRCODE = '22023';
    END IF;
    IF max_rows IS NOT NULL AND max_rows < 1 THEN
        RAISE EXCEPTION 'max_rows: % is not a page size; use 1 or more, or NULL for all', max_rows
            USING ERRCODE = '22023';
    END IF;
    IF skip_rows IS NULL OR skip_rows < 0 THEN
        RAISE EXCEPTION 'skip_rows: must be 0 or more' USING ERRCODE = '22023';
    END IF;
    PERFORM sales.project_store('{}'::jsonb, fields, NULL);
    RETURN QUERY
        SELECT sales.project_store(sales.store_doc(s), fields, NULL)
        FROM sales.stores s
        WHERE (list_stores.region IS NULL OR s.region = list_stores.region)
          AND (list_stores.status IS NULL OR s.status = list_stores.status)
        ORDER BY s.id
        LIMIT max_rows OFFSET skip_rows;
END $$;

CREATE OR REPLACE FUNCTION sales.tg_stores_version() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- A version chosen on insert leaves room for the store's updates, as a
    -- sales row's does (sales.tg_sales_row): at the CHECK's ceiling
    -- (2^62 - 1) its next change would break the CHECK.
    IF TG_OP = 'INSERT' THEN
        IF NEW.version > 2305843009213693952 THEN
            RAISE EXCEPTION 'the version of a new store is at most 2305843009213693952 (2^61), not %: the store''s later versions must stay below 2^62', NEW.version
                USING ERRCODE = '23514';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.id <> OLD.id THEN
        RAISE EXCEPTION 'the id of a store cannot change' USING ERRCODE = '22023';
    END IF;
    IF (NEW.code, NEW.name, NEW.region, NEW.status) IS DISTINCT FROM (OLD.code, OLD.name, OLD.region, OLD.status) THEN
        NEW.version := OLD.version + 1;
        NEW.updated_at := now();
    ELSE
        NEW.version := OLD.version;
        NEW.updated_at := OLD.updated_at;
    END IF;
    NEW.created_at := OLD.created_at;
    RETURN NEW;
END $$;

-- The trigger runs before inserts too, kept disabled or enabled as it was
-- (ALWAYS, REPLICA); one that was dropped stays dropped.
DO $$
DECLARE state "char";
BEGIN
    SELECT tgenabled INTO state FROM pg_trigger
    WHERE tgrelid = 'sales.stores'::regclass AND tgname = 'stores_bump_version';
    IF state IS NULL THEN
        RETURN;
    END IF;
    DROP TRIGGER stores_bump_version ON sales.stores;
    CREATE TRIGGER stores_bump_version BEFORE INSERT OR UPDATE ON sales.stores
        FOR EACH ROW EXECUTE FUNCTION sales.tg_stores_version();
    IF state = 'D' THEN
        ALTER TABLE sales.stores DISABLE TRIGGER stores_bump_version;
    ELSIF state = 'A' THEN
        ALTER TABLE sales.stores ENABLE ALWAYS TRIGGER stores_bump_version;
    ELSIF state = 'R' THEN
        ALTER TABLE sales.stores ENABLE REPLICA TRIGGER stores_bump_version;
    END IF;
END $$;
