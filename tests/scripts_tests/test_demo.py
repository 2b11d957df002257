"""The README's main command, end to end: a real campaign over demo-cpu that ends with the best."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from autotune import best_config
from storage import Store

ROOT = Path(__file__).resolve().parents[2]


def test_demo_campaign_runs_end_to_end_and_prints_the_best(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    env = {**os.environ, "AUTOTUNE_STORAGE": url}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "screened" in out and "stopped:" in out
    assert out.rstrip().splitlines()[-2].startswith("best: ")  # `autotune best` closes the job
    with Store(url, migrate=False) as store:
        trials = store.trials(study="demo-cpu")
    ok = [t for t in trials if t.status == "ok"]
    assert ok and not [t for t in trials if t.status == "running"]
    best = best_config(storage=url, study="demo-cpu")
    assert best.measured and best.trial_id == max(ok, key=lambda t: t.tokens_per_s or 0).id
    cli = subprocess.run(
        [sys.executable, "-m", "autotune.cli", "best", "--storage", url, "--model", best.config["model"],
         "--cluster", "cpu-local", "--json"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    answer = json.loads(cli.stdout)
    assert answer["measured"] is True and answer["trial_id"] == best.trial_id
    assert answer["tokens_per_s"] == best.tokens_per_s and answer["config"] == best.config
