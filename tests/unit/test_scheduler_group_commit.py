"""Group commit (services.scheduler.core.group_commit) and the job store's batch insert it drives."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.scheduler.adapters.sql.repository import SqlJobRepository
from services.scheduler.adapters.sql.tables import MIGRATIONS
from services.scheduler.core.group_commit import GroupCommit
from services.scheduler.core.jobs.model import Job, JobState
from services.scheduler.core.jobs.service import new_job_id
from shared.sql import create_engine, migrate
from tests.unit.test_scheduler_admission import spec


@pytest.fixture
def repository(tmp_path: Path) -> Iterator[SqlJobRepository]:
    engine = create_engine(f"sqlite:///{tmp_path / 'scheduler.db'}")
    migrate(engine, MIGRATIONS)
    yield SqlJobRepository(engine)
    engine.dispose()


def job(tenant: str = "team-a", request_id: str = "") -> Job:
    now = datetime.now(UTC)
    return Job(
        id=new_job_id(),
        spec=spec(tenant=tenant),
        state=JobState.QUEUED,
        create_time=now,
        update_time=now,
        request_id=request_id,
    )


async def test_writes_arriving_during_a_commit_share_the_next_one() -> None:
    started, release = threading.Event(), threading.Event()
    batches: list[list[int]] = []

    def write(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        if len(batches) == 1:
            started.set()
            release.wait(5)
        return [item * 10 for item in items]

    group: GroupCommit[int, int] = GroupCommit(write)
    first = asyncio.create_task(group.submit(1))
    await asyncio.to_thread(started.wait, 5)  # the first write is committing: the next ones wait for it
    rest = [asyncio.create_task(group.submit(i)) for i in range(2, 7)]
    await asyncio.sleep(0.05)
    release.set()
    assert await first == 10 and await asyncio.gather(*rest) == [20, 30, 40, 50, 60]
    assert batches == [[1], [2, 3, 4, 5, 6]]  # a lone write went at once; the burst went together


async def test_every_caller_of_a_failed_batch_gets_the_error_and_later_writes_still_go() -> None:
    calls = 0

    def write(items: Sequence[str]) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("disk full")
        return list(items)

    group: GroupCommit[str, str] = GroupCommit(write)
    results = await asyncio.gather(group.submit("a"), group.submit("b"), return_exceptions=True)
    assert [type(r) for r in results] in ([OSError, OSError], [OSError, str])
    assert await group.submit("c") == "c"
    await group.close()


def test_a_batch_stores_each_job_once_and_returns_retries_as_the_original(repository: SqlJobRepository) -> None:
    earlier = repository.insert_many([job(request_id="r-0")])[0]
    assert not isinstance(earlier, Exception)
    fresh = job(request_id="r-1")
    batch = [
        fresh,
        job(request_id="r-1"),  # a retry racing within the same batch
        job(request_id="r-0"),  # a retry of a job stored before
        job(tenant="team-b", request_id="r-0"),  # another tenant's own id: a new job
        job(),  # no request id: always new
    ]
    results = repository.insert_many(batch)
    assert [created for _, created in results] == [True, False, False, True, True]  # type: ignore[misc]
    assert results[1][0].id == fresh.id and results[2][0].id == earlier[0].id  # type: ignore[index]
    stored = repository.in_states(frozenset({JobState.QUEUED}))
    assert len(stored) == 4 and {j.id for j in stored} == {earlier[0].id, fresh.id, batch[3].id, batch[4].id}
    assert repository.get(fresh.id) == results[0][0]  # type: ignore[index]


def test_an_id_collision_in_a_batch_falls_back_to_one_transaction_each(repository: SqlJobRepository) -> None:
    first = job(request_id="r-1")
    repository.insert_many([first])
    clash = replace(job(request_id="r-2"), id=first.id)  # the store refuses it; its batch-mates are still stored
    other = job(request_id="r-3")
    results = repository.insert_many([other, clash])
    assert results[0] == (other, True) and isinstance(results[1], Exception)
    assert repository.get(other.id).request_id == "r-3"
    assert repository.get(first.id).request_id == "r-1"  # the clash changed nothing


def test_the_queue_is_read_as_revisions_and_fetched_by_id(repository: SqlJobRepository) -> None:
    jobs = [job() for _ in range(3)]
    repository.insert_many(jobs)
    revisions = repository.revisions_in_states(frozenset({JobState.QUEUED}))
    assert [job_id for job_id, _ in revisions] == [j.id for j in jobs]  # oldest first
    assert {j.id for j in repository.get_many([jobs[2].id, jobs[0].id, "job-missing"])} == {jobs[0].id, jobs[2].id}


async def test_an_item_refused_by_the_store_fails_alone() -> None:
    def write(items: Sequence[int]) -> list[int | Exception]:
        return [ValueError(f"refused {i}") if i == 2 else i for i in items]

    group: GroupCommit[int, int] = GroupCommit(write)
    results = await asyncio.gather(*(group.submit(i) for i in (1, 2, 3)), return_exceptions=True)
    assert results[0] == 1 and results[2] == 3 and isinstance(results[1], ValueError)
