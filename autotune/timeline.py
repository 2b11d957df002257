"""Pipeline timelines: the span shape shared by the simulator and the executor, and their export.

A timeline is a list of spans, one row per pipeline stage: each a compute action (F, B), the
posting of a transfer (and, in the simulator, the transfer itself on its link), or a wait on a
transfer, in seconds since the step's start. The simulator makes them
(`autotune.estimate.simulate`, `record=True`), the executor records them for one measured step
of a real trial (`trial_runners.executor`), and a stored trial keeps both
(`{"measured": [...], "simulated": [...]}`); every renderer (the dashboard's charts, the
Chrome-trace download) takes this one shape. Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from autotune.schedules.ir import Kind

KINDS = ("compute", "transfer", "wait")
# A timeline longer than this is not kept (a 64-stage, 1,000-micro-batch step has ~500,000
# spans: tens of MB per trial); the dashboard then says none was recorded.
MAX_SPANS = 50_000


@dataclass(frozen=True)
class Span:
    """One interval of a timeline: a compute action on a stage, a transfer, or a wait."""

    stage: int
    label: str
    start: float
    end: float
    kind: str  # one of KINDS
    peer: int | None = None  # a transfer's other stage

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Span:
        kind = str(data["kind"])
        if kind not in KINDS:
            raise ValueError(f"span kind {kind!r} is not one of {', '.join(KINDS)}")
        peer = data.get("peer")
        return cls(int(data["stage"]), str(data["label"]), float(data["start"]), float(data["end"]), kind,
                   None if peer is None else int(peer))  # fmt: skip


def kept(rows: Sequence[Any]) -> list[Any]:
    """`rows` if a timeline that long is kept (`MAX_SPANS`), else none."""
    return list(rows) if len(rows) <= MAX_SPANS else []


def span_kind(kind: Kind) -> str:
    """The timeline kind of an action: F and B compute, every other action posts a transfer."""
    return "compute" if kind.is_compute else "transfer"


def spans(rows: Iterable[Mapping[str, Any]] | None) -> list[Span]:
    """Stored span dicts as spans (an absent timeline is empty)."""
    return [Span.from_dict(r) for r in rows or ()]


def step_time(timeline: Iterable[Span]) -> float:
    return max((s.end for s in timeline), default=0.0)


def chrome_trace(tracks: Mapping[str, Iterable[Span]], *, name: str = "") -> dict[str, Any]:
    """A Chrome trace (the JSON Perfetto and chrome://tracing open): one process per track
    ("measured", "simulated"), one thread per stage, complete ("X") events in microseconds."""
    events: list[dict[str, Any]] = []
    for pid, (track, rows) in enumerate(tracks.items(), start=1):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                       "args": {"name": f"{name} {track}".strip()}})  # fmt: skip
        stages: set[int] = set()
        for s in rows:
            stages.add(s.stage)
            args: dict[str, Any] = {"kind": s.kind}
            if s.peer is not None:
                args["peer"] = s.peer
            dur = max(0.0, s.end - s.start) * 1e6
            events.append({"ph": "X", "name": s.label, "cat": s.kind, "pid": pid, "tid": s.stage,
                           "ts": s.start * 1e6, "dur": dur, "args": args})  # fmt: skip
        for stage in sorted(stages):
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": stage,
                           "args": {"name": f"stage {stage}"}})  # fmt: skip
            events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": stage,
                           "args": {"sort_index": stage}})  # fmt: skip
    return {"traceEvents": events, "displayTimeUnit": "ms"}
