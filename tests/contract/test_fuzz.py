"""Hypothesis against running servers: every RPC of every public service gets random bytes and random,
well-formed but hostile messages (huge integers, odd strings, deep nesting, repeated fields), and must answer
with a precise status, never INTERNAL or UNKNOWN, and stay healthy.

The servers run on their own event loop in a thread (Hypothesis drives plain functions); requests are made
with a synchronous channel. Development mode: the requests reach the servicers, which is what is fuzzed
(authentication is covered by tests/contract/test_security.py).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.gateway import NoScheduler, RecordingLoadSink, SnapshotFeeder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
EXAMPLES = 25
DEADLINE_S = 1.0

_INTS = st.one_of(
    st.integers(-3, 3),
    st.sampled_from([2**31 - 1, -(2**31), 2**63 - 1, -(2**63), 10**12]),
    st.integers(-(2**63), 2**63 - 1),
)
_UINTS = st.one_of(st.integers(0, 3), st.sampled_from([2**32 - 1, 2**64 - 1]), st.integers(0, 2**64 - 1))
_TEXT = st.one_of(
    st.sampled_from(["", "a", "..", "../../etc/passwd", "²", "\u0661", "9" * 40, "x" * 300, "production", "latest"]),
    st.text(max_size=40),
)
_FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)


def _scalar(field: d.FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t in (d.FieldDescriptor.TYPE_INT32, d.FieldDescriptor.TYPE_SINT32, d.FieldDescriptor.TYPE_SFIXED32):
        return st.integers(-(2**31), 2**31 - 1)
    if t in (d.FieldDescriptor.TYPE_UINT32, d.FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (d.FieldDescriptor.TYPE_INT64, d.FieldDescriptor.TYPE_SINT64, d.FieldDescriptor.TYPE_SFIXED64):
        return _INTS
    if t in (d.FieldDescriptor.TYPE_UINT64, d.FieldDescriptor.TYPE_FIXED64):
        return _UINTS
    if t in (d.FieldDescriptor.TYPE_FLOAT, d.FieldDescriptor.TYPE_DOUBLE):
        return _FLOATS
    if t == d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == d.FieldDescriptor.TYPE_STRING:
        return _TEXT
    if t == d.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == d.FieldDescriptor.TYPE_ENUM:
        return st.integers(-2, 8)
    raise AssertionError(f"unhandled type {t}")


@st.composite
def messages(draw: Any, descriptor: d.Descriptor, depth: int = 0) -> Message:
    """A message of ``descriptor`` with a random subset of fields set to hostile values."""
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if depth > 3 or not draw(st.booleans()):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            for _ in range(draw(st.integers(0, 2))):
                key = draw(_scalar(key_field))
                target = getattr(message, field.name)
                if value_field.message_type is not None:
                    target[key].CopyFrom(draw(messages(value_field.message_type, depth + 1)))
                else:
                    target[key] = draw(_scalar(value_field))
            continue
        repeated = field.is_repeated
        for _ in range(draw(st.integers(1, 3)) if repeated else 1):
            if field.message_type is not None:
                value = draw(messages(field.message_type, depth + 1))
                if repeated:
                    getattr(message, field.name).add().CopyFrom(value)
                else:
                    getattr(message, field.name).CopyFrom(value)
            elif repeated:
                getattr(message, field.name).append(draw(_scalar(field)))
            else:
                setattr(message, field.name, draw(_scalar(field)))
    return message


def payloads(method: d.MethodDescriptor) -> st.SearchStrategy[bytes]:
    """Random bytes, or a serialized hostile message of the method's request type."""
    return st.one_of(st.binary(max_size=256), messages(method.input_type).map(lambda m: m.SerializeToString()))


