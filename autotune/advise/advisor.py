"""`bpipe_payoff()` / `autotune advise`: does BPipe pay off here, by how much, and how sure is it?

For a study, a model on a cluster, or a search space not yet run:

1. every configuration of the target, with its prediction and, where it ran on the target's
   hardware, its measurements; each valued by its measured throughput (median over reruns), else
   by its prediction times the estimator's calibration on the target's measured configurations;
2. the best BPipe configuration and the best baseline by that value: the headline pair;
3. the estimator's speedup of that pair, corrected by a Bayesian ridge fitted on every measured
   pair in the store (`correction.py`; what other models and clusters taught carries over, each
   pair's features being physical), and, where both sides were measured, updated by that
   measurement and its spread: an 80 % interval in log space;
4. the verdict from the interval: "pays off" when its low end is above 1, "does not pay off"
   when its high end is below 1, "uncertain" otherwise; the paper's MFU-based estimate beside it;
   the reasons as numbers; the evidence (the pairs); the correction's leave-one-out error over
   the measured pairs; and what to measure next to narrow the interval most.

Read-only: the store is opened with `Store(url, read_only=True)`; nothing is ever written.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autotune.advise import correction as corr
from autotune.advise.pairs import Pair, Side, layout_pairs, sides
from autotune.advise.reasons import crosses_nodes, exposed_fraction, reasons
from autotune.config import BASELINES, TrialConfig
from autotune.errors import ConfigError
from autotune.estimate.clusters import CPU_LOCAL, ClusterSpec, load_cluster
from autotune.estimate.profiles import Profile, parse_profile
from storage.records import config_hash

# The estimator's error on a speedup where nothing was measured on the hardware: on GPU presets
# a standard deviation of 0.2 in log space (the kernel model is 10.2 % off published Megatron-LM
# throughputs on average, up to 12.6 %, all optimistic: bench_published; a speedup compounds two
# predictions, and BPipe's evictions and interleaving are not in those runs); on a CPU the
# accuracy benchmark's 5-10 %, for two configurations.
DEFAULT_ESTIMATOR_SD = {"cpu": 0.12, "cuda": 0.20}
DEFAULT_MEASUREMENT_SD = 0.10  # one trial's throughput, log space, where no rerun tells
VERDICTS = ("pays off", "does not pay off", "uncertain")


@dataclass(frozen=True)
class Choice:
    """A configuration the advice names: measured (its trial) or only predicted."""

    config: dict[str, Any]
    measured: bool
    trial_id: int | None
    tokens_per_s: float | None  # measured (median of its runs)
    runs: list[float]
    predicted_tokens_per_s: float | None
    value: float  # what the choice rests on: measured, else the calibrated prediction


@dataclass(frozen=True)
class Advice:
    """`autotune advise --json`: the verdict, its interval and everything it rests on."""

    target: str
    basis: str  # "measurements" (the headline pair ran) or "predictions"
    bpipe_pays_off: bool
    verdict: str
    predicted_speedup: float
    interval: tuple[float, float]
    estimator_speedup: float  # uncorrected
    measured_speedup: float | None
    best_bpipe: Choice
    best_baseline: Choice
    paper: dict[str, Any] | None
    reasons: list[dict[str, Any]]
    measured_pairs: int
    evidence: list[dict[str, Any]]
    error: dict[str, Any] | None
    measure_next: dict[str, Any] | None
    learned_from: int = 0
    notes: list[str] = field(default_factory=list)
    measured_by_study: dict[str, float] = field(default_factory=dict)  # the headline pair, per campaign

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["interval"] = list(self.interval)
        return out


@dataclass
class _Target:
    name: str
    flag: str  # the flag that named it, for refusals
    model: str
    cluster_name: str
    device: str
    candidates: list[tuple[dict[str, Any], dict[str, Any]]]  # (config, predicted)
    measured: dict[str, Side]  # config hash -> Side on the target's hardware
    fingerprint: str | None
    profile: Profile | None = None
    records: dict[int, Any] = field(default_factory=dict)


def bpipe_payoff(
    *, storage: str | None = None, study: str | None = None, model: str | None = None,
    cluster: str | None = None, global_batch_size: int | None = None, space: str | None = None,
) -> Advice:  # fmt: skip
    """The BPipe verdict for a study, a model on a cluster (optionally a global batch), or a
    search space; keyword arguments as `autotune advise`'s flags. ConfigError on bad input."""
    chosen = [n for n, v in (("--study", study), ("--model", model), ("--space", space)) if v]
    if len(chosen) != 1:
        raise ConfigError("--study", "give one of --study, --model with --cluster, or --space")
    if model and not cluster:
        raise ConfigError("--cluster", "--model needs --cluster (the advice is for a model on a cluster)")
    if cluster and not model:
        raise ConfigError("--model", "--cluster needs --model")
    store = _open(storage, required=not space)
    try:
        return advise_in(store, study=study, model=model, cluster=cluster,
                         global_batch_size=global_batch_size, space=space)  # fmt: skip
    finally:
        if store is not None:
            store.close()


