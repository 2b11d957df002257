"""A real run's schedule shape at the command line: `autotune schedule` and `autotune estimate` of a
64-stage, 1,000-micro-batch configuration (a 1T-parameter run's shape), and how fast a refusal is.

Each side is a real `autotune` process, timed wall-clock from start to exit, `--reps` times with
the sides alternated (this machine's speed wanders), medians reported. The baseline, measured in
the same run, is `autotune schedule --pp 1 --num-microbatches 1` (interpreter start-up and
imports: the least any command costs); each figure is printed as seconds and as a ratio to it.
`estimate` runs cold (a fresh schedule cache: the schedule generated and compiled) and warm (the
compiled schedule read back from the on-disk cache, as every later estimate of that shape is).

    python -m benchmarks.bench_limits [--quick] [--reps N] [--pp 64] [--num-microbatches 1000]

Targets (the hardening issue): schedule under 10 s (1F1B and BPipe), estimate under 5 s, an
absurd size refused in well under a second beyond start-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _timed(args: list[str], env: dict[str, str], expect: int = 0) -> float:
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "autotune.cli", *args], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    took = time.perf_counter() - start
    if run.returncode != expect:
        raise SystemExit(f"autotune {' '.join(args)} exited {run.returncode}: {run.stderr.strip()[-500:]}")
    return took


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke test: pp 8, 100 micro-batches, 1 rep")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--pp", type=int, default=64)
    p.add_argument("--num-microbatches", type=int, default=1000)
    a = p.parse_args(argv)
    pp, m, reps = (8, 100, 1) if a.quick else (a.pp, a.num_microbatches, a.reps)
    layers = str(2 * pp)
    shape = ["--pp", str(pp), "--num-microbatches", str(m)]
    model = ["--model", "llama-65b", "--num-layers", layers, "--cluster", "a100-80g-8x16", "--tp", "2"]
    sides = {
        "baseline (start-up)": (["schedule", "--pp", "1", "--num-microbatches", "1"], False, 0),
        "schedule 1f1b": (["schedule", *shape], False, 0),
        "schedule bpipe": (["schedule", "--schedule", "bpipe", *shape], False, 0),
        "estimate 1f1b cold": (["estimate", *model, *shape], True, 0),
        "estimate 1f1b warm": (["estimate", *model, *shape], False, 0),
        "estimate bpipe cold": (["estimate", *model, *shape, "--schedule", "bpipe"], True, 0),
        "estimate bpipe warm": (["estimate", *model, *shape, "--schedule", "bpipe"], False, 0),
        "refusal (10^9 micro-batches)": (["estimate", *model, "--pp", str(pp), "--num-microbatches",
                                          "1000000000"], False, 2),
    }  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in sides}
    with tempfile.TemporaryDirectory(prefix="bench-limits-") as tmp:
        for rep in range(reps):
            order = list(sides) if rep % 2 == 0 else list(reversed(sides))
            for name in order:
                args, cold, expect = sides[name]
                label = name.split(" (")[0].replace(" ", "-")
                cache = Path(tmp) / (f"cold{rep}-{label}" if cold else f"warm-{label}")
                env = {**os.environ, "AUTOTUNE_CACHE_DIR": str(cache)}
                if not cold and name.startswith("estimate") and not cache.exists():
                    _timed(args, env)  # fills the warm cache once
                times[name].append(_timed(args, env, expect))
    base = statistics.median(times["baseline (start-up)"])
    print(f"pp {pp}, {m} micro-batches ({pp * m:,} cells), {reps} rep(s), median wall time per command")
    print(f"{'command':<30} {'median s':>9} {'min s':>7} {'max s':>7} {'/ baseline':>11}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:<30} {med:>9.2f} {min(values):>7.2f} {max(values):>7.2f} {med / base:>11.2f}")
    worst_schedule = max(statistics.median(times[k]) for k in ("schedule 1f1b", "schedule bpipe"))
    worst_estimate = max(statistics.median(times[k]) for k in times if k.startswith("estimate"))
    met = {True: "met", False: "NOT met"}
    print(f"schedule: slowest {worst_schedule:.2f} s (target < 10 s: {met[worst_schedule < 10]})")
    print(f"estimate: slowest {worst_estimate:.2f} s (target < 5 s: {met[worst_estimate < 5]})")
    refusal = statistics.median(times["refusal (10^9 micro-batches)"]) - base
    print(f"refusal: {refusal:+.2f} s beyond start-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
