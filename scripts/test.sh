#!/usr/bin/env bash
# The whole test suite, set-up included: lint, format check, type check, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/system-deps.sh
. .venv/bin/activate
echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy"; mypy
echo "== pytest"; python -m pytest -q --durations=15 "$@"
