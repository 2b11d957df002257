"""The estimator's calibration from measurements: a step-time factor and a per-knob correction."""

from __future__ import annotations

import math

import pytest

from autotune.tuner.calibration import Calibration, KnobCorrection


def test_calibration_scores_each_measurement_before_learning_from_it() -> None:
    cal = Calibration()
    assert cal.factor == 1.0 and cal.mean_error is None
    assert cal.add(predicted_step=1.0, measured_step=2.0) == pytest.approx(0.5)  # |1 - 2| / 2
    assert cal.factor == pytest.approx(2.0)
    assert cal.add(predicted_step=1.0, measured_step=2.0) == pytest.approx(0.0)
    assert "corrected from 2 trial(s) (x2.00 overall)" in cal.summary()
    assert cal.add(predicted_step=1.0, measured_step=2.0, prior_log_factor=math.log(4.0)) == pytest.approx(
        1.0
    )


def test_knob_correction_starts_neutral_and_learns_a_slow_knob_value() -> None:
    fix = KnobCorrection()
    assert fix.log_factor({"pp": 4, "schedule": "bpipe"}) == 0.0
    for pp in (2, 4):  # bpipe runs 2x slower than predicted, the others as predicted
        fix.add({"pp": pp, "schedule": "bpipe"}, predicted_step=1.0, measured_step=2.0)
        fix.add({"pp": pp, "schedule": "1f1b"}, predicted_step=1.0, measured_step=1.0)
    bpipe, base = (
        fix.log_factor({"pp": 8, "schedule": "bpipe"}),
        fix.log_factor({"pp": 8, "schedule": "1f1b"}),
    )
    assert 0.0 < bpipe - base < math.log(2.0)  # shrunk toward zero by the ridge, in the right direction
    assert fix.log_factor({"pp": 2, "schedule": "bpipe"}) > fix.log_factor({"pp": 2, "schedule": "1f1b"})
