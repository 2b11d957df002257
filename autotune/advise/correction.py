"""The advisor's correction of the estimator's BPipe speedup, learned from measured pairs.

Target: y = log(measured speedup / predicted speedup) of a BPipe-vs-baseline pair. Features are
physical and dimensionless, so what pairs on one model or cluster taught carries to another:

    intercept           1
    micro-batch ratio   log(b1 / b0)               (BPipe's larger micro-batch)
    recompute avoided   level(baseline) - level(BPipe), levels none 0, selective 1, full 2
    bubble ratio        log of the ratio of useful fractions m/(m+p-1), BPipe's over the baseline's
    exposed transfer    BPipe's predicted exposed transfer time / its step time
    flash attention     1 if BPipe's configuration uses it
    llama family        1 for LLaMA-style blocks
    cross-node pair     1 if a BPipe pair's activations cross nodes (same node / loopback: 0)

Bayesian ridge in closed form (numpy): prior w ~ N(0, s^2 I), noise sd `noise_sd` (how much a
measured pair's log speedup scatters: at least the measurements' own noise, and, fitted to the
pairs as scikit-learn's BayesianRidge does (MacKay's evidence update, RSS / (n - effective
parameters)), whatever the features leave unexplained); the posterior gives a predictive mean
and variance for any feature row, so the advisor's interval is honest. The prior
is set from the estimator's own error on a speedup (`estimator_sd`, measured where measurements
exist): s^2 = (estimator_sd^2 - noise_sd^2) / TYPICAL_NORM2, so that with no pair the predictive
spread of a typical pair is the estimator's error, narrowing only as measured pairs accumulate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FEATURES = (
    "intercept", "micro_batch_ratio", "recompute_avoided", "bubble_ratio", "exposed_transfer",
    "flash_attention", "llama_family", "cross_node_pair",
)  # fmt: skip
RECOMPUTE_LEVEL = {"none": 0, "selective": 1, "full": 2}
Z80 = 1.2815515655446004  # the standard normal's 90th percentile: an 80 % two-sided interval
TYPICAL_NORM2 = 3.0  # |x|^2 of a typical pair's features (intercept, flash, one or two effects)


def useful_fraction(m: int, p: int) -> float:
    """The 1F1B / GPipe share of a step not lost to the pipeline's fill and drain."""
    return m / (m + p - 1)


def features(
    bpipe: dict[str, Any], baseline: dict[str, Any], *, exposed_fraction: float, cross_node: bool
) -> np.ndarray:
    """One pair's feature row from its two normalised configurations."""
    p = int(bpipe["pp"])
    bubble = useful_fraction(int(bpipe["num_microbatches"]), p) / useful_fraction(
        int(baseline["num_microbatches"]), int(baseline["pp"])
    )
    row = {
        "intercept": 1.0,
        "micro_batch_ratio": math.log(bpipe["micro_batch_size"] / baseline["micro_batch_size"]),
        "recompute_avoided": float(
            RECOMPUTE_LEVEL[baseline["recompute"]] - RECOMPUTE_LEVEL[bpipe["recompute"]]
        ),
        "bubble_ratio": math.log(bubble),
        "exposed_transfer": float(exposed_fraction),
        "flash_attention": float(bool(bpipe["flash_attention"])),
        "llama_family": float(bpipe.get("family") == "llama"),
        "cross_node_pair": float(cross_node),
    }
    return np.array([row[f] for f in FEATURES])


