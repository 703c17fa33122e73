#!/usr/bin/env bash
# Batch upsert benchmark (issue 3): sales.batch_upsert against hand-written
# SQL, per-row upserts, batches of 50 and COPY (commits/s with events on and
# off: bench_events.sh). Builds the release extension (when its sources changed) and the
# release benchmark binary, then runs it in a database of its own.
#   scripts/bench_upsert.sh [--records N] [--batch N] [--preload N] [--per-row N]
#                           [--batch50 N] [--stores-per-method N]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh extension
cargo build --release -q -p sales-e2e --bin bench_upsert
exec "${CARGO_TARGET_DIR:-target}/release/bench_upsert" "$@"
