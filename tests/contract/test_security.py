"""Security on by default, through the real servers: TLS, API keys, roles, the authorization tables, mTLS.

Every service is started as its composition root starts it, with the secure defaults (TLS, keys from a key
file, the internal token); the matrix enumerates each server's RPCs through server reflection, so an RPC
added later is covered (and refused until its table says who may call it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from maas.registry.v1 import registry_pb2 as rpb
from maas.registry.v1 import registry_pb2_grpc

from services.gateway.api.servicer import AUTHORIZATION as GATEWAY_TABLE
from services.inference.api.servicer import AUTHORIZATION as WORKER_TABLE
from services.paramserver.api.servicer import AUTHORIZATION as SHARD_TABLE
from services.registry.api.servicer import AUTHORIZATION as REGISTRY_TABLE
from services.scheduler.api.servicer import AUTHORIZATION as SCHEDULER_TABLE
from services.training.api.servicer import AUTHORIZATION as TRAINING_TABLE
from shared.grpc.server import InsecureConfiguration, start_server
from shared.security.access import Access, missing_rules
from shared.security.keys import KeyStore, Role
from shared.security.pki import MESH_NAME, init_pki
from shared.settings import CommonSettings
from tests.support.gateway import NoControl, RecordingLoadSink, SnapshotFeeder

INTERNAL_TOKEN = "internal-token-for-the-tests-0123456789abcdef"
TABLES = {
    "registry": REGISTRY_TABLE,
    "scheduler": SCHEDULER_TABLE,
    "gateway": GATEWAY_TABLE,
    "inference": WORKER_TABLE,
    "paramserver": SHARD_TABLE,
    "training": TRAINING_TABLE,
}


def test_every_rpc_of_every_service_has_an_authorization_rule() -> None:
    from inference import grpc_service_pb2
    from maas.inference.v1 import worker_pb2
    from maas.paramserver.v1 import paramserver_pb2
    from maas.scheduler.v1 import scheduler_pb2
    from maas.training.v1 import training_pb2

    owned = {
        "registry": [rpb.DESCRIPTOR.services_by_name["RegistryService"]],
        "scheduler": [scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"]],
        "gateway": [grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]],
        "inference": [
            grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
            worker_pb2.DESCRIPTOR.services_by_name["InferenceWorker"],
        ],
        "paramserver": [paramserver_pb2.DESCRIPTOR.services_by_name["ParameterServer"]],
        "training": [training_pb2.DESCRIPTOR.services_by_name["TrainingWorker"]],
    }
    for name, services in owned.items():
        assert missing_rules(services, TABLES[name]) == [], name
    # The actors' servers are the mesh's alone; the gateway's management RPCs are not for inference keys.
    for name in ("inference", "paramserver", "training"):
        assert set(TABLES[name].values()) == {Access.INTERNAL}, name
    assert GATEWAY_TABLE["/inference.GRPCInferenceService/RepositoryModelLoad"] is Access.DEVELOPER
    assert SCHEDULER_TABLE["/maas.scheduler.v1.SchedulerService/WatchEndpoints"] is Access.INTERNAL


@dataclass
class Mesh:
    """A CA, certificates, a key file with keys of each role, and settings for servers and clients."""

    tmp: Path
    pki: Any
    keys: KeyStore
    tokens: dict[str, str]

    def server_settings(self, service: str, *, mtls: bool) -> dict[str, Any]:
        cert = self.pki.services[service]
        return {
            "home": self.tmp / service,
            "insecure": False,
            "tls_cert_file": cert.cert,
            "tls_key_file": cert.key,
            "tls_ca_file": self.pki.ca.cert,
            "tls_require_client_cert": mtls,
            "auth_keys_file": self.tmp / "keys.json",
            "internal_token": INTERNAL_TOKEN,
        }


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    pki = init_pki(tmp_path / "tls", ["registry", "scheduler", "gateway", "worker"])
    keys = KeyStore(tmp_path / "keys.json")
    tokens = {}
    for role in Role:
        _, tokens[role.value] = keys.create("team-a", role, f"{role.value}-key")
    revoked, tokens["revoked"] = keys.create("team-a", Role.ADMIN, "revoked-key")
    keys.revoke(revoked.key_id)
    return Mesh(tmp_path, pki, keys, tokens)


def _client_credentials(mesh: Mesh, *, cert: str | None = None) -> grpc.ChannelCredentials:
    root = mesh.pki.ca.cert.read_bytes()
    if cert is None:
        return grpc.ssl_channel_credentials(root)
    paths = mesh.pki.services[cert]
    return grpc.ssl_channel_credentials(root, paths.key.read_bytes(), paths.cert.read_bytes())


async def _methods(channel: grpc.aio.Channel) -> list[tuple[str, bool, bool]]:
    """Every RPC the server offers, from server reflection: (path, client streaming, server streaming)."""
    from google.protobuf import descriptor_pb2

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask(request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
        async for response in stub.ServerReflectionInfo(iter([request])):
            return response
        raise AssertionError("no reflection answer")

    listed = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
    methods = []
    for service in listed.list_services_response.service:
        if service.name.startswith(("grpc.health", "grpc.reflection")):
            continue
        found = await ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=service.name))
        for raw in found.file_descriptor_response.file_descriptor_proto:
            file = descriptor_pb2.FileDescriptorProto.FromString(raw)
            for svc in file.service:
                if f"{file.package}.{svc.name}" != service.name:
                    continue
                for m in svc.method:
                    methods.append((f"/{service.name}/{m.name}", m.client_streaming, m.server_streaming))
    assert methods, "reflection listed no RPCs"
    return methods


async def _status(channel: grpc.aio.Channel, method: tuple[str, bool, bool], token: str | None) -> grpc.StatusCode:
    path, client_streaming, server_streaming = method
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    try:
        if client_streaming and server_streaming:
            call: Any = channel.stream_stream(path)(iter([b""]), metadata=metadata, timeout=5)
            async for _ in call:
                pass
        elif client_streaming:
            await channel.stream_unary(path)(iter([b""]), metadata=metadata, timeout=5)
        elif server_streaming:
            async for _ in channel.unary_stream(path)(b"", metadata=metadata, timeout=5):
                pass
        else:
            await channel.unary_unary(path)(b"", metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


Starter = Callable[[Mesh], Any]


async def _start_registry(mesh: Mesh, **extra: Any) -> Any:
    """A secure registry on port 0 (``extra``: more settings); the running registry."""
    from services.registry.main import start
    from services.registry.settings import RegistrySettings

    settings = RegistrySettings(
        **mesh.server_settings("registry", mtls=False),
        registry_address="127.0.0.1:0",
        registry_metrics_address="127.0.0.1:0",
        **extra,
    )
    return await start(settings)


async def _registry(mesh: Mesh) -> Any:
    return (await _start_registry(mesh)).server


async def _scheduler(mesh: Mesh, **extra: Any) -> Any:
    return (await _start_scheduler(mesh, **extra)).server


async def _start_scheduler(mesh: Mesh, **extra: Any) -> Any:
    from services.scheduler.main import start
    from services.scheduler.settings import SchedulerSettings

    def no_ray() -> Any:
        raise AssertionError("no job or deployment may start in this test")

    settings = SchedulerSettings(
        **mesh.server_settings("scheduler", mtls=False),
        scheduler_address="127.0.0.1:0",
        scheduler_metrics_address="127.0.0.1:0",
        scheduler_registry_address="127.0.0.1:1",
        **extra,
    )
    return await start(settings, runner_factory=no_ray, pool_factory=no_ray)


async def _gateway(mesh: Mesh) -> Any:
    from services.gateway.main import start
    from services.gateway.settings import GatewaySettings

    settings = GatewaySettings(
        **mesh.server_settings("gateway", mtls=False),
        gateway_address="127.0.0.1:0",
        gateway_metrics_address="127.0.0.1:0",
    )
    control = NoControl()
    return (await start(settings, endpoints=SnapshotFeeder([]), load_sink=RecordingLoadSink(), control=control)).server


async def _shard(mesh: Mesh) -> Any:
    from services.paramserver.main import start
    from services.paramserver.settings import ParamServerSettings

    settings = ParamServerSettings(
        **mesh.server_settings("worker", mtls=True),
        paramserver_address="127.0.0.1:0",
        paramserver_metrics_address="127.0.0.1:0",
    )
    return (await start(settings)).server


async def _worker(mesh: Mesh) -> Any:
    from services.inference.main import start
    from services.inference.settings import InferenceSettings

    settings = InferenceSettings(
        **mesh.server_settings("worker", mtls=True),
        inference_address="127.0.0.1:0",
        inference_metrics_address="127.0.0.1:0",
        inference_registry_address="127.0.0.1:1",
    )
    return (await start(settings)).server


async def _training(mesh: Mesh) -> Any:
    # A rank's real server needs a running job; its table is checked here on a server that registers every
    # TrainingWorker RPC (a denied call never reaches a handler, which would answer UNIMPLEMENTED).
    from maas.training.v1 import training_pb2

    service = training_pb2.DESCRIPTOR.services_by_name["TrainingWorker"]

    async def unimplemented(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "stand-in")

    async def unimplemented_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "stand-in")
        yield b""

    handlers = {
        m.name: (
            grpc.unary_stream_rpc_method_handler(unimplemented_stream)
            if m.server_streaming
            else grpc.unary_unary_rpc_method_handler(unimplemented)
        )
        for m in service.methods
    }
    generic = grpc.method_handlers_generic_handler(service.full_name, handlers)
    settings = CommonSettings(**mesh.server_settings("worker", mtls=True))
    return await start_server(
        settings,
        "127.0.0.1:0",
        [lambda s: s.add_generic_rpc_handlers((generic,))],
        [service.full_name],
        authorization=TRAINING_TABLE,
    )


SERVERS: dict[str, tuple[Starter, str, bool]] = {
    # name: (starter, the table it must follow, mutual TLS)
    "registry": (_registry, "registry", False),
    "scheduler": (_scheduler, "scheduler", False),
    "gateway": (_gateway, "gateway", False),
    "paramserver": (_shard, "paramserver", True),
    "inference": (_worker, "inference", True),
    "training": (_training, "training", True),
}


@pytest.mark.parametrize("name", list(SERVERS))
async def test_authorization_matrix_over_every_rpc(mesh: Mesh, name: str) -> None:
    starter, table_name, mtls = SERVERS[name]
    table = TABLES[table_name]
    server = await starter(mesh)
    target = f"127.0.0.1:{server.port}"
    try:
        # Users hold no mesh certificate: on a mutual-TLS server even their handshake fails.
        user = _client_credentials(mesh)
        mesh_member = _client_credentials(mesh, cert="gateway")
        async with grpc.aio.secure_channel(target, mesh_member if mtls else user) as channel:
            methods = await _methods(channel)
            assert {path for path, _, _ in methods} <= set(table), "an RPC without a rule"
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # health needs no credentials
            for method in methods:
                access = table[method[0]]
                for label in ("none", "bad", "revoked"):
                    token = {"none": None, "bad": "maas_0123456789ab_not-a-real-secret", "revoked": "revoked"}[label]
                    token = mesh.tokens.get(token or "", token)
                    code = await _status(channel, method, None if mtls else token)
                    if mtls:
                        # The certificate identifies a mesh service: it passes authentication.
                        assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
                        break
                    assert code == grpc.StatusCode.UNAUTHENTICATED, (method[0], label, code)
                if mtls:
                    continue
                for role in Role:
                    code = await _status(channel, method, mesh.tokens[role.value])
                    allowed = access is not Access.INTERNAL and role.allows(Role(access.value))
                    denied = code == grpc.StatusCode.PERMISSION_DENIED
                    assert denied != allowed, (method[0], role.value, code)
                code = await _status(channel, method, INTERNAL_TOKEN)
                assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), method
        if mtls:
            _add_cert_of_another_ca(mesh)
            for credentials in (user, _client_credentials(mesh, cert="gateway-of-another-ca")):
                async with grpc.aio.secure_channel(target, credentials) as channel:
                    code = await _status(channel, methods[0], INTERNAL_TOKEN)
                    assert code == grpc.StatusCode.UNAVAILABLE, code
        async with grpc.aio.insecure_channel(target) as plain:
            assert await _status(plain, methods[0], mesh.tokens["admin"]) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0.2)


def _add_cert_of_another_ca(mesh: Mesh) -> None:
    """A certificate with a mesh service's name, from another CA: a server that trusts ours refuses it."""
    other = init_pki(mesh.tmp / "other-tls", ["gateway"])
    mesh.pki.services["gateway-of-another-ca"] = other.services["gateway"]


