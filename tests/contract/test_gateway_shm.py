"""Triton's system shared-memory extension through the gateway's public gRPC API.

A real gateway on port 0 with the extension on, in front of the small worker servers of ``test_gateway``
(they have no InferStream, so the gateway inlines the data to them) and of real inference workers
(``services.inference``, in process: they map the regions themselves). Shared-memory objects are made the
way Triton's client makes them (``multiprocessing.shared_memory``, i.e. ``shm_open``). Tenants are checked on
a secure gateway with two tenants' keys.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from inference import grpc_service_pb2 as kpb
from inference import grpc_service_pb2_grpc

from tests.contract.test_gateway import (  # noqa: F401 - real_replicas: a fixture used here too
    Harness,
    RealReplicas,
    WorkerServer,
    _harness,
    deployment,
    infer_request,
    real_replicas,
)
from tests.support.gateway import SnapshotFeeder

pytestmark = pytest.mark.timeout(120)


class Objects:
    """POSIX shared-memory objects made for one test, unlinked after it."""

    def __init__(self) -> None:
        self.made: list[shared_memory.SharedMemory] = []

    def make(self, size: int) -> shared_memory.SharedMemory:
        # tritonclient names objects "/name"; multiprocessing takes the name without the slash.
        shm = shared_memory.SharedMemory(f"maas-test-{uuid.uuid4().hex[:12]}", create=True, size=size)
        self.made.append(shm)
        return shm

    def close(self) -> None:
        for shm in self.made:
            shm.close()
            try:
                shm.unlink()
            except FileNotFoundError:
                pass


def key(shm: shared_memory.SharedMemory) -> str:
    return "/" + shm.name.lstrip("/")


@pytest.fixture
def objects() -> Iterator[Objects]:
    made = Objects()
    yield made
    made.close()


@pytest.fixture
async def workers() -> AsyncIterator[list[WorkerServer]]:
    server = await WorkerServer("w0").start()
    yield [server]
    await server.stop()


@pytest.fixture
async def harness(tmp_path: Path, workers: list[WorkerServer]) -> AsyncIterator[Harness]:
    h = await _harness(tmp_path, SnapshotFeeder([deployment("m", workers)]), gateway_shared_memory=True)
    yield h
    await h.channel.close()
    await h.gateway.stop(0.5)


async def refused(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


def register(stub: Any, name: str, shm: shared_memory.SharedMemory, size: int, offset: int = 0, **kw: Any) -> Any:
    return stub.SystemSharedMemoryRegister(
        kpb.SystemSharedMemoryRegisterRequest(name=name, key=key(shm), offset=offset, byte_size=size), **kw
    )


def in_region(tensor: Any, region: str, size: int, offset: int = 0) -> None:
    """Marks an input or requested output as tritonclient's ``set_shared_memory`` does."""
    tensor.parameters["shared_memory_region"].string_param = region
    tensor.parameters["shared_memory_byte_size"].int64_param = size
    if offset:
        tensor.parameters["shared_memory_offset"].int64_param = offset


def shm_request(
    x: np.ndarray, region: str, offset: int = 0, size: int | None = None, model: str = "m"
) -> kpb.ModelInferRequest:
    """``x`` from shared memory (the region, at ``offset``); ``tag`` raw, as the only raw contents."""
    request = infer_request(model, x=x)
    del request.raw_input_contents[0]  # x's data is in the region
    in_region(request.inputs[0], region, x.nbytes if size is None else size, offset)
    return request


async def test_off_by_default(tmp_path: Path, workers: list[WorkerServer], objects: Objects) -> None:
    h = await _harness(tmp_path, SnapshotFeeder([deployment("m", workers)]))
    try:
        metadata = await h.stub.ServerMetadata(kpb.ServerMetadataRequest())
        assert "system_shared_memory" not in metadata.extensions
        shm = objects.make(64)
        code, message = await refused(register(h.stub, "r", shm, 64))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "not enabled" in message
        code, message = await refused(h.stub.ModelInfer(shm_request(np.ones((1, 4), np.float32), "r"), timeout=10))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "not enabled" in message
    finally:
        await h.channel.close()
        await h.gateway.stop(0.5)


