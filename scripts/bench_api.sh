#!/usr/bin/env bash
# REST API benchmark: wrk, 32 connections, BENCH_SECONDS (default 20) each.
# Floors measured in the same run: the server's static endpoint
# (/health/live, no checks) and pgbench running the same SQL as a miss.
. "$(dirname "$0")/bench_common.sh"
SECS=${BENCH_SECONDS:-20}
CONNS=${BENCH_CONNECTIONS:-32}
PORT=${BENCH_PORT:-3191}
bench_db
start_server "$PORT"
TOKEN=$(bench_token "$PORT")
URL="http://127.0.0.1:${PORT}"
AUTH="Authorization: Bearer ${TOKEN}"

# wrk takes one script: each request generator wrapped with the reporter.
WRAP=$(mktemp /tmp/pg_sales_wrk.XXXXXX.lua)
trap 'rm -f "$WRAP"; bench_cleanup' EXIT
failed=0
run() { # name, wrk args...
    local name=$1
    shift
    local line
    line=$(wrk -t2 -c"$CONNS" -d"${SECS}s" --timeout 10s --latency -s "$WRAP" "$@" 2>&1 | grep '^RESULT' || true)
    printf '%-22s %s\n' "$name" "${line#RESULT }"
    if [[ -z $line ]]; then
        echo "bench_api: wrk printed no result for $name" >&2
        exit 1
    fi
    eval "$(echo "${line#RESULT }" | tr ' ' '\n' | sed "s/^/${name}_/")"
    # A run answered with errors measures the errors: the benchmark fails.
    local errors="${name}_errors"
    if [[ ${!errors} != 0 ]]; then
        echo "bench_api: $name had ${!errors} errors (non-2xx answers or failed connections)" >&2
        failed=1
    fi
}
mk_script() { cat "$ROOT/scripts/wrk/$1.lua" "$ROOT/scripts/wrk/report.lua" > "$WRAP"; }

echo "== REST API, ${CONNS} connections, ${SECS}s each (pg_sales bench database: 200 stores x 24 months)"
cat "$ROOT/scripts/wrk/report.lua" > "$WRAP"
run static "$URL/health/live"
HIT_PATH="/api/v2/sales?storeId=7&year=2025&month=6&fields=storeId,year,month,totalSales"
curl -sf -H "$AUTH" "$URL$HIT_PATH" >/dev/null
run hit -H "$AUTH" "$URL$HIT_PATH"
mk_script page; run page200 -H "$AUTH" "$URL"
mk_script batch; run batch50 -H "$AUTH" "$URL"

# pgbench: the statement a miss runs (as the server renders it for
# scripts/wrk/miss.lua's requests, cache buster included), over TCP like
# the server.
cat > /tmp/pg_sales_bench_miss.sql <<'SQL'
\set s random(1, 200)
\set m random(1, 12)
\set b random(1, 1000000000)
SELECT (sales.project(sales.sales_doc(m), '{storeId,year,month,totalSales}'::text[], '{}'::text[]))::text AS doc, ARRAY[m.store_id::text, m.year::text, m.month::text, m.id::text] AS cur
FROM sales.monthly_sales m LEFT JOIN sales.stores s ON s.id = m.store_id
WHERE true AND m.store_id = :s::bigint AND m.year = 2025::int AND m.month = :m::int AND m.total_sales <= (10000000000000000 + :b)::numeric
ORDER BY m.store_id ASC, m.year ASC, m.month ASC, m.id ASC LIMIT 51;
SQL

# Misses against pgbench of the same statement, alternated MISS_PAIRS times
# (default 3): on a shared machine the floor itself moves by a third between
# runs a minute apart, so one pair alone says little. The ratio printed is
# the median of the pairs'.
pgbench_miss() {
    PGPASSWORD=pg_sales_dev /usr/lib/postgresql/15/bin/pgbench -h 127.0.0.1 -U sales_app -n -M prepared -c "$CONNS" -j 2 -T "$SECS" -f /tmp/pg_sales_bench_miss.sql "$BENCH_DB" 2>/dev/null | awk '/^tps/ {print $3}'
}
pair_ratios=()
mk_script miss
for i in $(seq 1 "${MISS_PAIRS:-3}"); do
    run miss -H "$AUTH" "$URL"
    PGB=$(pgbench_miss)
    printf '%-22s tps=%s\n' "pgbench(miss SQL)" "$PGB"
    pair_ratios+=("$(python3 -c "print(float('$miss_rps') / float('$PGB'))")")
done

ratio() { python3 -c "a=float('$1'); b=float('$2'); print(f'{a/b:.2f}' if b else 'n/a')"; }
echo
echo "hit   / static req/s : $(ratio "$hit_rps" "$static_rps")x   (target >= 0.5)"
echo "hit p99              : ${hit_p99_ms} ms = $(ratio "$hit_p99_ms" "$static_p99_ms")x the static endpoint's ${static_p99_ms} ms   (target <= 2x)"
echo "miss  / pgbench      : $(python3 -c "import statistics, sys; r = [float(x) for x in sys.argv[1:]]; print(f'{statistics.median(r):.2f}x   (median of pairs: ' + ' '.join(f'{x:.2f}' for x in r) + ')')" "${pair_ratios[@]}")   (target >= 0.6)"

echo
python3 "$ROOT/scripts/bench_api_batch.py" "$URL" "$TOKEN" "$BENCH_DB" --calls "${BATCH_CALLS:-5}"

echo
echo "== bytes per response (one store-month; a page of 50)"
for q in "storeId=7&year=2025&month=6" "storeId=7&year=2025&month=6&fields=storeId,year,month,totalSales" "limit=50" "limit=50&fields=storeId,year,month,totalSales"; do
    for enc in identity gzip br zstd; do
        n=$(curl -s -o /dev/null -w '%{size_download}' -H "$AUTH" -H "Accept-Encoding: $enc" "$URL/api/v2/sales?$q")
        printf '%-60s %-9s %8s bytes\n' "$q" "$enc" "$n"
    done
done

if [[ $failed != 0 ]]; then
    echo "bench_api: a run had errors (above)" >&2
    exit 1
fi
