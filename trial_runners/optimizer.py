"""The trials' optimizers: AdamW over the parameters themselves (fp32 training) or over fp32
master copies of 16-bit parameters (mixed precision, as Megatron-LM), either whole or with its
state sharded over the data-parallel ranks (Megatron's distributed optimizer, ZeRO-1).

Mixed precision: each bf16 parameter has an fp32 master copy; its gradient of each micro-batch
is added into the master's fp32 gradient as soon as autograd has accumulated it (a
post-accumulate-grad hook, like Megatron's main_grad), so gradients accumulate, are reduced
over dp and summed for sequence parallelism in fp32; AdamW updates the masters and the
parameters are set to their rounding.

Sharded (`distributed`): the gradient tensors are viewed as one flat vector padded to a multiple
of the dp degree; rank r keeps AdamW's state (and an fp32 copy of its slice to update) for
elements [r*n/dp, (r+1)*n/dp) only, updates that slice from the (already all-reduced)
gradients, and the updated slices are all-gathered back into every rank's parameters. AdamW is
elementwise, so the training is the unsharded optimizer's. Gloo has no reduce-scatter, so the
gradients arrive by the all-reduce every dp run does; on NCCL a reduce-scatter would move half
the bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors

from trial_runners.tensor_parallel import SEQUENCE_PARALLEL_ATTR, SHARD_DIM_ATTR


class TrialOptimizer:
    """`grads` are the tensors whose `.grad` holds each parameter's gradient after a backward
    (the parameters, or their fp32 masters), in the parameters' order."""

    def __init__(
        self, params: list[torch.nn.Parameter], *, lr: float, dp_group: Any, distributed: bool
    ) -> None:
        self.params = params
        self.mixed = any(p.dtype != torch.float32 for p in params)
        self.grads: list[torch.Tensor]
        if self.mixed:
            self.grads = [_master(p) for p in params]
            for p, master in zip(params, self.grads, strict=True):
                p.register_post_accumulate_grad_hook(_accumulate_into(master))
        else:
            self.grads = list(params)
        self.group = (
            dp_group if distributed and dp_group is not None and dist.get_world_size(dp_group) > 1 else None
        )
        if self.group is None:
            self.inner = adamw(self.grads, lr)
            return
        dp, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.numel = sum(p.numel() for p in params)
        self.shard = -(-self.numel // dp)  # padded: every rank's slice has the same size
        self.start, self.dp = rank * self.shard, dp
        flat = self._padded(_flatten_dense_tensors([g.detach().float() for g in self.grads]))
        self.slice = torch.nn.Parameter(flat[self.start : self.start + self.shard].clone())
        self.inner = adamw([self.slice], lr)

    def _padded(self, flat: torch.Tensor) -> torch.Tensor:
        pad = self.shard * self.dp - flat.numel()
        return torch.cat([flat, flat.new_zeros(pad)]) if pad else flat

    def zero_grad(self) -> None:
        for t in {id(t): t for t in [*self.params, *self.grads]}.values():
            t.grad = None

    @torch.no_grad()
    def step(self) -> None:
        if self.group is None:
            self.inner.step()  # on the parameters themselves, or on the masters
            updated = [g.detach() for g in self.grads] if self.mixed else []
        else:
            grads = [g.grad if g.grad is not None else torch.zeros_like(g) for g in self.grads]
            flat = self._padded(_flatten_dense_tensors(grads))
            self.slice.grad = flat[self.start : self.start + self.shard].clone()
            self.inner.step()
            slices = [torch.empty_like(self.slice) for _ in range(self.dp)]
            dist.all_gather(slices, self.slice.detach(), group=self.group)
            whole = torch.cat(slices)[: self.numel]
            updated, offset = [], 0
            for g in self.grads:
                updated.append(whole[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            if self.mixed:
                for master, value in zip(self.grads, updated, strict=True):
                    master.copy_(value)
        for p, value in zip(self.params, updated, strict=False):
            p.copy_(value)  # the 16-bit rounding of the master, or the gathered slices


def adamw(params: Sequence[torch.Tensor], lr: float) -> torch.optim.AdamW:
    """AdamW; on a GPU its fused kernel (one pass over parameter, gradient and moments, as apex's
    FusedAdam in Megatron-LM, which the cost model's OPTIMIZER_STEP_BYTES counts)."""
    return torch.optim.AdamW(list(params), lr=lr, fused=all(p.is_cuda for p in params) or None)


def _master(p: torch.nn.Parameter) -> torch.nn.Parameter:
    master = torch.nn.Parameter(p.detach().float().clone())
    for attr in (SHARD_DIM_ATTR, SEQUENCE_PARALLEL_ATTR):
        if hasattr(p, attr):
            setattr(master, attr, getattr(p, attr))
    return master


def _accumulate_into(master: torch.Tensor) -> Any:
    def hook(p: torch.Tensor) -> None:
        assert p.grad is not None
        if master.grad is None:
            master.grad = p.grad.float()
        else:
            master.grad.add_(p.grad)
        p.grad = None

    return hook