async def test_register_status_unregister(harness: Harness, objects: Objects) -> None:
    stub = harness.stub
    assert "system_shared_memory" in (await stub.ServerMetadata(kpb.ServerMetadataRequest())).extensions
    shm = objects.make(4096)
    await register(stub, "in", shm, 1024, offset=512)
    await register(stub, "out", shm, 256, offset=2048)
    status = await stub.SystemSharedMemoryStatus(kpb.SystemSharedMemoryStatusRequest())
    assert set(status.regions) == {"in", "out"}
    region = status.regions["in"]
    assert (region.name, region.key, region.offset, region.byte_size) == ("in", key(shm), 512, 1024)
    one = await stub.SystemSharedMemoryStatus(kpb.SystemSharedMemoryStatusRequest(name="out"))
    assert list(one.regions) == ["out"]

    code, message = await refused(register(stub, "in", shm, 16))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "'in'" in message
    code, message = await refused(stub.SystemSharedMemoryStatus(kpb.SystemSharedMemoryStatusRequest(name="nope")))
    assert code == grpc.StatusCode.NOT_FOUND and "'nope'" in message

    await stub.SystemSharedMemoryUnregister(kpb.SystemSharedMemoryUnregisterRequest(name="in"))
    await stub.SystemSharedMemoryUnregister(kpb.SystemSharedMemoryUnregisterRequest(name="in"))  # as Triton: no error
    assert list((await stub.SystemSharedMemoryStatus(kpb.SystemSharedMemoryStatusRequest())).regions) == ["out"]
    await stub.SystemSharedMemoryUnregister(kpb.SystemSharedMemoryUnregisterRequest())  # every region
    assert not (await stub.SystemSharedMemoryStatus(kpb.SystemSharedMemoryStatusRequest())).regions


async def test_registration_refuses_what_is_not_a_shared_memory_window(
    tmp_path: Path, workers: list[WorkerServer], objects: Objects
) -> None:
    h = await _harness(
        tmp_path,
        SnapshotFeeder([deployment("m", workers)]),
        gateway_shared_memory=True,
        gateway_shared_memory_max_regions=2,
    )
    stub = h.stub
    shm = objects.make(100)
    link = f"/dev/shm/maas-test-link-{uuid.uuid4().hex[:8]}"
    os.symlink(f"/dev/shm/{shm.name.lstrip('/')}", link)
    try:

        async def code_of(name: str, key_: str, size: int, offset: int = 0) -> tuple[grpc.StatusCode, str]:
            request = kpb.SystemSharedMemoryRegisterRequest(name=name, key=key_, offset=offset, byte_size=size)
            return await refused(stub.SystemSharedMemoryRegister(request))

        for bad in ("/../etc/passwd", "/dev/shm/x", "a/b", "/..", "/", "", "x\x00y"):
            code, message = await code_of("r", bad, 8)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "key" in message, (bad, code, message)
        code, message = await code_of("r", "/" + os.path.basename(link), 8)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a shared-memory object" in message
        code, message = await code_of("r", f"/maas-test-missing-{uuid.uuid4().hex[:8]}", 8)
        assert code == grpc.StatusCode.NOT_FOUND
        code, message = await code_of("r", key(shm), 64, offset=64)  # past the object's 100 bytes
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "holds 100 bytes" in message
        code, message = await code_of("r", key(shm), 0)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "byte_size" in message
        code, message = await code_of("", key(shm), 8)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "name" in message
        await register(stub, "a", shm, 8)
        await register(stub, "b", shm, 8)
        code, message = await code_of("c", key(shm), 8)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "unregister" in message
    finally:
        os.unlink(link)
        await h.channel.close()
        await h.gateway.stop(0.5)


