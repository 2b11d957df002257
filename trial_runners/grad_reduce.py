"""The data-parallel gradient all-reduce overlapped with the backward (`--overlap-grad-reduce`).

As torch DDP and Megatron-LM's `--overlap-grad-reduce`: the gradients are grouped into buckets
of about `bucket_elements` elements in the reverse order of the parameters (the order in which
the backward finishes them), and a bucket is all-reduced (asynchronously) as soon as every
gradient in it is final for the step, that is, has been accumulated once per micro-batch, while
the backward of the earlier layers goes on. `finish` launches what is left, waits, and writes
the sums back. Gradients are held by `holders` (the parameters, or their fp32 masters).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


class OverlappedGradReduce:
    def __init__(
        self,
        params: list[torch.nn.Parameter],
        holders: list[torch.Tensor],
        *,
        group: Any,
        accumulations: int,
        bucket_elements: int,
    ) -> None:
        self.group, self.accumulations = group, accumulations
        self.buckets: list[list[int]] = [[]]
        size = 0
        for i in reversed(range(len(params))):
            if self.buckets[-1] and size + params[i].numel() > bucket_elements:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(i)
            size += params[i].numel()
        self.bucket_of = {i: b for b, members in enumerate(self.buckets) for i in members}
        self.holders = holders
        self.counts = [0] * len(params)
        self.final = [0] * len(self.buckets)
        self.launched: dict[int, tuple[Any, torch.Tensor]] = {}
        for i, p in enumerate(params):  # after the optimizer's own hooks (mixed precision's masters)
            p.register_post_accumulate_grad_hook(self._hook(i))

    def _hook(self, i: int) -> Any:
        def hook(_: torch.Tensor) -> None:
            self.counts[i] += 1
            if self.counts[i] == self.accumulations:
                b = self.bucket_of[i]
                self.final[b] += 1
                if self.final[b] == len(self.buckets[b]):
                    self._launch(b)

        return hook

    def _launch(self, b: int) -> None:
        grads = [self._grad(i) for i in self.buckets[b]]
        flat = _flatten_dense_tensors(grads)
        self.launched[b] = (dist.all_reduce(flat, group=self.group, async_op=True), flat)

    def _grad(self, i: int) -> torch.Tensor:
        holder = self.holders[i]
        if holder.grad is None:
            holder.grad = torch.zeros_like(holder)
        return holder.grad

    @property
    def launched_during_backward(self) -> int:
        """Buckets whose all-reduce started before `finish` (this step)."""
        return len(self.launched)

    def finish(self) -> int:
        """Wait for every bucket (launching those not yet started), write the sums back, and
        reset for the next step; returns how many had started during the backward."""
        early = len(self.launched)
        for b in range(len(self.buckets)):
            if b not in self.launched:
                self._launch(b)
        for b, (work, flat) in self.launched.items():
            work.wait()
            grads = [self._grad(i) for i in self.buckets[b]]
            for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                grad.copy_(summed)
        self.launched.clear()
        self.counts = [0] * len(self.counts)
        self.final = [0] * len(self.buckets)
        return early
