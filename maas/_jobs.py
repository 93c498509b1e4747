"""``client.jobs``: training jobs in the scheduler, and a handle to follow one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from maas._rpc import Connection
from maas.scheduler.v1 import scheduler_pb2 as pb

from shared.grpc.calls import new_request_id

TERMINAL = frozenset({pb.SUCCEEDED, pb.FAILED, pb.CANCELLED})


@dataclass(frozen=True)
class JobProgress:
    """One event of a watched job.

    Attributes:
        job: The job as last reported (state, step, metrics, queue position, message).
        metrics: A training step's figures (loss, samples/s, bytes sent); None for a change of the job's state.
    """

    job: pb.Job
    metrics: pb.StepMetrics | None = None

    @property
    def state(self) -> str:
        """The job's state by name (``QUEUED``, ``RUNNING``, ``SUCCEEDED``...)."""
        return pb.JobState.Name(self.job.state)

    @property
    def done(self) -> bool:
        """Whether the job has ended (succeeded, failed or been cancelled)."""
        return self.job.state in TERMINAL


class AsyncJob:
    """A handle to one training job."""

    def __init__(self, scheduler: Connection, job: pb.Job) -> None:
        self._scheduler = scheduler
        self.info = job

    @property
    def id(self) -> str:
        """The job's id (``job-...``)."""
        return self.info.id

    @property
    def state(self) -> str:
        """The state by name, as last seen (:meth:`refresh` asks again)."""
        return pb.JobState.Name(self.info.state)

    async def refresh(self) -> pb.Job:
        """Fetch the job again."""
        response: pb.GetJobResponse = await self._scheduler.call("GetJob", pb.GetJobRequest(id=self.id))
        self.info = response.job
        return self.info

    async def watch(self) -> AsyncIterator[JobProgress]:
        """The job's state changes and step metrics as they happen, until it ends (the last event's ``done``)."""
        events = self._scheduler.stream("WatchJob", pb.WatchJobRequest(id=self.id))
        try:
            async for event in events:
                if event.HasField("job"):
                    self.info = event.job
                    yield JobProgress(self.info)
                    if self.info.state in TERMINAL:
                        return
                else:
                    yield JobProgress(self.info, event.metrics)
        finally:
            await events.aclose()

    async def wait(self, timeout_s: float | None = None) -> pb.Job:
        """Wait until the job ends and return it (check ``state``: a failed job is returned, not raised).

        Raises:
            TimeoutError: ``timeout_s`` passed first.
        """
        async with asyncio.timeout(timeout_s):
            async for _ in self.watch():
                pass
        return self.info

    async def cancel(self) -> pb.Job:
        """Cancel the job (a no-op on an ended one)."""
        response: pb.CancelJobResponse = await self._scheduler.call("CancelJob", pb.CancelJobRequest(id=self.id))
        self.info = response.job
        return self.info


class AsyncJobs:
    """Training jobs: submit, get, list, cancel."""

    def __init__(self, scheduler: Connection) -> None:
        self._scheduler = scheduler

    async def submit(self, spec: pb.TrainingJobSpec, *, request_id: str | None = None) -> AsyncJob:
        """Submit a training job (validated now: bad input raises ``InvalidArgument`` before anything runs).

        The request carries ``request_id`` (a fresh one when None): the scheduler answers a repeated id with
        the job it already made, so the call is retried on UNAVAILABLE without risk of two jobs.
        """
        request = pb.SubmitTrainingJobRequest(spec=spec, request_id=request_id or new_request_id())
        response: pb.SubmitTrainingJobResponse = await self._scheduler.call("SubmitTrainingJob", request, safe=True)
        return AsyncJob(self._scheduler, response.job)

    async def get(self, job_id: str) -> AsyncJob:
        """A handle to an existing job."""
        response: pb.GetJobResponse = await self._scheduler.call("GetJob", pb.GetJobRequest(id=job_id))
        return AsyncJob(self._scheduler, response.job)

    async def list(
        self, *, states: list[str] | None = None, tenant: str = "", limit: int | None = None
    ) -> list[pb.Job]:
        """Jobs newest first: every one (all pages), or the ``limit`` newest; optionally only in ``states``
        (names, e.g. ``RUNNING``) or of ``tenant``."""
        wanted = [pb.JobState.Value(s.upper()) for s in states or ()]
        jobs: list[pb.Job] = []
        token = ""
        while limit is None or len(jobs) < limit:
            size = 0 if limit is None else min(limit - len(jobs), 1000)
            request = pb.ListJobsRequest(states=wanted, tenant=tenant, page_token=token, page_size=size)
            response: pb.ListJobsResponse = await self._scheduler.call("ListJobs", request)
            jobs.extend(response.jobs)
            token = response.next_page_token
            if not token:
                break
        return jobs if limit is None else jobs[:limit]

    async def cancel(self, job_id: str) -> pb.Job:
        """Cancel a job."""
        response: pb.CancelJobResponse = await self._scheduler.call("CancelJob", pb.CancelJobRequest(id=job_id))
        return response.job
