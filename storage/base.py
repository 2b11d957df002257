"""The store's contract: a small abstract core, and conveniences built only on that core.

Contract, for every backend:

- Thread and process safety: any number of threads and processes may use stores opened on the
  same URL at once; concurrent writers queue, none fails for contention.
- Returned records are frozen snapshots (`storage.records`); no database object ever leaves
  the store, and later writes never change a record already returned.
- Every write is one transaction: it happens completely or not at all.
- A finished trial is immutable: finishing it again raises `FinishedTrialError` and changes
  nothing. A campaign killed at any moment therefore loses no finished trial; its running
  trials are closed as failed ("interrupted") by `interrupt_running`.
- Bad user input (a URL, a clashing study name) raises `StoreError`, one line, nothing written.
  An unknown trial, study or fingerprint raises `NotFoundError`. A database that cannot take a
  write or a read (a full disk, a read-only or damaged database) raises `StoreError` too, and
  the transaction it broke leaves nothing behind.
- One campaign per study: a study has at most one lease. Of any number of campaigns racing to
  `acquire_lease` it, exactly one wins; the others get `StoreError` naming the winner. A lease
  whose heartbeat is older than `stale_after` seconds, or whose process is gone from this host,
  is taken over. Lease times are UTC from the clocks of the hosts that write them.
"""

from __future__ import annotations

import abc
import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from autotune.results import TrialResult
from storage.errors import StoreError
from storage.records import INTERRUPTED, LeaseRecord, PredictionRecord, StudyRecord, TrialRecord


