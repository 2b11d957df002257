"""Opening to write never harms a database: a damaged, read-only or foreign one is refused with
its bytes unchanged, and a disk that fills mid-write is one `StoreError` line that leaves the
database consistent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from storage import Store, StoreError, migrate
from tests.storage_tests import cases

ROOT = Path(__file__).resolve().parents[2]
PAGE = 4096


def _refused_to_write(url: str, *, match: str, existing: bool = True) -> None:
    openings: list[Callable[[str], object]] = [Store, migrate.upgrade]
    if existing:
        openings.append(lambda u: Store(u, migrate=False))
    for opening in openings:
        with pytest.raises(StoreError, match=match) as e:
            opening(url)
        assert e.value.field == "--storage" and "\n" not in str(e.value)


def _untouched(path: Path, digest: str) -> None:
    """The file's bytes are `digest`'s; a read-only look at a WAL database may leave an empty
    `-wal` and a `-shm` index beside it, as any SQLite reader does, but nothing in them."""
    assert cases.sha256(path) == digest
    wal = path.with_name(path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    assert {p.name for p in path.parent.iterdir()} <= {path.name, wal.name, path.name + "-shm"}


def test_a_damaged_database_is_refused_with_its_bytes_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "autotune.db"
    url = cases.autotune_sqlite(path)
    with path.open("r+b") as f:  # the middle of b-tree page 3: its cell pointers and cells
        f.seek(2 * PAGE + 8)
        f.write(b"\xff" * (PAGE - 16))
    assert cases.quick_check(path) != "ok"
    digest = cases.sha256(path)
    _refused_to_write(url, match=r"is damaged \(PRAGMA quick_check: .+\); nothing was written")
    _untouched(path, digest)


def test_a_file_nobody_may_write_is_refused_also_for_root(tmp_path: Path) -> None:
    path = tmp_path / "autotune.db"
    url = cases.autotune_sqlite(path, trials=2)
    digest = cases.sha256(path)
    path.chmod(0o444)
    _refused_to_write(url, match="is read-only")
    _untouched(path, digest)


def test_a_folder_nobody_may_write_is_refused_also_for_root(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    url = cases.autotune_sqlite(folder / "autotune.db", trials=2)
    digest = cases.sha256(folder / "autotune.db")
    folder.chmod(0o555)
    try:
        _refused_to_write(url, match=r"folder .* is read-only; SQLite writes its journal beside")
        new = f"sqlite:///{folder / 'new.db'}"
        _refused_to_write(new, match=r"folder .* is read-only; cannot create", existing=False)
        assert sorted(p.name for p in folder.iterdir()) == ["autotune.db"]
        with Store(url, read_only=True) as store:  # reading needs no write
            assert len(store.trials()) == 2
    finally:
        folder.chmod(0o755)
    _untouched(folder / "autotune.db", digest)


def test_optunas_tables_alone_are_another_applications(store_url: str, tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="theirs", storage=store_url)
    path = Path(store_url.removeprefix("sqlite:///")) if store_url.startswith("sqlite") else None
    digest = cases.sha256(path) if path else None
    _refused_to_write(store_url, match=r"holds tables of another application \(e.g. 'alembic_version'\)")
    assert migrate.current(store_url) is None
    if path is not None:
        assert cases.sha256(path) == digest
    assert [s.study_name for s in optuna.get_all_study_summaries(store_url)] == ["theirs"]


# Writes in a child process whose files may not grow past a limit (RLIMIT_FSIZE, SIGXFSZ
# ignored, so a write past it fails with EFBIG as on a full disk); prints what happened as JSON.
_FILL = """
import json, resource, signal, sys
from storage import Store, StoreError, migrate
from tests.storage_tests import cases

