"""The re-evaluation's cases, predicted: GPT-3-style and LLaMA-65B on 64 A100-80GB GPUs.

tp 8, pp 8, dp 1, global batch 1024 sequences of 2048 tokens, with and without flash
attention. For each: the first stage's peak memory under 1F1B and under BPipe at each
micro-batch size and recomputation mode, what fits in 80 GiB, the best of each schedule, and
the predicted BPipe speedup by our simulator and by the paper's MFU-based method.

    python -m benchmarks.paper_cases [--cluster a100-80g-8x8] [--profile PATH]
"""

from __future__ import annotations

import argparse
import dataclasses

from autotune.config import TrialConfig, load_model
from autotune.estimate.clusters import load_cluster
from autotune.estimate.estimator import estimate
from autotune.estimate.paper import paper_estimate

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.paper_cases", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--cluster", default="a100-80g-8x8")
    parser.add_argument("--models", default="gpt3-65b,llama-65b")
    args = parser.parse_args()
    cluster = load_cluster(args.cluster)
    memory = cluster.device_memory / GIB
    print(f"{cluster.name}: {cluster.world_size} x {cluster.device}, {memory:.0f} GiB each;")
    print("tp 8, pp 8, dp 1, global batch 1024 x 2048 tokens; roofline costs\n")
    for name in args.models.split(","):
        for flash in (False, True):
            report(name, flash, cluster)


def report(name: str, flash: bool, cluster) -> None:  # type: ignore[no-untyped-def]
    base = TrialConfig(
        model=load_model(name), tp=8, pp=8, dp=1, global_batch_size=1024, flash_attention=flash
    )
    print(f"== {name}, flash attention {'on' if flash else 'off'}")
    print(
        f"{'schedule':<8} {'mbs':>3} {'recompute':<9} {'stage0 GiB':>10} {'fits':>4} {'step s':>8} {'MFU':>6}"
    )
    fitting: dict[str, list[tuple[float, TrialConfig]]] = {"1f1b": [], "bpipe": []}
    for schedule in ("1f1b", "bpipe"):
        for b in (1, 2, 4, 8):
            for recompute in ("none", "full"):
                cfg = dataclasses.replace(
                    base,
                    schedule=schedule,
                    micro_batch_size=b,
                    num_microbatches=1024 // b,
                    recompute=recompute,
                )
                r = estimate(cfg, cluster)
                stage0 = r["stages"][0]["peak_memory_bytes"] / GIB
                fits = "yes" if r["fits"] else "no"
                print(f"{schedule:<8} {b:>3} {recompute:<9} {stage0:>10.1f} {fits:>4} ", end="")
                print(f"{r['step_time_s']:>8.1f} {r['mfu']:>6.1%}")
                if r["fits"]:
                    fitting[schedule].append((r["tokens_per_s"], cfg))
    largest = {sched: max((c.micro_batch_size for _, c in fitting[sched] if c.recompute == "none"), default=0)
               for sched in ("1f1b", "bpipe")}  # fmt: skip
    print(f"without recomputation 1F1B fits micro-batch <= {largest['1f1b']}, BPipe <= {largest['bpipe']}")
    if largest["bpipe"] > largest["1f1b"] > 0:
        bpipe = dataclasses.replace(base, schedule="bpipe", micro_batch_size=largest["bpipe"],
                                    num_microbatches=1024 // largest["bpipe"])  # fmt: skip
        paper = paper_estimate(bpipe, cluster)
        b0 = paper["baseline"]["micro_batch_size"]
        print(f"BPipe mbs {largest['bpipe']} vs 1F1B mbs {b0}: predicted speedup ", end="")
        print(f"{paper['ours']['predicted_speedup']:.3f}x (ours), {paper['paper']['predicted_speedup']:.3f}x "
              f"(paper's method: MFU ratio {paper['paper']['mfu_ratio']:.3f} x bubble ratio "
              f"{paper['paper']['bubble_ratio']:.3f})")  # fmt: skip
    (t0, c0), (t1, c1) = (max(fitting[s], key=lambda x: x[0]) for s in ("1f1b", "bpipe"))
    print(f"fastest that fits: 1F1B mbs {c0.micro_batch_size} recompute {c0.recompute}; BPipe mbs "
          f"{c1.micro_batch_size} recompute {c1.recompute}; BPipe/1F1B: {t1 / t0:.3f}x")  # fmt: skip
    print()


if __name__ == "__main__":
    main()
