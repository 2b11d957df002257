#!/usr/bin/env bash
# The re-evaluation's finding, measured on this CPU: BPipe pays off with explicit attention under a
# memory cap (1F1B must recompute, BPipe need not), and does not with flash attention (1F1B fits
# the same setting, BPipe only adds transfers). Each space is run as REPS real campaigns (default
# 3), each a study of its own measuring every configuration again (--rerun), so each side of the
# pair has REPS measurements taken beside each other in time; then `autotune advise` gives both
# verdicts from every campaign's measurements (the per-campaign speedups in its first line).
#   AUTOTUNE_STORAGE  database URL (default sqlite:///bpipe-cases.db in the working directory)
#   REPS              campaigns per space (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
storage=${AUTOTUNE_STORAGE:-sqlite:///bpipe-cases.db}
reps=${REPS:-3}
for kind in explicit flash; do
    for rep in $(seq 1 "$reps"); do
        echo "== bpipe-$kind-cpu, campaign $rep of $reps"
        autotune tune "bpipe-$kind-cpu" --storage "$storage" --study "bpipe-$kind-cpu-$rep" --rerun
    done
done
for kind in explicit flash; do
    echo
    echo "== autotune advise --model tiny-gpt-s512-$kind --cluster cpu-local"
    autotune advise --storage "$storage" --model "tiny-gpt-s512-$kind" --cluster cpu-local
done
