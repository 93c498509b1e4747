"""The registry's SQL schema (SQLAlchemy Core). Alembic migrations create it; tests check they agree."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

MIGRATIONS = Path(__file__).parent / "migrations"

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

models = sa.Table(
    "models",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # Unique across tenants (as S3 bucket names): the gateway routes by name alone.
    sa.Column("name", sa.String(63), nullable=False, unique=True),
    # The owner; every query of a tenant-scoped caller filters on it.
    sa.Column("tenant", sa.String(63), nullable=False, server_default="default", index=True),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    # Version numbers are allocated from this counter under the model row's lock: no gaps, no duplicates.
    sa.Column("latest_version", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

model_tags = sa.Table(
    "model_tags",
    metadata,
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("key", sa.String(63), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
    sa.Index("ix_model_tags_key_value", "key", "value"),
)

versions = sa.Table(
    "versions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False, index=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("manifest_json", sa.Text, nullable=False),
    sa.Column("architecture", sa.String(63), nullable=False),
    sa.Column("framework", sa.String(31), nullable=False),
    sa.Column("dtype", sa.String(15), nullable=False),
    sa.Column("tags", sa.JSON, nullable=False),
    sa.Column("lineage", sa.JSON, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("model_id", "number", name="uq_versions_model_id_number"),
)

aliases = sa.Table(
    "aliases",
    metadata,
    sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("name", sa.String(63), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# The change feed: written in the same transaction as the change it records (an outbox).
events = sa.Table(
    "events",
    metadata,
    sa.Column("sequence", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("type", sa.String(31), nullable=False),
    sa.Column("model", sa.String(63), nullable=False, index=True),
    # The model's tenant when the event happened: watchers of one tenant filter here, without a join (the
    # model of a MODEL_DELETED event is gone).
    sa.Column("tenant", sa.String(63), nullable=False, server_default="default", index=True),
    sa.Column("version", sa.Integer, nullable=False, server_default="0"),
    sa.Column("alias", sa.String(63), nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

# Signatures of versions (OpenSSF Model Signing bundles), at most one per signing key and version.
signatures = sa.Table(
    "signatures",
    metadata,
    sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("key_id", sa.String(64), primary_key=True),
    # The digest the signature vouches for (checked equal to the version's when it was added).
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("bundle", sa.Text, nullable=False),
    sa.Column("public_key_pem", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

# Each tenant's trust policy: the public keys whose signatures its deployments accept.
trusted_keys = sa.Table(
    "trusted_keys",
    metadata,
    sa.Column("tenant", sa.String(63), primary_key=True),
    sa.Column("name", sa.String(63), primary_key=True),
    sa.Column("key_id", sa.String(64), nullable=False),
    sa.Column("public_key_pem", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