def advise_in(
    store: Any, *, study: str | None = None, model: str | None = None, cluster: str | None = None,
    global_batch_size: int | None = None, space: str | None = None,
) -> Advice:  # fmt: skip
    """`bpipe_payoff` on a store already open (read-only; None for a space with no store), as the
    dashboard asks it; the arguments are checked by `bpipe_payoff`."""
    trials = store.trials() if store is not None else []
    if study:
        target = _study_target(store, study, trials)
    elif model:
        target = _model_target(store, model, str(cluster), global_batch_size, trials)
    else:
        target = _space_target(str(space), trials, store)
    return _advise(target, trials, store)


def _open(storage: str | None, *, required: bool) -> Any:
    from storage import Store
    from storage.engine import parse_url, sqlite_path

    url = storage or "sqlite:///autotune.db"
    path = sqlite_path(parse_url(url))
    if not required and path is not None and not path.exists():
        return None  # a space advised on from predictions alone, no store yet
    return Store(url, read_only=True)


# -- the three kinds of target ----------------------------------------------------------------


def _measured_on(fingerprint: str | None, trials: list[Any], hashes: set[str]) -> dict[str, Side]:
    mine = [
        t for t in trials if t.config_hash in hashes and (fingerprint is None or t.fingerprint == fingerprint)
    ]
    return {s.config_hash: s for s in sides(mine)}


def _profile_of(store: Any, fingerprint: str | None, model: str) -> Profile | None:
    if store is None or fingerprint is None:
        return None
    stored = store.profile(fingerprint, model)
    return parse_profile(stored) if stored is not None else None


def _study_target(store: Any, name: str, trials: list[Any]) -> _Target:
    from storage.engine import safe_url

    record = store.study(name)
    if record is None:
        raise ConfigError("--study", f"no study named {name!r} in {safe_url(store.url)}")
    predictions = store.predictions(name)
    candidates = [(p.config, p.predicted) for p in predictions]
    hashes = {p.config_hash for p in predictions}
    planned = bool(record.space.get("planned")) or not any(t.study == name for t in trials)
    measured = _measured_on(record.fingerprint, trials, hashes)
    device = str(record.space.get("device", "cpu"))
    target = _Target(f"study {name!r}", "--study", record.model, record.cluster, device, candidates, measured,
                     record.fingerprint, _profile_of(store, record.fingerprint, record.model))  # fmt: skip
    if planned and not measured:
        target.name += " (screened only: predictions)"
    return target


