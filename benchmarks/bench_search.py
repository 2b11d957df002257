"""Search efficiency: real trials the tuner needs to reach a space's best configuration, vs random search.

    python -m benchmarks.bench_search [--space demo-cpu] [--seeds 10] [--table PATH] [--quick]

1. The space is loaded and screened as `autotune tune` does it: `prepare` (load, validate,
   screen with the roofline), then the model profiled on this CPU (`cpu_profile`, into a Store on
   a temporary SQLite file) and the space screened again with the profile. The candidates are
   the configurations predicted to fit, ranked by the predicted objective.
2. Exhaustive measurement, once: a real trial (`run_trial(cfg, steps=space.steps,
   timeout=space.trial_timeout)`) of every candidate, one at a time (`--reps` > 1: that many
   passes, alternately in predicted order and reversed; a configuration's result is its median
   run). The best configuration is the highest measured objective among ok results; since
   timings on a shared CPU move by 10-30 %, the configurations within `--tolerance` (5 %) of the
   best are reported beside it. `--table PATH` writes the measurements (and the profile, so
   the screening repeats exactly) as JSON and, when the file exists, reuses them instead of
   measuring again (a candidate missing from it is measured and added).
3. For each seed, the real tuner: `Campaign` with a real Store on a fresh temporary SQLite
   file, its real Optuna study (TPE, `seed`), the space's `seed_top`, no trial, time or
   patience limit, concurrency 1, and `ReplayDispatcher` in place of Ray: a REPLAY of the
   measurements of step 2 (each submitted configuration is answered at once with its measured
   result), so every seed searches the same measured world. Counted: the real trials
   dispatched until the first one of the best configuration, and of one within the tolerance.
   The campaign is stopped at the first submission after the best one's result was recorded.
   Each real trial is marked by how the campaign chose it: seeded (one of the `seed_top` best
   predictions), proposed by TPE, or a fallback (the best unmeasured prediction, taken after
   MAX_IDLE_PROPOSALS proposals in a row named no new fitting configuration).
4. Random search: for each seed, a random permutation of the candidates
   (`random.Random(seed)`); the same two counts.

Printed: the measured table (predicted rank and objective beside the measurement), per seed
the tuner's and random search's counts and the order the tuner tried configurations in (as
predicted ranks), the medians as counts and as fractions of the space's valid configurations
and of the fitting ones, the ratio tuner/random, the estimator's rank of the measured best,
and whether the tuner's median is within `--target` (25 %) of the space's valid configurations.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from autotune.estimate.clusters import load_cluster
from autotune.results import TrialResult
from autotune.tuner.campaign import MAX_IDLE_PROPOSALS, Campaign, Limits, describe
from autotune.tuner.run import Prepared, cpu_profile, prepare
from autotune.tuner.screen import Candidate, Screening, knob_key, objective_of, screen
from benchmarks.stats import spearman
from storage import Store

TARGET = 25.0  # percent of the space's valid configurations (median real trials to the best)
TOLERANCE = 5.0  # percent below the best that still counts as "within tolerance"
TABLE_FORMAT = "autotune-bench-search-table"

QUICK_SPACE = """\
name: bench-search-quick
model: tiny-gpt
cluster: cpu-local
device: cpu
global_batch_size: 4
max_world_size: 2
knobs:
  pp: [1, 2]
  micro_batch_size: [1, 2]
  schedule: [1f1b, gpipe]