async def test_inputs_and_outputs_in_shared_memory_inline_to_the_worker(harness: Harness, objects: Objects) -> None:
    """The small worker has no InferStream: the gateway reads the input region, sends the data inline, and
    writes the worker's output into the output region."""
    stub = harness.stub
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    shm = objects.make(4096)
    np.ndarray(x.shape, np.float32, buffer=shm.buf, offset=256)[:] = x
    await register(stub, "in", shm, 1024, offset=128)  # x is at 128 bytes into the region
    await register(stub, "out", shm, 1024, offset=2048)
    request = shm_request(x, "in", offset=128)
    requested = request.outputs.add(name="y")
    in_region(requested, "out", 64, offset=16)

    response = await stub.ModelInfer(request, timeout=10)
    assert [o.name for o in response.outputs] == ["y"] and list(response.outputs[0].shape) == [3, 1]
    assert list(response.raw_output_contents) == [b""]  # as Triton: the data is in the region only
    parameters = response.outputs[0].parameters
    assert parameters["shared_memory_region"].string_param == "out"
    assert parameters["shared_memory_byte_size"].int64_param == 12
    assert parameters["shared_memory_offset"].int64_param == 16
    y = np.ndarray((3, 1), np.float32, buffer=shm.buf, offset=2048 + 16).copy()
    np.testing.assert_allclose(y, x.sum(axis=1, keepdims=True) + 1.0)  # the worker adds its version

    # Raw outputs beside shared-memory inputs still come back in the response.
    plain = await stub.ModelInfer(shm_request(x, "in", offset=128), timeout=10)
    np.testing.assert_allclose(np.frombuffer(plain.raw_output_contents[0], np.float32), [7.0, 23.0, 39.0])


async def test_bad_regions_get_precise_statuses(harness: Harness, objects: Objects) -> None:
    stub = harness.stub
    x = np.ones((2, 4), np.float32)
    shm = objects.make(1024)
    await register(stub, "in", shm, 64)
    await register(stub, "tiny", shm, 4, offset=512)

    cases: list[tuple[kpb.ModelInferRequest, grpc.StatusCode, str]] = [
        (shm_request(x, "nope"), grpc.StatusCode.NOT_FOUND, "region 'nope' is not registered"),
        (shm_request(x, "in", offset=40), grpc.StatusCode.INVALID_ARGUMENT, "exceeds region 'in' of 64 bytes"),
        (shm_request(x, "in", size=16), grpc.StatusCode.INVALID_ARGUMENT, "input 'x'"),  # shape needs 32
    ]
    no_size = shm_request(x, "in")
    del no_size.inputs[0].parameters["shared_memory_byte_size"]
    cases.append((no_size, grpc.StatusCode.INVALID_ARGUMENT, "shared_memory_byte_size"))
    both = shm_request(x, "in")
    both.inputs[0].contents.fp32_contents.extend([1.0] * 8)
    cases.append((both, grpc.StatusCode.INVALID_ARGUMENT, "both"))
    small_output = shm_request(x, "in")
    in_region(small_output.outputs.add(name="y"), "tiny", 4)
    cases.append((small_output, grpc.StatusCode.INVALID_ARGUMENT, "do not fit"))
    for request, want, words in cases:
        code, message = await refused(stub.ModelInfer(request, timeout=10))
        assert code == want and words in message, (want, words, code, message)

    # A stream request naming a region is answered with an error in the stream, which goes on.
    async def one() -> AsyncIterator[kpb.ModelInferRequest]:
        yield shm_request(x, "in")

    answers = [a async for a in stub.ModelStreamInfer(one(), timeout=10)]
    assert "ModelInfer only" in answers[0].error_message


