"""Initial scheduler schema: training jobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(63), nullable=False),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("state", sa.String(15), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("message", sa.Text, nullable=False, server_default=""),
        sa.Column("step", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("total_steps", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("model_version", sa.Integer, nullable=False, server_default="0"),
        sa.Column("dataset_fingerprint", sa.String(64), nullable=False, server_default=""),
        sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("revision", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_jobs"),
        sa.UniqueConstraint("id", name="uq_jobs_id"),
    )
    op.create_index("ix_jobs_state_priority_seq", "jobs", ["state", "priority", "seq"])
    op.create_index("ix_jobs_tenant_state", "jobs", ["tenant", "state"])


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_state", "jobs")
    op.drop_index("ix_jobs_state_priority_seq", "jobs")
    op.drop_table("jobs")
