"""``maas.scheduler.v1.SchedulerService``: each RPC converts, awaits the core, converts back.

The tenant comes from the caller, never from a request field: each RPC hands the core the caller's scope
(``tenant_scope``: the tenant it may see, None for admins, the mesh and development mode) or, when it
creates something, the owner (``owner_tenant``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

import grpc
from maas.scheduler.v1 import scheduler_pb2 as pb
from maas.scheduler.v1 import scheduler_pb2_grpc

from services.scheduler.api import convert, tenant_convert
from services.scheduler.api import deployment_convert as dconvert
from services.scheduler.core.cluster import ClusterView
from services.scheduler.core.deployments.service import DeploymentService
from services.scheduler.core.jobs.model import Job
from services.scheduler.core.jobs.service import JobService
from services.scheduler.core.tenants import TenantService, tenant_not_found
from shared import names
from shared.errors import PermissionDenied
from shared.security.access import (
    Access,
    caller_owner,
    caller_scope,
    current_principal,
    owner_tenant,
    rules,
    tenant_scope,
)
from shared.tracing import current_traceparent

# Who may call what (shared.security.access). Endpoint addresses and load reports are the mesh's own.
AUTHORIZATION = rules(
    pb.DESCRIPTOR.services_by_name["SchedulerService"],
    {
        "SubmitTrainingJob": Access.DEVELOPER,
        "GetJob": Access.DEVELOPER,
        "ListJobs": Access.DEVELOPER,
        "CancelJob": Access.DEVELOPER,
        "WatchJob": Access.DEVELOPER,
        "CreateDeployment": Access.DEVELOPER,
        "GetDeployment": Access.DEVELOPER,
        "ListDeployments": Access.DEVELOPER,
        "UpdateDeployment": Access.DEVELOPER,
        "DeleteDeployment": Access.DEVELOPER,
        "WatchEndpoints": Access.INTERNAL,
        "ReportLoad": Access.INTERNAL,
        "CreateTenant": Access.ADMIN,
        "GetTenant": Access.DEVELOPER,
        "ListTenants": Access.DEVELOPER,
        "UpdateQuota": Access.ADMIN,
        "GetUsage": Access.DEVELOPER,
        # Every tenant's placements summed: an operator's view, not one tenant's.
        "GetCluster": Access.ADMIN,
        "WatchEvents": Access.DEVELOPER,
    },
)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(
        self, service: JobService, deployments: DeploymentService, tenants: TenantService, cluster: ClusterView
    ) -> None:
        self._service = service
        self._deployments = deployments
        self._tenants = tenants
        self._cluster = cluster

    async def SubmitTrainingJob(
        self, request: pb.SubmitTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitTrainingJobResponse:
        principal = current_principal.get()
        spec = convert.spec_from_pb(request.spec)
        # A tenant's key submits for its tenant whatever the request says; the mesh and admin keys (and
        # development mode) may name any tenant (admission fairness is per tenant), their own by default.
        tenant = tenant_scope(principal) or spec.tenant or owner_tenant(principal)
        if spec.priority and not spec.priority_class and principal is not None and not principal.is_admin:
            raise PermissionDenied(
                "setting spec.priority directly needs an admin key; name a priority class instead",
                reason="PRIORITY_NEEDS_ADMIN",
            )
        job = await self._service.submit(
            dataclasses.replace(spec, tenant=tenant), request.request_id, trace_context=current_traceparent()
        )
        return pb.SubmitTrainingJobResponse(job=convert.job_to_pb(job))

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.GetJobResponse:
        return pb.GetJobResponse(job=convert.job_to_pb(await self._service.get(request.id, caller_scope())))

    async def ListJobs(self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext) -> pb.ListJobsResponse:
        page = await self._service.list_jobs(
            request.page_size,
            request.page_token,
            convert.states_from_pb(list(request.states)),
            request.tenant,
            scope=caller_scope(),
        )
        return pb.ListJobsResponse(
            jobs=[convert.job_to_pb(j) for j in page.items], next_page_token=page.next_page_token
        )

    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext) -> pb.CancelJobResponse:
        return pb.CancelJobResponse(job=convert.job_to_pb(await self._service.cancel(request.id, caller_scope())))

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchJobResponse]:
        async with contextlib.aclosing(self._service.watch(request.id, caller_scope())) as events:
            async for event in events:
                if isinstance(event, Job):
                    yield pb.WatchJobResponse(job=convert.job_to_pb(event))
                else:
                    yield pb.WatchJobResponse(metrics=convert.metrics_to_pb(event))

    # Deployments -------------------------------------------------------------------------------------

    async def CreateDeployment(
        self, request: pb.CreateDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateDeploymentResponse:
        spec = dconvert.deployment_spec_from_pb(request.spec)
        deployment = await self._deployments.create(spec, caller_owner(), request.request_id)
        return pb.CreateDeploymentResponse(deployment=dconvert.deployment_to_pb(deployment))

    async def GetDeployment(
        self, request: pb.GetDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDeploymentResponse:
        deployment = await self._deployments.get(request.name, caller_scope())
        return pb.GetDeploymentResponse(deployment=dconvert.deployment_to_pb(deployment))

    async def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDeploymentsResponse:
        page = await self._deployments.list_deployments(request.page_size, request.page_token, caller_scope())
        return pb.ListDeploymentsResponse(
            deployments=[dconvert.deployment_to_pb(d) for d in page.items], next_page_token=page.next_page_token
        )

    async def UpdateDeployment(
        self, request: pb.UpdateDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateDeploymentResponse:
        deployment = await self._deployments.update(dconvert.deployment_spec_from_pb(request.spec), caller_scope())
        return pb.UpdateDeploymentResponse(deployment=dconvert.deployment_to_pb(deployment))

    async def DeleteDeployment(
        self, request: pb.DeleteDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteDeploymentResponse:
        await self._deployments.delete(request.name, caller_scope())
        return pb.DeleteDeploymentResponse()

    async def WatchEndpoints(
        self, request: pb.WatchEndpointsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchEndpointsResponse]:
        async with contextlib.aclosing(self._deployments.watch_endpoints(request.name)) as snapshots:
            async for snapshot in snapshots:
                yield pb.WatchEndpointsResponse(deployments=[dconvert.endpoints_to_pb(d) for d in snapshot])

    async def ReportLoad(
        self, request: pb.ReportLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportLoadResponse:
        await self._deployments.report_load(request.gateway_id, dict(request.ongoing))
        return pb.ReportLoadResponse()

    # Tenants ----------------------------------------------------------------------------------------------

    async def CreateTenant(
        self, request: pb.CreateTenantRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateTenantResponse:
        tenant = await self._tenants.create(tenant_convert.tenant_from_pb(request.tenant))
        return pb.CreateTenantResponse(tenant=tenant_convert.tenant_to_pb(tenant))

    async def GetTenant(self, request: pb.GetTenantRequest, context: grpc.aio.ServicerContext) -> pb.GetTenantResponse:
        tenant = self._tenants.get(request.name, caller_scope())
        return pb.GetTenantResponse(tenant=tenant_convert.tenant_to_pb(tenant))

    async def ListTenants(
        self, request: pb.ListTenantsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTenantsResponse:
        tenants = self._tenants.list(caller_scope())
        return pb.ListTenantsResponse(tenants=[tenant_convert.tenant_to_pb(t) for t in tenants])

    async def UpdateQuota(
        self, request: pb.UpdateQuotaRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateQuotaResponse:
        tenant = await self._tenants.update(tenant_convert.tenant_from_pb(request.tenant))
        return pb.UpdateQuotaResponse(tenant=tenant_convert.tenant_to_pb(tenant))

    async def GetUsage(self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext) -> pb.GetUsageResponse:
        scope = caller_scope()
        name = request.tenant or caller_owner()
        if scope is not None and name != scope:
            raise tenant_not_found(name)
        usage = await self._service.tenant_usage(names.check_name(name, "tenant"))
        return pb.GetUsageResponse(
            tenant=tenant_convert.tenant_to_pb(usage.tenant),
            used=tenant_convert.quota_to_pb(usage.used),
            queued_jobs=usage.queued_jobs,
            running_jobs=usage.running_jobs,
        )

    async def GetCluster(
        self, request: pb.GetClusterRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetClusterResponse:
        usage = await self._cluster.usage()
        return pb.GetClusterResponse(
            capacity=tenant_convert.quota_to_pb(usage.capacity),
            used=tenant_convert.quota_to_pb(usage.used),
            queued_jobs=usage.queued_jobs,
        )

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SchedulerEvent]:
        scope = caller_scope()
        if request.tenant:
            names.check_name(request.tenant, "tenant")
            if scope is not None and request.tenant != scope:
                return  # another tenant's events: none the caller may see
            scope = request.tenant
        async with contextlib.aclosing(self._service.events.watch(scope)) as events:
            async for event in events:
                yield tenant_convert.event_to_pb(event)
