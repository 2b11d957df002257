#!/usr/bin/env bash
# The main job: a real, small tuning campaign on this CPU over search_spaces/demo-cpu.yaml.
# Tier 1 screens every configuration with the estimator (after profiling the model once on
# this machine); tier 2 runs real training trials through a local Ray, one at a time, chosen
# by Optuna; every result lands in an SQLite file. It ends by printing the best configuration.
# Rerunning resumes the study and answers measured configurations from the database.
#   AUTOTUNE_STORAGE  database URL (default sqlite:///autotune.db in the working directory)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
storage=${AUTOTUNE_STORAGE:-sqlite:///autotune.db}
autotune tune demo-cpu --storage "$storage" "$@"
echo
autotune best --storage "$storage" --study demo-cpu