async def test_keys_roles_and_revocation_through_the_registry(mesh: Mesh) -> None:
    server = await _registry(mesh)
    target = f"127.0.0.1:{server.port}"
    try:
        async with grpc.aio.secure_channel(
            target, _client_credentials(mesh), options=[("grpc.ssl_target_name_override", MESH_NAME)]
        ) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)

            def auth(role: str) -> tuple[tuple[str, str]]:
                return (("authorization", f"Bearer {mesh.tokens[role]}"),)

            with structlog.testing.capture_logs() as logs:
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await stub.CreateModel(rpb.CreateModelRequest(name="m1"), metadata=auth("inference"), timeout=5)
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "developer" in (denied.value.details() or "")
                # The denied call changed nothing.
                listed = await stub.ListModels(rpb.ListModelsRequest(), metadata=auth("developer"), timeout=5)
                assert list(listed.models) == []
                await stub.CreateModel(rpb.CreateModelRequest(name="m1"), metadata=auth("developer"), timeout=5)
            # The audit log has both attempts to change state, and not the read.
            audit = [
                (e["principal"], e["tenant"], e["rpc"], e["target"], e["outcome"])
                for e in logs
                if e["event"] == "audit"
            ]
            developer_id, inference_id = (mesh.tokens[role].split("_")[1] for role in ("developer", "inference"))
            create = "/maas.registry.v1.RegistryService/CreateModel"
            assert audit == [
                (f"key:{inference_id}", "team-a", create, "m1", "PERMISSION_DENIED"),
                (f"key:{developer_id}", "team-a", create, "m1", "OK"),
            ]
            # A key revoked while the server runs (another process's view of the file) stops working.
            key_id = mesh.tokens["developer"].split("_")[1]
            KeyStore(mesh.tmp / "keys.json").revoke(key_id)
            with pytest.raises(grpc.aio.AioRpcError) as revoked:
                await stub.ListModels(rpb.ListModelsRequest(), metadata=auth("developer"), timeout=5)
            assert revoked.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Traceback" not in (revoked.value.details() or "")
    finally:
        await server.stop(0.2)


