#!/usr/bin/env bash
# Start or stop a throwaway PostgreSQL (15) cluster on loopback, for tests and for trying
# multi-worker tuning locally. Nothing outside DIR is touched.
#
#   scripts/postgres.sh start DIR [PORT]  # prints the URL, e.g. postgresql://attncc@127.0.0.1:PORT/attncc
#   scripts/postgres.sh stop DIR
#
# Debian keeps initdb/pg_ctl in /usr/lib/postgresql/<version>/bin (PG_BIN overrides). PostgreSQL
# refuses to run as root, so under root the server runs as the 'postgres' user and DIR is handed
# to it. Authentication is 'trust' on 127.0.0.1 only; the socket lives in DIR.
set -euo pipefail
usage() { echo "usage: $0 start DIR [PORT] | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
ACTION=$1
DIR=$(realpath -m "$2")

find_bin() {
  if [ -n "${PG_BIN:-}" ]; then echo "$PG_BIN"; return; fi
  for d in /usr/lib/postgresql/15/bin /usr/lib/postgresql/*/bin; do
    [ -x "$d/pg_ctl" ] && { echo "$d"; return; }
  done
  command -v pg_ctl >/dev/null && { dirname "$(command -v pg_ctl)"; return; }
  echo "postgres.sh: no PostgreSQL binaries (initdb, pg_ctl) found; install postgresql" >&2
  exit 3
}
BIN=$(find_bin)

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$ACTION" in
  start)
    PORT=${3:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
    mkdir -p "$DIR"
    if [ "$(id -u)" = 0 ]; then
      chown postgres "$DIR"
      as_pg test -w "$DIR" || { echo "postgres.sh: user postgres cannot reach $DIR" \
        "(a parent folder is private to root); use a folder under a world-traversable one" >&2
        exit 1; }
    fi
    as_pg "$BIN/initdb" -D "$DIR/data" -U attncc --auth=trust -E UTF8 >"$DIR/initdb.log" 2>&1 \
      || { cat "$DIR/initdb.log" >&2; exit 1; }
    as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
      -o "-k $DIR -h 127.0.0.1 -p $PORT -c fsync=off -c max_connections=100" start >/dev/null \
      || { cat "$DIR/server.log" >&2; exit 1; }
    as_pg "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U attncc attncc
    echo "$PORT" >"$DIR/port"
    echo "postgresql://attncc@127.0.0.1:$PORT/attncc"
    ;;
  stop)
    [ -d "$DIR/data" ] || { echo "postgres.sh: no cluster in $DIR" >&2; exit 1; }
    as_pg "$BIN/pg_ctl" -D "$DIR/data" -m fast -w -t 60 stop >/dev/null
    ;;
  *) usage ;;
esac
