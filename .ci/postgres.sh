#!/usr/bin/env bash
# A throwaway PostgreSQL for the test suite: installs Debian's server if it is missing, starts a
# private cluster on a free loopback port, creates a database and writes .ci/postgres.env:
#
#   export SD3_TEST_POSTGRES_URL=postgresql+psycopg://sd3:<random>@127.0.0.1:<port>/sd3_test
#
# Source that file before pytest. Run again: reuses the running cluster (a second or so).
# `bash .ci/postgres.sh stop` stops it and removes its files.
set -euo pipefail
cd "$(dirname "$0")/.."

ENV_FILE="$PWD/.ci/postgres.env"
# Outside the checkout (the data directory must belong to the server's user) and fixed, so that a
# second run finds the cluster of the first.
CLUSTER_DIR="${SD3_CI_POSTGRES_DIR:-/tmp/sd3-ci-postgres-$(id -u)}"
DATA="$CLUSTER_DIR/data"
DATABASE=sd3_test
ROLE=sd3

find_bindir() {
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]] && { echo "$dir"; return 0; }
    done
    return 1
}

# PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user that
# Debian's package creates; otherwise to whoever runs this script.
as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

BIN=$(find_bindir || true)

if [[ "${1:-}" == "stop" ]]; then
    if [[ -n "$BIN" && -f "$DATA/PG_VERSION" ]]; then
        as_owner "$BIN/pg_ctl" -D "$DATA" -m fast stop >/dev/null 2>&1 || true
    fi
    rm -rf "$CLUSTER_DIR" "$ENV_FILE"
    exit 0
fi

if [[ -z "$BIN" ]]; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "PostgreSQL is not installed; run this script as root, or apt-get install postgresql" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # Only the binaries are needed: Debian's own cluster (if its postinst makes one) stays unused.
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    BIN=$(find_bindir)
fi

# Reuse: a cluster that answers. Its credentials are kept beside it, not only in this checkout's
# env file, because the cluster folder is per user: another checkout may have (re)made it.
if [[ -f "$CLUSTER_DIR/env" && -f "$CLUSTER_DIR/port" ]] \
    && "$BIN/pg_isready" -q -h 127.0.0.1 -p "$(cat "$CLUSTER_DIR/port")" -d "$DATABASE" 2>/dev/null; then
    (umask 077 && cp "$CLUSTER_DIR/env" "$ENV_FILE")
    cat "$ENV_FILE"
    exit 0
fi

# Anything else left over (a cluster that is stopped or half made) is thrown away and made again.
if [[ -f "$DATA/PG_VERSION" ]]; then
    as_owner "$BIN/pg_ctl" -D "$DATA" -m immediate stop >/dev/null 2>&1 || true
fi
rm -rf "$CLUSTER_DIR" "$ENV_FILE"
mkdir -p "$CLUSTER_DIR"
chmod 700 "$CLUSTER_DIR"
[[ $(id -u) -eq 0 ]] && chown postgres: "$CLUSTER_DIR"

PASSWORD=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
# The kernel picks a free port; the tiny window before PostgreSQL binds it is acceptable for CI.
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "$PORT" >"$CLUSTER_DIR/port"

# Password authentication even on loopback: other users of a shared machine cannot get in.
as_owner bash -c "umask 077 && printf '%s\n' '$PASSWORD' >'$CLUSTER_DIR/pwfile'"
as_owner "$BIN/initdb" -D "$DATA" -U "$ROLE" --pwfile="$CLUSTER_DIR/pwfile" --auth=scram-sha-256 \
    --encoding=UTF8 --locale=C.UTF-8 >/dev/null
rm -f "$CLUSTER_DIR/pwfile"
# Loopback only, the socket in our own directory (Debian's /var/run/postgresql may not exist), and
# no fsync: a throwaway database trades durability for speed.
as_owner "$BIN/pg_ctl" -D "$DATA" -l "$CLUSTER_DIR/server.log" -w -t 60 start \
    -o "-h 127.0.0.1 -p $PORT -k $CLUSTER_DIR -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
    >/dev/null
PGPASSWORD="$PASSWORD" "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U "$ROLE" "$DATABASE"

URL="postgresql+psycopg://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DATABASE"
(umask 077 && echo "export SD3_TEST_POSTGRES_URL=$URL" >"$CLUSTER_DIR/env" && cp "$CLUSTER_DIR/env" "$ENV_FILE")
cat "$ENV_FILE"
