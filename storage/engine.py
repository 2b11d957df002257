"""Storage URLs: validate, connect, and set each backend up for many concurrent writers.

SQLite (`sqlite:///PATH`, the default) runs in WAL mode with a 30 s busy timeout, foreign keys
on, and write transactions opened with `BEGIN IMMEDIATE`, so concurrent writers queue for the
lock instead of failing with "database is locked" halfway through a transaction.
PostgreSQL (`postgresql://` or `postgresql+psycopg://`, both through psycopg 3) uses a
pre-pinged pool and a 5 s connect timeout.

Every problem with a URL is one `StoreError` line naming the rule, raised before anything is
written: no SQLite file is created for a URL that fails validation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.pool import StaticPool

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


def parse_url(url: str) -> URL:
    """The SQLAlchemy URL for a storage URL, with its driver pinned; checks what needs no I/O."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as e:
        raise StoreError(FIELD, f"cannot parse {url!r} as a database URL (supported: {SUPPORTED})") from e
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
    """The URL as text without its password, fit for messages and logs."""
    parsed = make_url(url) if isinstance(url, str) else url
    bare = URL.create(
        parsed.drivername, parsed.username, None, parsed.host, parsed.port, parsed.database, parsed.query
    )
    return bare.render_as_string(hide_password=False)


def _check_sqlite_path(url: URL) -> None:
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


def open_engine(url: str) -> Engine:
    """A connected engine for `url`, or a `StoreError` naming what is wrong with it."""
    parsed = parse_url(url)
    if parsed.drivername == "sqlite":
        engine = _sqlite_engine(parsed)
    else:
        engine = create_engine(
            parsed,
            pool_pre_ping=True,
            connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
            json_serializer=dump_json,
        )
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError as e:
        engine.dispose()
        raise StoreError(FIELD, f"cannot connect to {safe_url(parsed)}: {first_line(e)}") from e
    return engine


def first_line(e: BaseException) -> str:
    """The first non-empty line of a database error's reason."""
    orig = getattr(e, "orig", None) or e
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return lines[0] if lines else type(orig).__name__


def _sqlite_engine(url: URL) -> Engine:
    kwargs: dict[str, Any] = {"json_serializer": dump_json, "connect_args": {"timeout": BUSY_TIMEOUT_S}}
    if is_memory(url):  # one shared connection, or every connection sees its own empty database
        kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
    engine = create_engine(url, **kwargs)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    dbapi_connection.isolation_level = None  # sqlite3 emits no BEGIN of its own; `begin` below does
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Any) -> None:
    read_only = conn.get_execution_options().get(READ_ONLY, False)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


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
