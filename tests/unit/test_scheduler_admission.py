"""JobService admission, reporting, cancelling and watching, with a recording runner (a test double of the
JobRunner port) over the real SQL job store on SQLite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.scheduler.adapters.sql.repository import SqlJobRepository
from services.scheduler.adapters.sql.tables import MIGRATIONS
from services.scheduler.core.jobs.model import (
    Job,
    JobChanges,
    JobState,
    OptimizerSpec,
    StepMetrics,
    TrainingJobSpec,
)
from services.scheduler.core.jobs.ports import JobReporter
from services.scheduler.core.jobs.service import JobService
from shared.datasets import DatasetSpec
from shared.errors import FailedPrecondition
from shared.sql import create_engine, migrate


def spec(priority: int = 0, tenant: str = "") -> TrainingJobSpec:
    return TrainingJobSpec(
        architecture="mlp",
        arguments_json='{"in_features": 64, "hidden": [8], "out_features": 10}',
        dataset=DatasetSpec(name="digits"),
        optimizer=OptimizerSpec(name="sgd", hyperparameters={"lr": 0.1}),
        batch_size=64,
        epochs=1,
        workers=2,
        shards=1,
        priority=priority,
        tenant=tenant,
        target_model="digits",
    )


class RecordingRunner:
    """Runs a job until the test releases it; then reports ``outcome`` (or nothing, after a cancel)."""

    def __init__(self) -> None:
        self.runs: list[str] = []
        self.resumed: list[str] = []
        self.cancelled: list[str] = []
        self.closed = False
        self._release: dict[str, asyncio.Event] = {}
        self.outcomes: dict[str, Callable[[Job, JobReporter], Any]] = {}

    def release(self, job_id: str) -> None:
        self._release.setdefault(job_id, asyncio.Event()).set()

    async def run(self, job: Job, reporter: JobReporter) -> None:
        self.runs.append(job.id)
        await self._drive(job, reporter)

    async def resume(self, job: Job, reporter: JobReporter) -> None:
        self.resumed.append(job.id)
        await self._drive(job, reporter)

    async def _drive(self, job: Job, reporter: JobReporter) -> None:
        await reporter.running(job.id)
        event = self._release.setdefault(job.id, asyncio.Event())
        await event.wait()
        event.clear()
        if job.id in self.cancelled:
            return
        outcome = self.outcomes.pop(job.id, None)
        if outcome is not None:
            await outcome(job, reporter)
        else:
            await reporter.succeeded(job.id, 7, {"accuracy": 0.9})

    async def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)
        self.release(job_id)

    async def close(self) -> None:
        self.closed = True


class Factory:
    def __init__(self, runner: RecordingRunner) -> None:
        self.runner = runner
        self.calls = 0

    def __call__(self) -> RecordingRunner:
        self.calls += 1
        return self.runner


class CountingRepository(SqlJobRepository):
    """The SQL store, counting progress writes (updates that change no state)."""

    progress_writes = 0

    def update(self, job_id: str, changes: JobChanges, only_from: frozenset[JobState] | None = None) -> Job | None:
        stored = super().update(job_id, changes, only_from)
        # Counted once the write has landed: a test that sees the count and then reads must see the row.
        if changes.state is None:
            self.progress_writes += 1
        return stored


@pytest.fixture
def repository(tmp_path: Path) -> Iterator[CountingRepository]:
    engine = create_engine(f"sqlite:///{tmp_path / 'scheduler.db'}")
    migrate(engine, MIGRATIONS)
    yield CountingRepository(engine)
    engine.dispose()


@pytest.fixture
def runner() -> RecordingRunner:
    return RecordingRunner()


@pytest.fixture
async def make(
    repository: CountingRepository, runner: RecordingRunner, tmp_path: Path
) -> AsyncIterator[Callable[..., tuple[JobService, Factory]]]:
    made: list[JobService] = []

    def build(**options: Any) -> tuple[JobService, Factory]:
        factory = Factory(runner)
        service = JobService(repository, factory, data_root=tmp_path, admission_poll_s=0.2, **options)
        made.append(service)
        return service, factory

    yield build
    for service in made:
        await service.close()


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def state(service: JobService, job_id: str) -> JobState:
    return (await service.get(job_id)).state


async def test_admission_by_priority_then_submission_order(make, runner: RecordingRunner) -> None:
    service, _ = make(max_running_jobs=1)
    low = await service.submit(spec(priority=0))
    high = await service.submit(spec(priority=10))
    mid = await service.submit(spec(priority=5))
    high2 = await service.submit(spec(priority=10))
    await service.start()
    expected = [high.id, high2.id, mid.id, low.id]
    for i, job_id in enumerate(expected):
        await eventually(lambda i=i: len(runner.runs) == i + 1)
        await asyncio.sleep(0.05)
        assert runner.runs == expected[: i + 1]  # one at a time
        runner.release(job_id)
        await eventually(lambda job_id=job_id: service._progress.get(job_id) is None)
    for job_id in expected:
        done = await service.get(job_id)
        assert done.state is JobState.SUCCEEDED and done.model_version == 7
        assert done.metrics["accuracy"] == 0.9 and done.step == done.total_steps


async def test_a_tenant_at_its_limit_does_not_hold_back_others(make, runner: RecordingRunner) -> None:
    service, _ = make(max_running_jobs=3, tenant_max_running=1)
    a1 = await service.submit(spec(priority=10, tenant="a"))
    a2 = await service.submit(spec(priority=10, tenant="a"))
    b1 = await service.submit(spec(tenant="b"))
    c1 = await service.submit(spec(tenant="c"))
    await service.start()
    await eventually(lambda: len(runner.runs) == 3)
    await asyncio.sleep(0.05)
    assert sorted(runner.runs) == sorted([a1.id, b1.id, c1.id])
    assert await state(service, a2.id) is JobState.QUEUED
    runner.release(a1.id)
    await eventually(lambda: len(runner.runs) == 4)
    assert runner.runs[-1] == a2.id


async def test_paused_admission_never_creates_the_runner(make) -> None:
    service, factory = make(max_running_jobs=0)
    job = await service.submit(spec())
    await service.start()
    await asyncio.sleep(0.3)
    assert factory.calls == 0 and not service.runner_started
    assert await state(service, job.id) is JobState.QUEUED
    cancelled = await service.cancel(job.id)
    assert cancelled.state is JobState.CANCELLED and factory.calls == 0


async def test_start_resumes_placed_and_running_jobs(make, repository, runner: RecordingRunner) -> None:
    service, _ = make(max_running_jobs=0)
    placing = await service.submit(spec())
    running = await service.submit(spec())
    queued = await service.submit(spec())
    repository.update(placing.id, JobChanges(state=JobState.PLACING))
    repository.update(running.id, JobChanges(state=JobState.RUNNING))
    # A new process over the same store (admission paused: only resuming happens).
    restarted, factory = make(max_running_jobs=0)
    await restarted.start()
    await eventually(lambda: len(runner.resumed) == 2)
    assert runner.resumed == [placing.id, running.id] and runner.runs == [] and factory.calls == 1
    runner.release(placing.id)
    await eventually(lambda: restarted._progress.get(placing.id) is None)
    assert await state(restarted, placing.id) is JobState.SUCCEEDED
    assert await state(restarted, queued.id) is JobState.QUEUED


async def test_cancel_a_running_job(make, runner: RecordingRunner) -> None:
    service, _ = make(max_running_jobs=1)
    job = await service.submit(spec())
    waiting = await service.submit(spec())
    await service.start()
    await eventually(lambda: runner.runs == [job.id])
    await eventually(lambda: service._started == {job.id})
    cancelled = await service.cancel(job.id)
    assert cancelled.state is JobState.CANCELLED and runner.cancelled == [job.id]
    # Late reports about an ended job change nothing.
    await service.failed(job.id, "too late")
    await service.running(job.id)
    after = await service.get(job.id)
    assert after.state is JobState.CANCELLED and after.message == "cancelled"
    with pytest.raises(FailedPrecondition):
        await service.cancel(job.id)
    # The slot is free again.
    await eventually(lambda: runner.runs == [job.id, waiting.id])


async def test_runner_errors_and_silent_returns_fail_the_job(make, runner: RecordingRunner) -> None:
    service, _ = make(max_running_jobs=1)
    broken = await service.submit(spec(priority=1))
    silent = await service.submit(spec())

    async def explode(job: Job, reporter: JobReporter) -> None:
        raise RuntimeError("ray is down: see /tmp/ray/session_x/logs/gcs_server.out\nTraceback (most recent...)")

    async def nothing(job: Job, reporter: JobReporter) -> None:
        return None

    runner.outcomes = {broken.id: explode, silent.id: nothing}
    await service.start()
    await eventually(lambda: runner.runs == [broken.id])
    runner.release(broken.id)
    await eventually(lambda: runner.runs == [broken.id, silent.id])
    failed = await service.get(broken.id)
    # The client sees a stable reason and an id for the log line, never this host's paths or stack text.
    assert failed.state is JobState.FAILED and "RuntimeError" in failed.message and "error_id=" in failed.message
    assert "/tmp" not in failed.message and "Traceback" not in failed.message
    runner.release(silent.id)
    await eventually(lambda: silent.id not in service._tasks)
    ended = await service.get(silent.id)
    assert ended.state is JobState.FAILED and "without reporting" in ended.message


async def test_a_requeued_job_runs_again(make, runner: RecordingRunner) -> None:
    service, _ = make(max_running_jobs=1)
    job = await service.submit(spec())

    async def requeue(job: Job, reporter: JobReporter) -> None:
        assert await reporter.failure(job.id, "shard 0 died") == 1
        await reporter.requeued(job.id, "placement timed out")

    runner.outcomes = {job.id: requeue}
    await service.start()
    await eventually(lambda: runner.runs == [job.id])
    runner.release(job.id)
    await eventually(lambda: runner.runs == [job.id, job.id])
    again = await service.get(job.id)
    assert again.failures == 1 and again.state in (JobState.PLACING, JobState.RUNNING)
    runner.release(job.id)
    await eventually(lambda: job.id not in service._tasks)
    assert await state(service, job.id) is JobState.SUCCEEDED


async def test_progress_is_stored_at_most_once_per_interval(make, repository, runner: RecordingRunner) -> None:
    service, _ = make(max_running_jobs=1, progress_interval_s=0.3)
    job = await service.submit(spec())
    await service.start()
    await eventually(lambda: service._started == {job.id})
    for step in range(50):
        for worker in (0, 1):
            await service.progress(job.id, StepMetrics(worker=worker, step=step, loss=1.0 + worker, samples_per_s=10))
    assert repository.progress_writes == 1  # the first one; the rest waits for the interval
    await eventually(lambda: repository.progress_writes == 2, timeout=2)
    stored = await service.get(job.id)
    assert stored.step == 50
    assert stored.metrics == {"loss": 1.5, "samples_per_s": 20.0, "bytes_per_step": 0.0, "push_bytes_per_step": 0.0}
    await asyncio.sleep(0.4)
    assert repository.progress_writes == 2  # nothing new: nothing written


async def test_watchers_get_every_state_but_slow_ones_lose_metrics(make, runner: RecordingRunner) -> None:
    service, _ = make(max_running_jobs=1, watch_queue_size=4)
    job = await service.submit(spec())
    events = service.watch(job.id)
    first = await anext(events)
    assert isinstance(first, Job) and first.state is JobState.QUEUED
    await service.start()
    await eventually(lambda: service._started == {job.id})
    for step in range(20):
        await service.progress(job.id, StepMetrics(worker=0, step=step, loss=0.5))
    runner.release(job.id)
    seen = [event async for event in events]
    states = [e.state for e in seen if isinstance(e, Job)]
    metrics = [e for e in seen if isinstance(e, StepMetrics)]
    assert states == [JobState.PLACING, JobState.RUNNING, JobState.SUCCEEDED]
    assert [m.step for m in metrics] == [0, 1, 2, 3]  # the rest was dropped for this slow watcher


async def test_close_leaves_running_jobs_for_the_next_start(make, runner: RecordingRunner) -> None:
    service, _ = make(max_running_jobs=1)
    job = await service.submit(spec())
    await service.start()
    await eventually(lambda: service._started == {job.id})
    await eventually(lambda: service._progress.get(job.id) is not None)
    await service.close()
    assert runner.closed
    assert await state(service, job.id) is JobState.RUNNING
    restarted, _ = make(max_running_jobs=1)
    await restarted.start()
    await eventually(lambda: runner.resumed == [job.id])
    runner.release(job.id)
    await eventually(lambda: job.id not in restarted._tasks)
    assert await state(restarted, job.id) is JobState.SUCCEEDED
