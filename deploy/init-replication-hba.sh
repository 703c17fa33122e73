#!/usr/bin/env bash
# Run once by the Postgres image's entrypoint on a new cluster, after
# init-replication.sql: lets the replica's pg_basebackup in. The image's
# pg_hba.conf admits `all` databases from the network, which does not cover
# replication connections.
set -euo pipefail
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
