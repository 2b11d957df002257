"""The trials' optimizers: AdamW, and AdamW with its state sharded over the data-parallel ranks.

`DistributedAdamW` is Megatron's distributed optimizer (ZeRO-1): the parameters are viewed as one
flat vector padded to a multiple of the dp degree; rank r keeps AdamW's state (and an fp32 copy
of its slice to update) for elements [r*n/dp, (r+1)*n/dp) only, updates that slice from the
(already all-reduced) gradients, and the updated slices are all-gathered back into every rank's
parameters. AdamW is elementwise, so the training is the unsharded optimizer's. Gloo has no
reduce-scatter, so the gradients arrive by the all-reduce every dp run does; on NCCL a
reduce-scatter would move half the bytes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors


def make_optimizer(
    params: list[torch.nn.Parameter], *, lr: float, dp_group: Any, distributed: bool
) -> torch.optim.Optimizer | DistributedAdamW:
    if distributed and dp_group is not None and dist.get_world_size(dp_group) > 1:
        return DistributedAdamW(params, lr=lr, group=dp_group)
    return torch.optim.AdamW(params, lr=lr)


class DistributedAdamW:
    """AdamW over this dp rank's slice of the flat parameters; `step` all-gathers the result."""

    def __init__(self, params: list[torch.nn.Parameter], *, lr: float, group: Any) -> None:
        self.params, self.group = params, group
        dp, rank = dist.get_world_size(group), dist.get_rank(group)
        self.numel = sum(p.numel() for p in params)
        self.shard = -(-self.numel // dp)  # padded: every rank's slice has the same size
        self.start = rank * self.shard
        flat = self._padded(_flatten_dense_tensors([p.detach() for p in params]))
        self.slice = torch.nn.Parameter(flat[self.start : self.start + self.shard].clone())
        self.inner = torch.optim.AdamW([self.slice], lr=lr)
        self.dp = dp

    def _padded(self, flat: torch.Tensor) -> torch.Tensor:
        pad = self.shard * dist.get_world_size(self.group) - flat.numel()
        return torch.cat([flat, flat.new_zeros(pad)]) if pad else flat

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = self._padded(_flatten_dense_tensors(grads))
        self.slice.grad = flat[self.start : self.start + self.shard].clone()
        self.inner.step()
        slices = [torch.empty_like(self.slice) for _ in range(self.dp)]
        dist.all_gather(slices, self.slice.detach(), group=self.group)
        updated = torch.cat(slices)[: self.numel]
        offset = 0
        for p in self.params:
            p.copy_(updated[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
