#!/bin/bash
# deploy/cluster/postgres/primary-init.sh: run once by the postgres image on the
# primary's first start (docker-entrypoint-initdb.d). Creates the replication
# role the replica streams WAL with, and lets it connect.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD '${REPLICATION_PASSWORD}';
SELECT pg_create_physical_replication_slot('replica_1');
SQL
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
