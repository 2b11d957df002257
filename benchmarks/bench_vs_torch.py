"""Our interpreter against `torch.distributed.pipelining`'s schedules on the same stages.

    python -m benchmarks.bench_vs_torch [--quick] [--hidden-size 256 --num-layers 8 ...]
    python -m benchmarks.bench_vs_torch --schedule interleaved --virtual-stages 2

1F1B against `Schedule1F1B`; interleaved 1F1B (V model chunks per rank, stage g = c * 2 + rank)
against `ScheduleInterleaved1F1B`.

Two ranks (pp=2, gloo, one OMP thread each) build the same `trial_runners.models.build_stage`
modules once and run both implementations on them, alternating (ours, torch, torch, ours, ...)
within one process group so that drift (thermal, other load) hits both alike. Each step starts
after a barrier; its time is the slowest rank's. Parameters are never updated (no optimizer),
so every step computes the same loss and both implementations must agree on it.

Identical compute: our last stage returns `cross_entropy(head(norm(x)))` from
`StageModule.forward`; torch needs the loss outside the module, so torch's last stage is
`_LogitsStage` (the same module's blocks, norm and head, returning logits) and its `loss_fn` is
the very same `F.cross_entropy(logits.float().view(-1, V), targets.reshape(-1))` times
1/num_microbatches, which is our executor's `loss_scale`. Torch's `scale_grads` is off, so
neither side rescales gradients after the step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B
from torch.distributed.pipelining.stage import _PipelineStageBase

from autotune.config import load_model
from autotune.schedules import generate
from trial_runners.executor import StageExecutor, StageLinks
from trial_runners.memory import ActivationTracker
from trial_runners.models import StageModule, build_stage

TARGET = 1.05  # ours / torch step time
IMPLS = ("ours", "torch")


@dataclass(frozen=True)
class Setup:
    model: str
    hidden_size: int
    num_layers: int
    seq_len: int
    micro_batch_size: int
    num_microbatches: int
    reps: int
    steps: int  # measured steps per implementation per repetition
    warmup: int
    schedule: str = "1f1b"
    virtual_stages: int = 1


class _LogitsStage(nn.Module):
    """The last StageModule's forward without the loss: blocks -> norm -> head -> (B, T, V)."""

    def __init__(self, stage: StageModule) -> None:
        super().__init__()
        assert stage.norm is not None and stage.head is not None and stage.recompute == "none"
        self.stage = stage

    def forward(self, x: Tensor) -> Tensor:
        s = self.stage
        T = x.shape[1]
        cos, sin = s.rope_cos, s.rope_sin
        rope = None if cos is None or sin is None else (cos[:T], sin[:T])
        for block in s.layers.values():
            x = block(x, rope, s.causal_mask)  # (B, T, H)
        assert s.norm is not None and s.head is not None
        return s.head(s.norm(x))  # (B, T, V)


def _loss_fn(scale: float) -> Callable[[Tensor, Tensor], Tensor]:
    def loss(logits: Tensor, targets: Tensor) -> Tensor:  # the same ops as StageModule.forward
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1)) * scale

    return loss


def _rank_main(rank: int, setup: Setup, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        _bench(rank, setup)
    finally:
        dist.destroy_process_group()


def _bench(rank: int, setup: Setup) -> None:
    spec = load_model(
        setup.model, hidden_size=setup.hidden_size, num_layers=setup.num_layers, seq_len=setup.seq_len
    )
    m, B, T, H = setup.num_microbatches, setup.micro_batch_size, spec.seq_len, spec.hidden_size
    device = torch.device("cpu")
    v = setup.virtual_stages
    n = 2 * v  # model stages: this rank's chunk c is stage c * 2 + rank
    stages = [c * 2 + rank for c in range(v)]
    chunks = [
        build_stage(spec, stage=g, num_stages=n, flash_attention=True, recompute="none") for g in stages
    ]
    module = chunks[0] if v == 1 else nn.ModuleList(chunks)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, spec.vocab_size, (m * B, T + 1), generator=g)  # (m*B, T+1)
    tokens, targets = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (m*B, T) each
    mbs = [(tokens[i * B : (i + 1) * B], targets[i * B : (i + 1) * B]) for i in range(m)]

    ours = StageExecutor(
        module,
        generate(setup.schedule, 2, m, virtual_stages=v).program(rank),
        cap=None,
        stages=stages,
        num_model_stages=n,
        links=StageLinks(
            prev=1 - rank if rank == 1 or v > 1 else None,
            next=1 - rank if rank == 0 or v > 1 else None,
            partner=None,
        ),
        activation_shape=(B, T, H),
        dtype=torch.float32,
        device=device,
        tracker=ActivationTracker.for_module(module),
        loss_scale=1.0 / m,
    )
    # Static metadata; requires_grad marks which outputs receive (and inputs send) gradients.
    torch_stages: list[_PipelineStageBase] = []
    for index, chunk in zip(stages, chunks, strict=True):
        last = index == n - 1
        example_x = tokens[:B] if index == 0 else torch.zeros(B, T, H, requires_grad=True)
        example_out = torch.zeros(B, T, spec.vocab_size if last else H, requires_grad=True)
        torch_stages.append(
            PipelineStage(
                _LogitsStage(chunk) if last else chunk, index, n, device, input_args=example_x,
                output_args=example_out,
            )
        )  # fmt: skip
    theirs: Schedule1F1B | ScheduleInterleaved1F1B
    if v == 1:
        theirs = Schedule1F1B(torch_stages[0], m, loss_fn=_loss_fn(1.0 / m), scale_grads=False)
    else:
        theirs = ScheduleInterleaved1F1B(torch_stages, m, loss_fn=_loss_fn(1.0 / m), scale_grads=False)

    def step(impl: str) -> float:
        """One step; returns the loss (summed scaled micro-batch losses) on the last rank."""
        if impl == "ours":
            return ours.run_step(lambda mb: mbs[mb])[0]
        losses: list[Tensor] = []
        if rank == 0:
            theirs.step(tokens)
        else:
            theirs.step(target=targets, losses=losses, return_outputs=False)
        return float(sum(float(x.detach()) for x in losses))

    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    first_loss: dict[str, float] = {}
    for impl in IMPLS:  # warm-up (torch's first step also settles its stage metadata)
        for _ in range(setup.warmup):
            module.zero_grad(set_to_none=True)
            first_loss.setdefault(impl, step(impl))
    for rep in range(setup.reps):
        order = IMPLS if rep % 2 == 0 else IMPLS[::-1]
        for impl in order:
            for _ in range(setup.steps):
                module.zero_grad(set_to_none=True)
                dist.barrier()
                start = time.perf_counter()
                step(impl)
                times[impl].append(time.perf_counter() - start)

    # Slowest rank per step.
    local = torch.tensor([times[impl] for impl in IMPLS], dtype=torch.float64)  # (2, reps*steps)
    gathered = [torch.empty_like(local) for _ in range(2)]
    dist.all_gather(gathered, local)
    per_step = torch.stack(gathered).amax(dim=0)  # (2, reps*steps)
    if rank == 1:
        _report(
            setup, spec.num_params(), {impl: per_step[i].tolist() for i, impl in enumerate(IMPLS)}, first_loss
        )


