"""Alembic environment: runs on the connection the scheduler hands over (see shared.sql.migrate)."""

from __future__ import annotations

from alembic import context

from services.scheduler.adapters.sql.tables import VERSION_TABLE, metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - migrations are only run through shared.sql.migrate
    raise RuntimeError("run migrations through shared.sql.migrate")
# Its own version table: the scheduler's revisions may then share a database with another service's.
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True, version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
