#!/usr/bin/env bash
# Start (or stop) throwaway PostgreSQL and Redis servers on loopback for tests and benchmarks.
# Usage: scripts/services.sh start|stop|env   (env prints the variables to export)
set -euo pipefail
PG_PORT=${RAMPART_PG_PORT:-55432}
REDIS_PORT=${RAMPART_REDIS_PORT:-56379}
STATE=${RAMPART_SERVICES_DIR:-/tmp/rampart-services}
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
PG_DATA=$STATE/pgdata

as_postgres() {
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi
}

case "${1:-}" in
  start)
    mkdir -p "$STATE"
    if [ "$(id -u)" = 0 ]; then chown postgres "$STATE"; fi
    if [ ! -s "$PG_DATA/PG_VERSION" ]; then
      as_postgres "$PG_BIN/initdb -D $PG_DATA -U postgres --auth=trust -E UTF8 >/dev/null"
    fi
    if ! as_postgres "$PG_BIN/pg_ctl -D $PG_DATA status" >/dev/null 2>&1; then
      as_postgres "$PG_BIN/pg_ctl -D $PG_DATA -l $STATE/postgres.log -w -o \
        \"-p $PG_PORT -k $STATE -c listen_addresses=127.0.0.1 -c fsync=off \
        -c synchronous_commit=off -c full_page_writes=off -c max_connections=200\" start" \
        >/dev/null
    fi
    psql "postgresql://postgres@127.0.0.1:$PG_PORT/postgres" -qtAc \
      "SELECT 1 FROM pg_roles WHERE rolname='rampart'" | grep -q 1 || \
      { psql "postgresql://postgres@127.0.0.1:$PG_PORT/postgres" -qc \
          "CREATE ROLE rampart LOGIN SUPERUSER PASSWORD 'rampart'" && \
        psql "postgresql://postgres@127.0.0.1:$PG_PORT/postgres" -qc \
          "CREATE DATABASE rampart OWNER rampart"; }
    if ! redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
      redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize yes --logfile "$STATE/redis.log" --pidfile "$STATE/redis.pid"
      for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
    fi
    ;;
  stop)
    as_postgres "$PG_BIN/pg_ctl -D $PG_DATA -m fast stop" >/dev/null 2>&1 || true
    redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    ;;
  env)
    echo "export DATABASE_URL=postgres://rampart:rampart@127.0.0.1:$PG_PORT/rampart"
    echo "export CELERY_BROKER_URL=redis://127.0.0.1:$REDIS_PORT/0"
    ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
