"""The SDK (``import maas``) against real servers on loopback: models through a real registry, typed errors,
security (TLS and API keys), and retries on UNAVAILABLE only where repeating a call is safe."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import maas
import pytest
from maas.registry.v1 import registry_pb2 as rpb
from maas.registry.v1 import registry_pb2_grpc
from maas.scheduler.v1 import scheduler_pb2 as spb
from maas.scheduler.v1 import scheduler_pb2_grpc

from shared.grpc.calls import REQUEST_ID_KEY, RetryPolicy
from shared.security.pki import MESH_NAME
from tests.contract import test_security as security
from tests.support.artifacts import tiny_artifact

mesh = security.mesh  # the fixture: a CA, certificates and a key of each role
FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    # The registry's storage is tested on both backends elsewhere; the SDK needs one.
    return f"sqlite:///{tmp_path / 'registry.db'}"


@pytest.fixture
async def client(registry: Any, tmp_path: Path) -> AsyncIterator[maas.AsyncClient]:
    settings = maas.ClientSettings(home=tmp_path / "client-home")
    async with maas.AsyncClient(registry_address=f"127.0.0.1:{registry.port}", settings=settings) as c:
        yield c


async def test_push_with_progress_then_pull_round_trips(client: maas.AsyncClient, tmp_path: Path) -> None:
    path, _ = tiny_artifact(tmp_path)
    data = path.read_bytes()
    sent: list[int] = []
    version = await client.models.push("iris", path, tags={"stage": "dev"}, progress=sent.append)
    assert (version.model, version.number) == ("iris", 1)
    assert version.sha256 == hashlib.sha256(data).hexdigest() and version.size_bytes == len(data)
    assert sum(sent) == len(data) and sent, "progress reports every byte sent"
    received: list[int] = []
    dest = tmp_path / "pulled.safetensors"
    pulled = await client.models.pull("iris@1", dest, progress=received.append)
    assert pulled.sha256 == version.sha256 and sum(received) == len(data)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == version.sha256


async def test_create_list_get_alias_delete(client: maas.AsyncClient, tmp_path: Path) -> None:
    await client.models.create("empty", description="nothing yet", tags={"team": "a"})
    for seed in (1, 2):
        path, _ = tiny_artifact(tmp_path, seed=seed)
        await client.models.push("mlp", path)
    assert [m.name for m in await client.models.list()] == ["empty", "mlp"]
    assert [m.name for m in await client.models.list(tags={"team": "a"})] == ["empty"]
    assert (await client.models.get("mlp")).latest_version == 2
    derived = await client.models.derive("mlp@2", "fp16")
    assert derived.number == 3 and derived.lineage.parent_version == 2
    assert derived.size_bytes < (await client.models.get_version("mlp@2")).size_bytes
    alias = await client.models.alias("mlp", "production", 1)
    assert (alias.name, alias.version) == ("production", 1)
    assert (await client.models.get_version("mlp@production")).number == 1
    with pytest.raises(maas.AlreadyExists):
        await client.models.alias("mlp", "production", 2, create_only=True)
    with pytest.raises(maas.FailedPrecondition):
        await client.models.delete("mlp")  # an alias still points into it
    await client.models.delete_alias("mlp", "production")
    await client.models.delete("mlp")
    assert [m.name for m in await client.models.list()] == ["empty"]


async def test_errors_are_typed_with_reason_and_request_id(client: maas.AsyncClient) -> None:
    with pytest.raises(maas.NotFound) as missing:
        await client.models.get("nothing-here")
    assert missing.value.reason == "MODEL_NOT_FOUND" and "nothing-here" in missing.value.message
    assert missing.value.request_id and len(missing.value.request_id) == 16
    with pytest.raises(maas.InvalidArgument) as bad:
        await client.models.create("Not A Name!")
    assert bad.value.violations and bad.value.violations[0].field == "name"
    assert isinstance(bad.value, maas.MaasError)


async def test_roles_and_keys_under_tls(mesh: security.Mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    running = await security._start_registry(mesh)
    settings = maas.ClientSettings(home=tmp_path / "client-home", tls_server_name=MESH_NAME)

    def client(token: str) -> maas.AsyncClient:
        credentials = maas.Credentials(api_key=token, ca_file=mesh.pki.ca.cert, insecure=False)
        return maas.AsyncClient(
            registry_address=f"127.0.0.1:{running.port}", credentials=credentials, settings=settings
        )

    try:
        async with client(mesh.tokens["developer"]) as developer:
            await developer.models.create("secure")
            assert [m.name for m in await developer.models.list()] == ["secure"]
        async with client(mesh.tokens["inference"]) as inference:
            with pytest.raises(maas.PermissionDenied):
                await inference.models.create("not-allowed")
        async with client(mesh.tokens["revoked"]) as revoked:
            with pytest.raises(maas.Unauthenticated):
                await revoked.models.list()
        # What `maas up` leaves under MAAS_HOME: the key and the CA in a 0600 file, read when nothing is given.
        home = tmp_path / "maas-home"
        home.mkdir()
        monkeypatch.delenv("MAAS_INSECURE")  # the environment wins over the file; here it says nothing
        (home / "credentials.json").write_text(
            json.dumps({"api_key": mesh.tokens["developer"], "ca_file": str(mesh.pki.ca.cert), "insecure": False})
        )
        from_file = maas.ClientSettings(home=home, tls_server_name=MESH_NAME)
        assert from_file.client_token == mesh.tokens["developer"] and not from_file.insecure
        async with maas.AsyncClient(
            "127.0.0.1", registry_address=f"127.0.0.1:{running.port}", settings=from_file
        ) as configured:
            assert configured.settings.scheduler_address == "127.0.0.1:7002"  # the host given, the port kept
            assert [m.name for m in await configured.models.list()] == ["secure"]
    finally:
        await running.server.stop(0.2)


class Flaky(registry_pb2_grpc.RegistryServiceServicer, scheduler_pb2_grpc.SchedulerServiceServicer):
    """Real servers without interceptors that answer UNAVAILABLE to the first ``failures`` calls of each
    method, and record each call's request id and (for submissions) the client's ``request_id``."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, list[str]] = {}
        self.submitted: list[str] = []

    async def _answer(self, method: str, context: grpc.aio.ServicerContext) -> None:
        ids = self.calls.setdefault(method, [])
        ids.append(dict(context.invocation_metadata() or ()).get(REQUEST_ID_KEY, ""))
        if len(ids) <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "shedding load")

    async def GetModel(self, request: rpb.GetModelRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._answer("GetModel", context)
        return rpb.GetModelResponse(model=rpb.Model(name=request.name))

    async def CreateModel(self, request: rpb.CreateModelRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._answer("CreateModel", context)
        return rpb.CreateModelResponse(model=rpb.Model(name=request.name))

    async def SubmitTrainingJob(self, request: spb.SubmitTrainingJobRequest, context: grpc.aio.ServicerContext) -> Any:
        self.submitted.append(request.request_id)
        await self._answer("SubmitTrainingJob", context)
        return spb.SubmitTrainingJobResponse(job=spb.Job(id="job-1", state=spb.QUEUED, spec=request.spec))


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[Flaky, int]]:
    servicer = Flaky(failures=2)
    server = grpc.aio.server()
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server)
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, port
    await server.stop(0)


