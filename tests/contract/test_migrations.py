"""Migrations build the schema from an empty database, and it matches the code's tables exactly."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from services.registry.adapters.sql.tables import MIGRATIONS, metadata
from shared.sql import create_engine, migrate


def test_migrations_match_the_tables(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        migrate(engine, MIGRATIONS)
        migrate(engine, MIGRATIONS)  # idempotent: a restart runs it again
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), metadata)
        assert diff == []
    finally:
        engine.dispose()
