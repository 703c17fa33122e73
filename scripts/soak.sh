#!/usr/bin/env bash
# Soak test: a release server against its own seeded database under a mixed
# load (reads, batches, exports, 1,000 WebSockets), then a report. Fails on
# any error, any lost event, or server memory growing more than 10% between
# the first and last third of the run (after warm-up).
#
# Usage: scripts/soak.sh [SECONDS] [soak flags...]
#   SECONDS defaults to $SOAK_SECONDS, else 300. Other flags go to the soak
#   binary (see `target/release/soak --help`), e.g.
#   scripts/soak.sh 60 --websockets 200
# Needs Postgres and Redis up (`make services`); uses DATABASE_URL and
# REDIS_URL like the tests do (the Makefile exports both).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

duration=${SOAK_SECONDS:-300}
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then
    duration=$1
    shift
fi
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

cargo build --release -p sales-server
cargo build --release -p sales-e2e --bin soak
exec "$TARGET/release/soak" --seconds "$duration" --server "$TARGET/release/sales-server" "$@"
