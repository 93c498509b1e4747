"""Alembic environment: runs on the connection the registry hands over (see engine.migrate)."""

from __future__ import annotations

from alembic import context

from services.registry.adapters.sql.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - migrations are only run through engine.migrate
    raise RuntimeError("run migrations through shared.sql.migrate")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
