#!/usr/bin/env bash
# SQL regression tests of the extension's public functions (pg_regress):
# extension/tests/pg_regress/sql/*.sql run in name order in one new database
# with `CREATE EXTENSION pg_sales`, and their output is compared with
# expected/*.out. Runs against a server where pg_sales is installed; where
# comes from the usual libpq variables (PGHOST, PGPORT, PGUSER, PGPASSWORD),
# the Postgres programs from PG_BINDIR. `make test` runs it against the
# cluster it set up. Differences are in target/pg_regress/regression.diffs.
#
#   PG_BINDIR=/opt/pgc/usr/lib/postgresql/15/bin PGHOST=127.0.0.1 PGPORT=5499 scripts/sql_tests.sh
#   scripts/sql_tests.sh --accept     # after a deliberate change: take the output as expected
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PG_BINDIR=${PG_BINDIR:-/usr/lib/postgresql/15/bin}
PG_REGRESS=${PG_REGRESS:-$(dirname "$PG_BINDIR")/lib/pgxs/src/test/regress/pg_regress}
SUITE=$ROOT/extension/tests/pg_regress
OUT=$ROOT/target/pg_regress
DB=pgs_regress_$$
mkdir -p "$OUT"
tests=$(cd "$SUITE/sql" && ls ./*.sql | sed 's|^\./||; s|\.sql$||' | sort)

cleanup() { "$PG_BINDIR/dropdb" --if-exists --force "$DB" >/dev/null 2>&1 || true; }
trap cleanup EXIT

status=0
# shellcheck disable=SC2086 # one argument per test name
"$PG_REGRESS" --inputdir="$SUITE" --outputdir="$OUT" --bindir="$PG_BINDIR" \
    --dbname="$DB" --load-extension=pg_sales $tests || status=$?
if [ "${1:-}" = "--accept" ]; then
    for t in $tests; do
        cp "$OUT/results/$t.out" "$SUITE/expected/$t.out"
    done
    echo "expected output updated from $OUT/results; review it with git diff"
    exit 0
fi
if [ $status -ne 0 ] && [ -f "$OUT/regression.diffs" ]; then
    head -n 200 "$OUT/regression.diffs" >&2
fi
exit $status
