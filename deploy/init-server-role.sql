-- The servers run as sales_server, a role that is not a superuser: the
-- image's superuser creates the extension and hands the sales schema over
-- (README, Operations: "A server role that is not a superuser"). Run once,
-- by the image's entrypoint, as POSTGRES_USER on a new cluster.
CREATE ROLE sales_server LOGIN PASSWORD 'sales_server_dev';
ALTER DATABASE pg_sales OWNER TO sales_server;
\connect pg_sales
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
CREATE EXTENSION IF NOT EXISTS pg_sales;
SELECT sales.hand_over('sales_server');
