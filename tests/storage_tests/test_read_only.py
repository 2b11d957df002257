"""`Store(url, read_only=True)`: reads every kind of record, and never changes a byte of the file
(no WAL switch, no write transaction); writes are refused; non-autotune databases are refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from storage import Store, StoreError, migrate
from storage.engine import open_engine
from tests.storage_tests import cases


def _journal_mode(path: Path) -> str:
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        conn.close()


def _foreign_sqlite(path: Path) -> str:
    """Another application's SQLite file, made by the sqlite3 module, in rollback-journal mode."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE foo (id INTEGER PRIMARY KEY, note TEXT)")
    conn.executemany("INSERT INTO foo (note) VALUES (?)", [(f"note {i}",) for i in range(100)])
    conn.commit()
    conn.close()
    assert _journal_mode(path) == "delete"
    return f"sqlite:///{path}"


def test_a_read_only_store_reads_a_wal_database_and_leaves_its_bytes_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "autotune.db"
    url = cases.autotune_sqlite(path)
    with Store(url) as store:
        want = (store.studies(), store.trials(), store.predictions("s1"))
    digest = cases.sha256(path)
    assert _journal_mode(path) == "wal"
    with Store(url, read_only=True) as store:
        got = (store.studies(), store.trials(), store.predictions("s1"))
        assert store.lease("s1") is None and store.leases() == [] and store.timeline(1) is None
        assert store.measured(got[1][1].config_hash, got[1][1].fingerprint) is not None
    assert got == want and len(got[1]) == 20
    assert cases.sha256(path) == digest and _journal_mode(path) == "wal"


def test_a_read_only_store_reads_a_file_nobody_may_write(tmp_path: Path) -> None:
    path = tmp_path / "autotune.db"
    url = cases.autotune_sqlite(path, trials=3)
    digest = cases.sha256(path)
    path.chmod(0o444)
    with Store(url, read_only=True) as store:
        assert len(store.trials(study="s1")) == 3
    assert cases.sha256(path) == digest


def test_a_read_only_store_refuses_every_write(store_url: str) -> None:
    with Store(store_url) as store:
        fp = cases.study(store)
        tid = store.start_trial("s1", config=cases.config(), fingerprint=fp)
        before = (store.studies(), store.trials(), store.leases())
    with Store(store_url, read_only=True) as store:
        writes = [
            lambda: store.register_fingerprint(cases.A100),
            lambda: store.create_study("s2", space={}, model="m", cluster="c", fingerprint=fp),
            lambda: store.save_predictions("s1", []),
            lambda: store.start_trial("s1", config=cases.config(pp=4), fingerprint=fp),
            lambda: store.finish_trial(tid, cases.result("ok")),
            lambda: store.interrupt_running("s1"),
            lambda: store.save_profile(fp, "m", {}),
            lambda: store.save_timeline(tid, []),
            lambda: store.acquire_lease("s1", holder="h", host="x", pid=1),
            lambda: store.heartbeat("s1", "h"),
            lambda: store.release_lease("s1", "h"),
        ]
        for write in writes:
            with pytest.raises(RuntimeError, match="opened read-only"):
                write()
        assert (store.studies(), store.trials(), store.leases()) == before
        assert store.trial(tid).status == "running"


def test_a_read_only_engine_cannot_write_even_by_hand(store_url: str) -> None:
    migrate.upgrade(store_url)
    engine = open_engine(store_url, read_only=True)
    try:
        with (
            pytest.raises(DBAPIError, match="readonly database|read-only transaction"),
            engine.begin() as conn,
        ):
            conn.execute(text("CREATE TABLE intruder (id INTEGER)"))
    finally:
        engine.dispose()
    assert migrate.current(store_url) == migrate.head()


def test_another_applications_sqlite_file_is_refused_with_its_bytes_and_journal_mode_unchanged(
    tmp_path: Path,
) -> None:
    path = tmp_path / "app.db"
    url = _foreign_sqlite(path)
    digest = cases.sha256(path)
    with pytest.raises(StoreError, match="holds no autotune data") as e:
        Store(url, read_only=True)
    assert e.value.field == "--storage" and "\n" not in str(e.value)
    for opening in (Store, lambda u: Store(u, migrate=False), migrate.upgrade):
        with pytest.raises(StoreError, match=r"holds tables of another application \(e.g. 'foo'\)"):
            opening(url)
    assert migrate.current(url) is None
    assert cases.sha256(path) == digest and _journal_mode(path) == "delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def test_another_applications_postgresql_database_is_refused(postgres_db_url: str) -> None:
    raw = create_engine(postgres_db_url)
    with raw.begin() as conn:
        conn.execute(text("CREATE TABLE foo (id INTEGER PRIMARY KEY)"))
    try:
        with pytest.raises(StoreError, match="holds no autotune data"):
            Store(postgres_db_url, read_only=True)
        for opening in (Store, migrate.upgrade):
            with pytest.raises(StoreError, match=r"holds tables of another application \(e.g. 'foo'\)"):
                opening(postgres_db_url)
        with raw.connect() as conn:
            tables = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
            assert [t for (t,) in tables] == ["foo"]
    finally:
        raw.dispose()


def test_a_missing_file_is_refused_and_not_created(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no database at"):
        Store(f"sqlite:///{tmp_path / 'missing.db'}", read_only=True)
    assert migrate.current(f"sqlite:///{tmp_path / 'missing.db'}") is None
    assert list(tmp_path.iterdir()) == []
