#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv.
# Where no NVIDIA GPU is present, the CPU build of torch is installed first, so the plain
# `torch` range in pyproject.toml is already satisfied and no multi-GB CUDA build is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.autotune-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        python -m pip install --quiet torch
    else
        python -m pip install --quiet "torch==2.13.0" 2>/dev/null \
            || python -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi
python -m pip install --quiet -e ".[dev]"
echo "$want" > "$stamp"
