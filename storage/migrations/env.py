"""Alembic environment: migrates through the connection `storage.migrate` hands over.

Run migrations with `storage.migrate.upgrade(url)`; there is no alembic.ini and no offline mode.
"""

from __future__ import annotations

from alembic import context

from storage.migrate import VERSION_TABLE

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the store's migrations through storage.migrate.upgrade(url)")

context.configure(connection=connection, version_table=VERSION_TABLE, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
