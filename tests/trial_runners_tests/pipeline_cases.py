"""Real multi-process pipeline runs for the tests, batched into one job per world size."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autotune.config import TrialConfig, load_model
from trial_runners.data import batch_for_step
from trial_runners.launch import run_job
from trial_runners.models import build_full_model


@dataclass(frozen=True)
class Case:
    model: str
    pp: int
    m: int
    schedule: str
    recompute: str = "none"
    flash: bool = True
    tp: int = 1
    dp: int = 1
    num_layers: int | None = None
    stage_layers: tuple[int, ...] = ()
    sp: bool = False
    dtype: str = ""
    v: int = 1  # model chunks per rank (interleaved)

    def config(self) -> TrialConfig:
        return TrialConfig(
            model=load_model(self.model, num_layers=self.num_layers),
            tp=self.tp,
            pp=self.pp,
            dp=self.dp,
            num_microbatches=self.m,
            schedule=self.schedule,
            recompute=self.recompute,
            flash_attention=self.flash,
            stage_layers=self.stage_layers,
            sequence_parallel=self.sp,
            dtype=self.dtype,
            virtual_stages=self.v,
        )

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        extra = f"-tp{self.tp}" * (self.tp > 1) + "-sp" * self.sp + f"-dp{self.dp}" * (self.dp > 1)
        extra += f"-{self.dtype}" if self.dtype else ""
        extra += f"-v{self.v}" if self.v > 1 else ""
        layers = f"-L{self.num_layers}" if self.num_layers else ""
        layers += f"-split{'.'.join(map(str, self.stage_layers))}" if self.stage_layers else ""
        return (
            f"{self.model}{layers}-pp{self.pp}{extra}-m{self.m}-{self.schedule}-{self.recompute}-"
            f"{'flash' if self.flash else 'explicit'}"
        )


def matrix_cases() -> list[Case]:
    """The issue's matrix: both families, pp 1/2/4, m in {p, 2p+1}, every schedule, recompute
    none/full, flash on/off; plus one tp=2 and one dp=2 layout."""
    cases = [
        Case(model, pp, m, schedule, recompute, flash)
        for model, pp, schedule, recompute, flash in itertools.product(
            ("tiny-gpt", "tiny-llama"), (1, 2, 4), ("1f1b", "gpipe", "bpipe"), ("none", "full"), (True, False)
        )
        for m in (pp, 2 * pp + 1)
        if schedule != "bpipe" or pp >= 3  # BPipe at pp <= 2 is 1F1B: refused as a configuration
    ]
    cases += [
        Case("tiny-gpt", 2, 4, "1f1b", tp=2),
        Case("tiny-gpt", 2, 5, "1f1b", "selective", False, tp=2, stage_layers=(1, 3)),  # uneven
        Case("tiny-gpt", 2, 4, "1f1b", tp=2, sp=True),  # sequence parallel
        Case("tiny-llama", 2, 5, "gpipe", "full", False, tp=2, sp=True, stage_layers=(3, 1)),
        Case("tiny-gpt", 2, 4, "1f1b", tp=2, sp=True, dtype="bf16"),  # mixed precision
        Case("tiny-llama", 4, 5, "bpipe", "selective", False, dtype="bf16"),
        Case("tiny-llama", 2, 5, "gpipe", "full", tp=2),
        Case("tiny-llama", 2, 4, "1f1b", dp=2),
        Case("tiny-gpt", 4, 5, "bpipe", "full", False, dp=2),
    ]
    cases += interleaved_cases() + zero_bubble_cases()
    return cases


def zero_bubble_cases() -> list[Case]:
    """ZB-H1 (backwards split into input and weight gradients): pp 1-4, m = p and more, both
    families, flash on and off, a tp=2 layout (recomputation cannot split: refused)."""
    return [
        Case("tiny-gpt", 1, 2, "zb-h1"),
        Case("tiny-gpt", 2, 4, "zb-h1"),
        Case("tiny-llama", 2, 5, "zb-h1", flash=False),
        Case("tiny-llama", 3, 3, "zb-h1", num_layers=6),
        Case("tiny-gpt", 4, 9, "zb-h1"),
        Case("tiny-gpt", 2, 4, "zb-h1", tp=2),
    ]


def interleaved_cases() -> list[Case]:
    """Interleaved 1F1B: V = 2 and 3, pp 2-4, m = p (all warm-up) and 2p, both families."""
    return [
        Case("tiny-gpt", 2, 4, "interleaved", v=2),
        Case("tiny-llama", 2, 2, "interleaved", "full", False, v=2),
        Case("tiny-llama", 2, 6, "interleaved", "selective", v=3, num_layers=6),
        Case("tiny-gpt", 3, 6, "interleaved", "none", False, v=2, num_layers=6),
        Case("tiny-gpt", 4, 8, "interleaved", v=2, num_layers=8),
        Case("tiny-llama", 4, 4, "interleaved", "full", v=2, num_layers=8),
        Case("tiny-gpt", 2, 4, "interleaved", tp=2, v=2),
    ]


def memory_cases() -> list[Case]:
    """pp=3 (6 layers) and pp=4 runs for the activation-accounting tests."""
    cases = [Case("tiny-gpt", 3, m, s, num_layers=6) for s in ("1f1b", "gpipe", "bpipe") for m in (3, 7)]
    cases += [Case("tiny-llama", 3, 7, s, "full", False, num_layers=6) for s in ("1f1b", "bpipe")]
    cases += [Case("tiny-gpt", 3, 6, "bpipe", "selective", False, num_layers=6)]
    cases += [Case("tiny-llama", 3, 5, "bpipe", num_layers=5)]  # pp does not divide: split 2+2+1
    return cases


@dataclass
class RunResult:
    case: Case
    ranks: list[dict[str, Any]]
    dump_dir: Path


def run_all(cases: list[Case], root: Path) -> dict[Case, RunResult]:
    out: dict[Case, RunResult] = {}
    for world in sorted({c.world_size for c in cases}):
        group = [c for c in cases if c.world_size == world]
        runs = []
        for i, case in enumerate(group):
            dump = root / f"w{world}-{i}"
            dump.mkdir()
            runs.append({"config": case.config().to_dict(), "steps": 0, "seed": 0, "dump_dir": str(dump)})
        outcome = run_job(runs, world_size=world, timeout=900)
        assert outcome.status == "ok", f"world {world}: {outcome.status}: {outcome.error}"
        for i, case in enumerate(group):
            out[case] = RunResult(case, outcome.results[i], Path(runs[i]["dump_dir"]))
    return out


def reference(case: Case) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of the unsplit single-process model on the same global batch."""
    cfg = case.config()
    model = build_full_model(cfg.model, flash_attention=case.flash, recompute=case.recompute, seed=0)
    tokens, targets = batch_for_step(cfg.model, seed=0, step=0, global_batch_size=cfg.global_batch_size)
    loss = model(tokens, targets)
    loss.backward()
    return float(loss.detach()), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def load_grads(result: RunResult, rank: int) -> dict[str, tuple[np.ndarray, int]]:
    with np.load(result.dump_dir / f"rank{rank}.npz") as data:
        names = [k for k in data.files if not k.startswith("__shard_dim__")]
        return {n: (data[n], int(data[f"__shard_dim__{n}"])) for n in names}