def _model_target(store: Any, model: str, cluster: str, batch: int | None, trials: list[Any]) -> _Target:
    studies = [s for s in store.studies() if s.model == model and s.cluster == cluster]
    if not studies:
        raise ConfigError("--model", f"no study of model {model!r} on cluster {cluster!r} in the store")
    candidates: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for s in studies:
        for p in store.predictions(s.name):
            candidates.setdefault(p.config_hash, (p.config, p.predicted))
    batches = sorted({int(c["global_batch_size"]) for c, _ in candidates.values()})
    if batch is None and len(batches) > 1:
        raise ConfigError(
            "--global-batch-size", f"studies of {model} on {cluster} use several global batches "
            f"({', '.join(map(str, batches))}); give one",
        )  # fmt: skip
    if batch is not None:
        candidates = {h: c for h, c in candidates.items() if int(c[0]["global_batch_size"]) == batch}
        if not candidates:
            raise ConfigError("--global-batch-size", f"no configuration of {model} on {cluster} at {batch}")
    latest = max(studies, key=lambda s: s.created)
    measured = _measured_on(latest.fingerprint, trials, set(candidates))
    device = str(latest.space.get("device", "cpu"))
    found = list(candidates.values())
    return _Target(f"{model} on {cluster}", "--model", model, cluster, device, found, measured,
                   latest.fingerprint, _profile_of(store, latest.fingerprint, model))  # fmt: skip


def _space_target(space: str, trials: list[Any], store: Any) -> _Target:
    from autotune.tuner.run import prepare

    ready = prepare(space)
    configs = [(c.config.to_dict(), c.predicted) for c in ready.screening.fitting]
    hashes = {config_hash(c) for c, _ in configs}
    same_cluster = {s.name for s in store.studies() if s.cluster == ready.space.cluster} if store else set()
    measured = _measured_on(None, [t for t in trials if t.study in same_cluster], hashes)
    return _Target(f"space {ready.space.name!r}", "--space", ready.space.model.name, ready.space.cluster,
                   ready.space.device, configs, measured, None)  # fmt: skip


# -- the advice ---------------------------------------------------------------------------------


def _cluster(name: str, profile: Profile | None) -> ClusterSpec | None:
    try:
        if name == CPU_LOCAL:
            return load_cluster(name, comm=profile.comm if profile else None)
        return load_cluster(name) if not name.endswith((".yaml", ".yml")) or Path(name).is_file() else None
    except ConfigError:
        return None


def _log_errors(target: _Target) -> list[float]:
    """log(measured / predicted) throughput of each measured configuration of the target."""
    out = []
    for s in target.measured.values():
        measured, predicted = s.tokens_per_s, s.predicted_tokens_per_s
        if measured and predicted:
            out.append(math.log(measured / predicted))
    return out


def _choices(target: _Target) -> tuple[list[Choice], list[Choice]]:
    """Every candidate valued: measured where it ran, else calibrated prediction."""
    ratios = _log_errors(target)
    calibration = math.exp(statistics.fmean(ratios)) if ratios else 1.0
    bpipe, base = [], []
    for config, predicted in target.candidates:
        side = target.measured.get(config_hash(config))
        pred = float(predicted["tokens_per_s"]) if predicted and predicted.get("tokens_per_s") else None
        if side is not None and side.measured:
            value = float(side.tokens_per_s)  # type: ignore[arg-type]
            choice = Choice(config, True, side.trial_id, side.tokens_per_s, list(side.values), pred, value)
        elif side is not None and side.oom_ids:
            continue  # it ran out of memory here: not a choice
        elif pred is not None:
            choice = Choice(config, False, None, None, [], pred, pred * calibration)
        else:
            continue
        if config["schedule"] == "bpipe":
            bpipe.append(choice)
        elif config["schedule"] in BASELINES:
            base.append(choice)
    return bpipe, base


def _pair_features(
    bpipe: dict[str, Any],
    baseline: dict[str, Any],
    predicted: dict[str, Any] | None,
    cluster: ClusterSpec | None,
) -> np.ndarray:
    """A pair's correction features; `predicted` is the BPipe side's estimate."""
    cross = crosses_nodes(TrialConfig.from_dict(bpipe), cluster) if cluster is not None else False
    return corr.features(bpipe, baseline, exposed_fraction=exposed_fraction(predicted), cross_node=cross)


