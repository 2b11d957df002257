#!/usr/bin/env bash
# System packages the tests need beyond Python's: the PostgreSQL server binaries (initdb,
# pg_ctl), which the store's tests start a throwaway server from. Idempotent: does nothing when
# they are already present. Installs with apt-get when run as root on Debian or Ubuntu.
set -euo pipefail

have_postgres() {
    command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1 && return 0
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

if [ -n "${AUTOTUNE_TEST_POSTGRES_URL:-}" ]; then
    echo "system-deps: tests use the PostgreSQL server at \$AUTOTUNE_TEST_POSTGRES_URL"
    exit 0
fi
if have_postgres; then
    echo "system-deps: PostgreSQL server binaries present"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: PostgreSQL server binaries (initdb, pg_ctl) are missing; install the" \
        "'postgresql' package (needs root and apt-get), or point AUTOTUNE_TEST_POSTGRES_URL" \
        "at a server" >&2
    exit 1
fi
echo "system-deps: installing PostgreSQL: apt-get update && apt-get install -y --no-install-recommends postgresql"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
if ! have_postgres; then
    echo "system-deps: installed 'postgresql' but found no initdb" >&2
    exit 1
fi
echo "system-deps: PostgreSQL installed: $(compgen -G '/usr/lib/postgresql/*/bin/initdb' | head -1)"
