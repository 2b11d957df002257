"""Megatron-style tensor parallelism (no sequence parallel): two autograd regions, two linears,
the vocabulary-parallel embedding and cross-entropy.

A column-parallel linear splits its output features over the `t` ranks of a group; a
row-parallel linear splits its input features and all-reduces the partial products. A block
calls `copy_to_tp_region` once on the (replicated) input of its column-parallel layers, so the
input gradient is summed over the ranks in backward, and the row-parallel layer ends with
`reduce_from_tp_region`. With no group, or a group of one rank, everything is a plain linear.

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

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

SHARD_DIM_ATTR = "tp_shard_dim"  # set on sharded parameters: the dim along which they are split
Group = dist.ProcessGroup | None


def tp_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def tp_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group) -> Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
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
    ) -> None:
        super().__init__()
        t = tp_size(group)
        local = _shard(out_features, t, "output features")
        self.weight = nn.Parameter(torch.empty(local, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(local, device=device, dtype=dtype)) if bias else None
        if t > 1:
            for p in (self.weight, self.bias):
                if p is not None:
                    setattr(p, SHARD_DIM_ATTR, 0)

    def forward(self, x: Tensor) -> Tensor:
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
    ) -> None:
        super().__init__()
        self.group = group
        t = tp_size(group)
        local = _shard(in_features, t, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, local, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        if t > 1:
            setattr(self.weight, SHARD_DIM_ATTR, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = reduce_from_tp_region(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


def vocab_range(vocab_size: int, group: Group) -> tuple[int, int]:
    """The [start, end) rows of the vocabulary this rank holds."""
    local = _shard(vocab_size, tp_size(group), "vocabulary")
    start = tp_rank(group) * local
    return start, start + local


class VocabParallelEmbedding(nn.Module):
    """Token embedding with its rows split over the group; the output is all-reduced (replicated).

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
    ) -> None:
        super().__init__()
        self.group = group
        self.start, self.end = vocab_range(vocab_size, group)
        self.weight = nn.Parameter(
            torch.empty(self.end - self.start, hidden_size, device=device, dtype=dtype)
        )
        setattr(self.weight, SHARD_DIM_ATTR, 0)

    def forward(self, tokens: Tensor) -> Tensor:
        outside = (tokens < self.start) | (tokens >= self.end)
        local = (tokens - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(out, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of logits split over the vocabulary (Megatron's formulation)."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, start: int, group: Group) -> Tensor:
        ctx.dtype = logits.dtype
        logits = logits.float()
        peak = logits.max(dim=-1).values
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - peak.unsqueeze(-1)
        outside = (targets < start) | (targets >= start + logits.shape[-1])
        local = (targets - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(target_logit, group=group)
        exp = shifted.exp_()
        total = exp.sum(dim=-1)
        dist.all_reduce(total, group=group)
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
