"""Tenants and their quotas in SQL (``core.ports.TenantRepository``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from services.scheduler.adapters.sql.tables import tenants
from services.scheduler.core.policy import Resources, Tenant
from shared.errors import AlreadyExists, NotFound


def _row_to_tenant(row: Any) -> Tenant:
    return Tenant(
        name=row.name,
        quota=Resources.from_dict(row.quota),
        borrowing_limit=Resources.from_dict(row.borrowing_limit),
        priority_classes=tuple(row.priority_classes),
        create_time=row.created_at,
        update_time=row.updated_at,
    )


def _values(tenant: Tenant) -> dict[str, Any]:
    return {
        "quota": tenant.quota.to_dict(),
        "borrowing_limit": tenant.borrowing_limit.to_dict(),
        "priority_classes": list(tenant.priority_classes),
        "updated_at": datetime.now(UTC),
    }


class SqlTenantRepository:
    """Implements ``core.ports.TenantRepository``; each method is one transaction."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine

    def insert(self, tenant: Tenant) -> Tenant:
        values = _values(tenant)
        try:
            with self._engine.begin() as conn:
                conn.execute(sa.insert(tenants).values(name=tenant.name, created_at=values["updated_at"], **values))
        except sa.exc.IntegrityError:
            raise AlreadyExists(f"tenant {tenant.name!r} already exists", reason="TENANT_EXISTS") from None
        stored = self.get(tenant.name)
        assert stored is not None
        return stored

    def get(self, name: str) -> Tenant | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(tenants).where(tenants.c.name == name)).first()
        return None if row is None else _row_to_tenant(row)

    def all(self) -> list[Tenant]:
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(tenants).order_by(tenants.c.name)).all()
        return [_row_to_tenant(row) for row in rows]

    def update(self, tenant: Tenant) -> Tenant:
        with self._engine.begin() as conn:
            updated = conn.execute(sa.update(tenants).where(tenants.c.name == tenant.name).values(**_values(tenant)))
        if updated.rowcount == 0:
            raise NotFound(f"tenant {tenant.name!r} not found", reason="TENANT_NOT_FOUND")
        stored = self.get(tenant.name)
        assert stored is not None
        return stored
