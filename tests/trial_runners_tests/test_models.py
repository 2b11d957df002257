"""Numerics of the stage models against the unsplit reference: pipeline splits, recompute,
flash attention, tensor parallel (2 gloo processes), plus the batch helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autotune.config import ModelSpec, load_model, model_flops_per_token
from trial_runners.data import batch_for_step, microbatch
from trial_runners.models import build_full_model, build_stage
from trial_runners.tensor_parallel import SHARD_DIM_ATTR, sync_sequence_parallel_grads

FAMILIES = ["tiny-gpt", "tiny-llama"]
Grads = dict[str, torch.Tensor]


def _batch(spec: ModelSpec, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return batch_for_step(spec, seed=1, step=0, global_batch_size=rows)


def _run_full(spec: ModelSpec, *, flash: bool, recompute: str, seed: int = 0) -> tuple[torch.Tensor, Grads]:
    model = build_full_model(spec, flash_attention=flash, recompute=recompute, seed=seed)
    tokens, targets = _batch(spec)
    loss = model(tokens, targets)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _run_split(
    spec: ModelSpec,
    *,
    pp: int,
    flash: bool,
    recompute: str,
    tp_group: dist.ProcessGroup | None = None,
    sp: bool = False,
) -> tuple[torch.Tensor, Grads, dict[str, torch.nn.Parameter]]:
    """Chain the stages in one process, hidden states passed on detached with requires_grad
    (with sequence parallelism `sp`, each rank's part of the sequence).

    Returns the loss, the gradients and the parameters, by name."""
    stages = [
        build_stage(
            spec,
            stage=s,
            num_stages=pp,
            flash_attention=flash,
            recompute=recompute,
            tp_group=tp_group,
            sequence_parallel=sp,
        )  # fmt: skip
        for s in range(pp)
    ]
    t = dist.get_world_size(tp_group) if sp and tp_group is not None else 1
    tokens, targets = _batch(spec)
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    x = tokens
    for stage in stages:
        if not stage.is_first:
            x = x.detach().requires_grad_()
        inputs.append(x)
        assert tuple(stage.output_shape(tokens.shape[0])) == (
            () if stage.is_last else (2, spec.seq_len // t, spec.hidden_size)
        )
        x = stage(x, targets if stage.is_last else None)
        outputs.append(x)
    outputs[-1].backward()
    for s in range(pp - 2, -1, -1):
        outputs[s].backward(inputs[s + 1].grad)
    for stage in stages:
        sync_sequence_parallel_grads(stage, tp_group)  # what the worker does after the backward
    params = {n: p for stage in stages for n, p in stage.named_parameters()}
    return outputs[-1].detach(), {n: p.grad for n, p in params.items() if p.grad is not None}, params


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    try:
        torch.testing.assert_close(actual, expected)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None


def _assert_same(loss: torch.Tensor, grads: Grads, ref_loss: torch.Tensor, ref_grads: Grads) -> None:
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        _close(grad, ref_grads[name], name)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("flash", [True, False])
def test_split_and_recompute_match_full_model(name: str, flash: bool) -> None:
    spec = load_model(name)
    ref_loss, ref_grads = _run_full(spec, flash=flash, recompute="none")
    assert len(ref_grads) == len(
        list(build_full_model(spec, flash_attention=flash, recompute="none").parameters())
    )
    for recompute in ("none", "selective", "full"):
        _assert_same(*_run_full(spec, flash=flash, recompute=recompute), ref_loss, ref_grads)
        for pp in (2, 4):
            loss, grads, _ = _run_split(spec, pp=pp, flash=flash, recompute=recompute)
            _assert_same(loss, grads, ref_loss, ref_grads)


@pytest.mark.parametrize("name", FAMILIES)
def test_flash_matches_explicit_attention(name: str) -> None:
    spec = load_model(name)
    _assert_same(
        *_run_full(spec, flash=True, recompute="none"), *_run_full(spec, flash=False, recompute="none")
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_stage_names_partition_full_model_and_init_is_split_independent(name: str) -> None:
    spec = load_model(name)
    full = dict(build_full_model(spec, flash_attention=True, recompute="none", seed=3).named_parameters())
    for pp in (2, 4):
        seen: list[str] = []
        for s in range(pp):
            stage = build_stage(spec, stage=s, num_stages=pp, flash_attention=False, recompute="full", seed=3)
            for n, p in stage.named_parameters():
                torch.testing.assert_close(p, full[n], rtol=0, atol=0)
            seen += [n for n, _ in stage.named_parameters()]
        assert sorted(seen) == sorted(full)
    other = dict(build_full_model(spec, flash_attention=True, recompute="none", seed=4).named_parameters())
    assert not torch.equal(other["layers.0.attn.q.weight"], full["layers.0.attn.q.weight"])
    assert "layers.3.attn.q.weight" in full and "head.weight" in full and "norm.weight" in full


def test_bad_split_and_buffers() -> None:
    spec = load_model("tiny-llama")
    with pytest.raises(ValueError, match="4 layers cannot be split into 3"):
        build_stage(spec, stage=0, num_stages=3, flash_attention=True, recompute="none")
    stage = build_stage(spec, stage=1, num_stages=2, flash_attention=False, recompute="none")
    assert {n for n, _ in stage.named_buffers()} == {"rope_cos", "rope_sin", "causal_mask"}
    assert stage.state_dict().keys() == dict(stage.named_parameters()).keys()  # buffers are non-persistent


def test_model_flops_per_token() -> None:
    spec = load_model("tiny-gpt")
    h, s, L, v = spec.hidden_size, spec.seq_len, spec.num_layers, spec.vocab_size
    n = spec.num_params() - v * h - s * h
    base = model_flops_per_token(spec, recompute="none")
    assert base == 6 * n + 12 * L * h * s
    assert model_flops_per_token(spec, recompute="full") == pytest.approx(base * 8 / 6)
    assert model_flops_per_token(spec, recompute="selective") == base + 4 * L * h * s


# --- tensor parallel: 2 gloo processes, each checks its shards against the full model --------


def _tp_worker(rank: int, init_file: str, world: int) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        for name in FAMILIES:
            spec = load_model(name)
            cases = [(1, True, "none", False), (1, False, "selective", False), (2, True, "full", False)]
            cases += [(1, True, "none", True), (2, False, "selective", True), (2, True, "full", True)]
            for pp, flash, recompute, sp in cases:
                ref_loss, ref_grads = _run_full(spec, flash=flash, recompute="none")
                ref_params = dict(
                    build_full_model(spec, flash_attention=flash, recompute="none").named_parameters()
                )
                loss, grads, params = _run_split(
                    spec, pp=pp, flash=flash, recompute=recompute, tp_group=group, sp=sp
                )
                torch.testing.assert_close(loss, ref_loss)
                sharded = 0
                for n, grad in grads.items():
                    dim = getattr(params[n], SHARD_DIM_ATTR, None)
                    want_grad, want_param = ref_grads[n], ref_params[n].detach()
                    if dim is not None:
                        sharded += 1
                        want_grad, want_param = (
                            want_grad.chunk(world, dim)[rank],
                            want_param.chunk(world, dim)[rank],
                        )
                    torch.testing.assert_close(params[n].detach(), want_param, rtol=0, atol=0)
                    _close(grad, want_grad, f"{name} tp rank {rank}: {n}")
                assert grads.keys() == ref_grads.keys()
                # gpt: q, k, v weights and biases, o weight, fc1 weight and bias, fc2 weight; llama: 7
                # weights; and the token embedding and the head, split over the vocabulary
                per_layer = 10 if spec.family == "gpt" else 7
                assert sharded == spec.num_layers * per_layer + 2, sharded
                assert params["head.weight"].shape[0] == spec.vocab_size // world
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_matches_full_model(tmp_path: Path) -> None:
    mp.spawn(_tp_worker, args=(str(tmp_path / "rendezvous"), 2), nprocs=2, join=True)


# --- data --------------------------------------------------------------------------------------


def test_synthetic_batches_are_deterministic() -> None:
    spec = load_model("tiny-gpt")
    tokens, targets = batch_for_step(spec, seed=7, step=3, global_batch_size=8)
    again = batch_for_step(spec, seed=7, step=3, global_batch_size=8)
    assert tokens.shape == targets.shape == (8, spec.seq_len) and tokens.dtype == targets.dtype == torch.int64
    assert torch.equal(tokens, again[0]) and torch.equal(targets, again[1])
    assert torch.equal(tokens[:, 1:], targets[:, :-1])
    assert int(tokens.max()) < spec.vocab_size and int(tokens.min()) >= 0
    assert not torch.equal(tokens, batch_for_step(spec, seed=7, step=4, global_batch_size=8)[0])
    assert not torch.equal(tokens, batch_for_step(spec, seed=8, step=3, global_batch_size=8)[0])


def test_microbatch_layout() -> None:
    tokens = torch.arange(12).view(12, 1)
    # global 12 = micro 2 x num 3 x dp 2: dp rank 1's micro-batch 2 starts at row (1 * 3 + 2) * 2 = 10
    mb, tg = microbatch(tokens, tokens + 100, index=2, micro_batch_size=2, dp_rank=1, dp=2)
    assert mb.view(-1).tolist() == [10, 11] and tg.view(-1).tolist() == [110, 111]
    rows = [
        microbatch(tokens, tokens, index=k, micro_batch_size=2, dp_rank=d, dp=2)[0]
        for d in range(2)
        for k in range(3)
    ]
    assert torch.equal(torch.cat(rows), tokens)
    with pytest.raises(ValueError):
        microbatch(tokens, tokens, index=3, micro_batch_size=2, dp_rank=0, dp=2)
    with pytest.raises(ValueError):
        microbatch(tokens, tokens, index=0, micro_batch_size=5, dp_rank=0, dp=1)


def test_token_file(tmp_path: Path) -> None:
    spec = load_model("tiny-gpt")
    path = tmp_path / "train.bin"
    data = (np.arange(1000) * 7 % spec.vocab_size).astype(np.uint16)
    data.tofile(path)
    tokens, targets = batch_for_step(spec, seed=0, step=5, global_batch_size=4, data_path=str(path))
    assert tokens.shape == (4, spec.seq_len) and tokens.dtype == torch.int64
    assert torch.equal(tokens[:, 1:], targets[:, :-1])
    windows = np.lib.stride_tricks.sliding_window_view(data, spec.seq_len + 1)  # every possible row
    for row, target in zip(tokens.numpy(), targets.numpy(), strict=True):
        assert (windows == np.append(row, target[-1])).all(axis=1).any()
    again = batch_for_step(spec, seed=0, step=5, global_batch_size=4, data_path=str(path))
    assert torch.equal(tokens, again[0])

    short = tmp_path / "short.bin"
    data[: spec.seq_len].tofile(short)
    with pytest.raises(ValueError, match="too short"):
        batch_for_step(spec, seed=0, step=0, global_batch_size=1, data_path=str(short))
    bad = tmp_path / "bad.bin"
    np.full(100, spec.vocab_size, dtype=np.uint16).tofile(bad)
    with pytest.raises(ValueError, match="vocab"):
        batch_for_step(spec, seed=0, step=0, global_batch_size=1, data_path=str(bad))
