#!/usr/bin/env bash
# Summary latency over 10,000 stores x 36 months, computed and cached (see
# tests/src/bin/bench_summary.rs). Builds the release extension (when its
# sources changed) and the release benchmark binary; runs in a database of
# its own (dropped afterwards).
#   scripts/bench_summary.sh [--stores N] [--months N] [--runs N]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh extension
cargo build --release -q -p sales-e2e --bin bench_summary
exec "${CARGO_TARGET_DIR:-target}/release/bench_summary" "$@"
