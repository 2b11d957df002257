"""Every command that takes --storage leaves a database it must not use exactly as it was.

Another application's SQLite file, a corrupted autotune database, a read-only one (a read-only
mount where this machine allows one, else a file without write permission) and a disk that
fills: `autotune best`, `tune` and `db upgrade` each refuse in one line with exit 2, and the
file's bytes (and its journal mode) are unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = [["best", "--study", "demo-cpu"], ["tune", "demo-cpu"], ["db", "upgrade"]]


def _cli(args: list[str], cwd: Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "autotune.cli", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env=env, **kwargs)  # type: ignore[call-overload, no-any-return]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _refused_by_all(db: Path, match: str, cwd: Path) -> None:
    before = _digest(db)
    for args in COMMANDS:
        run = _cli([*args, "--storage", f"sqlite:///{db}"], cwd)
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("autotune: error: --storage:"), (args, run.stderr)
        assert match in lines[0], (args, lines[0])
        assert "Traceback" not in run.stderr
        assert _digest(db) == before, f"{args} changed the file"


def _autotune_db(path: Path, cwd: Path) -> None:
    run = _cli(["db", "upgrade", "--storage", f"sqlite:///{path}"], cwd)
    assert run.returncode == 0, run.stderr


def test_another_applications_file_is_left_as_it_was(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        con.execute("INSERT INTO invoices VALUES (1, 9.5)")
        con.commit()
    _refused_by_all(db, "", tmp_path)
    with contextlib.closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not switched to WAL
        assert con.execute("SELECT total FROM invoices").fetchall() == [(9.5,)]


def test_a_corrupted_database_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    db = tmp_path / "autotune.db"
    _autotune_db(db, tmp_path)
    with contextlib.closing(sqlite3.connect(db)) as con:  # pages beyond the schema's, then damage one
        con.execute("PRAGMA journal_mode = DELETE")
        con.execute("CREATE TABLE filler (x TEXT)")
        con.executemany("INSERT INTO filler VALUES (?)", [("x" * 500,)] * 200)
        con.commit()
        page = con.execute("PRAGMA page_size").fetchone()[0]
        root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'filler'").fetchone()[0]
    with open(db, "r+b") as f:
        f.seek((root - 1) * page)
        f.write(b"\xff" * 64)  # the b-tree page header of the filler table
    for args in COMMANDS[1:]:  # the writers check integrity before writing
        before = _digest(db)
        run = _cli([*args, "--storage", f"sqlite:///{db}"], tmp_path)
        assert run.returncode == 2 and "damaged" in run.stderr and run.stderr.count("\n") == 1, run.stderr
        assert _digest(db) == before
    best = _cli(["best", "--study", "demo-cpu", "--storage", f"sqlite:///{db}"], tmp_path)
    assert best.returncode == 2 and best.stderr.count("\n") == 1 and "Traceback" not in best.stderr


@contextlib.contextmanager
def _read_only_folder(folder: Path) -> Iterator[str]:
    """The folder made read-only: a read-only bind mount where root may mount (it stops root
    too), else permissions; yields how."""
    mounted = (
        subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode == 0
    )
    if mounted:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
    try:
        if not mounted:
            for path in folder.iterdir():
                path.chmod(0o444)
            folder.chmod(0o555)
        yield "mount" if mounted else "permissions"
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)
        else:
            folder.chmod(0o755)


def test_a_read_only_database_is_refused_by_the_writers_and_read_by_best(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "autotune.db"
    _autotune_db(db, tmp_path)
    with _read_only_folder(folder):
        before = _digest(db)
        for args in COMMANDS[1:]:
            run = _cli([*args, "--storage", f"sqlite:///{db}"], tmp_path)
            assert run.returncode == 2 and "read-only" in run.stderr, run.stderr
            assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
        best = _cli(["best", "--study", "demo-cpu", "--storage", f"sqlite:///{db}"], tmp_path)
        assert best.returncode == 2 and "no study named 'demo-cpu'" in best.stderr, best.stderr
        assert _digest(db) == before


def _small_file_limit(limit: int) -> None:  # in the child, before exec
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_a_disk_that_fills_during_db_upgrade_is_one_line(tmp_path: Path) -> None:
    db = tmp_path / "full.db"
    run = _cli(["db", "upgrade", "--storage", f"sqlite:///{db}"], tmp_path,
               preexec_fn=lambda: _small_file_limit(48 * 1024))  # fmt: skip
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autotune: error: --storage:"), run.stderr
    assert "disk" in lines[0] and "Traceback" not in run.stderr
    _autotune_db(db, tmp_path)  # nothing half-done: a later upgrade works


def test_an_in_memory_database_is_refused_for_a_campaign(tmp_path: Path) -> None:
    for url in ("sqlite://", "sqlite:///:memory:"):
        run = _cli(["tune", "demo-cpu", "--storage", url], tmp_path)
        assert run.returncode == 2 and "in-memory database, which keeps nothing" in run.stderr, run.stderr
    assert os.listdir(tmp_path) == []
