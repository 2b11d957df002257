"""The seed paper's estimate of BPipe's payoff (Huang et al., arXiv 2401.02088), beside ours.

Their method, as reconstructed in paper-notes.md: BPipe's freed memory buys a larger
micro-batch b1 than the b0 that 1F1B fits. At a fixed global batch that means fewer
micro-batches (m = G / (b * dp)), so a larger bubble, against a higher MFU at the larger size.
With a 1F1B step time of (m + p - 1) * t(b):

    speedup = [MFU(b1) / MFU(b0)] * [m1 / (m1 + p - 1)] / [m0 / (m0 + p - 1)]

It ignores BPipe's transfers and the rest of the step; ours replays both schedules.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from autotune.config import TrialConfig
from autotune.errors import ConfigError
from autotune.estimate.clusters import ClusterSpec
from autotune.estimate.costs import stage_costs
from autotune.estimate.estimator import estimate, memory_cap
from autotune.estimate.profiles import Profile


def per_token_time(cfg: TrialConfig, cluster: ClusterSpec, profile: Profile | None) -> float:
    """A middle stage's compute time per micro-batch token (forward + backward): 1 / MFU up to a
    constant."""
    costs = stage_costs(cfg, cluster, profile=profile)
    mid = costs[len(costs) // 2]
    return (mid.fwd + mid.bwd) / cfg.micro_batch_size


def baseline_micro_batch(
    cfg: TrialConfig, cluster: ClusterSpec, profile: Profile | None
) -> tuple[TrialConfig, dict[str, Any]] | None:
    """The 1F1B configuration with the largest micro-batch <= cfg's that fits the memory, and
    its estimate."""
    per_replica = cfg.global_batch_size // cfg.dp
    for b in range(cfg.micro_batch_size, 0, -1):
        if per_replica % b or per_replica // b < cfg.pp:
            continue
        num = per_replica // b
        base = dataclasses.replace(
            cfg, schedule="1f1b", micro_batch_size=b, num_microbatches=num, bpipe_cap=0
        )
        result = estimate(base, cluster, profile=profile)
        if result["fits"]:
            return base, result
    return None


def paper_estimate(
    cfg: TrialConfig,
    cluster: ClusterSpec,
    *,
    profile: Profile | None = None,
    estimated: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Both estimates of `cfg` (a BPipe configuration) against the best-fitting 1F1B one;
    `estimated` is `estimate(cfg, ...)` where the caller already has it."""
    if cfg.schedule != "bpipe":
        raise ConfigError("--method", "paper compares a BPipe configuration with 1F1B: give --schedule bpipe")
    found = baseline_micro_batch(cfg, cluster, profile)
    if found is None:
        cap = memory_cap(cfg, cluster)
        return {
            "baseline": None,
            "reason": f"no 1F1B micro-batch size fits {cap / 2**20:,.1f} MiB per device at recompute "
            f"{cfg.recompute} (the method compares micro-batch sizes, not recomputation)",
        }
    base, ours_base = found
    ours = estimated or estimate(cfg, cluster, profile=profile)
    p = cfg.pp
    m0, m1 = base.num_microbatches, cfg.num_microbatches
    mfu_ratio = per_token_time(base, cluster, profile) / per_token_time(cfg, cluster, profile)
    bubble_ratio = (m1 / (m1 + p - 1)) / (m0 / (m0 + p - 1))
    return {
        "baseline": base.to_dict(),
        "paper": {
            "mfu_ratio": mfu_ratio,
            "bubble_ratio": bubble_ratio,
            "predicted_speedup": mfu_ratio * bubble_ratio,
        },
        "ours": {"predicted_speedup": ours["tokens_per_s"] / ours_base["tokens_per_s"], "fits": ours["fits"]},
    }
