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

    def add(self, predicted_step: float, measured_step: float) -> float:
        """Record one measurement; return its relative error under the calibration before it."""
        error = abs(predicted_step * self.factor - measured_step) / measured_step
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
            f"estimator: x{self.factor:.2f} calibration from {len(self.log_ratios)} trial(s), "
            f"last error {self.errors[-1]:.0%}, mean {self.mean_error:.0%}"
        )
