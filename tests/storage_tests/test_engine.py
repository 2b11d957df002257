"""Storage URLs: each bad one is one StoreError line and writes nothing; SQLite is set up for
concurrent writers."""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text

from storage import Store, StoreError, migrate
from storage.engine import READ_ONLY, is_persistent, open_engine, parse_url, safe_url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _refused(url: str, *, match: str) -> StoreError:
    for attempt in (Store, migrate.upgrade, migrate.current):
        with pytest.raises(StoreError, match=match) as e:
            attempt(url)
        assert e.value.field == "--storage" and "\n" not in str(e.value)
    return e.value


@pytest.mark.parametrize("url", ["not a url", "://nothing", "sqlite//missing-colon.db", ""])
def test_an_unparseable_url_is_refused(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    error = _refused(url, match="cannot parse")
    assert "sqlite:///PATH" in error.rule
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "url", ["mysql://u@localhost/db", "postgresql+psycopg2://u@localhost/db", "oracle://x"]
)
def test_an_unsupported_backend_is_refused_with_the_supported_ones(url: str) -> None:
    error = _refused(url, match="unsupported backend")
    assert "sqlite:///PATH" in error.rule and "postgresql://" in error.rule


def test_a_sqlite_file_in_a_missing_directory_is_refused_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "autotune.db"
    error = _refused(f"sqlite:///{path}", match="does not exist")
    assert str(path.parent) in error.rule
    assert list(tmp_path.iterdir()) == []


def test_a_sqlite_path_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    _refused(f"sqlite:///{tmp_path}", match="is a directory")


@pytest.mark.parametrize("content", [b"not a database\n" * 200, bytes(range(256)) * 64])
def test_a_file_that_is_not_a_database_is_refused_and_kept(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(content)
    error = _refused(f"sqlite:///{path}", match="not an? (SQLite )?database")
    assert path.read_bytes() == content and sorted(tmp_path.iterdir()) == [path]
    with pytest.raises(StoreError, match="is not an SQLite database"):
        Store(f"sqlite:///{path}")
    assert "\n" not in str(error)


def test_an_unreachable_server_is_refused_without_showing_the_password() -> None:
    url = f"postgresql://autotune:s3cret@127.0.0.1:{_free_port()}/autotune"
    error = _refused(url, match="cannot connect to postgresql")
    assert "s3cret" not in str(error) and "autotune:***@127.0.0.1" in error.rule


def test_a_missing_database_on_a_live_server_is_refused(postgres_url: str) -> None:
    url = str(parse_url(postgres_url).set(database="no_such_database"))
    _refused(url, match='cannot connect to .*"no_such_database" does not exist')


def test_postgresql_urls_use_psycopg_3() -> None:
    assert parse_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert parse_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    assert safe_url("postgresql://u:pw@h:5/db") == "postgresql://u:***@h:5/db"
    assert safe_url(parse_url("postgresql://u:p%40w@h/db?sslpassword=k")) == (
        "postgresql+psycopg://u:***@h/db?sslpassword=***"
    )
    with pytest.raises(StoreError, match="names no database"):
        parse_url("postgresql://u@h")


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'a.db'}")
    with engine.connect() as conn:
        pragma = {
            p: conn.execute(text(f"PRAGMA {p}")).scalar()
            for p in ("journal_mode", "busy_timeout", "foreign_keys")
        }
    engine.dispose()
    assert pragma == {"journal_mode": "wal", "busy_timeout": 30000, "foreign_keys": 1}


def test_sqlite_writes_take_the_lock_when_they_begin_and_reads_do_not(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    engine = open_engine(f"sqlite:///{path}")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    with engine.connect().execution_options(**{READ_ONLY: True}) as conn, conn.begin():
        conn.execute(text("SELECT 1"))
        other.execute("BEGIN IMMEDIATE")  # a read leaves the write lock free
        other.execute("ROLLBACK")
    with engine.begin() as conn:  # nothing written yet, but the write lock is held
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        conn.execute(text("SELECT 1"))
    other.close()
    engine.dispose()


def test_an_in_memory_sqlite_store_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with Store("sqlite://") as store:
        fp = store.register_fingerprint({"gpu": "cpu"})
        store.create_study("s", space={}, model="m", cluster="c", fingerprint=fp)
        assert [s.name for s in store.studies()] == ["s"]
    assert list(tmp_path.iterdir()) == []


def test_a_store_keeps_its_url_with_the_driver_pinned(store_url: str) -> None:
    plain = store_url.replace("postgresql+psycopg://", "postgresql://")
    with Store(plain) as store:
        assert store.url == store_url


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:secretpw@127.0.0.1:notaport/db",
        "postgresql://u:secretpw@[::1/db",
        "postgresql://u:secret@pw:x/y@127.0.0.1/db",
        "postgresql+psycopg2://u:secretpw@127.0.0.1/db",
    ],
)
def test_a_bad_url_is_refused_without_its_password(url: str) -> None:
    error = _refused(url, match="cannot parse|unsupported backend")
    chain = [error, *(e for e in (error.__cause__, error.__context__) if e is not None)]
    assert all("secretpw" not in str(e) and "secret@pw" not in str(e) for e in chain)
    assert "u:***@" in error.rule


def test_a_sqlite_uri_filename_is_refused(tmp_path: Path) -> None:
    _refused(f"sqlite:///file:{tmp_path / 'a.db'}?mode=rwc&uri=true", match="uri=true")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("url", "persistent"),
    [
        ("sqlite://", False),
        ("sqlite:///:memory:", False),
        ("sqlite+pysqlite://", False),
        ("sqlite+pysqlite:///:memory:", False),
        ("sqlite:///autotune.db", True),
        ("postgresql://u@h/db", True),
    ],
)
def test_in_memory_urls_are_not_persistent(url: str, persistent: bool) -> None:
    assert is_persistent(url) is persistent
