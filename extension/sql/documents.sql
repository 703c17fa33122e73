-- pg_sales schema, 2 of 4: documents, after tables.sql.
--
-- These functions are inlined into the queries that call them (the API's
-- lists build a document per row), which a SET clause would prevent, so
-- unlike the extension's other SQL and PL/pgSQL functions they do not run
-- with `search_path = pg_catalog, pg_temp`: they name every function and
-- operator with its schema instead. An inlined body is resolved in the
-- caller's search path, where a function of another schema taking the
-- exact argument types would be chosen over `jsonb_build_object(VARIADIC
-- "any")` even with pg_catalog searched first, and run with the caller's
-- rights.

---------------------------------------------------------------------------
-- Documents (camelCase JSON) as the API shows them.
---------------------------------------------------------------------------

CREATE FUNCTION sales.store_doc(s sales.stores) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT pg_catalog.jsonb_build_object(
        'id', s.id, 'code', s.code, 'name', s.name, 'region', s.region,
        'status', s.status, 'version', s.version,
        'createdAt', s.created_at, 'updatedAt', s.updated_at)
$$;

CREATE FUNCTION sales.sales_doc(m sales.monthly_sales) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT pg_catalog.jsonb_build_object(
        'id', m.id, 'storeId', m.store_id, 'year', m.year, 'month', m.month,
        'dailyData', m.daily_data, 'totalSales', m.total_sales,
        'totalCustomers', m.total_customers, 'daysReported', m.days_reported,
        'version', m.version, 'createdAt', m.created_at, 'updatedAt', m.updated_at)
$$;

CREATE FUNCTION sales.sales_doc(m sales.monthly_sales, s sales.stores) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT sales.sales_doc(m) OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('store', sales.store_doc(s))
$$;