async def test_a_truncated_object_is_failed_precondition_not_a_crash(harness: Harness, objects: Objects) -> None:
    stub = harness.stub
    shm = objects.make(8192)
    await register(stub, "in", shm, 32, offset=4096)
    os.truncate(f"/dev/shm/{shm.name.lstrip('/')}", 1024)  # its owner shrinks it under the region
    code, message = await refused(stub.ModelInfer(shm_request(np.ones((2, 4), np.float32), "in"), timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "truncated" in message
    await stub.ServerLive(kpb.ServerLiveRequest())  # still serving


# -- tenants ------------------------------------------------------------------------------------------------


class SumReplicas:
    """The ``Replicas`` port in process for the secure gateway (its worker channels would need TLS): ``y`` =
    row sums of ``x``, computed from the request the gateway forwards (inline data)."""

    def __init__(self) -> None:
        self.calls = 0

    async def infer(
        self, address: str, version: int, payload: bytes, timeout: float | None, shared_memory: bytes = b""
    ) -> bytes:
        if shared_memory:
            from services.gateway.core.shm import SharedMemoryUnreachable

            raise SharedMemoryUnreachable
        self.calls += 1
        request = kpb.ModelInferRequest.FromString(payload)
        x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(list(request.inputs[0].shape))
        response = kpb.ModelInferResponse(model_name=request.model_name, model_version=str(version), id=request.id)
        response.outputs.add(name="y", datatype="FP32", shape=[x.shape[0], 1])
        response.raw_output_contents.append(x.sum(axis=1, keepdims=True).astype(np.float32).tobytes())
        return response.SerializeToString()

    def stream(self, *args: Any) -> Any:
        raise AssertionError("not streamed")

    async def statistics(self, address: str, timeout: float) -> list[Any]:
        return []

    def retain(self, addresses: Any) -> None:
        pass


async def test_a_region_is_its_tenants_alone(tmp_path: Path, objects: Objects) -> None:
    from services.gateway.core.model import Deployment, Endpoint
    from services.gateway.main import start
    from services.gateway.settings import GatewaySettings
    from shared.security.keys import KeyStore, Role
    from shared.security.pki import init_pki
    from tests.contract.test_gateway import served

    pki = init_pki(tmp_path / "tls", ["gateway"])
    keys = KeyStore(tmp_path / "keys.json")
    tokens = {tenant: keys.create(tenant, Role.INFERENCE, f"{tenant}-inference")[1] for tenant in ("a", "b")}
    cert = pki.services["gateway"]
    models = [
        Deployment(name=f"m{t}", versions={1: served(1)}, endpoints=(Endpoint("w:1", 1),), default_version=1, tenant=t)
        for t in ("a", "b")
    ]
    replicas = SumReplicas()
    gateway = await start(
        GatewaySettings(
            home=tmp_path / "gateway",
            insecure=False,
            tls_cert_file=cert.cert,
            tls_key_file=cert.key,
            tls_ca_file=pki.ca.cert,
            tls_require_client_cert=False,
            auth_keys_file=tmp_path / "keys.json",
            internal_token="internal-token-for-the-shm-tests-0123456789",
            gateway_address="127.0.0.1:0",
            gateway_metrics_address="127.0.0.1:0",
            gateway_shared_memory=True,
            shutdown_grace_s=0.5,
        ),
        endpoints=SnapshotFeeder(models),
        control=_no_control(),
        load_sink=_sink(),
        replicas=replicas,
    )
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{gateway.port}", grpc.ssl_channel_credentials(pki.ca.cert.read_bytes())
    )
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)

    def as_(tenant: str) -> dict[str, Any]:
        return {"metadata": (("authorization", f"Bearer {tokens[tenant]}"),), "timeout": 10}

    try:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        shm_a, shm_b = objects.make(64), objects.make(64)
        np.ndarray(x.shape, np.float32, buffer=shm_a.buf)[:] = x
        np.ndarray(x.shape, np.float32, buffer=shm_b.buf)[:] = x * 10
        await register(stub, "r", shm_a, 64, **as_("a"))
        reply = await stub.ModelInfer(shm_request(x, "r", model="ma"), **as_("a"))
        np.testing.assert_allclose(np.frombuffer(reply.raw_output_contents[0], np.float32), [6.0, 22.0])

        # To b, a's region is one that does not exist: the same words as a name nobody registered.
        status = await stub.SystemSharedMemoryStatus(kpb.SystemSharedMemoryStatusRequest(), **as_("b"))
        assert not status.regions
        code, message = await refused(stub.ModelInfer(shm_request(x, "r", model="mb"), **as_("b")))
        _, unknown = await refused(stub.ModelInfer(shm_request(x, "never", model="mb"), **as_("b")))
        assert code == grpc.StatusCode.NOT_FOUND and message == unknown.replace("never", "r")
        code, _ = await refused(
            stub.SystemSharedMemoryStatus(kpb.SystemSharedMemoryStatusRequest(name="r"), **as_("b"))
        )
        assert code == grpc.StatusCode.NOT_FOUND
        # b unregistering "r" leaves a's alone; b may have its own "r".
        await stub.SystemSharedMemoryUnregister(kpb.SystemSharedMemoryUnregisterRequest(name="r"), **as_("b"))
        await register(stub, "r", shm_b, 64, **as_("b"))
        reply_b = await stub.ModelInfer(shm_request(x, "r", model="mb"), **as_("b"))
        np.testing.assert_allclose(np.frombuffer(reply_b.raw_output_contents[0], np.float32), [60.0, 220.0])
        reply_a = await stub.ModelInfer(shm_request(x, "r", model="ma"), **as_("a"))
        np.testing.assert_allclose(np.frombuffer(reply_a.raw_output_contents[0], np.float32), [6.0, 22.0])
        # Without a key, nothing.
        code, _ = await refused(stub.SystemSharedMemoryStatus(kpb.SystemSharedMemoryStatusRequest(), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await channel.close()
        await gateway.stop(0.2)


def _no_control() -> Any:
    from tests.support.gateway import NoControl

    return NoControl()


def _sink() -> Any:
    from tests.support.gateway import RecordingLoadSink

    return RecordingLoadSink()


# -- real workers: the windows go by reference ---------------------------------------------------------------


async def test_real_workers_map_the_regions_themselves(
    tmp_path: Path,
    real_replicas: RealReplicas,  # noqa: F811 - the fixture imported above
    objects: Objects,
) -> None:
    """In-process inference workers share the gateway's host: they read the input window and write the
    output window themselves (the gateway sends no tensor bytes; the worker maps the object too)."""
    from tests.support.serving import MLP_ARGS, reference_forward

    replicas = real_replicas
    h = await _harness(tmp_path, SnapshotFeeder([replicas.deployment]), gateway_shared_memory=True)
    try:
        x = np.random.default_rng(0).standard_normal((3, MLP_ARGS["in_features"])).astype(np.float32)
        out_bytes = 3 * MLP_ARGS["out_features"] * 4
        shm_in, shm_out = objects.make(x.nbytes + 64), objects.make(out_bytes + 64)
        np.ndarray(x.shape, np.float32, buffer=shm_in.buf, offset=64)[:] = x
        await register(h.stub, "in", shm_in, x.nbytes + 64)
        await register(h.stub, "out", shm_out, out_bytes + 64)
        request = replicas.request(x)
        del request.raw_input_contents[:]
        in_region(request.inputs[0], "in", x.nbytes, offset=64)
        in_region(request.outputs.add(name="logits"), "out", out_bytes, offset=32)
        for _ in range(3):
            response = await h.stub.ModelInfer(request, timeout=30)
            assert list(response.raw_output_contents) == [b""]
            assert response.outputs[0].parameters["shared_memory_byte_size"].int64_param == out_bytes
            logits = np.ndarray((3, MLP_ARGS["out_features"]), np.float32, buffer=shm_out.buf, offset=32).copy()
            np.testing.assert_allclose(logits, reference_forward(replicas.path, x), rtol=1e-4, atol=1e-5)
        # Mapped twice in this process: by the gateway at registration, by the worker that served.
        maps = Path("/proc/self/maps").read_text()
        assert maps.count(f"/dev/shm/{shm_in.name.lstrip('/')}") >= 2, "the worker did not map the input itself"
    finally:
        await h.channel.close()
        await h.gateway.stop(0.5)
