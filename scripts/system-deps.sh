#!/usr/bin/env bash
# System packages the tests need beyond Python's: the PostgreSQL server binaries (initdb,
# pg_ctl), which the store's tests start a throwaway server from, and Chromium, which the
# dashboard's browser tests drive through Playwright (`playwright install` cannot download a
# browser here: Debian's `chromium` is used). Idempotent: installs only what is missing, with
# apt-get when run as root on Debian or Ubuntu.
set -euo pipefail

have_postgres() {
    command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1 && return 0
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

missing=()
if [ -n "${AUTOTUNE_TEST_POSTGRES_URL:-}" ]; then
    echo "system-deps: tests use the PostgreSQL server at \$AUTOTUNE_TEST_POSTGRES_URL"
elif have_postgres; then
    echo "system-deps: PostgreSQL server binaries present"
else
    missing+=(postgresql)
fi
if command -v chromium >/dev/null 2>&1; then
    echo "system-deps: Chromium present"
else
    missing+=(chromium)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: missing ${missing[*]} (PostgreSQL's initdb/pg_ctl, Chromium); install the" \
        "Debian package(s) '${missing[*]}' (needs root and apt-get), or point" \
        "AUTOTUNE_TEST_POSTGRES_URL at a server" >&2
    exit 1
fi
echo "system-deps: installing ${missing[*]}: apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
if [[ " ${missing[*]} " == *" postgresql "* ]] && ! have_postgres; then
    echo "system-deps: installed 'postgresql' but found no initdb" >&2
    exit 1
fi
if [[ " ${missing[*]} " == *" chromium "* ]] && ! command -v chromium >/dev/null 2>&1; then
    echo "system-deps: installed 'chromium' but found no chromium command" >&2
    exit 1
fi
echo "system-deps: installed ${missing[*]}"
