"""The dashboard's fixtures: a database seeded by a real small campaign (real trials through a
real local Ray, BPipe and its baseline at one layout, so there is a pair and a verdict), a second
study screened only, and a running `autotune dashboard` over it.

The campaign runs once per session; every test that browses it works on a copy (`seeded`), so
the read-only checks compare bytes of a file nothing else touches.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.autotune_tests.test_campaign import PAIRED

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "autotune.cli"]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}
STUDY = "dash"
SPACE = PAIRED.replace("name: paired", f"name: {STUDY}")  # pp 4: BPipe and 1F1B, micro-batch 1 or 2
STEPS = 1  # its measured steps (after a warm-up)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def campaign_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database written by `autotune tune` (3 real trials) and `tune --screen-only`."""
    folder = tmp_path_factory.mktemp("dashboard-campaign")
    space = folder / "dash.yaml"
    space.write_text(SPACE)
    db = folder / "campaign.db"
    url = f"sqlite:///{db}"
    for args in ([str(space), "--trials", "3"], ["llama-65b-h100", "--screen-only"]):
        proc = subprocess.run([*CLI, "tune", *args, "--storage", url], cwd=ROOT, env=ENV, text=True,
                              capture_output=True, timeout=600, start_new_session=True)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return db


@pytest.fixture
def seeded(campaign_db: Path, tmp_path: Path) -> Path:
    """This test's own copy of the campaign's database."""
    copy = tmp_path / "seeded.db"
    shutil.copyfile(campaign_db, copy)
    return copy


@contextlib.contextmanager
def serving(db: Path, *extra: str) -> Iterator[str]:
    """`autotune dashboard` over `db` on a free port; its base URL once it answers."""
    port = free_port()
    proc = subprocess.Popen([*CLI, "dashboard", "--storage", f"sqlite:///{db}", "--port", str(port), *extra],
                            cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/api/studies", timeout=30):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read() if proc.stdout else ""
                    pytest.fail(f"the dashboard did not come up (exit {proc.poll()}): {out}")
                time.sleep(0.2)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def dashboard(seeded: Path) -> Iterator[str]:
    with serving(seeded) as base:
        yield base
