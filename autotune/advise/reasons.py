"""Why BPipe pays off or not, as numbers: the estimator's view of the two configurations, with
the measured figures beside the predicted ones where the trials ran.

- memory: 1F1B's first-stage peak at BPipe's setting against the cap, and what BPipe's freed
  memory buys (a larger micro-batch b0 -> b1, or which recomputation it avoids);
- compute: the per-token compute time ratio between the two (the MFU gain of the larger
  micro-batch, or the recomputation saved);
- bubble: m0, m1 and p, and the two predicted bubble fractions;
- transfers: BPipe's evicted bytes per step, the link its pairs cross (same node or not), and the
  transfer time left exposed (not hidden by compute).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from autotune.advise.correction import RECOMPUTE_LEVEL
from autotune.config import TrialConfig
from autotune.estimate.clusters import ClusterSpec, node_of
from autotune.estimate.estimator import estimate, memory_cap
from autotune.estimate.paper import per_token_time
from autotune.estimate.profiles import Profile
from autotune.placement import layout_of


def crosses_nodes(cfg: TrialConfig, cluster: ClusterSpec) -> bool:
    """Whether BPipe's pair of stage 0 and stage p-1 sits on two nodes (a world larger than the
    cluster time-shares one machine: the same node)."""
    if cfg.world_size > cluster.world_size or cfg.pp < 2:
        return False
    layout = layout_of(dataclasses.replace(cfg, schedule="bpipe") if cfg.schedule != "bpipe" else cfg)
    a = layout.rank(stage=0, dp_rank=0, tp_rank=0)
    b = layout.rank(stage=cfg.pp - 1, dp_rank=0, tp_rank=0)
    return node_of(cluster, a) != node_of(cluster, b)


def exposed_fraction(predicted: dict[str, Any] | None) -> float:
    """BPipe's predicted transfer time left exposed (the slowest stage's), over its step time."""
    if not predicted or not predicted.get("step_time_s"):
        return 0.0
    exposed = max(predicted.get("exposed_transfer_s") or [0.0])
    return float(exposed) / float(predicted["step_time_s"])


def _stage0(record: Any) -> dict[str, Any] | None:
    stages = getattr(record, "stages", None) or []
    return stages[0] if stages else None


def reasons(
    bpipe: TrialConfig, baseline: TrialConfig, cluster: ClusterSpec, profile: Profile | None, *,
    measured: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """The reasons table: each row a name, the predicted figures, the measured ones (from
    `measured`: {"bpipe": TrialRecord, "baseline": TrialRecord, "speedup": float}) or None, and a
    one-line reading."""
    measured = measured or {}
    b_est, a_est = estimate(bpipe, cluster, profile=profile), estimate(baseline, cluster, profile=profile)
    same = dataclasses.replace(bpipe, schedule="1f1b", bpipe_cap=0)
    same_est = estimate(same, cluster, profile=profile)
    cap = memory_cap(bpipe, cluster)
    peak_1f1b = same_est["stages"][0]["peak_memory_bytes"]
    peak_bpipe = b_est["stages"][0]["peak_memory_bytes"]
    buys: list[str] = []
    costs: list[str] = []
    if bpipe.micro_batch_size != baseline.micro_batch_size:
        change = f"micro-batch {baseline.micro_batch_size} -> {bpipe.micro_batch_size}"
        (buys if bpipe.micro_batch_size > baseline.micro_batch_size else costs).append(change)
    if bpipe.recompute != baseline.recompute:
        change = f"recompute {baseline.recompute} -> {bpipe.recompute}"
        saved = RECOMPUTE_LEVEL[bpipe.recompute] < RECOMPUTE_LEVEL[baseline.recompute]
        (buys if saved else costs).append(change)
    fits = "fits" if same_est["fits"] else "does not fit"
    b_rec, a_rec = measured.get("bpipe"), measured.get("baseline")
    mem_measured = None
    if b_rec is not None and _stage0(b_rec):
        mem_measured = {"bpipe_stage0_peak_bytes": _stage0(b_rec)["peak_memory_bytes"]}  # type: ignore[index]
        if a_rec is not None and _stage0(a_rec):
            mem_measured["baseline_stage0_peak_bytes"] = _stage0(a_rec)["peak_memory_bytes"]  # type: ignore[index]
    rows = [{
        "name": "memory",
        "predicted": {"1f1b_stage0_peak_bytes": peak_1f1b, "bpipe_stage0_peak_bytes": peak_bpipe,
                      "cap_bytes": cap,
                      "1f1b_fits_bpipe_setting": bool(same_est["fits"]), "bpipe_buys": buys,
                      "bpipe_costs": costs},
        "measured": mem_measured,
        "text": f"1F1B at BPipe's setting holds {peak_1f1b / 2**20:,.1f} MiB on stage 0 against a cap of "
                f"{cap / 2**20:,.1f} MiB ({fits}); BPipe holds {peak_bpipe / 2**20:,.1f} MiB"
                + (f" and buys {', '.join(buys)}" if buys else ", and buys nothing the baseline lacks")
                + (f"; its own setting costs {', '.join(costs)}" if costs else ""),
    }]  # fmt: skip
    ratio = per_token_time(baseline, cluster, profile) / per_token_time(bpipe, cluster, profile)
    rows.append({
        "name": "compute",
        "predicted": {"per_token_compute_ratio": ratio},
        "measured": None,
        "text": f"per-token compute {ratio:.3f}x as fast under BPipe's setting ("
                + ("recomputation saved" if "recompute" in " ".join(buys)
                   else "the recomputation it adds" if "recompute" in " ".join(costs) else "MFU gain") + ")",
    })  # fmt: skip
    p, m0, m1 = bpipe.pp, baseline.num_microbatches, bpipe.num_microbatches
    rows.append({
        "name": "bubble",
        "predicted": {"p": p, "m0": m0, "m1": m1, "baseline_bubble": a_est["bubble_fraction"],
                      "bpipe_bubble": b_est["bubble_fraction"]},
        "measured": None,
        "text": f"p = {p}, micro-batches {m0} -> {m1}: predicted bubble {a_est['bubble_fraction']:.1%} -> "
                f"{b_est['bubble_fraction']:.1%}",
    })  # fmt: skip
    evicted = b_est["stages"][0]["evicted_bytes"]
    cross = crosses_nodes(bpipe, cluster)
    exposed = max(b_est.get("exposed_transfer_s") or [0.0])
    evicted_measured = None
    if b_rec is not None and _stage0(b_rec):
        evicted_measured = {"evicted_bytes_per_step": _stage0(b_rec)["evicted_bytes"]}  # type: ignore[index]
    rows.append({
        "name": "transfers",
        "predicted": {"evicted_bytes_per_step": evicted,
                      "pair_link": "across nodes" if cross else "same node",
                      "exposed_transfer_s": exposed, "exposed_fraction": exposed / b_est["step_time_s"]},
        "measured": evicted_measured,
        "text": f"stage 0 evicts {evicted / 2**30:,.3f} GiB per step over a pair link "
                f"{'across nodes' if cross else 'within a node'}; {exposed:.3g} s of transfer left exposed "
                f"({exposed / b_est['step_time_s']:.1%} of the step)",
    })  # fmt: skip
    speed = {"bpipe_tokens_per_s": b_est["tokens_per_s"], "baseline_tokens_per_s": a_est["tokens_per_s"],
             "speedup": b_est["tokens_per_s"] / a_est["tokens_per_s"]}  # fmt: skip
    speed_measured = None
    if b_rec is not None and a_rec is not None and measured.get("speedup") is not None:
        speed_measured = {"bpipe_tokens_per_s": b_rec.tokens_per_s,
                          "baseline_tokens_per_s": a_rec.tokens_per_s,
                          "speedup": measured["speedup"]}  # fmt: skip
    rows.append({
        "name": "throughput",
        "predicted": speed,
        "measured": speed_measured,
        "text": f"predicted {speed['speedup']:.3f}x"
                + (f", measured {speed_measured['speedup']:.3f}x" if speed_measured else ""),
    })  # fmt: skip
    return rows
