"""`best_config` / `autotune best` on a real SQLite store: measured beats predicted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from autotune import ConfigError, TrialConfig, best_config, load_model
from storage import Store

ROOT = Path(__file__).resolve().parents[2]


def _cfg(**kw: object) -> dict:
    return TrialConfig(model=load_model("tiny-gpt"), **kw).to_dict()  # type: ignore[arg-type]


def _result(tokens: float, status: str = "ok") -> dict:
    ok = status == "ok"
    return {
        "status": status, "error": None if ok else "out of memory", "step_time_s": 1 / tokens if ok else None,
        "tokens_per_s": tokens if ok else None, "achieved_tflops": None, "mfu": None, "losses": [],
        "stages": [],
    }  # fmt: skip


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'answers.db'}"
    with Store(url) as store:
        fp = store.register_fingerprint({"device": "cpu", "cpu": "test"})
        store.create_study(
            "s", space={"objective": "tokens_per_s"}, model="tiny-gpt", cluster="cpu-local", fingerprint=fp
        )
        configs = [_cfg(pp=2), _cfg(pp=4, num_microbatches=8), _cfg(pp=1)]
        predicted = [{"tokens_per_s": t} for t in (900.0, 800.0, 700.0)]
        store.save_predictions("s", list(zip(configs, predicted, strict=True)))
        for config, (tokens, status) in zip(configs[:2], [(500.0, "oom"), (650.0, "ok")], strict=True):
            tid = store.start_trial("s", config=config, fingerprint=fp)
            store.finish_trial(tid, _result(tokens, status))
        store.create_study("empty", space={}, model="tiny-gpt", cluster="a100-80g-8x1", fingerprint=fp)
        store.save_predictions("empty", [(configs[0], {"tokens_per_s": 1e6})])
    return url


def test_the_best_measured_configuration_wins_over_predictions(url: str) -> None:
    best = best_config(storage=url, study="s")
    assert best.measured and best.tokens_per_s == 650.0 and best.config["pp"] == 4 and best.trial_id
    assert best_config(storage=url, model="tiny-gpt", cluster="cpu-local") == best


def test_nothing_measured_falls_back_to_the_best_prediction(url: str) -> None:
    best = best_config(storage=url, model="tiny-gpt", cluster="a100-80g-8x1")
    assert not best.measured and best.trial_id is None and best.tokens_per_s == 1e6


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"study": "nope"}, "--study"),
        ({}, "--study"),
        ({"model": "tiny-gpt", "cluster": "h100-80g-8x2"}, "--model"),
    ],
)
def test_unknown_lookups_name_the_field(url: str, kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        best_config(storage=url, **kwargs)
    assert err.value.field == field


def test_best_cli_json_matches_the_contract(url: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "autotune.cli", "best", "--storage", url, "--study", "s", "--json"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    answer = json.loads(proc.stdout)
    assert {"config", "tokens_per_s", "measured", "trial_id"} <= set(answer)
    assert answer["tokens_per_s"] == 650.0 and answer["measured"] is True
    nowhere = f"sqlite:///{tmp_path}/none.db"
    missing = subprocess.run(
        [sys.executable, "-m", "autotune.cli", "best", "--storage", nowhere, "--study", "s"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert missing.returncode == 2 and "--storage" in missing.stderr and not (tmp_path / "none.db").exists()
