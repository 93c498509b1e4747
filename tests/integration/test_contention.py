"""Contention on a real local Ray, through the public APIs: the registry, the scheduler (Ray runner and Ray
replica pool, its own defaults) and the gateway of ``tests.support.serving``.

The scheduler's pool is what it declares (``ray_num_cpus``: the local Ray's CPUs as the policy counts them,
``services/scheduler/adapters/capacity.py``), set small here so that the contention is real: a training job
and a deployment's replicas cannot all be placed, nor every tenant's jobs. Jobs are tiny (the digits MLP, 1
worker and 1 shard) so that each test stays within about a minute on 2 cores.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from maas.common.v1 import common_pb2
from maas.scheduler.v1 import scheduler_pb2 as spb

from tests.support.jobs import TINY_MLP, tiny_job_spec
from tests.support.serving import Load, ServingMesh, infer_request, ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
TERMINAL = {spb.SUCCEEDED, spb.FAILED, spb.CANCELLED}


@pytest.fixture
async def make_mesh(ray_local: None, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ServingMesh]]]:
    meshes: list[ServingMesh] = []

    async def build(**scheduler_settings: Any) -> ServingMesh:
        mesh = ServingMesh(tmp_path / f"mesh-{len(meshes)}")
        meshes.append(mesh)
        await mesh.start(
            scheduler_replica_health_interval_s=0.5,
            scheduler_replica_drain_delay_s=0.5,
            scheduler_replica_stop_grace_s=2.0,
            **scheduler_settings,
        )
        return mesh

    yield build
    for mesh in meshes:
        for job in (await mesh.scheduler.ListJobs(spb.ListJobsRequest(page_size=100))).jobs:
            if job.state not in TERMINAL:
                await mesh.scheduler.CancelJob(spb.CancelJobRequest(id=job.id), timeout=30)
        await mesh.stop()


async def submit(mesh: ServingMesh, target_model: str, **changes: Any) -> spb.Job:
    spec = tiny_job_spec(target_model, **changes)
    return (await mesh.scheduler.SubmitTrainingJob(spb.SubmitTrainingJobRequest(spec=spec), timeout=30)).job


async def wait_job(mesh: ServingMesh, job_id: str, until: Callable[[spb.Job], bool], timeout_s: float = 120) -> spb.Job:
    deadline = time.monotonic() + timeout_s
    while True:
        job = (await mesh.scheduler.GetJob(spb.GetJobRequest(id=job_id), timeout=10)).job
        if until(job) or job.state in TERMINAL:
            return job
        assert time.monotonic() < deadline, f"timed out; last: {job}"
        await asyncio.sleep(0.1)


def serving(d: spb.Deployment) -> list[str]:
    return [r.id for r in d.replicas if r.state == spb.REPLICA_READY]


async def test_a_deployment_keeps_its_minimum_while_a_training_job_takes_the_cores(
    make_mesh: Callable[..., Awaitable[ServingMesh]],
) -> None:
    # A pool of 3 CPUs: 2 replicas of 1 CPU leave 1; the job's gang (1 worker, 1 shard, 1 CPU each) needs 2.
    mesh = await make_mesh(ray_num_cpus=3, scheduler_max_running_jobs=1)
    await mesh.push("elastic", "mlp", TINY_MLP, seed=3)
    await mesh.deploy(
        model="elastic",
        min_replicas=1,
        max_replicas=2,
        resources=common_pb2.ResourceRequest(cpus=1),
        autoscaling=spb.AutoscalingConfig(target_ongoing_requests=1, upscale_delay_s=0.5, downscale_delay_s=600),
    )
    x = np.ones((1, 64), dtype=np.float32)
    load = Load(lambda _: mesh.gateway.ModelInfer(infer_request("elastic", x), timeout=60), concurrency=4)
    load.start()
    try:
        # The gateway's load scales it up to its maximum (and, with downscaling 10 minutes away, no lower).
        scaled = await mesh.wait_deployment("elastic", lambda d: len(serving(d)) == 2, timeout_s=120)
        one = common_pb2.ResourceRequest(cpus=1)
        urgent = await submit(mesh, "urgent-digits", priority=50, worker_resources=one, shard_resources=one)
        running = await wait_job(mesh, urgent.id, lambda j: j.state == spb.RUNNING)
        assert running.state in (spb.RUNNING, spb.SUCCEEDED), running.message
        # The replica above the minimum was drained for it; the minimum stayed and kept serving.
        kept = await mesh.wait_deployment("elastic", lambda d: len(d.replicas) == 1, timeout_s=60)
        assert f"replicas above the minimum preempted for job {urgent.id}" in kept.message, kept.message
        assert ready(kept) and serving(kept)[0] in serving(scaled)
        served_before = load.succeeded
        done = await wait_job(mesh, urgent.id, lambda j: False)
        assert done.state == spb.SUCCEEDED, done.message
        assert load.succeeded > served_before  # served while the job ran
    finally:
        await load.stop()
    assert load.failures == [], load.failures[:5]
    assert load.succeeded > 50


async def test_a_tenant_at_its_quota_waits_while_another_tenants_job_runs(
    make_mesh: Callable[..., Awaitable[ServingMesh]],
) -> None:
    # Room for three jobs in the pool: only team-a's quota (1 running job) holds its second back. Tenants are
    # named in the spec, as the mesh's services and admins may (development mode: every caller may).
    mesh = await make_mesh(ray_num_cpus=8, scheduler_max_running_jobs=3)
    events: list[spb.SchedulerEvent] = []

    async def follow() -> None:
        async for event in mesh.scheduler.WatchEvents(spb.WatchEventsRequest()):
            events.append(event)

    watcher = asyncio.create_task(follow())
    try:
        quota = spb.Tenant(name="team-a", quota=spb.Quota(jobs=1))
        await mesh.scheduler.CreateTenant(spb.CreateTenantRequest(tenant=quota), timeout=30)
        await asyncio.sleep(0.2)  # the watch is open before the first submission
        a1 = await submit(mesh, "quota-a1", tenant="team-a", epochs=2)
        a2 = await submit(mesh, "quota-a2", tenant="team-a")
        b1 = await submit(mesh, "quota-b1", tenant="team-b")

        await wait_job(mesh, b1.id, lambda j: j.state != spb.QUEUED, timeout_s=30)
        reason = "tenant 'team-a' is at its quota: 1 running jobs in use of 1 running jobs"
        waiting = await wait_job(mesh, a2.id, lambda j: reason in j.message, timeout_s=30)
        assert waiting.state == spb.QUEUED and reason in waiting.message, waiting
        queued = (await mesh.scheduler.ListJobs(spb.ListJobsRequest(states=[spb.QUEUED]), timeout=10)).jobs
        assert [(j.id, j.queue_position) for j in queued] == [(a2.id, 1)]
        usage = await mesh.scheduler.GetUsage(spb.GetUsageRequest(tenant="team-a"), timeout=10)
        assert (usage.used.jobs, usage.running_jobs, usage.queued_jobs) == (1, 1, 1), usage

        done = {job.id: await wait_job(mesh, job.id, lambda j: False) for job in (a1, a2, b1)}
        for job in done.values():
            assert job.state == spb.SUCCEEDED, (job.id, job.message)
    finally:
        watcher.cancel()

    seen = [(e.sequence, spb.SchedulerEventKind.Name(e.kind), e.job_id) for e in events]

    def first(job: spb.Job, kind: int) -> int:
        found = [e.sequence for e in events if e.job_id == job.id and e.kind == kind]
        assert len(found) == 1, seen  # one admission is one event (no job here loses a worker)
        return found[0]

    # b1, submitted after a2, ran first (no queue order held a2 back, its tenant's quota did); b1 was
    # admitted while a1 held team-a's one job, and a2 only once a1 had ended.
    assert first(b1, spb.JOB_ADMITTED) < first(a1, spb.JOB_SUCCEEDED) < first(a2, spb.JOB_ADMITTED)
    assert first(b1, spb.JOB_RUNNING) < first(a2, spb.JOB_ADMITTED)
    assert {e.tenant for e in events if e.job_id in (a1.id, a2.id)} == {"team-a"}
