"""Strays at start: JobService asks its runner to remove every gang no stored job accounts for, before it
resumes anything, when it creates the runner at start (some job is active) or when told to always
(``sweep_at_start``: a Ray cluster that outlives the scheduler); DeploymentService likewise stops replicas
of no stored deployment even when none is stored. Recording doubles of the JobRunner and ReplicaPool ports
over the real SQL stores on SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.scheduler.adapters.sql.deployment_repository import SqlDeploymentRepository
from services.scheduler.adapters.sql.repository import SqlJobRepository
from services.scheduler.adapters.sql.tables import MIGRATIONS
from services.scheduler.core.deployments.ports import FoundReplica
from services.scheduler.core.deployments.service import DeploymentService
from services.scheduler.core.jobs.model import Job, JobChanges, JobState
from services.scheduler.core.jobs.ports import JobReporter
from services.scheduler.core.jobs.service import JobService
from shared.sql import create_engine, migrate
from tests.unit.test_scheduler_admission import Factory, RecordingRunner, eventually, spec


class SweepingRunner(RecordingRunner):
    """Records every sweep (the ids it keeps) and every call, in order."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.sweeps: list[set[str]] = []
        self.calls: list[str] = []
        self.preempted: list[str] = []
        self.fail = fail

    async def sweep(self, keep: set[str]) -> list[str]:
        self.calls.append("sweep")
        self.sweeps.append(set(keep))
        if self.fail:
            raise RuntimeError("the cluster is unreachable")
        return ["job-0123456789abcdef-worker-0-0", "maas-job-0123456789abcdef"]

    async def resume(self, job: Job, reporter: JobReporter) -> None:
        self.calls.append(f"resume {job.id}")
        await super().resume(job, reporter)

    async def preempt(self, job: Job, grace_s: float) -> None:
        self.calls.append(f"preempt {job.id}")
        self.preempted.append(job.id)


@pytest.fixture
def repository(tmp_path: Path) -> Iterator[SqlJobRepository]:
    engine = create_engine(f"sqlite:///{tmp_path / 'scheduler.db'}")
    migrate(engine, MIGRATIONS)
    yield SqlJobRepository(engine)
    engine.dispose()


@pytest.fixture
def sweeping() -> SweepingRunner:
    return SweepingRunner()


def build(
    repository: SqlJobRepository, sweeper: SweepingRunner, tmp_path: Path, **options: Any
) -> tuple[JobService, Factory]:
    factory = Factory(sweeper)
    return JobService(repository, factory, data_root=tmp_path, admission_poll_s=0.2, **options), factory


async def stored_in_every_state(service: JobService, repository: SqlJobRepository) -> dict[JobState, str]:
    """One job per state, as a killed process may leave them (QUEUED stays as submitted)."""
    ids = {}
    for state in JobState:
        job = await service.submit(spec())
        if state is not JobState.QUEUED:
            repository.update(job.id, JobChanges(state=state))
        ids[state] = job.id
    return ids


async def test_without_active_jobs_a_start_sweeps_nothing_and_never_creates_the_runner(
    repository, tmp_path: Path, sweeping: SweepingRunner
) -> None:
    service, factory = build(repository, sweeping, tmp_path, max_running_jobs=0)
    try:
        await service.submit(spec())  # QUEUED: not placed, nothing on Ray to keep
        await service.start()
        assert factory.calls == 0 and sweeping.sweeps == [] and not service.runner_started
    finally:
        await service.close()


async def test_sweep_at_start_sweeps_even_with_nothing_active(
    repository, tmp_path: Path, sweeping: SweepingRunner
) -> None:
    service, factory = build(repository, sweeping, tmp_path, max_running_jobs=0, sweep_at_start=True)
    try:
        queued = await service.submit(spec())
        await service.start()
        # A QUEUED job holds nothing: its id is not kept (a gang of it can only be a stray).
        assert factory.calls == 1 and sweeping.sweeps == [set()]
        assert (await service.get(queued.id)).state is JobState.QUEUED
    finally:
        await service.close()


async def test_the_sweep_keeps_the_active_jobs_and_runs_before_anything_resumes(
    repository, tmp_path: Path, sweeping: SweepingRunner
) -> None:
    first, _ = build(repository, sweeping, tmp_path, max_running_jobs=0)
    ids = await stored_in_every_state(first, repository)
    # A new process over the same store (admission paused: only resuming and finishing preemptions).
    service, factory = build(repository, sweeping, tmp_path, max_running_jobs=0)
    try:
        await service.start()
        placing, running, preempted = ids[JobState.PLACING], ids[JobState.RUNNING], ids[JobState.PREEMPTED]
        assert factory.calls == 1 and sweeping.sweeps == [{placing, running, preempted}]
        await eventually(lambda: len(sweeping.calls) == 4)
        assert sweeping.calls[0] == "sweep"
        assert set(sweeping.calls[1:]) == {f"resume {placing}", f"resume {running}", f"preempt {preempted}"}
        await eventually(lambda: sweeping.preempted == [preempted])
        # The preemption the previous process began is finished: QUEUED again, counted once.
        await eventually(lambda: repository.get(preempted).state is JobState.QUEUED)
        assert repository.get(preempted).preemptions == 1
    finally:
        await service.close()


async def test_a_failed_sweep_is_logged_and_start_goes_on(repository, tmp_path: Path) -> None:
    failing = SweepingRunner(fail=True)
    first, _ = build(repository, failing, tmp_path, max_running_jobs=0)
    job = await first.submit(spec())
    repository.update(job.id, JobChanges(state=JobState.RUNNING))
    service, _ = build(repository, failing, tmp_path, max_running_jobs=0, sweep_at_start=True)
    try:
        await service.start()
        await eventually(lambda: failing.resumed == [job.id])
        assert failing.sweeps == [{job.id}]
    finally:
        await service.close()


class StrayPool:
    """A ReplicaPool double that a previous process left one replica in; records what is stopped."""

    def __init__(self) -> None:
        self.stopped: list[str] = []

    async def find(self) -> list[FoundReplica]:
        return [FoundReplica("dep-gone-g1-v1-0", "127.0.0.1:1")]

    async def stop(self, replica_id: str, grace_s: float) -> None:
        self.stopped.append(replica_id)


@pytest.mark.parametrize("sweep_at_start", [False, True])
async def test_deployments_stop_strays_with_none_stored_only_when_told(tmp_path: Path, sweep_at_start: bool) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'scheduler.db'}")
    migrate(engine, MIGRATIONS)
    pool, made = StrayPool(), []
    service = DeploymentService(
        SqlDeploymentRepository(engine),
        lambda: made.append(pool) or pool,  # type: ignore[func-returns-value]
        resolver=None,  # type: ignore[arg-type]
        sweep_at_start=sweep_at_start,
    )
    try:
        await service.start()
        # Without it no pool is made (a local Ray is not started for nothing); with it the stray goes.
        assert (made, pool.stopped) == (([pool], ["dep-gone-g1-v1-0"]) if sweep_at_start else ([], []))
    finally:
        await service.close()
        engine.dispose()
