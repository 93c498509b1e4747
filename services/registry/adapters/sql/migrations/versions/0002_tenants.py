"""Tenants: every model, and every event of the change feed, belongs to one.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Rows written before tenants existed belong to the tenant of development mode and mesh-made models.
_DEFAULT = "default"


def upgrade() -> None:
    for table in ("models", "events"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("tenant", sa.String(63), nullable=False, server_default=_DEFAULT))
            batch.create_index(f"ix_{table}_tenant", ["tenant"])


def downgrade() -> None:
    for table in ("events", "models"):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_tenant")
            batch.drop_column("tenant")