class BaseStore(abc.ABC):
    """What a store keeps: hardware, studies, predictions, trials, profiles and timelines."""

    url: str

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def register_fingerprint(self, info: dict[str, Any]) -> str:
        """Keep a hardware description (idempotent); returns its hash."""

    @abc.abstractmethod
    def fingerprint(self, key: str) -> dict[str, Any] | None:
        """The hardware description registered under `key` (None if there is none)."""

    @abc.abstractmethod
    def create_study(
        self, name: str, *, space: dict[str, Any], model: str, cluster: str, fingerprint: str
    ) -> StudyRecord:
        """Create a study, or return it if one with the same name and fields exists."""

    @abc.abstractmethod
    def studies(self) -> list[StudyRecord]: ...

    @abc.abstractmethod
    def save_predictions(self, study: str, rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        """Replace the study's predictions by `(config, predicted)` rows, best first."""

    @abc.abstractmethod
    def predictions(
        self, study: str | None = None, *, model: str | None = None, cluster: str | None = None
    ) -> list[PredictionRecord]:
        """Predictions by study, then rank; filtered by the study's name, model or cluster."""

    @abc.abstractmethod
    def start_trial(
        self,
        study: str,
        *,
        config: dict[str, Any],
        fingerprint: str,
        predicted: dict[str, Any] | None = None,
        optuna_number: int | None = None,
        attempt: int = 1,
        worker: str | None = None,
    ) -> int:
        """Record a running trial; returns its id."""

    @abc.abstractmethod
    def finish_trial(
        self,
        trial_id: int,
        result: TrialResult | dict[str, Any],
        *,
        attempt: int | None = None,
        worker: str | None = None,
        simulated: list[dict[str, Any]] | None = None,
    ) -> TrialRecord:
        """Record a running trial's result, atomically: the record, or its JSON (`autotune
        trial`'s, read with `TrialResult.from_dict`: ValueError for a bad status, nothing written);
        `attempt` and `worker` (where it ran) replace the values given at its start; the result's
        measured timeline and `simulated` beside it become the trial's `timeline`."""

    @abc.abstractmethod
    def interrupt_running(self, study: str) -> list[TrialRecord]:
        """Close the study's running trials as failed, error "interrupted"."""

    @abc.abstractmethod
    def trial(self, trial_id: int) -> TrialRecord: ...

    @abc.abstractmethod
    def trials(
        self,
        *,
        study: str | None = None,
        model: str | None = None,
        cluster: str | None = None,
        fingerprint: str | None = None,
        status: str | None = None,
        config_hash: str | None = None,
    ) -> list[TrialRecord]:
        """Trials matching every filter given, by id; model and cluster are the study's."""

    @abc.abstractmethod
    def trial_page(
        self,
        study: str,
        *,
        offset: int = 0,
        limit: int = 50,
        sort: str = "id",
        descending: bool = False,
        status: str | None = None,
        knobs: dict[str, Any] | None = None,
        answering: bool = False,
    ) -> tuple[int, list[TrialRecord]]:
        """One page of a study's trials, sorted and filtered in the database: (how many match,
        the page). `sort` is a column of `PAGE_SORTS` or a knob of `PAGE_KNOBS` (ValueError
        otherwise); `knobs` maps knobs to the value a trial's configuration must hold;
        `answering` adds the finished trials of other studies on the study's hardware that
        measured one of its configurations (the store answers it with them). `NotFoundError`
        for an unknown study."""

    @abc.abstractmethod
    def trial_points(
        self, study: str, *, answering: bool = False, newer_than: int | None = None, ids: Sequence[int] = ()
    ) -> list[dict[str, Any]]:
        """Every trial of a study (`answering` as `trial_page`'s) as a few plain values, for
        charts over thousands of trials: id, own (of this study), status, started_at,
        finished_at, tokens_per_s, step_time_s, mfu, predicted_tokens_per_s,
        predicted_step_time_s, and the knobs of `PAGE_KNOBS`. With `newer_than`, only those
        with a larger id or one of `ids` (what changed since `point_marks` said so)."""

    @abc.abstractmethod
    def point_marks(self, study: str) -> tuple[tuple[int, int], int, tuple[int, ...]]:
        """What tells a copy of `trial_points` whether it is current: the study's predictions
        (how many, the largest id: replacing them changes it), the largest trial id in the store
        and the ids of its running trials."""

    @abc.abstractmethod
    def status_counts(self) -> dict[str, dict[str, int]]:
        """Per study name, how many of its trials have each status (counted in the database)."""

    @abc.abstractmethod
    def save_profile(self, fingerprint: str, model: str, profile: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def profile(self, fingerprint: str, model: str) -> dict[str, Any] | None:
        """The latest profile of `model` on that hardware."""

    @abc.abstractmethod
    def save_timeline(self, trial_id: int, timeline: list[Any] | dict[str, Any]) -> None:
        """Keep a trial's timeline, replacing any earlier one."""

    @abc.abstractmethod
    def timeline(self, trial_id: int) -> list[Any] | dict[str, Any] | None: ...

    @abc.abstractmethod
    def acquire_lease(
        self, study: str, *, holder: str, host: str, pid: int, stale_after: float = 30.0
    ) -> LeaseRecord:
        """Take the study's lease for `holder` (process `pid` on `host`), in one write transaction.

        Taken if the study has no lease, if its lease is `holder`'s already, if its heartbeat is
        older than `stale_after` seconds (a campaign killed without releasing it), or if it is
        held on this same `host` by a `pid` that is no longer alive. Otherwise `StoreError`
        (field `--study`) naming the holder's pid, host, start and last heartbeat. The study
        itself need not exist yet.
        """

    @abc.abstractmethod
    def heartbeat(self, study: str, holder: str) -> bool:
        """Refresh the lease's heartbeat; False if `holder` no longer holds it (taken over)."""

    @abc.abstractmethod
    def release_lease(self, study: str, holder: str) -> None:
        """Give the lease up if `holder` holds it; otherwise do nothing."""

    @abc.abstractmethod
    def lease(self, study: str) -> LeaseRecord | None: ...

    @abc.abstractmethod
    def leases(self) -> list[LeaseRecord]:
        """Every study's lease, by study name."""

    # Conveniences, built on the core above.

    def study(self, name: str) -> StudyRecord | None:
        return next((s for s in self.studies() if s.name == name), None)

    def check_lease_free(self, study: str, *, stale_after: float = 30.0) -> None:
        """`StoreError` (field `--study`), as `acquire_lease` would raise it, if a live campaign
        holds the study's lease; a read, so a read-only store can tell before a campaign starts."""
        lease = self.lease(study)
        now = datetime.now(UTC)
        if lease is not None and not lease.abandoned(
            host=socket.gethostname(), now=now, stale_after=stale_after
        ):
            raise StoreError("--study", lease.refusal(now))

    def measured(self, config_hash: str, fingerprint: str) -> TrialRecord | None:
        """The latest finished trial of a config on that hardware, in any study.

        Trials cut short by an interrupted campaign say nothing about the config and are skipped.
        """
        done = [
            t
            for t in self.trials(config_hash=config_hash, fingerprint=fingerprint)
            if t.finished and t.error != INTERRUPTED
        ]
        return max(done, key=lambda t: (t.finished_at, t.id), default=None)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
