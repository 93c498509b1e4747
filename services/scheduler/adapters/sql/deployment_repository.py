"""The scheduler's DeploymentRepository on SQLAlchemy Core (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from services.scheduler.adapters.sql.tables import deployments
from services.scheduler.core.deployments.model import (
    Deployment,
    DeploymentSpec,
    DeploymentState,
    ResolvedVersion,
    deployment_not_found,
)
from shared.errors import AlreadyExists


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _to_deployment(row: sa.Row[Any]) -> Deployment:
    return Deployment(
        name=row.name,
        spec=DeploymentSpec.from_dict(row.spec),
        state=DeploymentState(row.state),
        resolved=ResolvedVersion.from_dict(row.resolved),
        canary=ResolvedVersion.from_dict(row.canary) if row.canary else None,
        tenant=row.tenant,
        message=row.message,
        target_replicas=row.target_replicas,
        generation=row.generation,
        replica_generation=row.replica_generation,
        create_time=_utc(row.created_at),
        update_time=_utc(row.updated_at),
        request_id=row.request_id or "",
    )


def _values(deployment: Deployment) -> dict[str, Any]:
    return {
        "spec": deployment.spec.to_dict(),
        "state": deployment.state.value,
        "message": deployment.message,
        "resolved": deployment.resolved.to_dict(),
        "canary": deployment.canary.to_dict() if deployment.canary else None,
        "generation": deployment.generation,
        "replica_generation": deployment.replica_generation,
        "target_replicas": deployment.target_replicas,
    }


class SqlDeploymentRepository:
    """Implements ``core.deployment_ports.DeploymentRepository``; each method is one transaction."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine

    def _read(self) -> sa.Connection:
        return self._engine.connect().execution_options(maas_readonly=True)

    @staticmethod
    def _row(conn: sa.Connection, name: str) -> sa.Row[Any]:
        row = conn.execute(sa.select(deployments).where(deployments.c.name == name)).first()
        if row is None:
            raise deployment_not_found(name)
        return row

    def insert(self, deployment: Deployment) -> Deployment:
        now = datetime.now(UTC)
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    deployments.insert().values(
                        name=deployment.name,
                        # The owner never changes: set here only, not by save().
                        tenant=deployment.tenant,
                        request_id=deployment.request_id or None,
                        created_at=deployment.create_time or now,
                        updated_at=deployment.update_time or now,
                        **_values(deployment),
                    )
                )
                return _to_deployment(self._row(conn, deployment.name))
        except sa.exc.IntegrityError:
            raise AlreadyExists(f"deployment {deployment.name!r} already exists", reason="DEPLOYMENT_EXISTS") from None

    def insert_or_get(self, deployment: Deployment) -> tuple[Deployment, bool]:
        try:
            return self.insert(deployment), True
        except AlreadyExists:
            # The unique index on (tenant, request_id) decides between racing creations (the name's
            # primary key may trip first: the same lookup tells a retry from a clash of names).
            existing = self.by_request_id(deployment.tenant, deployment.request_id) if deployment.request_id else None
            if existing is None:
                raise
            return existing, False

    def by_request_id(self, tenant: str, request_id: str) -> Deployment | None:
        query = sa.select(deployments).where(deployments.c.tenant == tenant, deployments.c.request_id == request_id)
        with self._read() as conn:
            row = conn.execute(query).first()
        return _to_deployment(row) if row is not None else None

    def get(self, name: str) -> Deployment:
        with self._read() as conn:
            return _to_deployment(self._row(conn, name))

    def list_deployments(self, after: str | None, limit: int, tenant: str | None = None) -> list[Deployment]:
        query = sa.select(deployments).order_by(deployments.c.name).limit(limit)
        if after is not None:
            query = query.where(deployments.c.name > after)
        if tenant is not None:
            query = query.where(deployments.c.tenant == tenant)
        with self._read() as conn:
            return [_to_deployment(row) for row in conn.execute(query)]

    def all(self) -> list[Deployment]:
        with self._read() as conn:
            return [_to_deployment(row) for row in conn.execute(sa.select(deployments).order_by(deployments.c.name))]

    def save(self, deployment: Deployment) -> Deployment:
        with self._engine.begin() as conn:
            result = conn.execute(
                deployments.update()
                .where(deployments.c.name == deployment.name)
                .values(updated_at=datetime.now(UTC), **_values(deployment))
            )
            if result.rowcount == 0:
                raise deployment_not_found(deployment.name)
            return _to_deployment(self._row(conn, deployment.name))

    def delete(self, name: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(deployments.delete().where(deployments.c.name == name))
