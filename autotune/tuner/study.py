"""Tier 2's sampler side: an Optuna study (in the campaign's database) over the screened knobs.

Every proposal becomes an Optuna trial, but only new, fitting configurations become real
trials. The rest are told at once: a combination that is invalid or predicted not to fit, and
a measured out-of-memory or failed configuration, as a constraint violation (the TPE sampler
learns from it: infeasible trials rank below every feasible one); a configuration measured
before on this hardware, with its stored value. A configuration whose real trial is running is
told as failed, which the sampler ignores.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState

from autotune.tuner.screen import KNOB_FIELDS

FEASIBLE, INFEASIBLE = 0.0, 1.0
_CONSTRAINT = "fits"  # <= 0: ran and gave a value; > 0: out of memory, failed or invalid


def open_study(
    url: str, name: str, knobs: dict[str, tuple[Any, ...]], *, seed: int
) -> tuple[optuna.Study, dict[str, BaseDistribution]]:
    """Create or load the study `name` in the database at `url` (Optuna's own tables)."""
    optuna.logging.set_verbosity(logging.WARNING)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}
    storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True)
    study = optuna.create_study(
        study_name=name, storage=storage, direction="maximize", sampler=sampler, load_if_exists=True
    )
    distributions: dict[str, BaseDistribution] = {  # the knobs the space lists, in KNOB_FIELDS order
        k: CategoricalDistribution(list(knobs[k])) for k in KNOB_FIELDS if k in knobs
    }
    return study, distributions


def params_of(key: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(KNOB_FIELDS, key, strict=True))


def proposal(key: tuple[Any, ...], distributions: dict[str, BaseDistribution]) -> dict[str, Any]:
    """The study's parameters for the configuration `key`, to enqueue: the knobs the study
    searches, each one of its choices. A no-op knob normalised to its default where the space
    lists only other values (sequence parallelism at tp 1 in a space of `sequence_parallel:
    true`) takes the space's first choice, which names the same configuration."""
    out: dict[str, Any] = {}
    for name, value in params_of(key).items():
        dist = distributions.get(name)
        if dist is None:
            continue
        choices = dist.choices  # type: ignore[attr-defined]
        out[name] = value if value in choices else choices[0]
    return out


def tell(study: optuna.Study, trial: optuna.Trial, value: float | None, **attrs: Any) -> None:
    """Finish an Optuna trial: feasible with `value`, or infeasible where `value` is None."""
    trial.set_constraint(_CONSTRAINT, FEASIBLE if value is not None else INFEASIBLE)
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    study.tell(trial, 0.0 if value is None else value)


def skip(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """Finish a proposal that is neither run nor informative (the sampler ignores failed trials)."""
    trial.set_user_attr("source", reason)
    study.tell(trial, state=TrialState.FAIL)


def abandon(study: optuna.Study, number: int) -> None:
    """Mark a trial left running by a killed campaign as failed (the sampler ignores it)."""
    state = study.trials[number].state
    if state in (TrialState.RUNNING, TrialState.WAITING):
        study.tell(number, state=TrialState.FAIL)


def stale_numbers(study: optuna.Study) -> list[int]:
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