class Servers:
    """The services under test on an event loop of their own, in a thread."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.running: dict[str, Any] = {}

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def start(self) -> None:
        self.thread.start()
        self.run(self._start())

    async def _start(self) -> None:
        from services.gateway.main import start as start_gateway
        from services.gateway.settings import GatewaySettings
        from services.inference.main import start as start_worker
        from services.inference.settings import InferenceSettings
        from services.paramserver.main import start as start_shard
        from services.paramserver.settings import ParamServerSettings
        from services.registry.main import start as start_registry
        from services.registry.settings import RegistrySettings
        from services.scheduler.main import start as start_scheduler
        from services.scheduler.settings import SchedulerSettings

        common: dict[str, Any] = {"insecure": True, "shutdown_grace_s": 0.2}
        registry = await start_registry(
            RegistrySettings(
                **common,
                home=self.tmp / "registry",
                registry_address="127.0.0.1:0",
                registry_metrics_address="127.0.0.1:0",
            )
        )
        self.running["registry"] = registry.server
        shard = await start_shard(
            ParamServerSettings(
                **common,
                home=self.tmp / "ps",
                paramserver_address="127.0.0.1:0",
                paramserver_metrics_address="127.0.0.1:0",
            )
        )
        self.running["paramserver"] = shard.server
        worker = await start_worker(
            InferenceSettings(
                **common,
                home=self.tmp / "worker",
                inference_address="127.0.0.1:0",
                inference_metrics_address="127.0.0.1:0",
                inference_registry_address=f"127.0.0.1:{registry.port}",
            )
        )
        self.running["inference"] = worker.server
        gateway = await start_gateway(
            GatewaySettings(
                **common,
                home=self.tmp / "gateway",
                gateway_address="127.0.0.1:0",
                gateway_metrics_address="127.0.0.1:0",
                gateway_max_hold_s=0.2,
            ),
            endpoints=SnapshotFeeder([]),
            load_sink=RecordingLoadSink(),
            control=NoScheduler(),
        )
        self.running["gateway"] = gateway.server
        scheduler = await start_scheduler(
            SchedulerSettings(
                **common,
                home=self.tmp / "scheduler",
                scheduler_address="127.0.0.1:0",
                scheduler_metrics_address="127.0.0.1:0",
                scheduler_registry_address=f"127.0.0.1:{registry.port}",
                scheduler_max_running_jobs=0,  # admission paused: fuzzed jobs queue, nothing runs
            ),
            runner_factory=_no_runner,
            pool_factory=_NoReplicas,
        )
        self.running["scheduler"] = scheduler.server

    def stop(self) -> None:
        async def stop_all() -> None:
            for server in self.running.values():
                await server.stop(0.2)

        self.run(stop_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _no_runner() -> Any:
    raise AssertionError("admission is paused: no job may start")


class _NoReplicas:
    """A replica pool with no capacity: deployments of fuzzed specs fail in the background, never in an RPC."""

    async def start(self, spec: Any, timeout_s: float) -> str:
        raise RuntimeError("no replicas in this test")

    async def stop(self, replica_id: str, grace_s: float) -> None:
        return None

    async def ping(self, replica_id: str, timeout_s: float) -> Any:
        from services.scheduler.core.deployments.ports import ReplicaHealth

        return ReplicaHealth.DEAD

    async def find(self) -> list[Any]:
        return []

    async def kill(self, replica_id: str) -> None:
        return None


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    running = Servers(tmp_path_factory.mktemp("fuzz"))
    running.start()
    yield running
    running.stop()


def _services() -> list[tuple[str, d.ServiceDescriptor]]:
    from inference import grpc_service_pb2
    from maas.inference.v1 import worker_pb2
    from maas.paramserver.v1 import paramserver_pb2
    from maas.registry.v1 import registry_pb2
    from maas.scheduler.v1 import scheduler_pb2

    kserve = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    return [
        ("registry", registry_pb2.DESCRIPTOR.services_by_name["RegistryService"]),
        ("gateway", kserve),
        ("inference", kserve),
        ("inference", worker_pb2.DESCRIPTOR.services_by_name["InferenceWorker"]),
        ("paramserver", paramserver_pb2.DESCRIPTOR.services_by_name["ParameterServer"]),
        ("scheduler", scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"]),
    ]


CASES = [(name, method) for name, service in _services() for method in service.methods]


def _call(channel: grpc.Channel, method: d.MethodDescriptor, payload: bytes) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.client_streaming:
            chunks = [payload, payload[: len(payload) // 2]]
            if method.server_streaming:
                for _ in channel.stream_stream(path)(iter(chunks), timeout=DEADLINE_S):
                    pass
            else:
                channel.stream_unary(path)(iter(chunks), timeout=DEADLINE_S)
        elif method.server_streaming:
            for _ in channel.unary_stream(path)(payload, timeout=DEADLINE_S):
                pass
        else:
            channel.unary_unary(path)(payload, timeout=DEADLINE_S)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined, no-any-return, unused-ignore]
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("name", "method"), CASES, ids=[f"{n}-{m.name}" for n, m in CASES])
def test_hostile_requests_never_get_internal_or_unknown(servers: Servers, name: str, method: Any) -> None:
    target = f"127.0.0.1:{servers.running[name].port}"
    with grpc.insecure_channel(target) as channel:
        seen: list[tuple[bytes, grpc.StatusCode]] = []

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(payload=payloads(method))
        def check(payload: bytes) -> None:
            code = _call(channel, method, payload)
            seen.append((payload, code))
            assert code not in BAD, (method.name, payload[:120], code)

        check()
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert seen