objective: tokens_per_s
trial: {steps: 1, timeout: 60}
search: {seed_top: 2, concurrency: 1}
"""

Key = tuple[Any, ...]


@dataclass(frozen=True)
class Setup:
    space: str
    seeds: int
    table: str | None
    reps: int
    tolerance: float  # percent
    target: float  # percent
    quick: bool
    verbose: bool


# -- the measured world ---------------------------------------------------------------------------


@dataclass
class Measured:
    """One candidate: its prediction and its real runs (the replayed result is the median run)."""

    rank: int  # 1-based rank of the prediction among the candidates
    candidate: Candidate
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> Key:
        return self.candidate.knobs

    def result(self, objective: str) -> dict[str, Any]:
        """The median ok run if at least half the runs are ok; else the first failed run."""
        ok = [r for r in self.runs if r["status"] == "ok" and objective_of(r, objective) is not None]
        if 2 * len(ok) >= len(self.runs):
            ok.sort(key=lambda r: objective_of(r, objective) or 0.0)
            return ok[(len(ok) - 1) // 2]
        return next(r for r in self.runs if r not in ok)

    def value(self, objective: str) -> float | None:
        result = self.result(objective)
        return objective_of(result, objective) if result["status"] == "ok" else None


@dataclass
class World:
    prepared: Prepared
    screening: Screening
    rows: list[Measured]  # predicted order
    objective: str
    profile: dict[str, Any] | None  # the profile screened with (written to the table)

    def values(self) -> dict[Key, float | None]:
        return {r.key: r.value(self.objective) for r in self.rows}

    def best(self) -> Measured | None:
        ok = [r for r in self.rows if r.value(self.objective) is not None]
        return max(ok, key=lambda r: r.value(self.objective) or 0.0, default=None)

    def near(self, tolerance: float) -> set[Key]:
        best = self.best()
        if best is None:
            return set()
        floor = (best.value(self.objective) or 0.0) * (1.0 - tolerance / 100.0)
        return {k for k, v in self.values().items() if v is not None and v >= floor}


def _plain(value: Any) -> Any:
    """`value` as JSON reads it back (tuples become lists), so stored and fresh data compare."""
    return json.loads(json.dumps(value))


def screen_space(space_path: str, table: dict[str, Any] | None, echo: Callable[[str], None]) -> World:
    """`autotune tune`'s tier 1: prepare, profile on this CPU (kept in a temporary store), screen."""
    from trial_runners.fingerprint import hardware_fingerprint

    ready = prepare(space_path)
    space = ready.space
    if table is not None and table.get("space") != _plain(space.source):
        raise SystemExit(f"the table was measured for another space ({table.get('space', {}).get('name')})")
    if table is not None and table.get("fingerprint") != _plain(hardware_fingerprint(space.device)):
        echo(f"note: the table was measured on other hardware: {table.get('fingerprint')}")
    screening = ready.screening
    with (
        tempfile.TemporaryDirectory(prefix="autotune-bench-search-") as tmp,
        Store(f"sqlite:///{Path(tmp) / 'profile.db'}") as store,
    ):
        fingerprint = store.register_fingerprint(hardware_fingerprint(space.device))
        if table is not None and table.get("profile") is not None:
            store.save_profile(fingerprint, space.model.name, table["profile"])
        profile = cpu_profile(space, store, fingerprint, echo)
        profile_data = store.profile(fingerprint, space.model.name)
    if profile is not None:
        cluster = load_cluster(space.cluster, comm=profile.comm) if profile.comm else ready.cluster
        screening = screen(ready.configs, cluster, objective=space.objective, profile=profile)
    rows = [Measured(i + 1, c) for i, c in enumerate(screening.fitting)]
    return World(ready, screening, rows, space.objective, profile_data)


def load_table(path: str | None) -> dict[str, Any] | None:
    if path is None or not Path(path).exists():
        return None
    data = json.loads(Path(path).read_text())
    if data.get("format") != TABLE_FORMAT:
        raise SystemExit(f"{path} is not a table written by this benchmark")
    return dict(data)


def save_table(path: str, world: World) -> None:
    from trial_runners.fingerprint import hardware_fingerprint

    space = world.prepared.space
    data = {
        "format": TABLE_FORMAT,
        "space": _plain(space.source),
        "fingerprint": hardware_fingerprint(space.device),
        "profile": world.profile,
        "rows": [{"config": r.candidate.config.to_dict(), "runs": r.runs} for r in world.rows if r.runs],
    }
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def measure(world: World, setup: Setup, table: dict[str, Any] | None) -> None:
    """Every candidate's real trials (reused from the table where it has them)."""
    from trial_runners.trial import run_trial

    space = world.prepared.space
    stored = {knob_key(row["config"]): row["runs"] for row in (table or {}).get("rows", [])}
    for row in world.rows:
        row.runs = list(stored.get(row.key, []))
    todo = [r for r in world.rows if len(r.runs) < setup.reps]
    if table is not None:
        print(f"table {setup.table}: {len(world.rows) - len(todo)} of {len(world.rows)} candidates reused")
    if not todo:
        return
    total = sum(setup.reps - len(r.runs) for r in todo)
    print(f"measuring {total} real trial(s) of {len(todo)} configuration(s), one at a time")
    done, start = 0, time.monotonic()
    for rep in range(setup.reps):
        for row in todo if rep % 2 == 0 else todo[::-1]:
            if len(row.runs) > rep:
                continue
            began = time.monotonic()
            result = run_trial(row.candidate.config, steps=space.steps, timeout=space.trial_timeout).to_dict()
            row.runs.append(result)  # as JSON, the table's form
            done += 1
            value = objective_of(result, world.objective) if result["status"] == "ok" else None
            what = (
                f"{value:,.0f} {world.objective}"
                if value is not None
                else f"{result['status']}: {result['error']}"
            )
            print(
                f"  [{done}/{total}] #{row.rank:<2} {describe(row.candidate.config.to_dict()):<52} -> {what} "
                f"({time.monotonic() - began:.1f} s)",
                flush=True,
            )
            if setup.table:
                save_table(setup.table, world)
    print(f"measured in {time.monotonic() - start:.0f} s")


