"""Tenants at the scheduler and the gateway, through their public gRPC APIs, in secure mode (TLS, API keys).

The tenant comes from the caller's key, never from a request field; another tenant's job, deployment or
model is NOT_FOUND in the very words of a missing one; admin keys see every tenant.

A real scheduler (admission paused: jobs stay QUEUED; deployments on a stand-in replica pool) and a real
gateway following the scheduler's endpoint stream, in front of a stand-in worker (in process). The registry
is a stand-in too: it holds one model per tenant and answers as the tenant a call acts for (``maas-tenant``),
so the tests see that the scheduler and a training rank act for the right tenant.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from inference import grpc_service_pb2 as kpb
from inference import grpc_service_pb2_grpc
from maas.common.v1 import common_pb2
from maas.paramserver.v1 import paramserver_pb2
from maas.registry.v1 import registry_pb2 as rpb
from maas.registry.v1 import registry_pb2_grpc
from maas.scheduler.v1 import scheduler_pb2 as spb
from maas.scheduler.v1 import scheduler_pb2_grpc

from services.gateway.core.statistics import VersionStats
from services.scheduler.adapters.sql.deployment_repository import SqlDeploymentRepository
from services.scheduler.adapters.sql.tables import MIGRATIONS
from services.scheduler.core.deployments.model import DeploymentSpec, ResolvedVersion
from services.scheduler.core.deployments.ports import FoundReplica, ReplicaHealth, ReplicaSpec
from shared.artifacts import Signature, TensorSpec
from shared.kserve.convert import signature_to_pb
from shared.security.access import TENANT_METADATA
from shared.security.keys import KeyStore, Role
from shared.security.pki import MeshPki, init_pki
from shared.sql import create_engine, migrate
from tests.support.migrations import upgrade_to

pytestmark = pytest.mark.timeout(120)
INTERNAL_TOKEN = "internal-token-for-the-tenant-tests-0123456789"
SIGNATURE = Signature(inputs=(TensorSpec("x", "FP32", (-1, 4)),), outputs=(TensorSpec("y", "FP32", (-1, 1)),))
# The stand-in registry's models and their tenants.
MODELS = {"model-a": "a", "model-b": "b"}


# -- stand-ins --------------------------------------------------------------------------------------------


class StandInRegistry(registry_pb2_grpc.RegistryServiceServicer):
    """GetVersion, ListModels and UploadVersion of a registry that answers as the tenant a call acts for
    (``maas-tenant``; none: every tenant), recording (rpc, model, tenant) of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None]] = []

    def _tenant(self, context: grpc.aio.ServicerContext, rpc: str, model: str) -> str | None:
        metadata = dict(context.invocation_metadata() or ())
        tenant = metadata.get(TENANT_METADATA)
        # Only the mesh calls here, with its internal token.
        assert metadata.get("authorization") == f"Bearer {INTERNAL_TOKEN}", metadata
        self.calls.append((rpc, model, tenant if isinstance(tenant, str) else None))
        return tenant if isinstance(tenant, str) else None

    async def GetVersion(self, request: rpb.GetVersionRequest, context: grpc.aio.ServicerContext) -> Any:
        tenant = self._tenant(context, "GetVersion", request.ref.model)
        if MODELS.get(request.ref.model) is None or tenant not in (None, MODELS[request.ref.model]):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.ref.model!r} not found")
        version = rpb.Version(
            model=request.ref.model, number=1, architecture="mlp", signature=signature_to_pb(SIGNATURE)
        )
        return rpb.GetVersionResponse(version=version)

    async def ListModels(self, request: rpb.ListModelsRequest, context: grpc.aio.ServicerContext) -> Any:
        tenant = self._tenant(context, "ListModels", "")
        models = [rpb.Model(name=name) for name, owner in sorted(MODELS.items()) if tenant in (None, owner)]
        return rpb.ListModelsResponse(models=models)

    async def UploadVersion(self, requests: AsyncIterator[rpb.UploadVersionRequest], context: Any) -> Any:
        model = ""
        async for message in requests:
            if message.HasField("metadata"):
                model = message.metadata.model
        self._tenant(context, "UploadVersion", model)
        return rpb.UploadVersionResponse(version=rpb.Version(model=model, number=1))


