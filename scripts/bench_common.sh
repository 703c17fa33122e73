# Shared by the benchmark scripts: a seeded bench database and release
# servers started on loopback ports, all stopped when the script exits.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DB=${BENCH_DB:-pg_sales_bench}
export DATABASE_URL="postgres://sales_app:pg_sales_dev@127.0.0.1:5432/${BENCH_DB}"
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
export JWT_SECRET=${JWT_SECRET:-bench-secret-bench-secret-bench-secret-00}
export LOG_LEVEL=warn
export RATE_LIMIT_PER_MINUTE=10000000
SERVER=$ROOT/target/release/sales-server
BENCH_PIDS=()

bench_cleanup() {
    for p in "${BENCH_PIDS[@]:-}"; do
        [ -n "$p" ] && kill "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap bench_cleanup EXIT

# Creates and seeds the bench database once (200 stores x 24 months).
bench_db() {
    if ! sudo -u postgres psql -qAtc "select 1 from pg_database where datname = '${BENCH_DB}'" | grep -q 1; then
        sudo -u postgres createdb -O sales_app "${BENCH_DB}"
    fi
    "$SERVER" migrate >/dev/null
    "$SERVER" seed --if-empty --stores 200 --months 24 --end 2026-10 >/dev/null
    echo "bench-admin-password" | "$SERVER" user add --email bench@pg-sales.local --role admin >/dev/null
}

# start_server PORT [VAR=value ...]: a release server in the background.
start_server() {
    local port=$1
    shift
    env PORT="$port" CACHE_PREFIX="${CACHE_PREFIX:-bench_$$}" "$@" "$SERVER" serve >/dev/null 2>"/tmp/pg_sales_bench_${port}.log" &
    BENCH_PIDS+=($!)
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:${port}/health/live" >/dev/null && return 0
        sleep 0.1
    done
    echo "server on ${port} did not start; see /tmp/pg_sales_bench_${port}.log" >&2
    return 1
}

bench_token() {
    curl -sf -XPOST "http://127.0.0.1:$1/api/v2/auth/login" -H 'content-type: application/json' \
        -d '{"email":"bench@pg-sales.local","password":"bench-admin-password"}' |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'
}
