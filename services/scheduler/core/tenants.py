"""Tenants: their quotas, borrowing limits and priority classes (the use cases, and the lookups admission makes).

A tenant without a record has the default quota (a setting; unlimited unless an operator says otherwise), so
a fresh mesh needs no set-up: records are how an admin gives a team a quota. Records are cached in memory
(this process is the only writer), so that admission looks a tenant up without a query.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

from services.scheduler.core.jobs.ports import TenantRepository
from services.scheduler.core.policy import Resources, Tenant, validate_quota
from shared import names
from shared.errors import FieldViolation, InvalidArgument, NotFound, PermissionDenied

T = TypeVar("T")


def tenant_not_found(name: str) -> NotFound:
    return NotFound(f"tenant {name!r} not found", reason="TENANT_NOT_FOUND")


class TenantService:
    """Tenants' records and the policy's view of them.

    Args:
        repository: Where records live.
        default_quota: The quota of a tenant without a record.
        priority_classes: Class name -> priority value (admin-defined, a setting).
        default_class: The class of a job that names none; it and the classes below it are open to all.
    """

    def __init__(
        self,
        repository: TenantRepository,
        *,
        default_quota: Resources,
        priority_classes: Mapping[str, int],
        default_class: str,
    ) -> None:
        if default_class not in priority_classes:
            raise ValueError(f"the default priority class {default_class!r} is not among {sorted(priority_classes)}")
        self._repo = repository
        self._default_quota = default_quota
        self._classes = dict(priority_classes)
        self._default_class = default_class
        self._records: dict[str, Tenant] = {}

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def start(self) -> None:
        self._records = {tenant.name: tenant for tenant in await self._run(self._repo.all)}

    # What admission asks ------------------------------------------------------------------------------

    def tenant(self, name: str) -> Tenant:
        """The tenant's record, or the default quota for one without."""
        return self._records.get(name) or Tenant(name=name, quota=self._default_quota)

    def priority(self, tenant: str, priority_class: str) -> int:
        """The priority a job of ``tenant`` gets from ``priority_class`` (empty: the default class).

        Raises:
            InvalidArgument: An unknown class.
            PermissionDenied: A class above the default one that the tenant was not granted.
        """
        name = priority_class or self._default_class
        if name not in self._classes:
            raise InvalidArgument.field(
                "spec.priority_class", f"unknown priority class {name!r}; the classes are {sorted(self._classes)}"
            )
        value = self._classes[name]
        if value > self._classes[self._default_class] and name not in self.tenant(tenant).priority_classes:
            raise PermissionDenied(
                f"tenant {tenant!r} may not use priority class {name!r} (an admin grants it with UpdateQuota)",
                reason="PRIORITY_CLASS_NOT_GRANTED",
            )
        return value

    # Use cases ----------------------------------------------------------------------------------------

    def _validated(self, tenant: Tenant) -> Tenant:
        names.check_name(tenant.name, "tenant.name")
        violations = [
            FieldViolation(f, m)
            for f, m in (
                *validate_quota(tenant.quota, "tenant.quota"),
                *validate_quota(tenant.borrowing_limit, "tenant.borrowing_limit"),
            )
        ]
        unknown = sorted(set(tenant.priority_classes) - set(self._classes))
        if unknown:
            violations.append(
                FieldViolation(
                    "tenant.priority_classes", f"unknown classes {unknown}; the classes are {sorted(self._classes)}"
                )
            )
        if violations:
            detail = "; ".join(f"{v.field}: {v.description}" for v in violations)
            raise InvalidArgument(f"invalid tenant: {detail}", violations=violations)
        return replace(tenant, priority_classes=tuple(sorted(set(tenant.priority_classes))))

    async def create(self, tenant: Tenant) -> Tenant:
        stored = await self._run(self._repo.insert, self._validated(tenant))
        self._records[stored.name] = stored
        return stored

    async def update(self, tenant: Tenant) -> Tenant:
        stored = await self._run(self._repo.update, self._validated(tenant))
        self._records[stored.name] = stored
        return stored

    def get(self, name: str, scope: str | None) -> Tenant:
        """The record; NotFound without one, or for another tenant than ``scope`` (None: any)."""
        names.check_name(name, "name")
        record = self._records.get(name)
        if record is None or (scope is not None and scope != name):
            raise tenant_not_found(name)
        return record

    def list(self, scope: str | None) -> list[Tenant]:
        return sorted((t for t in self._records.values() if scope is None or t.name == scope), key=lambda t: t.name)
