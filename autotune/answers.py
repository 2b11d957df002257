"""Answers from the store: the best configuration of a study, or of a model on a cluster.

The best measured configuration wins; where nothing was measured, the best prediction is
returned, flagged `measured=False` with no trial id.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from autotune.errors import ConfigError


@dataclass(frozen=True)
class BestConfig:
    """contracts.md's `autotune best` JSON: config, tokens_per_s, measured, trial_id (+ context)."""

    config: dict[str, Any]
    tokens_per_s: float | None
    measured: bool
    trial_id: int | None
    objective: str
    value: float
    study: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _value(row: Any, objective: str) -> float | None:
    value = getattr(row, objective, None) if not isinstance(row, dict) else row.get(objective)
    return float(value) if value is not None else None


def _pick(store: Any, trials: list[Any], predictions: list[Any], objective: str) -> BestConfig | None:
    measured = [(v, t) for t in trials if t.status == "ok" and (v := _value(t, objective)) is not None]
    if measured:
        value, t = max(measured, key=lambda vt: vt[0])
        return BestConfig(t.config, t.tokens_per_s, True, t.id, objective, value, t.study)
    guesses = [(v, p) for p in predictions if (v := _value(p.predicted, objective)) is not None]
    if guesses:
        value, p = max(guesses, key=lambda vp: vp[0])
        return BestConfig(p.config, p.predicted.get("tokens_per_s"), False, None, objective, value, p.study)
    return None


def best_config(
    *, storage: str, study: str | None = None, model: str | None = None, cluster: str | None = None
) -> BestConfig:
    """The best configuration of `study`, or of `model` on `cluster`, in the store at `storage`."""
    if not study and not (model and cluster):
        raise ConfigError("--study", "give --study, or both --model and --cluster")
    from storage import Store

    with Store(storage, read_only=True) as store:
        return best_in(store, study=study, model=model, cluster=cluster)


def best_in(
    store: Any, *, study: str | None = None, model: str | None = None, cluster: str | None = None
) -> BestConfig:
    """`best_config` on a store already open (the dashboard's); ConfigError where nothing is known."""
    from storage.engine import safe_url

    if study:
        record = store.study(study)
        if record is None:
            raise ConfigError("--study", f"no study named {study!r} in {safe_url(store.url)}")
        objective = record.space.get("objective", "tokens_per_s")
        # the study's own trials and those of other studies on its hardware that measured one of
        # its configurations, the best first: found by the database, not by reading them all
        _, trials = store.trial_page(
            study, limit=1, sort=objective, descending=True, status="ok", answering=True
        )
        measured = bool(trials) and _value(trials[0], objective) is not None
        predictions = [] if measured else store.predictions(study)
    else:
        objective = "tokens_per_s"
        predictions = store.predictions(model=model, cluster=cluster)
        trials = store.trials(model=model, cluster=cluster)
    best = _pick(store, trials, predictions, objective)
    if best is None:
        where = f"study {study!r}" if study else f"model {model!r} on cluster {cluster!r}"
        raise ConfigError("--study" if study else "--model", f"nothing measured or predicted for {where}")
    return best
