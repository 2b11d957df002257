"""Predict a configuration without running it: costs -> schedule replay -> the contract's JSON.

`estimate` replays one configuration with the event simulator (and can keep its timeline);
`estimate_many` screens many at once: configurations that share a schedule are replayed
together by the vectorised fast path. Both give the same numbers (tests check it).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from autotune.config import TrialConfig, model_flops_per_token
from autotune.estimate.clusters import ClusterSpec
from autotune.estimate.costs import stage_costs
from autotune.estimate.fastpath import (
    CompiledSchedule,
    ScheduleKey,
    StageArrays,
    compile_schedule,
    compiled_schedule,
    replay,
)
from autotune.estimate.profiles import Profile
from autotune.estimate.simulate import StageCosts, simulate
from autotune.schedules import Schedule, generate


def schedule_of(cfg: TrialConfig) -> Schedule:
    return _schedule(*_key(cfg))


def _key(cfg: TrialConfig) -> ScheduleKey:
    """What a configuration's schedule is generated from: name, p, m, cap (None: default), V."""
    return cfg.schedule, cfg.pp, cfg.num_microbatches, cfg.bpipe_cap or None, cfg.virtual_stages


@functools.lru_cache(maxsize=1024)
def _schedule(name: str, pp: int, m: int, cap: int | None, virtual_stages: int) -> Schedule:
    return generate(name, pp, m, cap=cap, virtual_stages=virtual_stages)


def memory_cap(cfg: TrialConfig, cluster: ClusterSpec) -> int:
    """The per-device memory a configuration must fit: `--memory-limit`, else the device's."""
    return cfg.memory_limit or cluster.device_memory


def stage_report(schedule: Schedule | CompiledSchedule, costs: Sequence[StageCosts]) -> list[dict[str, Any]]:
    """Per-stage predicted memory, in the fields `autotune trial` measures (per rank: with V
    chunks per rank, `costs` are per virtual stage and a rank's are its chunks' together)."""
    shape = schedule if isinstance(schedule, CompiledSchedule) else compile_schedule(schedule)
    p = shape.num_stages
    out = []
    for s in range(p):
        chunks = costs[s::p]  # entry c * p + s is rank s's chunk c
        partner = shape.partner_of(s)
        sizes = (*(cost.act_bytes for cost in chunks), costs[partner].act_bytes if partner is not None else 0)
        peak = max(sum(n * size for n, size in zip(point, sizes, strict=True)) for point in shape.peaks(s))
        out.append({
            "stage": s,
            "peak_activation_bytes": peak,
            "peak_memory_bytes": peak + sum(cost.static_bytes for cost in chunks),
            "evicted_bytes": shape.evictions_of(s) * chunks[0].act_bytes,
        })  # fmt: skip
    return out


def _result(
    cfg: TrialConfig,
    cluster: ClusterSpec,
    *,
    step: float,
    bubble: float,
    stages: list[dict[str, Any]],
    method: str,
) -> dict[str, Any]:
    tokens_per_s = cfg.tokens_per_step / step
    flops = model_flops_per_token(cfg.model, recompute=cfg.recompute) * tokens_per_s
    peak = cluster.peak_flops
    cap = memory_cap(cfg, cluster)
    return {
        "config": cfg.to_dict(),
        "cluster": cluster.name,
        "step_time_s": step,
        "tokens_per_s": tokens_per_s,
        "mfu": flops / (peak * cfg.world_size) if peak else None,
        "bubble_fraction": bubble,
        "fits": all(st["peak_memory_bytes"] <= cap for st in stages),
        "memory_limit_bytes": cap,
        "stages": stages,
        "method": method,
    }


def estimate(
    cfg: TrialConfig, cluster: ClusterSpec, *, profile: Profile | None = None, record: bool = False
) -> dict[str, Any]:
    """The predicted step time, throughput, MFU, bubble and per-stage memory of `cfg`.

    The numbers come from the compiled replay that screening uses (the schedule compiled once
    and kept on disk), so a 64-stage, 1,000-micro-batch configuration takes seconds. With
    `record`, the event simulator replays it instead and the result also holds the simulated
    timeline (`timeline`: one span per compute action, transfer and wait); both give the same
    numbers (tests check it).
    """
    costs = stage_costs(cfg, cluster, profile=profile)
    compiled = compiled_schedule(*_key(cfg))
    stages = stage_report(compiled, costs)  # the peaks: cached, as for screening
    if record:
        sim = simulate(schedule_of(cfg), costs, record=True)
        step, bubble, exposed = sim.step_time, sim.bubble_fraction, sim.exposed_transfer
    else:
        out = replay(compiled, StageArrays.from_costs([costs], cfg.pp))
        step, bubble, exposed = float(out.step[0]), float(out.bubble[0]), out.exposed[0].tolist()
    result = _result(
        cfg, cluster, step=step, bubble=bubble, stages=stages, method="profile" if profile else "roofline"
    )
    result["exposed_transfer_s"] = exposed
    if record:
        result["timeline"] = [span.to_dict() for span in sim.spans]
    return result


def estimate_many(
    configs: Sequence[TrialConfig], cluster: ClusterSpec, *, profile: Profile | None = None
) -> list[dict[str, Any]]:
    """`estimate` for many configurations (no timelines), batched by schedule."""
    groups: dict[ScheduleKey, list[int]] = defaultdict(list)
    for i, cfg in enumerate(configs):
        groups[_key(cfg)].append(i)
    all_costs = [stage_costs(cfg, cluster, profile=profile) for cfg in configs]
    out: list[dict[str, Any] | None] = [None] * len(configs)
    method = "profile" if profile else "roofline"
    for key, members in groups.items():
        compiled = compiled_schedule(*key)
        arrays = StageArrays.from_costs([all_costs[i] for i in members], key[1])
        replayed = replay(compiled, arrays)
        for row, i in enumerate(members):
            stages = stage_report(compiled, all_costs[i])
            result = _result(
                configs[i], cluster, step=float(replayed.step[row]), bubble=float(replayed.bubble[row]),
                stages=stages, method=method,
            )  # fmt: skip
            result["exposed_transfer_s"] = replayed.exposed[row].tolist()
            out[i] = result
    return [r for r in out if r is not None]


def speedup(baseline: dict[str, Any], other: dict[str, Any]) -> float:
    """How much faster `other` trains than `baseline` (tokens/s ratio)."""
    return float(np.float64(other["tokens_per_s"]) / baseline["tokens_per_s"])
