"""The estimator against published Megatron-LM runs (bench_published): accuracy, not timing."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import bench_published

# The target is mean <= 5 %, max <= 10 % on the plain-1F1B rows; with the runs as they
# were configured (the gradient all-reduce overlapped on the rows up to 18B) the model reaches
# 10.2 % / 12.6 %, every row optimistic (README). This guards that figure against regressions
# until the missing costs are found; it does not claim the target.
MEAN_NOW, MAX_NOW = 0.11, 0.13


def test_published_megatron_runs_are_predicted_within_the_current_bound(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "published.json"
    assert bench_published.main(["--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["rows"]) == 10 and "mean |error|" in capsys.readouterr().out
    plain = report["plain"]
    assert plain["mean"] <= MEAN_NOW and plain["max"] <= MAX_NOW, plain
    assert report["fits"], [r["id"] for r in report["rows"] if not r["fits"]]  # they ran on 80 GB
    for row in report["rows"]:  # each measured figure is the file's, each prediction the estimator's
        assert row["predicted_tflops"] > 0 and abs(row["error"]) < 0.25, row


def test_bloom_176b_as_it_was_trained_is_accepted_and_fits() -> None:
    """BLOOM-176B (BigScience, arXiv 2211.05100: 48 nodes of 8 A100-80GB, tp 4, pp 12, dp 8,
    ZeRO-1, bf16, micro-batch 2, global batch 2,048 of 2,048 tokens, activation checkpointing):
    70 layers over 12 stages, which pp no longer needs to divide."""
    from autotune.config import ModelSpec, TrialConfig
    from autotune.estimate.clusters import load_cluster
    from autotune.estimate.estimator import estimate

    bloom = ModelSpec("bloom-176b", "gpt", 70, 14336, 112, 2048, 250880, 57344)
    cfg = TrialConfig(
        model=bloom, tp=4, pp=12, dp=8, micro_batch_size=2, global_batch_size=2048, recompute="full",
        distributed_optimizer=True, flash_attention=False, device="cuda", dtype="bf16",
    )  # fmt: skip
    assert sum(cfg.split) == 70 and len(cfg.split) == 12
    result = estimate(cfg, load_cluster("a100-80g-8x48"))
    assert result["fits"], [s["peak_memory_bytes"] / 2**30 for s in result["stages"]]
