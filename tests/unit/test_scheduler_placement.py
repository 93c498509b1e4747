"""Placement timeouts: the core requeues a job whose gang could not be placed, and fails it after
``max_placement_attempts`` timeouts in a row, with a runner that reports timeouts (a test double of the
JobRunner port) over the real SQL job store on SQLite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.scheduler.adapters.sql.repository import SqlJobRepository
from services.scheduler.adapters.sql.tables import MIGRATIONS
from services.scheduler.core.jobs.model import Job, JobChanges, JobState
from services.scheduler.core.jobs.ports import JobReporter
from services.scheduler.core.jobs.service import JobService
from shared.sql import create_engine, migrate
from tests.unit.test_scheduler_admission import eventually, spec

SHORTAGE = "the cluster lacks 2 CPU (the gang needs 3, the cluster has 1 in all)"


class TimingOutRunner:
    """Each run plays the next scripted outcome: "timeout" (placement timed out) or "run" (placed, running
    until the test releases it, then succeeded)."""

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.runs: list[str] = []
        self.release = asyncio.Event()

    async def run(self, job: Job, reporter: JobReporter) -> None:
        self.runs.append(job.id)
        await reporter.placing(job.id)
        if self.script.pop(0) == "timeout":
            await reporter.placement_timed_out(job.id, 60.0, SHORTAGE)
            return
        await reporter.running(job.id)
        await self.release.wait()
        self.release.clear()
        await reporter.requeued(job.id, "preempted")  # back to the queue after having run

    async def resume(self, job: Job, reporter: JobReporter) -> None:
        await self.run(job, reporter)

    async def cancel(self, job_id: str) -> None:
        return None


@pytest.fixture
def repository(tmp_path: Path) -> Iterator[SqlJobRepository]:
    engine = create_engine(f"sqlite:///{tmp_path / 'scheduler.db'}")
    migrate(engine, MIGRATIONS)
    yield SqlJobRepository(engine)
    engine.dispose()


@pytest.fixture
async def make(repository: SqlJobRepository, tmp_path: Path) -> AsyncIterator[Callable[..., JobService]]:
    made: list[JobService] = []

    def build(runner: TimingOutRunner, **options: Any) -> JobService:
        service = JobService(repository, lambda: runner, data_root=tmp_path, admission_poll_s=0.05, **options)
        made.append(service)
        return service

    yield build
    for service in made:
        await service.close()


async def test_a_job_that_never_places_fails_after_the_attempts(make) -> None:
    runner = TimingOutRunner(["timeout"] * 3)
    service = make(runner, max_running_jobs=1, max_placement_attempts=3)
    job = await service.submit(spec())
    await service.start()
    await eventually(lambda: len(runner.runs) == 3)
    await eventually(lambda: job.id not in service._tasks)
    failed = await service.get(job.id)
    assert failed.state is JobState.FAILED and failed.placement_attempts == 3
    assert failed.message == f"could not place 1 shards and 2 workers within 60s, 3 times; {SHORTAGE}"
    await asyncio.sleep(0.2)
    assert len(runner.runs) == 3  # never admitted again


async def test_between_attempts_the_job_waits_in_the_queue_saying_why(make, repository) -> None:
    service = make(TimingOutRunner([]), max_running_jobs=0, max_placement_attempts=3)
    job = await service.submit(spec())
    repository.update(job.id, JobChanges(state=JobState.PLACING))  # admitted, as the admission loop does
    await service.placement_timed_out(job.id, 60.0, SHORTAGE)
    queued = await service.get(job.id)
    assert queued.state is JobState.QUEUED and queued.placement_attempts == 1
    assert queued.message == (
        f"could not place 1 shards and 2 workers within 60s (attempt 1 of 3); {SHORTAGE}; waiting for resources"
    )


async def test_running_resets_the_count(make, repository) -> None:
    # Two timeouts, then it runs (and goes back to the queue), then two more timeouts: never three in a row.
    runner = TimingOutRunner(["timeout", "timeout", "run", "timeout", "timeout", "run"])
    service = make(runner, max_running_jobs=1, max_placement_attempts=3)
    job = await service.submit(spec())
    await service.start()
    await eventually(lambda: len(runner.runs) == 3 and repository.get(job.id).state is JobState.RUNNING)
    assert repository.get(job.id).placement_attempts == 0
    runner.release.set()
    await eventually(lambda: len(runner.runs) == 6 and repository.get(job.id).state is JobState.RUNNING)
    assert repository.get(job.id).placement_attempts == 0


async def test_a_cancelled_job_ignores_a_late_timeout(make) -> None:
    runner = TimingOutRunner([])
    service = make(runner, max_running_jobs=0, max_placement_attempts=1)
    job = await service.submit(spec())
    await service.cancel(job.id)
    await service.placement_timed_out(job.id, 60.0, SHORTAGE)
    after = await service.get(job.id)
    assert after.state is JobState.CANCELLED and after.message == "cancelled"


def test_the_gang_names_what_the_cluster_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from services.scheduler.adapters.ray_gang import Gang

    job = Job(
        id="job-0123456789abcdef",
        spec=spec(),  # 1 shard (1 CPU, the default) and 2 workers (1 CPU each): 3 CPU
        state=JobState.PLACING,
        create_time=datetime.now(UTC),
        update_time=datetime.now(UTC),
    )
    gang = Gang(job)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 1.0})
    assert gang.shortage() == "the cluster lacks 1 CPU (the gang needs 3, the cluster has 2 in all)"
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    assert gang.shortage() == "the cluster lacks 2 CPU (the gang needs 3, 1 of 8 free)"
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 8.0})
    assert "enough in sum now" in gang.shortage()
