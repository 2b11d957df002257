#!/usr/bin/env bash
# The main job (until campaigns land): a real 4-stage training trial of tiny-gpt under 1F1B
# and under BPipe, first unconstrained, then with a memory cap between the two schedules'
# stage-0 peaks, where 1F1B runs out of memory and BPipe trains.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
common=(--model tiny-gpt --pp 4 --num-microbatches 8 --steps 3)
echo "== the BPipe schedule (4 stages, 8 micro-batches; cap 3 per stage)"
autotune schedule --schedule bpipe --pp 4 --num-microbatches 8
for schedule in 1f1b bpipe; do
    echo; echo "== trial: $schedule"
    autotune trial "${common[@]}" --schedule "$schedule"
done
limit=1560000
for schedule in 1f1b bpipe; do
    echo; echo "== trial: $schedule with --memory-limit $limit bytes per device"
    autotune trial "${common[@]}" --schedule "$schedule" --memory-limit "$limit"
done
