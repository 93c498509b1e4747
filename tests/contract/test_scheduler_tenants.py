"""Tenants, quotas, usage and quota-aware admission through the scheduler's public gRPC API, on SQLite and
PostgreSQL. Jobs run on a runner that holds them RUNNING until cancelled (no Ray): placement is what the
policy decides, which is what is tested here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from maas.common.v1 import common_pb2
from maas.scheduler.v1 import scheduler_pb2 as pb

from services.scheduler.core.jobs.model import Job
from services.scheduler.core.jobs.ports import JobReporter
from services.scheduler.main import RunningScheduler, start
from services.scheduler.settings import SchedulerSettings
from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from tests.contract.test_scheduler_jobs import Client, digits_spec, submit


class HoldingRunner:
    """Places every job at once and keeps it RUNNING until it is cancelled."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.resumed: list[str] = []
        self.preempted: list[str] = []
        self._stops: dict[str, asyncio.Event] = {}

    async def run(self, job: Job, reporter: JobReporter) -> None:
        stop = self._stops.setdefault(job.id, asyncio.Event())
        self.running.add(job.id)
        await reporter.running(job.id)
        try:
            await stop.wait()
        finally:
            self.running.discard(job.id)

    async def resume(self, job: Job, reporter: JobReporter) -> None:
        self.resumed.append(job.id)
        await self.run(job, reporter)

    async def cancel(self, job_id: str) -> None:
        self._stops.setdefault(job_id, asyncio.Event()).set()

    async def preempt(self, job: Job, grace_s: float) -> None:
        self.preempted.append(job.id)
        self._stops.pop(job.id, asyncio.Event()).set()


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> SchedulerSettings:
    return SchedulerSettings(
        home=tmp_path / "home",
        scheduler_address="127.0.0.1:0",
        scheduler_metrics_address="127.0.0.1:0",
        scheduler_database_url=database_url,
        scheduler_data_root=tmp_path / "data",
        scheduler_max_running_jobs=10,
        ray_num_cpus=8,
        shutdown_grace_s=0.5,
    )


@pytest.fixture
async def scheduler(settings: SchedulerSettings) -> AsyncIterator[tuple[RunningScheduler, HoldingRunner]]:
    runner = HoldingRunner()
    running = await start(settings, lambda: runner)
    yield running, runner
    await running.server.stop(0.2)


@pytest.fixture
async def client(scheduler: Any, settings: SchedulerSettings) -> AsyncIterator[Client]:
    c = Client(scheduler[0].port, settings)
    yield c
    await c.close()


def tenant(
    name: str, cpus: float | None = None, borrow: float | None = None, classes: tuple[str, ...] = ()
) -> pb.Tenant:
    message = pb.Tenant(name=name, priority_classes=list(classes))
    if cpus is not None:
        message.quota.cpus = cpus
    if borrow is not None:
        message.borrowing_limit.cpus = borrow
    return message


async def job_state(client: Client, job_id: str, state: int, timeout: float = 10.0) -> pb.Job:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        job = (await client.call("GetJob", pb.GetJobRequest(id=job_id))).job
        if job.state == state:
            return job
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"job {job_id} is {pb.JobState.Name(job.state)}: {job.message}")
        await asyncio.sleep(0.05)


async def test_tenants_are_created_read_listed_and_updated(client: Client) -> None:
    created = (await client.call("CreateTenant", pb.CreateTenantRequest(tenant=tenant("team-a", cpus=4)))).tenant
    assert created.quota.cpus == 4 and not created.quota.HasField("gpus")  # unset: no limit
    assert not created.HasField("borrowing_limit") and created.create_time.seconds > 0
    with pytest.raises(AlreadyExists):
        await client.call("CreateTenant", pb.CreateTenantRequest(tenant=tenant("team-a")))
    updated = tenant("team-a", cpus=6, borrow=2, classes=("high",))
    got = (await client.call("UpdateQuota", pb.UpdateQuotaRequest(tenant=updated))).tenant
    assert (got.quota.cpus, got.borrowing_limit.cpus, list(got.priority_classes)) == (6, 2, ["high"])
    assert (await client.call("GetTenant", pb.GetTenantRequest(name="team-a"))).tenant == got
    await client.call("CreateTenant", pb.CreateTenantRequest(tenant=tenant("team-b")))
    listed = (await client.call("ListTenants", pb.ListTenantsRequest())).tenants
    assert [t.name for t in listed] == ["team-a", "team-b"]


