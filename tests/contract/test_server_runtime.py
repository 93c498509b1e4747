"""The shared server runtime, seen from clients: health, reflection, metrics, auth, errors, tracing, TLS."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from maas.registry.v1 import registry_pb2 as pb
from maas.registry.v1 import registry_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.errors import NotFound
from shared.grpc.channel import make_channel
from shared.grpc.server import start_server
from shared.settings import CommonSettings
from shared.tracing import configure_tracing

GRPCURL = str(Path(sys.executable).parent / "grpcurl")
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@sqlite_only
async def test_health_reports_serving(registry) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "maas.registry.v1.RegistryService"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _grpcurl(*args: str) -> str:
    return subprocess.run([GRPCURL, "-plaintext", *args], check=True, capture_output=True, text=True, timeout=30).stdout


@sqlite_only
async def test_reflection_with_grpcurl(registry) -> None:
    target = f"127.0.0.1:{registry.port}"
    services = await asyncio.to_thread(_grpcurl, target, "list")
    assert "maas.registry.v1.RegistryService" in services.split()
    assert "grpc.health.v1.Health" in services.split()
    described = await asyncio.to_thread(_grpcurl, target, "describe", "maas.registry.v1.RegistryService")
    assert "rpc UploadVersion ( stream .maas.registry.v1.UploadVersionRequest )" in described
    created = await asyncio.to_thread(
        _grpcurl, "-d", '{"name": "from-grpcurl"}', target, "maas.registry.v1.RegistryService/CreateModel"
    )
    assert '"name": "from-grpcurl"' in created


async def test_reflection_can_be_turned_off() -> None:
    server = await start_server(CommonSettings(reflection=False), "127.0.0.1:0", [], [])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.aio.AioRpcError) as off:
                async for _ in stub.ServerReflectionInfo(iter([request]), timeout=5):
                    pass
            assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)


@sqlite_only
async def test_metrics_count_rpcs_by_method_and_code(registry, registry_client) -> None:
    await registry_client.call("CreateModel", pb.CreateModelRequest(name="counted"))
    with pytest.raises(NotFound):
        await registry_client.call("GetModel", pb.GetModelRequest(name="missing"))
    url = f"http://127.0.0.1:{registry.metrics_port}/metrics"
    not_found = 'maas_rpc_requests_total{code="NOT_FOUND",method="/maas.registry.v1.RegistryService/GetModel"} 1.0'
    # The server counts an RPC as its handler returns, which may be just after the client saw the status.
    for _ in range(50):
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        if not_found in body:
            break
        await asyncio.sleep(0.1)
    assert 'maas_rpc_requests_total{code="OK",method="/maas.registry.v1.RegistryService/CreateModel"} 1.0' in body
    assert not_found in body
    assert 'maas_rpc_duration_seconds_count{method="/maas.registry.v1.RegistryService/CreateModel"} 1.0' in body


async def test_unexpected_exception_is_generic_internal_without_details() -> None:
    async def explode(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("secret path /etc/passwd and a stack")

    handler = grpc.method_handlers_generic_handler(
        "test.Exploding", {"Boom": grpc.unary_unary_rpc_method_handler(explode)}
    )
    server = await start_server(
        CommonSettings(), "127.0.0.1:0", [lambda s: s.add_generic_rpc_handlers((handler,))], ["test.Exploding"]
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary("/test.Exploding/Boom")(b"")
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in info.value.details() and "Traceback" not in info.value.details()
        assert "trace id" in info.value.details()
    finally:
        await server.stop(0.2)


async def test_channels_give_unary_calls_a_default_deadline() -> None:
    async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(5)
        return b""

    handler = grpc.method_handlers_generic_handler("test.Slow", {"Wait": grpc.unary_unary_rpc_method_handler(slow)})
    server = await start_server(CommonSettings(), "127.0.0.1:0", [lambda s: s.add_generic_rpc_handlers((handler,))], [])
    channel = make_channel(f"127.0.0.1:{server.port}", CommonSettings(rpc_timeout_s=0.3))
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/test.Slow/Wait")(b"")
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert asyncio.get_running_loop().time() - started < 2
    finally:
        await channel.close()
        await server.stop(0)


async def test_servers_bound_the_rpcs_they_run_at_once() -> None:
    release = asyncio.Event()

    async def held(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await release.wait()
        return b"done"

    handler = grpc.method_handlers_generic_handler("test.Held", {"Wait": grpc.unary_unary_rpc_method_handler(held)})
    settings = CommonSettings(max_concurrent_rpcs=2)
    server = await start_server(settings, "127.0.0.1:0", [lambda s: s.add_generic_rpc_handlers((handler,))], [])
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        call = channel.unary_unary("/test.Held/Wait")
        running = [asyncio.ensure_future(call(b"", timeout=10)) for _ in range(2)]
        await asyncio.sleep(0.3)
        # A third call beyond the bound is refused at once, not queued.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(b"", timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        assert await asyncio.gather(*running) == [b"done", b"done"]
    finally:
        await channel.close()
        await server.stop(0)


@sqlite_only
async def test_one_trace_follows_a_request_across_the_hop(registry) -> None:
    provider = configure_tracing("tests")
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    channel = make_channel(f"127.0.0.1:{registry.port}", CommonSettings())
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    with trace.get_tracer("tests").start_as_current_span("caller") as parent:
        await stub.ListModels(pb.ListModelsRequest())
    await channel.close()
    trace_id = parent.get_span_context().trace_id
    spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
    kinds = {s.kind for s in spans}
    assert trace.SpanKind.SERVER in kinds and trace.SpanKind.CLIENT in kinds
    server_span = next(s for s in spans if s.kind == trace.SpanKind.SERVER)
    assert server_span.name == "/maas.registry.v1.RegistryService/ListModels"
