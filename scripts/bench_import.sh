#!/usr/bin/env bash
# Import benchmark (issue 15): a 1M-line daily POS CSV through
# POST /api/v2/imports until the job completes, in rows/s against
# `psql \copy` of the same file into a staging table in the same run, and the
# server's peak RSS growth; then files of 1, 1,000 and 100,000 lines, each
# against its own floor, to show the fixed cost per import. Builds the release server and the release
# benchmark binary, then runs them in a database of its own (dropped
# afterwards). Bounded by BENCH_TIMEOUT seconds (default 1800).
#   scripts/bench_import.sh [--rows N] [--stores N] [--chunk N] [--growth 1,1000,100000]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh extension
cargo build --release -q -p sales-server
cargo build --release -q -p sales-e2e --bin bench_import
target="${CARGO_TARGET_DIR:-target}"
exec timeout --signal=INT --kill-after=30 "${BENCH_TIMEOUT:-1800}" \
    "$target/release/bench_import" --server "$target/release/sales-server" "$@"