async def test_bad_tenant_requests_are_refused_precisely(client: Client) -> None:
    with pytest.raises(InvalidArgument, match=r"tenant\.quota\.cpus: must be >= 0"):
        await client.call("CreateTenant", pb.CreateTenantRequest(tenant=tenant("neg", cpus=-1)))
    with pytest.raises(InvalidArgument, match="unknown classes"):
        await client.call("CreateTenant", pb.CreateTenantRequest(tenant=tenant("cls", classes=("platinum",))))
    with pytest.raises(InvalidArgument):
        await client.call("CreateTenant", pb.CreateTenantRequest(tenant=tenant("Not A Name")))
    with pytest.raises(NotFound):
        await client.call("GetTenant", pb.GetTenantRequest(name="nobody"))
    with pytest.raises(NotFound):
        await client.call("UpdateQuota", pb.UpdateQuotaRequest(tenant=tenant("nobody", cpus=1)))
    listed = (await client.call("ListTenants", pb.ListTenantsRequest())).tenants
    assert listed == []  # nothing half-written


async def test_a_tenant_at_quota_waits_while_another_tenants_job_runs(client: Client, scheduler: Any) -> None:
    # Each digits job's gang: 2 workers of 1 CPU and 2 shards of 0.5 CPU: 3 CPUs.
    await client.call("CreateTenant", pb.CreateTenantRequest(tenant=tenant("team-a", cpus=3)))
    a1 = await submit(client, digits_spec(tenant="team-a"))
    await job_state(client, a1.id, pb.RUNNING)
    a2 = await submit(client, digits_spec(tenant="team-a"))
    b1 = await submit(client, digits_spec(tenant="team-b"))
    await job_state(client, b1.id, pb.RUNNING)
    waiting = await job_state(client, a2.id, pb.QUEUED)
    await asyncio.sleep(0.3)  # another admission pass: still waiting
    waiting = await job_state(client, a2.id, pb.QUEUED)
    assert waiting.queue_position == 1
    assert "tenant 'team-a' is at its quota: 3 CPUs in use of 3 CPUs" in waiting.message
    listed = (await client.call("ListJobs", pb.ListJobsRequest(states=[pb.QUEUED]))).jobs
    assert [(j.id, j.queue_position) for j in listed] == [(a2.id, 1)]

    usage = await client.call("GetUsage", pb.GetUsageRequest(tenant="team-a"))
    assert (usage.used.cpus, usage.used.jobs, usage.running_jobs, usage.queued_jobs) == (3, 1, 1, 1)
    assert usage.tenant.quota.cpus == 3

    # Its running job ends: the waiting one is admitted.
    await client.call("CancelJob", pb.CancelJobRequest(id=a1.id))
    await job_state(client, a2.id, pb.RUNNING)


async def test_requests_that_could_never_run_are_refused_at_submission(client: Client) -> None:
    # The pool: 8 CPUs (the local Ray's ray_num_cpus).
    with pytest.raises(FailedPrecondition, match="needs 10 CPUs; the whole pool has 8 CPUs"):
        await submit(client, digits_spec(workers=9, shards=2, worker_resources=common_pb2.ResourceRequest(cpus=1)))
    await client.call("CreateTenant", pb.CreateTenantRequest(tenant=tenant("small", cpus=2, borrow=0.5)))
    with pytest.raises(FailedPrecondition, match=r"tenant 'small' may hold at most 2\.5 CPUs"):
        await submit(client, digits_spec(tenant="small"))
    assert (await client.call("ListJobs", pb.ListJobsRequest())).jobs == []


