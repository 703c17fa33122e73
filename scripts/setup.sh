#!/usr/bin/env bash
# Brings a Debian 12 machine (as root) to the point where pg_sales can run and
# be tested: packages, cargo-pgrx, the Postgres cluster and Redis, the
# extension, the application role and database. Every step checks first and
# skips what is already done, so a second run takes seconds.
set -euo pipefail

PG_MAJOR=15
PG_CONFIG=/usr/lib/postgresql/${PG_MAJOR}/bin/pg_config
PGRX_VERSION=0.18.1
DB_USER=${PG_SALES_DB_USER:-sales_app}
DB_PASSWORD=${PG_SALES_DB_PASSWORD:-pg_sales_dev}
DB_NAME=${PG_SALES_DB_NAME:-pg_sales}
REDIS_PORT=${PG_SALES_REDIS_PORT:-6379}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STAMP_DIR=$ROOT/target/.setup

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "setup must run as root (it installs packages and manages the Postgres cluster)" >&2
        exit 1
    fi
}

deps() {
    need_root
    # python3 (with venv, for the API fuzzer), curl and jq: the tests, the
    # benchmarks and README's examples use them.
    local pkgs=(postgresql-${PG_MAJOR} postgresql-contrib postgresql-server-dev-${PG_MAJOR} libclang-dev clang
                pkg-config libssl-dev redis-server sudo ca-certificates python3 python3-venv curl jq)
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if [ "$(cargo pgrx --version 2>/dev/null)" != "cargo-pgrx ${PGRX_VERSION}" ]; then
        log "installing cargo-pgrx ${PGRX_VERSION} (takes a few minutes once)"
        cargo install cargo-pgrx --version "${PGRX_VERSION}" --locked
    fi
    if ! grep -qs "^pg${PG_MAJOR} = \"${PG_CONFIG}\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
        log "cargo pgrx init --pg${PG_MAJOR} ${PG_CONFIG}"
        cargo pgrx init --pg${PG_MAJOR} "${PG_CONFIG}" >/dev/null
    fi
}

# What only the tests need (`make test`, not `make run`): the dashboard's
# browser test drives Debian's Chromium with playwright-core.
browser_deps() {
    need_root
    if [ ! -x /usr/bin/chromium ]; then
        log "installing chromium (browser tests)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    fi
    if ! command -v node >/dev/null; then
        log "installing nodejs (browser tests)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
    fi
    if [ ! -d "$ROOT/tests/browser/node_modules/playwright-core" ]; then
        log "npm ci in tests/browser"
        (cd "$ROOT/tests/browser" && npm ci --no-audit --no-fund >/dev/null)
    fi
}

postgres_up() {
    need_root
    if ! pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -qx "${PG_MAJOR} main"; then
        log "creating Postgres ${PG_MAJOR} cluster main"
        pg_createcluster ${PG_MAJOR} main >/dev/null
    fi
    local conf=/etc/postgresql/${PG_MAJOR}/main/conf.d/pg_sales.conf
    local want="# managed by pg_sales scripts/setup.sh
shared_preload_libraries = 'pg_stat_statements,pg_sales'
pg_stat_statements.track = all
max_connections = 300
wal_level = replica
max_wal_senders = 10
wal_keep_size = '1GB'
listen_addresses = '127.0.0.1'"
    local restart=no
    # pg_sales is preloaded (its event delivery order lives in shared
    # memory), so a newly installed build only takes effect after a restart.
    [ "${EXTENSION_CHANGED:-no}" = yes ] && restart=yes
    if [ "$(cat "$conf" 2>/dev/null)" != "$want" ]; then
        mkdir -p "$(dirname "$conf")"
        printf '%s\n' "$want" > "$conf"
        restart=yes
    fi
    if ! pg_lsclusters -h | awk '$1=='"${PG_MAJOR}"' && $2=="main" {print $4}' | grep -q online; then
        log "starting Postgres ${PG_MAJOR}/main"
        pg_ctlcluster ${PG_MAJOR} main start
    elif [ $restart = yes ]; then
        log "restarting Postgres ${PG_MAJOR}/main for new settings or a new pg_sales build"
        pg_ctlcluster ${PG_MAJOR} main restart
    fi
    for _ in $(seq 1 50); do
        sudo -u postgres psql -qAtc 'select 1' >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "Postgres did not become ready" >&2
    exit 1
}

redis_up() {
    if ! redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
        log "starting redis-server on 127.0.0.1:${REDIS_PORT}"
        mkdir -p /var/lib/pg_sales-redis
        redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
            --dir /var/lib/pg_sales-redis --logfile /var/lib/pg_sales-redis/redis.log
        for _ in $(seq 1 50); do
            redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && return 0
            sleep 0.1
        done
        echo "Redis did not become ready" >&2
        exit 1
    fi
}

