"""A store written by an earlier version still answers, and a rerun campaign still skips what it measured.

`data/store-d17e3c4.db` was written by commit d17e3c4 (before `stage_layers` and the other knobs
of issue 14 existed): `autotune tune data/compat-cpu.yaml` ran all four configurations of that
space for real on this project's CPU machine. Its configurations' JSON has no `stage_layers`.
The hardware fingerprint is rewritten to this machine's first (a measurement is only reused on
the hardware it was made on; the configurations' identities are what is under test).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from autotune.config import TrialConfig
from storage import Store, config_hash
from storage.records import canonical_json, fingerprint_hash
from trial_runners.fingerprint import hardware_fingerprint

DATA = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parents[2]
STUDY = "compat-cpu"


def _old_store(tmp_path: Path) -> str:
    db = tmp_path / "old.db"
    shutil.copy(DATA / "store-d17e3c4.db", db)
    info = hardware_fingerprint("cpu")
    new = fingerprint_hash(info)
    with sqlite3.connect(db) as con:  # foreign keys are off in a plain connection
        (old,) = con.execute("SELECT hash FROM autotune_fingerprints").fetchone()
        if old != new:
            con.execute(
                "UPDATE autotune_fingerprints SET hash = ?, info = ? WHERE hash = ?",
                (new, canonical_json(info), old),
            )
            for table in ("autotune_studies", "autotune_trials", "autotune_profiles"):
                con.execute(f"UPDATE {table} SET fingerprint_hash = ? WHERE fingerprint_hash = ?", (new, old))
    return f"sqlite:///{db}"


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autotune.cli", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip


def test_old_configurations_keep_their_identity(tmp_path: Path) -> None:
    with Store(_old_store(tmp_path)) as store:
        trials = store.trials(study=STUDY)
        assert len(trials) == 4 and all(t.status == "ok" for t in trials)
        for t in trials:
            assert "stage_layers" not in t.config
            again = TrialConfig.from_dict(t.config).to_dict()  # as this version writes it
            assert again["stage_layers"] == [] and config_hash(again) == t.config_hash


def test_old_store_answers_best_and_a_rerun_skips_its_measurements(tmp_path: Path) -> None:
    url = _old_store(tmp_path)
    best = _cli("best", "--storage", url, "--study", STUDY, "--json")
    assert best.returncode == 0, best.stderr
    answer = json.loads(best.stdout)
    with Store(url) as store:
        measured = {t.config_hash: t for t in store.trials(study=STUDY)}
    top = max(measured.values(), key=lambda t: t.tokens_per_s or 0.0)
    assert config_hash(answer["config"]) == top.config_hash
    rerun = _cli("tune", str(DATA / "compat-cpu.yaml"), "--storage", url, "--trials", "4")
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert " started: " not in rerun.stdout, rerun.stdout  # no trial run again
    with Store(url) as store:
        assert {t.config_hash for t in store.trials(study=STUDY)} == set(measured)
        assert len(store.trials(study=STUDY)) == 4
    # A new study of the same space on the same store: every configuration is answered from it.
    other = _cli("tune", str(DATA / "compat-cpu.yaml"), "--storage", url, "--study", "again", "--trials", "4")
    assert other.returncode == 0, other.stdout[-2000:] + other.stderr[-2000:]
    assert " started: " not in other.stdout and "every fitting configuration is measured" in other.stdout
    assert "-> 4,616 tokens_per_s" in other.stdout  # the old measurement, as the best
