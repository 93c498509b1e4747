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

from services.scheduler.api import convert
from services.scheduler.api import deployment_convert as dconvert
from services.scheduler.core.deployments import DeploymentService
from services.scheduler.core.model import Job
from services.scheduler.core.service import JobService
from shared.security.access import (
    Access,
    caller_owner,
    caller_scope,
    current_principal,
    owner_tenant,
    rules,
    tenant_scope,
)

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
    },
)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, service: JobService, deployments: DeploymentService) -> None:
        self._service = service
        self._deployments = deployments

    async def SubmitTrainingJob(
        self, request: pb.SubmitTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitTrainingJobResponse:
        principal = current_principal.get()
        spec = convert.spec_from_pb(request.spec)
        # A tenant's key submits for its tenant whatever the request says; the mesh and admin keys (and
        # development mode) may name any tenant (admission fairness is per tenant), their own by default.
        tenant = tenant_scope(principal) or spec.tenant or owner_tenant(principal)
        job = await self._service.submit(dataclasses.replace(spec, tenant=tenant))
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
        deployment = await self._deployments.create(spec, caller_owner())
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
