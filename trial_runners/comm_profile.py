"""The gloo figures of a CPU profile (`measure_p2p`): bandwidth, a pipeline handoff's latency,
and the thread time of posting a send or receive (through the executor's own handlers), between
two local processes.

`python -m trial_runners.comm_profile FOLDER RANK WARMUP REPEATS` is one of the two processes.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autotune.schedules import generate
from autotune.schedules.ir import Kind
from trial_runners.executor import StageExecutor, StageLinks
from trial_runners.launch import job_folder, run_side_by_side, worker_env
from trial_runners.memory import ActivationTracker

COMM_SIZES = {"medium": 4 * 2**20, "large": 32 * 2**20}  # bytes per ping-pong message


def measure_p2p(*, warmup: int = 3, repeats: int = 10, timeout: float = 120.0) -> dict[str, float]:
    """Gloo send/recv between two local processes:
    {"p2p_bandwidth": B/s, "p2p_latency": s, "p2p_post": s}.

    Bandwidth: ping-pong (rank 0 sends, rank 1 sends it back) of a 4 MiB and a 32 MiB tensor
    (`repeats` times each after `warmup` round trips); half the median round trip is the one-way
    time, and bandwidth is the slope between the two, (32 MiB - 4 MiB) / (t32 - t4), so latency
    noise (on a busy machine, scheduler wake-ups of a few ms) cancels out.

    Latency: a pipeline's handoffs, as two pipeline stages make them (`_handoffs`): rank 0
    computes, sends an activation-sized (`HANDOFF_BYTES`) message and computes again before it
    waits for the reply; rank 1 waits for it, computes, and replies. Both compute at the thread
    count a trial gives each of two ranks, so a message is sent by a busy rank to a waiting one,
    as in a pipeline, and the gloo threads compete with compute for the cores. `p2p_latency` is
    the median time from a send's post returning to the waiting receiver resuming, less the
    message's bytes over the bandwidth (`transfer_s` adds them back); 0-50 us here.

    Post: `StageExecutor` itself runs a two-stage 1F1B pipeline (`_executor_posts`: `repeats`
    steps of 8 micro-batches, activation-sized messages, ~2 ms of compute per forward) and times
    its send and receive actions; `p2p_post` is their mean (a step pays every call, the slow ones
    too). Here (2 cores) such an action takes 0.1-0.4 ms while both ranks compute, where a bare
    `isend` / `irecv` call between otherwise idle processes takes 40-90 us; it is paid twice per
    micro-batch on a pipeline's critical stage.
    """
    with job_folder("autotune-profile-comm-") as folder:
        tmp = str(folder)
        env = worker_env(2, "cpu")
        env["GLOO_SOCKET_IFNAME"] = "lo"
        args = [[tmp, str(rank), str(warmup), str(repeats)] for rank in range(2)]
        what = "gloo p2p measurement"
        run_side_by_side("trial_runners.comm_profile", args, folder, env, what, timeout=timeout)
        measured = json.loads((folder / "p2p.json").read_text())
    extra = COMM_SIZES["large"] - COMM_SIZES["medium"]
    slope = measured["large"] - measured["medium"]
    # Where noise swamped the difference, the large message's average rate instead.
    bandwidth = extra / slope if slope > 0 else COMM_SIZES["large"] / measured["large"]
    latency = max(0.0, measured["handoff"] - HANDOFF_BYTES / bandwidth)
    return {"p2p_bandwidth": bandwidth, "p2p_latency": latency, "p2p_post": measured["post"]}


HANDOFF_BYTES = 64 * 2**10  # an activation of a small model's micro-batch
HANDOFF_COMPUTE_S = 0.002  # compute between handoffs, about a small layer's forward


def _compute(a: torch.Tensor, seconds: float) -> torch.Tensor:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        a = torch.tanh(a @ a.T * 0.01)
    return a


def _handoffs(rank: int, count: int, warmup: int) -> list[list[float]]:
    """The pipeline pattern of `measure_p2p`, `count` handoffs each way after `warmup`: [when
    each of this rank's sends' posts returned, when it began waiting for each receive, when that
    wait returned]. Times are `time.monotonic()`, one clock for both processes."""
    peer = 1 - rank
    msg = torch.zeros(HANDOFF_BYTES // 4)
    a = torch.randn(128, 128)
    sent: list[float] = []
    waited: list[float] = []
    resumed: list[float] = []

    def post(fn: Callable[..., Any], tag: int) -> Any:
        work = fn(msg, peer, tag=tag)
        return work, time.monotonic()

    def wait(work: Any) -> tuple[float, float]:
        t0 = time.monotonic()
        work.wait()
        return t0, time.monotonic()

    for i in range(warmup + count):
        if rank == 0:  # forward, send the activation, the next compute, wait for the gradient
            a = _compute(a, HANDOFF_COMPUTE_S)
            send, t_sent = post(dist.isend, 2 * i)
            recv, _ = post(dist.irecv, 2 * i + 1)
            a = _compute(a, HANDOFF_COMPUTE_S)
            t_wait = wait(recv)
            send.wait()
        else:  # wait for the activation, compute, send the gradient
            recv, _ = post(dist.irecv, 2 * i)
            t_wait = wait(recv)
            a = _compute(a, HANDOFF_COMPUTE_S)
            send, t_sent = post(dist.isend, 2 * i + 1)
            send.wait()
        if i < warmup:
            continue
        sent.append(t_sent)
        waited.append(t_wait[0])
        resumed.append(t_wait[1])
    return [sent, waited, resumed]


TRANSFERS = (Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B)
POST_MICROBATCHES = 8
_POST_SHAPE = (1, HANDOFF_BYTES // 4 // 128, 128)  # one activation-sized fp32 message


class _StandIn(nn.Module):
    """A pipeline stage's stand-in for `_executor_posts`: matmuls on an activation-sized tensor,
    about HANDOFF_COMPUTE_S of forward; the first stage starts from its tokens, the last returns
    a loss."""

    def __init__(self, *, first: bool, last: bool, layers: int = 24) -> None:
        super().__init__()
        self.first, self.last, self.layers = first, last, layers
        self.weight = nn.Parameter(torch.randn(_POST_SHAPE[-1], _POST_SHAPE[-1]) / _POST_SHAPE[-1] ** 0.5)
        self.bias = nn.Parameter(torch.zeros(_POST_SHAPE[-1]))

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        h = self.bias.expand(_POST_SHAPE) + x.float()[..., None] if self.first else x
        for _ in range(self.layers):
            h = torch.tanh(h @ self.weight)
        return h.square().mean() if self.last else h


def _executor_posts(rank: int, steps: int, warmup: int) -> list[float]:
    """This rank's send and receive actions' durations in `steps` 1F1B steps (after `warmup`) of
    a two-stage pipeline run by `StageExecutor`, as a trial's are."""
    first, last = rank == 0, rank == 1
    module = _StandIn(first=first, last=last)
    schedule = generate("1f1b", 2, POST_MICROBATCHES)
    times: dict[Kind, list[float]] = {}
    executor = StageExecutor(
        module,
        schedule.program(rank),
        cap=schedule.cap,
        stages=(rank,),
        num_model_stages=2,
        links=StageLinks(prev=None if first else 0, next=1 if first else None, partner=None),
        activation_shape=_POST_SHAPE,
        dtype=torch.float32,
        device=torch.device("cpu"),
        tracker=ActivationTracker.for_module(module),
        loss_scale=1.0 / POST_MICROBATCHES,
        action_times=times,
    )
    tokens = torch.zeros(_POST_SHAPE[:2], dtype=torch.long)
    for step in range(warmup + steps):
        if step == warmup:
            times.clear()
        dist.barrier()
        executor.run_step(lambda mb: (tokens, tokens))
        module.zero_grad(set_to_none=True)
    return [t for kind in TRANSFERS for t in times.get(kind, [])]


