#!/usr/bin/env bash
# Fuzzes the HTTP API from its own OpenAPI document with schemathesis
# (pinned), as an admin, against a server of its own: a fresh database with
# demo data, a free port, a random JWT secret. Zero failures or it exits
# non-zero. Bounded: FUZZ_EXAMPLES cases per operation, FUZZ_TIMEOUT seconds
# for all its schemathesis runs together; the server and the database are
# removed however it ends.
#
# Every check that the responses match the document runs. Two checks about
# which *requests* are valid are left out, and why: positive_data_acceptance
# expects 2xx for anything the schema allows, but some rules cannot be said
# in JSON Schema (field paths of `fields`, `from` not after `to`, "ids or
# keys", a batch of at least one record), and those requests rightly get a
# 400 naming the parameter; negative_data_rejection counts poem-openapi's
# scalar coercion (a JSON number accepted for a string member) as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
VENV=${FUZZ_VENV:-target/fuzz-venv}
SERVER_BIN=${SERVER_BIN:-target/debug/sales-server}
EXAMPLES=${FUZZ_EXAMPLES:-30}
SEED=${FUZZ_SEED:-20261202}
LIMIT=${FUZZ_TIMEOUT:-900}
DATABASE_URL=${DATABASE_URL:-postgres://sales_app:pg_sales_dev@127.0.0.1:5432/pg_sales}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}

if [[ ! -x "$VENV/bin/schemathesis" ]] || ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION"
fi
[[ -x "$SERVER_BIN" ]] || cargo build -q -p sales-server

base=${DATABASE_URL%/*}
db="pgs_fuzz_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
db_url="$base/$db"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
log="target/fuzz-server-$port.log"
pid=""

cleanup() {
    if [[ -n "$pid" ]]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    psql -q "$base/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

psql -q "$base/postgres" -c "CREATE DATABASE $db" >/dev/null
export DATABASE_URL="$db_url" REDIS_URL PORT="$port"
export JWT_SECRET="fuzz-$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
export CACHE_PREFIX="$db" LOG_LEVEL=warn
# One client makes every request: the budgets are not what is under test.
export RATE_LIMIT_PER_MINUTE=10000000 RATE_LIMIT_PER_IP_PER_MINUTE=10000000 LOGIN_ATTEMPTS_PER_MINUTE=10000
export LOGIN_ATTEMPTS_PER_IP=1000000
# The one access token must outlive the run.
export JWT_EXPIRY=24h
"$SERVER_BIN" migrate >/dev/null
"$SERVER_BIN" seed --stores 20 --months 6 --seed 7 >/dev/null
# The fuzzing admin gets an id far from the small ones the fuzzer's users
# get, so that a generated PATCH or DELETE of /api/v2/users/{id} (which
# revokes that user's tokens) does not end the run's own token.
psql -q "$db_url" -c "SELECT setval(pg_get_serial_sequence('sales.users', 'id'), 987654321)" >/dev/null
password="fuzz-admin-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
echo "$password" | "$SERVER_BIN" user add --email fuzz-admin@pg-sales.local --role admin >/dev/null
psql -q "$db_url" -c "SELECT setval(pg_get_serial_sequence('sales.users', 'id'), 1, false)" >/dev/null

"$SERVER_BIN" serve >"$log" 2>&1 &
pid=$!
ready=no
for _ in $(seq 1 200); do
    curl -fs "$url/health/live" >/dev/null 2>&1 && { ready=yes; break; }
    kill -0 "$pid" 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.1
done
if [[ $ready != yes ]]; then
    echo "fuzz_api: the server did not answer on $url within 20 s; its log:" >&2
    cat "$log" >&2
    exit 1
fi
login() {
    curl -fs "$url/api/v2/auth/login" -H 'content-type: application/json' \
        -d "{\"email\":\"fuzz-admin@pg-sales.local\",\"password\":\"$password\"}" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'
}
# Sets TOKEN to a new session's access token, or stops the run: without a
# token every operation answers 401, which the document allows, and the
# run would pass having tested nothing.
new_token() {
    TOKEN=$(login) && [[ -n $TOKEN ]] || {
        echo "fuzz_api: the fuzzing admin could not log in; server log:" >&2
        tail -20 "$log" >&2
        exit 1
    }
}

echo "fuzzing $url (schemathesis $SCHEMATHESIS_VERSION, seed $SEED, $EXAMPLES examples per operation)"
status=0
# schemathesis keeps a crash cache in its working directory: keep it in target/.
rm -rf target/fuzz-work && mkdir -p target/fuzz-work
venv_bin=$(cd "$VENV/bin" && pwd)
# FUZZ_TIMEOUT bounds the whole fuzzing, every run together.
deadline=$((SECONDS + LIMIT))
# One schemathesis run; its output is kept in target/fuzz-work/run.log.
run_once() {
    local token=$1 seed=$2 left=$((deadline - SECONDS))
    shift 2
    if [[ $left -le 0 ]]; then
        echo "fuzz_api: FUZZ_TIMEOUT (${LIMIT} s) ran out before this run" >&2
        return 124
    fi
    (cd target/fuzz-work && timeout "$left" "$venv_bin/schemathesis" run "$url/openapi.json" \
        --header "Authorization: Bearer $token" \
        --seed "$seed" --max-examples "$EXAMPLES" --workers 2 \
        --phases examples,coverage,fuzzing \
        --exclude-checks positive_data_acceptance,negative_data_rejection \
        --request-timeout 30 --no-color \
        --generation-database none \
        "$@") 2>&1 | tee target/fuzz-work/run.log
    return "${PIPESTATUS[0]}"
}
# A run that schemathesis ends with errors of its own only ("Runtime Error"
# in its summary: a crash while it generates cases, such as CPython's
# "AST constructor recursion depth mismatch" inside hypothesis; no check
# failed, no request went unanswered) says nothing of the API: it is run
# again, up to three runs in all, the later ones with the next seeds (the
# crash came back in a second run with the same seed), and the last run's
# outcome counts. A failed check, or any other error, fails at once.
only_own_errors() {
    ! grep -q "^Failures:" target/fuzz-work/run.log &&
        [[ $(sed -n '/^Errors:/,/^$/p' target/fuzz-work/run.log | grep -c "🚫") -ge 1 ]] &&
        ! sed -n '/^Errors:/,/^$/p' target/fuzz-work/run.log | grep "🚫" | grep -qv "Runtime Error"
}
fuzz() {
    local token=$1 rc=0 try=0
    shift
    run_once "$token" "$SEED" "$@" || rc=$?
    while [[ $rc -ne 0 && $try -lt 2 ]] && only_own_errors; do
        try=$((try + 1))
        echo "fuzz_api: schemathesis ended with an error of its own (no check failed); running again with seed $((SEED + try))" >&2
        rc=0
        new_token
        run_once "$TOKEN" "$((SEED + try))" "$@" || rc=$?
    done
    [[ $rc -eq 0 ]] || status=$rc
}
# A logout with the access token ends that token's session: it is fuzzed
# on its own, with a session of its own, so that the rest of the run keeps
# its token.
new_token
fuzz "$TOKEN" --exclude-path /api/v2/auth/logout "$@"
new_token
fuzz "$TOKEN" --include-path /api/v2/auth/logout "$@"
if [[ $status -ne 0 ]]; then
    echo "fuzz_api: schemathesis exited with $status; server log: $log" >&2
    grep -E "ERROR|panicked" "$log" | tail -20 >&2 || true
fi
exit $status
