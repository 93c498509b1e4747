"""``maas.scheduler.v1.SchedulerService``: each RPC converts, awaits the core, converts back."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
from maas.scheduler.v1 import scheduler_pb2 as pb
from maas.scheduler.v1 import scheduler_pb2_grpc

from services.scheduler.api import convert
from services.scheduler.core.model import Job
from services.scheduler.core.service import JobService


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, service: JobService) -> None:
        self._service = service

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
