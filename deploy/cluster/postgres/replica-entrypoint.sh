#!/bin/bash
# deploy/cluster/postgres/replica-entrypoint.sh: a hot standby of the primary.
# First start: copy the primary with pg_basebackup (-R writes standby.signal and
# primary_conninfo), then run postgres as a read-only replica streaming WAL.
set -euo pipefail
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  until pg_isready -h postgres-primary -U "$POSTGRES_USER"; do sleep 1; done
  export PGPASSWORD="$REPLICATION_PASSWORD"
  pg_basebackup -h postgres-primary -U replicator -D "$PGDATA" \
    --slot=replica_1 -X stream -R --checkpoint=fast
  chmod 0700 "$PGDATA"
fi
exec postgres -c hot_standby=on -c hot_standby_feedback=on