@dataclass
class _Learned:
    """Every measured pair in the store with a finite speedup: its features, target and the
    estimator's speedup."""

    pairs: list[Pair]
    rows: np.ndarray
    targets: np.ndarray
    raw: list[float]


def _learning(trials: list[Any], store: Any) -> _Learned:
    clusters: dict[str, ClusterSpec | None] = {}
    study_cluster = {s.name: s.cluster for s in store.studies()} if store is not None else {}
    pairs, rows, ys, raw = [], [], [], []
    for pair in layout_pairs(sides(trials)):
        measured, predicted = pair.measured_speedup, pair.predicted_speedup
        if measured is None or predicted is None or pair.baseline is None:
            continue
        name = study_cluster.get(pair.bpipe.studies[0], CPU_LOCAL)
        if name not in clusters:
            clusters[name] = _cluster(name, None)
        rows.append(
            _pair_features(pair.bpipe.config, pair.baseline.config, pair.bpipe.predicted, clusters[name])
        )
        ys.append(math.log(measured / predicted))
        raw.append(predicted)
        pairs.append(pair)
    return _Learned(pairs, np.array(rows).reshape(-1, len(corr.FEATURES)), np.array(ys), raw)


def _estimator_sd(target: _Target) -> float:
    """The estimator's error on a speedup on the target's hardware: the spread of log(measured /
    predicted) over its measured configurations (a common factor cancels in a ratio), else the
    default for the device."""
    logs = _log_errors(target)
    if len(logs) >= 3:
        return max(0.05, statistics.stdev(logs))
    return DEFAULT_ESTIMATOR_SD.get(target.device, 0.2)


def _error(learned: _Learned, sd: float, noise: float) -> dict[str, Any] | None:
    """Leave-one-out over the measured pairs: the advisor's and the uncorrected estimator's mean
    relative error on the speedup, and how often the 80 % interval covers the measurement."""
    if not learned.pairs:
        return None
    loo = corr.leave_one_out(learned.rows, learned.targets, sd, noise)
    advisor, estimator, covered = [], [], 0
    for pair, (mean, spread), predicted in zip(learned.pairs, loo, learned.raw, strict=True):
        measured = pair.measured_speedup or 0.0
        advisor.append(abs(predicted * math.exp(mean) - measured) / measured)
        estimator.append(abs(predicted - measured) / measured)
        lo, hi = corr.interval(math.log(predicted) + mean, spread)
        covered += lo <= measured <= hi
    n = len(learned.pairs)
    return {"pairs": n, "advisor": statistics.fmean(advisor), "estimator": statistics.fmean(estimator),
            "coverage": covered / n}  # fmt: skip


def verdict_of(low: float, high: float) -> str:
    """contracts.md's rule: pays off when the interval's low end is above 1, does not when its
    high end is below 1, uncertain otherwise."""
    return "pays off" if low > 1.0 else "does not pay off" if high < 1.0 else "uncertain"


def _predicted(target: _Target, choice: Choice) -> dict[str, Any] | None:
    return next((p for c, p in target.candidates if c == choice.config), None)


