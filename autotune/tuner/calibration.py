"""Calibration of the estimator from measurements: one multiplicative step-time factor.

The estimator's step time is off by a factor that is mostly the device's (a roofline's
efficiency curve, a profile taken under other load); a single factor fitted in log space over
the measured trials corrects it. Each new measurement is first scored against the calibration
that existed before it (prequential error), so the reported error is honest.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


@dataclass
class Calibration:
    """log(measured / predicted) step time per measured trial; the factor is their mean."""

    log_ratios: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)  # |calibrated prediction - measured| / measured

    @property
    def factor(self) -> float:
        return math.exp(statistics.fmean(self.log_ratios)) if self.log_ratios else 1.0

    def add(
        self, predicted_step: float, measured_step: float, *, prior_log_factor: float | None = None
    ) -> float:
        """Record one measurement; return its relative error under the calibration before it
        (`prior_log_factor`: a finer correction's log factor for this configuration, used in
        place of the overall factor)."""
        factor = self.factor if prior_log_factor is None else math.exp(prior_log_factor)
        error = abs(predicted_step * factor - measured_step) / measured_step
        self.errors.append(error)
        self.log_ratios.append(math.log(measured_step / predicted_step))
        return error

    @property
    def mean_error(self) -> float | None:
        return statistics.fmean(self.errors) if self.errors else None

    def summary(self) -> str:
        if not self.errors:
            return "estimator: no measurement yet"
        return (
            f"estimator: corrected from {len(self.log_ratios)} trial(s) (x{self.factor:.2f} overall), "
            f"last error {self.errors[-1]:.0%}, mean {self.mean_error:.0%}"
        )


class KnobCorrection:
    """A per-knob correction of the estimator, learned from the measured trials.

    log(measured / predicted step time) is fitted as a sum of one term per knob value (tp 2,
    pp 4, schedule bpipe, recompute full, ...) by ridge regression, which shrinks every term
    toward zero: with no or few measurements the estimator's own ranking stands, and a knob
    value whose trials keep running slower (or faster) than predicted moves the configurations
    that share it down (or up) the ranking.
    """

    def __init__(self, ridge: float = 1.0) -> None:
        self.ridge = ridge
        self.rows: list[tuple[tuple[tuple[str, object], ...], float]] = []
        self.terms: dict[tuple[str, object], float] = {}
        self.offset = 0.0

    @staticmethod
    def features(knobs: dict[str, object]) -> tuple[tuple[str, object], ...]:
        return tuple(sorted(knobs.items(), key=lambda kv: kv[0]))

    def add(self, knobs: dict[str, object], predicted_step: float, measured_step: float) -> None:
        self.rows.append((self.features(knobs), math.log(measured_step / predicted_step)))
        self._fit()

    def _fit(self) -> None:
        import numpy as np

        names = sorted({f for feats, _ in self.rows for f in feats}, key=repr)
        index = {f: i for i, f in enumerate(names)}
        X = np.zeros((len(self.rows), len(names)))
        y = np.array([r for _, r in self.rows])
        for i, (feats, _) in enumerate(self.rows):
            X[i, [index[f] for f in feats]] = 1.0
        self.offset = float(y.mean())
        coef = np.linalg.solve(X.T @ X + self.ridge * np.eye(len(names)), X.T @ (y - self.offset))
        self.terms = {f: float(c) for f, c in zip(names, coef, strict=True)}

    def log_factor(self, knobs: dict[str, object]) -> float:
        """Predicted log(measured / predicted step time) for a configuration's knobs."""
        return self.offset + sum(self.terms.get(f, 0.0) for f in self.features(knobs))
