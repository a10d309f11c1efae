#!/usr/bin/env bash
# Installs and starts what the tests need besides Python packages (CI gets a bare machine, as root):
#  - PostgreSQL (Debian's package) on loopback, for the label store's tests against PostgreSQL;
#  - Debian's Chromium, for the labeling app's browser tests;
#  - a C++ compiler (Debian's g++), which torch.compile's CPU backend needs (run.compile).
# Writes .ci/env.sh with the variables the tests read; .ci/run sources it.
set -euo pipefail
cd "$(dirname "$0")/.."
: > .ci/env.sh

need_apt=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# PostgreSQL: a throwaway cluster on 127.0.0.1:54329, trust auth, owned by the postgres user.
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
PGDATA=/tmp/megacoach-ci-pg
PGPORT=54329
if [ -f "$PGDATA/postmaster.pid" ]; then su postgres -c "$PGBIN/pg_ctl -D $PGDATA stop -m fast" >/dev/null 2>&1 || true; fi
rm -rf "$PGDATA"
mkdir -p "$PGDATA"
chown postgres:postgres "$PGDATA"
su postgres -c "$PGBIN/initdb -D $PGDATA -A trust -U postgres" >/dev/null
su postgres -c "$PGBIN/pg_ctl -D $PGDATA -l $PGDATA/server.log -w -o \"-p $PGPORT -k /tmp -c listen_addresses=127.0.0.1\" start" >/dev/null
psql -h 127.0.0.1 -p $PGPORT -U postgres -qc "CREATE DATABASE megacoach_test" >/dev/null
echo "export MEGACOACH_TEST_PG_URL=postgresql+psycopg://postgres@127.0.0.1:$PGPORT/megacoach_test" >> .ci/env.sh
echo "PostgreSQL ready on 127.0.0.1:$PGPORT"