def _report(setup: Setup, params: int, times: dict[str, list[float]], loss: dict[str, float]) -> None:
    s = setup
    print(
        f"model {s.model} hidden {s.hidden_size} layers {s.num_layers} seq {s.seq_len} ({params / 1e6:.1f}M "
        f"params); pp=2 on gloo, 1 thread per rank; micro-batch {s.micro_batch_size} x {s.num_microbatches}; "
        f"{s.schedule}" + (f", {s.virtual_stages} chunks per rank" if s.virtual_stages > 1 else "")
    )
    print(
        f"{s.reps} repetitions x {s.steps} steps per implementation, alternating; step = slowest rank, "
        f"after a barrier; no optimizer step"
    )
    print()
    print(f"{'impl':<6} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'steps':>6} {'first loss':>12}")
    for impl in IMPLS:
        t = times[impl]
        print(
            f"{impl:<6} {statistics.median(t) * 1e3:>10.1f} {min(t) * 1e3:>8.1f} {max(t) * 1e3:>8.1f} "
            f"{len(t):>6} {loss[impl]:>12.6f}"
        )
    ratio = statistics.median(times["ours"]) / statistics.median(times["torch"])
    # Per-repetition ratios show how steady the comparison is.
    per_rep = [
        statistics.median(times["ours"][r * s.steps : (r + 1) * s.steps])
        / statistics.median(times["torch"][r * s.steps : (r + 1) * s.steps])
        for r in range(s.reps)
    ]
    print()
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(f"ours/torch median step time: {ratio:.3f} (target <= {TARGET}: {verdict})")
    print(f"per-repetition ratios: {', '.join(f'{r:.3f}' for r in per_rep)}")
    diff = abs(loss["ours"] - loss["torch"])
    same = diff <= 1e-5 * max(1.0, abs(loss["torch"]))
    print(
        f"first-step loss: ours {loss['ours']:.6f}, torch {loss['torch']:.6f} (|diff| {diff:.2e}: "
        f"{'same' if same else 'DIFFERENT'})"
    )


def parse_args(argv: list[str] | None = None) -> Setup:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_vs_torch", description=__doc__.splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke test, < 1 min)")
    p.add_argument("--model", default="tiny-gpt")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--num-microbatches", type=int, default=8)
    p.add_argument("--schedule", default="1f1b", choices=("1f1b", "interleaved"))
    p.add_argument(
        "--virtual-stages", type=int, default=None, help="chunks per rank (interleaved: default 2)"
    )
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 20, 3 with --quick)")
    p.add_argument(
        "--steps", type=int, default=None, help="steps per implementation per repetition (default 5, 3 quick)"
    )
    a = p.parse_args(argv)
    return Setup(
        model=a.model,
        hidden_size=a.hidden_size,
        num_layers=a.num_layers,
        seq_len=a.seq_len,
        micro_batch_size=a.micro_batch_size,
        num_microbatches=a.num_microbatches,
        reps=a.reps or (3 if a.quick else 20),
        steps=a.steps or (3 if a.quick else 5),
        warmup=2,
        schedule=a.schedule,
        virtual_stages=a.virtual_stages or (2 if a.schedule == "interleaved" else 1),
    )


def main(argv: list[str] | None = None) -> int:
    setup = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory(prefix="bench-vs-torch-") as tmp:
        mp.spawn(_rank_main, args=(setup, os.path.join(tmp, "rendezvous")), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
