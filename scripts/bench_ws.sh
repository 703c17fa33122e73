#!/usr/bin/env bash
# WebSocket fan-out benchmark (issues 5 and 12). For each size (1,000 /
# 5,000 / 15,000 / 18,000 clients, subscribed round-robin over stores 1-10)
# it starts a fresh release server on loopback, connects the clients from
# several `bench_ws clients` processes (at most PER_PROC each: the open-file
# limit is 20,000 per process), and prints server RSS per idle connection,
# the probe's fan-out latency (one one-record batch every 300 ms through
# POST /api/v2/sales/batch, from sending the write to each client's
# receipt, p50/p99) and messages/s at saturation; then a summary table.
# Everything it starts is stopped when it exits; each run is time-bounded.
#
#   scripts/bench_ws.sh                      # all sizes over 10 stores
#   SIZES="1000 5000" scripts/bench_ws.sh
#   SPREADS="10 200" PROBE_MS=0 RATE=4 scripts/bench_ws.sh   # the older fixed-rate phase
#
# By default it runs against a private Postgres cluster (initdb in a
# temporary directory, loopback only, removed at exit), so that other work on
# the shared cluster (its checkpoints, locks and load) does not show up as
# WebSocket latency. PRIVATE_PG=0 uses the shared cluster at PG_BASE instead.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BENCH_DB=${BENCH_DB:-pg_sales_bench_ws}
PRIVATE_PG=${PRIVATE_PG:-1}
PG_BASE=${PG_BASE:-postgres://sales_app:pg_sales_dev@127.0.0.1:5432}
PORT=${BENCH_WS_PORT:-3101}
SIZES=${SIZES:-"1000 5000 15000 18000"}
SPREADS=${SPREADS:-10}
PROBE_MS=${PROBE_MS:-300}
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
SERVER=${SERVER:-$ROOT/target/release/sales-server}
BENCH=$ROOT/target/release/bench_ws

# The per-process open-file limit on these machines is 20,000 (hard).
ulimit -n "$(ulimit -Hn)"

PG_DIR=""
PG_BIN=/usr/lib/postgresql/15/bin
stop_pg() {
    if [ -n "$PG_DIR" ]; then
        sudo -u postgres "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast stop >/dev/null 2>&1 || true
        rm -rf "$PG_DIR"
    fi
}
start_private_pg() {
    PG_DIR=$(mktemp -d /tmp/bench_ws_pg.XXXXXX)
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    head -c 24 /dev/urandom | base64 >"$PG_DIR/pwfile"
    chown -R postgres:postgres "$PG_DIR"
    chmod 700 "$PG_DIR"
    sudo -u postgres "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth-local=peer --auth-host=scram-sha-256 \
        --pwfile="$PG_DIR/pwfile" >/dev/null
    sudo -u postgres "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w \
        -o "-p $port -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=200 -c shared_buffers=256MB -c shared_preload_libraries=pg_sales" start >/dev/null
    sudo -u postgres psql -h "$PG_DIR" -p "$port" -qc "CREATE ROLE sales_app LOGIN SUPERUSER PASSWORD 'pg_sales_dev'"
    PG_BASE="postgres://sales_app:pg_sales_dev@127.0.0.1:${port}"
    echo "private Postgres cluster on 127.0.0.1:${port} ($PG_DIR)"
}

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
trap 'stop_server; stop_pg' EXIT
trap 'exit 130' INT TERM

if [ ! -x "$SERVER" ] || [ ! -x "$BENCH" ]; then
    echo "building release binaries..."
    cargo build --release -p sales-server --bin sales-server
    cargo build --release -p sales-e2e --bin bench_ws
fi

if [ "$PRIVATE_PG" = 1 ]; then
    start_private_pg
fi
export DATABASE_URL="${PG_BASE}/${BENCH_DB}"

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

echo "pg_sales WebSocket benchmark: $(nproc) cores, $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg), writes through POST /api/v2/sales/batch"
OUT=$(mktemp /tmp/bench_ws_out.XXXXXX)
RATE_ARG=()
failed=0
if [ "$PROBE_MS" = 0 ]; then RATE_ARG=(--rate "$RATE"); fi
for spread in $SPREADS; do
    for size in $SIZES; do
        start_server
        timeout 900 "$BENCH" run --url "http://127.0.0.1:${PORT}" --server-pid "$SERVER_PID" \
            --clients "$size" --stores "$spread" --per-proc "$PER_PROC" "${RATE_ARG[@]}" \
            --probe-ms "$PROBE_MS" --seconds "$SECONDS_FIXED" --saturate-seconds "$SECONDS_SAT" \
            --writers "$WRITERS" | tee -a "$OUT" \
            || { echo "  (run for $size clients over $spread stores failed: exit $?)"; failed=1; }
        stop_server
    done
done
echo
echo "summary (clients over stores: probe p50 / p99 from send, messages/s at saturation, kB per idle connection):"
# One block per run, each starting with "== N clients over S stores".
csplit -s -z -f "$OUT.run." "$OUT" '/^== /' '{*}' 2>/dev/null || true
for f in "$OUT".run.*; do
    [ -e "$f" ] || continue
    head=$(head -1 "$f" | sed -E 's/^== ([0-9]+) clients over ([0-9]+) stores.*/\1 over \2/')
    kb=$(sed -nE 's/.*\(([0-9.]+) kB\) per idle.*/\1/p' "$f" | head -1)
    p50=$(sed -nE 's/^  probe.* p50 ([0-9.]+) ms.*/\1/p' "$f" | head -1)
    p99=$(sed -nE 's/^  probe.* p99 ([0-9.]+) ms.*/\1/p' "$f" | head -1)
    sat=$(sed -nE 's/^  saturation.* ([0-9]+) messages\/s.*/\1/p' "$f" | head -1)
    printf '  %-14s p50 %6s ms, p99 %6s ms, %8s messages/s at saturation, %5s kB per idle connection\n' \
        "$head:" "${p50:--}" "${p99:--}" "${sat:--}" "${kb:--}"
done
rm -f "$OUT".run.*
rm -f "$OUT"
if [ "$failed" != 0 ]; then
    echo "bench_ws: at least one run failed (above)" >&2
    exit 1
fi
