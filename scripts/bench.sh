#!/usr/bin/env bash
# `make bench`: every benchmark, each printing ratios against floors measured
# in the same run. BENCH_ONLY="api cache" runs a subset
# (upsert, events, api, cache, export, ws, import, summary).
set -uo pipefail
cd "$(dirname "$0")/.."
ONLY=${BENCH_ONLY:-upsert events api cache export ws import summary}
status=0
for b in $ONLY; do
    echo
    echo "################ bench: $b ################"
    case $b in
        upsert) ./scripts/bench_upsert.sh || status=1 ;;
        events) ./scripts/bench_events.sh || status=1 ;;
        api) ./scripts/bench_api.sh || status=1 ;;
        cache) ./scripts/bench_cache.sh || status=1 ;;
        export) ./scripts/bench_export.sh || status=1 ;;
        ws) ./scripts/bench_ws.sh || status=1 ;;
        import) ./scripts/bench_import.sh || status=1 ;;
        summary) ./scripts/bench_summary.sh || status=1 ;;
        *) echo "unknown benchmark $b" >&2; status=2 ;;
    esac
done
exit $status