class StandInPool:
    """A ReplicaPool whose replicas are names only: each 'serves' at a made-up address, which the gateway's
    stand-in worker answers for."""

    def __init__(self) -> None:
        self.replicas: dict[str, str] = {}

    async def start(self, spec: ReplicaSpec, timeout_s: float) -> str:
        self.replicas[spec.replica_id] = address = f"{spec.model}.replicas.test:{len(self.replicas) + 1}"
        return address

    async def stop(self, replica_id: str, grace_s: float) -> None:
        self.replicas.pop(replica_id, None)

    async def ping(self, replica_id: str, timeout_s: float) -> ReplicaHealth:
        return ReplicaHealth.OK if replica_id in self.replicas else ReplicaHealth.DEAD

    async def find(self) -> list[FoundReplica]:
        return [FoundReplica(rid, address) for rid, address in self.replicas.items()]


class StandInWorkers:
    """The gateway's Replicas port in process: every request is answered with its model's name."""

    def __init__(self) -> None:
        self.served: list[str] = []

    async def infer(self, address: str, version: int, payload: bytes, timeout: float | None) -> bytes:
        request = kpb.ModelInferRequest.FromString(payload)
        self.served.append(request.model_name)
        return kpb.ModelInferResponse(model_name=request.model_name, model_version=str(version)).SerializeToString()

    async def stream(self, address: str, version: int, payload: bytes, timeout: float | None) -> AsyncIterator[bytes]:
        yield await self.infer(address, version, payload, timeout)

    async def statistics(self, address: str, timeout: float) -> list[VersionStats]:
        return []

    def retain(self, addresses: Collection[str]) -> None:
        pass


def no_runner() -> Any:
    raise AssertionError("admission is paused: the job runner must never be created")


# -- the mesh ---------------------------------------------------------------------------------------------


@dataclass
class Mesh:
    """Certificates, keys of two tenants and an admin, the stand-in registry, scheduler and gateway."""

    pki: MeshPki
    tokens: dict[str, str]
    registry: StandInRegistry
    scheduler: scheduler_pb2_grpc.SchedulerServiceStub
    gateway: grpc_service_pb2_grpc.GRPCInferenceServiceStub
    workers: StandInWorkers


def _server_settings(tmp: Path, pki: MeshPki, service: str) -> dict[str, Any]:
    cert = pki.services[service]
    return {
        "home": tmp / service,
        "insecure": False,
        "tls_cert_file": cert.cert,
        "tls_key_file": cert.key,
        "tls_ca_file": pki.ca.cert,
        "tls_require_client_cert": False,  # clients are users with keys, not mesh members
        "auth_keys_file": tmp / "keys.json",
        "internal_token": INTERNAL_TOKEN,
        "client_token": INTERNAL_TOKEN,
        "shutdown_grace_s": 0.5,
    }


