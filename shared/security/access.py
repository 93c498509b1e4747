"""Who may call what: access levels, principals, and the per-service authorization tables.

Every service declares one table next to its servicer (RPC -> the access it needs) and hands it to the
server builder; the one authentication interceptor (``shared.grpc.auth``) checks it on every call. An RPC
missing from its table is refused: a new RPC is closed until someone decides who may call it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from google.protobuf.descriptor import ServiceDescriptor

from shared.security.keys import Role

# Services any client may call without credentials: probes and tooling (grpcurl) must work.
PUBLIC_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.")
# The tenant of the mesh's own services (they act for every tenant).
MESH_TENANT = "*"
# Where a resource belongs when no tenant is known (development mode, the mesh acting for nobody).
DEFAULT_TENANT = "default"
# Metadata by which the mesh's services (and admin keys) act within one tenant: a training rank uploads
# the model of its job's tenant, the scheduler checks a deployment's model as its tenant sees it.
TENANT_METADATA = "maas-tenant"


class Access(StrEnum):
    """What an RPC requires of its caller."""

    PUBLIC = "public"  # anyone, no credentials
    INFERENCE = "inference"  # any key (inference, developer, admin)
    DEVELOPER = "developer"  # a developer or admin key
    ADMIN = "admin"  # an admin key
    INTERNAL = "internal"  # only the mesh's own services (mTLS identity or the internal token)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: an API key of a tenant with a role, or one of the mesh's services."""

    name: str
    tenant: str
    role: Role | None = None
    service: str | None = None
    # The tenant a service or an admin acts within for this call (TENANT_METADATA); None: its own view.
    acting_for: str | None = None
    # The key's grants (shared.security.keys.GRANTS): permissions beyond its role, within its own tenant.
    grants: frozenset[str] = frozenset()

    @classmethod
    def mesh_service(cls, service: str) -> Principal:
        return cls(name=f"service:{service}", tenant=MESH_TENANT, service=service)

    @property
    def is_service(self) -> bool:
        return self.service is not None

    @property
    def is_admin(self) -> bool:
        """Sees and acts on every tenant (admin keys and the mesh's services)."""
        return self.is_service or self.role is Role.ADMIN

    def may(self, access: Access) -> bool:
        """Whether this principal may call an RPC that requires ``access``."""
        if access is Access.PUBLIC or self.is_service:
            return True
        if access is Access.INTERNAL or self.role is None:
            return False
        return self.role.allows(Role(access.value))


def tenant_scope(principal: Principal | None) -> str | None:
    """The tenant whose resources a call may see and touch; None: every tenant.

    None for development mode (no principal), the mesh's services and admin keys, unless they act for one
    tenant; a developer's or inference key's own tenant otherwise.
    """
    if principal is None:
        return None
    if principal.acting_for is not None:
        return principal.acting_for
    if principal.is_admin:
        return None
    return principal.tenant


def owner_tenant(principal: Principal | None) -> str:
    """The tenant a resource created by this call belongs to."""
    if principal is None:
        return DEFAULT_TENANT
    if principal.acting_for is not None:
        return principal.acting_for
    if principal.is_service:
        return DEFAULT_TENANT
    return principal.tenant


# The caller of the RPC being served (None: authentication is off, ``--insecure``).
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("current_principal", default=None)
# The caller's own ``authorization`` value, for calls a service makes on its behalf (the gateway's
# repository RPCs run at the scheduler as the caller, not as the gateway).
current_authorization: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "current_authorization", default=None
)

AuthorizationTable = Mapping[str, Access]


def caller_scope() -> str | None:
    """:func:`tenant_scope` of the RPC being served (what servicers pass to their cores)."""
    return tenant_scope(current_principal.get())


def caller_owner() -> str:
    """:func:`owner_tenant` of the RPC being served."""
    return owner_tenant(current_principal.get())


def rules(service: ServiceDescriptor | str, table: Mapping[str, Access]) -> dict[str, Access]:
    """``{"/pkg.Service/Method": access}`` for one service from ``{"Method": access}``.

    Raises:
        ValueError: A name in ``table`` is not a method of ``service`` (a typo would leave the real RPC
            without a rule, and so closed, silently).
    """
    if isinstance(service, ServiceDescriptor):
        known = {m.name for m in service.methods}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"{service.full_name} has no method(s) {', '.join(unknown)}")
        full_name = service.full_name
    else:
        full_name = service
    return {f"/{full_name}/{method}": access for method, access in table.items()}


def missing_rules(services: list[ServiceDescriptor], table: AuthorizationTable) -> list[str]:
    """The methods of ``services`` that ``table`` says nothing about (a test keeps this empty)."""
    return [
        f"/{service.full_name}/{method.name}"
        for service in services
        for method in service.methods
        if f"/{service.full_name}/{method.name}" not in table
    ]
