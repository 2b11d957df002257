"""The prepared GPU check runs end to end on the CPU (`--dry-run`: tiny shapes, tp 2, fp32)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--repeats", "2", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu-check-dry-run.json").read_text())
    assert report["trial"] == "ok"
    assert len(report["shards"]) == 2 * 2 * 2  # two models, two micro-batch sizes, flash on and off
    for shard in report["shards"]:
        assert shard["tp"] == 2 and shard["measured_fwd_s"] > 0 and shard["predicted_fwd_s"] > 0
    assert len(report["paper_cases"]) == 4
    assert all(c.get("ours") and c.get("paper") or c.get("reason") for c in report["paper_cases"])
    assert "BPipe (mbs 4)" in (tmp_path / "gpu-check-dry-run.log").read_text()
