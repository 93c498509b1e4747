"""``client.tenants``: tenants' quotas, borrowing limits and priority classes in the scheduler."""

from __future__ import annotations

from maas._rpc import Connection
from maas.scheduler.v1 import scheduler_pb2 as pb


class AsyncTenants:
    """Tenants (admin keys change them; a tenant's key sees its own)."""

    def __init__(self, scheduler: Connection) -> None:
        self._scheduler = scheduler

    async def create(self, tenant: pb.Tenant) -> pb.Tenant:
        """Create a tenant's record (a tenant without one has the scheduler's default quota)."""
        response: pb.CreateTenantResponse = await self._scheduler.call(
            "CreateTenant", pb.CreateTenantRequest(tenant=tenant)
        )
        return response.tenant

    async def update_quota(self, tenant: pb.Tenant) -> pb.Tenant:
        """Replace a tenant's quota, borrowing limit and priority classes (all of them)."""
        response: pb.UpdateQuotaResponse = await self._scheduler.call(
            "UpdateQuota", pb.UpdateQuotaRequest(tenant=tenant)
        )
        return response.tenant

    async def get(self, name: str) -> pb.Tenant:
        """A tenant's record."""
        response: pb.GetTenantResponse = await self._scheduler.call("GetTenant", pb.GetTenantRequest(name=name))
        return response.tenant

    async def list(self) -> list[pb.Tenant]:
        """The tenants with a record."""
        response: pb.ListTenantsResponse = await self._scheduler.call("ListTenants", pb.ListTenantsRequest())
        return list(response.tenants)

    async def usage(self, tenant: str = "") -> pb.GetUsageResponse:
        """What ``tenant`` (default: the caller's) has placed now, against its quota."""
        response: pb.GetUsageResponse = await self._scheduler.call("GetUsage", pb.GetUsageRequest(tenant=tenant))
        return response

    async def cluster(self) -> pb.GetClusterResponse:
        """The pool's capacity, what every tenant has placed on it, and how many jobs wait (admin keys)."""
        response: pb.GetClusterResponse = await self._scheduler.call("GetCluster", pb.GetClusterRequest())
        return response
