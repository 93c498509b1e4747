"""Inference deployments.

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


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("state", sa.String(15), nullable=False),
        sa.Column("message", sa.Text, nullable=False, server_default=""),
        sa.Column("resolved", sa.JSON, nullable=False),
        sa.Column("canary", sa.JSON, nullable=True),
        sa.Column("generation", sa.BigInteger, nullable=False, server_default="1"),
        sa.Column("replica_generation", sa.BigInteger, nullable=False, server_default="1"),
        sa.Column("target_replicas", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_deployments"),
    )


def downgrade() -> None:
    op.drop_table("deployments")
