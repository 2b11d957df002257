"""Megatron-style tensor parallelism (no sequence parallel): two autograd regions, two linears,
the vocabulary-parallel embedding and cross-entropy.

A column-parallel linear splits its output features over the `t` ranks of a group; a
row-parallel linear splits its input features and all-reduces the partial products. A block
calls `copy_to_tp_region` once on the (replicated) input of its column-parallel layers, so the
input gradient is summed over the ranks in backward, and the row-parallel layer ends with
`reduce_from_tp_region`. With no group, or a group of one rank, everything is a plain linear.

With sequence parallelism (Megatron's `--sequence-parallel`, Korthikanti et al. 2022) the
hidden states between the column- and row-parallel regions are split along the sequence: a
rank holds (B, T/t, H), its norms and residual adds run on that part, a column-parallel linear
all-gathers its input along the sequence (and keeps only its own part for the backward, where
it gathers it again), and a row-parallel linear reduce-scatters its output instead of
all-reducing it. Gloo has no reduce-scatter, so it is an all-reduce and a slice here.

No rank holds the whole vocabulary (Megatron's `VocabParallelEmbedding` and
`vocab_parallel_cross_entropy`): rank r holds the rows [r*V/t, (r+1)*V/t) of the token
embedding and of the LM head (a column-parallel linear), looks up only its own tokens and
all-reduces the sum, and the loss is computed from the split logits with three all-reduces of
per-token figures (the max, the sum of exponentials, the target's logit).

The linears hold only their local shard; each sharded parameter carries `tp_shard_dim` (0 for
column-parallel weights and biases, 1 for row-parallel weights), so the full tensor is
`torch.cat(shards, tp_shard_dim)`. Parameter values are left to the caller:
`trial_runners.models` initialises every parameter at its full shape and slices the shard out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

SHARD_DIM_ATTR = "tp_shard_dim"  # set on sharded parameters: the dim along which they are split
# Set on replicated parameters used inside the sequence-parallel region (norms, row-parallel
# biases, gpt's position embedding): each rank's gradient covers its part of the sequence only,
# so `sync_sequence_parallel_grads` sums them over the tp group after the backward.
SEQUENCE_PARALLEL_ATTR = "sequence_parallel"


class ShardShapes:
    """A stand-in for a tp group of `size` ranks that only shapes the modules: rank 0's shard of
    every split layer, with every collective skipped (results are not the model's; the compute
    of one rank's shard is, which is what a profile of one GPU times)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a tensor-parallel degree is positive, got {size}")
        self.size = size


Group = dist.ProcessGroup | ShardShapes | None


def tp_size(group: Group) -> int:
    if isinstance(group, ShardShapes):
        return group.size
    return 1 if group is None else dist.get_world_size(group)


def tp_rank(group: Group) -> int:
    if group is None or isinstance(group, ShardShapes):
        return 0
    return dist.get_rank(group)


def _all_reduce(x: Tensor, group: Group, op: Any = None) -> None:
    if isinstance(group, ShardShapes):
        return
    dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=group)


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        _all_reduce(grad, ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group) -> Tensor:
        x = x.contiguous().clone()
        _all_reduce(x, group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def copy_to_tp_region(x: Tensor, group: Group) -> Tensor:
    """Identity forward; all-reduce (sum) of the gradient over `group` in backward."""
    if tp_size(group) == 1:
        return x
    out: Tensor = _CopyToRegion.apply(x, group)
    return out


def reduce_from_tp_region(x: Tensor, group: Group) -> Tensor:
    """All-reduce (sum) over `group` forward; identity in backward."""
    if tp_size(group) == 1:
        return x
    out: Tensor = _ReduceFromRegion.apply(x, group)
    return out


def _gather_sequence(x: Tensor, group: Group) -> Tensor:
    if isinstance(group, ShardShapes):
        return torch.cat([x] * group.size, dim=1)
    parts = [torch.empty_like(x) for _ in range(tp_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _scatter_sequence(x: Tensor, group: Group) -> Tensor:
    """The sum over the group of `x` (B, T, ...), this rank's part of the sequence (B, T/t, ...)."""
    x = x.contiguous().clone()
    _all_reduce(x, group)
    # a copy of its own (a view would keep the whole sequence's storage alive)
    return x.chunk(tp_size(group), dim=1)[tp_rank(group)].clone(memory_format=torch.contiguous_format)


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group) -> Tensor:
        ctx.group = group
        return _scatter_sequence(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _gather_sequence(grad, ctx.group), None


def reduce_scatter_to_sequence(x: Tensor, group: Group) -> Tensor:
    """Sum over `group` and keep this rank's part of the sequence; all-gather in backward."""
    out: Tensor = _ReduceScatterSequence.apply(x, group)
    return out


class _GatherLinear(torch.autograd.Function):
    """y = all_gather_sequence(x) @ W^T + b, keeping only x (this rank's part) for the backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, group: Group) -> Tensor:
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(_gather_sequence(x, group), weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        full = _gather_sequence(x, ctx.group)  # gathered again rather than kept
        grad_x = _scatter_sequence(grad @ weight, ctx.group)
        grad_w = grad.reshape(-1, grad.shape[-1]).t() @ full.reshape(-1, full.shape[-1])
        grad_b = grad.sum(dim=tuple(range(grad.dim() - 1))) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


def sync_sequence_parallel_grads(params: nn.Module | list[Tensor], group: Group) -> None:
    """Sum over the tp group the gradients of the replicated parameters the sequence-parallel
    region uses (each rank's covers its part of the sequence); `params`: a module's, or the
    tensors holding them (fp32 masters, marked alike)."""
    tensors = params.parameters() if isinstance(params, nn.Module) else params
    if tp_size(group) > 1:
        all_reduce_grads([p for p in tensors if getattr(p, SEQUENCE_PARALLEL_ATTR, False)], group)


def all_reduce_grads(holders: Iterable[Tensor], group: Group) -> None:
    """Sum the `.grad` of `holders` over `group` in place, as one flat all-reduce."""
    grads = [h.grad for h in holders if h.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    _all_reduce(flat, group)
    for grad, summed in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(summed)


def _shard(full: int, t: int, what: str) -> int:
    if full % t:
        raise ValueError(
            f"tensor parallel: {what} ({full}) must divide by tp={t} ({full} % {t} = {full % t})"
        )
    return full // t


class ColumnParallelLinear(nn.Module):
    """y[..., local out features] = x @ W_shard^T + b_shard; the input must be replicated.

    The caller passes the input through `copy_to_tp_region` first (once for all the
    column-parallel layers that read it).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: Group = None,
        *,
        bias: bool,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        t = tp_size(group)
        self.group, self.sequence_parallel = group, sequence_parallel and t > 1
        local = _shard(out_features, t, "output features")
        self.weight = nn.Parameter(torch.empty(local, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(local, device=device, dtype=dtype)) if bias else None
        if t > 1:
            for p in (self.weight, self.bias):
                if p is not None:
                    setattr(p, SHARD_DIM_ATTR, 0)

    def forward(self, x: Tensor) -> Tensor:
        if self.sequence_parallel:  # x is this rank's part of the sequence: gathered here
            out: Tensor = _GatherLinear.apply(x, self.weight, self.bias, self.group)
            return out
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard @ W_shard^T) + b: input features split, bias replicated and added last."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: Group = None,
        *,
        bias: bool,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.group = group
        t = tp_size(group)
        self.sequence_parallel = sequence_parallel and t > 1
        local = _shard(in_features, t, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, local, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        if t > 1:
            setattr(self.weight, SHARD_DIM_ATTR, 1)
        if self.sequence_parallel and self.bias is not None:
            setattr(self.bias, SEQUENCE_PARALLEL_ATTR, True)

    def forward(self, x: Tensor) -> Tensor:
        partial = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence(partial, self.group)  # (B, T/t, out)
        else:
            y = reduce_from_tp_region(partial, self.group)
        return y if self.bias is None else y + self.bias


def vocab_range(vocab_size: int, group: Group) -> tuple[int, int]:
    """The [start, end) rows of the vocabulary this rank holds."""
    local = _shard(vocab_size, tp_size(group), "vocabulary")
    start = tp_rank(group) * local
    return start, start + local


class VocabParallelEmbedding(nn.Module):
    """Token embedding with its rows split over the group; the output is all-reduced (replicated),
    or reduce-scattered along the sequence with sequence parallelism.

    Saved for backward (per micro-batch): the shifted int64 indices and the bool mask of tokens
    outside this rank's rows.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        group: Group = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel and tp_size(group) > 1
        self.start, self.end = vocab_range(vocab_size, group)
        self.weight = nn.Parameter(
            torch.empty(self.end - self.start, hidden_size, device=device, dtype=dtype)
        )
        setattr(self.weight, SHARD_DIM_ATTR, 0)

    def forward(self, tokens: Tensor) -> Tensor:
        outside = (tokens < self.start) | (tokens >= self.end)
        local = (tokens - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(out, self.group)  # (B, T/t, H)
        return reduce_from_tp_region(out, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of logits split over the vocabulary (Megatron's formulation)."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, start: int, group: Group) -> Tensor:
        ctx.dtype = logits.dtype
        logits = logits.float()
        peak = logits.max(dim=-1).values
        _all_reduce(peak, group, dist.ReduceOp.MAX)
        shifted = logits - peak.unsqueeze(-1)
        outside = (targets < start) | (targets >= start + logits.shape[-1])
        local = (targets - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        _all_reduce(target_logit, group)
        exp = shifted.exp_()
        total = exp.sum(dim=-1)
        _all_reduce(total, group)
        softmax = exp.div_(total.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, outside)
        return total.log_() - target_logit

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        softmax, local, outside = ctx.saved_tensors
        out = softmax.clone()
        rows = out.view(-1, out.shape[-1])
        hit = (~outside).view(-1).to(out.dtype)
        rows[torch.arange(rows.shape[0], device=rows.device), local.view(-1)] -= hit
        return (out * grad.unsqueeze(-1)).to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(logits: Tensor, targets: Tensor, start: int, group: Group) -> Tensor:
    """Per-token loss (fp32) of `logits` (..., V/t) holding vocabulary rows [start, start + V/t)."""
    out: Tensor = _VocabParallelCrossEntropy.apply(logits, targets, start, group)
    return out
