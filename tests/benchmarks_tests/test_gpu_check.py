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
    # the cases again from profiles measured here, one tp-2 shard of each model (issue 14, item 7)
    assert set(report["profiles"]) == {"tiny-gpt", "tiny-llama"}
    for name in report["profiles"].values():
        profile = json.loads((tmp_path / name).read_text())
        assert profile["tp"] == 2 and profile["dtype"] == "float32" and profile["entries"]
    assert len(report["profiled_cases"]) == 4
    assert all(c.get("ours") and c.get("paper") or c.get("reason") for c in report["profiled_cases"])
    log = (tmp_path / "gpu-check-dry-run.log").read_text()
    assert "BPipe vs the best 1F1B" in log and "from profiles measured here" in log