def _p2p_worker(folder: str, rank: int, warmup: int, repeats: int) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # a trial's ranks when two share the cores
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        out: dict[str, float] = {}
        for name, nbytes in COMM_SIZES.items():
            buf = torch.zeros(nbytes, dtype=torch.uint8)
            times = []
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                if rank == 0:
                    dist.send(buf, 1)
                    dist.recv(buf, 1)
                else:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            out[name] = statistics.median(times) / 2
        mine = torch.tensor(_handoffs(rank, 4 * repeats, warmup), dtype=torch.float64)
        posts = torch.tensor(_executor_posts(rank, repeats, 1), dtype=torch.float64)
        if rank == 1:
            dist.send(mine, 0)
            dist.send(posts, 0)
        else:
            theirs, their_posts = torch.empty_like(mine), torch.empty_like(posts)
            dist.recv(theirs, 1)
            dist.recv(their_posts, 1)
            sent, waited, resumed = mine.tolist()
            their_sent, their_waited, their_resumed = theirs.tolist()
            # Message i of rank 0 (sent at sent[i]) resumed rank 1 at their_resumed[i]; rank 1's
            # reply resumed rank 0 at resumed[i]. Only where the receiver was already waiting.
            pairs = [
                *zip(sent, their_waited, their_resumed, strict=True),
                *zip(their_sent, waited, resumed, strict=True),
            ]
            delays = [r - s for s, w, r in pairs if w <= s]
            out["handoff"] = statistics.median(delays) if delays else 0.0
            out["post"] = statistics.fmean(posts.tolist() + their_posts.tolist())
        dist.barrier()
        if rank == 0:
            (Path(folder) / "p2p.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit("usage: python -m trial_runners.comm_profile FOLDER RANK WARMUP REPEATS")
    _p2p_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
