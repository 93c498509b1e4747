"""``maas.training.v1.TrainingWorker``: the worker's status, progress stream and stop."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from maas.training.v1 import training_pb2 as pb
from maas.training.v1 import training_pb2_grpc

from services.training.core.loop import StepReport
from services.training.core.session import WorkerSession, WorkerStatus
from shared.security.access import Access, rules


def status_to_pb(status: WorkerStatus) -> pb.WorkerStatus:
    return pb.WorkerStatus(
        job_id=status.job_id,
        rank=status.rank,
        state=pb.WorkerState.Value(status.state.value),
        step=status.step,
        total_steps=status.total_steps,
        error=status.error,
        error_reason=status.error_reason,
        metrics=status.metrics,
        model_version=status.model_version,
    )


def progress_to_pb(report: StepReport) -> pb.Progress:
    return pb.Progress(
        rank=report.rank,
        step=report.step,
        loss=report.loss,
        samples_per_s=report.samples_per_s,
        bytes_sent=report.bytes_sent,
        bytes_received=report.bytes_received,
    )


# A rank is the mesh's alone: the scheduler follows and stops it.
AUTHORIZATION = rules(
    pb.DESCRIPTOR.services_by_name["TrainingWorker"],
    {m.name: Access.INTERNAL for m in pb.DESCRIPTOR.services_by_name["TrainingWorker"].methods},
)


class TrainingWorkerServicer(training_pb2_grpc.TrainingWorkerServicer):
    def __init__(self, session: WorkerSession) -> None:
        self._session = session

    async def GetWorkerStatus(
        self, request: pb.GetWorkerStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetWorkerStatusResponse:
        return pb.GetWorkerStatusResponse(status=status_to_pb(self._session.status))

    async def WatchWorker(
        self, request: pb.WatchWorkerRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchWorkerResponse]:
        async for event in self._session.watch():
            if isinstance(event, StepReport):
                yield pb.WatchWorkerResponse(progress=progress_to_pb(event))
            else:
                yield pb.WatchWorkerResponse(status=status_to_pb(event))

    async def StopWorker(
        self, request: pb.StopWorkerRequest, context: grpc.aio.ServicerContext
    ) -> pb.StopWorkerResponse:
        return pb.StopWorkerResponse(status=status_to_pb(await self._session.stop()))
