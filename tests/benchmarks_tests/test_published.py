"""The estimator against published Megatron-LM runs (bench_published): accuracy, not timing."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import bench_published

# The target: mean |error| <= 5 %, max <= 10 % on the plain-1F1B rows, the runs as they
# were configured (the gradient all-reduce overlapped on the rows up to 18B).


def test_published_megatron_runs_are_predicted_within_the_target(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "published.json"
    assert bench_published.main(["--json", str(out)]) == 0
    sc21, held_out = json.loads(out.read_text())["sets"]
    assert "mean |error|" in capsys.readouterr().out
    assert (sc21["file"], len(sc21["rows"])) == ("megatron-sc21-table1.json", 10)
    plain = sc21["plain"]
    assert plain["mean"] <= bench_published.MEAN_TARGET and plain["max"] <= bench_published.MAX_TARGET, plain
    # the 2022 runs (Korthikanti et al.), which the model was not built on: within the same target
    # on their plain-1F1B rows; the interleaved rows of both sets, predicted with the interleaved
    # schedule, within 5 % on average
    assert (held_out["file"], len(held_out["rows"])) == ("megatron-2205.05198.json", 8)
    assert held_out["plain"]["mean"] <= 0.05 and held_out["plain"]["max"] <= 0.10, held_out["plain"]
    interleaved = json.loads(out.read_text())["interleaved"]
    assert interleaved["count"] == 8 and interleaved["mean"] <= bench_published.MEAN_TARGET, interleaved
    for report in (sc21, held_out):
        assert report["fits"], [r["id"] for r in report["rows"] if not r["fits"]]  # they ran on 80 GB
        for row in report["rows"]:  # each measured figure is the file's, each prediction the estimator's
            assert row["predicted_step_s"] > 0 and abs(row["error"]) < 0.10, row


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
