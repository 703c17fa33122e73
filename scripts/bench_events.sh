#!/usr/bin/env bash
# The event path: commits/s with events off / on / one NOTIFY each at 8 and
# 32 writers (this machine's flush and 1 ms slower), and the delivery delay an
# idle transaction adds. Builds the release extension (when its sources
# changed) and the release benchmark binary; runs in a database of its own.
#   scripts/bench_events.sh [--seconds N] [--stall-seconds N]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh extension
cargo build --release -q -p sales-e2e --bin bench_events
exec "${CARGO_TARGET_DIR:-target}/release/bench_events" "$@"
