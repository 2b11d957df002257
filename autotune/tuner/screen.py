"""Tier 1: estimate every valid configuration of a space and keep the ones predicted to fit."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from autotune.config import KNOBS, TrialConfig
from autotune.estimate.clusters import ClusterSpec
from autotune.estimate.estimator import estimate_many
from autotune.estimate.profiles import Profile
from autotune.knobs import value_of


@dataclass(frozen=True)
class Candidate:
    """A configuration with its prediction (the `autotune estimate` JSON)."""

    config: TrialConfig
    predicted: dict[str, Any]

    @property
    def knobs(self) -> tuple[Any, ...]:
        return knob_key(self.config.to_dict())


KNOB_FIELDS = KNOBS


def knob_key(config: dict[str, Any]) -> tuple[Any, ...]:
    """The knob values of a normalised config (or of an Optuna trial's params), in KNOB_FIELDS
    order; a knob it lacks (a later one, in an older record or a space without it) at its default."""
    return tuple(value_of(config, k) for k in KNOB_FIELDS)


def objective_of(result: dict[str, Any], objective: str) -> float | None:
    """The objective of a prediction or a measurement (higher is better); None if it has none."""
    value = result.get(objective)
    return float(value) if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class Screening:
    """Tier 1's answer: fitting configurations best first, and the ones predicted not to fit."""

    fitting: list[Candidate]
    too_big: list[Candidate]

    def by_knobs(self) -> dict[tuple[Any, ...], Candidate]:
        return {c.knobs: c for c in self.fitting}


def screen(
    configs: list[TrialConfig],
    cluster: ClusterSpec,
    *,
    objective: str = "tokens_per_s",
    profile: Profile | None = None,
) -> Screening:
    """Estimate `configs` together; rank the fitting ones by the predicted objective."""
    predictions = estimate_many(configs, cluster, profile=profile)
    fitting: list[Candidate] = []
    too_big: list[Candidate] = []
    for cfg, predicted in zip(configs, predictions, strict=True):
        (fitting if predicted["fits"] else too_big).append(Candidate(cfg, predicted))
    fitting.sort(key=lambda c: -(objective_of(c.predicted, objective) or 0.0))
    return Screening(fitting, too_big)
