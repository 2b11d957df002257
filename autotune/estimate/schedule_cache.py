"""An on-disk cache of compiled schedules, so screening a space again skips generating them.

Generating and compiling the programs of a large space (hundreds of distinct (schedule, p, m,
cap), m up to thousands) takes seconds of Python; replaying them takes milliseconds. Each
compiled schedule is kept as one `.npz` file of integer arrays (numpy's format, read with
`allow_pickle=False`: nothing on disk is ever unpickled) under

    $AUTOTUNE_CACHE_DIR, else $XDG_CACHE_HOME/autotune, else ~/.cache/autotune
        /schedules-<hash of the code that makes them>/<name>-p<p>-m<m>-cap<cap>.npz

so a change to the generators or the compiler starts a fresh folder (and the folders of other
versions are removed). `AUTOTUNE_CACHE_DIR=off`
turns the cache off. A file that cannot be read or does not hold what is expected is ignored
(and rewritten); a folder that cannot be written leaves the cache read-only; neither is an error.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

_PACKAGE = Path(__file__).resolve().parent.parent
# The modules whose code decides a compiled schedule's arrays.
_SOURCES = (
    "schedules/ir.py",
    "schedules/generators.py",
    "schedules/registry.py",
    "schedules/memory.py",
    "estimate/simulate.py",
    "estimate/fastpath.py",
    "estimate/schedule_cache.py",
)


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update(name.encode())
        digest.update((_PACKAGE / name).read_bytes())
    return digest.hexdigest()[:16]


def folder() -> Path | None:
    """Where compiled schedules are kept, or None when the cache is off."""
    root = os.environ.get("AUTOTUNE_CACHE_DIR")
    if root is not None and root.strip().lower() in ("", "off", "0", "none"):
        return None
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(base) / "autotune")
    return Path(root) / f"schedules-{code_hash()}"


def _path(name: str, p: int, m: int, cap: int | None) -> Path | None:
    where = folder()
    if where is None:
        return None
    return where / f"{name}-p{p}-m{m}-cap{cap if cap is not None else 'default'}.npz"


def load(name: str, p: int, m: int, cap: int | None, fields: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The arrays stored for this schedule, or None (no cache, no file, or a file not to trust)."""
    path = _path(name, p, m, cap)
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if set(data.files) != set(fields):
                return None
            out = {key: data[key] for key in fields}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None
    if any(a.dtype != np.int64 for a in out.values()):
        return None
    return out


def _drop_stale(current: Path) -> None:
    """Folders of other code versions are never read again: remove them (best effort)."""
    for other in current.parent.glob("schedules-*"):
        if other != current and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)


def store(name: str, p: int, m: int, cap: int | None, arrays: dict[str, np.ndarray]) -> None:
    """Write the arrays atomically (a temporary file in the folder, then a rename); silently
    nothing where the folder cannot be written."""
    path = _path(name, p, m, cap)
    if path is None:
        return
    with contextlib.suppress(OSError):
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            _drop_stale(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
