#!/usr/bin/env bash
# Builds the server image of deploy/Dockerfile with podman, without a
# container registry, and checks that it starts and that its HEALTHCHECK
# tells a ready server from an unready one. What it covers and what it does
# not is in README ("Deployment").
#
#   DATABASE_URL=postgres://... deploy/verify.sh   (a database the server may migrate)
#   ADMIN_DATABASE_URL=postgres://...              (optional, a superuser: the check must
#                                                  fail while that database refuses connections)
#
# Needs: podman, mmdebstrap, runc, curl; a server binary built on this
# Debian 12 host (target/release/sales-server, else target/debug/sales-server).
# On the development machines crun cannot run containers (cgroup v1/v2 hybrid
# mode) and raising RLIMIT_NOFILE/NPROC is refused, hence runc and low ulimits.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${VERIFY_DIR:-/var/tmp/pg_sales-image}
: "${DATABASE_URL:?set DATABASE_URL to a database the server may migrate}"
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
RUN_OPTS=(--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=4096:4096)
mkdir -p "$WORK"

log() { printf '[verify] %s\n' "$*"; }

# 1. A Debian 12 base image made locally.
if ! podman image exists localhost/bookworm-minbase; then
    log "mmdebstrap --variant=minbase bookworm"
    mmdebstrap --variant=minbase bookworm "$WORK/rootfs.tar" >/dev/null 2>&1
    podman import "$WORK/rootfs.tar" localhost/bookworm-minbase >/dev/null
fi

# 2. The server binary, as the image the Dockerfile's server stage copies from.
bin=$ROOT/target/release/sales-server
[ -x "$bin" ] || bin=$ROOT/target/debug/sales-server
[ -x "$bin" ] || { echo "build the server first (cargo build -p sales-server)" >&2; exit 1; }
rm -rf "$WORK/binary" && mkdir -p "$WORK/binary/src/target/release"
cp "$bin" "$WORK/binary/src/target/release/sales-server"
tar -C "$WORK/binary" -cf "$WORK/binary.tar" src
podman import "$WORK/binary.tar" localhost/pg-sales-binary >/dev/null

# 3. The server stage of deploy/Dockerfile (docker format keeps HEALTHCHECK).
log "podman build --target server"
podman build --format docker "${RUN_OPTS[@]}" -f "$ROOT/deploy/Dockerfile" --target server \
    --build-arg RUNTIME_IMAGE=localhost/bookworm-minbase \
    --build-arg SERVER_BINARY_FROM=localhost/pg-sales-binary \
    -t localhost/pg-sales-server "$ROOT" >"$WORK/build.log" 2>&1 \
    || { tail -20 "$WORK/build.log" >&2; exit 1; }
podman image inspect localhost/pg-sales-server --format '{{json .Config.Healthcheck}}' | grep -q health/ready \
    || { echo "the image has no /health/ready HEALTHCHECK" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
containers=()
cleanup() { for c in "${containers[@]}"; do podman rm -f "$c" >/dev/null 2>&1 || true; done; }
trap cleanup EXIT

start() { # name database_url -> runs the image on the host network
    local port
    port=$(free_port)
    podman run -d --name "$1" "${RUN_OPTS[@]}" --network host \
        -e DATABASE_URL="$2" -e REDIS_URL="$REDIS_URL" -e PORT="$port" -e BIND_ADDR=127.0.0.1 \
        -e JWT_SECRET=verify-secret-verify-secret-verify-secret -e CACHE_PREFIX="verify-$1" \
        localhost/pg-sales-server >/dev/null 2>&1
    containers+=("$1")
}

# The health check as the engine runs it: 0 healthy, 1 not. (Without systemd
# podman cannot schedule the periodic checks and says so on stderr; running
# one by hand is the same command.)
health() { podman healthcheck run "$1" >/dev/null 2>&1; }

wait_health() { # name want(0|1) seconds
    local deadline=$((SECONDS + $3))
    while [ $SECONDS -lt $deadline ]; do
        if health "$1"; then [ "$2" = 0 ] && return 0; else [ "$2" = 1 ] && return 0; fi
        sleep 0.5
    done
    return 1
}

# 4. Ready server: healthy within 60 s.
start pgs-verify-ready "$DATABASE_URL"
if wait_health pgs-verify-ready 0 60; then
    log "ready server: HEALTHCHECK passes"
else
    podman logs pgs-verify-ready 2>&1 | tail -20 >&2
    echo "the ready server never became healthy" >&2
    exit 1
fi

# 5. The same container while its database refuses connections: unhealthy;
#    healthy again once they are allowed.
if [ -n "${ADMIN_DATABASE_URL:-}" ]; then
    db=$(psql "$DATABASE_URL" -XAtc 'SELECT current_database()')
    allow() { psql "$ADMIN_DATABASE_URL" -Xqc "ALTER DATABASE \"$db\" ALLOW_CONNECTIONS $1" >/dev/null; }
    trap 'allow true || true; cleanup' EXIT
    allow false
    psql "$ADMIN_DATABASE_URL" -XAtqc "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '$db'" >/dev/null
    wait_health pgs-verify-ready 1 60 || { echo "still healthy while its database refuses connections" >&2; exit 1; }
    log "database refusing connections: HEALTHCHECK fails"
    allow true
    wait_health pgs-verify-ready 0 60 || { echo "not healthy again after the database came back" >&2; exit 1; }
    log "database back: HEALTHCHECK passes again"
fi
log "ok"
