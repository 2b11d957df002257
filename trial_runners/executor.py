"""The one interpreter that runs any schedule's program on torch.distributed.

Each rank runs its pipeline stage's program (a list of `autotune.schedules.Action`) for one
training step, over one model chunk, or several (the interleaved schedule: chunk c of the rank
is model stage `stages[c]`; an action names its chunk).

Point-to-point transfers are asynchronous (`isend` / `irecv`): a receive is posted where the
program says and waited on just before its data is used; sends are waited on at the end of the
step, or, for BPipe's bulk transfers (EV, RS), before the stage's next allocating action that
needs their room under the cap (see `autotune.schedules.memory`), which is when their memory is
released.

`action_times`, where given, collects each action's thread time by kind (the profile measures the
cost of posting a transfer through these very handlers: `trial_runners.comm_profile`).

`run_step(batch, timeline=origin)` also records the step's timeline: one span per action and one
per wait on a transfer, in seconds since `origin` (a `time.perf_counter()` taken as every rank
leaves the step's barrier), in the simulator's span shape (`autotune.timeline`), so the measured
step and the simulated one are drawn by the same renderers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from autotune.schedules.ir import FAMILIES, SEMANTICS, Action, Kind, taken_over
from autotune.schedules.memory import release_points
from autotune.timeline import span_kind
from trial_runners.memory import ActivationTracker

# Tags keep the messages between one pair of ranks apart within a step: one per transfer family,
# micro-batch and boundary between model stages (j: between stages j and j + 1).
_FAMILY = {kind: FAMILIES.index(row.family) for kind, row in SEMANTICS.items() if row.family is not None}
# the boundary a pipeline transfer crosses, from this end's stage g: a send forward or a receive of
# a gradient is g's own boundary, a receive forward or a send back the one before (BPipe's pair
# transfers: 0, as each pair has one link of its own)
_BOUNDARY = {Kind.SEND_F: 0, Kind.RECV_B: 0, Kind.RECV_F: -1, Kind.SEND_B: -1}


def _tag(kind: Kind, mb: int, stage: int, num_model_stages: int) -> int:
    boundary = stage + _BOUNDARY[kind] if kind in _BOUNDARY else 0
    return (mb * num_model_stages + boundary) * len(FAMILIES) + _FAMILY[kind]


@dataclass(frozen=True)
class StageLinks:
    """Global ranks this rank exchanges with (None where there is no such peer)."""

    prev: int | None
    next: int | None
    partner: int | None
    partner_mb_bytes: int = 0  # saved bytes of one of the partner's micro-batches (stash size)


class _Once:
    """A transfer handle whose `wait` may be called more than once (gloo's may not)."""

    def __init__(self, work: dist.Work | None) -> None:
        assert work is not None, "point-to-point op returned no work handle"
        self.work: dist.Work | None = work

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None


Key = tuple[int, int]  # (micro-batch, chunk)


@dataclass
class _StepState:
    inputs: dict[Key, torch.Tensor] = field(default_factory=dict)
    outputs: dict[Key, torch.Tensor] = field(default_factory=dict)
    recv_f: dict[Key, tuple[torch.Tensor, _Once]] = field(default_factory=dict)
    recv_b: dict[Key, tuple[torch.Tensor, _Once]] = field(default_factory=dict)
    send_f: dict[Key, _Once] = field(default_factory=dict)
    sends: list[_Once] = field(default_factory=list)
    loads: dict[Key, tuple[torch.Tensor, _Once]] = field(default_factory=dict)
    stashes: dict[Key, tuple[torch.Tensor, _Once]] = field(default_factory=dict)
    # what a split backward leaves its W: the weight gradients' inputs (torch's param groups);
    # None on the first stage, whose W runs the whole backward (it has no input gradient to send)
    weights: dict[Key, tuple[torch.Tensor, torch.Tensor | None, list[dict] | None]] = field(
        default_factory=dict
    )
    # Outgoing bulk transfers whose memory is released at the next allocating action.
    outgoing: list[tuple[_Once, Callable[[], None]]] = field(default_factory=list)
    loss: float = 0.0
    evicted_bytes: int = 0
    # the timeline being recorded: (label, start, end, kind) since `origin`; None when not
    spans: list[tuple[str, float, float, str]] | None = None
    origin: float = 0.0
    action: Action | None = None  # the action running (a wait is labelled with it)
    waited: float = 0.0  # when its last wait ended


class StageExecutor:
    """Runs one stage's program for a step: compute, transfers, eviction, accounting.

    `module` is the rank's stage (`module(x, targets)`), or a ModuleList of its chunks, chunk c
    being model stage `stages[c]` of `num_model_stages` (the first takes tokens, the last gives
    the loss). `batch(mb)` gives the tokens and targets of micro-batch `mb`. The loss of each
    micro-batch is scaled by `loss_scale` before backward (1 / (micro-batches x data-parallel
    replicas)), so gradients summed over micro-batches and replicas are those of the global-batch
    mean.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        program: Sequence[Action],
        *,
        cap: int | None,
        stages: Sequence[int],
        num_model_stages: int,
        links: StageLinks,
        activation_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        tracker: ActivationTracker,
        loss_scale: float,
        action_times: dict[Kind, list[float]] | None = None,
    ) -> None:
        self.module = module
        self.chunks = list(module) if isinstance(module, torch.nn.ModuleList) else [module]
        if len(self.chunks) != len(stages):
            raise ValueError(f"{len(self.chunks)} model chunks for {len(stages)} stages")
        self.stages, self.num_model_stages = tuple(stages), num_model_stages
        self.firsts = [g == 0 for g in stages]
        self.lasts = [g == num_model_stages - 1 for g in stages]
        self.program = list(program)
        self.releases = release_points(self.program, cap)
        self.split = taken_over(self.program)  # backwards whose weight gradients a W computes
        self.links = links
        self.activation_shape = activation_shape
        self.dtype, self.device = dtype, device
        self.tracker = tracker
        self.loss_scale = loss_scale
        self.action_times = action_times

    def run_step(
        self, batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], *, timeline: float | None = None
    ) -> tuple[float, int]:
        """Run the program once; returns (sum of scaled micro-batch losses, evicted bytes).

        With `timeline` (the step's origin, a `time.perf_counter()`), the spans are kept in
        `self.timeline` afterwards (see the module's docstring)."""
        st = _StepState()
        if timeline is not None:
            st.spans, st.origin = [], timeline
        for action, release in zip(self.program, self.releases, strict=True):
            st.action = action
            if release:
                self._release_outgoing(st)
            if self.action_times is None and st.spans is None:
                self._HANDLERS[action.kind](self, st, action, batch)
                continue
            start = time.perf_counter()
            self._HANDLERS[action.kind](self, st, action, batch)
            end = time.perf_counter()
            if self.action_times is not None:
                self.action_times.setdefault(action.kind, []).append(end - start)
            if st.spans is not None:  # the action's own span begins where its waits end
                begin = max(start, st.waited) - st.origin
                st.spans.append((str(action), begin, end - st.origin, span_kind(action.kind)))
        st.action = None
        self._release_outgoing(st)
        for work in st.sends:
            self._wait(st, work)
        self.timeline = st.spans
        return st.loss, st.evicted_bytes

    timeline: list[tuple[str, float, float, str]] | None = None  # the last recorded step's spans

    @staticmethod
    def _wait(st: _StepState, work: _Once) -> None:
        """Wait on a transfer; while recording, the time spent is a wait span."""
        if st.spans is None or work.work is None:
            work.wait()
            return
        start = time.perf_counter()
        work.wait()
        st.waited = end = time.perf_counter()
        if end - start > 20e-6:  # a transfer already done is no wait
            label = "wait " + (str(st.action) if st.action is not None else "sends")
            st.spans.append((label, start - st.origin, end - st.origin, "wait"))

    def _tag(self, action: Action) -> int:
        return _tag(action.kind, action.mb, self.stages[action.chunk], self.num_model_stages)

    # -- compute ------------------------------------------------------------------------------
    def _forward(self, st: _StepState, action: Action, batch: Callable) -> None:
        mb, c = action.mb, action.chunk
        key = (mb, c)
        first, last = self.firsts[c], self.lasts[c]
        tokens, targets = batch(mb)
        if first:
            x = tokens
        else:
            buf, work = st.recv_f.pop(key)
            self._wait(st, work)
            x = buf.requires_grad_()
        with self.tracker.capture(key):
            out = self.chunks[c](x, targets if last else None)
        st.inputs[key] = x
        st.outputs[key] = out
        if last:
            st.loss += float(out.detach()) * self.loss_scale

    def _backward(self, st: _StepState, action: Action, batch: Callable) -> None:
        key = (action.mb, action.chunk)
        if key in st.loads:
            flat, work = st.loads.pop(key)
            self._wait(st, work)
            self.tracker.drop(("load", key))
            self.tracker.unpack(key, flat)
        out = st.outputs.pop(key)
        grad = None
        if self.lasts[action.chunk]:
            out = out * self.loss_scale
        else:
            grad, work = st.recv_b.pop(key)
            self._wait(st, work)
        if action in self.split:
            self._input_gradient(st, action, out, grad)
            return
        torch.autograd.backward(out, grad)
        self.tracker.release(key)
        if self.firsts[action.chunk]:
            del st.inputs[key]  # other stages keep it: SB sends its .grad

    def _input_gradient(
        self, st: _StepState, action: Action, out: torch.Tensor, grad: torch.Tensor | None
    ) -> None:
        """B of a split backward: the input's gradient only (torch.distributed.pipelining's
        `stage_backward_input`), the graph kept for the weight gradients of its W."""
        key, chunk = (action.mb, action.chunk), self.chunks[action.chunk]
        if self.firsts[action.chunk]:  # nothing to send back: W runs the whole backward
            del st.inputs[key]
            st.weights[key] = (out, grad, None)
            return
        x = st.inputs[key]
        dx, groups = stage_backward_input([out], None if grad is None else [grad], [x], chunk.parameters())
        x.grad = dx[0]
        st.weights[key] = (out, grad, groups)

    def _weight(self, st: _StepState, action: Action, batch: Callable) -> None:
        """W: the weight gradients its B left (`stage_backward_weight`); the graph is freed."""
        out, grad, groups = st.weights.pop((action.mb, action.chunk))
        if groups is None:
            torch.autograd.backward(out, grad)
        else:
            stage_backward_weight(self.chunks[action.chunk].parameters(), groups)
        del out, grad, groups
        self.tracker.release((action.mb, action.chunk))

    # -- pipeline transfers --------------------------------------------------------------------
    def _recv_f(self, st: _StepState, action: Action, batch: Callable) -> None:
        buf = torch.empty(self.activation_shape, dtype=self.dtype, device=self.device)
        work = _Once(dist.irecv(buf, self.links.prev, tag=self._tag(action)))
        st.recv_f[action.mb, action.chunk] = (buf, work)

    def _send_f(self, st: _StepState, action: Action, batch: Callable) -> None:
        key = (action.mb, action.chunk)
        work = _Once(dist.isend(st.outputs[key].detach(), self.links.next, tag=self._tag(action)))
        st.send_f[key] = work
        st.sends.append(work)

    def _recv_b(self, st: _StepState, action: Action, batch: Callable) -> None:
        buf = torch.empty(self.activation_shape, dtype=self.dtype, device=self.device)
        work = _Once(dist.irecv(buf, self.links.next, tag=self._tag(action)))
        st.recv_b[action.mb, action.chunk] = (buf, work)

    def _send_b(self, st: _StepState, action: Action, batch: Callable) -> None:
        x = st.inputs.pop((action.mb, action.chunk))
        assert x.grad is not None
        st.sends.append(_Once(dist.isend(x.grad, self.links.prev, tag=self._tag(action))))

    # -- BPipe ---------------------------------------------------------------------------------
    def _evict(self, st: _StepState, action: Action, batch: Callable) -> None:
        key = (action.mb, action.chunk)
        send_f = st.send_f.get(key)
        if send_f is not None:
            self._wait(st, send_f)  # the activation sent downstream may share these storages
        flat = self.tracker.pack(key)
        if flat.numel() != self.links.partner_mb_bytes:
            raise RuntimeError(
                f"micro-batch {action.mb} saved {flat.numel()} bytes but the partner was told "
                f"{self.links.partner_mb_bytes}: micro-batches of one stage must be alike"
            )
        self.tracker.free_storages(key)
        held = ("evict", key)
        self.tracker.hold(held, flat.numel())  # counted until the transfer is waited on
        work = _Once(dist.isend(flat, self.links.partner, tag=self._tag(action)))
        st.evicted_bytes += flat.numel()
        st.outgoing.append((work, lambda: self.tracker.drop(held)))

    def _load(self, st: _StepState, action: Action, batch: Callable) -> None:
        key = (action.mb, action.chunk)
        flat = torch.empty(self.links.partner_mb_bytes, dtype=torch.uint8, device=self.device)
        self.tracker.hold(("load", key), flat.numel())
        st.loads[key] = (flat, _Once(dist.irecv(flat, self.links.partner, tag=self._tag(action))))

    def _stash(self, st: _StepState, action: Action, batch: Callable) -> None:
        key = (action.mb, action.chunk)
        buf = torch.empty(self.links.partner_mb_bytes, dtype=torch.uint8, device=self.device)
        self.tracker.hold(("stash", key), buf.numel())
        st.stashes[key] = (buf, _Once(dist.irecv(buf, self.links.partner, tag=self._tag(action))))

    def _restore(self, st: _StepState, action: Action, batch: Callable) -> None:
        key = (action.mb, action.chunk)
        buf, work = st.stashes.pop(key)
        self._wait(st, work)
        send = _Once(dist.isend(buf, self.links.partner, tag=self._tag(action)))
        held = ("stash", key)
        st.outgoing.append((send, lambda: self.tracker.drop(held)))

    def _release_outgoing(self, st: _StepState) -> None:
        for work, release in st.outgoing:
            self._wait(st, work)
            release()
        st.outgoing.clear()

    _HANDLERS: dict[Kind, Callable] = {
        Kind.F: _forward,
        Kind.B: _backward,
        Kind.W: _weight,
        Kind.RECV_F: _recv_f,
        Kind.SEND_F: _send_f,
        Kind.RECV_B: _recv_b,
        Kind.SEND_B: _send_b,
        Kind.EVICT: _evict,
        Kind.LOAD: _load,
        Kind.STASH: _stash,
        Kind.RESTORE: _restore,
    }
