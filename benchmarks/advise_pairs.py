"""Measure `bench_advise`'s table of BPipe-vs-baseline pairs on this machine (`--remeasure`).

Each pair is a BPipe configuration and a baseline at the same layout, on a model small enough
to train here: explicit attention, where BPipe's freed memory lets it drop the recomputation
1F1B needs under a cap, and flash attention, where 1F1B already fits BPipe's setting and BPipe
only adds transfers; GPT and LLaMA blocks; pp 3 and 4; a micro-batch and a selective-recompute
variant. Per model a CPU profile is measured first (as `autotune tune` does), and the estimator
predicts both sides from it; then `reps` rounds run one real trial of each side, in alternating
order, so a slow spell of the machine touches both.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from autotune.config import ModelSpec, TrialConfig, load_model
from autotune.estimate.clusters import load_cluster
from autotune.estimate.estimator import estimate
from autotune.estimate.paper import per_token_time
from autotune.estimate.profiles import parse_profile

# name: (family preset, hidden, seq, pp, bpipe (mbs, recompute), baseline (schedule, mbs, recompute), flash)
PAIRS: dict[str, tuple[str, int, int, int, tuple[int, str], tuple[str, int, str], bool]] = {
    "gpt h512 s512 explicit vs full": ("tiny-gpt", 512, 512, 3, (1, "none"), ("1f1b", 1, "full"), False),
    "gpt h256 s512 explicit vs full": ("tiny-gpt", 256, 512, 3, (1, "none"), ("1f1b", 1, "full"), False),
    "gpt h512 s256 explicit vs full": ("tiny-gpt", 512, 256, 3, (1, "none"), ("1f1b", 1, "full"), False),
    "gpt h512 s512 flash vs 1f1b": ("tiny-gpt", 512, 512, 3, (1, "none"), ("1f1b", 1, "none"), True),
    "gpt h256 s512 flash vs 1f1b": ("tiny-gpt", 256, 512, 3, (1, "none"), ("1f1b", 1, "none"), True),
    "gpt h512 s256 flash vs 1f1b": ("tiny-gpt", 512, 256, 3, (1, "none"), ("1f1b", 1, "none"), True),
    "llama h512 s512 explicit vs full": ("tiny-llama", 512, 512, 3, (1, "none"), ("1f1b", 1, "full"), False),
    "llama h512 s512 flash vs 1f1b": ("tiny-llama", 512, 512, 3, (1, "none"), ("1f1b", 1, "none"), True),
    "gpt h512 s256 pp4 explicit vs full": ("tiny-gpt", 512, 256, 4, (1, "none"), ("1f1b", 1, "full"), False),
    "gpt h512 s256 pp4 flash vs 1f1b": ("tiny-gpt", 512, 256, 4, (1, "none"), ("1f1b", 1, "none"), True),
    "gpt h256 s256 mbs2 vs mbs1": ("tiny-gpt", 256, 256, 3, (2, "none"), ("1f1b", 1, "none"), True),
    "gpt h512 s512 explicit vs selective": (
        "tiny-gpt",
        512,
        512,
        3,
        (1, "none"),
        ("1f1b", 1, "selective"),
        False,
    ),
    "gpt h512 s512 explicit vs gpipe full": (
        "tiny-gpt",
        512,
        512,
        3,
        (1, "none"),
        ("gpipe", 1, "full"),
        False,
    ),
}
QUICK = ("gpt h256 s512 explicit vs full", "gpt h256 s512 flash vs 1f1b")
GLOBAL_BATCH = 12  # sequences per step: 12 micro-batches at micro-batch 1, 6 at 2


def _model(preset: str, hidden: int, seq: int, layers: int) -> ModelSpec:
    base = load_model(preset, hidden_size=hidden, seq_len=seq, num_layers=layers, ffn_hidden_size=4 * hidden,
                      num_heads=8, vocab_size=512)  # fmt: skip
    return dataclasses.replace(base, name=f"{preset}-h{hidden}-s{seq}-l{layers}")


def _pair_configs(spec: tuple[Any, ...]) -> tuple[TrialConfig, TrialConfig]:
    preset, hidden, seq, pp, (b_mbs, b_rec), (a_sched, a_mbs, a_rec), flash = spec
    model = _model(preset, hidden, seq, pp)

    def cfg(schedule: str, mbs: int, recompute: str) -> TrialConfig:
        return TrialConfig(model=model, pp=pp, micro_batch_size=mbs, global_batch_size=GLOBAL_BATCH,
                           schedule=schedule, recompute=recompute, flash_attention=flash)  # fmt: skip

    return cfg("bpipe", b_mbs, b_rec), cfg(a_sched, a_mbs, a_rec)


def measure(
    *,
    reps: int,
    quick: bool = False,
    save: Callable[[dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Profile, predict and measure every pair (`quick`: two of them); the table as JSON data.

    `save` is called with the table so far after the predictions and after each round, so a
    run that is stopped keeps its finished rounds; `resume` (such a table) skips the profiling
    and runs only the rounds it lacks.
    """
    from trial_runners.fingerprint import hardware_fingerprint
    from trial_runners.profile import run_profile
    from trial_runners.trial import run_trial

    names = QUICK if quick else tuple(PAIRS)
    profiles: dict[str, Any] = {}
    rows: list[dict[str, Any]] = list(resume["pairs"]) if resume else []
    for name in () if resume else names:
        bpipe, base = _pair_configs(PAIRS[name])
        model = bpipe.model
        if model.name not in profiles:
            start = time.monotonic()
            sizes = sorted({bpipe.micro_batch_size, base.micro_batch_size})
            profiles[model.name] = parse_profile(run_profile(model, micro_batch_sizes=sizes, device="cpu"))
            print(f"profiled {model.name} in {time.monotonic() - start:.0f} s", flush=True)
        profile = profiles[model.name]
        cluster = load_cluster("cpu-local", comm=profile.comm)
        predicted = {
            side: estimate(c, cluster, profile=profile) for side, c in (("bpipe", bpipe), ("baseline", base))
        }
        p, m0, m1 = bpipe.pp, base.num_microbatches, bpipe.num_microbatches
        bubble = (m1 / (m1 + p - 1)) / (m0 / (m0 + p - 1))
        paper = per_token_time(base, cluster, profile) / per_token_time(bpipe, cluster, profile) * bubble
        keep = {"bpipe": ("tokens_per_s", "step_time_s", "exposed_transfer_s"),
                "baseline": ("tokens_per_s", "step_time_s")}  # fmt: skip
        rows.append({"name": name, "bpipe": bpipe.to_dict(), "baseline": base.to_dict(), "bpipe_runs": [],
                     "baseline_runs": [], "predicted": {
                         **{side: {k: predicted[side][k] for k in keys} for side, keys in keep.items()},
                         "paper": paper}})  # fmt: skip
    machine = resume["machine"] if resume else hardware_fingerprint("cpu")

    def table() -> dict[str, Any]:
        return {"machine": machine, "global_batch_size": GLOBAL_BATCH, "pairs": rows}

    done = min((len(r["bpipe_runs"]) for r in rows), default=0)
    for row in rows:  # a round cut short is measured again whole
        row["bpipe_runs"], row["baseline_runs"] = row["bpipe_runs"][:done], row["baseline_runs"][:done]
    if save:
        save(table())
    for rep in range(done, reps):
        for row in rows:
            order = ("bpipe", "baseline") if rep % 2 == 0 else ("baseline", "bpipe")
            for side in order:
                cfg = TrialConfig.from_dict(row[side])
                result = run_trial(cfg, steps=3, seed=rep, timeout=600)
                if result.status != "ok":
                    raise RuntimeError(f"{row['name']} {side}: {result.status} ({result.error})")
                row[f"{side}_runs"].append(result.tokens_per_s)
            speedup = row["bpipe_runs"][-1] / row["baseline_runs"][-1]
            print(f"round {rep + 1}/{reps} {row['name']}: {speedup:.3f}x", flush=True)
        if save:
            save(table())
    return table()