async def test_priority_classes_are_granted_per_tenant(client: Client) -> None:
    with pytest.raises(InvalidArgument, match="unknown priority class 'platinum'"):
        await submit(client, digits_spec(tenant="team-a", priority_class="platinum"))
    with pytest.raises(PermissionDenied, match="may not use priority class 'high'"):
        await submit(client, digits_spec(tenant="team-a", priority_class="high"))
    low = await submit(client, digits_spec(tenant="team-a", priority_class="low"))
    assert (low.spec.priority, low.spec.priority_class) == (-100, "low")
    await client.call("CreateTenant", pb.CreateTenantRequest(tenant=tenant("team-a", classes=("high",))))
    high = await submit(client, digits_spec(tenant="team-a", priority_class="high"))
    assert high.spec.priority == 100


async def test_a_higher_priority_job_preempts_a_lower_one_which_resumes_later(client: Client, scheduler: Any) -> None:
    runner: HoldingRunner = scheduler[1]
    events: list[pb.SchedulerEvent] = []
    watch = client.stub.WatchEvents(pb.WatchEventsRequest(tenant="team-b"))

    async def collect() -> None:
        async for event in watch:
            events.append(event)

    collecting = asyncio.create_task(collect())
    await asyncio.sleep(0.1)
    # The low job holds 6 of the pool's 8 CPUs; the urgent one needs 3.
    big = digits_spec(tenant="team-b", priority_class="low", workers=5)
    low = await submit(client, big)
    await job_state(client, low.id, pb.RUNNING)
    await client.call("CreateTenant", pb.CreateTenantRequest(tenant=tenant("team-a", classes=("high",))))
    urgent = await submit(client, digits_spec(tenant="team-a", priority_class="high"))
    await job_state(client, urgent.id, pb.RUNNING)
    requeued = await job_state(client, low.id, pb.QUEUED)
    assert runner.preempted == [low.id] and requeued.preemptions == 1
    assert f"preempted for job {urgent.id} (priority 100" in requeued.message
    assert "resumes from its checkpoint" in requeued.message
    # An equal-priority job is never preempted for another: it waits.
    await client.call("CreateTenant", pb.CreateTenantRequest(tenant=tenant("team-c", classes=("high",))))
    peer = await submit(client, digits_spec(tenant="team-c", priority_class="high", workers=5))
    await asyncio.sleep(0.3)
    assert (await job_state(client, peer.id, pb.QUEUED)).queue_position >= 1
    assert runner.preempted == [low.id]
    await client.call("CancelJob", pb.CancelJobRequest(id=peer.id))
    # The urgent job ends: the preempted one is admitted again, resumed from its checkpoint.
    await client.call("CancelJob", pb.CancelJobRequest(id=urgent.id))
    await job_state(client, low.id, pb.RUNNING)
    assert runner.resumed == [low.id]
    # The decisions, as team-b's watcher saw them (nothing of the other tenants).
    await asyncio.sleep(0.1)
    watch.cancel()
    await asyncio.gather(collecting, return_exceptions=True)
    kinds = [pb.SchedulerEventKind.Name(e.kind) for e in events]
    assert kinds == [
        "JOB_SUBMITTED",
        "JOB_ADMITTED",
        "JOB_RUNNING",
        "JOB_PREEMPTED",
        "JOB_REQUEUED",
        "JOB_ADMITTED",
        "JOB_RUNNING",
    ], kinds
    assert {e.job_id for e in events} == {low.id} and {e.tenant for e in events} == {"team-b"}
    assert f"preempted for job {urgent.id}" in events[3].reason
    assert [e.sequence for e in events] == sorted(e.sequence for e in events)
