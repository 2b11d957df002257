"""Storage URLs: validate, connect, and set each backend up for many concurrent writers.

SQLite (`sqlite:///PATH`, the default) runs in WAL mode with a 30 s busy timeout, foreign keys
on, and write transactions opened with `BEGIN IMMEDIATE`, so concurrent writers queue for the
lock instead of failing with "database is locked" halfway through a transaction.
PostgreSQL (`postgresql://` or `postgresql+psycopg://`, both through psycopg 3) uses a
pre-pinged pool and a 5 s connect timeout.

Every problem with a URL is one `StoreError` line naming the rule, raised before anything is
written: no SQLite file is created for a URL that fails validation. An engine opened to write
first checks the database (`storage.guard`): an SQLite file that is read-only, not a database,
damaged or another application's, or a PostgreSQL database holding another application's
tables, is refused before anything is written and before WAL mode is switched on. An engine
opened `read_only` opens SQLite files with `mode=ro` (and changes no PRAGMA) and runs every
PostgreSQL transaction read-only. Every URL shown is `safe_url`'s: its password masked.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.pool import StaticPool

from autotune.redact import mask_secrets
from storage import guard
from storage.errors import StoreError
from storage.records import json_default

FIELD = "--storage"
SUPPORTED = "sqlite:///PATH, postgresql://USER@HOST/DB, postgresql+psycopg://USER@HOST/DB"
BUSY_TIMEOUT_S = 30
CONNECT_TIMEOUT_S = 5
_DRIVERS = {
    "sqlite": "sqlite",
    "sqlite+pysqlite": "sqlite",
    "postgresql": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
}
READ_ONLY = "autotune_read_only"  # execution option: a SQLite read opens a plain (deferred) BEGIN
_PG_READ_ONLY = "-c default_transaction_read_only=on"


def parse_url(url: str) -> URL:
    """The SQLAlchemy URL for a storage URL, with its driver pinned; checks what needs no I/O."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # not `from e`: SQLAlchemy's message repeats the raw URL
        rule = f"cannot parse {safe_url(url)!r} as a database URL (supported: {SUPPORTED})"
        raise StoreError(FIELD, rule) from None
    driver = _DRIVERS.get(parsed.drivername)
    if driver is None:
        rule = f"unsupported backend {parsed.drivername!r} in {safe_url(parsed)} (supported: {SUPPORTED})"
        raise StoreError(FIELD, rule)
    parsed = parsed.set(drivername=driver)
    if driver == "sqlite":
        _check_sqlite_path(parsed)
    elif not parsed.database:
        raise StoreError(FIELD, f"{safe_url(parsed)} names no database (postgresql://USER@HOST/DB)")
    return parsed


def safe_url(url: URL | str) -> str:
    """The URL as text with its password (and any secret query value) masked, for messages and logs.

    Text is masked as it stands (`autotune.redact.mask_secrets`), so a URL that does not parse
    is masked too.
    """
    return mask_secrets(url if isinstance(url, str) else url.render_as_string(hide_password=False))


def _check_sqlite_path(url: URL) -> None:
    if str(url.query.get("uri", "")).lower() in ("true", "1"):
        rule = f"SQLite URI filenames (uri=true) are not supported: {safe_url(url)}; name the file, sqlite:///PATH"
        raise StoreError(FIELD, rule)
    if is_memory(url):
        return
    path = Path(url.database or "")
    if path.is_dir():
        raise StoreError(FIELD, f"SQLite path {str(path)!r} is a directory; name a file in it")
    if not path.parent.is_dir():
        rule = (
            f"directory {str(path.parent)!r} of SQLite database {str(path)!r} does not exist; create it first"
        )
        raise StoreError(FIELD, rule)


def is_memory(url: URL) -> bool:
    return url.drivername == "sqlite" and url.database in (None, "", ":memory:")


def is_persistent(url: str) -> bool:
    """False for an in-memory SQLite URL (`sqlite://`, `sqlite:///:memory:`), whose data dies with
    the process; True for a file or a server. `StoreError` for a URL that does not parse."""
    return not is_memory(parse_url(url))


def sqlite_path(url: URL) -> Path | None:
    """The file of an SQLite URL; None for an in-memory database or another backend."""
    return None if url.drivername != "sqlite" or is_memory(url) else Path(url.database or "")


