"""Scheduler training jobs through the public gRPC API, on SQLite and PostgreSQL.

Admission is paused (``scheduler_max_running_jobs=0``), so jobs stay QUEUED and no runner (no Ray) is ever
created: the runner factory here fails the test if it is called.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from maas.common.v1 import common_pb2
from maas.paramserver.v1 import paramserver_pb2
from maas.scheduler.v1 import scheduler_pb2 as pb
from maas.scheduler.v1 import scheduler_pb2_grpc

from services.scheduler.adapters.sql.tables import MIGRATIONS, VERSION_TABLE, metadata
from services.scheduler.core.jobs.ports import JobRunner
from services.scheduler.main import RunningScheduler, start
from services.scheduler.settings import SchedulerSettings
from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from shared.grpc.channel import make_channel
from shared.grpc.status import from_rpc_error
from shared.sql import create_engine, migrate

SERVICE = pb.DESCRIPTOR.services_by_name["SchedulerService"]


def no_runner() -> JobRunner:
    raise AssertionError("admission is paused: the job runner must never be created")


class Client:
    """The generated stub, with failures as shared.errors exceptions."""

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
def settings(tmp_path: Path, database_url: str) -> SchedulerSettings:
    return SchedulerSettings(
        home=tmp_path / "home",
        scheduler_address="127.0.0.1:0",
        scheduler_metrics_address="127.0.0.1:0",
        scheduler_database_url=database_url,
        scheduler_data_root=tmp_path / "data",
        scheduler_max_running_jobs=0,
        shutdown_grace_s=0.5,
    )


@pytest.fixture
async def scheduler(settings: SchedulerSettings) -> AsyncIterator[RunningScheduler]:
    running = await start(settings, no_runner)
    yield running
    await running.server.stop(0.2)


@pytest.fixture
async def client(scheduler: RunningScheduler, settings: SchedulerSettings) -> AsyncIterator[Client]:
    c = Client(scheduler.port, settings)
    yield c
    await c.close()


def digits_spec(**fields: Any) -> pb.TrainingJobSpec:
    values: dict[str, Any] = {
        "architecture": "cnn",
        "dataset": pb.DatasetSpec(name="digits"),
        "optimizer": paramserver_pb2.OptimizerSpec(name="sgd", hyperparameters={"lr": 0.05, "momentum": 0.9}),
        "batch_size": 32,
        "epochs": 2,
        "workers": 2,
        "shards": 2,
        "consistency": "bsp",
        "codec": "none",
        "target_model": "digits-cnn",
        "worker_resources": common_pb2.ResourceRequest(cpus=1),
        "shard_resources": common_pb2.ResourceRequest(cpus=0.5),
        "seed": 7,
    }
    values.update(fields)
    return pb.TrainingJobSpec(**values)


async def submit(client: Client, spec: pb.TrainingJobSpec) -> pb.Job:
    return (await client.call("SubmitTrainingJob", pb.SubmitTrainingJobRequest(spec=spec))).job


async def test_submit_a_valid_job_queues_it(client: Client, scheduler: RunningScheduler) -> None:
    job = await submit(client, digits_spec())
    assert job.id.startswith("job-") and job.state == pb.QUEUED
    # digits: 1797 samples, 20% held out -> 1438 training samples; 719 per worker -> 22 batches of 32.
    assert job.total_steps == 2 * 22
    assert len(job.dataset_fingerprint) == 64
    # The stored spec is the normalised one.
    assert job.spec.tenant == "default" and job.spec.max_failures == 3
    assert job.spec.dataset.validation_fraction == pytest.approx(0.2)
    got = (await client.call("GetJob", pb.GetJobRequest(id=job.id))).job
    assert got == job
    assert not scheduler.service.runner_started


async def test_a_user_file_under_the_data_root_is_fingerprinted(client: Client, settings: SchedulerSettings) -> None:
    rng = np.random.default_rng(0)
    path = settings.data_root() / "blobs.npz"
    np.savez(path, x=rng.normal(size=(40, 4)).astype(np.float32), y=rng.integers(0, 3, size=40))
    spec = digits_spec(
        architecture="mlp",
        arguments_json='{"in_features": 4, "hidden": [8], "out_features": 3}',
        dataset=pb.DatasetSpec(name="file", options={"path": "blobs.npz"}, validation_fraction=0.25),
        workers=3,
        batch_size=4,
        epochs=1,
    )
    job = await submit(client, spec)
    assert job.dataset_fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    assert job.total_steps == (30 // 3) // 4


def _bad_npz(settings: SchedulerSettings) -> pb.TrainingJobSpec:
    np.savez(settings.data_root() / "bad.npz", features=np.zeros((10, 64), dtype=np.float32))
    return digits_spec(dataset=pb.DatasetSpec(name="file", options={"path": "bad.npz"}))


BAD_SPECS: dict[str, tuple[Any, str]] = {
    "unknown architecture": ({"architecture": "no-such-net"}, "spec.architecture"),
    "bad arguments": ({"arguments_json": '{"channels": "wide"}'}, "spec.arguments_json"),
    "arguments not json": ({"arguments_json": "{nope"}, "spec.arguments_json"),
    "unknown dataset": ({"dataset": pb.DatasetSpec(name="imagenet")}, "spec.dataset.name"),
    "zero workers": ({"workers": 0}, "spec.workers"),
    "more workers than samples": ({"workers": 5000}, "spec.workers"),
    "zero shards": ({"shards": 0}, "spec.shards"),
    "more shards than parameters": ({"shards": 1_000_000}, "spec.shards"),
    "negative learning rate": (
        {"optimizer": paramserver_pb2.OptimizerSpec(name="sgd", hyperparameters={"lr": -0.1})},
        "spec.optimizer.hyperparameters.lr",
    ),
    "unknown optimizer": ({"optimizer": paramserver_pb2.OptimizerSpec(name="lbfgs")}, "spec.optimizer.name"),
    "unknown codec": ({"codec": "zip"}, "spec.codec"),
    "bad codec option": ({"codec": "topk", "codec_options": {"ratio": 2.0}}, "spec.codec_options"),
    "bad consistency": ({"consistency": "eventual"}, "spec.consistency"),
    "ssp without staleness": ({"consistency": "ssp", "staleness": 0}, "spec.staleness"),
    "negative staleness": ({"consistency": "ssp", "staleness": -1}, "spec.staleness"),
    "zero batch size": ({"batch_size": 0}, "spec.batch_size"),
    "zero epochs": ({"epochs": 0}, "spec.epochs"),
    "negative checkpoint interval": ({"checkpoint_interval": -1}, "spec.checkpoint_interval"),
    "priority too high": ({"priority": 1001}, "spec.priority"),
    "bad tenant": ({"tenant": "Team A"}, "spec.tenant"),
    "bad target model": ({"target_model": "../models/x"}, "spec.target_model"),
    "no target model": ({"target_model": ""}, "spec.target_model"),
    "negative worker cpus": ({"worker_resources": common_pb2.ResourceRequest(cpus=-1)}, "spec.worker_resources.cpus"),
    "negative max failures": ({"max_failures": -1}, "spec.max_failures"),
    "dataset file outside the data root": (
        {"dataset": pb.DatasetSpec(name="file", options={"path": "../outside.npz"})},
        "spec.dataset.options.path",
    ),
    "dataset file with the wrong layout": (_bad_npz, "spec.dataset"),
}


async def test_bad_specs_are_invalid_argument_naming_the_field(client: Client, settings: SchedulerSettings) -> None:
    # One server for every case (a server per case would make this the slowest test file by far).
    wrong: dict[str, str] = {}
    for case, (change, field) in BAD_SPECS.items():
        spec = change(settings) if callable(change) else digits_spec(**change)
        try:
            await submit(client, spec)
        except InvalidArgument as exc:
            named = exc.violations[0].field if exc.violations else ""
            if not named.startswith(field) or field not in exc.message:
                wrong[case] = f"expected {field}, got {named}: {exc.message}"
        else:
            wrong[case] = "accepted"
    assert wrong == {}
    listed = await client.call("ListJobs", pb.ListJobsRequest())
    assert list(listed.jobs) == []


async def test_invalid_argument_status_through_the_raw_stub(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=digits_spec(workers=0)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.workers" in info.value.details()


async def test_get_unknown_job_is_not_found(client: Client) -> None:
    with pytest.raises(NotFound, match="job-0000"):
        await client.call("GetJob", pb.GetJobRequest(id="job-0000"))
    with pytest.raises(InvalidArgument, match="id"):
        await client.call("GetJob", pb.GetJobRequest(id="../etc"))


async def test_list_pages_newest_first_and_filters(client: Client) -> None:
    ids = [(await submit(client, digits_spec(tenant="a" if i % 2 else "b"))).id for i in range(5)]
    await client.call("CancelJob", pb.CancelJobRequest(id=ids[1]))
    seen, token = [], ""
    while True:
        reply = await client.call("ListJobs", pb.ListJobsRequest(page_size=2, page_token=token))
        assert len(reply.jobs) <= 2
        seen += [j.id for j in reply.jobs]
        token = reply.next_page_token
        if not token:
            break
    assert seen == ids[::-1]
    queued = await client.call("ListJobs", pb.ListJobsRequest(states=[pb.QUEUED]))
    assert [j.id for j in queued.jobs] == [ids[4], ids[3], ids[2], ids[0]]
    cancelled = await client.call("ListJobs", pb.ListJobsRequest(states=[pb.CANCELLED]))
    assert [j.id for j in cancelled.jobs] == [ids[1]]
    tenant_a = await client.call("ListJobs", pb.ListJobsRequest(tenant="a", states=[pb.QUEUED, pb.CANCELLED]))
    assert [j.id for j in tenant_a.jobs] == [ids[3], ids[1]]
    with pytest.raises(InvalidArgument, match="page_token"):
        await client.call("ListJobs", pb.ListJobsRequest(page_token="not-a-token"))
    first = await client.call("ListJobs", pb.ListJobsRequest(page_size=1))
    with pytest.raises(InvalidArgument, match="page_token"):
        await client.call("ListJobs", pb.ListJobsRequest(page_size=1, page_token=first.next_page_token, tenant="a"))
    with pytest.raises(InvalidArgument, match="states"):
        await client.call("ListJobs", pb.ListJobsRequest(states=[pb.JOB_STATE_UNSPECIFIED]))


async def test_cancel_queued_then_again(client: Client) -> None:
    job = await submit(client, digits_spec())
    cancelled = (await client.call("CancelJob", pb.CancelJobRequest(id=job.id))).job
    assert cancelled.state == pb.CANCELLED
    assert (await client.call("GetJob", pb.GetJobRequest(id=job.id))).job.state == pb.CANCELLED
    with pytest.raises(FailedPrecondition, match="CANCELLED"):
        await client.call("CancelJob", pb.CancelJobRequest(id=job.id))
    with pytest.raises(NotFound):
        await client.call("CancelJob", pb.CancelJobRequest(id="job-ffff"))


async def test_watch_sees_the_cancel_arrive(client: Client) -> None:
    job = await submit(client, digits_spec())
    stream = client.stub.WatchJob(pb.WatchJobRequest(id=job.id))
    first = await asyncio.wait_for(stream.read(), 10)
    assert first.job.id == job.id and first.job.state == pb.QUEUED
    await client.call("CancelJob", pb.CancelJobRequest(id=job.id))
    second = await asyncio.wait_for(stream.read(), 10)
    assert second.WhichOneof("event") == "job" and second.job.state == pb.CANCELLED
    assert await asyncio.wait_for(stream.read(), 10) == grpc.aio.EOF  # the stream ends with the job
    # Watching an ended job: the job, then the end.
    replies = [r async for r in client.stub.WatchJob(pb.WatchJobRequest(id=job.id))]
    assert [r.job.state for r in replies] == [pb.CANCELLED]


async def test_watch_unknown_job_is_not_found(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in client.stub.WatchJob(pb.WatchJobRequest(id="job-0bad")):
            pass
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_jobs_survive_a_restart(settings: SchedulerSettings) -> None:
    first = await start(settings, no_runner)
    c = Client(first.port, settings)
    try:
        queued = await submit(c, digits_spec(priority=5))
        cancelled = await submit(c, digits_spec())
        await c.call("CancelJob", pb.CancelJobRequest(id=cancelled.id))
    finally:
        await c.close()
        await first.server.stop(0.2)
    second = await start(settings, no_runner)
    c = Client(second.port, settings)
    try:
        again = (await c.call("GetJob", pb.GetJobRequest(id=queued.id))).job
        assert again == queued
        assert (await c.call("GetJob", pb.GetJobRequest(id=cancelled.id))).job.state == pb.CANCELLED
        listed = await c.call("ListJobs", pb.ListJobsRequest())
        assert [j.id for j in listed.jobs] == [cancelled.id, queued.id]
    finally:
        await c.close()
        await second.server.stop(0.2)


def test_migrations_match_the_tables(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        migrate(engine, MIGRATIONS)
        migrate(engine, MIGRATIONS)  # idempotent: a restart runs it again
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            diff = compare_metadata(context, metadata)
        assert diff == []
    finally:
        engine.dispose()


# -- idempotent submission (request_id) -------------------------------------------------------------------


async def submit_once(client: Client, spec: pb.TrainingJobSpec, request_id: str) -> pb.Job:
    request = pb.SubmitTrainingJobRequest(spec=spec, request_id=request_id)
    return (await client.call("SubmitTrainingJob", request)).job


async def test_a_retry_with_the_same_request_id_returns_the_original_job(client: Client) -> None:
    first = await submit_once(client, digits_spec(), "submit-7f3a")
    again = await submit_once(client, digits_spec(), "submit-7f3a")
    assert again.id == first.id and again == first
    # Fields the normaliser fills in may be sent explicitly: the same normalised spec is the same request.
    explicit = await submit_once(client, digits_spec(tenant="default", max_failures=3), "submit-7f3a")
    assert explicit.id == first.id
    listed = await client.call("ListJobs", pb.ListJobsRequest())
    assert [j.id for j in listed.jobs] == [first.id]
    # No request id: every submission is a new job.
    assert (await submit(client, digits_spec())).id != (await submit(client, digits_spec())).id


async def test_racing_retries_make_one_job(client: Client) -> None:
    jobs = await asyncio.gather(*(submit_once(client, digits_spec(), "racing-retries") for _ in range(10)))
    assert len({j.id for j in jobs}) == 1
    listed = await client.call("ListJobs", pb.ListJobsRequest())
    assert [j.id for j in listed.jobs] == [jobs[0].id]


async def test_a_request_id_reused_with_another_spec_is_refused(client: Client) -> None:
    first = await submit_once(client, digits_spec(), "reused")
    with pytest.raises(AlreadyExists) as caught:
        await submit_once(client, digits_spec(epochs=3, priority=2), "reused")
    assert caught.value.reason == "REQUEST_ID_REUSED"
    assert first.id in caught.value.message
    assert "spec.epochs" in caught.value.message and "spec.priority" in caught.value.message
    listed = await client.call("ListJobs", pb.ListJobsRequest())
    assert [j.id for j in listed.jobs] == [first.id]


async def test_tenants_use_request_ids_independently(client: Client) -> None:
    a = await submit_once(client, digits_spec(tenant="team-a"), "nightly-1")
    b = await submit_once(client, digits_spec(tenant="team-b", epochs=3), "nightly-1")
    assert a.id != b.id and (a.spec.tenant, b.spec.tenant) == ("team-a", "team-b")
    assert (await submit_once(client, digits_spec(tenant="team-b", epochs=3), "nightly-1")).id == b.id


@pytest.mark.parametrize("request_id", ["x" * 129, "tab\there", "caf\u00e9", "new\nline"])
async def test_a_bad_request_id_is_invalid(client: Client, request_id: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await submit_once(client, digits_spec(), request_id)
    assert caught.value.violations[0].field == "request_id"
    assert (await client.call("ListJobs", pb.ListJobsRequest())).jobs == []