# -- the searches ---------------------------------------------------------------------------------


class _Found(Exception):
    """Raised by the replay to end a campaign once the best configuration's result is recorded."""


@dataclass
class _Replayed:
    key: Any
    result: TrialResult
    attempt: int = 1
    worker: str | None = None


class ReplayDispatcher:
    """A REPLAY, not a trial runner: each submitted configuration is answered at once with the
    result its real trial gave in the exhaustive measurement, so every seed searches the same
    measured world. It keeps the order of submissions (the campaign's real trials), and once
    the configuration `stop_after` has been answered, the next submission raises `_Found`."""

    def __init__(self, results: dict[Key, dict[str, Any]], stop_after: Key) -> None:
        self.results, self.stop_after = results, stop_after
        self.order: list[Key] = []
        self.ids: list[Any] = []  # the store's trial id of each submission
        self._ready: list[_Replayed] = []

    @property
    def running(self) -> int:
        return len(self._ready)

    def submit(self, key: Any, config: dict[str, Any], *, steps: int, seed: int, timeout: float) -> None:
        if self.stop_after in self.order:
            raise _Found
        k = knob_key(config)
        self.order.append(k)
        self.ids.append(key)
        self._ready.append(_Replayed(key, TrialResult.from_dict(_plain(self.results[k]))))

    def wait(self, timeout: float) -> list[_Replayed]:
        ready, self._ready = self._ready, []
        return ready

    def close(self) -> None:
        self._ready = []


@dataclass
class Search:
    seed: int
    order: list[Key]  # configurations tried, in order (real trials)
    seconds: float = 0.0
    why: list[str] = field(default_factory=list)  # per real trial: "s" seeded, "f" fallback, "" TPE
    proposals: int = 0  # Optuna trials (every proposal, answered on the spot or run)

    def trials_to(self, targets: set[Key]) -> float:
        """Real trials up to and including the first one in `targets` (inf if never)."""
        return next((i + 1.0 for i, k in enumerate(self.order) if k in targets), math.inf)


def run_tuner(world: World, seed: int, best: Key, verbose: bool) -> Search:
    """The real campaign (store, Optuna study, seeding) on a fresh SQLite file, over the replay."""
    from trial_runners.fingerprint import hardware_fingerprint

    space = world.prepared.space
    results = {r.key: r.result(world.objective) for r in world.rows}
    lines: list[str] = []
    echo = print if verbose else lines.append
    dispatcher = ReplayDispatcher(results, stop_after=best)
    start = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="autotune-bench-search-") as tmp,
        Store(f"sqlite:///{Path(tmp) / 'campaign.db'}") as store,
    ):
        fingerprint = store.register_fingerprint(hardware_fingerprint(space.device))
        store.create_study(
                space.name, space=space.source, model=space.model.name, cluster=space.cluster,
                fingerprint=fingerprint,
            )  # fmt: skip
        store.save_predictions(
            space.name, [(c.config.to_dict(), c.predicted) for c in world.screening.fitting]
        )
        campaign = Campaign(
                store=store, study=space.name, screening=world.screening, knobs=space.knobs,
                fingerprint=fingerprint, objective=space.objective, steps=space.steps,
                trial_timeout=space.trial_timeout, seed_top=space.seed_top,
                limits=Limits(concurrency=1), seed=seed, echo=echo,
            )  # fmt: skip
        with contextlib.suppress(_Found):
            campaign.run(dispatcher)
        seconds = time.monotonic() - start
        study = optuna.load_study(study_name=space.name, storage=store.url)
        attrs = [t.user_attrs for t in study.get_trials(deepcopy=False)]
        numbers = [store.trial(i).optuna_number for i in dispatcher.ids]
    why = [_WHY.get(attrs[n].get("seeded", ""), "?") if n is not None else "?" for n in numbers]
    return Search(seed, dispatcher.order, seconds, why, len(attrs))


