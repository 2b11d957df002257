"""Frozen snapshots the store hands out, and the hashes that identify configs and hardware.

Records are plain values: a caller can keep, compare and pickle them; they never refer back to
the database, and changing the database never changes a record already returned.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from autotune.config import KNOBS, identity
from autotune.results import Status

FINISHED_STATUSES = tuple(s.value for s in Status)  # how a trial can end (autotune.results)
TRIAL_STATUSES = ("running", *FINISHED_STATUSES)
# What a page of trials can be sorted by (`BaseStore.trial_page`): a column, or a knob
PAGE_SORTS = ("id", "status", "tokens_per_s", "step_time_s", "mfu", "started_at", "finished_at")
PAGE_KNOBS = KNOBS
INTERRUPTED = "interrupted"


def canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no spaces, tuples as lists."""
    return json.dumps(
        value,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
        default=json_default,
    )


def json_default(value: Any) -> Any:
    """Numpy scalars (anything with `.item()`) as the Python number they hold."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of a normalised configuration dict's identity (the
    dict without knobs added later that hold their defaults: `autotune.config.identity`), so a
    configuration stored before such a knob existed keeps its hash."""
    return hashlib.sha256(canonical_json(identity(config)).encode()).hexdigest()


def fingerprint_hash(info: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of a hardware description dict."""
    return hashlib.sha256(canonical_json(info).encode()).hexdigest()


@dataclass(frozen=True)
class StudyRecord:
    name: str
    space: dict[str, Any]
    model: str
    cluster: str
    fingerprint: str
    created: datetime


@dataclass(frozen=True)
class PredictionRecord:
    study: str
    config: dict[str, Any]
    config_hash: str
    predicted: dict[str, Any]
    rank: int


@dataclass(frozen=True)
class TrialRecord:
    """One trial as measured; `stages` holds one dict per pipeline stage, in stage order.

    Each stage dict has `stage`, `peak_activation_bytes`, `peak_memory_bytes`, `evicted_bytes`
    and `predicted_peak_memory_bytes` (None where nothing was predicted).
    """

    id: int
    study: str
    config: dict[str, Any]
    config_hash: str
    fingerprint: str
    status: str
    error: str | None
    step_time_s: float | None
    tokens_per_s: float | None
    mfu: float | None
    achieved_tflops: float | None
    losses: list[float]
    stages: list[dict[str, Any]]
    predicted: dict[str, Any] | None
    optuna_number: int | None
    attempt: int
    worker: str | None
    started_at: datetime
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.status != "running"


@dataclass(frozen=True)
class LeaseRecord:
    """A study's lease: the campaign `holder` (a random id) runs it as process `pid` on `host`.

    `acquired_at` and `heartbeat_at` are aware UTC datetimes.
    """

    study: str
    holder: str
    host: str
    pid: int
    acquired_at: datetime
    heartbeat_at: datetime

    def abandoned(self, *, host: str, now: datetime, stale_after: float) -> bool:
        """Whether its campaign died, as seen from `host` at `now`: no heartbeat for `stale_after`
        seconds (killed, or its machine lost), or, held on `host` itself, its pid is gone."""
        if (now - self.heartbeat_at).total_seconds() > stale_after:
            return True
        return self.host == host and not _alive(self.pid)

    def refusal(self, now: datetime) -> str:
        """The rule of the `StoreError` (field `--study`) for a campaign that wants this study."""
        age = max(0.0, (now - self.heartbeat_at).total_seconds())
        return (
            f"study {self.study!r} is being run by another campaign (pid {self.pid} on {self.host}, "
            f"started {self.acquired_at:%Y-%m-%d %H:%M:%S} UTC, last heartbeat {age:.0f} s ago); "
            "wait for it to finish, or stop it"
        )


def _alive(pid: int) -> bool:
    if pid <= 0:  # not a process: os.kill(0, ...) would signal our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True
