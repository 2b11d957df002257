"""The benchmarks still run (their --quick modes) and print their ratios; no timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("module", "args", "expect"),
    [
        ("benchmarks.bench_vs_torch", ["--quick"], "ours/torch median step time"),
        ("benchmarks.bench_vs_torch", ["--quick", "--schedule", "interleaved"], "|diff| 0.00e+00: same"),
        ("benchmarks.bench_bpipe", ["--quick"], "stage-0 peak activations"),
        ("benchmarks.bench_screening", ["--quick", "--limit", "12"], "configurations/s"),
        ("benchmarks.bench_search", ["--quick"], "tuner median <= 25% of the space's configurations"),
        ("benchmarks.paper_cases", ["--models", "llama-65b"], "without recomputation 1F1B fits"),
        ("benchmarks.bench_limits", ["--quick"], "estimate: slowest"),
        ("benchmarks.bench_advise", [], "80% interval covers the measured speedup"),
        ("benchmarks.bench_dashboard", ["--quick"], "first chart in Chromium"),
    ],
)
def test_benchmark_runs(module: str, args: list[str], expect: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expect in proc.stdout
