"""WatchEvents as the Ray runner drives it: the runner reports ``placing`` when it starts placing a gang the core
has just admitted (stored PLACING already), then ``running`` (services/scheduler/adapters/ray_runner.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from maas.scheduler.v1 import scheduler_pb2 as pb

from services.scheduler.core.jobs.model import Job
from services.scheduler.core.jobs.ports import JobReporter
from services.scheduler.main import start
from services.scheduler.settings import SchedulerSettings
from tests.contract.test_scheduler_jobs import Client, digits_spec, submit
from tests.contract.test_scheduler_tenants import HoldingRunner


class PlacingRunner(HoldingRunner):
    """Reports ``placing`` before ``running``, as the Ray runner does for every gang it places."""

    async def run(self, job: Job, reporter: JobReporter) -> None:
        await reporter.placing(job.id)
        await super().run(job, reporter)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_one_admission_is_one_admitted_event(tmp_path: Path, database_url: str) -> None:
    settings = SchedulerSettings(
        home=tmp_path / "home",
        scheduler_address="127.0.0.1:0",
        scheduler_metrics_address="127.0.0.1:0",
        scheduler_database_url=database_url,
        scheduler_data_root=tmp_path / "data",
        shutdown_grace_s=0.5,
    )
    runner = PlacingRunner()
    running = await start(settings, lambda: runner)
    client = Client(running.port, settings)
    events: list[str] = []

    async def collect() -> None:
        async for event in client.stub.WatchEvents(pb.WatchEventsRequest()):
            events.append(pb.SchedulerEventKind.Name(event.kind))

    collecting = asyncio.create_task(collect())
    try:
        await asyncio.sleep(0.1)
        job = await submit(client, digits_spec())
        for _ in range(100):
            if "JOB_RUNNING" in events:
                break
            await asyncio.sleep(0.05)
        await client.call("CancelJob", pb.CancelJobRequest(id=job.id))
        await asyncio.sleep(0.1)
        assert events == ["JOB_SUBMITTED", "JOB_ADMITTED", "JOB_RUNNING", "JOB_CANCELLED"], events
    finally:
        collecting.cancel()
        await client.close()
        await running.server.stop(0.2)
