"""The BPipe advisor: pairs from the store, the correction, the verdict, and its interfaces.

Pairs are built from constructed trial records; the correction is checked on synthetic pairs
with a known bias; the CLI and the Python API run on a real SQLite store written through the
store's API (trials with the predictions they started with, as a campaign writes them).
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from autotune.advise import bpipe_payoff
from autotune.advise import correction as corr
from autotune.advise.advisor import verdict_of
from autotune.advise.pairs import layout_pairs, sides
from autotune.config import TrialConfig, load_model
from autotune.errors import ConfigError
from autotune.estimate.clusters import load_cluster
from autotune.estimate.estimator import estimate
from storage import Store, config_hash
from storage.records import TrialRecord

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _config(
    schedule: str, *, pp: int = 4, mbs: int = 1, recompute: str = "none", dp: int = 1
) -> dict[str, Any]:
    model = replace(load_model("tiny-gpt", seq_len=256), name="tiny-gpt-s256")
    return TrialConfig(model=model, pp=pp, dp=dp, micro_batch_size=mbs, global_batch_size=8,
                       schedule=schedule, recompute=recompute).to_dict()  # fmt: skip


def _record(i: int, config: dict[str, Any], status: str = "ok", tokens: float | None = 100.0, *,
            predicted: float = 100.0, fingerprint: str = "fp", study: str = "s",
            error: str | None = None) -> TrialRecord:  # fmt: skip
    return TrialRecord(
        id=i, study=study, config=config, config_hash=config_hash(config), fingerprint=fingerprint,
        status=status,
        error=error, step_time_s=1.0, tokens_per_s=tokens if status == "ok" else None, mfu=None,
        achieved_tflops=None, losses=[], stages=[], predicted={"tokens_per_s": predicted}, optuna_number=None,
        attempt=1, worker=None, started_at=T0, finished_at=T0 + timedelta(seconds=i),
    )  # fmt: skip


def test_a_layout_pair_is_the_fastest_of_each_side() -> None:
    trials = [
        _record(1, _config("bpipe", mbs=1), tokens=120),
        _record(2, _config("bpipe", mbs=2), tokens=150),
        _record(3, _config("1f1b", mbs=1), tokens=110),
        _record(4, _config("gpipe", mbs=1), tokens=90),
        _record(5, _config("1f1b", mbs=2, recompute="full"), tokens=100),
        _record(6, _config("1f1b", mbs=2), status="failed", error="interrupted"),  # says nothing
    ]
    (pair,) = layout_pairs(sides(trials))
    assert pair.headline
    assert pair.bpipe.trial_ids == (2,) and pair.baseline is not None and pair.baseline.trial_ids == (3,)
    assert pair.measured_speedup == pytest.approx(150 / 110)
    assert pair.predicted_speedup == pytest.approx(1.0)


def test_reruns_are_one_side_with_their_median() -> None:
    bpipe, base = _config("bpipe"), _config("1f1b")
    trials = [_record(1, bpipe, tokens=100), _record(2, bpipe, tokens=130, study="other"),
              _record(3, bpipe, tokens=110), _record(4, base, tokens=100)]  # fmt: skip
    (pair,) = layout_pairs(sides(trials))
    assert pair.bpipe.values == (100, 130, 110) and pair.bpipe.tokens_per_s == 110
    assert pair.bpipe.studies == ("other", "s")


def test_a_baseline_out_of_memory_at_every_setting_is_evidence() -> None:
    trials = [
        _record(1, _config("bpipe", mbs=2), tokens=150),
        _record(2, _config("1f1b", mbs=2), status="oom"),
        _record(3, _config("gpipe", mbs=2), status="oom"),
    ]
    (pair,) = layout_pairs(sides(trials))
    assert pair.baseline is None and pair.measured_speedup is None
    assert sorted(i for s in pair.oom_baselines for i in s.oom_ids) == [2, 3]
    assert pair.to_dict()["baseline_out_of_memory"] == [2, 3]


def test_the_headline_pair_spans_layouts_and_groups_stay_apart() -> None:
    trials = [
        _record(1, _config("bpipe", pp=4), tokens=150),
        _record(2, _config("1f1b", pp=4), tokens=100),
        _record(3, _config("1f1b", pp=2), tokens=140),  # the best baseline, at another layout
        _record(4, _config("bpipe", pp=4), tokens=999, fingerprint="other-machine"),
    ]
    pairs = layout_pairs(sides(trials))
    mine = [p for p in pairs if p.bpipe.fingerprint == "fp"]
    assert len(mine) == 2
    layout, headline = mine
    assert not layout.headline and layout.baseline.trial_ids == (2,)  # type: ignore[union-attr]
    assert headline.headline and headline.baseline.trial_ids == (3,)  # type: ignore[union-attr]
    assert headline.measured_speedup == pytest.approx(150 / 140)
    assert all(p.bpipe.fingerprint == "fp" for p in pairs)  # the other machine has no baseline


# -- the correction ------------------------------------------------------------------------------


TRUTH = np.array([-0.05, 0.0, 0.10, 0.0, -0.6, 0.0, 0.0, 0.0])  # a known bias of the estimator


def _synthetic(n: int, rng: np.random.Generator) -> np.ndarray:
    rows = np.zeros((n, len(corr.FEATURES)))
    rows[:, 0] = 1
    rows[:, 1] = rng.choice([0.0, math.log(2), math.log(4)], n)  # micro-batch ratio
    rows[:, 2] = rng.choice([0.0, 1.0, 2.0], n)  # recompute avoided
    rows[:, 3] = np.log(rng.uniform(0.8, 1.0, n))  # bubble ratio
    rows[:, 4] = rng.uniform(0.0, 0.3, n)  # exposed transfer
    rows[:, 5] = rng.integers(0, 2, n)  # flash
    rows[:, 6] = rng.integers(0, 2, n)  # llama
    return rows


def test_the_correction_recovers_a_known_bias_and_its_interval_covers_80_percent() -> None:
    rng = np.random.default_rng(0)
    noise = 0.05
    rows = _synthetic(400, rng)
    truth = rows @ TRUTH
    y = truth + rng.normal(0.0, noise, len(truth))
    model = corr.Correction(estimator_sd=0.3, noise_sd=noise).fit(rows[:200], y[:200])
    assert model.mean[2] == pytest.approx(0.10, abs=0.02)  # recompute avoided, well determined
    held = rows[200:]
    fitted = np.array([model.predict(x)[0] for x in held])
    assert np.sqrt(np.mean((fitted - truth[200:]) ** 2)) < 0.02  # the bias, recovered
    assert np.sqrt(np.mean(truth[200:] ** 2)) > 0.08  # which was there to recover
    covered = 0
    for x, target in zip(held, y[200:], strict=True):
        mean, sd = model.predict(x)
        covered += abs(target - mean) <= corr.Z80 * sd
    assert 0.72 <= covered / 200 <= 0.88


def test_with_no_pair_the_interval_is_the_estimators_error() -> None:
    model = corr.Correction(estimator_sd=0.2, noise_sd=0.07)
    x = np.array([1.0, math.log(2), 0.0, 0.0, 0.0, 1.0, 1.0, 0.0])  # a typical pair: |x|^2 ~ 3.5
    mean, sd = model.predict(x)
    assert mean == 0.0 and sd == pytest.approx(0.2, rel=0.15)
    few = corr.Correction(estimator_sd=0.2, noise_sd=0.07).fit(np.tile(x, (5, 1)), np.full(5, 0.1))
    assert few.predict(x)[1] < sd  # narrows as pairs accumulate
    assert few.predict(x)[0] == pytest.approx(0.1, abs=0.03)


def test_a_measurement_outweighs_a_loose_prediction() -> None:
    mean, sd = corr.combine((math.log(1.3), 0.3), (math.log(0.9), 0.03))
    assert math.exp(mean) == pytest.approx(0.9, rel=0.02) and sd < 0.03


@pytest.mark.parametrize(("low", "high", "verdict"), [(1.01, 1.3, "pays off"),
                                                       (0.7, 0.99, "does not pay off"),
                                                       (0.9, 1.1, "uncertain")])  # fmt: skip
def test_the_verdict_follows_the_interval(low: float, high: float, verdict: str) -> None:
    assert verdict_of(low, high) == verdict


# -- a real store ----------------------------------------------------------------------------------

SPACE = {"name": "adv", "device": "cpu", "cluster": "cpu-local"}


def _write_store(
    url: str, measured: dict[str, list[float]], *, study: str = "adv"
) -> dict[str, dict[str, Any]]:
    """A study on this machine's cpu-local cluster: predictions for four configurations and the
    given measured runs (name -> tokens/s of each run); returns name -> config."""
    cluster = load_cluster("cpu-local")
    configs = {
        "bpipe": _config("bpipe", mbs=2), "1f1b-full": _config("1f1b", mbs=2, recompute="full"),
        "1f1b": _config("1f1b", mbs=1), "gpipe": _config("gpipe", mbs=1),
    }  # fmt: skip
    predicted = {k: estimate(TrialConfig.from_dict(c), cluster) for k, c in configs.items()}
    with Store(url) as store:
        fp = store.register_fingerprint({"device": "cpu", "test": hashlib.sha1(url.encode()).hexdigest()})
        store.create_study(study, space=SPACE, model="tiny-gpt-s256", cluster="cpu-local", fingerprint=fp)
        store.save_predictions(study, [(configs[k], predicted[k]) for k in configs])
        for name, runs in measured.items():
            for value in runs:
                tid = store.start_trial(
                    study, config=configs[name], fingerprint=fp, predicted=predicted[name]
                )
                result = {"status": "ok", "error": None, "config": configs[name], "step_time_s": 1.0,
                          "tokens_per_s": value, "achieved_tflops": 0.0, "mfu": None, "losses": [1.0],
                          "stages": [{"stage": s, "peak_activation_bytes": 1, "peak_memory_bytes": 2,
                                      "evicted_bytes": 0} for s in range(4)]}  # fmt: skip
                store.finish_trial(tid, result)
    return configs


def _advise_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "autotune.cli", "advise", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def test_a_measured_headline_pair_decides_and_the_json_equals_the_python_api(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    url = f"sqlite:///{db}"
    _write_store(
        url,
        {
            "bpipe": [150, 155, 148],
            "1f1b-full": [100, 104, 98],
            "1f1b": [110, 112, 109],
            "gpipe": [95, 96, 94],
        },
    )
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    advice = bpipe_payoff(storage=url, study="adv")
    assert advice.basis == "measurements" and advice.verdict == "pays off" and advice.bpipe_pays_off
    assert advice.best_bpipe.measured and advice.best_bpipe.tokens_per_s == 150
    assert advice.best_baseline.config["micro_batch_size"] == 1 and advice.best_baseline.tokens_per_s == 110
    assert advice.measured_speedup == pytest.approx(150 / 110)
    assert advice.interval[0] > 1 and advice.interval[0] <= advice.predicted_speedup <= advice.interval[1]
    assert advice.measured_pairs == 1 and advice.error is not None and advice.error["pairs"] == 1
    assert {r["name"] for r in advice.reasons} == {"memory", "compute", "bubble", "transfers", "throughput"}
    assert advice.paper is not None and "predicted_speedup" in advice.paper
    run = _advise_cli(["--storage", url, "--study", "adv", "--json"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == json.loads(json.dumps(advice.to_dict()))
    text = _advise_cli(["--storage", url, "--study", "adv"], tmp_path)
    assert text.returncode == 0 and text.stdout.startswith("BPipe PAYS OFF for study 'adv'")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before  # advise never writes


def test_a_measured_slowdown_does_not_pay_off(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    _write_store(url, {"bpipe": [90, 92, 89], "1f1b": [110, 108, 111], "1f1b-full": [80], "gpipe": [70]})
    advice = bpipe_payoff(storage=url, study="adv")
    assert advice.verdict == "does not pay off" and advice.interval[1] < 1
    assert advice.measure_next is None or advice.measure_next["configs"]


def test_from_predictions_alone_it_says_so_and_what_to_measure(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    configs = _write_store(url, {})
    advice = bpipe_payoff(storage=url, study="adv")
    assert advice.basis == "predictions" and not advice.best_bpipe.measured and advice.error is None
    assert advice.measure_next is not None
    assert configs["bpipe"] in advice.measure_next["configs"]
    by_model = bpipe_payoff(storage=url, model="tiny-gpt-s256", cluster="cpu-local")
    assert by_model.verdict == advice.verdict and by_model.predicted_speedup == advice.predicted_speedup


def test_bad_input_is_one_line_and_the_file_unchanged(tmp_path: Path) -> None:
    import sqlite3

    url = f"sqlite:///{tmp_path / 'd.db'}"
    _write_store(url, {})
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE t (x)")
    cases = [
        (["--storage", url, "--study", "nope"], "--study", "no study named 'nope'"),
        (["--storage", url, "--model", "tiny-gpt-s256"], "--cluster", "--model needs --cluster"),
        (["--storage", url], "--study", "give one of"),
        (["--storage", url, "--model", "m", "--cluster", "c"], "--model", "no study of model 'm'"),
        (["--storage", f"sqlite:///{foreign}", "--study", "adv"], "--storage", "holds no autotune data"),
    ]
    digest = hashlib.sha256(foreign.read_bytes()).hexdigest()
    for args, field, match in cases:
        run = _advise_cli(args, tmp_path)
        assert run.returncode == 2, (args, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"autotune: error: {field}:") and match in lines[0], (
            lines
        )
    assert hashlib.sha256(foreign.read_bytes()).hexdigest() == digest
    with Store(url) as store:  # a study with no BPipe configuration
        fp = store.register_fingerprint({"device": "cpu", "x": 1})
        store.create_study("plain", space=SPACE, model="tiny-gpt-s256", cluster="cpu-local", fingerprint=fp)
        cfg = _config("1f1b")
        store.save_predictions(
            "plain", [(cfg, estimate(TrialConfig.from_dict(cfg), load_cluster("cpu-local")))]
        )
    with pytest.raises(ConfigError, match="has no BPipe configuration") as err:
        bpipe_payoff(storage=url, study="plain")
    assert err.value.field == "--study"
    with Store(url) as store:  # and one with no baseline
        store.create_study(
            "only-bpipe", space=SPACE, model="tiny-gpt-s256", cluster="cpu-local", fingerprint=fp
        )
        cfg = _config("bpipe")
        store.save_predictions(
            "only-bpipe", [(cfg, estimate(TrialConfig.from_dict(cfg), load_cluster("cpu-local")))]
        )
    with pytest.raises(ConfigError, match="has no baseline configuration"):
        bpipe_payoff(storage=url, study="only-bpipe")
    space = tmp_path / "no-bpipe.yaml"
    space.write_text("model: tiny-gpt\nglobal_batch_size: 8\nmax_world_size: 4\nknobs: {pp: [4]}\n")
    with pytest.raises(ConfigError, match="has no BPipe configuration") as err:
        bpipe_payoff(storage=url, space=str(space))
    assert err.value.field == "--space"


def test_a_gpu_space_screened_on_this_cpu_is_advised_from_predictions(tmp_path: Path) -> None:
    """`tune --screen-only`: no trial, no Ray; then `best` answers flagged predicted and `advise`
    answers from predictions alone, said as such."""
    import time

    url = f"sqlite:///{tmp_path / 'plan.db'}"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    cli = [sys.executable, "-m", "autotune.cli"]
    run = subprocess.run([*cli, "tune", "llama-65b-h100", "--screen-only", "--storage", url], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert (
        time.monotonic() - start < 90
    )  # screening 1,440 configurations: seconds, plus the cold schedule cache
    assert "Ray" not in run.stdout and "screened only: study 'llama-65b-h100' holds" in run.stdout
    assert "BPipe verdict:" in run.stdout.splitlines()[-1]
    best = subprocess.run([*cli, "best", "--storage", url, "--study", "llama-65b-h100", "--json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    answer = json.loads(best.stdout)
    assert answer["measured"] is False and answer["trial_id"] is None
    advice = _advise_cli(["--storage", url, "--study", "llama-65b-h100", "--json"], tmp_path)
    data = json.loads(advice.stdout)
    assert data["basis"] == "predictions" and "predictions" in data["target"]
    assert data["best_bpipe"]["measured"] is False and data["verdict"] in (
        "pays off",
        "does not pay off",
        "uncertain",
    )
    assert data["paper"]["predicted_speedup"] > 0 and data["measure_next"]["configs"]
    with Store(url, read_only=True) as store:
        assert store.trials() == [] and len(store.predictions("llama-65b-h100")) > 0


def test_bpipe_is_judged_against_the_best_of_every_baseline_the_new_ones_included(tmp_path: Path) -> None:
    """A space holding 1F1B, GPipe, interleaved 1F1B, ZB-H1 and BPipe: the advice's baseline is
    the fastest predicted of all the non-BPipe schedules, here one of the new ones."""
    from autotune.config import BASELINES

    space = tmp_path / "every-baseline.yaml"
    space.write_text(
        "name: every-baseline\nmodel: gpt3-175b\ncluster: a100-80g-8x8\nglobal_batch_size: 64\n"
        "knobs:\n  tp: [8]\n  pp: [8]\n  micro_batch_size: [1, 2]\n"
        "  schedule: [1f1b, gpipe, interleaved, zb-h1, bpipe]\n  recompute: [none, full]\n"
        "  virtual_stages: [1, 2, 4]\n"
    )
    advice = bpipe_payoff(storage=f"sqlite:///{tmp_path / 'none.db'}", space=str(space))
    assert {"interleaved", "zb-h1"} <= set(BASELINES)
    base = advice.best_baseline
    assert base.config["schedule"] in ("interleaved", "zb-h1"), base.config
    assert advice.best_bpipe.config["schedule"] == "bpipe"
    # the fastest predicted non-BPipe configuration that fits, whatever its schedule
    from autotune.estimate.estimator import estimate_many
    from autotune.tuner.space import load_space

    valid, _ = load_space(str(space)).configs()
    fits = [r for r in estimate_many(valid, load_cluster("a100-80g-8x8")) if r["fits"]]
    fastest = max((r for r in fits if r["config"]["schedule"] != "bpipe"), key=lambda r: r["tokens_per_s"])
    assert base.config == fastest["config"]
