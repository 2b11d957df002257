"""BPipe against 1F1B at the same micro-batch size: step time and stage 0's activation peak.

    python -m benchmarks.bench_bpipe [--quick] [--pp 4 3] [--hidden-size 128 --num-layers 12 --seq-len 64 ...]

For each pipeline depth, one job of `trial_runners.launch.run_job` (what `run_trial` runs for
one configuration) runs the two schedules alternately on the same ranks: 1f1b, bpipe, bpipe,
1f1b, ... Each run is a `TrialConfig` built and summarised exactly as `run_trial` does (one
warm-up step, then measured steps including the AdamW step; a step is the slowest rank's time).
Step-time ratios are medians over all measured steps of each schedule; the activation peak is
the exact saved-tensor count of stage 0 (`peak_activation_bytes`), which does not vary between
runs. BPipe only evicts when a stage holds more than its cap (default ceil((pp+1)/2)), which
1F1B's stage 0 does for pp >= 3.

This machine may have fewer cores than ranks: the ranks (one thread each) then time-share the
cores, so a transfer that would overlap compute on real hardware competes with it for a core.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass

from autotune.config import TrialConfig, load_model, model_flops_per_token
from trial_runners.launch import run_job, summarize

SCHEDULES = ("1f1b", "bpipe")
TIME_TARGET = 1.05  # bpipe / 1f1b step time


@dataclass(frozen=True)
class Setup:
    pps: tuple[int, ...]
    model: str
    hidden_size: int
    num_layers: int
    seq_len: int
    micro_batch_size: int
    num_microbatches: int
    reps: int
    steps: int  # measured steps per run (after one warm-up step)


@dataclass
class Row:
    pp: int
    schedule: str
    cap: int
    step_times: list[float]
    peak0: int  # stage 0's peak_activation_bytes
    evicted0: int  # bytes stage 0 evicts per step
    first_loss: float


def configs(setup: Setup, pp: int) -> dict[str, TrialConfig]:
    spec = load_model(
        setup.model, hidden_size=setup.hidden_size, num_layers=setup.num_layers, seq_len=setup.seq_len
    )
    return {
        name: TrialConfig(
            model=spec,
            pp=pp,
            micro_batch_size=setup.micro_batch_size,
            num_microbatches=setup.num_microbatches,
            schedule=name,
        )
        for name in SCHEDULES
    }


def measure(setup: Setup, pp: int) -> dict[str, Row]:
    """Run both schedules alternately in one job on pp ranks; pool each schedule's steps."""
    cfgs = configs(setup, pp)
    order = [SCHEDULES[(rep + i) % 2] for rep in range(setup.reps) for i in range(2)]  # 1f1b bpipe bpipe 1f1b
    runs = [{"config": cfgs[name].to_dict(), "steps": setup.steps, "seed": 0} for name in order]
    outcome = run_job(runs, world_size=pp, timeout=900.0)
    if outcome.status != "ok":
        raise RuntimeError(f"pp={pp}: run {outcome.failed_run} ended {outcome.status}: {outcome.error}")
    rows: dict[str, Row] = {}
    for name, ranks in zip(order, outcome.results, strict=True):
        cfg = cfgs[name]
        summary = summarize(
            cfg, ranks, flops_per_token=model_flops_per_token(cfg.model, recompute="none"), peak_flops=None
        )
        per_step = [max(r["step_times"][i] for r in ranks) for i in range(len(ranks[0]["step_times"]))]
        stage0 = summary.stages[0]
        row = rows.setdefault(
            name,
            Row(
                pp,
                name,
                cfg.bpipe_cap,
                [],
                stage0.peak_activation_bytes,
                stage0.evicted_bytes,
                summary.losses[0],
            ),
        )
        row.step_times.extend(per_step[1:])  # step 0 is the warm-up
    return rows


def report(setup: Setup, results: dict[int, dict[str, Row]]) -> None:
    s = setup
    cores = os.cpu_count() or 1
    print(
        f"model {s.model} hidden {s.hidden_size} layers {s.num_layers} seq {s.seq_len}; micro-batch "
        f"{s.micro_batch_size} x {s.num_microbatches}; gloo, 1 thread per rank; {s.reps} runs of {s.steps} "
        f"measured steps per schedule, alternating"
    )
    print()
    print(
        f"{'pp':>3} {'schedule':<8} {'cap':>4} {'median ms':>10} {'min ms':>8} {'steps':>6} "
        f"{'stage0 peak act':>16} {'stage0 evicted':>15} {'first loss':>11}"
    )
    for pp, rows in results.items():
        for name in SCHEDULES:
            r = rows[name]
            print(
                f"{pp:>3} {name:<8} {r.cap or '-':>4} {statistics.median(r.step_times) * 1e3:>10.1f} "
                f"{min(r.step_times) * 1e3:>8.1f} {len(r.step_times):>6} {r.peak0 / 2**20:>12.2f} MiB "
                f"{r.evicted0 / 2**20:>11.2f} MiB {r.first_loss:>11.6f}"
            )
    print()
    for pp, rows in results.items():
        one, bp = rows["1f1b"], rows["bpipe"]
        t = statistics.median(bp.step_times) / statistics.median(one.step_times)
        mem = bp.peak0 / one.peak0
        shared = f"; {pp} ranks share {cores} cores, so compute is time-sliced and timings are indicative"
        print(
            f"pp={pp}: bpipe/1f1b step time {t:.3f} (target <= {TIME_TARGET}: "
            f"{'met' if t <= TIME_TARGET else 'NOT met'}), stage-0 peak activations {mem:.3f}, "
            f"same first loss: {'yes' if bp.first_loss == one.first_loss else 'NO'}"
            f"{shared if pp > cores else ''}"
        )


def parse_args(argv: list[str] | None = None) -> Setup:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_bpipe", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer runs and steps (a smoke test, < 1 min)")
    p.add_argument("--pp", type=int, nargs="+", default=[4, 3], help="pipeline depths (default 4 3)")
    p.add_argument("--model", default="tiny-gpt")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--num-microbatches", type=int, default=8)
    p.add_argument("--reps", type=int, default=None, help="runs per schedule (default 6, 1 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per run (default 5, 2 quick)")
    a = p.parse_args(argv)
    return Setup(
        pps=tuple(a.pp),
        model=a.model,
        hidden_size=a.hidden_size,
        num_layers=a.num_layers,
        seq_len=a.seq_len,
        micro_batch_size=a.micro_batch_size,
        num_microbatches=a.num_microbatches,
        reps=a.reps or (1 if a.quick else 6),
        steps=a.steps or (2 if a.quick else 5),
    )


def main(argv: list[str] | None = None) -> int:
    setup = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the ranks (launch's own default)
    results = {pp: measure(setup, pp) for pp in setup.pps}
    report(setup, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