_WHY = {"": "", "top prediction": "s", "best unmeasured prediction": "f"}


def run_random(world: World, seed: int) -> Search:
    order = [r.key for r in world.rows]
    random.Random(seed).shuffle(order)
    return Search(seed, order)


# -- report ---------------------------------------------------------------------------------------


def _count(x: float) -> str:
    return "never" if math.isinf(x) else f"{x:g}"


def _pct(x: float, of: int) -> str:
    return "-" if math.isinf(x) else f"{100.0 * x / of:.0f}%"


def report_world(world: World, setup: Setup) -> None:
    space, obj = world.prepared.space, world.objective
    best, near = world.best(), world.near(setup.tolerance)
    print()
    print(f"{'rank':>4} {'configuration':<52} {'predicted':>10} {'measured':>10} {'runs':>5}  note")
    for r in world.rows:
        pred = objective_of(r.candidate.predicted, obj) or 0.0
        value = r.value(obj)
        meas = f"{value:,.0f}" if value is not None else r.result(obj)["status"]
        mark = "best" if best is not None and r.key == best.key else ("<5%" if r.key in near else "")
        if mark == "<5%" and setup.tolerance != TOLERANCE:
            mark = f"<{setup.tolerance:g}%"
        spread = ""
        oks = [objective_of(x, obj) for x in r.runs if x["status"] == "ok"]
        if len(oks) > 1:
            spread = f" ({min(v or 0 for v in oks):,.0f}-{max(v or 0 for v in oks):,.0f})"
        print(
            f"{r.rank:>4} {describe(r.candidate.config.to_dict()):<52} {pred:>10,.0f} {meas:>10} "
            f"{len(r.runs):>5}  {mark}{spread}"
        )
    ok = [r for r in world.rows if r.value(obj) is not None]
    if len(ok) > 1:
        rho = spearman(
            [objective_of(r.candidate.predicted, obj) or 0.0 for r in ok], [r.value(obj) or 0.0 for r in ok]
        )
        print(f"rank correlation (Spearman) of predicted and measured {obj}, {len(ok)} ok: {rho:.3f}")
    print(f"(objective {obj}; {space.steps} measured step(s) per trial)")


