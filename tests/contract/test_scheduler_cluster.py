"""``GetCluster`` through the scheduler's gRPC API: the pool's capacity and every tenant's placements summed
(who may call it: the authorization matrix in ``test_security``)."""

from __future__ import annotations

from maas.scheduler.v1 import scheduler_pb2 as pb

from tests.contract import test_scheduler_tenants as tenants_tests
from tests.contract.test_scheduler_jobs import Client, digits_spec, submit
from tests.contract.test_scheduler_tenants import job_state, tenant

# The fixtures of the tenants' tests: a scheduler whose runner holds every job RUNNING (no Ray).
settings, scheduler, client = tenants_tests.settings, tenants_tests.scheduler, tenants_tests.client


async def test_the_cluster_shows_capacity_and_every_tenants_placements(client: Client) -> None:
    empty = await client.call("GetCluster", pb.GetClusterRequest())
    # A local Ray of 8 CPUs (the fixture's ray_num_cpus), 10 jobs at once; GPUs and memory not limited.
    assert (empty.capacity.cpus, empty.capacity.jobs) == (8, 10)
    assert not empty.capacity.HasField("gpus") and not empty.capacity.HasField("memory_bytes")
    assert (empty.used.cpus, empty.used.jobs, empty.queued_jobs) == (0, 0, 0)

    # Each digits job's gang holds 3 CPUs: two tenants' jobs run, a third job does not fit the pool.
    await client.call("CreateTenant", pb.CreateTenantRequest(tenant=tenant("team-a", cpus=3)))
    a1 = await submit(client, digits_spec(tenant="team-a"))
    b1 = await submit(client, digits_spec(tenant="team-b"))
    for job in (a1, b1):
        await job_state(client, job.id, pb.RUNNING)
    b2 = await submit(client, digits_spec(tenant="team-b"))
    await job_state(client, b2.id, pb.QUEUED)
    busy = await client.call("GetCluster", pb.GetClusterRequest())
    assert (busy.used.cpus, busy.used.jobs, busy.queued_jobs) == (6, 2, 1)
    assert busy.capacity == empty.capacity

    await client.call("CancelJob", pb.CancelJobRequest(id=a1.id))
    await job_state(client, b2.id, pb.RUNNING)
    after = await client.call("GetCluster", pb.GetClusterRequest())
    assert (after.used.cpus, after.used.jobs, after.queued_jobs) == (6, 2, 0)
