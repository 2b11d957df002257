"""Predicted against measured step time on this CPU: the estimator with a fresh profile vs real trials.

    python -m benchmarks.bench_estimate_accuracy [--quick] [--hidden-size 128 --num-layers 4 --seq-len 64 ...]

The two sides are measured in alternation, `--reps` rounds of: a fresh profile, then one run of
every configuration. A shared machine has slow and fast spells lasting seconds to minutes; a
profile taken once, minutes before the trials, would carry its spell into every prediction.

Each round's profile (`trial_runners.profile.run_profile`: the model's parts (layer, embed,
head) at micro-batch sizes 1, 2, 4, 8, flash attention on, recompute none and full, at every
thread count t the launcher gives ranks here, in cores // t processes side by side as a trial's
ranks run (each figure the slowest process's mean), the optimizer step, and gloo point-to-point
bandwidth, handoff latency and the executor's post time) goes through `save_profile` /
`load_profile` as a file would, and predicts each configuration (world size <= 2: pp 1 and 2,
micro-batch 1-8, 1f1b/gpipe (bpipe needs pp >= 3), recompute none/full, one global batch for all,
so their step times compare) with
`estimate(cfg, load_cluster("cpu-local", comm=profile.comm), profile=profile)`. Then one
`run_job` per world size runs all its configurations once on the same ranks (in forward order in
even rounds, reversed in odd ones), and `summarize` gives each run's step time (median of its
measured steps, slowest rank). A configuration's predicted and measured times are the medians
over the rounds.

`--dump PATH` writes every round's predictions and measurements (JSON) for a closer look.

Printed: per configuration the predicted and measured ms and the error; the predicted time's
parts (the simulated pipeline of forwards, backwards and transfers, and the `tail`, the
optimizer step); the mean absolute error (target <= 10 %), each round's, and whether the
configuration measured fastest is also predicted fastest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from autotune.config import ModelSpec, TrialConfig, load_model, model_flops_per_token
from autotune.estimate.clusters import load_cluster
from autotune.estimate.costs import stage_costs
from autotune.estimate.estimator import estimate
from autotune.estimate.profiles import Profile, load_profile, save_profile
from benchmarks.stats import spearman
from trial_runners.launch import run_job, summarize
from trial_runners.profile import run_profile

MAE_TARGET = 10.0  # percent
MICRO_BATCH_SIZES = (1, 2, 4, 8)
RECOMPUTE = ("none", "full")

# (pp, micro-batch size, schedule, recompute): 1F1B and GPipe (BPipe needs pp >= 3, more ranks than
# this machine's 2 cores), pp 1 and 2, micro-batch 1-8.
FULL_SET = (
    (1, 1, "1f1b", "none"),
    (1, 2, "1f1b", "none"),
    (1, 4, "1f1b", "none"),
    (1, 8, "1f1b", "none"),
    (1, 2, "gpipe", "full"),
    (1, 8, "1f1b", "full"),
    (2, 1, "1f1b", "none"),
    (2, 2, "1f1b", "none"),
    (2, 4, "1f1b", "none"),
    (2, 8, "1f1b", "none"),
    (2, 2, "gpipe", "none"),
    (2, 8, "gpipe", "none"),
    (2, 4, "gpipe", "full"),
    (2, 1, "gpipe", "none"),
    (2, 4, "gpipe", "none"),
    (2, 8, "1f1b", "full"),
    (2, 1, "1f1b", "full"),
    (2, 4, "1f1b", "full"),
)
QUICK_SET = (
    (1, 1, "1f1b", "none"),
    (1, 4, "1f1b", "none"),
    (1, 8, "1f1b", "none"),
    (1, 2, "gpipe", "full"),
    (1, 8, "1f1b", "full"),
    (2, 1, "1f1b", "none"),
    (2, 4, "1f1b", "none"),
    (2, 8, "1f1b", "none"),
    (2, 2, "gpipe", "none"),
    (2, 4, "gpipe", "full"),
    (2, 1, "gpipe", "none"),
    (2, 8, "1f1b", "full"),
)


@dataclass(frozen=True)
class Setup:
    model: str
    hidden_size: int
    num_layers: int
    seq_len: int
    ffn_hidden_size: int
    global_batch_size: int
    quick: bool
    reps: int  # runs per configuration (alternating order)
    steps: int  # measured steps per run (after one warm-up step)
    profile_repeats: int
    profile_passes: int
    keep_profile: str | None
    dump: str | None = None


@dataclass
class Row:
    cfg: TrialConfig
    pipeline: float = 0.0  # predicted step time without the tail (latest round)
    tail: float = 0.0  # the modelled optimizer step, slowest stage's (latest round)
    stage_fb: list[float] = field(default_factory=list)  # predicted fwd+bwd per micro-batch, per stage
    predictions: list[float] = field(default_factory=list)  # predicted step time, each round
    runs: list[float] = field(default_factory=list)  # measured step time, each round

    @property
    def predicted(self) -> float:
        return statistics.median(self.predictions)

    @property
    def measured(self) -> float:
        return statistics.median(self.runs)

    @property
    def error(self) -> float:
        return (self.predicted - self.measured) / self.measured * 100.0

    def label(self) -> str:
        c = self.cfg
        return f"pp{c.pp} mbs{c.micro_batch_size} x{c.num_microbatches} {c.schedule} {c.recompute}"


def spec_of(setup: Setup) -> ModelSpec:
    return load_model(
        setup.model,
        hidden_size=setup.hidden_size,
        num_layers=setup.num_layers,
        seq_len=setup.seq_len,
        ffn_hidden_size=setup.ffn_hidden_size,
    )


def make_profile(setup: Setup, spec: ModelSpec) -> Profile:
    """Profile on this CPU, write it with save_profile and read it back with load_profile."""
    data = run_profile(
        spec,
        micro_batch_sizes=list(MICRO_BATCH_SIZES),
        flash=[True],
        recompute=list(RECOMPUTE),
        warmup=2,
        repeats=setup.profile_repeats,
        rounds=setup.profile_passes,
    )
    if setup.keep_profile:
        path = save_profile(data, setup.keep_profile)
        return load_profile(path, model=spec, device="cpu")
    with tempfile.TemporaryDirectory(prefix="autotune-bench-profile-") as tmp:
        path = save_profile(data, Path(tmp) / "profile.json")
        return load_profile(path, model=spec, device="cpu")


def predict(row: Row, profile: Profile) -> None:
    cluster = load_cluster("cpu-local", comm=profile.comm)
    result = estimate(row.cfg, cluster, profile=profile)
    costs = stage_costs(row.cfg, cluster, profile=profile)
    tails = [c.tail for c in costs]
    step = float(result["step_time_s"])
    row.predictions.append(step)
    row.pipeline, row.tail, row.stage_fb = step - max(tails), max(tails), [c.fwd + c.bwd for c in costs]


def measure(setup: Setup, rows: list[Row], world_size: int, round_index: int) -> None:
    """One run of every configuration of one world size, in one job (reversed in odd rounds)."""
    mine = [r for r in rows if r.cfg.world_size == world_size]
    order = mine if round_index % 2 == 0 else mine[::-1]
    runs = [{"config": r.cfg.to_dict(), "steps": setup.steps, "seed": 0} for r in order]
    outcome = run_job(runs, world_size=world_size, timeout=1800.0)
    if outcome.status != "ok":
        raise RuntimeError(
            f"world size {world_size}: run {outcome.failed_run} ended {outcome.status}: {outcome.error}"
        )
    for row, ranks in zip(order, outcome.results, strict=True):
        summary = summarize(
            row.cfg,
            ranks,
            flops_per_token=model_flops_per_token(row.cfg.model, recompute=row.cfg.recompute),
            peak_flops=None,
        )
        assert summary.step_time_s is not None  # an ok run's result is measured
        row.runs.append(summary.step_time_s)


def report(setup: Setup, spec: ModelSpec, profile: Profile, rows: list[Row]) -> None:
    cores = os.cpu_count() or 1
    comm = profile.comm
    print(
        f"model {spec.name} hidden {spec.hidden_size} layers {spec.num_layers} seq {spec.seq_len} ffn "
        f"{spec.ffn_hidden_size} vocab {spec.vocab_size}; global batch {setup.global_batch_size}; flash on; "
        f"{cores} cores, threads per rank = {cores} // world size"
    )
    if comm is not None:
        print(
            f"profile: {len(profile.entries)} entries, threads {profile.thread_counts}; gloo p2p handoff "
            f"latency {comm.p2p_latency * 1e6:.1f} us, post {(comm.p2p_post or 0.0) * 1e6:.1f} us, "
            f"bandwidth {comm.p2p_bandwidth / 1e9:.2f} GB/s (the latest round's)"
        )
    print(
        f"{setup.reps} rounds of (profile, then one run of every configuration, order alternating), "
        f"{setup.steps} measured steps per run after one warm-up; a run's time is summarize's "
        "step_time_s; predicted and measured are the medians over the rounds"
    )
    print()
    head = (
        f"{'configuration':<28} {'pred ms':>8} {'meas ms':>8} {'err %':>7} {'spread ms':>13} "
        f"{'pipe ms':>8} {'tail ms':>8} {'stage fwd+bwd per mb (ms)':>26}"
    )
    print(head)
    for r in rows:
        spread = f"{min(r.runs) * 1e3:.1f}-{max(r.runs) * 1e3:.1f}"
        fb = " ".join(f"{x * 1e3:.2f}" for x in r.stage_fb)
        print(
            f"{r.label():<28} {r.predicted * 1e3:>8.1f} {r.measured * 1e3:>8.1f} {r.error:>+7.1f} "
            f"{spread:>13} {r.pipeline * 1e3:>8.1f} {r.tail * 1e3:>8.2f} {fb:>26}"
        )
    print()
    mae = statistics.fmean(abs(r.error) for r in rows)
    bias = statistics.fmean(r.error for r in rows)
    per_round = [
        statistics.fmean(abs(r.predictions[i] - r.runs[i]) / r.runs[i] * 100.0 for r in rows)
        for i in range(len(rows[0].runs))
    ]
    print("each round on its own: mean abs error " + ", ".join(f"{e:.1f} %" for e in per_round))
    for w in sorted({r.cfg.world_size for r in rows}):
        sub = [r for r in rows if r.cfg.world_size == w]
        print(
            f"world size {w}: {len(sub)} configurations, mean abs error "
            f"{statistics.fmean(abs(r.error) for r in sub):.1f} %, "
            f"mean signed error {statistics.fmean(r.error for r in sub):+.1f} %"
        )
    fastest_meas = min(rows, key=lambda r: r.measured)
    fastest_pred = min(rows, key=lambda r: r.predicted)
    same = fastest_meas is fastest_pred
    print(
        f"mean absolute error {mae:.1f} % (signed {bias:+.1f} %) over {len(rows)} configurations "
        f"(target <= {MAE_TARGET:g} %: {'met' if mae <= MAE_TARGET else 'NOT met'})"
    )
    print(
        f"measured fastest: {fastest_meas.label()} ({fastest_meas.measured * 1e3:.1f} ms); "
        f"predicted fastest: {fastest_pred.label()} (measured {fastest_pred.measured * 1e3:.1f} ms); same: "
        f"{'yes (target met)' if same else 'NO (target not met)'}"
    )
    rho = spearman([r.predicted for r in rows], [r.measured for r in rows])
    print(f"rank correlation (Spearman) of predicted and measured: {rho:.3f}")


def parse_args(argv: list[str] | None = None) -> Setup:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_estimate_accuracy", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--quick", action="store_true", help="12 configurations, fewer runs (a smoke test, < 90 s)"
    )
    p.add_argument("--model", default="tiny-gpt")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--ffn-hidden-size", type=int, default=512)
    p.add_argument(
        "--global-batch-size", type=int, default=16, help="sequences per step, every configuration"
    )
    p.add_argument(
        "--reps", type=int, default=None, help="rounds of profile + runs (default 8, 2 with --quick)"
    )
    p.add_argument("--steps", type=int, default=None, help="measured steps per run (default 5, 3 quick)")
    p.add_argument(
        "--profile-repeats", type=int, default=None, help="profile repetitions per round (default 8, 4)"
    )
    p.add_argument(
        "--profile-passes", type=int, default=None, help="passes the repetitions are spread over (default 2)"
    )
    p.add_argument("--keep-profile", default=None, help="also write the profile to this path")
    p.add_argument("--dump", default=None, help="write each round's predictions and measurements (JSON)")
    a = p.parse_args(argv)
    if a.dump and not Path(a.dump).parent.is_dir():
        p.error(f"--dump: the folder of {a.dump} does not exist")  # before minutes of measuring
    return Setup(
        model=a.model,
        hidden_size=a.hidden_size,
        num_layers=a.num_layers,
        seq_len=a.seq_len,
        ffn_hidden_size=a.ffn_hidden_size,
        global_batch_size=a.global_batch_size,
        quick=a.quick,
        reps=a.reps or (2 if a.quick else 8),
        steps=a.steps or (3 if a.quick else 5),
        profile_repeats=a.profile_repeats or (4 if a.quick else 8),
        profile_passes=a.profile_passes or 2,
        keep_profile=a.keep_profile,
        dump=a.dump,
    )


def main(argv: list[str] | None = None) -> int:
    setup = parse_args(argv)
    spec = spec_of(setup)
    cases = QUICK_SET if setup.quick else FULL_SET
    cfgs = [
        TrialConfig(
            model=spec,
            pp=pp,
            micro_batch_size=b,
            global_batch_size=setup.global_batch_size,
            schedule=schedule,
            recompute=recompute,
            flash_attention=True,
        )
        for pp, b, schedule, recompute in cases
    ]
    rows = [Row(cfg) for cfg in cfgs]
    for r in range(setup.reps):
        profile = make_profile(setup, spec)
        for row in rows:
            predict(row, profile)
        for w in sorted({cfg.world_size for cfg in cfgs}):
            measure(setup, rows, w, r)
        print(f"round {r + 1} of {setup.reps} done", file=sys.stderr)
    report(setup, spec, profile, rows)
    if setup.dump:
        Path(setup.dump).write_text(json.dumps({
            "rows": [
                {"config": row.label(), "predicted": row.predictions, "measured": row.runs} for row in rows
            ],
        }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
