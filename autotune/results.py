"""A trial's result: one typed record from the trial runners through dispatch to the store.

`TrialResult.to_dict()` is the JSON `autotune trial --json` prints (contracts.md, "autotune
trial"), and what crosses a process boundary (a Ray task's return value); `TrialResult.from_dict`
reads it back. Torch-free.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from autotune.timeline import Span


class Status(enum.StrEnum):
    """How a trial ended."""

    OK = "ok"
    OOM = "oom"  # over the device's memory, or over --memory-limit
    FAILED = "failed"
    TIMEOUT = "timeout"

    @classmethod
    def parse(cls, value: Any) -> Status:
        """`value` as a status; ValueError naming it where it is none of them."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"trial result status {value!r} is not one of {', '.join(repr(s.value) for s in cls)}"
            ) from None


@dataclass(frozen=True)
class StageResult:
    """One pipeline stage's measured memory.

    Attributes:
        stage: 0..pp-1.
        peak_activation_bytes: max over the step of live saved-for-backward bytes on that stage,
            including activations stashed there for a partner.
        peak_memory_bytes: activations + parameters + gradients + optimizer state (+ measured
            device peak on GPU).
        evicted_bytes: bytes this stage sent to its partner per step (BPipe), else 0.
    """

    stage: int
    peak_activation_bytes: int
    peak_memory_bytes: int
    evicted_bytes: int

    def to_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageResult:
        """The inverse of `to_dict`; ValueError for a missing or unknown key."""
        names = [f.name for f in fields(cls)]
        _refuse_unknown(data, names, "trial result stage")
        missing = [k for k in names if k not in data]
        if missing:
            raise ValueError(f"trial result stage {dict(data)!r} lacks {', '.join(missing)}")
        return cls(**{k: int(data[k]) for k in names})


@dataclass(frozen=True)
class TrialResult:
    """A trial's outcome; a failed one (any status but ok) carries no measurements.

    Attributes:
        status: ok, oom, failed or timeout.
        error: None or a one-line reason.
        config: every flag of `autotune trial`, normalised (ints, names), plus "world_size"
            (`TrialConfig.to_dict()`).
        step_time_s: median wall time of the measured steps.
        tokens_per_s: global tokens per second.
        achieved_tflops: model FLOPs per second over all ranks (6N+attention, x4/3 with full
            recompute).
        mfu: None where the device's peak is unknown.
        losses: loss of every step (warm-up first).
        stages: one per pipeline stage, in stage order.
        timeline: the last measured step, one span dict per action and wait on each stage's
            first rank (`autotune.timeline.Span`; seconds since the ranks left the step's barrier).
    """

    status: Status
    error: str | None
    config: dict[str, Any]
    step_time_s: float | None
    tokens_per_s: float | None
    achieved_tflops: float | None
    mfu: float | None
    losses: tuple[float, ...]
    stages: tuple[StageResult, ...]
    timeline: tuple[dict[str, Any], ...] = ()

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @classmethod
    def failure(cls, config: dict[str, Any], *, status: Status | str, reason: str | None) -> TrialResult:
        """A trial of `config` that ended with `status` (not ok) for `reason`: nothing measured."""
        status = Status.parse(status)
        if status is Status.OK:
            raise ValueError(f"a failed trial cannot have status {status.value!r}")
        return cls(status, reason, copy.deepcopy(config), None, None, None, None, (), ())

    def to_dict(self) -> dict[str, Any]:
        """The JSON of `autotune trial --json` (contracts.md): plain strings, numbers, lists."""
        return {
            "status": self.status.value,
            "error": self.error,
            "config": copy.deepcopy(self.config),
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "achieved_tflops": self.achieved_tflops,
            "mfu": self.mfu,
            "losses": list(self.losses),
            "stages": [st.to_dict() for st in self.stages],
            "timeline": [dict(span) for span in self.timeline],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialResult:
        """The inverse of `to_dict`. ValueError for an unknown status or key; a key it lacks
        (other than status) means nothing there: None, an empty config, no losses, no stages."""
        _refuse_unknown(data, [f.name for f in fields(cls)], "trial result")
        error = data.get("error")
        return cls(
            status=Status.parse(data.get("status")),
            error=None if error is None else str(error),
            config=copy.deepcopy(dict(data.get("config") or {})),
            step_time_s=_optional_float(data.get("step_time_s")),
            tokens_per_s=_optional_float(data.get("tokens_per_s")),
            achieved_tflops=_optional_float(data.get("achieved_tflops")),
            mfu=_optional_float(data.get("mfu")),
            losses=tuple(float(x) for x in data.get("losses") or ()),
            stages=tuple(StageResult.from_dict(st) for st in data.get("stages") or ()),
            timeline=tuple(Span.from_dict(s).to_dict() for s in data.get("timeline") or ()),
        )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _refuse_unknown(data: Mapping[str, Any], names: Iterable[str], what: str) -> None:
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{what} has unknown key(s) {', '.join(map(repr, unknown))}")
