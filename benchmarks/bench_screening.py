"""Screening speed: configurations per second of `estimate_many` on one core, LLaMA-65B on 64 GPUs.

    python -m benchmarks.bench_screening [--quick] [--cluster a100-80g-8x8] [--reps 5]

The space: tp in {1, 2, 4, 8} x pp in {1, 2, 4, 8, 16} (dp = 64 / (tp x pp)) x micro-batch in
{1, 2, 4, 8} x schedule in {1f1b, gpipe, bpipe} x recompute in {none, selective, full} x flash
on/off, global batch 1024; a combination `TrialConfig` refuses (ConfigError) is skipped. The
process is pinned to one core and numpy's thread pools to one thread (set before numpy loads).

Timed: `estimate_many(configs, cluster)` (roofline costs; no profile for a 65B model here):
the first call with an empty on-disk schedule cache (a fresh temporary folder: every distinct
schedule generated, compiled and stored), a call as a new process would make it (in-memory
caches dropped, compiled schedules read from the disk cache), and then `--reps` warm calls (the
median is the figure against the target; peers measured here: Calculon ~510/s, llm-analysis
~3,300/s, neither schedule-aware). Building the TrialConfigs is timed apart.
Check: for a sample of configurations, `estimate` (the event simulator) gives the same step
time to 1e-9 relative.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported (by autotune.estimate)
import tempfile  # noqa: E402

_CACHE = tempfile.TemporaryDirectory(prefix="autotune-bench-cache-")
os.environ["AUTOTUNE_CACHE_DIR"] = _CACHE.name  # an empty schedule cache for the first call

import argparse  # noqa: E402
import itertools  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from autotune.config import ModelSpec, TrialConfig, load_model  # noqa: E402
from autotune.errors import ConfigError  # noqa: E402
from autotune.estimate import fastpath  # noqa: E402
from autotune.estimate.clusters import ClusterSpec, load_cluster  # noqa: E402
from autotune.estimate.estimator import estimate, estimate_many  # noqa: E402

RATE_TARGET = 5000.0  # configurations per second
PEERS = {"Calculon": 510.0, "llm-analysis": 3300.0}
TP = (1, 2, 4, 8)
PP = (1, 2, 4, 8, 16)
MICRO_BATCH = (1, 2, 4, 8)
SCHEDULES = ("1f1b", "gpipe", "bpipe")
RECOMPUTE = ("none", "selective", "full")
FLASH = (True, False)
REL_TOL = 1e-9


@dataclass(frozen=True)
class Setup:
    model: str
    cluster: str
    global_batch_size: int
    reps: int
    sample: int
    limit: int  # time a seeded random subset of this many configurations (0: all)
    quick: bool


def pin_one_core() -> str:
    """Pin this process to one core (where the OS allows); returns a description."""
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[-1]})
        return f"pinned to core {cores[-1]}"
    return "not pinned (no sched_setaffinity here)"


def space(spec: ModelSpec, cluster: ClusterSpec, global_batch_size: int) -> tuple[list[TrialConfig], int]:
    """The valid configurations of the space and the number of combinations skipped."""
    world = cluster.world_size
    out: list[TrialConfig] = []
    skipped = 0
    for tp, pp, b, schedule, recompute, flash in itertools.product(
        TP, PP, MICRO_BATCH, SCHEDULES, RECOMPUTE, FLASH
    ):
        if world % (tp * pp):
            skipped += 1
            continue
        try:
            out.append(
                TrialConfig(
                    model=spec,
                    tp=tp,
                    pp=pp,
                    dp=world // (tp * pp),
                    micro_batch_size=b,
                    global_batch_size=global_batch_size,
                    schedule=schedule,
                    recompute=recompute,
                    flash_attention=flash,
                    device="cuda",
                )
            )
        except ConfigError:
            skipped += 1
    return out, skipped


def timed(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0


def parse_args(argv: list[str] | None = None) -> Setup:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_screening", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--quick", action="store_true", help="a 100-configuration subset, 1 warm call (a smoke test)"
    )
    p.add_argument("--model", default="llama-65b")
    p.add_argument("--cluster", default="a100-80g-8x8")
    p.add_argument("--global-batch-size", type=int, default=1024)
    p.add_argument("--reps", type=int, default=None, help="warm calls to time (default 5, 1 with --quick)")
    p.add_argument("--sample", type=int, default=20, help="configurations checked against estimate()")
    p.add_argument("--limit", type=int, default=None, help="time a random subset (default all; 100 quick)")
    a = p.parse_args(argv)
    limit = a.limit if a.limit is not None else (100 if a.quick else 0)
    reps = a.reps or (1 if a.quick else 5)
    return Setup(a.model, a.cluster, a.global_batch_size, reps, a.sample, limit, a.quick)


def main(argv: list[str] | None = None) -> int:
    setup = parse_args(argv)
    pinned = pin_one_core()
    spec = load_model(setup.model)
    cluster = load_cluster(setup.cluster)
    t0 = time.perf_counter()
    configs, skipped = space(spec, cluster, setup.global_batch_size)
    build = time.perf_counter() - t0
    total = len(configs)
    print(
        f"{spec.name} on {cluster.name} ({cluster.world_size} devices), global batch "
        f"{setup.global_batch_size}: {total} configurations ({skipped} combinations skipped as invalid); "
        f"one core ({pinned}), numpy 1 thread"
    )
    print(f"building the TrialConfigs: {build * 1e3:.1f} ms ({total / build:,.0f}/s)")
    if setup.limit and setup.limit < total:
        configs = random.Random(1).sample(configs, setup.limit)
        print(f"timing a seeded random subset of {len(configs)} of them (--limit)")
    n = len(configs)

    results: list[dict[str, object]] = []

    def run() -> None:
        results[:] = estimate_many(configs, cluster)

    cold = timed(run)
    fastpath._COMPILED.clear()  # as a new process starts: only the disk cache remains
    from_disk = timed(run)
    warm = [timed(run) for _ in range(setup.reps)]
    med = statistics.median(warm)
    rate = n / med
    print()
    print(f"{'call':<22} {'seconds':>9} {'configs/s':>11}")
    print(f"{'first (empty cache)':<22} {cold:>9.3f} {n / cold:>11,.0f}")
    print(f"{'new process (disk)':<22} {from_disk:>9.3f} {n / from_disk:>11,.0f}")
    for i, t in enumerate(warm):
        print(f"{f'warm {i + 1}':<22} {t:>9.3f} {n / t:>11,.0f}")
    print()
    peers = ", ".join(f"{k} ~{v:,.0f}/s ({rate / v:.1f}x)" for k, v in PEERS.items())
    print(
        f"estimate_many: {rate:,.0f} configurations/s (median of {setup.reps} warm calls; first call "
        f"{n / cold:,.0f}/s, a new process with the disk cache {n / from_disk:,.0f}/s) (target >= "
        f"{RATE_TARGET:,.0f}/s: {'met' if rate >= RATE_TARGET else 'NOT met'}); peers: {peers}"
    )

    rng = random.Random(0)
    sample = rng.sample(range(n), min(setup.sample, n))
    worst = 0.0
    for i in sample:
        sim = float(estimate(configs[i], cluster, record=True)["step_time_s"])  # type: ignore[arg-type]
        fast = float(results[i]["step_time_s"])  # type: ignore[arg-type]
        worst = max(worst, abs(sim - fast) / abs(sim))
    ok = worst <= REL_TOL
    print(
        f"check: {len(sample)} sampled configurations, estimate() (event simulator) vs estimate_many(): "
        f"worst relative difference {worst:.2e} (<= {REL_TOL:g}: {'yes' if ok else 'NO'})"
    )
    fits = sum(1 for r in results if r["fits"])
    best = min((r for r in results if r["fits"]), key=lambda r: r["step_time_s"], default=None)  # type: ignore[arg-type,return-value]
    if best is not None:
        c = best["config"]
        assert isinstance(c, dict)
        print(
            f"{fits} of {n} fit in memory; fastest that fits: tp {c['tp']} pp {c['pp']} dp {c['dp']} "
            f"mbs {c['micro_batch_size']} {c['schedule']} recompute {c['recompute']} flash "
            f"{'on' if c['flash_attention'] else 'off'}: {best['step_time_s']:.2f} s/step"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