def open_engine(url: str, *, read_only: bool = False) -> Engine:
    """A connected engine for `url`, or a `StoreError` naming what is wrong with it.

    To write (the default), the database is checked first (`storage.guard`) and refused, with
    nothing written, if it is read-only, not an SQLite database, damaged, or another
    application's. `read_only` opens it for reading only: SQLite `mode=ro`, PostgreSQL
    read-only transactions; no check, since nothing will be written.
    """
    parsed = parse_url(url)
    path = sqlite_path(parsed)
    if path is not None and not read_only:
        problem = guard.sqlite_file_problem(path, timeout=BUSY_TIMEOUT_S)
        if problem is not None:
            raise StoreError(FIELD, problem)
    if parsed.drivername == "sqlite":
        engine = _sqlite_engine(parsed, read_only=read_only)
    else:
        engine = _postgresql_engine(parsed, read_only=read_only)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            postgresql = parsed.drivername != "sqlite"
            tables = inspect(conn).get_table_names() if postgresql and not read_only else []
    except DBAPIError as e:
        engine.dispose()
        raise StoreError(FIELD, f"cannot connect to {safe_url(parsed)}: {first_line(e)}") from e
    problem = guard.foreign_tables_problem(tables)
    if problem is not None:
        engine.dispose()
        raise StoreError(FIELD, f"{safe_url(parsed)} {problem}")
    return engine


def check_writable(url: str) -> None:
    """The checks `Store(url)` makes before it writes (StoreError naming the problem), without
    writing anything: a missing SQLite file is not created, a server is only connected to."""
    parsed = parse_url(url)
    path = sqlite_path(parsed)
    if path is not None:
        problem = guard.sqlite_file_problem(path, timeout=BUSY_TIMEOUT_S)
        if problem is not None:
            raise StoreError(FIELD, problem)
        return
    open_engine(url).dispose()


def first_line(e: BaseException) -> str:
    """The first non-empty line of a database error's reason, secrets masked."""
    orig = getattr(e, "orig", None) or e
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return mask_secrets(lines[0]) if lines else type(orig).__name__


@contextmanager
def storage_failures(url: URL | str, *, write: bool = True) -> Iterator[None]:
    """Turn a database that cannot take a write or a read (a full disk, a read-only or damaged
    database, an I/O error: `guard.STORAGE_FAILURES`) into one `StoreError` line; other errors
    pass unchanged."""
    try:
        yield
    except DBAPIError as e:
        reason = first_line(e)
        if not guard.is_storage_failure(reason):
            raise
        raise StoreError(FIELD, f"cannot {'write to' if write else 'read'} {safe_url(url)}: {reason}") from e


def _postgresql_engine(url: URL, *, read_only: bool) -> Engine:
    connect_args: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S}
    if read_only:
        given = url.query.get("options", ())  # the URL's own `options`, kept beside ours
        connect_args["options"] = " ".join([*([given] if isinstance(given, str) else given), _PG_READ_ONLY])
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args, json_serializer=dump_json)


def _sqlite_engine(url: URL, *, read_only: bool) -> Engine:
    kwargs: dict[str, Any] = {"json_serializer": dump_json, "connect_args": {"timeout": BUSY_TIMEOUT_S}}
    path = sqlite_path(url)
    if path is None:  # one shared connection, or every connection sees its own empty database
        kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
    elif read_only:
        kwargs["creator"] = partial(_connect_read_only, path)
    engine = create_engine(url, **kwargs)
    event.listen(engine, "connect", _sqlite_on_connect_read_only if read_only else _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin_read_only if read_only else _sqlite_on_begin)
    return engine


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A `mode=ro` connection: SQLite itself refuses every write, and never creates the file.

    In a folder nobody can write (a read-only mount) the file is read as `immutable`: reading a
    WAL database needs a `-shm` file SQLite could not create there, and no writer can be at
    work, since a writer needs its journal or `-wal` file beside the database.
    """
    uri = f"{path.absolute().as_uri()}?mode=ro"
    if not os.access(path.parent, os.W_OK) and not Path(f"{path}-wal").exists():
        uri += "&immutable=1"
    return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False)


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    dbapi_connection.isolation_level = None  # sqlite3 emits no BEGIN of its own; `begin` below does
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_on_connect_read_only(dbapi_connection: Any, connection_record: Any) -> None:
    """No `journal_mode` PRAGMA: the file's own mode (WAL or a rollback journal) stays as it is."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA query_only = ON")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Any) -> None:
    read_only = conn.get_execution_options().get(READ_ONLY, False)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _sqlite_on_begin_read_only(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN")


def dump_json(value: Any) -> str:
    """JSON for a column. JSON has no NaN or infinity: such floats (a diverged loss) become null."""
    return json.dumps(_finite(value), allow_nan=False, default=json_default)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