url, limit, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
store = Store(url) if what == "trials" else None
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
done = 0
try:
    if store is None:
        migrate.upgrade(url)
    else:
        fp = cases.study(store, "s2")
        for i in range(1000):
            tid = store.start_trial("s2", config=cases.config(micro_batches=i), fingerprint=fp,
                                    predicted={"pad": "x" * 20000})
            store.finish_trial(tid, cases.result("ok"))
            done += 1
except StoreError as e:
    print(json.dumps({"error": str(e), "field": e.field, "done": done}))
else:
    print(json.dumps({"error": None, "done": done}))
"""


def _fill(url: str, limit: int, what: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", _FILL, url, str(limit), what],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout))


def _full_disk(error: str | None, doing: str = "cannot write to") -> None:
    assert error is not None and "\n" not in error
    assert error.startswith(f"--storage: {doing} sqlite:///")
    assert error.endswith(("database or disk is full", "disk I/O error"))


def test_a_disk_that_fills_mid_campaign_is_one_line_and_the_database_stays_consistent(
    tmp_path: Path,
) -> None:
    path = tmp_path / "autotune.db"
    url = cases.autotune_sqlite(path, trials=3)
    outcome = _fill(url, path.stat().st_size + 256 * 1024, "trials")
    _full_disk(outcome["error"])
    assert outcome["field"] == "--storage" and outcome["done"] > 0
    assert cases.quick_check(path) == "ok"
    with Store(url) as store:  # opens for writing again: the check passes, nothing is half-written
        trials = store.trials(study="s2")
        finished = [t for t in trials if t.status == "ok"]
        assert len(finished) == outcome["done"] and len(trials) - len(finished) <= 1
        assert all(len(t.stages) == 2 for t in finished)
        assert len(store.trials(study="s1")) == 3
        fp = store.study("s2").fingerprint  # type: ignore[union-attr]
        store.finish_trial(store.start_trial("s2", config=cases.config(pp=4), fingerprint=fp), cases.result())
    assert cases.quick_check(path) == "ok"


@pytest.mark.parametrize(
    ("limit", "doing"),
    [
        (48 * 1024, "cannot write to"),  # room for the WAL index (-shm, 32 KiB), not for the schema
        (16 * 1024, "cannot connect to"),  # no room for the WAL index: connecting fails
    ],
)
def test_an_upgrade_onto_a_disk_too_small_for_the_schema_is_one_line_and_leaves_no_schema(
    tmp_path: Path, limit: int, doing: str
) -> None:
    path = tmp_path / "autotune.db"
    url = f"sqlite:///{path}"
    outcome = _fill(url, limit, "upgrade")
    _full_disk(outcome["error"], doing)
    assert cases.quick_check(path) == "ok" and migrate.current(url) is None
    migrate.upgrade(url)
    assert migrate.current(url) == migrate.head() and cases.quick_check(path) == "ok"


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB file system (tmpfs), for root where mounting is allowed; skipped elsewhere."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a file system needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_real_full_disk_then_a_read_only_mount(tmpfs: Path) -> None:
    path = tmpfs / "autotune.db"
    url = cases.autotune_sqlite(path, trials=3)
    with Store(url) as store, pytest.raises(StoreError, match="database or disk is full$") as e:
        fp = cases.study(store, "s2")
        for i in range(1000):
            store.start_trial(
                "s2", config=cases.config(micro_batches=i), fingerprint=fp, predicted={"pad": "x" * 20000}
            )
    assert e.value.field == "--storage" and "\n" not in str(e.value)
    with Store(url) as store:
        running = store.trials(study="s2")
        assert 0 < len(running) < 1000 and all(t.status == "running" for t in running)
    assert cases.quick_check(path) == "ok"
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    digest = cases.sha256(path)
    _refused_to_write(url, match="is read-only")
    with Store(url, read_only=True) as store:  # a WAL database, cleanly closed: no -shm to be had
        assert len(store.trials(study="s1")) == 3 and len(store.trials(study="s2")) == len(running)
    assert cases.sha256(path) == digest
