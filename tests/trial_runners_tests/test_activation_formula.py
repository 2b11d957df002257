"""The estimator's activation formula equals the executor's saved-tensor count, to the byte.

Each case runs one stage module's forward under `ActivationTracker.for_module(module)` with
`capture(0)` (what the worker's probe and the executor do) and compares the bytes with
`autotune.estimate.activations.activation_bytes`. Tensor parallel 2 runs in 2 gloo processes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autotune.config import ModelSpec, load_model
from autotune.estimate.activations import activation_bytes
from autotune.estimate.costs import stage_params
from trial_runners.memory import ActivationTracker
from trial_runners.models import build_stage

RECOMPUTES = ("none", "selective", "full")

# Presets and odd shapes: GQA with several kv heads per rank, one kv head (the expansion is a
# view), multi-head llama, non-power-of-two sequence lengths and widths.
SPECS = [
    load_model("tiny-gpt"),
    load_model("tiny-llama"),
    ModelSpec("gpt-odd", "gpt", 4, 48, 3, 17, 100, 80),
    ModelSpec("llama-gqa3", "llama", 4, 48, 6, 20, 90, 72, num_kv_heads=3),
    ModelSpec("llama-mha", "llama", 2, 32, 2, 9, 50, 40, num_kv_heads=2),
    ModelSpec("llama-mqa", "llama", 4, 64, 8, 33, 70, 96, num_kv_heads=1),
]


def measured_bytes(
    spec: ModelSpec,
    *,
    stage: int,
    num_stages: int,
    micro_batch_size: int,
    flash: bool,
    recompute: str,
    tp_group: dist.ProcessGroup | None = None,
    sequence_parallel: bool = False,
) -> int:
    """Saved bytes of one micro-batch's forward, counted as the executor counts them."""
    module = build_stage(
        spec,
        stage=stage,
        num_stages=num_stages,
        flash_attention=flash,
        recompute=recompute,
        tp_group=tp_group,
        sequence_parallel=sequence_parallel,
    )
    tracker = ActivationTracker.for_module(module)
    b, s = micro_batch_size, spec.seq_len
    if module.is_first:
        x = torch.zeros(b, s, dtype=torch.long)
    else:
        shape = (
            (b, s // dist.get_world_size(tp_group), spec.hidden_size)
            if module.sp
            else (b, s, spec.hidden_size)
        )
        x = torch.zeros(*shape, requires_grad=True)
    targets = torch.zeros(b, s, dtype=torch.long)
    with tracker.capture(0):
        out = module(x, targets if module.is_last else None)
    del out
    return tracker.sizes.get(0, 0)


def _cases(specs: list[ModelSpec], sizes: tuple[int, ...], pps: tuple[int, ...] = (1, 2, 4)) -> list[tuple]:
    out = []
    for spec in specs:
        for pp in pps:
            if spec.num_layers % pp:
                continue
            for stage in range(pp):
                for b in sizes:
                    for flash in (True, False):
                        for recompute in RECOMPUTES:
                            out.append((spec, pp, stage, b, flash, recompute))
    return out


def _check_all(
    cases: list[tuple], tp_group: dist.ProcessGroup | None = None, tp: int = 1, sp: bool = False
) -> list[str]:
    wrong = []
    for spec, pp, stage, b, flash, recompute in cases:
        got = measured_bytes(
            spec,
            stage=stage,
            num_stages=pp,
            micro_batch_size=b,
            flash=flash,
            recompute=recompute,
            tp_group=tp_group,
            sequence_parallel=sp,
        )
        want = activation_bytes(
            spec,
            stage=stage,
            num_stages=pp,
            micro_batch_size=b,
            flash_attention=flash,
            recompute=recompute,
            tp=tp,
            sequence_parallel=sp,
        )
        if got != want:
            wrong.append(
                f"{spec.name} tp={tp} sp={sp} pp={pp} stage={stage} b={b} flash={flash} {recompute}: "
                f"measured {got}, formula {want} ({got - want:+d})"
            )
    return wrong


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_formula_equals_measured_bytes(spec: ModelSpec) -> None:
    """Both families, flash on/off, every recompute mode, every stage of pp 1/2/4, b 1-4."""
    torch.set_num_threads(1)
    sizes = (1, 2, 3, 4) if spec.name.startswith("tiny") else (1, 3)
    wrong = _check_all(_cases([spec], sizes))
    assert not wrong, "\n".join(wrong)


def test_pinned_tiny_gpt_bytes() -> None:
    """The figures test_activation_memory pins from real pipeline runs (tiny-gpt, pp 4, b 1)."""
    spec = load_model("tiny-gpt")
    kw = {"num_stages": 4, "micro_batch_size": 1, "flash_attention": True, "recompute": "none"}
    assert activation_bytes(spec, stage=0, **kw) == 132_352  # type: ignore[arg-type]
    assert activation_bytes(spec, stage=3, **kw) == 181_764  # type: ignore[arg-type]


def test_bf16_prediction_halves_the_dtype_sized_tensors() -> None:
    """dtype_bytes=2 halves everything but the fp32 side tensors and int64 ids."""
    spec = load_model("llama-65b")
    kw = {"stage": 1, "num_stages": 8, "micro_batch_size": 1, "flash_attention": False, "tp": 8}
    fp32 = activation_bytes(spec, recompute="full", **kw)  # type: ignore[arg-type]
    bf16 = activation_bytes(spec, recompute="full", dtype_bytes=2, **kw)  # type: ignore[arg-type]
    assert bf16 * 2 == fp32 == 10 * 2048 * 8192 * 4  # 10 layers, one (s, h) input each


def _param_mismatches(specs: list[ModelSpec], tp_group: dist.ProcessGroup | None, tp: int) -> list[str]:
    wrong = []
    for spec in specs:
        for pp in (1, 2, 4):
            if spec.num_layers % pp:
                continue
            for stage in range(pp):
                module = build_stage(
                    spec,
                    stage=stage,
                    num_stages=pp,
                    flash_attention=True,
                    recompute="none",
                    tp_group=tp_group,
                )
                got = sum(p.numel() for p in module.parameters())
                want = stage_params(spec, stage=stage, num_stages=pp, tp=tp)
                if got != want:
                    wrong.append(f"{spec.name} tp={tp} pp={pp} stage={stage}: built {got}, formula {want}")
    return wrong


def test_stage_params_equal_the_built_stages() -> None:
    """Both families, every stage of pp 1/2/4, tp 1 (tp 2 in the gloo test below)."""
    wrong = _param_mismatches(SPECS, None, 1)
    assert not wrong, "\n".join(wrong)
    spec = load_model("tiny-gpt")
    assert sum(stage_params(spec, stage=s, num_stages=4, tp=1) for s in range(4)) == spec.num_params()


def _tp_worker(rank: int, init_file: str, world: int, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        specs = [s for s in SPECS if s.num_heads % world == 0 and s.num_kv_heads % world == 0]
        specs = [s for s in specs if s.ffn_hidden_size % world == 0]
        wrong = _check_all(_cases(specs, (1, 2), pps=(1, 4)), tp_group=group, tp=world)
        even = [s for s in specs if s.seq_len % world == 0]  # sequence parallelism splits T
        assert len(even) >= 2, [s.name for s in even]
        wrong += _check_all(_cases(even, (1, 2), pps=(1, 4)), tp_group=group, tp=world, sp=True)
        wrong += _param_mismatches(specs, group, world)
        assert len(specs) == 3, [s.name for s in specs]
        Path(out_dir, f"rank{rank}.txt").write_text("\n".join(wrong))
    finally:
        dist.destroy_process_group()


def test_formula_equals_measured_bytes_tp2(tmp_path: Path) -> None:
    """Tensor parallel 2 (2 gloo processes): activation bytes and stage_params, sharded attention
    and MLP, replicated norms; and with sequence parallelism (the norms on half the sequence).

    tiny-llama at tp 2 has one kv head per rank, so its k/v expansion is a view (the narrow case).
    """
    mp.spawn(_tp_worker, args=(str(tmp_path / "rendezvous"), 2, str(tmp_path)), nprocs=2, join=True)
    wrong = [line for r in range(2) for line in (tmp_path / f"rank{r}.txt").read_text().splitlines()]
    assert not wrong, "\n".join(wrong)


def test_uneven_split_bytes_and_params_equal_the_formula() -> None:
    """An uneven split (1 + 3 layers, 3 + 1): each stage's saved bytes and parameters as predicted."""
    torch.set_num_threads(1)
    wrong = []
    for spec in (load_model("tiny-gpt"), load_model("tiny-llama")):
        for split in ((1, 3), (3, 1), (1, 2, 1)):
            for stage in range(len(split)):
                n = len(split)
                module = build_stage(
                    spec, stage=stage, num_stages=n, flash_attention=False, recompute="none", split=split
                )
                assert list(module.layer_ids) == list(range(sum(split[:stage]), sum(split[: stage + 1])))
                tracker = ActivationTracker.for_module(module)
                x = (
                    torch.zeros(2, spec.seq_len, dtype=torch.long)
                    if module.is_first
                    else torch.zeros(2, spec.seq_len, spec.hidden_size, requires_grad=True)
                )
                with tracker.capture(0):
                    module(x, torch.zeros(2, spec.seq_len, dtype=torch.long) if module.is_last else None)
                want = activation_bytes(
                    spec, stage=stage, num_stages=len(split), micro_batch_size=2, flash_attention=False,
                    recompute="none", layers=split[stage],
                )  # fmt: skip
                params = sum(p.numel() for p in module.parameters())
                want_params = stage_params(spec, stage=stage, num_stages=n, tp=1, layers=split[stage])
                if tracker.sizes.get(0, 0) != want or params != want_params:
                    wrong.append(f"{spec.name} {split} stage {stage}: {tracker.sizes.get(0, 0)} vs {want}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", ["tiny-gpt", "tiny-llama"])
def test_bf16_bytes_on_the_cpu_equal_the_formula(name: str) -> None:
    """Mixed-precision trials (bf16 modules on the CPU) keep what `activation_bytes(cpu=True)`
    says: LayerNorm's statistics in bf16, the composite RMSNorm's fp32 copies."""
    torch.set_num_threads(1)
    spec, wrong = load_model(name), []
    for stage, n in ((0, 2), (1, 2), (0, 1)):
        for flash in (True, False):
            for recompute in RECOMPUTES:
                module = build_stage(
                    spec,
                    stage=stage,
                    num_stages=n,
                    flash_attention=flash,
                    recompute=recompute,
                    dtype=torch.bfloat16,
                )
                tracker = ActivationTracker.for_module(module)
                b, s = 2, spec.seq_len
                x = (
                    torch.zeros(b, s, dtype=torch.long)
                    if module.is_first
                    else torch.zeros(b, s, spec.hidden_size, dtype=torch.bfloat16, requires_grad=True)
                )
                with tracker.capture(0):
                    module(x, torch.zeros(b, s, dtype=torch.long) if module.is_last else None)
                want = activation_bytes(
                    spec, stage=stage, num_stages=n, micro_batch_size=b, flash_attention=flash,
                    recompute=recompute, dtype_bytes=2, cpu=True,
                )  # fmt: skip
                if tracker.sizes.get(0, 0) != want:
                    wrong.append(
                        f"stage {stage}/{n} flash={flash} {recompute}: {tracker.sizes.get(0, 0)} vs {want}"
                    )
    assert not wrong, "\n".join(wrong)
