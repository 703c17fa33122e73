#!/usr/bin/env bash
# Cache benchmark with two instances sharing Redis (see tests/src/bin/bench_cache.rs).
. "$(dirname "$0")/bench_common.sh"
bench_db
start_server 3192
start_server 3193
TOKEN=$(bench_token 3192)
"$ROOT/target/release/bench_cache" http://127.0.0.1:3192 http://127.0.0.1:3193 "$TOKEN" "${BENCH_SECONDS:-20}" "${BENCH_WORKERS:-16}"
