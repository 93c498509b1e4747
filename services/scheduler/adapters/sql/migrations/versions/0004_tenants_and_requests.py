"""Tenants with quotas; client request ids (idempotent creation); placement attempts and preemptions of jobs.

Revision ID: 0004
Revises: 0003
Create Date: 2027-02-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("quota", sa.JSON, nullable=False),
        sa.Column("borrowing_limit", sa.JSON, nullable=False),
        sa.Column("priority_classes", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    # Existing rows get NULL request ids: unique indexes allow any number of NULLs.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("request_id", sa.String(128), nullable=True))
        batch.add_column(sa.Column("placement_attempts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("preemptions", sa.Integer, nullable=False, server_default="0"))
    op.create_index("ix_jobs_tenant_request_id", "jobs", ["tenant", "request_id"], unique=True)
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("request_id", sa.String(128), nullable=True))
    op.create_index("ix_deployments_tenant_request_id", "deployments", ["tenant", "request_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_deployments_tenant_request_id", "deployments")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("request_id")
    op.drop_index("ix_jobs_tenant_request_id", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("preemptions")
        batch.drop_column("placement_attempts")
        batch.drop_column("request_id")
    op.drop_table("tenants")
