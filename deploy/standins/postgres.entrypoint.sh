#!/bin/sh
# Entrypoint of the PostgreSQL stand-in: what docker-compose.yml relies on from the official
# image's docker-entrypoint.sh, done with Debian's postgresql package.
#   POSTGRES_PASSWORD (required, unless POSTGRES_HOST_AUTH_METHOD=trust), POSTGRES_USER
#   (default postgres), POSTGRES_DB (default: the user); the cluster is created in PGDATA on the
#   first start only (an existing PG_VERSION is kept as it is); the server runs as the postgres
#   user and listens on every address, port 5432; connections from inside the container are
#   trusted, others need the password (scram-sha-256, or POSTGRES_HOST_AUTH_METHOD).
set -eu

if [ "${1#-}" != "$1" ]; then
  set -- postgres "$@"
fi
if [ "$1" != postgres ]; then
  exec "$@"
fi

if [ "$(id -u)" = 0 ]; then
  # Root only prepares the directories (a fresh named volume belongs to root), then drops to
  # postgres: the server refuses to run as root.
  mkdir -p "$PGDATA" /var/run/postgresql
  chown postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 700 "$PGDATA"
  chmod 2775 /var/run/postgresql
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  : "${POSTGRES_USER:=postgres}"
  : "${POSTGRES_DB:=$POSTGRES_USER}"
  auth="${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}"
  if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$auth" != trust ]; then
    echo "error: database is uninitialized and POSTGRES_PASSWORD is not set" >&2
    echo "       (set it, or POSTGRES_HOST_AUTH_METHOD=trust to allow connections without one)" >&2
    exit 1
  fi
  pwfile="$(mktemp)"
  printf '%s\n' "${POSTGRES_PASSWORD:-}" >"$pwfile"
  # As the official image: connections inside the container (socket, loopback) are trusted,
  # every other address needs the password.
  initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --auth=trust --encoding=UTF8 \
    -D "$PGDATA" >/dev/null
  rm -f "$pwfile"
  printf 'host all all all %s\n' "$auth" >>"$PGDATA/pg_hba.conf"
  # Created by a server that listens on the socket only, so nothing outside sees it half-made
  # (the health check asks over TCP).
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  if [ "$POSTGRES_DB" != postgres ]; then
    psql -v ON_ERROR_STOP=1 --username="$POSTGRES_USER" --dbname=postgres -q \
      -c "CREATE DATABASE \"$POSTGRES_DB\""
  fi
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  echo "postgres stand-in: created database $POSTGRES_DB (user $POSTGRES_USER) in $PGDATA"
fi

shift
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