@dataclass
class Correction:
    """A Bayesian ridge regression of y on the features, refitted on every `fit` call."""

    estimator_sd: float
    noise_sd: float = 0.07  # the measurements' own noise: the floor of the fitted scatter
    mean: np.ndarray = field(init=False)
    cov: np.ndarray = field(init=False)
    rows: int = field(init=False, default=0)
    prior_sd: float = field(init=False)

    def __post_init__(self) -> None:  # the prior: no correction, the estimator's error either way
        self.prior_sd = math.sqrt(max(self.estimator_sd**2 - self.noise_sd**2, 0.02**2) / TYPICAL_NORM2)
        self.mean = np.zeros(len(FEATURES))
        self.cov = np.eye(len(FEATURES)) * self.prior_sd**2

    def fit(self, rows: np.ndarray, y: np.ndarray) -> Correction:
        """The posterior given the pairs' feature rows (n, k) and targets y (n,), closed form,
        with the scatter `noise_sd` re-estimated from the residuals (never below the floor it
        was given) until it settles."""
        k = len(FEATURES)
        x = np.asarray(rows, dtype=float).reshape(-1, k)
        y = np.asarray(y, dtype=float).reshape(-1)
        floor = noise = self.noise_sd
        for _ in range(50):
            precision = x.T @ x / noise**2 + np.eye(k) / self.prior_sd**2
            self.cov = np.linalg.inv(precision)
            self.mean = self.cov @ (x.T @ y) / noise**2
            effective = k - float(np.trace(self.cov)) / self.prior_sd**2  # parameters the data pin
            if len(y) - effective <= 1.0:
                break  # too few pairs to tell the scatter: keep the measurements' own
            rss = float(((y - x @ self.mean) ** 2).sum())
            fitted = max(floor, math.sqrt(rss / (len(y) - effective)))
            if abs(fitted - noise) < 1e-6 * floor:
                break
            noise = fitted
        self.noise_sd = noise
        self.rows = len(y)
        return self

    def predict(self, x: np.ndarray) -> tuple[float, float]:
        """Predictive mean and standard deviation of y for feature row `x`."""
        mean = float(x @ self.mean)
        var = float(x @ self.cov @ x) + self.noise_sd**2
        return mean, math.sqrt(var)

    def variance_reduction(self, target: np.ndarray, candidate: np.ndarray) -> float:
        """How much measuring a pair with features `candidate` would shrink the predictive
        variance at `target` (a rank-one update of the posterior)."""
        s = self.cov @ candidate
        return float((target @ s) ** 2 / (self.noise_sd**2 + candidate @ s))


def interval(log_mean: float, log_sd: float) -> tuple[float, float]:
    """The 80 % interval of a speedup whose log is normal."""
    return math.exp(log_mean - Z80 * log_sd), math.exp(log_mean + Z80 * log_sd)


def combine(prior: tuple[float, float], measured: tuple[float, float] | None) -> tuple[float, float]:
    """(mean, sd) in log space: the model's prediction, updated by a measurement (its own mean
    and standard error) where there is one: precision-weighted, as a normal posterior."""
    if measured is None:
        return prior
    (m0, s0), (m1, s1) = prior, measured
    w0, w1 = 1.0 / s0**2, 1.0 / s1**2
    return (w0 * m0 + w1 * m1) / (w0 + w1), math.sqrt(1.0 / (w0 + w1))


def leave_one_out(
    rows: np.ndarray, y: np.ndarray, estimator_sd: float, noise_sd: float
) -> list[tuple[float, float]]:
    """Each pair's (mean, sd) predicted by the correction fitted on all the other pairs."""
    out = []
    for i in range(len(y)):
        keep = [j for j in range(len(y)) if j != i]
        model = Correction(estimator_sd, noise_sd)
        if keep:
            model.fit(rows[keep], y[keep])
        out.append(model.predict(rows[i]))
    return out


def pair_noise(run_sd: float, runs: Sequence[tuple[int, int]]) -> float:
    """The noise of a pair's measured log speedup: each side's median over its runs, each run
    scattering by `run_sd` in log space, so sd * sqrt(1/n_bpipe + 1/n_baseline), at the pairs'
    median run counts (one run a side where there are no pairs)."""
    if not runs:
        return run_sd * math.sqrt(2)
    return run_sd * float(np.median([math.sqrt(1 / max(1, b) + 1 / max(1, a)) for b, a in runs]))


def pooled_sd(groups: Sequence[Sequence[float]], default: float) -> float:
    """The pooled standard deviation of log values over groups with two or more; `default`
    where none has."""
    num, dof = 0.0, 0
    for values in groups:
        if len(values) >= 2:
            logs = np.log(np.asarray(values, dtype=float))
            num += float(((logs - logs.mean()) ** 2).sum())
            dof += len(values) - 1
    return math.sqrt(num / dof) if dof else default