async def test_servers_refuse_to_start_open_or_with_a_guessable_token(mesh: Mesh) -> None:
    with pytest.raises(InsecureConfiguration, match="TLS is required"):
        await start_server(CommonSettings(insecure=False), "127.0.0.1:0", [], [])
    weak = CommonSettings(**{**mesh.server_settings("registry", mtls=False), "internal_token": "maas-dev-ray-token"})
    with pytest.raises(InsecureConfiguration, match="development or short token"):
        await start_server(weak, "127.0.0.1:0", [], [])
    await asyncio.sleep(0)


async def test_the_mesh_calls_an_internal_listener_with_mutual_tls(mesh: Mesh) -> None:
    # The scheduler's users call its main listener with keys; the gateway calls its internal listener, where
    # its certificate alone identifies it. A certificate means nothing on the main listener (none is asked).
    running = await _start_scheduler(mesh, scheduler_internal_address="127.0.0.1:0")
    report_load = ("/maas.scheduler.v1.SchedulerService/ReportLoad", False, False)
    public, internal = f"127.0.0.1:{running.port}", f"127.0.0.1:{running.internal_port}"
    _add_cert_of_another_ca(mesh)
    gateway_cert = _client_credentials(mesh, cert="gateway")
    # An empty load report reaches the handler, which refuses it: the caller got through.
    admitted = grpc.StatusCode.INVALID_ARGUMENT
    try:
        assert running.internal_port and running.internal_port != running.port
        async with grpc.aio.secure_channel(internal, gateway_cert) as channel:
            assert await _status(channel, report_load, None) == admitted
            # A credential that is sent decides alone: a bad or too weak key never falls back to the certificate.
            assert await _status(channel, report_load, "maas_0123456789ab_bad") == grpc.StatusCode.UNAUTHENTICATED
            code = await _status(channel, report_load, mesh.tokens["developer"])
            assert code == grpc.StatusCode.PERMISSION_DENIED
        for refused in (_client_credentials(mesh), _client_credentials(mesh, cert="gateway-of-another-ca")):
            async with grpc.aio.secure_channel(internal, refused) as channel:
                assert await _status(channel, report_load, None) == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.secure_channel(public, gateway_cert) as channel:
            assert await _status(channel, report_load, None) == grpc.StatusCode.UNAUTHENTICATED
            assert await _status(channel, report_load, INTERNAL_TOKEN) == admitted
    finally:
        await running.server.stop(0.2)


