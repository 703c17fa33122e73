#!/usr/bin/env bash
# Installs the frozen install scripts of earlier pg_sales releases
# (extension/sql/releases/pg_sales--<version>.sql) next to the one
# `cargo pgrx install` generates. pgrx copies the upgrade scripts
# (extension/sql/pg_sales--A--B.sql) itself, but not old install scripts;
# those let `CREATE EXTENSION pg_sales VERSION '<old>'` work, which the
# upgrade test needs to start from a real earlier release.
# Usage: scripts/install_extension_sql.sh [path/to/pg_config]
set -euo pipefail
PG_CONFIG=${1:-/usr/lib/postgresql/15/bin/pg_config}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
dest="$("$PG_CONFIG" --sharedir)/extension"
for f in "$ROOT"/extension/sql/releases/pg_sales--*.sql; do
    install -m 0644 "$f" "$dest/$(basename "$f")"
done