def report(world: World, setup: Setup, tuner: list[Search], rand: list[Search]) -> None:
    space = world.prepared.space
    best = world.best()
    assert best is not None
    near = world.near(setup.tolerance)
    valid, fitting = len(world.prepared.configs), len(world.rows)
    tol = f"{setup.tolerance:g}%"
    rank_of = {r.key: r.rank for r in world.rows}
    print()
    print(
        f"space {space.name}: {valid + world.prepared.rejected} combinations, {valid} valid, "
        f"{fitting} predicted to fit (searched); seed_top {space.seed_top}"
    )
    print(
        f"measured best: {describe(best.candidate.config.to_dict())} -> {best.value(world.objective):,.0f} "
        f"{world.objective}; estimator's rank of it: {best.rank} of {fitting}"
        f" ({'among' if best.rank <= space.seed_top else 'outside'} the {space.seed_top} seeded top ones)"
    )
    print(
        f"within {tol} of the best: {len(near)} configuration(s), estimator's ranks "
        f"{sorted(rank_of[k] for k in near)}"
    )
    print()
    print(
        f"{'seed':>4} {'tuner->best':>11} {'tuner->' + tol:>11} {'random->best':>12} {'random->' + tol:>12} "
        f"{'replay s':>8} {'proposals':>9}  tuner's trials: estimator's rank (s seeded, f fallback, else TPE)"
    )
    for ts, rs in zip(tuner, rand, strict=True):
        order = " ".join(f"{rank_of[k]}{w}" for k, w in zip(ts.order, ts.why, strict=True))
        print(
            f"{ts.seed:>4} {_count(ts.trials_to({best.key})):>11} {_count(ts.trials_to(near)):>11} "
            f"{_count(rs.trials_to({best.key})):>12} {_count(rs.trials_to(near)):>12} "
            f"{ts.seconds:>8.1f} {ts.proposals:>9}  {order}"
        )
    whys = [w for ts in tuner for w in ts.why]
    print(
        f"the tuner's {len(whys)} real trials over {len(tuner)} seeds: {whys.count('s')} seeded top "
        f"predictions, {whys.count('')} proposed by TPE, {whys.count('f')} fallbacks to the best "
        f"unmeasured prediction "
        f"(after {MAX_IDLE_PROPOSALS} proposals without a new configuration); "
        f"{sum(ts.proposals for ts in tuner)} Optuna proposals in all"
    )
    med = {
        (name, what): statistics.median(s.trials_to(targets) for s in runs)
        for name, runs in (("tuner", tuner), ("random", rand))
        for what, targets in (("best", {best.key}), ("near", near))
    }
    print()
    for what, label in (("best", "the best"), ("near", f"within {tol} of the best")):
        t, r = med["tuner", what], med["random", what]
        ratio = f"{t / r:.2f}" if r and not math.isinf(r) and not math.isinf(t) else "-"
        print(
            f"median real trials to {label}: tuner {_count(t)} ({_pct(t, valid)} of {valid} valid, "
            f"{_pct(t, fitting)} of {fitting} fitting), random {_count(r)} ({_pct(r, valid)} of {valid} "
            f"valid, {_pct(r, fitting)} of {fitting} fitting); tuner/random {ratio}"
        )
    print(
        f"random search's expectation: {(fitting + 1) / 2:g} trials to the best, "
        f"{(fitting + 1) / (len(near) + 1):.1f} to within {tol} (of {fitting} fitting)"
    )
    t = med["tuner", "best"]
    met_valid = t <= setup.target / 100.0 * valid
    met_fitting = t <= setup.target / 100.0 * fitting
    print(
        f"tuner median <= {setup.target:g}% of the space's configurations: "
        f"{'met' if met_valid else 'not met'} (denominator: the {valid} valid configurations; "
        f"{_count(t)} vs {setup.target / 100.0 * valid:g}); of the {fitting} fitting ones: "
        f"{'met' if met_fitting else 'not met'} ({_count(t)} vs {setup.target / 100.0 * fitting:g})"
    )


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> Setup:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_search", description=__doc__.splitlines()[0])
    p.add_argument("--space", default=None, help="a shipped space or YAML path (default demo-cpu)")
    p.add_argument(
        "--seeds", type=int, default=None, help="tuner and random seeds 0..N-1 (default 10, 2 quick)"
    )
    p.add_argument(
        "--table", default=None, help="JSON file of the measurements: reused if it exists, else written"
    )
    p.add_argument("--reps", type=int, default=1, help="real trials per configuration (median kept)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="percent below the best still counted")
    p.add_argument("--target", type=float, default=TARGET, help="percent of the valid configurations")
    p.add_argument(
        "--quick",
        action="store_true",
        help="an 8-configuration tiny-gpt space (pp 1-2, mbs 1-2, 1f1b/gpipe, 1 step), 2 seeds",
    )
    p.add_argument("--verbose", action="store_true", help="print the campaigns' own lines")
    a = p.parse_args(argv)
    if a.quick and a.space is not None:
        p.error("--quick uses its own space; leave out --space")
    if (a.seeds is not None and a.seeds < 1) or a.reps < 1:
        p.error("--seeds and --reps must be at least 1")
    return Setup(
        space=a.space or "demo-cpu",
        seeds=a.seeds or (2 if a.quick else 10),
        table=a.table,
        reps=a.reps,
        tolerance=a.tolerance,
        target=a.target,
        quick=a.quick,
        verbose=a.verbose,
    )


def main(argv: list[str] | None = None) -> int:
    setup = parse_args(argv)
    warnings.filterwarnings("ignore", module="optuna")  # TPE's multivariate is "experimental"
    with tempfile.TemporaryDirectory(prefix="autotune-bench-search-") as tmp:
        space_path = setup.space
        if setup.quick:
            space_path = str(Path(tmp) / "bench-search-quick.yaml")
            Path(space_path).write_text(QUICK_SPACE)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"{os.cpu_count()} cores; load average {load:.2f} at start")
        table = load_table(setup.table)
        world = screen_space(space_path, table, print)
        measure(world, setup, table)
    report_world(world, setup)
    best = world.best()
    if best is None:
        print("no candidate measured ok: nothing to search for")
        return 0
    tuner = [run_tuner(world, seed, best.key, setup.verbose) for seed in range(setup.seeds)]
    rand = [run_random(world, seed) for seed in range(setup.seeds)]
    report(world, setup, tuner, rand)
    if hasattr(os, "getloadavg"):
        print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