async def test_a_plaintext_health_port_for_probes_serves_health_only(mesh: Mesh) -> None:
    # Kubernetes' gRPC probes cannot speak TLS: health (and only health) on a plaintext port of its own.

    running = await _start_registry(mesh, health_address="127.0.0.1:0")
    try:
        assert running.server.health_port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.server.health_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as other:
                await registry_pb2_grpc.RegistryServiceStub(channel).ListModels(rpb.ListModelsRequest(), timeout=5)
            assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await running.server.stop(0.2)


async def test_rate_limits_are_per_tenant_with_a_retry_delay(mesh: Mesh) -> None:
    from shared.grpc.status import from_rpc_error

    _, other_tenant = mesh.keys.create("team-b", Role.DEVELOPER, "b-dev")
    running = await _start_registry(mesh, rate_limit_management="3/minute")
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{running.server.port}", _client_credentials(mesh)) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)

            async def list_as(token: str) -> None:
                await stub.ListModels(rpb.ListModelsRequest(), metadata=(("authorization", f"Bearer {token}"),))

            for _ in range(3):
                await list_as(mesh.tokens["developer"])
            with pytest.raises(grpc.aio.AioRpcError) as limited:
                await list_as(mesh.tokens["admin"])  # the same tenant, another key: the same budget
            assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            error = from_rpc_error(limited.value)
            assert error.retry_after_s is not None and 0 < error.retry_after_s <= 60
            assert "team-a" in error.message
            await list_as(other_tenant)  # another tenant is not held back
            for _ in range(5):
                await list_as(INTERNAL_TOKEN)  # the mesh's own calls are never limited
    finally:
        await running.server.stop(0.2)


