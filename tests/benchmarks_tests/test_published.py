"""The estimator against published Megatron-LM runs (bench_published): accuracy, not timing."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import bench_published


def test_published_megatron_runs_are_predicted_within_target(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "published.json"
    assert bench_published.main(["--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["rows"]) == 10 and "mean |error|" in capsys.readouterr().out
    plain = report["plain"]
    assert plain["mean"] <= bench_published.MEAN_TARGET and plain["max"] <= bench_published.MAX_TARGET, plain
    assert report["fits"], [r["id"] for r in report["rows"] if not r["fits"]]  # they ran on 80 GB
    for row in report["rows"]:  # each measured figure is the file's, each prediction the estimator's
        assert row["predicted_tflops"] > 0 and abs(row["error"]) < 0.25, row