def _advise(target: _Target, trials: list[Any], store: Any) -> Advice:
    bpipe, base = _choices(target)
    for found, what in ((bpipe, "BPipe configuration (predicted to fit or measured)"),
                        (base, f"baseline configuration ({', '.join(BASELINES)})")):  # fmt: skip
        if not found:
            raise ConfigError(target.flag, f"{target.name} has no {what}")
    best_b, best_a = max(bpipe, key=lambda c: c.value), max(base, key=lambda c: c.value)
    cluster = _cluster(target.cluster_name, target.profile)
    raw = (best_b.predicted_tokens_per_s or 0.0) / (best_a.predicted_tokens_per_s or 1.0)
    sd = _estimator_sd(target)
    learned = _learning(trials, store)
    headline = (best_b.trial_id, best_a.trial_id)
    keep = [i for i, p in enumerate(learned.pairs)
            if (p.bpipe.trial_id, p.baseline.trial_id if p.baseline else None) != headline]  # fmt: skip
    noise = corr.pooled_sd([s.values for s in sides(trials)], DEFAULT_MEASUREMENT_SD)
    counts = [(len(p.bpipe.values), len(p.baseline.values)) for p in learned.pairs if p.baseline]
    floor = corr.pair_noise(noise, counts)  # a pair's log speedup: two medians of measurements
    model = corr.Correction(sd, noise_sd=floor)
    if keep:
        model.fit(learned.rows[keep], learned.targets[keep])
    x_h = _pair_features(best_b.config, best_a.config, _predicted(target, best_b), cluster)
    shift, spread = model.predict(x_h)
    measured_speedup = best_b.value / best_a.value if best_b.measured and best_a.measured else None
    measurement = None
    if measured_speedup is not None:
        measurement = _measurement(target.measured[config_hash(best_b.config)],
                                   target.measured[config_hash(best_a.config)], noise)  # fmt: skip
    mean, sd_h = corr.combine((math.log(raw) + shift, spread), measurement)
    low, high = corr.interval(mean, sd_h)
    verdict = verdict_of(low, high)
    b_cfg, a_cfg = TrialConfig.from_dict(best_b.config), TrialConfig.from_dict(best_a.config)
    # the paper's question: BPipe without recomputation (what its memory is for) against the 1F1B
    # micro-batch that fits; its best such configuration where the space has one
    plain = [c for c in bpipe if c.config["recompute"] == "none"]
    asked = max(plain, key=lambda c: c.value) if plain else best_b
    paper = _paper(TrialConfig.from_dict(asked.config), cluster, target.profile)
    rows = []
    if cluster is not None:
        rows = reasons(b_cfg, a_cfg, cluster, target.profile,
                       measured=_measured_records(store, best_b, best_a, measured_speedup))  # fmt: skip
    mine = [p for p in learned.pairs if p.bpipe.config_hash in target.measured]
    return Advice(
        target=target.name, basis="measurements" if measurement else "predictions",
        bpipe_pays_off=verdict == "pays off", verdict=verdict, predicted_speedup=math.exp(mean),
        interval=(low, high), estimator_speedup=raw, measured_speedup=measured_speedup,
        best_bpipe=best_b, best_baseline=best_a, paper=paper, reasons=rows, measured_pairs=len(mine),
        evidence=[p.to_dict() for p in learned.pairs] + _oom_evidence(target, trials),
        error=_error(learned, sd, floor),
        measure_next=_measure_next(target, bpipe, base, (best_b, best_a), model, x_h, cluster),
        learned_from=len(keep), notes=_notes(target, cluster, paper, verdict),
        measured_by_study=_paired(target.measured[config_hash(best_b.config)],
                                  target.measured[config_hash(best_a.config)]) if measured_speedup else {},
    )  # fmt: skip


def _by_study(side: Side) -> dict[str, float]:
    grouped: dict[str, list[float]] = {}
    for study, value in side.runs:
        grouped.setdefault(study, []).append(value)
    return {s: statistics.median(v) for s, v in grouped.items()}


def _paired(bpipe: Side, baseline: Side) -> dict[str, float]:
    """The speedup in each campaign (study) where both sides ran: paired in time."""
    b, a = _by_study(bpipe), _by_study(baseline)
    return {s: b[s] / a[s] for s in sorted(set(b) & set(a))}


def _measurement(bpipe: Side, baseline: Side, noise: float) -> tuple[float, float]:
    """The measured log speedup and its standard error. Where both sides ran in the same two or
    more campaigns (studies), each campaign's ratio is a paired measurement (the two ran in one
    stretch of the machine's time, so its slow and fast spells cancel) and their spread gives the
    error; otherwise the runs are independent, each with the store's pooled run-to-run noise."""
    paired = _paired(bpipe, baseline)
    if len(paired) >= 2:
        logs = [math.log(r) for r in paired.values()]
        spread = statistics.stdev(logs) / math.sqrt(len(logs))
        return statistics.fmean(logs), max(spread, 0.01)
    speedup = (bpipe.tokens_per_s or 1.0) / (baseline.tokens_per_s or 1.0)
    return math.log(speedup), noise * math.sqrt(1 / len(bpipe.values) + 1 / len(baseline.values))