async def test_streams_are_capped_per_tenant(mesh: Mesh) -> None:

    _, other_tenant = mesh.keys.create("team-b", Role.DEVELOPER, "b-streams")
    running = await _start_registry(mesh, max_streams_per_tenant=1)
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{running.server.port}", _client_credentials(mesh)) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)

            def watch(token: str) -> Any:
                return stub.WatchEvents(rpb.WatchEventsRequest(), metadata=(("authorization", f"Bearer {token}"),))

            async def consume(call: Any) -> None:
                async for _ in call:
                    pass

            def open_stream(token: str) -> asyncio.Task[None]:
                return asyncio.create_task(consume(watch(token)))

            async def refused(task: asyncio.Task[None]) -> bool:
                """Whether the stream ended with RESOURCE_EXHAUSTED; False while it stays open."""
                done, _ = await asyncio.wait([task], timeout=1.0)
                if not done:
                    return False
                error = task.exception()
                assert isinstance(error, grpc.aio.AioRpcError), error
                return error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            held = open_stream(mesh.tokens["developer"])
            assert not await refused(held)
            assert await refused(open_stream(mesh.tokens["admin"]))  # the same tenant: over its cap
            other = open_stream(other_tenant)
            assert not await refused(other)  # another tenant is not held back
            for task in (held, other):
                task.cancel()
            await asyncio.gather(held, other, return_exceptions=True)
            await asyncio.sleep(0.3)
            again = open_stream(mesh.tokens["developer"])
            assert not await refused(again)  # a closed stream frees its slot
            again.cancel()
            await asyncio.gather(again, return_exceptions=True)
    finally:
        await running.server.stop(0.2)
