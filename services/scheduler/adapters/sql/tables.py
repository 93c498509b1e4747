"""The scheduler's SQL schema (SQLAlchemy Core). Alembic migrations create it; tests check they agree."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

MIGRATIONS = Path(__file__).parent / "migrations"
#: Alembic's version table for these migrations (not the default ``alembic_version``, which the registry uses).
VERSION_TABLE = "alembic_version_scheduler"

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

jobs = sa.Table(
    "jobs",
    metadata,
    # Submission order: ties of create time cannot reorder the queue or a listing.
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(63), nullable=False, unique=True),
    sa.Column("tenant", sa.String(63), nullable=False),
    sa.Column("state", sa.String(15), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    # The normalised TrainingJobSpec (TrainingJobSpec.to_dict()).
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("message", sa.Text, nullable=False, server_default=""),
    sa.Column("step", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("total_steps", sa.BigInteger, nullable=False, server_default="0"),
    # Name -> number; non-finite numbers are stored as the strings "nan", "inf", "-inf".
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("model_version", sa.Integer, nullable=False, server_default="0"),
    sa.Column("dataset_fingerprint", sa.String(64), nullable=False, server_default=""),
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("revision", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # The client's request id (idempotent submission: a retry returns this job); NULL: none given.
    sa.Column("request_id", sa.String(128), nullable=True),
    # Placements that timed out in a row (the job fails after scheduler_max_placement_attempts).
    sa.Column("placement_attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("preemptions", sa.Integer, nullable=False, server_default="0"),
    # The submission's W3C traceparent, which the job's run continues; NULL: none (jobs stored before 0005).
    sa.Column("trace_context", sa.String(256), nullable=True),
    # Admission scans QUEUED jobs by priority then seq; listings filter by state and tenant.
    sa.Index("ix_jobs_state_priority_seq", "state", "priority", "seq"),
    sa.Index("ix_jobs_tenant_state", "tenant", "state"),
    sa.Index("ix_jobs_tenant_request_id", "tenant", "request_id", unique=True),
)

deployments = sa.Table(
    "deployments",
    metadata,
    sa.Column("name", sa.String(63), primary_key=True),
    # The owner (its creator's tenant); deployments made before tenants belong to "default".
    sa.Column("tenant", sa.String(63), nullable=False, server_default="default"),
    # The normalised DeploymentSpec (DeploymentSpec.to_dict()).
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("state", sa.String(15), nullable=False),
    sa.Column("message", sa.Text, nullable=False, server_default=""),
    # What spec.version and the canary resolved to (ResolvedVersion.to_dict(); canary null without one):
    # a restarted scheduler serves them without asking the registry.
    sa.Column("resolved", sa.JSON, nullable=False),
    sa.Column("canary", sa.JSON, nullable=True),
    sa.Column("generation", sa.BigInteger, nullable=False, server_default="1"),
    sa.Column("replica_generation", sa.BigInteger, nullable=False, server_default="1"),
    sa.Column("target_replicas", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # The client's request id (idempotent creation); NULL: none given.
    sa.Column("request_id", sa.String(128), nullable=True),
    # A tenant's listing: its deployments by name.
    sa.Index("ix_deployments_tenant_name", "tenant", "name"),
    sa.Index("ix_deployments_tenant_request_id", "tenant", "request_id", unique=True),
)

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("name", sa.String(63), primary_key=True),
    # Resources as {"cpus", "gpus", "memory_bytes", "jobs", "replicas"} (core.policy.Resources.to_dict()).
    sa.Column("quota", sa.JSON, nullable=False),
    sa.Column("borrowing_limit", sa.JSON, nullable=False),
    # The priority classes its jobs may use (names; the classes themselves are settings).
    sa.Column("priority_classes", sa.JSON, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
