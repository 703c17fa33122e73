#!/usr/bin/env bash
# Export benchmark (issues 7, 14): GET /api/v2/sales/export throughput at sizes from one row to every row, in
# rows/s and MB/s for CSV, NDJSON, JSON (and CSV+zstd) against
# `psql -c "\copy (same query) TO STDOUT ..."` in the same run, and the
# server's peak RSS growth while exporting. Builds the release server and the
# release benchmark binary, then runs them on loopback in a database of its
# own, which is dropped afterwards. Bounded: the run is killed after
# BENCH_TIMEOUT seconds (default 1800).
#   scripts/bench_export.sh [--stores N] [--months N] [--runs N] [--small-runs N]
#   (the default 14,000 stores x 24 months is about 10M store-days; the ladder
#   exports 1, ~1k, ~100k, ~1.3M and every row)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh extension
cargo build --release -q -p sales-server
cargo build --release -q -p sales-e2e --bin bench_export
target="${CARGO_TARGET_DIR:-target}"
exec timeout --signal=INT --kill-after=30 "${BENCH_TIMEOUT:-1800}" \
    "$target/release/bench_export" --server "$target/release/sales-server" "$@"
