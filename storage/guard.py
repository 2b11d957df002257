"""Checks made before the store writes to a database, so that opening one never harms it.

Each check returns the problem as one line (the rule of a `StoreError`), or None when the store
may go on. `sqlite_file_problem` looks at an SQLite file through its own read-only connection
(`mode=ro`), before anything is written and before any PRAGMA that changes the file runs:
is it writable, is it an SQLite database, does `PRAGMA quick_check` pass, and is it empty or
autotune's. `foreign_tables_problem` is the last rule alone, for PostgreSQL too.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from storage.models import VERSION_TABLE

# What SQLite, PostgreSQL and the OS say when a database cannot take a write (or a read): a full
# disk, a read-only database, an I/O error, a damaged file. `storage_failure` matches them.
STORAGE_FAILURES = (
    "database or disk is full",
    "disk i/o error",
    "attempt to write a readonly database",
    "database disk image is malformed",
    "file is not a database",
    "no space left on device",
    "read-only file system",
    "unable to open database file",
)


def is_storage_failure(reason: str) -> bool:
    """Whether a database error's reason is one of `STORAGE_FAILURES` (not a bug, not contention)."""
    lowered = reason.lower()
    return any(failure in lowered for failure in STORAGE_FAILURES)


def writable(path: Path) -> bool:
    """`os.access` write permission, and, for root (whom permissions do not stop), a write bit.

    A read-only mount fails `os.access` for root too. A file or folder with no write bit for
    anyone is read-only for everyone, so `chmod a-w` protects a database from root's campaigns.
    """
    if not os.access(path, os.W_OK):
        return False
    return os.geteuid() != 0 or bool(path.stat().st_mode & 0o222)


def sqlite_file_problem(path: Path, *, timeout: float) -> str | None:
    """Why the store must not write to the SQLite database at `path`; None if it may.

    A missing file is fine (the store creates it) if its folder is writable. Nothing is written:
    the file is opened read-only, with `timeout` seconds to wait for a writer's lock.
    """
    shown = repr(str(path))
    if not path.exists():
        if not writable(path.parent):
            return f"folder {str(path.parent)!r} of SQLite database {shown} is read-only; cannot create it"
        return None
    if not writable(path):
        return f"SQLite database {shown} is read-only (its permissions or its mount); cannot write to it"
    if not writable(path.parent):
        return (
            f"folder {str(path.parent)!r} of SQLite database {shown} is read-only; "
            "SQLite writes its journal beside the database"
        )
    try:
        damage, tables = _inspect(path, timeout=timeout)
    except sqlite3.DatabaseError as e:
        reason = str(e).strip() or type(e).__name__
        if "not a database" in reason:
            return f"{shown} is not an SQLite database; point --storage at an SQLite file or a new path"
        if "malformed" in reason:
            return _damaged(shown, reason)
        return f"cannot open SQLite database {shown} read-only to check it: {reason}"
    if damage is not None:
        return _damaged(shown, damage)
    problem = foreign_tables_problem(tables)
    return None if problem is None else f"SQLite database {shown} {problem}"


def foreign_tables_problem(tables: Iterable[str]) -> str | None:
    """None for a database without tables or with autotune's version table; else the refusal.

    Another application's tables (Optuna's alone included: autotune never creates them first)
    mean `--storage` names someone else's database, which the store does not write into.
    """
    names = sorted(set(tables))
    if not names or VERSION_TABLE in names:
        return None
    return (
        f"holds tables of another application (e.g. {names[0]!r}); "
        "point --storage at an empty file or an autotune database"
    )


def _inspect(path: Path, *, timeout: float) -> tuple[str | None, list[str]]:
    """`(quick_check's first complaint or None, table names)`, read through a `mode=ro` connection."""
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=timeout)
    try:
        rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check(5)")]
        query = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        tables = [str(r[0]) for r in conn.execute(query)]
    finally:
        conn.close()
    if rows == ["ok"]:
        return None, tables
    lines = [line.strip() for row in rows for line in row.splitlines()]
    complaints = [line for line in lines if line and not line.startswith("***")]
    return (complaints or ["quick_check failed"])[0], tables


def _damaged(shown: str, reason: str) -> str:
    return (
        f"SQLite database {shown} is damaged (PRAGMA quick_check: {reason}); nothing was written: "
        "restore it from a backup, or rescue its data with the sqlite3 shell's .recover"
    )
