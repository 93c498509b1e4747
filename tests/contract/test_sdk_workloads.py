"""The SDK's jobs, deployments and inference against real servers on loopback: a scheduler whose job runner
reports steps without Ray, a scheduler with an in-process replica pool beside a real registry, and a real
gateway in front of small real worker servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import maas
import numpy as np
import pytest
import torch
from maas.scheduler.v1 import scheduler_pb2 as spb

from services.gateway.main import start as start_gateway
from services.gateway.settings import GatewaySettings
from services.scheduler.core.jobs.model import Job, StepMetrics
from services.scheduler.core.jobs.ports import JobReporter
from services.scheduler.main import RunningScheduler
from services.scheduler.main import start as start_scheduler
from services.scheduler.settings import SchedulerSettings
from shared.artifacts import Signature, TensorSpec
from tests.contract.test_gateway import LM_SIGNATURE, WorkerServer, deployment, served
from tests.contract.test_scheduler_deployments import LoopbackPool
from tests.contract.test_scheduler_jobs import digits_spec
from tests.support.artifacts import tiny_artifact
from tests.support.gateway import NoControl, RecordingLoadSink, SnapshotFeeder

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db.sqlite'}"


class SteppingRunner:
    """Runs a job as three reported steps, then succeeds with version 1 (no Ray)."""

    async def run(self, job: Job, reporter: JobReporter) -> None:
        await reporter.running(job.id)
        for step in range(3):
            await asyncio.sleep(0.05)
            await reporter.progress(job.id, StepMetrics(worker=0, step=step, loss=1.0 / (step + 1)))
        await reporter.succeeded(job.id, 1, {"accuracy": 0.9})

    async def resume(self, job: Job, reporter: JobReporter) -> None:
        await self.run(job, reporter)

    async def cancel(self, job_id: str) -> None:
        return None

    async def preempt(self, job: Job, grace_s: float) -> None:
        return None


def scheduler_settings(tmp_path: Path, **fields: Any) -> SchedulerSettings:
    return SchedulerSettings(
        home=tmp_path / "home",
        scheduler_address="127.0.0.1:0",
        scheduler_metrics_address="127.0.0.1:0",
        scheduler_database_url=f"sqlite:///{tmp_path / 'scheduler.db'}",
        scheduler_data_root=tmp_path / "data",
        ray_num_cpus=8,
        shutdown_grace_s=0.5,
        **fields,
    )


@pytest.fixture
async def job_scheduler(tmp_path: Path) -> AsyncIterator[RunningScheduler]:
    runner = SteppingRunner()
    running = await start_scheduler(scheduler_settings(tmp_path, scheduler_max_running_jobs=4), lambda: runner)
    yield running
    await running.server.stop(0.2)


def client_for(tmp_path: Path, **addresses: str) -> maas.AsyncClient:
    return maas.AsyncClient(settings=maas.ClientSettings(home=tmp_path / "client-home"), **addresses)


async def test_submit_watch_and_wait(job_scheduler: RunningScheduler, tmp_path: Path) -> None:
    async with client_for(tmp_path, scheduler_address=f"127.0.0.1:{job_scheduler.port}") as client:
        job = await client.jobs.submit(digits_spec())
        assert job.id.startswith("job-") and job.state in ("QUEUED", "PLACING", "RUNNING")
        events = [event async for event in job.watch()]
        steps = [e.metrics.step for e in events if e.metrics is not None]
        assert steps == [0, 1, 2]
        assert events[-1].done and events[-1].state == "SUCCEEDED"
        assert all(not e.done for e in events[:-1])
        final = await job.wait(timeout_s=10)  # an ended job: returns at once
        assert final.state == spb.SUCCEEDED and final.model_version == 1
        assert final.metrics["accuracy"] == pytest.approx(0.9)
        second = await client.jobs.submit(digits_spec(), request_id="same-request")
        again = await client.jobs.submit(digits_spec(), request_id="same-request")
        assert again.id == second.id, "a repeated request_id returns the job already made"
        assert (await second.wait(timeout_s=10)).state == spb.SUCCEEDED
        listed = await client.jobs.list(states=["succeeded"])
        assert {j.id for j in listed} == {job.id, second.id}
        with pytest.raises(maas.NotFound):
            await client.jobs.get("job-0000000000000000")
        with pytest.raises(maas.InvalidArgument):
            await client.jobs.submit(digits_spec(workers=0))


async def test_cancel_a_queued_job(tmp_path: Path) -> None:
    # Admission paused: the job stays QUEUED until it is cancelled, and no runner is ever made.
    running = await start_scheduler(scheduler_settings(tmp_path, scheduler_max_running_jobs=0), None)
    try:
        async with client_for(tmp_path, scheduler_address=f"127.0.0.1:{running.port}") as client:
            job = await client.jobs.submit(digits_spec())
            assert job.state == "QUEUED"
            waiting = asyncio.create_task(job.wait(timeout_s=10))
            assert (await job.cancel()).state == spb.CANCELLED
            assert (await waiting).state == spb.CANCELLED
            assert (await client.jobs.get(job.id)).state == "CANCELLED"
            with pytest.raises(TimeoutError):
                await (await client.jobs.submit(digits_spec())).wait(timeout_s=0.2)
    finally:
        await running.server.stop(0.2)


async def test_blocking_jobs_watch(job_scheduler: RunningScheduler, tmp_path: Path) -> None:
    def use() -> list[str]:
        settings = maas.ClientSettings(home=tmp_path / "client-home")
        with maas.Client(scheduler_address=f"127.0.0.1:{job_scheduler.port}", settings=settings) as client:
            job = client.jobs.submit(digits_spec())
            states = [event.state for event in job.watch() if event.metrics is None]
            assert job.wait().state == spb.SUCCEEDED
            return states

    states = await asyncio.to_thread(use)
    assert states[-1] == "SUCCEEDED"


async def test_deployments_create_wait_ready_update_delete(registry: Any, tmp_path: Path) -> None:
    pool = LoopbackPool()
    settings = scheduler_settings(
        tmp_path,
        scheduler_max_running_jobs=0,
        scheduler_registry_address=f"127.0.0.1:{registry.port}",
        scheduler_replica_default_cpus=0.5,
        scheduler_replica_health_interval_s=0.1,
        scheduler_replica_drain_delay_s=0.1,
        scheduler_replica_stop_grace_s=0.1,
    )
    running = await start_scheduler(settings, None, lambda: pool)
    try:
        async with client_for(
            tmp_path,
            registry_address=f"127.0.0.1:{registry.port}",
            scheduler_address=f"127.0.0.1:{running.port}",
        ) as client:
            for seed in (1, 2):
                path, _ = tiny_artifact(tmp_path, seed=seed)
                await client.models.push("mlp", path)
            created = await client.deployments.create(spb.DeploymentSpec(model="mlp", version="1", min_replicas=2))
            assert created.name == "mlp"
            ready = await client.deployments.wait_ready("mlp", timeout_s=20, poll_s=0.05)
            assert ready.state == spb.DEPLOYMENT_READY and ready.version == 1
            assert sum(r.state == spb.REPLICA_READY for r in ready.replicas) == 2
            assert [d.name for d in await client.deployments.list()] == ["mlp"]
            await client.deployments.update(spb.DeploymentSpec(model="mlp", version="2", min_replicas=2))
            rolled = await client.deployments.wait_ready("mlp", timeout_s=20, poll_s=0.05)
            assert rolled.version == 2
            with pytest.raises(maas.AlreadyExists):
                await client.deployments.create("mlp")
            with pytest.raises(maas.NotFound):
                await client.deployments.create("no-such-model")
            await client.deployments.delete("mlp")
            with pytest.raises(maas.NotFound):
                await client.deployments.get("mlp")
            pool.failing_versions.add(1)
            await client.deployments.create(spb.DeploymentSpec(model="mlp", version="1", name="broken"))
            with pytest.raises((maas.FailedPrecondition, maas.DeadlineExceeded)):
                await client.deployments.wait_ready("broken", timeout_s=2, poll_s=0.05)
    finally:
        await running.server.stop(0.2)
        await pool.close_all()


SINGLE = Signature(inputs=(TensorSpec("x", "FP32", (-1, 4)),), outputs=(TensorSpec("y", "FP32", (-1, 1)),))


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Any, list[WorkerServer]]]:
    workers = [await WorkerServer(f"w{i}").start() for i in range(2)]
    feeder = SnapshotFeeder(
        [
            deployment("m", workers[:1], versions={1: served(1, signature=SINGLE)}),
            deployment("lm", workers[1:], versions={1: served(1, signature=LM_SIGNATURE)}),
        ]
    )
    running = await start_gateway(
        GatewaySettings(
            home=tmp_path,
            gateway_address="127.0.0.1:0",
            gateway_metrics_address="127.0.0.1:0",
            shutdown_grace_s=0.5,
        ),
        endpoints=feeder,
        load_sink=RecordingLoadSink(),
        control=NoControl(),
    )
    yield running, workers
    await running.stop(0.5)
    for worker in workers:
        await worker.stop()


async def test_infer_takes_numpy_and_torch_and_returns_numpy(
    gateway: tuple[Any, list[WorkerServer]], tmp_path: Path
) -> None:
    running, workers = gateway
    async with client_for(tmp_path, gateway_address=f"127.0.0.1:{running.port}") as client:
        x = np.arange(8, dtype=np.float64).reshape(2, 4)  # cast to the declared FP32
        outputs = await client.infer("m", x)
        np.testing.assert_allclose(outputs["y"], [[7.0], [23.0]])  # row sums (the worker's model)
        assert outputs["y"].dtype == np.float32
        from_torch = await client.infer("m", {"x": torch.ones(3, 4)})
        np.testing.assert_allclose(from_torch["y"], [[5.0], [5.0], [5.0]])  # 4 + version 1
        assert workers[0].worker.calls == 2
        with pytest.raises(maas.InvalidArgument):
            await client.infer("m", {"nope": x})
        with pytest.raises(maas.NotFound):
            await client.infer("missing", x)
        pieces = [piece async for piece in client.generate("lm", "a", max_tokens=3)]
        assert "".join(pieces) == "bcd"  # the worker's tokens: the prompt's last byte + 1, + 2, + 3
        with pytest.raises(maas.NotFound) as missing:
            _ = [piece async for piece in client.generate("nothing", "a")]
        assert missing.value.request_id, "a failed stream reports its request id too"


async def test_blocking_infer_and_generate(gateway: tuple[Any, list[WorkerServer]], tmp_path: Path) -> None:
    running, _ = gateway

    def use() -> tuple[np.ndarray, str]:
        settings = maas.ClientSettings(home=tmp_path / "client-home")
        with maas.Client(gateway_address=f"127.0.0.1:{running.port}", settings=settings) as client:
            y = client.infer("m", torch.zeros(1, 4))["y"]
            return y, "".join(client.generate("lm", "x", max_tokens=2))

    y, text = await asyncio.to_thread(use)
    np.testing.assert_allclose(y, [[1.0]])
    assert text == "yz"
