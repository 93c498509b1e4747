"""Migrating a test database to an older schema, to check what a later migration does to existing rows."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config


def upgrade_to(engine: sa.Engine, migrations: Path, revision: str) -> None:
    """Run the Alembic migrations in ``migrations`` on ``engine`` up to ``revision``."""
    config = Config()
    config.set_main_option("script_location", str(migrations))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
