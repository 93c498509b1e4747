"""``maas.scheduler.v1.SchedulerService``: each RPC converts, awaits the core, converts back."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
from maas.scheduler.v1 import scheduler_pb2 as pb
from maas.scheduler.v1 import scheduler_pb2_grpc

from services.scheduler.api import convert
from services.scheduler.api import deployment_convert as dconvert
from services.scheduler.core.deployments import DeploymentService
from services.scheduler.core.model import Job
from services.scheduler.core.service import JobService
from shared.security.access import Access, rules

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
        job = await self._service.submit(convert.spec_from_pb(request.spec))
        return pb.SubmitTrainingJobResponse(job=convert.job_to_pb(job))

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.GetJobResponse:
        return pb.GetJobResponse(job=convert.job_to_pb(await self._service.get(request.id)))

    async def ListJobs(self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext) -> pb.ListJobsResponse:
        page = await self._service.list_jobs(
            request.page_size, request.page_token, convert.states_from_pb(list(request.states)), request.tenant
        )
        return pb.ListJobsResponse(
            jobs=[convert.job_to_pb(j) for j in page.items], next_page_token=page.next_page_token
        )

    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext) -> pb.CancelJobResponse:
        return pb.CancelJobResponse(job=convert.job_to_pb(await self._service.cancel(request.id)))

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchJobResponse]:
        async with contextlib.aclosing(self._service.watch(request.id)) as events:
            async for event in events:
                if isinstance(event, Job):
                    yield pb.WatchJobResponse(job=convert.job_to_pb(event))
                else:
                    yield pb.WatchJobResponse(metrics=convert.metrics_to_pb(event))

    # Deployments -------------------------------------------------------------------------------------

    async def CreateDeployment(
        self, request: pb.CreateDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateDeploymentResponse:
        deployment = await self._deployments.create(dconvert.deployment_spec_from_pb(request.spec))
        return pb.CreateDeploymentResponse(deployment=dconvert.deployment_to_pb(deployment))

    async def GetDeployment(
        self, request: pb.GetDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDeploymentResponse:
        deployment = await self._deployments.get(request.name)
        return pb.GetDeploymentResponse(deployment=dconvert.deployment_to_pb(deployment))

    async def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDeploymentsResponse:
        page = await self._deployments.list_deployments(request.page_size, request.page_token)
        return pb.ListDeploymentsResponse(
            deployments=[dconvert.deployment_to_pb(d) for d in page.items], next_page_token=page.next_page_token
        )

    async def UpdateDeployment(
        self, request: pb.UpdateDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateDeploymentResponse:
        deployment = await self._deployments.update(dconvert.deployment_spec_from_pb(request.spec))
        return pb.UpdateDeploymentResponse(deployment=dconvert.deployment_to_pb(deployment))

    async def DeleteDeployment(
        self, request: pb.DeleteDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteDeploymentResponse:
        await self._deployments.delete(request.name)
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
