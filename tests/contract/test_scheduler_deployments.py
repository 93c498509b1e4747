"""Deployments through the scheduler's gRPC API: a real scheduler server (SQLite and PostgreSQL), a real
registry, and an in-process replica pool whose replicas are real grpc.aio servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc
from maas.common.v1 import common_pb2
from maas.scheduler.v1 import scheduler_pb2 as pb
from maas.scheduler.v1 import scheduler_pb2_grpc

from services.scheduler.adapters.sql.deployment_repository import SqlDeploymentRepository
from services.scheduler.adapters.sql.tables import MIGRATIONS
from services.scheduler.core.deployments.model import (
    Batching,
    Deployment,
    DeploymentSpec,
    DeploymentState,
    ResolvedVersion,
)
from services.scheduler.core.deployments.ports import FoundReplica, ReplicaHealth, ReplicaSpec
from services.scheduler.core.jobs.model import ResourceRequest
from services.scheduler.main import RunningScheduler, start
from services.scheduler.settings import SchedulerSettings
from shared.artifacts import Signature, TensorSpec
from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from shared.grpc.channel import make_channel
from shared.grpc.status import from_rpc_error
from shared.sql import create_engine, migrate
from tests.support.artifacts import tiny_artifact

SERVICE = pb.DESCRIPTOR.services_by_name["SchedulerService"]
pytestmark = pytest.mark.timeout(120)


class LoopbackPool:
    """A ReplicaPool of small grpc.aio servers (health only) in this process; survives scheduler restarts."""

    def __init__(self, start_delay_s: float = 0.05) -> None:
        self.servers: dict[str, tuple[grpc.aio.Server, str]] = {}
        self.start_delay_s = start_delay_s
        self.started: list[ReplicaSpec] = []
        self.failing_versions: set[int] = set()

    async def start(self, spec: ReplicaSpec, timeout_s: float) -> str:
        await asyncio.sleep(self.start_delay_s)
        if spec.version in self.failing_versions:
            raise RuntimeError(f"cannot load version {spec.version}")
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        address = f"127.0.0.1:{port}"
        self.servers[spec.replica_id] = (server, address)
        self.started.append(spec)
        return address

    async def stop(self, replica_id: str, grace_s: float) -> None:
        entry = self.servers.pop(replica_id, None)
        if entry is not None:
            await entry[0].stop(grace_s)

    async def ping(self, replica_id: str, timeout_s: float) -> ReplicaHealth:
        return ReplicaHealth.OK if replica_id in self.servers else ReplicaHealth.DEAD

    async def find(self) -> list[FoundReplica]:
        return [FoundReplica(rid, address) for rid, (_, address) in self.servers.items()]

    async def kill(self, replica_id: str) -> None:
        await self.stop(replica_id, 0)

    async def close_all(self) -> None:
        for rid in list(self.servers):
            await self.stop(rid, 0)


class Client:
    def __init__(self, port: int, settings: SchedulerSettings) -> None:
        self.channel = make_channel(f"127.0.0.1:{port}", settings, [SERVICE])
        self.stub = scheduler_pb2_grpc.SchedulerServiceStub(self.channel)

    async def call(self, method: str, request: object) -> Any:
        try:
            return await getattr(self.stub, method)(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def close(self) -> None:
        await self.channel.close()


@pytest.fixture
async def models(registry_client: Any, tmp_path: Path) -> list[int]:
    """Registry model "mlp" with versions 1 and 2, alias "production" -> 1."""
    from maas.registry.v1 import registry_pb2 as rpb

    versions = []
    for seed in (1, 2):
        path, manifest = tiny_artifact(tmp_path, seed=seed)
        versions.append((await registry_client.upload_file("mlp", path, manifest)).number)
    await registry_client.call("SetAlias", rpb.SetAliasRequest(model="mlp", alias="production", version=versions[0]))
    return versions


@pytest.fixture
def settings(tmp_path: Path, database_url: str, registry: Any) -> SchedulerSettings:
    return SchedulerSettings(
        home=tmp_path / "home",
        scheduler_address="127.0.0.1:0",
        scheduler_metrics_address="127.0.0.1:0",
        scheduler_database_url=database_url,
        scheduler_registry_address=f"127.0.0.1:{registry.port}",
        scheduler_max_running_jobs=0,
        scheduler_replica_default_cpus=0.5,
        scheduler_replica_health_interval_s=0.1,
        scheduler_replica_drain_delay_s=0.3,
        scheduler_replica_stop_grace_s=0.2,
        scheduler_replica_start_timeout_s=10,
        shutdown_grace_s=0.5,
    )


@pytest.fixture
async def pool() -> AsyncIterator[LoopbackPool]:
    p = LoopbackPool()
    yield p
    await p.close_all()


def no_runner() -> Any:
    raise AssertionError("no training job in these tests")


@pytest.fixture
async def scheduler(settings: SchedulerSettings, pool: LoopbackPool) -> AsyncIterator[RunningScheduler]:
    running = await start(settings, no_runner, lambda: pool)
    yield running
    await running.server.stop(0.2)


@pytest.fixture
async def client(scheduler: RunningScheduler, settings: SchedulerSettings) -> AsyncIterator[Client]:
    c = Client(scheduler.port, settings)
    yield c
    await c.close()


async def wait_for(
    client: Client, name: str, check: Callable[[pb.Deployment], bool], timeout: float = 20
) -> pb.Deployment:
    deadline = time.monotonic() + timeout
    while True:
        d = (await client.call("GetDeployment", pb.GetDeploymentRequest(name=name))).deployment
        if check(d):
            return d
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; last: {d}")
        await asyncio.sleep(0.05)


def ready_replicas(d: pb.Deployment) -> list[pb.Replica]:
    return [r for r in d.replicas if r.state == pb.REPLICA_READY]


async def test_create_get_list_update_delete(client: Client, models: list[int], pool: LoopbackPool) -> None:
    spec = pb.DeploymentSpec(model="mlp", version="production", name="classifier", min_replicas=2)
    created = (await client.call("CreateDeployment", pb.CreateDeploymentRequest(spec=spec))).deployment
    assert created.name == "classifier" and created.version == models[0] and created.generation == 1
    assert created.state == pb.DEPLOYING and created.spec.resources.cpus == 0.5
    d = await wait_for(client, "classifier", lambda d: d.state == pb.DEPLOYMENT_READY)
    assert len(ready_replicas(d)) == 2 and all(r.address.startswith("127.0.0.1:") for r in d.replicas)
    assert d.target_replicas == 2

    other = pb.DeploymentSpec(model="mlp")  # name defaults to the model, version to the latest
    await client.call("CreateDeployment", pb.CreateDeploymentRequest(spec=other))
    listed = await client.call("ListDeployments", pb.ListDeploymentsRequest(page_size=1))
    assert [x.name for x in listed.deployments] == ["classifier"] and listed.next_page_token
    rest = await client.call(
        "ListDeployments", pb.ListDeploymentsRequest(page_size=1, page_token=listed.next_page_token)
    )
    assert [x.name for x in rest.deployments] == ["mlp"] and rest.deployments[0].version == models[1]

    # Replica counts apply in place: same generation of replicas, one more replica.
    spec.min_replicas = 3
    updated = (await client.call("UpdateDeployment", pb.UpdateDeploymentRequest(spec=spec))).deployment
    assert updated.generation == 2
    d = await wait_for(client, "classifier", lambda d: len(ready_replicas(d)) == 3 and d.state == pb.DEPLOYMENT_READY)
    assert all("-g1-" in r.id for r in d.replicas)

    await client.call("DeleteDeployment", pb.DeleteDeploymentRequest(name="classifier"))
    with pytest.raises(NotFound):
        await client.call("GetDeployment", pb.GetDeploymentRequest(name="classifier"))
    assert not [rid for rid in pool.servers if rid.startswith("dep-classifier-")]
    with pytest.raises(NotFound):
        await client.call("DeleteDeployment", pb.DeleteDeploymentRequest(name="classifier"))


async def test_errors(client: Client, models: list[int]) -> None:
    spec = pb.DeploymentSpec(model="mlp", version="1")
    await client.call("CreateDeployment", pb.CreateDeploymentRequest(spec=spec))
    with pytest.raises(AlreadyExists):
        await client.call("CreateDeployment", pb.CreateDeploymentRequest(spec=spec))
    with pytest.raises(NotFound):
        await client.call("CreateDeployment", pb.CreateDeploymentRequest(spec=pb.DeploymentSpec(model="nope")))
    with pytest.raises(NotFound):
        await client.call(
            "CreateDeployment", pb.CreateDeploymentRequest(spec=pb.DeploymentSpec(model="mlp", version="9", name="x"))
        )
    with pytest.raises(NotFound):
        await client.call(
            "UpdateDeployment", pb.UpdateDeploymentRequest(spec=pb.DeploymentSpec(model="mlp", name="ghost"))
        )
    bad = pb.DeploymentSpec(model="mlp", name="bad", min_replicas=3, max_replicas=1)
    bad.batching.max_batch_size = 4096
    with pytest.raises(InvalidArgument) as info:
        await client.call("CreateDeployment", pb.CreateDeploymentRequest(spec=bad))
    assert {v.field for v in info.value.violations} >= {"spec.max_replicas", "spec.batching.max_batch_size"}
    canary = pb.DeploymentSpec(
        model="mlp", name="c", version="1", canary=pb.Canary(version="production", weight_percent=10)
    )
    with pytest.raises(InvalidArgument):  # the alias resolves to the default version
        await client.call("CreateDeployment", pb.CreateDeploymentRequest(spec=canary))
    with pytest.raises(InvalidArgument):
        await client.call("ReportLoad", pb.ReportLoadRequest(gateway_id="", ongoing={"mlp": 1}))
    with pytest.raises(InvalidArgument):
        await client.call("ReportLoad", pb.ReportLoadRequest(gateway_id="g", ongoing={"mlp": float("inf")}))
    with pytest.raises(InvalidArgument):
        await client.call("ReportLoad", pb.ReportLoadRequest(gateway_id="g", ongoing={"mlp": -1}))


async def test_update_while_deleting_fails(client: Client, models: list[int], settings: SchedulerSettings) -> None:
    spec = pb.DeploymentSpec(model="mlp", version="1")
    await client.call("CreateDeployment", pb.CreateDeploymentRequest(spec=spec))
    await wait_for(client, "mlp", lambda d: d.state == pb.DEPLOYMENT_READY)
    deleting = asyncio.create_task(client.call("DeleteDeployment", pb.DeleteDeploymentRequest(name="mlp")))
    await wait_for(client, "mlp", lambda d: d.state == pb.DELETING)
    with pytest.raises(FailedPrecondition):
        await client.call("UpdateDeployment", pb.UpdateDeploymentRequest(spec=spec))
    await deleting


async def collect(client: Client, name: str, into: list[pb.WatchEndpointsResponse]) -> None:
    async for snapshot in client.stub.WatchEndpoints(pb.WatchEndpointsRequest(name=name)):
        into.append(snapshot)


async def test_rolling_update_never_leaves_a_gap(client: Client, models: list[int], pool: LoopbackPool) -> None:
    spec = pb.DeploymentSpec(model="mlp", version="1", min_replicas=2)
    await client.call("CreateDeployment", pb.CreateDeploymentRequest(spec=spec))
    await wait_for(client, "mlp", lambda d: d.state == pb.DEPLOYMENT_READY)
    snapshots: list[pb.WatchEndpointsResponse] = []
    watcher = asyncio.create_task(collect(client, "mlp", snapshots))
    try:
        pool.start_delay_s = 0.3
        spec.version = "2"
        spec.batching.max_batch_size = 8
        updated = (await client.call("UpdateDeployment", pb.UpdateDeploymentRequest(spec=spec))).deployment
        assert updated.version == models[1]
        await wait_for(
            client, "mlp", lambda d: d.state == pb.DEPLOYMENT_READY and {r.version for r in d.replicas} == {models[1]}
        )
        await asyncio.sleep(0.2)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    seen = [[(e.version, e.address) for e in s.deployments[0].endpoints] for s in snapshots if s.deployments]
    assert seen, "no snapshot"
    assert all(len(endpoints) >= 2 for endpoints in seen), seen  # never fewer than the 2 wanted
    mixed = [e for e in seen if {v for v, _ in e} == {models[0], models[1]}]
    assert mixed, "new endpoints should appear before old ones leave"
    assert {v for v, _ in seen[-1]} == {models[1]}
    last = snapshots[-1].deployments[0]
    assert last.default_version == models[1] and last.versions[-1].batching.max_batch_size == 8
    assert last.versions[-1].architecture == "mlp" and not last.versions[-1].streaming
    assert [t.name for t in last.versions[-1].signature.inputs]
    # Stopped only after leaving the endpoints.
    assert all(rid.startswith("dep-mlp-g2-") for rid in pool.servers)


async def test_canary_split_and_served_versions(client: Client, models: list[int]) -> None:
    spec = pb.DeploymentSpec(
        model="mlp", version="production", min_replicas=3, canary=pb.Canary(version="2", weight_percent=30)
    )
    await client.call("CreateDeployment", pb.CreateDeploymentRequest(spec=spec))
    d = await wait_for(client, "mlp", lambda d: d.state == pb.DEPLOYMENT_READY)
    assert d.canary_version == models[1]
    assert sorted(r.version for r in ready_replicas(d)) == [models[0], models[0], models[1]]
    stream = client.stub.WatchEndpoints(pb.WatchEndpointsRequest())
    first = await stream.read()
    stream.cancel()
    item = first.deployments[0]
    assert item.canary_weight_percent == 30 and item.canary_version == models[1]
    assert [v.version for v in item.versions] == models
    assert "production" in item.versions[0].aliases


async def test_report_load_scales_from_zero_and_back(client: Client, models: list[int]) -> None:
    spec = pb.DeploymentSpec(
        model="mlp",
        min_replicas=0,
        max_replicas=2,
        autoscaling=pb.AutoscalingConfig(target_ongoing_requests=1, upscale_delay_s=0.2, downscale_delay_s=0.5),
    )
    await client.call("CreateDeployment", pb.CreateDeploymentRequest(spec=spec))
    d = await wait_for(client, "mlp", lambda d: d.state == pb.DEPLOYMENT_READY)
    assert d.target_replicas == 0 and not d.replicas
    began = time.monotonic()
    await client.call("ReportLoad", pb.ReportLoadRequest(gateway_id="gw-1", ongoing={"mlp": 1}))
    await wait_for(client, "mlp", lambda d: len(ready_replicas(d)) == 1, timeout=5)
    assert time.monotonic() - began < 2.0  # from zero without the upscale delay
    for _ in range(10):  # demand for two replicas, sustained past the upscale delay
        await client.call("ReportLoad", pb.ReportLoadRequest(gateway_id="gw-1", ongoing={"mlp": 1.5}))
        await asyncio.sleep(0.1)
    await wait_for(client, "mlp", lambda d: len(ready_replicas(d)) == 2 and d.target_replicas == 2, timeout=5)
    await client.call("ReportLoad", pb.ReportLoadRequest(gateway_id="gw-1", ongoing={"mlp": 0}))
    d = await wait_for(client, "mlp", lambda d: not d.replicas and d.target_replicas == 0, timeout=10)
    assert d.state == pb.DEPLOYMENT_READY


async def test_lost_replica_is_replaced(client: Client, models: list[int], pool: LoopbackPool) -> None:
    await client.call("CreateDeployment", pb.CreateDeploymentRequest(spec=pb.DeploymentSpec(model="mlp")))
    d = await wait_for(client, "mlp", lambda d: d.state == pb.DEPLOYMENT_READY)
    lost = d.replicas[0].id
    await pool.kill(lost)
    # The replacement is published as soon as it is ready; the state follows on the reconciler's next pass.
    await wait_for(
        client,
        "mlp",
        lambda d: len(ready_replicas(d)) == 1 and d.replicas[0].id != lost and d.state == pb.DEPLOYMENT_READY,
    )


async def test_start_failures_are_retried_and_reported(client: Client, models: list[int], pool: LoopbackPool) -> None:
    pool.failing_versions.add(models[0])
    await client.call("CreateDeployment", pb.CreateDeploymentRequest(spec=pb.DeploymentSpec(model="mlp", version="1")))
    d = await wait_for(client, "mlp", lambda d: d.state == pb.DEPLOYMENT_FAILED)
    assert "cannot load version" in d.message
    pool.failing_versions.clear()
    await wait_for(client, "mlp", lambda d: d.state == pb.DEPLOYMENT_READY, timeout=10)


async def test_restarted_scheduler_reattaches(
    settings: SchedulerSettings, pool: LoopbackPool, models: list[int]
) -> None:
    first = await start(settings, no_runner, lambda: pool)
    client = Client(first.port, settings)
    try:
        await client.call(
            "CreateDeployment", pb.CreateDeploymentRequest(spec=pb.DeploymentSpec(model="mlp", min_replicas=2))
        )
        before = await wait_for(client, "mlp", lambda d: d.state == pb.DEPLOYMENT_READY)
    finally:
        await client.close()
        await first.server.stop(0.2)
    # A stray replica of a deployment that no longer exists.
    stray = ReplicaSpec("dep-gone-g1-v1-0", "gone", 1, Batching(), ResourceRequest())
    await pool.start(stray, 5)
    second = await start(settings, no_runner, lambda: pool)
    client = Client(second.port, settings)
    try:
        after = await wait_for(client, "mlp", lambda d: d.state == pb.DEPLOYMENT_READY)
        assert sorted((r.id, r.address) for r in after.replicas) == sorted((r.id, r.address) for r in before.replicas)
        assert "dep-gone-g1-v1-0" not in pool.servers
    finally:
        await client.close()
        await second.server.stop(0.2)


async def test_replicas_count_against_the_tenants_quota(client: Client, models: list[int]) -> None:
    quota = pb.Tenant(name="default", quota=pb.Quota(replicas=2))
    await client.call("CreateTenant", pb.CreateTenantRequest(tenant=quota))
    too_many = pb.DeploymentSpec(model="mlp", version="1", name="wide", min_replicas=3)
    with pytest.raises(FailedPrecondition, match="minimum replicas needs 3 replicas; tenant 'default' may hold"):
        await client.call("CreateDeployment", pb.CreateDeploymentRequest(spec=too_many))
    spec = pb.DeploymentSpec(model="mlp", version="1", name="fits", min_replicas=2)
    await client.call("CreateDeployment", pb.CreateDeploymentRequest(spec=spec))
    await wait_for(client, "fits", lambda d: d.state == pb.DEPLOYMENT_READY and len(ready_replicas(d)) == 2)
    usage = await client.call("GetUsage", pb.GetUsageRequest(tenant="default"))
    assert (usage.used.replicas, usage.used.cpus) == (2, 1.0)

    # Scaled beyond its quota, it keeps what it has and says why the rest waits.
    spec.min_replicas = 3
    await client.call("UpdateDeployment", pb.UpdateDeploymentRequest(spec=spec))
    held = await wait_for(client, "fits", lambda d: "waiting: tenant 'default' is at its quota" in d.message)
    assert "2 replicas in use of 2 replicas" in held.message and len(ready_replicas(held)) == 2
    quota.quota.replicas = 3
    await client.call("UpdateQuota", pb.UpdateQuotaRequest(tenant=quota))
    await wait_for(client, "fits", lambda d: len(ready_replicas(d)) == 3 and d.state == pb.DEPLOYMENT_READY)


# -- idempotent creation (request_id) ---------------------------------------------------------------------


async def create_once(client: Client, spec: pb.DeploymentSpec, request_id: str) -> pb.Deployment:
    request = pb.CreateDeploymentRequest(spec=spec, request_id=request_id)
    return (await client.call("CreateDeployment", request)).deployment


async def test_a_retry_with_the_same_request_id_returns_the_original_deployment(
    client: Client, models: list[int], pool: LoopbackPool
) -> None:
    spec = pb.DeploymentSpec(model="mlp", version="1", name="retried", min_replicas=2)
    first = await create_once(client, spec, "create-retried")
    again = await create_once(client, spec, "create-retried")
    assert again.name == first.name and again.create_time == first.create_time and again.generation == 1
    await wait_for(client, "retried", lambda d: d.state == pb.DEPLOYMENT_READY)
    # The normalised spec decides: the defaulted CPUs sent explicitly are the same request.
    spec.resources.cpus = 0.5
    assert (await create_once(client, spec, "create-retried")).create_time == first.create_time
    assert len([s for s in pool.started if s.replica_id.startswith("dep-retried-")]) == 2
    # Without a request id the name decides, as before.
    with pytest.raises(AlreadyExists) as caught:
        await client.call("CreateDeployment", pb.CreateDeploymentRequest(spec=spec))
    assert caught.value.reason == "DEPLOYMENT_EXISTS"


async def test_racing_creations_make_one_deployment(client: Client, models: list[int], pool: LoopbackPool) -> None:
    spec = pb.DeploymentSpec(model="mlp", version="1", name="raced")
    made = await asyncio.gather(*(create_once(client, spec, "create-raced") for _ in range(10)))
    assert {(d.name, d.create_time.ToNanoseconds()) for d in made} == {("raced", made[0].create_time.ToNanoseconds())}
    listed = await client.call("ListDeployments", pb.ListDeploymentsRequest())
    assert [d.name for d in listed.deployments] == ["raced"]
    await wait_for(client, "raced", lambda d: d.state == pb.DEPLOYMENT_READY)
    assert len([s for s in pool.started if s.replica_id.startswith("dep-raced-")]) == 1


async def test_a_request_id_reused_with_another_spec_is_refused(client: Client, models: list[int]) -> None:
    await create_once(client, pb.DeploymentSpec(model="mlp", version="1", name="first"), "create-x")
    with pytest.raises(AlreadyExists) as caught:
        await create_once(client, pb.DeploymentSpec(model="mlp", version="2", name="second"), "create-x")
    assert caught.value.reason == "REQUEST_ID_REUSED"
    assert "deployment first" in caught.value.message
    assert "spec.name" in caught.value.message and "spec.version" in caught.value.message
    listed = await client.call("ListDeployments", pb.ListDeploymentsRequest())
    assert [d.name for d in listed.deployments] == ["first"]
    with pytest.raises(InvalidArgument) as invalid:
        await create_once(client, pb.DeploymentSpec(model="mlp", name="third"), "\u00e9")
    assert invalid.value.violations[0].field == "request_id"


def test_tenants_use_deployment_request_ids_independently(database_url: str) -> None:
    """The store's unique index is per tenant (deployments of other tenants cannot be created through the
    API in development mode, where every caller is the tenant `default`)."""
    engine = create_engine(database_url)
    try:
        migrate(engine, MIGRATIONS)
        repo = SqlDeploymentRepository(engine)
        signature = Signature(inputs=(TensorSpec("x", "FP32", (-1, 4)),), outputs=(TensorSpec("y", "FP32", (-1, 1)),))
        resolved = ResolvedVersion(1, "mlp", signature)

        def deployment(name: str, tenant: str) -> Deployment:
            spec = DeploymentSpec(model="mlp", name=name)
            return Deployment(name, spec, DeploymentState.DEPLOYING, resolved, tenant=tenant, request_id="r-1")

        a, created_a = repo.insert_or_get(deployment("a-model", "team-a"))
        b, created_b = repo.insert_or_get(deployment("b-model", "team-b"))
        assert created_a and created_b and (a.request_id, b.request_id) == ("r-1", "r-1")
        again, created = repo.insert_or_get(deployment("a-model", "team-a"))
        assert not created and again.name == "a-model"
        assert repo.by_request_id("team-b", "r-1") == b and repo.by_request_id("team-c", "r-1") is None
    finally:
        engine.dispose()


async def test_replicas_above_the_minimum_are_preempted_for_a_higher_priority_job(
    settings: SchedulerSettings, pool: LoopbackPool, models: list[int]
) -> None:
    from services.scheduler.core.jobs.model import JobState
    from tests.contract.test_scheduler_jobs import digits_spec
    from tests.contract.test_scheduler_tenants import HoldingRunner

    # A pool of 4 CPUs; replicas of 1 CPU; the job's gang (1 worker, 1 shard) needs 2.
    settings = settings.model_copy(update={"scheduler_max_running_jobs": 4, "ray_num_cpus": 4})
    runner = HoldingRunner()
    running = await start(settings, lambda: runner, lambda: pool)
    client = Client(running.port, settings)
    try:
        spec = pb.DeploymentSpec(
            model="mlp",
            version="1",
            name="elastic",
            min_replicas=1,
            max_replicas=3,
            resources=common_pb2.ResourceRequest(cpus=1),
            autoscaling=pb.AutoscalingConfig(target_ongoing_requests=1, upscale_delay_s=0, downscale_delay_s=60),
        )
        await client.call("CreateDeployment", pb.CreateDeploymentRequest(spec=spec))
        await client.call("ReportLoad", pb.ReportLoadRequest(gateway_id="gw", ongoing={"elastic": 3}))
        await wait_for(client, "elastic", lambda d: len(ready_replicas(d)) == 3)
        one = common_pb2.ResourceRequest(cpus=1)
        job_spec = digits_spec(workers=1, shards=1, worker_resources=one, shard_resources=one)
        # At the default priority it waits: replicas rank as the default class, never preempted by an equal.
        equal = (await client.call("SubmitTrainingJob", pb.SubmitTrainingJobRequest(spec=job_spec))).job
        await asyncio.sleep(0.5)
        assert (await client.call("GetJob", pb.GetJobRequest(id=equal.id))).job.state == pb.QUEUED
        await client.call("CancelJob", pb.CancelJobRequest(id=equal.id))
        job_spec.priority = 50
        urgent = (await client.call("SubmitTrainingJob", pb.SubmitTrainingJobRequest(spec=job_spec))).job
        for _ in range(100):
            # The gateway still asks for 3: the cap holds while the job runs, and the minimum always stays.
            await client.call("ReportLoad", pb.ReportLoadRequest(gateway_id="gw", ongoing={"elastic": 3}))
            job = await running.service.get(urgent.id)
            if job.state is JobState.RUNNING:
                break
            await asyncio.sleep(0.1)
        assert job.state is JobState.RUNNING, job.message
        d = await wait_for(client, "elastic", lambda d: len(d.replicas) == 2)
        assert len(ready_replicas(d)) == 2 and "replicas above the minimum preempted for job" in d.message
    finally:
        await client.close()
        await running.server.stop(0.2)
