"""The one interpreter that runs any schedule's program on torch.distributed.

Each rank runs its pipeline stage's program (a list of `autotune.schedules.Action`) for one
training step. Point-to-point transfers are asynchronous (`isend` / `irecv`): a receive is
posted where the program says and waited on just before its data is used; sends are waited on
at the end of the step, or, for BPipe's bulk transfers (EV, RS), before the stage's next
allocating action that needs their room under the cap (see `autotune.schedules.memory`),
which is when their memory is released.

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

from autotune.schedules.ir import FAMILIES, SEMANTICS, Action, Kind
from autotune.schedules.memory import release_points
from autotune.timeline import span_kind
from trial_runners.memory import ActivationTracker

# Tags keep the messages between one pair of ranks apart within a step: one per transfer family.
_TAG = {kind: FAMILIES.index(row.family) for kind, row in SEMANTICS.items() if row.family is not None}


def _tag(kind: Kind, mb: int) -> int:
    return mb * len(FAMILIES) + _TAG[kind]


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


@dataclass
class _StepState:
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    recv_f: dict[int, tuple[torch.Tensor, _Once]] = field(default_factory=dict)
    recv_b: dict[int, tuple[torch.Tensor, _Once]] = field(default_factory=dict)
    send_f: dict[int, _Once] = field(default_factory=dict)
    sends: list[_Once] = field(default_factory=list)
    loads: dict[int, tuple[torch.Tensor, _Once]] = field(default_factory=dict)
    stashes: dict[int, tuple[torch.Tensor, _Once]] = field(default_factory=dict)
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

    `forward(x, targets)` is the stage module's forward. `inputs_for(mb)` gives the stage-0
    tokens and the last stage's targets of micro-batch `mb`. The loss of each micro-batch is
    scaled by `loss_scale` before backward (1 / (micro-batches x data-parallel replicas)), so
    gradients summed over micro-batches and replicas are those of the global-batch mean.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        program: Sequence[Action],
        *,
        cap: int | None,
        first: bool,
        last: bool,
        links: StageLinks,
        activation_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        tracker: ActivationTracker,
        loss_scale: float,
        action_times: dict[Kind, list[float]] | None = None,
    ) -> None:
        self.module = module
        self.program = list(program)
        self.releases = release_points(self.program, cap)
        self.first, self.last = first, last
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
                self._HANDLERS[action.kind](self, st, action.mb, batch)
                continue
            start = time.perf_counter()
            self._HANDLERS[action.kind](self, st, action.mb, batch)
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

    # -- compute ------------------------------------------------------------------------------
    def _forward(self, st: _StepState, mb: int, batch: Callable) -> None:
        tokens, targets = batch(mb)
        if self.first:
            x = tokens
        else:
            buf, work = st.recv_f.pop(mb)
            self._wait(st, work)
            x = buf.requires_grad_()
        with self.tracker.capture(mb):
            out = self.module(x, targets if self.last else None)
        st.inputs[mb] = x
        st.outputs[mb] = out
        if self.last:
            st.loss += float(out.detach()) * self.loss_scale

    def _backward(self, st: _StepState, mb: int, batch: Callable) -> None:
        if mb in st.loads:
            flat, work = st.loads.pop(mb)
            self._wait(st, work)
            self.tracker.drop(("load", mb))
            self.tracker.unpack(mb, flat)
        out = st.outputs.pop(mb)
        if self.last:
            torch.autograd.backward(out * self.loss_scale)
        else:
            grad, work = st.recv_b.pop(mb)
            self._wait(st, work)
            torch.autograd.backward(out, grad)
        self.tracker.release(mb)
        if self.first:
            del st.inputs[mb]  # other stages keep it: SB sends its .grad

    # -- pipeline transfers --------------------------------------------------------------------
    def _recv_f(self, st: _StepState, mb: int, batch: Callable) -> None:
        buf = torch.empty(self.activation_shape, dtype=self.dtype, device=self.device)
        st.recv_f[mb] = (buf, _Once(dist.irecv(buf, self.links.prev, tag=_tag(Kind.RECV_F, mb))))

    def _send_f(self, st: _StepState, mb: int, batch: Callable) -> None:
        work = _Once(dist.isend(st.outputs[mb].detach(), self.links.next, tag=_tag(Kind.SEND_F, mb)))
        st.send_f[mb] = work
        st.sends.append(work)

    def _recv_b(self, st: _StepState, mb: int, batch: Callable) -> None:
        buf = torch.empty(self.activation_shape, dtype=self.dtype, device=self.device)
        st.recv_b[mb] = (buf, _Once(dist.irecv(buf, self.links.next, tag=_tag(Kind.RECV_B, mb))))

    def _send_b(self, st: _StepState, mb: int, batch: Callable) -> None:
        x = st.inputs.pop(mb)
        assert x.grad is not None
        st.sends.append(_Once(dist.isend(x.grad, self.links.prev, tag=_tag(Kind.SEND_B, mb))))

    # -- BPipe ---------------------------------------------------------------------------------
    def _evict(self, st: _StepState, mb: int, batch: Callable) -> None:
        send_f = st.send_f.get(mb)
        if send_f is not None:
            self._wait(st, send_f)  # the activation sent downstream may share these storages
        flat = self.tracker.pack(mb)
        if flat.numel() != self.links.partner_mb_bytes:
            raise RuntimeError(
                f"micro-batch {mb} saved {flat.numel()} bytes but the partner was told "
                f"{self.links.partner_mb_bytes}: micro-batches of one stage must be alike"
            )
        self.tracker.free_storages(mb)
        key = ("evict", mb)
        self.tracker.hold(key, flat.numel())  # counted until the transfer is waited on
        work = _Once(dist.isend(flat, self.links.partner, tag=_tag(Kind.EVICT, mb)))
        st.evicted_bytes += flat.numel()
        st.outgoing.append((work, lambda: self.tracker.drop(key)))

    def _load(self, st: _StepState, mb: int, batch: Callable) -> None:
        flat = torch.empty(self.links.partner_mb_bytes, dtype=torch.uint8, device=self.device)
        self.tracker.hold(("load", mb), flat.numel())
        st.loads[mb] = (flat, _Once(dist.irecv(flat, self.links.partner, tag=_tag(Kind.LOAD, mb))))

    def _stash(self, st: _StepState, mb: int, batch: Callable) -> None:
        buf = torch.empty(self.links.partner_mb_bytes, dtype=torch.uint8, device=self.device)
        self.tracker.hold(("stash", mb), buf.numel())
        st.stashes[mb] = (buf, _Once(dist.irecv(buf, self.links.partner, tag=_tag(Kind.STASH, mb))))

    def _restore(self, st: _StepState, mb: int, batch: Callable) -> None:
        buf, work = st.stashes.pop(mb)
        self._wait(st, work)
        send = _Once(dist.isend(buf, self.links.partner, tag=_tag(Kind.RESTORE, mb)))
        key = ("stash", mb)
        st.outgoing.append((send, lambda: self.tracker.drop(key)))

    def _release_outgoing(self, st: _StepState) -> None:
        for work, release in st.outgoing:
            self._wait(st, work)
            release()
        st.outgoing.clear()

    _HANDLERS: dict[Kind, Callable] = {
        Kind.F: _forward,
        Kind.B: _backward,
        Kind.RECV_F: _recv_f,
        Kind.SEND_F: _send_f,
        Kind.RECV_B: _recv_b,
        Kind.SEND_B: _send_b,
        Kind.EVICT: _evict,
        Kind.LOAD: _load,
        Kind.STASH: _stash,
        Kind.RESTORE: _restore,
    }
