"""Schema migrations, run from code: no alembic.ini, the scripts live in `storage/migrations`.

Alembic's version table is `autotune_alembic_version`, so it never meets Optuna's
`alembic_version` in a shared database. An upgrade runs in one transaction that first takes
the database's write lock (SQLite `BEGIN IMMEDIATE`, a PostgreSQL advisory lock), so several
processes that open a fresh database at once migrate it once, one after another.

`upgrade` opens the database to write, so it is checked first and refused, untouched, if it is
read-only, damaged or another application's (`storage.engine.open_engine`); a disk that fills
or a database that turns read-only during the upgrade is one `StoreError` line, and the
upgrade's transaction leaves nothing behind. `current` only reads.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, text

from storage.engine import (
    FIELD,
    READ_ONLY,
    first_line,
    open_engine,
    parse_url,
    safe_url,
    sqlite_path,
    storage_failures,
)
from storage.errors import StoreError
from storage.models import VERSION_TABLE

SCRIPTS = Path(__file__).parent / "migrations"
_PG_LOCK_KEY = 0x6175746F74756E65  # "autotune": one advisory lock for every migrating process


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config built in code; `env.py` migrates through `connection`."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    """The newest revision this version of the code knows."""
    rev = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert rev is not None
    return rev


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at `url` to `revision` (default: the newest)."""
    engine = open_engine(url)
    try:
        upgrade_engine(engine, revision)
    finally:
        engine.dispose()


def current(url: str) -> str | None:
    """The revision the database at `url` is at; None for a database never migrated (or, for
    SQLite, a file that does not exist: none is created)."""
    path = sqlite_path(parse_url(url))
    if path is not None and not path.exists():
        return None
    engine = open_engine(url, read_only=True)
    try:
        return current_engine(engine)
    finally:
        engine.dispose()


def current_engine(engine: Engine) -> str | None:
    with (
        storage_failures(engine.url, write=False),
        engine.connect().execution_options(**{READ_ONLY: True}) as conn,
    ):
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def upgrade_engine(engine: Engine, revision: str = "head") -> None:
    """Upgrade through an open engine, in one locked transaction; a database that cannot take
    the write (full, read-only, damaged) is one `StoreError` line, with nothing left written."""
    with storage_failures(engine.url), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        try:
            command.upgrade(alembic_config(conn), revision)
        except CommandError as e:
            at = MigrationContext.configure(
                conn, opts={"version_table": VERSION_TABLE}
            ).get_current_revision()
            rule = (
                f"cannot upgrade {safe_url(engine.url)} (at revision {at}) to {revision!r}: {first_line(e)}"
            )
            raise StoreError(FIELD, f"{rule}; is the database from a newer autotune?") from e


def ensure_current(engine: Engine) -> None:
    """Upgrade to head unless the database is there already (the common, lock-free case)."""
    if current_engine(engine) != head():
        upgrade_engine(engine)
