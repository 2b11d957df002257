"""No output of any command shows a password given in a database URL.

Every command that takes `--storage` (tune, best, db upgrade) is run for real with URLs that
carry a password: malformed ones (a bad port, an unclosed IPv6 bracket), a `?password=` query,
an unreachable server, and the real PostgreSQL test server (trust authentication, so the
password is accepted and ignored) where the command gets as far as the database.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[2]
SECRET = "secretpw"
BAD_URLS = [
    f"postgresql://u:{SECRET}@127.0.0.1:notaport/db",
    f"postgresql://u:{SECRET}@[::1/db",
    f"postgresql://u@127.0.0.1:1/db?password={SECRET}",
    f"postgresql://u:{SECRET}@127.0.0.1:1/db",  # nothing listens on port 1
    f"mysql://u:{SECRET}@db-host/autotune",
]
COMMANDS = [
    ["tune", "demo-cpu"],
    ["tune", "demo-cpu", "--json"],
    ["best", "--study", "demo-cpu"],
    ["best", "--model", "tiny-gpt", "--cluster", "cpu-local", "--json"],
    ["db", "upgrade"],
]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "autotune.cli", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("url", BAD_URLS, ids=["bad-port", "bad-ipv6", "query", "unreachable", "mysql"])
def test_no_command_shows_the_password_of_a_bad_url(url: str, tmp_path: Path) -> None:
    for args in COMMANDS:
        run = _cli([*args, "--storage", url], tmp_path)
        assert run.returncode == 2, (args, run.stderr)
        assert SECRET not in run.stdout + run.stderr, (args, run.stderr)
        assert run.stderr.count("\n") == 1 and "--storage" in run.stderr, (args, run.stderr)
        assert "u:***@" in run.stderr or "password=***" in run.stderr or "u@" in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_no_command_shows_the_password_of_a_real_server(postgres_db_url: str, tmp_path: Path) -> None:
    url = make_url(postgres_db_url).set(password=SECRET).render_as_string(hide_password=False)
    assert SECRET in url
    upgrade = _cli(["db", "upgrade", "--storage", url], tmp_path)
    assert upgrade.returncode == 0, upgrade.stderr
    assert SECRET not in upgrade.stdout + upgrade.stderr and ":***@" in upgrade.stdout
    for args in (["best", "--study", "no-such-study"], ["best", "--study", "no-such-study", "--json"]):
        run = _cli([*args, "--storage", url], tmp_path)
        assert run.returncode == 2 and "no study named 'no-such-study'" in run.stderr, run.stderr
        assert SECRET not in run.stdout + run.stderr and ":***@" in run.stderr
