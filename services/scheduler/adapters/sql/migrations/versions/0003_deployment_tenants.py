"""Deployments belong to a tenant; those made before tenants belong to "default".

Revision ID: 0003
Revises: 0002
Create Date: 2027-01-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The server default fills the existing rows (and keeps an older scheduler's inserts valid).
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("tenant", sa.String(63), nullable=False, server_default="default"))
    op.create_index("ix_deployments_tenant_name", "deployments", ["tenant", "name"])


def downgrade() -> None:
    op.drop_index("ix_deployments_tenant_name", "deployments")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("tenant")
