"""A tuning campaign: Optuna proposes among the screened configurations, Ray runs the real
trials, and every result is written to the store the moment it arrives.

A killed campaign loses nothing that finished: each result is committed before the sampler
hears of it. Rerunning the command resumes: trials the store still shows as running are
marked failed ("interrupted") and queued again, and every configuration already measured on
this hardware (in any study) is answered from the store instead of being run again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna

from autotune.config import BASELINES, TrialConfig, describe_later_knobs, without_no_ops
from autotune.results import TrialResult
from autotune.timeline import kept
from autotune.tuner.calibration import Calibration, KnobCorrection
from autotune.tuner.screen import Candidate, Screening, knob_key, objective_of
from autotune.tuner.space import AUTO
from autotune.tuner.study import abandon, open_study, params_of, proposal, skip, stale_numbers, tell
from storage import FinishedTrialError, Store, TrialRecord, config_hash

MAX_IDLE_PROPOSALS = 25  # proposals without a new configuration before the tuner picks one itself


class Done(Protocol):
    """A finished trial as a dispatcher reports it (trial_runners.dispatch.Finished)."""

    key: Any
    result: TrialResult
    attempt: int
    worker: str | None


class Dispatcher(Protocol):
    @property
    def running(self) -> int: ...

    def submit(self, key: Any, config: dict[str, Any], *, steps: int, seed: int, timeout: float) -> None: ...
    def wait(self, timeout: float) -> Sequence[Done]: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Limits:
    """When to stop: real trials in the study, wall time, trials without improvement."""

    trials: int | None = None
    timeout: float | None = None
    patience: int | None = None
    concurrency: int | None = None


@dataclass
class _Running:
    trial: optuna.Trial
    candidate: Candidate
    started: float = field(default_factory=time.monotonic)


class Campaign:
    """One study's tier 2: propose, dispatch, record, until a limit or the space runs out."""

    def __init__(
        self, *, store: Store, study: str, screening: Screening, knobs: dict[str, tuple[Any, ...]],
        fingerprint: str, objective: str, steps: int, trial_timeout: float, seed_top: int,
        limits: Limits, rerun: bool = False, seed: int = 0, echo: Callable[[str], None] = print,
        lease: Any = None, simulate: Callable[[TrialConfig], list[dict[str, Any]]] | None = None,
    ) -> None:  # fmt: skip
        self.store, self.name, self.fingerprint = store, study, fingerprint
        self.candidates = screening.by_knobs()
        self.ranked = [c.knobs for c in screening.fitting]
        self.unfit = {c.knobs for c in screening.too_big}
        if knobs.get("dp") == (AUTO,):  # the study searches the degrees `dp: auto` resolves to
            every = [*screening.fitting, *screening.too_big]
            knobs = {**knobs, "dp": tuple(sorted({c.config.dp for c in every})) or (1,)}
        self.knobs, self.objective = knobs, objective
        self.steps, self.trial_timeout, self.seed_top = steps, trial_timeout, seed_top
        self.limits, self.rerun, self.seed, self.echo = limits, rerun, seed, echo
        self.lease = lease  # the study's lease (storage.lease.HeldLease): `lost` if taken over
        self.simulate = simulate  # a configuration's simulated timeline, kept beside the measured one
        self.running: dict[int, _Running] = {}
        self.known: dict[tuple[Any, ...], TrialRecord] = {}
        self.calibration = Calibration()
        self.correction = KnobCorrection()
        self.exhausted = False
        self.turns = 0
        self.queued: set[tuple[Any, ...]] = set()  # counterparts and headline sides put in the queue
        schedules = {c.config.schedule for c in screening.fitting}
        # the space holds BPipe and a baseline: the campaign measures pairs for the verdict
        self.pairing = "bpipe" in schedules and bool(schedules & set(BASELINES))
        self.budget_note: str | None = None
        self.durations: list[float] = []

    # -- set-up ---------------------------------------------------------------------------
    def _open(self) -> optuna.Study:
        study, self.distributions = open_study(self.store.url, self.name, self.knobs, seed=self.seed)
        interrupted = self.store.interrupt_running(self.name)
        for number in stale_numbers(study):
            abandon(study, number)
        for rec in interrupted:
            study.enqueue_trial(
                proposal(knob_key(rec.config), self.distributions), user_attrs={"requeued": rec.id}
            )
        if interrupted:
            self.echo(f"resume: {len(interrupted)} interrupted trial(s) marked failed and queued again")
        own = [t for t in self.store.trials(study=self.name) if t.finished and t.error != "interrupted"]
        if not self.rerun:
            mine = {config_hash(c.config.to_dict()): k for k, c in self.candidates.items()}
            for rec in self.store.trials(fingerprint=self.fingerprint):
                key = mine.get(rec.config_hash)
                if key is not None and rec.finished and rec.error != "interrupted":
                    self.known[key] = rec
        for rec in own:
            self.known[knob_key(rec.config)] = rec
            self._calibrate(rec)
        if own:
            self.echo(f"resume: {len(own)} finished trial(s) of study {self.name!r} kept")
        if not study.trials:
            seeds = [k for k in self.ranked if k not in self.known][: self.seed_top]
            for key in seeds:
                study.enqueue_trial(
                    proposal(key, self.distributions), user_attrs={"seeded": "top prediction"}
                )
        return study

    # -- the loop -------------------------------------------------------------------------
    def run(self, dispatcher: Dispatcher) -> TrialRecord | None:
        """Run until a limit is reached or every fitting configuration is known; the best."""
        self.started = time.monotonic()
        study = self._open()
        finished_cleanly = False
        try:
            while True:
                self._fill(study, dispatcher)
                if not dispatcher.running:
                    break
                for done in dispatcher.wait(1.0):
                    self._finish(study, done)
            finished_cleanly = True
        finally:
            if not finished_cleanly:
                dispatcher.close()
                self._interrupt(study)
        self.echo(self._stop_reason())
        return self.best()

    def _interrupt(self, study: optuna.Study) -> None:
        """Close the trials a stopped campaign leaves running as interrupted (a rerun queues
        them again); where the store cannot be written now (a full disk), a rerun does it."""
        try:
            for rec in self.store.interrupt_running(self.name):
                self.echo(f"trial {rec.id} interrupted")
            for number in stale_numbers(study):
                abandon(study, number)
        except Exception as exc:  # the stop's own cause is the error to report
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self.echo(f"could not mark the running trials interrupted ({first}); a rerun will")

    def _capacity(self) -> int:
        return self.limits.concurrency or 10**6

    def _fill(self, study: optuna.Study, dispatcher: Dispatcher) -> None:
        while dispatcher.running < self._capacity() and not self._stopping(study):
            candidate, trial = self._propose(study)
            if candidate is None or trial is None:
                return
            rec_id = self.store.start_trial(
                self.name, config=candidate.config.to_dict(), fingerprint=self.fingerprint,
                predicted=candidate.predicted, optuna_number=trial.number,
            )  # fmt: skip
            self.running[rec_id] = _Running(trial, candidate)
            dispatcher.submit(
                rec_id,
                candidate.config.to_dict(),
                steps=self.steps,
                seed=self.seed,
                timeout=self.trial_timeout,
            )
            self.echo(f"trial {rec_id} started: {describe(candidate.config.to_dict())}")

    def _propose(self, study: optuna.Study) -> tuple[Candidate | None, optuna.Trial | None]:
        """The next configuration to run, answering every other proposal on the spot.

        Turns alternate between the sampler (TPE, which learns the feasible region and good
        knob values from every told trial) and the corrected estimator (the best unmeasured
        configuration under the correction learned so far); the sampler's turn falls back to
        the estimator after MAX_IDLE_PROPOSALS proposals without a new configuration.
        """
        self.turns += 1
        if self.turns % 2 == 1:
            for _ in range(MAX_IDLE_PROPOSALS):
                trial = study.ask(self.distributions)
                key = knob_key(without_no_ops(trial.params))  # e.g. sequence parallel at tp 1: tp 1
                if not self._answer(study, trial, key):
                    return self.candidates[key], trial
        for _ in range(len(self.ranked) + MAX_IDLE_PROPOSALS):  # queued trials come out first
            pick = self._best_unmeasured()
            if pick is None:
                break
            study.enqueue_trial(
                proposal(pick, self.distributions), user_attrs={"seeded": "corrected estimator"}
            )
            trial = study.ask(self.distributions)
            key = knob_key(without_no_ops(trial.params))
            if not self._answer(study, trial, key):
                return self.candidates[key], trial
        self.exhausted = True
        return None, None

    def _answer(self, study: optuna.Study, trial: optuna.Trial, key: tuple[Any, ...]) -> bool:
        """Tell the sampler at once where no real trial is needed; True if it was told."""
        if key not in self.candidates:
            reason = "predicted not to fit" if key in self.unfit else "not a valid configuration"
            tell(study, trial, None, source="screen", reason=reason)
        elif key in self.known:
            rec = self.known[key]
            tell(study, trial, self._value(rec), source="store", trial_id=rec.id, status=rec.status)
        elif any(r.candidate.knobs == key for r in self.running.values()):
            skip(study, trial, "already running")
        else:
            return False
        return True

    def _best_unmeasured(self) -> tuple[Any, ...] | None:
        """The unmeasured configuration ranked best by the estimator as corrected so far."""
        busy = {r.candidate.knobs for r in self.running.values()}
        left = [k for k in self.ranked if k not in self.known and k not in busy]
        return max(left, key=self._corrected, default=None)

    def _corrected(self, key: tuple[Any, ...]) -> float:
        """The predicted objective under the learned correction (objective ~ 1 / step time)."""
        value = objective_of(self.candidates[key].predicted, self.objective) or 0.0
        return value / math.exp(self.correction.log_factor(params_of(key)))

    def _value(self, rec: TrialRecord) -> float | None:
        return getattr(rec, self.objective) if rec.status == "ok" else None

    # -- results --------------------------------------------------------------------------
    def _finish(self, study: optuna.Study, done: Done) -> None:
        run = self.running.pop(done.key)
        simulated = self._simulated(run.candidate, done.result)
        try:  # recorded before anything else
            rec = self.store.finish_trial(
                done.key, done.result, attempt=done.attempt, worker=done.worker, simulated=simulated
            )
        except FinishedTrialError:  # closed meanwhile by a campaign that took the study over
            self.echo(f"trial {done.key} was closed by another campaign; its result is dropped")
            skip(study, run.trial, "closed by another campaign")
            return
        self.durations.append(time.monotonic() - run.started)
        self.known[run.candidate.knobs] = rec
        value = self._value(rec)
        tell(study, run.trial, value, source="trial", trial_id=rec.id, status=rec.status)
        self._queue_counterpart(study, run.candidate)
        error = self._calibrate(rec)
        if rec.status == "ok":
            pred = objective_of(run.candidate.predicted, self.objective)
            err = f", prediction error {error:.0%}" if error is not None else ""
            what = f"{value:,.0f} {self.objective}" + (f" (predicted {pred:,.0f}{err})" if pred else "")
        else:
            what = f"{rec.status}: {rec.error}"
        self.echo(f"trial {rec.id} {rec.status}: {describe(rec.config)} -> {what}")
        self.echo(self.progress())

    def _simulated(self, candidate: Candidate, result: TrialResult) -> list[dict[str, Any]] | None:
        """The simulator's timeline of a measured configuration (None where none is wanted or
        the simulator cannot replay it: the measurement is recorded all the same)."""
        if self.simulate is None or not result.ok:
            return None
        try:
            return kept(self.simulate(candidate.config)) or None
        except Exception as exc:  # noqa: BLE001 - a timeline is never worth losing a trial
            self.echo(f"no simulated timeline for {describe(candidate.config.to_dict())}: {exc}")
            return None

    def _calibrate(self, rec: TrialRecord) -> float | None:
        predicted = (rec.predicted or {}).get("step_time_s")
        if rec.status != "ok" or not predicted or not rec.step_time_s:
            return None
        knobs = params_of(knob_key(rec.config))
        prior = self.correction.log_factor(knobs) if self.correction.rows else None
        self.correction.add(knobs, predicted, rec.step_time_s)
        return self.calibration.add(predicted, rec.step_time_s, prior_log_factor=prior)

    # -- pairs for the BPipe verdict ------------------------------------------------------------
    def _is_bpipe(self, key: tuple[Any, ...]) -> bool:
        return params_of(key)["schedule"] == "bpipe"

    def _queue(self, study: optuna.Study, key: tuple[Any, ...], why: str) -> None:
        self.queued.add(key)
        study.enqueue_trial(proposal(key, self.distributions), user_attrs={"seeded": why})
        self.echo(f"queued {describe(self.candidates[key].config.to_dict())}: {why}")

    def _open_keys(self) -> set[tuple[Any, ...]]:
        busy = {r.candidate.knobs for r in self.running.values()}
        return {k for k in self.ranked if k not in self.known and k not in busy and k not in self.queued}

    def _queue_counterpart(self, study: optuna.Study, done: Candidate) -> None:
        """After a BPipe (or baseline) trial at a layout, queue the best-predicted baseline (or
        BPipe) configuration there, unless that side of the layout is measured, running or queued:
        every layout the campaign touches becomes a measured pair."""
        if not self.pairing:
            return
        layout = done.knobs[:3]  # tp, pp, dp
        other = [
            k for k in self.ranked if k[:3] == layout and self._is_bpipe(k) != self._is_bpipe(done.knobs)
        ]
        busy = {r.candidate.knobs for r in self.running.values()}
        if not other or any(k in self.known or k in busy or k in self.queued for k in other):
            return
        best = max(other, key=self._corrected)
        self._queue(study, best, "counterpart at its layout")

    def _headline(self) -> list[tuple[Any, ...]]:
        """The best BPipe and the best baseline configuration, each valued by its measurement
        where it ran and by the corrected prediction where not; those not yet measured."""

        def value(key: tuple[Any, ...]) -> float:
            rec = self.known.get(key)
            return (self._value(rec) or 0.0) if rec is not None else self._corrected(key)

        sides = []
        for is_bpipe in (True, False):
            keys = [k for k in self.ranked if self._is_bpipe(k) == is_bpipe and (
                k not in self.known or self._value(self.known[k]) is not None)]  # fmt: skip
            if keys:
                sides.append(max(keys, key=value))
        return [k for k in sides if k not in self.known]

    def _measure_headline(self, study: optuna.Study) -> bool:
        """Before stopping for lack of improvement: queue the headline pair's unmeasured sides;
        True if anything was queued (the campaign goes on for them)."""
        if not self.pairing:
            return False
        missing = [k for k in self._headline() if k in self._open_keys()]
        for key in missing:
            self._queue(study, key, "the BPipe verdict's headline pair")
        return bool(missing)

    # -- stopping and reporting -----------------------------------------------------------
    def _real(self) -> list[TrialRecord]:
        return [r for r in self.store.trials(study=self.name) if r.finished and r.error != "interrupted"]

    def _stopping(self, study: optuna.Study | None = None) -> bool:
        lim = self.limits
        if self.exhausted or self._lost():
            return True
        if lim.timeout is not None and time.monotonic() - self.started >= lim.timeout:
            self._note_budget("the time limit")
            return True
        real = self._real()
        if lim.trials is not None and len(real) + len(self.running) >= lim.trials:
            self._note_budget("the trial budget")
            return True
        if lim.patience is None or self._since_best(real) < lim.patience:
            return False
        queued = any(k in self.queued and k not in self.known for k in self.ranked)
        return not (queued or (study is not None and self._measure_headline(study)))

    def _note_budget(self, what: str) -> None:
        """Say once when a limit stops the campaign before the headline pair is measured."""
        if self.pairing and self.budget_note is None:
            missing = [describe(self.candidates[k].config.to_dict()) for k in self._headline()]
            if missing:
                self.budget_note = (f"{what} ran out before the BPipe verdict's headline pair was measured: "
                                    f"{'; '.join(missing)} rest(s) on a prediction")  # fmt: skip

    def _since_best(self, real: list[TrialRecord]) -> int:
        best, since = None, 0
        for rec in real:
            value = self._value(rec)
            if value is not None and (best is None or value > best):
                best, since = value, 0
            else:
                since += 1
        return since

    def _lost(self) -> bool:
        return bool(self.lease is not None and self.lease.lost)

    def _stop_reason(self) -> str:
        reason = self._why_stopped()
        return f"{reason}\n{self.budget_note}" if self.budget_note else reason

    def _why_stopped(self) -> str:
        lim, real = self.limits, self._real()
        if self._lost():
            return "stopped: another campaign took the study over (this one's lease lapsed)"
        if self.exhausted:
            return "stopped: every fitting configuration is measured"
        if lim.trials is not None and len(real) >= lim.trials:
            return f"stopped: {lim.trials} trials done"
        if lim.timeout is not None and time.monotonic() - self.started >= lim.timeout:
            return f"stopped: time limit {lim.timeout:g} s reached"
        return f"stopped: no improvement in the last {lim.patience} trials"

    def progress(self) -> str:
        real = self._real()
        failed = sum(1 for r in real if r.status != "ok")
        best = self.best()
        best_txt = f"{getattr(best, self.objective):,.0f} {self.objective}" if best else "none yet"
        return (
            f"[{self.name}] done {len(real)} · running {len(self.running)} · failed {failed} · "
            f"best {best_txt} · {self.calibration.summary()} · {self._time_left()}"
        )

    def _time_left(self) -> str:
        elapsed = time.monotonic() - self.started
        guesses = []
        if self.limits.timeout is not None:
            guesses.append(max(0.0, self.limits.timeout - elapsed))
        if self.limits.trials is not None and self.durations:
            left = max(0, self.limits.trials - len(self._real()))
            per = sum(self.durations) / len(self.durations)
            guesses.append(left * per / max(1, min(self._capacity(), left or 1)))
        return f"~{format_duration(min(guesses))} left" if guesses else "no time limit"

    def best(self) -> TrialRecord | None:
        """The best measured configuration known to this campaign (this hardware)."""
        ok = [r for r in self.known.values() if self._value(r) is not None]
        return max(ok, key=lambda r: self._value(r) or 0.0, default=None)


def describe(config: dict[str, Any]) -> str:
    """A configuration in one short line."""
    flash = "flash" if config["flash_attention"] else "no-flash"
    later = describe_later_knobs(config)
    return (
        f"tp{config['tp']} pp{config['pp']} dp{config['dp']} mbs{config['micro_batch_size']} "
        f"{config['schedule']} recompute={config['recompute']} {flash}" + (f" {later}" if later else "")
    )


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