extension() {
    need_root
    mkdir -p "$STAMP_DIR"
    local hash
    hash=$(cd "$ROOT" && cat Cargo.toml Cargo.lock extension/Cargo.toml core/Cargo.toml extension/pg_sales.control \
        $(find extension/src extension/sql core/src -type f | sort) | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$STAMP_DIR/extension" 2>/dev/null)" = "$hash" ] && [ -f /usr/lib/postgresql/${PG_MAJOR}/lib/pg_sales.so ]; then
        return 0
    fi
    log "building and installing the pg_sales extension (release)"
    (cd "$ROOT/extension" && cargo pgrx install --release --pg-config "$PG_CONFIG" >/dev/null)
    # Earlier releases' install scripts (pgrx copies only the upgrade scripts).
    "$ROOT/scripts/install_extension_sql.sh" "$PG_CONFIG"
    echo "$hash" > "$STAMP_DIR/extension"
    EXTENSION_CHANGED=yes
}

database() {
    # The application role is a superuser in this development set-up so that
    # tests can create databases, install the extension and run index
    # maintenance; README says how to run with less.
    sudo -u postgres psql -qAt -v ON_ERROR_STOP=1 >/dev/null <<SQL
DO \$\$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '${DB_USER}') THEN
        CREATE ROLE ${DB_USER} LOGIN SUPERUSER PASSWORD '${DB_PASSWORD}';
    END IF;
END \$\$;
SQL
    # Never dropped here: it may hold data a user loaded. A new extension
    # version is applied in place (ALTER EXTENSION pg_sales UPDATE runs the
    # upgrade scripts pg_sales--A--B.sql); `make reset-db` is the only way
    # this project drops it.
    if ! sudo -u postgres psql -qAt -c "select 1 from pg_database where datname = '${DB_NAME}'" | grep -q 1; then
        log "creating database ${DB_NAME}"
        sudo -u postgres createdb -O "${DB_USER}" "${DB_NAME}"
    fi
    local have want
    have=$(sudo -u postgres psql -qAt -d "${DB_NAME}" -c "select extversion from pg_extension where extname = 'pg_sales'")
    want=$(sudo -u postgres psql -qAt -d "${DB_NAME}" -c "select default_version from pg_available_extensions where name = 'pg_sales'")
    # Not installed yet: the first migration (sales-server migrate) creates it.
    if [ -n "$have" ] && [ "$have" != "$want" ]; then
        log "upgrading extension pg_sales ${have} -> ${want} in ${DB_NAME} (data kept)"
        if ! sudo -u postgres psql -qAt -v ON_ERROR_STOP=1 -d "${DB_NAME}" -c "ALTER EXTENSION pg_sales UPDATE" >/dev/null; then
            echo "pg_sales: no upgrade path from ${have} to ${want} (missing extension/sql/pg_sales--${have}--*.sql?)." >&2
            echo "Nothing was changed. 'make reset-db' recreates ${DB_NAME} empty (its data is lost)." >&2
            exit 1
        fi
    fi
    # The same version with different SQL (an edit under extension/ without
    # a version bump) cannot be applied in place: say so rather than drop.
    local build
    build="pg_sales build $(cat "$STAMP_DIR/extension" 2>/dev/null || echo unknown)"
    if [ -n "$have" ] && [ "$have" = "$want" ]; then
        local seen
        seen=$(sudo -u postgres psql -qAt -c "select shobj_description(oid, 'pg_database') from pg_database where datname = '${DB_NAME}'")
        if [ -n "$seen" ] && [ "$seen" != "$build" ]; then
            log "note: the extension was rebuilt under the same version ${want}; SQL changes reach ${DB_NAME}"
            log "      only through a new version and its upgrade script (README: Upgrades), or 'make reset-db'"
        fi
    fi
    sudo -u postgres psql -qAt -c "COMMENT ON DATABASE ${DB_NAME} IS '${build}'" >/dev/null
}

case "${1:-all}" in
    deps) deps ;;
    browser) browser_deps ;;
    services) postgres_up; redis_up ;;
    # A new build reaches a running cluster only through a restart (it is
    # preloaded); postgres_up restarts it when EXTENSION_CHANGED says so.
    extension)
        extension
        if [ "${EXTENSION_CHANGED:-no}" = yes ]; then postgres_up; fi
        ;;
    database) database ;;
    # The extension is installed before Postgres starts: the cluster preloads it.
    all) deps; extension; postgres_up; redis_up; database ;;
    *) echo "usage: $0 [deps|browser|services|extension|database|all]" >&2; exit 2 ;;
esac