async def test_unavailable_is_retried_only_where_safe(flaky: tuple[Flaky, int], tmp_path: Path) -> None:
    servicer, port = flaky
    address = f"127.0.0.1:{port}"
    async with maas.AsyncClient(
        registry_address=address,
        scheduler_address=address,
        settings=maas.ClientSettings(home=tmp_path),
        retry=FAST_RETRY,
    ) as client:
        # GetModel has no side effects: retried until it succeeds, under one request id.
        assert (await client.models.get("m")).name == "m"
        assert len(servicer.calls["GetModel"]) == 3 and len(set(servicer.calls["GetModel"])) == 1
        # CreateModel is not idempotent and carries no request id: never repeated.
        with pytest.raises(maas.Unavailable) as unavailable:
            await client.models.create("m")
        assert len(servicer.calls["CreateModel"]) == 1
        assert unavailable.value.request_id == servicer.calls["CreateModel"][0]
        # A submission carries a client request_id, so it is retried, with the same one each time.
        job = await client.jobs.submit(spb.TrainingJobSpec(target_model="m"))
        assert job.id == "job-1" and len(servicer.submitted) == 3
        assert len(set(servicer.submitted)) == 1 and servicer.submitted[0]


async def test_retries_give_up_after_max_attempts(flaky: tuple[Flaky, int], tmp_path: Path) -> None:
    servicer, port = flaky
    servicer.failures = 10
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
    settings = maas.ClientSettings(home=tmp_path)
    async with maas.AsyncClient(registry_address=f"127.0.0.1:{port}", settings=settings, retry=retry) as client:
        with pytest.raises(maas.Unavailable):
            await client.models.get("m")
    assert len(servicer.calls["GetModel"]) == 3


async def test_blocking_client_push_pull_and_errors(registry: Any, tmp_path: Path) -> None:
    path, _ = tiny_artifact(tmp_path)
    settings = maas.ClientSettings(home=tmp_path / "client-home")

    def use() -> None:
        # The blocking client runs its own loop thread; the registry runs on this test's loop, so the
        # blocking calls are made from another thread.
        with maas.Client(registry_address=f"127.0.0.1:{registry.port}", settings=settings) as client:
            version = client.models.push("sync", path)
            pulled = client.models.pull("sync", tmp_path / "out.safetensors")
            assert pulled.sha256 == version.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
            with pytest.raises(maas.NotFound):
                client.models.get_version("sync@9")

    await asyncio.to_thread(use)
