#!/usr/bin/env bash
# WebSocket fan-out benchmark (issue 5). For each spread of stores (10 and
# 200) and each size (1,000 / 5,000 / 15,000 / 18,000 clients) it starts a
# fresh release server on loopback, connects the clients from several
# `bench_ws clients` processes, and prints connections held, server RSS per
# idle connection, messages/s delivered and write-to-receipt latency.
# Everything it starts is stopped when it exits; each run is time-bounded.
#
#   scripts/bench_ws.sh                      # all sizes, both spreads
#   SIZES="1000 5000" SPREADS=10 scripts/bench_ws.sh
#   RATE=4 SECONDS_FIXED=10 SECONDS_SAT=10 WRITERS=4 scripts/bench_ws.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BENCH_DB=${BENCH_DB:-pg_sales_bench_ws}
PG_BASE=${PG_BASE:-postgres://sales_app:pg_sales_dev@127.0.0.1:5432}
PORT=${BENCH_WS_PORT:-3101}
SIZES=${SIZES:-"1000 5000 15000 18000"}
SPREADS=${SPREADS:-"10 200"}
PER_PROC=${PER_PROC:-4000}
RATE=${RATE:-4}
SECONDS_FIXED=${SECONDS_FIXED:-10}
SECONDS_SAT=${SECONDS_SAT:-10}
WRITERS=${WRITERS:-4}

export DATABASE_URL="${PG_BASE}/${BENCH_DB}"
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
export JWT_SECRET=${JWT_SECRET:-bench-ws-secret-bench-ws-secret-bench-ws}
export LOG_LEVEL=${LOG_LEVEL:-warn}
export RATE_LIMIT_PER_MINUTE=10000000
export CACHE_PREFIX=bench_ws_$$
export BIND_ADDR=127.0.0.1
SERVER=$ROOT/target/release/sales-server
BENCH=$ROOT/target/release/bench_ws

# The per-process open-file limit on these machines is 20,000 (hard).
ulimit -n "$(ulimit -Hn)"

SERVER_PID=""
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap stop_server EXIT INT TERM

if [ ! -x "$SERVER" ] || [ ! -x "$BENCH" ]; then
    echo "building release binaries..."
    cargo build --release -p sales-server --bin sales-server
    cargo build --release -p sales-e2e --bin bench_ws
fi

# The bench database: 200 stores, created and seeded once.
if ! psql "${PG_BASE}/postgres" -qAtc "SELECT 1 FROM pg_database WHERE datname = '${BENCH_DB}'" | grep -q 1; then
    psql "${PG_BASE}/postgres" -qc "CREATE DATABASE ${BENCH_DB}"
fi
"$SERVER" migrate >/dev/null
"$SERVER" seed --if-empty --stores 200 --months 3 >/dev/null

start_server() {
    PORT=$PORT "$SERVER" serve >/dev/null 2>"/tmp/bench_ws_server.log" &
    SERVER_PID=$!
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:${PORT}/health/live" >/dev/null && return 0
        sleep 0.1
    done
    echo "server did not start; see /tmp/bench_ws_server.log" >&2
    exit 1
}

echo "pg_sales WebSocket benchmark: $(nproc) cores, $(uname -r), writes through POST /api/v2/sales/batch"
for spread in $SPREADS; do
    for size in $SIZES; do
        start_server
        timeout 900 "$BENCH" run --url "http://127.0.0.1:${PORT}" --server-pid "$SERVER_PID" \
            --clients "$size" --stores "$spread" --per-proc "$PER_PROC" --rate "$RATE" \
            --seconds "$SECONDS_FIXED" --saturate-seconds "$SECONDS_SAT" --writers "$WRITERS" \
            || echo "  (run for $size clients over $spread stores failed: exit $?)"
        stop_server
    done
done
