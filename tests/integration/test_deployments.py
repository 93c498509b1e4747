"""Deployments on a real local Ray: real inference workers (``services.inference``) in ``ServiceHost``
actors, a real registry; a killed replica is replaced, a restarted scheduler re-attaches, delete cleans up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import ray
from inference import grpc_service_pb2 as kpb
from inference import grpc_service_pb2_grpc
from maas.scheduler.v1 import scheduler_pb2 as pb
from maas.scheduler.v1 import scheduler_pb2_grpc

from services.scheduler.main import RunningScheduler, start
from services.scheduler.settings import SchedulerSettings
from shared.grpc.channel import make_channel
from shared.settings import CommonSettings
from tests.support.artifacts import tiny_artifact

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(400),
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]


def no_runner() -> Any:
    raise AssertionError("no training job here")


def replica_actors(name: str) -> set[str]:
    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "maas" and a["name"].startswith(f"dep-{name}-")
    }


class Scheduler:
    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.running: RunningScheduler | None = None

    async def start(self) -> None:
        self.running = await start(self.settings, no_runner)
        self.channel = make_channel(f"127.0.0.1:{self.running.port}", CommonSettings())
        self.stub = scheduler_pb2_grpc.SchedulerServiceStub(self.channel)

    async def stop(self) -> None:
        assert self.running is not None
        await self.channel.close()
        await self.running.server.stop(1)
        self.running = None

    async def get(self, name: str) -> pb.Deployment:
        return (await self.stub.GetDeployment(pb.GetDeploymentRequest(name=name), timeout=30)).deployment

    async def wait(self, name: str, check: Callable[[pb.Deployment], bool], timeout: float = 120) -> pb.Deployment:
        deadline = time.monotonic() + timeout
        while True:
            d = await self.get(name)
            if check(d):
                return d
            assert time.monotonic() < deadline, f"timed out; last: {d}"
            await asyncio.sleep(0.2)


@pytest.fixture
async def scheduler(ray_local, registry, registry_client, tmp_path: Path) -> AsyncIterator[Scheduler]:  # type: ignore[no-untyped-def]
    path, manifest = tiny_artifact(tmp_path)
    await registry_client.upload_file("tiny", path, manifest)
    settings = SchedulerSettings(
        home=tmp_path / "home",
        scheduler_address="127.0.0.1:0",
        scheduler_metrics_address="127.0.0.1:0",
        scheduler_registry_address=f"127.0.0.1:{registry.port}",
        scheduler_max_running_jobs=0,
        scheduler_replica_default_cpus=0.5,
        scheduler_replica_health_interval_s=0.5,
        scheduler_replica_drain_delay_s=0.3,
        scheduler_replica_stop_grace_s=1,
        scheduler_replica_start_timeout_s=120,
        shutdown_grace_s=1,
    )
    s = Scheduler(settings)
    await s.start()
    yield s
    if s.running is not None:
        for name in ("tiny",):
            try:
                await s.stub.DeleteDeployment(pb.DeleteDeploymentRequest(name=name), timeout=60)
            except grpc.aio.AioRpcError:
                pass
        await s.stop()
    for name in replica_actors("tiny"):
        ray.kill(ray.get_actor(name, namespace="maas"), no_restart=True)


async def model_ready(address: str) -> bool:
    channel = make_channel(address, CommonSettings())
    try:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return (await stub.ModelReady(kpb.ModelReadyRequest(name="tiny", version="1"), timeout=10)).ready
    finally:
        await channel.close()


def ready(d: pb.Deployment) -> bool:
    return d.state == pb.DEPLOYMENT_READY and bool(d.replicas) and all(r.state == pb.REPLICA_READY for r in d.replicas)


async def test_deployment_lifecycle_on_ray(scheduler: Scheduler) -> None:
    spec = pb.DeploymentSpec(model="tiny")
    await scheduler.stub.CreateDeployment(pb.CreateDeploymentRequest(spec=spec), timeout=30)
    d = await scheduler.wait("tiny", ready)
    [replica] = d.replicas
    assert await model_ready(replica.address)
    assert replica_actors("tiny") == {replica.id}

    # A killed replica leaves the endpoints and is replaced.
    ray.kill(ray.get_actor(replica.id, namespace="maas"), no_restart=True)
    d = await scheduler.wait("tiny", lambda d: ready(d) and d.replicas[0].id != replica.id)
    [replacement] = d.replicas
    assert await model_ready(replacement.address)

    # A restarted scheduler re-attaches to the same actor.
    await scheduler.stop()
    await scheduler.start()
    d = await scheduler.wait("tiny", ready, timeout=30)
    assert [(r.id, r.address) for r in d.replicas] == [(replacement.id, replacement.address)]

    await scheduler.stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="tiny"), timeout=60)
    assert replica_actors("tiny") == set()