def _notes(
    target: _Target, cluster: ClusterSpec | None, paper: dict[str, Any] | None, verdict: str
) -> list[str]:
    notes = []
    if cluster is None:
        notes.append(f"cluster {target.cluster_name!r} is not known here: no reasons or paper estimate")
    if paper and paper.get("predicted_speedup") is not None:
        theirs = "pays off" if paper["predicted_speedup"] > 1 else "does not pay off"
        if theirs != verdict:
            said = f"the paper's method says {theirs} ({paper['predicted_speedup']:.3f}x)"
            notes.append(f"{said}: it leaves out "
                         "BPipe's transfers and the rest of the step, which the reasons show")  # fmt: skip
    return notes


def _measured_records(store: Any, b: Choice, a: Choice, speedup: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"speedup": speedup}
    if store is None:
        return out
    for key, choice in (("bpipe", b), ("baseline", a)):
        if choice.trial_id is not None:
            out[key] = store.trial(choice.trial_id)
    return out


def _oom_evidence(target: _Target, trials: list[Any]) -> list[dict[str, Any]]:
    """Layouts of the target where BPipe ran and every baseline ran out of memory."""
    mine = [t for t in trials if t.config_hash in target.measured]
    return [p.to_dict() for p in layout_pairs(sides(mine)) if p.baseline is None]


def _paper(cfg: TrialConfig, cluster: ClusterSpec | None, profile: Profile | None) -> dict[str, Any] | None:
    if cluster is None:
        return None
    from autotune.estimate.paper import paper_estimate

    found = paper_estimate(cfg, cluster, profile=profile)
    if found.get("baseline") is None:
        return {"predicted_speedup": None, "reason": found.get("reason")}
    return {**found["paper"], "bpipe": cfg.to_dict(), "baseline": found["baseline"]}


def _layout(c: Choice) -> tuple[int, int, int]:
    return int(c.config["tp"]), int(c.config["pp"]), int(c.config["dp"])


def _measure_next(
    target: _Target, bpipe: list[Choice], base: list[Choice], headline: tuple[Choice, Choice],
    model: corr.Correction, x_h: np.ndarray, cluster: ClusterSpec | None,
) -> dict[str, Any] | None:  # fmt: skip
    """The unmeasured configuration, or pair, whose measurement would narrow the interval most:
    an unmeasured side of the headline pair first (its measurement replaces a prediction),
    else the layout pair that most shrinks the correction's variance at the headline."""
    unmeasured = [
        (name, c) for name, c in zip(("BPipe", "baseline"), headline, strict=True) if not c.measured
    ]
    if unmeasured:
        names = " and ".join(name for name, _ in unmeasured)
        what = "sides are" if len(unmeasured) > 1 else "side is"
        return {"configs": [c.config for _, c in unmeasured],
                "why": f"the headline pair's {names} {what} predicted, not measured"}  # fmt: skip
    best: tuple[float, list[dict[str, Any]]] | None = None
    for layout in sorted({_layout(c) for c in bpipe}):
        here_a = [c for c in base if _layout(c) == layout]
        if not here_a:
            continue
        b = max((c for c in bpipe if _layout(c) == layout), key=lambda c: c.value)
        a = max(here_a, key=lambda c: c.value)
        if b.measured and a.measured:
            continue
        gain = model.variance_reduction(
            x_h, _pair_features(b.config, a.config, _predicted(target, b), cluster)
        )
        if best is None or gain > best[0]:
            best = (gain, [c.config for c in (b, a) if not c.measured])
    if best is None:
        return None
    return {
        "configs": best[1],
        "why": f"measuring this pair shrinks the headline's log-variance by {best[0]:.2g}",
    }
