"""The real scheduler process SIGKILLed in the middle of its work, then started again over the same database.

The scheduler runs as its own process (``python -m services.scheduler``) on this session's Ray, joined by
address, so that Ray and every detached actor outlive the killed process, as on a cluster. It is killed
(no graceful stop) during admission (jobs PLACING), during a preemption (the victim stored PREEMPTED) and
during a deployment's scale-up (replicas starting). After the restart the stored state must be what was
asked for (every job there once, the preempted job QUEUED again, then resumed), no actor or placement group
may be left that no live job or replica accounts for, and every job must finish. Jobs are tiny (the digits
MLP, 1 worker, 1 shard) so that the file stays within a few minutes on 2 cores.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import ray
from maas.scheduler.v1 import scheduler_pb2 as pb
from maas.scheduler.v1 import scheduler_pb2_grpc

from shared.grpc.channel import make_channel
from shared.settings import CommonSettings
from tests.support.artifacts import tiny_artifact
from tests.support.jobs import tiny_job_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
# Every test on both stores: what a killed process leaves behind differs (SQLite's file lock and journal,
# PostgreSQL's server-side transactions and connections that outlive the client until noticed).
BOTH_STORES = pytest.mark.parametrize(
    "database_url", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
REPO = Path(__file__).resolve().parents[2]
TERMINAL = {pb.SUCCEEDED, pb.FAILED, pb.CANCELLED}
# What a killed scheduler leaves for the next one to find: a gang of a job no row accounts for.
STRAY_JOB = "job-5742a7005742a700"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SchedulerProcess:
    """``python -m services.scheduler`` over one database and this session's Ray; restartable."""

    def __init__(self, tmp: Path, database_url: str, registry_port: int, **settings: str) -> None:
        self.address = f"127.0.0.1:{_free_port()}"
        self.tmp = tmp
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "gen")]),
            "MAAS_INSECURE": "1",
            "MAAS_HOME": str(tmp / "home"),
            "MAAS_LOG_FORMAT": "json",
            "MAAS_LOG_LEVEL": "info",
            "MAAS_SCHEDULER_ADDRESS": self.address,
            "MAAS_SCHEDULER_METRICS_ADDRESS": "127.0.0.1:0",
            "MAAS_SCHEDULER_DATABASE_URL": database_url,
            "MAAS_SCHEDULER_REGISTRY_ADDRESS": f"127.0.0.1:{registry_port}",
            # Ray outlives the killed scheduler: the test session's, joined by address.
            "MAAS_RAY_ADDRESS": ray.get_runtime_context().gcs_address,
            "MAAS_SCHEDULER_REPLICA_DEFAULT_CPUS": "0.5",
            "MAAS_SCHEDULER_REPLICA_HEALTH_INTERVAL_S": "0.5",
            "MAAS_SCHEDULER_REPLICA_DRAIN_DELAY_S": "0.2",
            "MAAS_SCHEDULER_REPLICA_STOP_GRACE_S": "1",
            "MAAS_SHUTDOWN_GRACE_S": "1",
            **{f"MAAS_{key.upper()}": value for key, value in settings.items()},
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        self.runs += 1
        with (self.tmp / f"scheduler-{self.runs}.log").open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.scheduler"],
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # Polled while the process starts: gRPC's default reconnect backoff (1 s, growing 1.6x) would make
        # the test wait seconds after the server is ready.
        fast_reconnect = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
        self.channel = make_channel(self.address, CommonSettings(), options=fast_reconnect)
        self.stub = scheduler_pb2_grpc.SchedulerServiceStub(self.channel)
        deadline = time.monotonic() + 90
        while True:
            try:
                await self.stub.ListJobs(pb.ListJobsRequest(page_size=1), timeout=2)
                return
            except grpc.aio.AioRpcError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the scheduler did not serve (exit {self.process.poll()}):\n{self.log()}")
                await asyncio.sleep(0.2)

    def log(self) -> str:
        return (self.tmp / f"scheduler-{self.runs}.log").read_text(errors="replace")[-6000:]

    async def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is torn down, no transaction is finished."""
        assert self.process is not None and self.channel is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        await self.channel.close()
        self.channel = None

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    async def submit(self, target_model: str = "crash-digits", **changes: Any) -> pb.Job:
        spec = tiny_job_spec(target_model, **{"checkpoint_interval": 10, **changes})
        return (await self.stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=spec), timeout=30)).job

    async def job(self, job_id: str) -> pb.Job:
        return (await self.stub.GetJob(pb.GetJobRequest(id=job_id), timeout=10)).job

    async def jobs(self) -> list[pb.Job]:
        return list((await self.stub.ListJobs(pb.ListJobsRequest(page_size=100), timeout=10)).jobs)

    async def wait_job(self, job_id: str, until: Callable[[pb.Job], bool], timeout_s: float = 120) -> pb.Job:
        deadline = time.monotonic() + timeout_s
        while True:
            job = await self.job(job_id)
            if until(job) or job.state in TERMINAL:
                return job
            assert time.monotonic() < deadline, f"timed out; last: {job}\n{self.log()}"
            await asyncio.sleep(0.1)


@pytest.fixture
def scheduler_database_url(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> str:
    """The scheduler's own database, of the backend the registry's is."""
    if database_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'scheduler.db'}"
    return request.getfixturevalue("postgres").create_database(f"s_{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def make_scheduler(
    ray_local: None, registry: Any, scheduler_database_url: str, tmp_path: Path
) -> AsyncIterator[Callable[..., SchedulerProcess]]:
    made: list[SchedulerProcess] = []

    def build(**settings: str) -> SchedulerProcess:
        made.append(SchedulerProcess(tmp_path, scheduler_database_url, registry.port, **settings))
        return made[-1]

    yield build
    for scheduler in made:
        await scheduler.stop()
    # Whatever a failed test left must not hold the session's Ray for the next tests.
    for name in maas_actors():
        if name.startswith(("job-", "dep-crash")):
            ray.kill(ray.get_actor(name, namespace="maas"), no_restart=True)
    for name in job_groups():
        ray.util.remove_placement_group(ray.util.get_placement_group(name))


def maas_actors() -> set[str]:
    """Named actors alive in the ``maas`` namespace."""
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "maas"}


def job_groups() -> set[str]:
    """Placement groups of jobs that are not removed."""
    return {
        info["name"]
        for info in ray.util.placement_group_table().values()
        if info["name"].startswith("maas-job-") and info["state"] != "REMOVED"
    }


async def eventually(check: Callable[[], Any], timeout_s: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not reached in {timeout_s} s: {what}"
        await asyncio.sleep(0.2)


def leaked(live: set[str]) -> set[str]:
    """Job actors and placement groups of no job in ``live``."""
    actors = {n for n in maas_actors() if n.startswith("job-") and "-".join(n.split("-")[:2]) not in live}
    groups = {g for g in job_groups() if g.removeprefix("maas-") not in live}
    return actors | groups


def plant_stray() -> None:
    """A gang no row accounts for (as a scheduler killed while it tore a finished job down leaves one)."""
    group = ray.util.placement_group([{"CPU": 0.1}], name=f"maas-{STRAY_JOB}", lifetime="detached")
    ray.get(group.ready(), timeout=30)

    @ray.remote(num_cpus=0)
    class Stray:
        def ping(self) -> bool:
            return True

    actor = Stray.options(name=f"{STRAY_JOB}-worker-0-0", namespace="maas", lifetime="detached").remote()
    ray.get(actor.ping.remote(), timeout=30)


@BOTH_STORES
async def test_killed_during_admission(make_scheduler: Callable[..., SchedulerProcess]) -> None:
    scheduler = make_scheduler(scheduler_max_running_jobs="2")
    await scheduler.start()
    submitted = [await scheduler.submit(seed=seed) for seed in (1, 2)]
    ids = {job.id for job in submitted}
    # Right after the submissions, while admission places the gangs: a shard actor is there, the job's
    # workers are not (what a restarted scheduler cannot re-attach to).
    deadline = time.monotonic() + 30
    while not any(name.startswith(tuple(f"{i}-shard-" for i in ids)) for name in maas_actors()):
        assert time.monotonic() < deadline, scheduler.log()
        await asyncio.sleep(0.02)
    placing = [job for job in await scheduler.jobs() if job.state == pb.PLACING]
    await scheduler.kill()
    assert placing, "killed after admission, while placing"
    plant_stray()

    await scheduler.start()
    jobs = await scheduler.jobs()
    assert sorted(job.id for job in jobs) == sorted(ids)  # all there, none twice
    # The stray gang is gone at start; the actors left are those of the jobs placed or running.
    await eventually(lambda: not leaked({j.id for j in jobs if j.state in (pb.PLACING, pb.RUNNING)}), 10)
    done = [await scheduler.wait_job(job_id, lambda j: False) for job_id in sorted(ids)]
    for job in done:
        assert job.state == pb.SUCCEEDED, (job.id, job.message, scheduler.log())
    assert len({job.model_version for job in done}) == 2
    assert [job.id for job in await scheduler.jobs()].count(submitted[0].id) == 1
    await eventually(lambda: not leaked(set()), 30, "actors or placement groups of ended jobs")


@pytest.mark.parametrize(
    ("database_url", "torn"),
    [("sqlite", False), pytest.param("postgresql", True, marks=pytest.mark.postgres)],
    indirect=["database_url"],
)
async def test_killed_during_a_preemption(make_scheduler: Callable[..., SchedulerProcess], torn: bool) -> None:
    """Killed once the victim is stored PREEMPTED. ``torn``: as its gang's teardown began (the worker gone,
    the shard and the placement group left): the restart must remove what is left, not only a whole gang."""
    scheduler = make_scheduler(scheduler_max_running_jobs="1")
    await scheduler.start()
    # The low job runs long enough to be preempted (its steps are milliseconds).
    low = await scheduler.submit(priority_class="low", epochs=30)
    await scheduler.wait_job(low.id, lambda j: j.state == pb.RUNNING and j.step >= 20)
    urgent = await scheduler.submit(priority=50)
    async for event in scheduler.stub.WatchJob(pb.WatchJobRequest(id=low.id)):
        if event.HasField("job") and event.job.state == pb.PREEMPTED:
            await scheduler.kill()  # PREEMPTED stored, the preemption under way
            break
        assert not (event.HasField("job") and event.job.state in TERMINAL), event.job

    if torn:
        ray.kill(ray.get_actor(f"{low.id}-worker-0-0", namespace="maas"), no_restart=True)

    await scheduler.start()
    assert sorted(job.id for job in await scheduler.jobs()) == sorted([low.id, urgent.id])
    # The restart finishes the preemption: QUEUED again (counted once) while the urgent job runs, and
    # nothing of its gang left holding resources.
    requeued = await scheduler.wait_job(low.id, lambda j: j.state == pb.QUEUED and j.preemptions == 1, 60)
    assert requeued.state == pb.QUEUED, requeued
    await eventually(lambda: not any(low.id in name for name in maas_actors() | job_groups()), 10, "its gang")
    finished = await scheduler.wait_job(urgent.id, lambda j: False)
    assert finished.state == pb.SUCCEEDED, (finished.message, scheduler.log())
    resumed = await scheduler.wait_job(low.id, lambda j: False, 180)
    assert resumed.state == pb.SUCCEEDED, (resumed.message, scheduler.log())
    assert resumed.preemptions == 1
    assert sorted(job.id for job in await scheduler.jobs()) == sorted([low.id, urgent.id])
    await eventually(lambda: not leaked(set()), 30, "actors or placement groups of ended jobs")


@BOTH_STORES
async def test_killed_during_a_scale_up(
    make_scheduler: Callable[..., SchedulerProcess], registry_client, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    path, manifest = tiny_artifact(tmp_path)
    await registry_client.upload_file("crash-tiny", path, manifest)
    scheduler = make_scheduler(scheduler_max_running_jobs="0")
    await scheduler.start()
    spec = pb.DeploymentSpec(model="crash-tiny", min_replicas=1, max_replicas=2)
    await scheduler.stub.CreateDeployment(pb.CreateDeploymentRequest(spec=spec), timeout=30)

    async def deployment() -> pb.Deployment:
        return (await scheduler.stub.GetDeployment(pb.GetDeploymentRequest(name="crash-tiny"), timeout=30)).deployment

    def replicas() -> set[str]:
        return {name for name in maas_actors() if name.startswith("dep-crash-tiny-")}

    deadline = time.monotonic() + 120
    while (d := await deployment()).state != pb.DEPLOYMENT_READY:
        assert time.monotonic() < deadline, d
        await asyncio.sleep(0.2)
    spec.min_replicas = 2
    await scheduler.stub.UpdateDeployment(pb.UpdateDeploymentRequest(spec=spec), timeout=30)
    await eventually(lambda: len(replicas()) > 1, 30, "a replica starting")
    await scheduler.kill()

    await scheduler.start()
    deadline = time.monotonic() + 120
    while True:
        d = await deployment()
        if len(d.replicas) == 2 and all(r.state == pb.REPLICA_READY for r in d.replicas):
            break
        assert time.monotonic() < deadline, d
        await asyncio.sleep(0.2)
    assert d.spec.min_replicas == 2
    await eventually(lambda: replicas() == {r.id for r in d.replicas}, 30, "replicas of no deployment")
    await scheduler.stub.DeleteDeployment(pb.DeleteDeploymentRequest(name="crash-tiny"), timeout=60)
    await eventually(lambda: not replicas(), 30, "replicas of a deleted deployment")
