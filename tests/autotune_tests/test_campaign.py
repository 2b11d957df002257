"""Campaigns end to end: real trials through a real local Ray, a real SQLite store.

The campaign runs as `autotune tune` in its own process, so it can be SIGKILLed at any
moment and resumed, as a user's would be.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from storage import Store, TrialRecord

ROOT = Path(__file__).resolve().parents[2]
TUNE = [sys.executable, "-m", "autotune.cli", "tune"]

SPACE = """\
name: {name}
model: tiny-gpt
cluster: cpu-local
global_batch_size: 4
max_world_size: 2
knobs:
  pp: [1, 2]
  micro_batch_size: [1, 2]
  schedule: [1f1b, gpipe]
trial: {{steps: 1, timeout: {timeout}}}
search: {{seed_top: 2, concurrency: 1}}
"""
CONFIGS = 8  # pp 1|2 x micro-batch 1|2 x 1f1b|gpipe, all valid with global batch 4


def _space(tmp_path: Path, name: str, timeout: int = 60) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SPACE.format(name=name, timeout=timeout))
    return str(path)


def _start(space: str, url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*TUNE, space, "--storage", url, *args],
        cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen[str], timeout: float = 400) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        _reap(proc)
    return out


def _reap(proc: subprocess.Popen[str]) -> None:
    """Kill what a SIGKILLed campaign left in its session (Ray's agents outlive their driver)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _trials(url: str, study: str) -> list[TrialRecord]:
    if not Path(url.removeprefix("sqlite:///")).exists():
        return []
    with Store(url, migrate=False) as store:
        return store.trials(study=study) if store.study(study) else []


def _kill_when(proc: subprocess.Popen[str], url: str, study: str, ready: Callable[[list], bool]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(Exception):  # the database may not exist yet
            if ready(_trials(url, study)):
                break
        time.sleep(0.2)
    assert proc.poll() is None, (
        f"campaign ended before the kill point:\n{proc.stdout.read() if proc.stdout else ''}"
    )
    proc.send_signal(signal.SIGKILL)  # the campaign process only, as `kill -9 PID` would
    proc.wait()
    time.sleep(1.0)
    _reap(proc)


def _done(trials: list[TrialRecord]) -> list[TrialRecord]:
    return [t for t in trials if t.finished and t.error != "interrupted"]


def test_killed_campaign_resumes_and_loses_nothing(tmp_path: Path) -> None:
    space, url, study = _space(tmp_path, "killed"), f"sqlite:///{tmp_path / 'kill.db'}", "killed"
    kill_points: list[Callable[[list], bool]] = [
        lambda ts: bool(ts) and any(t.status == "running" for t in ts),  # while the first trial runs
        lambda ts: len(_done(ts)) >= 2,  # right after a trial is written
        lambda ts: len(_done(ts)) >= 4 and any(t.status == "running" for t in ts),
    ]
    kept: dict[int, TrialRecord] = {}
    for point in kill_points:
        _kill_when(_start(space, url), url, study, point)
        now = {t.id: t for t in _trials(url, study)}
        for tid, before in kept.items():
            assert now[tid] == before, f"finished trial {tid} changed after a kill"
        kept.update({t.id: t for t in now.values() if t.finished})
    out = _finish(_start(space, url))
    assert "best:" in out, out
    final = _trials(url, study)
    for tid, before in kept.items():
        assert next(t for t in final if t.id == tid) == before
    done = _done(final)
    hashes = [t.config_hash for t in done]
    assert len(hashes) == len(set(hashes)), "a configuration was measured twice on one machine"
    assert len(done) == CONFIGS and all(t.status == "ok" for t in done)
    interrupted = [t for t in final if t.error == "interrupted"]
    assert interrupted and all(t.status == "failed" for t in interrupted)
    assert not [t for t in final if t.status == "running"]


def test_faults_are_recorded_and_the_campaign_goes_on(tmp_path: Path) -> None:
    space, url, study = (
        _space(tmp_path, "faults", timeout=20),
        f"sqlite:///{tmp_path / 'faults.db'}",
        "faults",
    )
    faults = (
        "crash@1:pp=2,micro_batch_size=1,schedule=gpipe;"
        "hang@0:pp=1,micro_batch_size=2,schedule=gpipe;"
        "oom@0:pp=2,micro_batch_size=2,schedule=1f1b"
    )
    out = _finish(_start(space, url, env={"AUTOTUNE_INJECT_FAULT": faults}))
    assert "best:" in out, out
    trials = _trials(url, study)
    by = {(t.config["pp"], t.config["micro_batch_size"], t.config["schedule"]): t for t in trials}
    assert len(trials) == CONFIGS == len(by), "each configuration runs exactly once"
    crashed, hung, oom = by[(2, 1, "gpipe")], by[(1, 2, "gpipe")], by[(2, 2, "1f1b")]
    assert crashed.status == "failed" and "rank 1 died" in (crashed.error or "")
    assert hung.status == "timeout" and "did not finish within 20 s" in (hung.error or "")
    assert oom.status == "oom" and "out of memory" in (oom.error or "")
    assert sum(t.status == "ok" for t in trials) == CONFIGS - 3
    _assert_never_proposed_again(
        url, study, oom.optuna_number, {"pp": 2, "micro_batch_size": 2, "schedule": "1f1b"}
    )


def _assert_never_proposed_again(url: str, study: str, number: int | None, params: dict) -> None:
    """After the out-of-memory trial, the sampler's proposals of it were answered, never run."""
    import optuna

    loaded = optuna.load_study(study_name=study, storage=url)
    later = [
        t for t in loaded.trials
        if number is not None and t.number > number and all(t.params.get(k) == v for k, v in params.items())
    ]  # fmt: skip
    assert all(t.user_attrs.get("source") != "trial" for t in later)
    assert all(max(t.constraints.values()) > 0 for t in later if t.user_attrs.get("source") == "store")


@pytest.mark.parametrize(
    ("space_text", "field"),
    [
        ("model: [unclosed\n", "YAML"),
        ("model: tiny-gpt\ncluster: cpu-local\nglobal_batch_size: 4\nbogus: 1\n", "bogus"),
        ("model: tiny-gpt\ncluster: cpu-local\nglobal_batch_size: 4\nknobs: {pp: [3]}\n", "knobs"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, space_text: str, field: str) -> None:
    db = tmp_path / "existing.db"
    url = f"sqlite:///{db}"
    subprocess.run(
        [sys.executable, "-m", "autotune.cli", "db", "upgrade", "--storage", url], check=True, cwd=ROOT
    )
    before = _dump(db)
    path = tmp_path / "bad.yaml"
    path.write_text(space_text)
    proc = subprocess.run([*TUNE, str(path), "--storage", url], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in proc.stderr
    assert _dump(db) == before


def test_unreachable_database_exits_2(tmp_path: Path) -> None:
    space = _space(tmp_path, "nowhere")
    for url in (
        "postgresql://autotune@127.0.0.1:1/none",
        f"sqlite:///{tmp_path}/missing-dir/x.db",
        "nosuch://x",
    ):
        proc = subprocess.run([*TUNE, space, "--storage", url], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2, (url, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "--storage" in proc.stderr
    assert not (tmp_path / "missing-dir").exists()


def _dump(db: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(db)) as con:
        return list(con.iterdump())


def test_campaign_on_postgresql(tmp_path: Path, postgres_db_url: str) -> None:
    """The same campaign with Optuna's tables and ours on a real PostgreSQL server."""
    from sqlalchemy.engine import make_url

    space = _space(tmp_path, "on-pg")
    # trust authentication accepts any password: the campaign's output must never show it
    with_secret = make_url(postgres_db_url).set(password="secretpw").render_as_string(hide_password=False)
    out = _finish(_start(space, with_secret, "--trials", "2"))
    assert "stopped: 2 trials done" in out and "best:" in out, out
    assert "secretpw" not in out
    with Store(postgres_db_url, migrate=False) as store:
        done = _done(store.trials(study="on-pg"))
    assert len(done) == 2 and all(t.status == "ok" for t in done)
    best = subprocess.run(
        [*TUNE[:-1], "best", "--storage", with_secret, "--study", "on-pg", "--json"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert '"measured": true' in best.stdout and "secretpw" not in best.stdout + best.stderr


def test_measured_configurations_are_answered_from_the_store_in_another_study(tmp_path: Path) -> None:
    space, url = _space(tmp_path, "first"), f"sqlite:///{tmp_path / 'shared.db'}"
    _finish(_start(space, url, "--trials", "3"))
    out = _finish(_start(space, url, "--study", "second", "--trials", "3"))
    assert "best:" in out, out
    with Store(url, migrate=False) as store:
        first, second = _done(store.trials(study="first")), _done(store.trials(study="second"))
    assert len(first) == 3 and len(second) == 3
    assert not {t.config_hash for t in first} & {t.config_hash for t in second}


PAIRED = """\
name: paired
model: tiny-gpt
cluster: cpu-local
global_batch_size: 8
max_world_size: 4
knobs:
  pp: [4]
  micro_batch_size: [1, 2]
  schedule: [1f1b, bpipe]
trial: {steps: 1, timeout: 120}
search: {seed_top: 1, concurrency: 1}
"""


def test_a_campaign_measures_each_trials_counterpart_and_ends_with_the_verdict(tmp_path: Path) -> None:
    """Where the space holds BPipe and a baseline, the trial after any measured configuration is
    its best-predicted counterpart at the same layout, so the verdict rests on a measured pair."""
    path = tmp_path / "paired.yaml"
    path.write_text(PAIRED)
    url = f"sqlite:///{tmp_path / 'paired.db'}"
    out = _finish(_start(str(path), url, "--trials", "2"))
    assert "queued tp1 pp4 dp1" in out and "counterpart at its layout" in out, out
    first, second = sorted(_done(_trials(url, "paired")), key=lambda t: t.id)
    assert (first.config["schedule"] == "bpipe") != (second.config["schedule"] == "bpipe")
    assert [first.config[k] for k in ("tp", "pp", "dp")] == [second.config[k] for k in ("tp", "pp", "dp")]
    verdict = [line for line in out.splitlines() if line.startswith("BPipe verdict:")]
    assert verdict and "autotune advise --study paired" in verdict[0], out


AUTO_DP = """\
name: auto-dp
model: tiny-gpt
cluster: cpu-local
global_batch_size: 4
max_world_size: 2
knobs:
  tp: [1, 2]
  dp: auto
  sequence_parallel: [false, true]
trial: {steps: 1, timeout: 120}
search: {seed_top: 1, concurrency: 1}
"""


def test_a_campaign_searches_dp_auto_and_a_later_knob(tmp_path: Path) -> None:
    """`dp: auto` (the study searches the degrees it resolves to) and `sequence_parallel`, a knob
    added later and a no-op at tp 1: the campaign runs each of the three distinct configurations
    (tp 1 dp 2; tp 2 dp 1 with and without sequence parallelism) for real, once each."""
    path = tmp_path / "auto.yaml"
    path.write_text(AUTO_DP)
    url = f"sqlite:///{tmp_path / 'auto.db'}"
    out = _finish(_start(str(path), url, "--trials", "3"))
    assert "best:" in out, out
    done = _done(_trials(url, "auto-dp"))
    assert all(t.status == "ok" for t in done), [(t.config, t.error) for t in done]
    assert sorted((t.config["tp"], t.config["dp"], t.config["sequence_parallel"]) for t in done) == [
        (1, 2, False), (2, 1, False), (2, 1, True),
    ]  # fmt: skip