async def _start_registry(pki: MeshPki, registry: StandInRegistry) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(registry, server)
    paths = pki.services["registry"]
    credentials = grpc.ssl_server_credentials([(paths.key.read_bytes(), paths.cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, port


@pytest.fixture
async def mesh(tmp_path: Path, database_url: str) -> AsyncIterator[Mesh]:
    from services.gateway.main import start as start_gateway
    from services.gateway.settings import GatewaySettings
    from services.scheduler.main import start as start_scheduler
    from services.scheduler.settings import SchedulerSettings

    pki = init_pki(tmp_path / "tls", ["registry", "scheduler", "gateway"])
    keys = KeyStore(tmp_path / "keys.json")
    tokens = {}
    for tenant in ("a", "b"):
        for role in (Role.DEVELOPER, Role.INFERENCE):
            _, tokens[f"{tenant}-{role.value}"] = keys.create(tenant, role, f"{tenant}-{role.value}")
    _, tokens["admin"] = keys.create("default", Role.ADMIN, "admin")
    registry = StandInRegistry()
    registry_server, registry_port = await _start_registry(pki, registry)
    scheduler = await start_scheduler(
        SchedulerSettings(
            **_server_settings(tmp_path, pki, "scheduler"),
            scheduler_address="127.0.0.1:0",
            scheduler_metrics_address="127.0.0.1:0",
            scheduler_database_url=database_url,
            scheduler_registry_address=f"127.0.0.1:{registry_port}",
            scheduler_data_root=tmp_path / "data",
            scheduler_max_running_jobs=0,
            scheduler_replica_default_cpus=0.5,
            scheduler_replica_health_interval_s=0.1,
            scheduler_replica_drain_delay_s=0.1,
            scheduler_replica_stop_grace_s=0.1,
            scheduler_replica_start_timeout_s=10,
        ),
        no_runner,
        StandInPool,
    )
    workers = StandInWorkers()
    gateway = await start_gateway(
        GatewaySettings(
            **_server_settings(tmp_path, pki, "gateway"),
            gateway_address="127.0.0.1:0",
            gateway_metrics_address="127.0.0.1:0",
            gateway_scheduler_address=f"127.0.0.1:{scheduler.port}",
            gateway_registry_address=f"127.0.0.1:{registry_port}",
            gateway_report_interval_s=0.1,
            gateway_watch_backoff_max_s=0.2,
        ),
        replicas=workers,
    )
    credentials = grpc.ssl_channel_credentials(pki.ca.cert.read_bytes())
    scheduler_channel = grpc.aio.secure_channel(f"127.0.0.1:{scheduler.port}", credentials)
    gateway_channel = grpc.aio.secure_channel(f"127.0.0.1:{gateway.port}", credentials)
    try:
        yield Mesh(
            pki,
            tokens,
            registry,
            scheduler_pb2_grpc.SchedulerServiceStub(scheduler_channel),
            grpc_service_pb2_grpc.GRPCInferenceServiceStub(gateway_channel),
            workers,
        )
    finally:
        await gateway_channel.close()
        await scheduler_channel.close()
        await gateway.stop(0.2)
        await scheduler.server.stop(0.2)
        await registry_server.stop(0)


def as_(mesh: Mesh, key: str, acting_for: str | None = None) -> tuple[tuple[str, str], ...]:
    """Call metadata of the key ``key`` (optionally acting for a tenant, as an admin may)."""
    metadata = (("authorization", f"Bearer {mesh.tokens[key]}"),)
    return metadata if acting_for is None else (*metadata, (TENANT_METADATA, acting_for))


async def refused(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


async def refused_stream(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    return info.value.code(), info.value.details() or ""


# -- jobs -------------------------------------------------------------------------------------------------


def digits_spec(**fields: Any) -> spb.TrainingJobSpec:
    return spb.TrainingJobSpec(
        architecture="cnn",
        dataset=spb.DatasetSpec(name="digits"),
        optimizer=paramserver_pb2.OptimizerSpec(name="sgd", hyperparameters={"lr": 0.05}),
        batch_size=32,
        epochs=1,
        workers=1,
        shards=1,
        target_model="digits-cnn",
        worker_resources=common_pb2.ResourceRequest(cpus=1),
        shard_resources=common_pb2.ResourceRequest(cpus=0.5),
        **fields,
    )


async def test_a_job_belongs_to_its_submitters_tenant_and_is_hidden_from_others(mesh: Mesh) -> None:
    stub = mesh.scheduler

    async def submit(key: str, tenant: str) -> spb.Job:
        request = spb.SubmitTrainingJobRequest(spec=digits_spec(tenant=tenant))
        return (await stub.SubmitTrainingJob(request, metadata=as_(mesh, key), timeout=30)).job

    # A tenant's key submits for its own tenant, whatever the request claims.
    job = await submit("a-developer", "b")
    assert job.spec.tenant == "a"
    b_job = await submit("b-developer", "")
    assert b_job.spec.tenant == "b"
    # An admin names the tenant (admission fairness is per tenant).
    admin_job = await submit("admin", "b")
    assert admin_job.spec.tenant == "b"

    missing = "job-00000000000000ff"
    code, unknown = await refused(stub.GetJob(spb.GetJobRequest(id=missing), metadata=as_(mesh, "b-developer")))
    assert code == grpc.StatusCode.NOT_FOUND
    # Tenant b cannot tell a's job from one that does not exist.
    b = as_(mesh, "b-developer")
    for call in (
        stub.GetJob(spb.GetJobRequest(id=job.id), metadata=b),
        stub.CancelJob(spb.CancelJobRequest(id=job.id), metadata=b),
    ):
        assert await refused(call) == (grpc.StatusCode.NOT_FOUND, unknown.replace(missing, job.id))
    watched = await refused_stream(stub.WatchJob(spb.WatchJobRequest(id=job.id), metadata=b))
    assert watched == (grpc.StatusCode.NOT_FOUND, unknown.replace(missing, job.id))
    listed = await stub.ListJobs(spb.ListJobsRequest(), metadata=b)
    assert sorted(j.id for j in listed.jobs) == sorted([b_job.id, admin_job.id])
    assert list((await stub.ListJobs(spb.ListJobsRequest(tenant="a"), metadata=b)).jobs) == []

    # Nothing happened to it; its tenant sees it; an admin sees every tenant, or one it acts for.
    a = as_(mesh, "a-developer")
    assert (await stub.GetJob(spb.GetJobRequest(id=job.id), metadata=a)).job.state == spb.QUEUED
    assert [j.id for j in (await stub.ListJobs(spb.ListJobsRequest(), metadata=a)).jobs] == [job.id]
    everyone = await stub.ListJobs(spb.ListJobsRequest(), metadata=as_(mesh, "admin"))
    assert [j.id for j in everyone.jobs] == [admin_job.id, b_job.id, job.id]
    for_a = await stub.ListJobs(spb.ListJobsRequest(), metadata=as_(mesh, "admin", acting_for="a"))
    assert [j.id for j in for_a.jobs] == [job.id]
    cancelled = await stub.CancelJob(spb.CancelJobRequest(id=job.id), metadata=a)
    assert cancelled.job.state == spb.CANCELLED


# -- deployments and the gateway --------------------------------------------------------------------------


async def _until(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def infer_request(model: str) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model, id="r1")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(bytes(16))
    return request


async def test_a_deployment_belongs_to_its_creators_tenant_at_the_scheduler_and_the_gateway(mesh: Mesh) -> None:
    stub, gateway = mesh.scheduler, mesh.gateway
    a, b, admin = as_(mesh, "a-developer"), as_(mesh, "b-developer"), as_(mesh, "admin")

    async def create(model: str, metadata: Any, name: str = "") -> spb.Deployment:
        spec = spb.DeploymentSpec(model=model, name=name, min_replicas=1)
        return (await stub.CreateDeployment(spb.CreateDeploymentRequest(spec=spec), metadata=metadata)).deployment

    assert (await create("model-a", a)).tenant == "a"
    assert (await create("model-b", b)).tenant == "b"
    # The scheduler resolves a deployment's model as its tenant sees the registry: a's key cannot serve b's.
    code, _ = await refused(create("model-b", a, name="borrowed"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert mesh.registry.calls == [
        ("GetVersion", "model-a", "a"),
        ("GetVersion", "model-b", "b"),
        ("GetVersion", "model-b", "a"),
    ]

    # At the scheduler, b cannot tell a's deployment from a missing one.
    code, unknown = await refused(stub.GetDeployment(spb.GetDeploymentRequest(name="nope"), metadata=b))
    assert code == grpc.StatusCode.NOT_FOUND
    hidden = (grpc.StatusCode.NOT_FOUND, unknown.replace("nope", "model-a"))
    update = spb.DeploymentSpec(model="model-a", min_replicas=2)
    for call in (
        stub.GetDeployment(spb.GetDeploymentRequest(name="model-a"), metadata=b),
        stub.UpdateDeployment(spb.UpdateDeploymentRequest(spec=update), metadata=b),
        stub.DeleteDeployment(spb.DeleteDeploymentRequest(name="model-a"), metadata=b),
    ):
        assert await refused(call) == hidden
    assert [d.name for d in (await stub.ListDeployments(spb.ListDeploymentsRequest(), metadata=b)).deployments] == [
        "model-b"
    ]
    everyone = await stub.ListDeployments(spb.ListDeploymentsRequest(), metadata=admin)
    assert [(d.name, d.tenant) for d in everyone.deployments] == [("model-a", "a"), ("model-b", "b")]
    # An admin's update still resolves as the deployment's tenant.
    mesh.registry.calls.clear()
    await stub.UpdateDeployment(spb.UpdateDeploymentRequest(spec=update), metadata=admin)
    assert mesh.registry.calls == [("GetVersion", "model-a", "a")]

    # The gateway follows the scheduler's endpoints (with their tenants).
    async def both_ready() -> bool:
        replies = [await gateway.ModelReady(kpb.ModelReadyRequest(name=n), metadata=admin) for n in MODELS]
        return all(r.ready for r in replies)

    await _until(both_ready)
    a_key, b_key = as_(mesh, "a-inference"), as_(mesh, "b-inference")
    assert (await gateway.ModelInfer(infer_request("model-a"), metadata=a_key, timeout=10)).model_name == "model-a"
    assert (await gateway.ModelReady(kpb.ModelReadyRequest(name="model-a"), metadata=a_key)).ready

    # To b's key, a's model is a model nobody deployed: the same status and words, never listed.
    code, unknown = await refused(gateway.ModelInfer(infer_request("nope"), metadata=b_key, timeout=10))
    assert (code, unknown) == (grpc.StatusCode.NOT_FOUND, "model 'nope' is not deployed (deployed: model-b)")
    hidden = (grpc.StatusCode.NOT_FOUND, unknown.replace("nope", "model-a"))
    served_before = list(mesh.workers.served)
    assert await refused(gateway.ModelInfer(infer_request("model-a"), metadata=b_key, timeout=10)) == hidden
    assert not (await gateway.ModelReady(kpb.ModelReadyRequest(name="model-a"), metadata=b_key)).ready
    for call in (
        gateway.ModelMetadata(kpb.ModelMetadataRequest(name="model-a"), metadata=b_key),
        gateway.ModelConfig(kpb.ModelConfigRequest(name="model-a"), metadata=b_key),
        gateway.ModelStatistics(kpb.ModelStatisticsRequest(name="model-a"), metadata=b_key),
    ):
        assert await refused(call) == hidden
    streamed = [r async for r in gateway.ModelStreamInfer(iter([infer_request("model-a")]), metadata=b_key)]
    assert [r.error_message for r in streamed] == [hidden[1]]
    assert mesh.workers.served == served_before  # no worker saw b's requests
    stats = await gateway.ModelStatistics(kpb.ModelStatisticsRequest(), metadata=b_key)
    assert {s.name for s in stats.model_stats} == {"model-b"}
    index = await gateway.RepositoryIndex(kpb.RepositoryIndexRequest(), metadata=as_(mesh, "b-developer"))
    assert [m.name for m in index.models] == ["model-b"]
    assert ("ListModels", "", "b") in mesh.registry.calls  # the registry listed b's models only
    unload = kpb.RepositoryModelUnloadRequest(model_name="model-a")
    code, _ = await refused(gateway.RepositoryModelUnload(unload, metadata=as_(mesh, "b-developer"), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND

    # An admin acting for b sees what b sees, at the gateway and at the scheduler behind it.
    admin_for_b = as_(mesh, "admin", acting_for="b")
    assert await refused(gateway.ModelInfer(infer_request("model-a"), metadata=admin_for_b, timeout=10)) == hidden
    index = await gateway.RepositoryIndex(kpb.RepositoryIndexRequest(), metadata=admin_for_b)
    assert [m.name for m in index.models] == ["model-b"]
    code, _ = await refused(gateway.RepositoryModelUnload(unload, metadata=admin_for_b, timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND

    # An admin key sees and serves every tenant's.
    for name in MODELS:
        assert (await gateway.ModelInfer(infer_request(name), metadata=admin, timeout=10)).model_name == name
    index = await gateway.RepositoryIndex(kpb.RepositoryIndexRequest(), metadata=admin)
    assert [m.name for m in index.models] == ["model-a", "model-b"]
    # The owner deletes its deployment; the stand-in deployment of b was never touched.
    await stub.DeleteDeployment(spb.DeleteDeploymentRequest(name="model-a"), metadata=a)
    left = await stub.ListDeployments(spb.ListDeploymentsRequest(), metadata=admin)
    assert [d.name for d in left.deployments] == ["model-b"]


# -- the trained model's tenant ---------------------------------------------------------------------------


async def test_a_rank_uploads_the_trained_model_acting_for_the_jobs_tenant(tmp_path: Path) -> None:
    from services.training.adapters.registry_sink import RegistrySink
    from shared.artifacts import Manifest, build_model
    from shared.clients.registry import RegistryClient
    from shared.settings import CommonSettings

    pki = init_pki(tmp_path / "tls", ["registry", "worker"])
    registry = StandInRegistry()
    server, port = await _start_registry(pki, registry)
    # What a rank has: the mesh's settings (TLS, the internal token), not the tenant's key.
    settings = CommonSettings(insecure=False, tls_ca_file=pki.ca.cert, client_token=INTERNAL_TOKEN)
    client = RegistryClient.connect(f"127.0.0.1:{port}", settings)
    try:
        manifest = Manifest.for_model("mlp", {"in_features": 4, "hidden": [8], "out_features": 3})
        sink = RegistrySink(client, "digits-cnn", rpb.Lineage(), {}, tenant="a")
        assert await sink(build_model(manifest), manifest, {"accuracy": 1.0}) == 1
    finally:
        await client.close()
        await server.stop(0)
    assert registry.calls == [("UploadVersion", "digits-cnn", "a")]


# -- the migration ----------------------------------------------------------------------------------------


def test_deployments_made_before_tenants_belong_to_the_default_tenant(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        upgrade_to(engine, MIGRATIONS, "0002")  # the schema before tenants
        resolved = ResolvedVersion(version=1, architecture="mlp", signature=SIGNATURE)
        now = datetime.now(UTC)
        old = sa.table(
            "deployments",
            *(sa.column(c) for c in ("name", "state")),
            *(sa.column(c, sa.JSON) for c in ("spec", "resolved")),
            *(sa.column(c, sa.DateTime(timezone=True)) for c in ("created_at", "updated_at")),
        )
        with engine.begin() as connection:
            connection.execute(
                old.insert().values(
                    name="old",
                    state="READY",
                    spec=DeploymentSpec(model="m", name="old").to_dict(),
                    resolved=resolved.to_dict(),
                    created_at=now,
                    updated_at=now,
                )
            )
        migrate(engine, MIGRATIONS)
        repository = SqlDeploymentRepository(engine)
        assert repository.get("old").tenant == "default"
        assert [d.name for d in repository.list_deployments(None, 10, "default")] == ["old"]
        assert repository.list_deployments(None, 10, "a") == []
    finally:
        engine.dispose()
