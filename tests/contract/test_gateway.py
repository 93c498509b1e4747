"""The gateway through its public gRPC API: a real gateway on port 0, fed endpoint snapshots in-process,
in front of real grpc.aio worker servers (small ones defined here that speak the worker's data plane)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from inference import grpc_service_pb2 as kpb
from inference import grpc_service_pb2_grpc
from maas.scheduler.v1 import scheduler_pb2 as spb
from maas.scheduler.v1 import scheduler_pb2_grpc
from opentelemetry import propagate

from services.gateway.core.model import Deployment, Endpoint, ServedVersion
from services.gateway.main import RunningGateway, start
from services.gateway.settings import GatewaySettings
from shared.artifacts import Signature, TensorSpec
from shared.kserve.batching import BatchingSettings
from tests.support.gateway import NoControl, RecordingLoadSink, SnapshotFeeder

SIGNATURE = Signature(
    inputs=(TensorSpec("x", "FP32", (-1, 4)), TensorSpec("tag", "BYTES", (-1, 1))),
    outputs=(TensorSpec("y", "FP32", (-1, 1)),),
)
LM_SIGNATURE = Signature(
    inputs=(TensorSpec("input_ids", "INT64", (1, -1)),), outputs=(TensorSpec("token_id", "INT64", (1, 1)),)
)
MAX_BATCH = 4


class FakeWorker(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """The worker's data plane, small: ``y`` = row sums of ``x`` (+ version), tokens for ``lm``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.versions: list[str] = []
        self.exhausted = False
        self.delay_s = 0.0
        self.cancelled = asyncio.Event()
        self.streams = 0
        self.max_streams = 0

    @staticmethod
    def _version(context: grpc.aio.ServicerContext) -> str:
        return dict(context.invocation_metadata() or ()).get("maas-model-version", "")

    async def ModelInfer(self, request: kpb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        self.calls += 1
        version = self._version(context)
        self.versions.append(version)
        if self.exhausted:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        if self.delay_s:
            try:
                await asyncio.sleep(self.delay_s)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(request.inputs[0].shape)
        y = x.sum(axis=1, keepdims=True) + float(version)
        response = kpb.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
        response.outputs.add(name="y", datatype="FP32", shape=list(y.shape))
        response.raw_output_contents.append(y.astype(np.float32).tobytes())
        response.parameters["worker"].string_param = self.name
        return response

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[kpb.ModelInferRequest], context: Any) -> Any:
        self.streams += 1
        self.max_streams = max(self.max_streams, self.streams)
        try:
            async for response in self._stream(request_iterator, context):
                yield response
        finally:
            self.streams -= 1

    async def _stream(self, request_iterator: AsyncIterator[kpb.ModelInferRequest], context: Any) -> Any:
        version = self._version(context)
        async for request in request_iterator:
            ids = np.frombuffer(request.raw_input_contents[0], np.int64)
            count = request.parameters["max_tokens"].int64_param or 3
            for i in range(count):
                if self.delay_s:
                    try:
                        await asyncio.sleep(self.delay_s)
                    except asyncio.CancelledError:
                        self.cancelled.set()
                        raise
                out = kpb.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
                out.outputs.add(name="token_id", datatype="INT64", shape=[1, 1])
                out.raw_output_contents.append(np.array([[int(ids[-1]) + i + 1]], np.int64).tobytes())
                yield kpb.ModelStreamInferResponse(infer_response=out)
            final = kpb.ModelStreamInferResponse(
                infer_response=kpb.ModelInferResponse(
                    model_name=request.model_name, model_version=version, id=request.id
                )
            )
            final.infer_response.parameters["triton_final_response"].bool_param = True
            yield final

    async def ModelStatistics(self, request: kpb.ModelStatisticsRequest, context: Any) -> kpb.ModelStatisticsResponse:
        stats = kpb.ModelStatistics(name="registry-name", version="1", inference_count=self.calls, execution_count=1)
        stats.last_inference = 1000 + self.calls
        stats.inference_stats.success.count = self.calls
        stats.inference_stats.success.ns = 10 * self.calls
        stats.batch_stats.add(batch_size=1).compute_infer.count = self.calls
        return kpb.ModelStatisticsResponse(model_stats=[stats])


class WorkerServer:
    def __init__(self, name: str) -> None:
        self.worker = FakeWorker(name)
        self.server = grpc.aio.server()
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.worker, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"

    async def start(self) -> WorkerServer:
        await self.server.start()
        return self

    async def stop(self) -> None:
        await self.server.stop(0)


def served(version: int, aliases: tuple[str, ...] = (), *, signature: Signature = SIGNATURE) -> ServedVersion:
    streaming = signature is LM_SIGNATURE
    return ServedVersion(
        version=version,
        signature=signature,
        max_batch_size=1 if streaming else MAX_BATCH,
        streaming=streaming,
        aliases=aliases,
        batching=BatchingSettings(max_batch_size=MAX_BATCH),
    )


def deployment(name: str, workers: list[WorkerServer], version: int = 1, **fields: Any) -> Deployment:
    versions = fields.pop("versions", {version: served(version)})
    return Deployment(
        name=name,
        versions=versions,
        endpoints=tuple(Endpoint(w.address, version, f"{name}-{i}") for i, w in enumerate(workers)),
        default_version=version,
        **fields,
    )


def infer_request(model: str = "m", x: np.ndarray | None = None, version: str = "") -> kpb.ModelInferRequest:
    x = np.arange(8, dtype=np.float32).reshape(2, 4) if x is None else x
    request = kpb.ModelInferRequest(model_name=model, model_version=version, id="r1")
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    tags = b"".join(len(b"ab").to_bytes(4, "little") + b"ab" for _ in range(x.shape[0]))
    request.inputs.add(name="tag", datatype="BYTES", shape=[x.shape[0], 1])
    request.raw_input_contents.append(tags)
    return request


def output(response: kpb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(response.outputs[0].shape)


class Harness:
    def __init__(self, gateway: RunningGateway, feeder: SnapshotFeeder, sink: RecordingLoadSink) -> None:
        self.gateway = gateway
        self.feeder = feeder
        self.sink = sink
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
        self.stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)


@pytest.fixture
async def workers() -> AsyncIterator[list[WorkerServer]]:
    servers = [await WorkerServer(f"w{i}").start() for i in range(3)]
    yield servers
    for server in servers:
        await server.stop()


async def _harness(tmp_path: Any, feeder: SnapshotFeeder, **settings: Any) -> Harness:
    sink = RecordingLoadSink()
    gateway = await start(
        GatewaySettings(
            home=tmp_path,
            gateway_address="127.0.0.1:0",
            gateway_metrics_address="127.0.0.1:0",
            gateway_report_interval_s=0.1,
            shutdown_grace_s=0.5,
            **settings,
        ),
        endpoints=feeder,
        load_sink=sink,
        control=NoControl(),
    )
    return Harness(gateway, feeder, sink)


@pytest.fixture
async def harness(tmp_path: Any, workers: list[WorkerServer]) -> AsyncIterator[Harness]:
    h = await _harness(tmp_path, SnapshotFeeder([deployment("m", workers[:2])]))
    yield h
    await h.channel.close()
    await h.gateway.stop(0.5)


async def test_model_infer_through_the_stubs(harness: Harness, workers: list[WorkerServer]) -> None:
    response = await harness.stub.ModelInfer(infer_request(), timeout=10)
    assert response.model_name == "m" and response.model_version == "1" and response.id == "r1"
    np.testing.assert_allclose(output(response), [[7.0], [23.0]])
    assert {w.worker.versions[-1] for w in workers[:2] if w.worker.versions} == {"1"}
    live = await harness.stub.ServerLive(kpb.ServerLiveRequest())
    ready = await harness.stub.ServerReady(kpb.ServerReadyRequest())
    model_ready = await harness.stub.ModelReady(kpb.ModelReadyRequest(name="m"))
    other = await harness.stub.ModelReady(kpb.ModelReadyRequest(name="nope"))
    assert live.live and ready.ready and model_ready.ready and not other.ready


async def test_metadata_config_and_server_metadata(harness: Harness) -> None:
    meta = await harness.stub.ModelMetadata(kpb.ModelMetadataRequest(name="m"))
    assert meta.name == "m" and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("x", "FP32", [-1, 4]),
        ("tag", "BYTES", [-1, 1]),
    ]
    config = (await harness.stub.ModelConfig(kpb.ModelConfigRequest(name="m"))).config
    assert config.name == "m" and config.max_batch_size == MAX_BATCH and list(config.input[0].dims) == [4]
    server = await harness.stub.ServerMetadata(kpb.ServerMetadataRequest())
    assert server.name == "maas" and "model_repository" in server.extensions
    assert not {"binary_tensor_data", "system_shared_memory", "cuda_shared_memory"} & set(server.extensions)


async def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


async def test_unknown_model_and_version_are_not_found(harness: Harness) -> None:
    code, message = await _code(harness.stub.ModelInfer(infer_request("nope"), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND and "'nope' is not deployed" in message and "m" in message
    code, message = await _code(harness.stub.ModelInfer(infer_request(version="7"), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND and "'7'" in message and "served: 1" in message
    code, _ = await _code(harness.stub.ModelMetadata(kpb.ModelMetadataRequest(name="m", version="nope")))
    assert code == grpc.StatusCode.NOT_FOUND
    for version in ("²", "\u0661", "9" * 40):  # digits int() rejects or takes, and beyond int64
        code, message = await _code(harness.stub.ModelInfer(infer_request(version=version), timeout=10))
        assert code == grpc.StatusCode.NOT_FOUND, (version, message)


def _bad_requests() -> list[tuple[str, kpb.ModelInferRequest, str]]:
    cases = []
    missing = infer_request()
    del missing.inputs[1]
    del missing.raw_input_contents[1]
    cases.append(("missing input", missing, "tag"))
    extra = infer_request()
    extra.inputs.add(name="zzz", datatype="FP32", shape=[2, 1])
    extra.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
    cases.append(("extra input", extra, "zzz"))
    dtype = infer_request()
    dtype.inputs[0].datatype = "FP64"
    cases.append(("wrong datatype", dtype, "x"))
    shape = infer_request()
    shape.inputs[0].shape[:] = [2, 5]
    cases.append(("wrong shape", shape, "x"))
    size = infer_request()
    size.raw_input_contents[0] = size.raw_input_contents[0][:-4]
    cases.append(("raw byte size mismatch", size, "x"))
    malformed = infer_request()
    malformed.raw_input_contents[1] = b"\x09\x00\x00\x00ab"
    cases.append(("malformed BYTES", malformed, "tag"))
    big = infer_request(x=np.zeros((MAX_BATCH + 1, 4), np.float32))
    cases.append(("batch above max", big, "x"))
    return cases


@pytest.mark.parametrize("case", range(len(_bad_requests())), ids=[c[0] for c in _bad_requests()])
async def test_bad_inputs_are_invalid_argument_naming_the_input(harness: Harness, case: int) -> None:
    _, request, name = _bad_requests()[case]
    code, message = await _code(harness.stub.ModelInfer(request, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert f"'{name}'" in message


async def test_undecodable_request_is_invalid_argument(harness: Harness) -> None:
    call = harness.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\xff\xff\xff", timeout=10)
    code, _ = await _code(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_retries_on_another_replica_when_one_is_stopped(harness: Harness, workers: list[WorkerServer]) -> None:
    await workers[0].stop()
    results = await asyncio.gather(*(harness.stub.ModelInfer(infer_request(), timeout=10) for _ in range(20)))
    assert all(r.parameters["worker"].string_param == "w1" for r in results)
    assert workers[1].worker.calls == 20


async def test_hold_until_an_endpoint_appears(tmp_path: Any, workers: list[WorkerServer]) -> None:
    h = await _harness(tmp_path, SnapshotFeeder([deployment("m", [])]))
    try:
        call = h.stub.ModelInfer(infer_request(), timeout=10)
        # The held request is reported at once (scale from zero) and waits.
        await asyncio.wait_for(_reported(h.sink, "m", 1.0), 5)
        assert not call.done()
        h.feeder.publish([deployment("m", workers[2:])])
        response = await call
        assert response.parameters["worker"].string_param == "w2"
        await asyncio.wait_for(_reported(h.sink, "m", 0.0), 5)
    finally:
        await h.channel.close()
        await h.gateway.stop(0.5)


async def test_requests_wait_for_the_first_snapshot_and_ready_follows_the_stream(
    tmp_path: Any, workers: list[WorkerServer]
) -> None:
    # A gateway that has not heard from the scheduler yet (every `maas up` starts it first) cannot know
    # which models exist: it is not ready, and holds requests for any model instead of NOT_FOUND.
    h = await _harness(tmp_path, SnapshotFeeder(), gateway_max_hold_s=0.3)
    try:
        assert not (await h.stub.ServerReady(kpb.ServerReadyRequest())).ready
        call = h.stub.ModelInfer(infer_request(), timeout=10)
        metadata = h.stub.ModelMetadata(kpb.ModelMetadataRequest(name="m"), timeout=10)
        await asyncio.sleep(0.2)
        assert not call.done() and not metadata.done()
        h.feeder.publish([deployment("m", workers[:1])])
        assert (await call).parameters["worker"].string_param == "w0"
        assert (await metadata).name == "m"
        assert (await h.stub.ServerReady(kpb.ServerReadyRequest())).ready

        # The stream breaks: known models are still served from the last snapshot, the server is not ready,
        # and an unknown model is held (here past gateway_max_hold_s: UNAVAILABLE, retryable).
        h.feeder.lose()
        assert not (await h.stub.ServerReady(kpb.ServerReadyRequest())).ready
        assert (await h.stub.ModelInfer(infer_request(), timeout=10)).model_name == "m"
        code, message = await _code(h.stub.ModelInfer(infer_request("other")))
        assert code == grpc.StatusCode.UNAVAILABLE and "still learning" in message
        # Back in sync: an unknown model is NOT_FOUND at once.
        h.feeder.publish([deployment("m", workers[:1])])
        code, _ = await _code(h.stub.ModelInfer(infer_request("other"), timeout=10))
        assert code == grpc.StatusCode.NOT_FOUND
    finally:
        await h.channel.close()
        await h.gateway.stop(0.5)


async def _reported(sink: RecordingLoadSink, name: str, value: float) -> None:
    while not (sink.reports and sink.reports[-1].get(name) == value):
        sink.reported.clear()
        await sink.reported.wait()


async def test_hold_expires_with_deadline_exceeded(tmp_path: Any) -> None:
    h = await _harness(tmp_path, SnapshotFeeder([deployment("m", [])]), gateway_max_hold_s=0.3)
    try:
        started = time.monotonic()
        code, message = await _code(h.stub.ModelInfer(infer_request(), timeout=0.5))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        # Without a deadline the hold ends after gateway_max_hold_s, UNAVAILABLE with a clear message.
        code, message = await _code(h.stub.ModelInfer(infer_request()))
        assert code == grpc.StatusCode.UNAVAILABLE and "became ready within 0.3 s" in message
        assert time.monotonic() - started < 5
    finally:
        await h.channel.close()
        await h.gateway.stop(0.5)


async def test_resource_exhausted_passes_through_unretried(harness: Harness, workers: list[WorkerServer]) -> None:
    for w in workers[:2]:
        w.worker.exhausted = True
    code, _ = await _code(harness.stub.ModelInfer(infer_request(), timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert workers[0].worker.calls + workers[1].worker.calls == 1


async def test_cancelling_the_client_call_cancels_the_worker(harness: Harness, workers: list[WorkerServer]) -> None:
    for w in workers[:2]:
        w.worker.delay_s = 30
    call = harness.stub.ModelInfer(infer_request(), timeout=60)
    await asyncio.sleep(0.3)
    call.cancel()
    done = asyncio.create_task(
        asyncio.wait(
            [asyncio.create_task(w.worker.cancelled.wait()) for w in workers[:2]], return_when=asyncio.FIRST_COMPLETED
        )
    )
    await asyncio.wait_for(done, 5)


async def test_canary_split_and_named_versions(tmp_path: Any, workers: list[WorkerServer]) -> None:
    split = Deployment(
        name="m",
        versions={1: served(1), 2: served(2, ("canary",))},
        endpoints=(Endpoint(workers[0].address, 1), Endpoint(workers[1].address, 2)),
        default_version=1,
        canary_version=2,
        canary_weight_percent=30,
    )
    h = await _harness(tmp_path, SnapshotFeeder([split]))
    try:
        replies = await asyncio.gather(*(h.stub.ModelInfer(infer_request(), timeout=10) for _ in range(200)))
        canary = sum(r.model_version == "2" for r in replies)
        assert 30 <= canary <= 90  # 60 expected; binomial sd ~6.5
        named = await asyncio.gather(
            *(h.stub.ModelInfer(infer_request(version="canary"), timeout=10) for _ in range(10))
        )
        assert {r.model_version for r in named} == {"2"}
        assert workers[1].worker.versions[-1] == "2"
        pinned = await h.stub.ModelInfer(infer_request(version="1"), timeout=10)
        np.testing.assert_allclose(output(pinned), [[7.0], [23.0]])
    finally:
        await h.channel.close()
        await h.gateway.stop(0.5)


async def test_statistics_sum_over_replicas(harness: Harness, workers: list[WorkerServer]) -> None:
    await asyncio.gather(*(harness.stub.ModelInfer(infer_request(), timeout=10) for _ in range(6)))
    stats = (await harness.stub.ModelStatistics(kpb.ModelStatisticsRequest(name="m"))).model_stats
    assert len(stats) == 1 and stats[0].name == "m" and stats[0].version == "1"
    assert stats[0].inference_count == 6 and stats[0].execution_count == 2
    assert stats[0].inference_stats.success.ns == 60
    assert [(b.batch_size, b.compute_infer.count) for b in stats[0].batch_stats] == [(1, 6)]
    assert stats[0].last_inference == 1000 + max(w.worker.calls for w in workers[:2])


async def test_stream_infer_tokens_and_errors(tmp_path: Any, workers: list[WorkerServer]) -> None:
    lm = Deployment(
        name="lm",
        versions={1: served(1, signature=LM_SIGNATURE)},
        endpoints=(Endpoint(workers[0].address, 1),),
        default_version=1,
    )
    h = await _harness(tmp_path, SnapshotFeeder([lm]))
    try:

        def request(rid: str, start: int, model: str = "lm") -> kpb.ModelInferRequest:
            r = kpb.ModelInferRequest(model_name=model, id=rid)
            r.inputs.add(name="input_ids", datatype="INT64", shape=[1, 2])
            r.raw_input_contents.append(np.array([[0, start]], np.int64).tobytes())
            r.parameters["max_tokens"].int64_param = 3
            return r

        async def requests() -> AsyncIterator[kpb.ModelInferRequest]:
            yield request("a", 10)
            yield request("b", 100)
            yield request("c", 5, model="nope")

        tokens: dict[str, list[int]] = {}
        finals, errors = set(), []
        async for message in h.stub.ModelStreamInfer(requests(), timeout=10):
            if message.error_message:
                errors.append((message.infer_response.id, message.error_message))
                continue
            r = message.infer_response
            if r.parameters["triton_final_response"].bool_param:
                finals.add(r.id)
            else:
                tokens.setdefault(r.id, []).append(int(np.frombuffer(r.raw_output_contents[0], np.int64)[0]))
        assert tokens == {"a": [11, 12, 13], "b": [101, 102, 103]}
        assert finals == {"a", "b"}
        assert len(errors) == 1 and errors[0][0] == "c" and "not deployed" in errors[0][1]
    finally:
        await h.channel.close()
        await h.gateway.stop(0.5)


async def test_one_stream_runs_a_bounded_number_of_requests_at_once(tmp_path: Any, workers: list[WorkerServer]) -> None:
    lm = Deployment(
        name="lm",
        versions={1: served(1, signature=LM_SIGNATURE)},
        endpoints=(Endpoint(workers[0].address, 1),),
        default_version=1,
    )
    workers[0].worker.delay_s = 0.02
    h = await _harness(tmp_path, SnapshotFeeder([lm]), gateway_stream_max_in_flight=2, gateway_stream_buffer=2)
    try:

        async def requests() -> AsyncIterator[kpb.ModelInferRequest]:
            for i in range(8):
                r = kpb.ModelInferRequest(model_name="lm", id=f"r{i}")
                r.inputs.add(name="input_ids", datatype="INT64", shape=[1, 2])
                r.raw_input_contents.append(np.array([[0, 10 * i]], np.int64).tobytes())
                r.parameters["max_tokens"].int64_param = 3
                yield r

        finals = set()
        async for message in h.stub.ModelStreamInfer(requests(), timeout=30):
            assert not message.error_message, message.error_message
            if message.infer_response.parameters["triton_final_response"].bool_param:
                finals.add(message.infer_response.id)
            await asyncio.sleep(0.005)  # a slow reader: the buffer fills and the workers' streams wait
        # Every request was served, never more than two of them at once on the worker.
        assert finals == {f"r{i}" for i in range(8)}
        assert workers[0].worker.max_streams == 2
    finally:
        await h.channel.close()
        await h.gateway.stop(0.5)


async def test_an_idle_stream_is_ended_but_not_one_waiting_for_its_answers(
    tmp_path: Any, workers: list[WorkerServer]
) -> None:
    lm = Deployment(
        name="lm",
        versions={1: served(1, signature=LM_SIGNATURE)},
        endpoints=(Endpoint(workers[0].address, 1),),
        default_version=1,
    )
    workers[0].worker.delay_s = 0.25  # 4 tokens: 1 s of generation, longer than the idle timeout
    h = await _harness(tmp_path, SnapshotFeeder([lm]), gateway_stream_idle_s=0.4)
    try:
        never = asyncio.Event()

        async def one_request_then_silence() -> AsyncIterator[kpb.ModelInferRequest]:
            r = kpb.ModelInferRequest(model_name="lm", id="slow")
            r.inputs.add(name="input_ids", datatype="INT64", shape=[1, 2])
            r.raw_input_contents.append(np.array([[0, 1]], np.int64).tobytes())
            r.parameters["max_tokens"].int64_param = 4
            yield r
            await never.wait()

        answers = 0
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for message in h.stub.ModelStreamInfer(one_request_then_silence(), timeout=20):
                assert not message.error_message
                answers += 1
        # Every token and the final answer came (waiting for them is not idle), then the silence ended it.
        assert answers == 5
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "sent nothing" in (ended.value.details() or "")
    finally:
        await h.channel.close()
        await h.gateway.stop(0.5)


async def test_reflection_lists_the_inference_service(harness: Harness) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(harness.channel)

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(ask()):
        names = {s.name for s in response.list_services_response.service}
        assert "inference.GRPCInferenceService" in names
        break


# -- real inference workers -------------------------------------------------------------------------------


class RealReplicas:
    """Real workers (``services.inference``) serving a zoo MLP from the registry, and their deployment."""

    def __init__(self, replicas: list[Any], deployment: Deployment, path: Any, version: int, input_name: str) -> None:
        self.replicas = replicas
        self.deployment = deployment
        self.path = path
        self.version = version
        self.input_name = input_name

    def request(self, x: np.ndarray) -> kpb.ModelInferRequest:
        from tests.support.serving import infer_request as mlp_request

        return mlp_request("digits", x, name=self.input_name)


@pytest.fixture
async def real_replicas(tmp_path: Any, registry: Any, registry_client: Any) -> AsyncIterator[RealReplicas]:
    from maas.inference.v1 import worker_pb2, worker_pb2_grpc

    from services.gateway.adapters.scheduler import deployment_from_pb
    from services.inference.main import hosted
    from shared.kserve.convert import batching_to_pb
    from tests.support.serving import MLP_ARGS, zoo_file

    path, manifest_json = await asyncio.to_thread(zoo_file, tmp_path, "mlp", MLP_ARGS, 3)
    version = (await registry_client.upload_file("digits", path, manifest_json)).number
    options = {
        "home": str(tmp_path / "worker"),
        "inference_address": "127.0.0.1:0",
        "inference_metrics_address": "127.0.0.1:0",
        "inference_registry_address": f"127.0.0.1:{registry.port}",
        "inference_torch_threads": 1,
        "shutdown_grace_s": 0.5,
        "models": [{"model": "digits", "version": version, "batching": {"max_batch_size": 8}}],
    }
    replicas = [await hosted(options), await hosted(options)]
    try:
        addresses = [f"127.0.0.1:{r.port}" for r in replicas]
        async with grpc.aio.insecure_channel(addresses[0]) as channel:
            loaded = (
                await worker_pb2_grpc.InferenceWorkerStub(channel).ListModels(worker_pb2.ListModelsRequest())
            ).models[0]
        snapshot = spb.DeploymentEndpoints(
            name="digits",
            state=spb.DEPLOYMENT_READY,
            default_version=version,
            versions=[
                spb.ServedVersion(
                    version=version,
                    architecture="mlp",
                    signature=loaded.signature,
                    batching=batching_to_pb(BatchingSettings(max_batch_size=8)),
                )
            ],
            endpoints=[spb.Endpoint(replica_id=f"r{i}", address=a, version=version) for i, a in enumerate(addresses)],
        )
        yield RealReplicas(replicas, deployment_from_pb(snapshot), path, int(version), loaded.signature.inputs[0].name)
    finally:
        for replica in replicas:
            await replica.stop(0)


async def test_real_inference_workers_behind_the_gateway(tmp_path: Any, real_replicas: RealReplicas) -> None:
    """Two real workers behind the gateway (requests on their InferStreams), one stopped mid-way."""
    from tests.support.serving import MLP_ARGS, output_array, reference_forward

    replicas, version, name = real_replicas.replicas, real_replicas.version, real_replicas.input_name
    h = await _harness(tmp_path, SnapshotFeeder([real_replicas.deployment]))
    try:
        x = np.random.default_rng(0).standard_normal((3, MLP_ARGS["in_features"])).astype(np.float32)
        assert (await h.stub.ModelMetadata(kpb.ModelMetadataRequest(name="digits"))).inputs[0].name == name
        replies = await asyncio.gather(*(h.stub.ModelInfer(real_replicas.request(x), timeout=30) for _ in range(8)))
        expected = reference_forward(real_replicas.path, x)
        for reply in replies:
            assert reply.model_name == "digits" and reply.model_version == str(version)
            np.testing.assert_allclose(output_array(reply), expected, rtol=1e-4, atol=1e-5)
        bad = real_replicas.request(x[:, :-1])
        code, message = await _code(h.stub.ModelInfer(bad, timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and f"'{name}'" in message
        await replicas[0].stop(0)
        replies = await asyncio.gather(*(h.stub.ModelInfer(real_replicas.request(x), timeout=30) for _ in range(8)))
        assert len(replies) == 8
        stats = (await h.stub.ModelStatistics(kpb.ModelStatisticsRequest(name="digits"))).model_stats
        assert stats[0].name == "digits" and stats[0].inference_count >= 8 * 3
    finally:
        await h.channel.close()
        await h.gateway.stop(0.5)


async def test_a_cancelled_client_call_never_computes_on_a_real_worker(
    tmp_path: Any, real_replicas: RealReplicas
) -> None:
    """The client gives up while its request is queued behind a busy compute thread: the gateway's cancel
    frame reaches the worker, which drops the request before computing it."""
    from tests.support.serving import MLP_ARGS

    replica = real_replicas.replicas[0]
    single = dataclasses.replace(real_replicas.deployment, endpoints=real_replicas.deployment.endpoints[:1])
    served = replica.host.loaded()[0]
    executions = served.stats.execution_count
    h = await _harness(tmp_path, SnapshotFeeder([single]))
    release = threading.Event()
    blocker = asyncio.get_running_loop().run_in_executor(replica.host.executor, release.wait, 30)
    try:
        x = np.zeros((1, MLP_ARGS["in_features"]), np.float32)
        running = asyncio.ensure_future(h.stub.ModelInfer(real_replicas.request(x), timeout=30))
        await _until(lambda: served.batcher.ongoing == 1, 10)  # dispatched: waits for the compute thread
        queued = h.stub.ModelInfer(real_replicas.request(x), timeout=30)
        waiting = asyncio.ensure_future(queued)
        await _until(lambda: served.batcher.ongoing == 2, 10)
        queued.cancel()
        await _until(lambda: served.batcher.ongoing == 1, 10)  # dropped from the worker's queue
        release.set()
        await blocker
        assert (await running).model_name == "digits"
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert served.stats.execution_count == executions + 1
    finally:
        release.set()
        await h.channel.close()
        await h.gateway.stop(0.5)


async def test_the_workers_span_is_a_child_of_the_gateways(tmp_path: Any, real_replicas: RealReplicas) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from services.inference.api.stream import ENTRY_SPAN
    from shared.tracing import configure_tracing
    from tests.support.serving import MLP_ARGS

    exporter = InMemorySpanExporter()
    configure_tracing("tests").add_span_processor(SimpleSpanProcessor(exporter))
    h = await _harness(tmp_path, SnapshotFeeder([real_replicas.deployment]))
    try:
        x = np.zeros((2, MLP_ARGS["in_features"]), np.float32)
        with trace.get_tracer("tests").start_as_current_span("client") as client:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            await h.stub.ModelInfer(real_replicas.request(x), timeout=30, metadata=tuple(carrier.items()))
        trace_id = client.get_span_context().trace_id
        spans = {s.name: s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id}
        gateway_span = spans["/inference.GRPCInferenceService/ModelInfer"]
        assert gateway_span.parent is not None and gateway_span.parent.span_id == client.get_span_context().span_id
        worker_span = spans[ENTRY_SPAN]
        assert worker_span.parent is not None and worker_span.parent.span_id == gateway_span.context.span_id
    finally:
        await h.channel.close()
        await h.gateway.stop(0.5)


# -- the scheduler link -----------------------------------------------------------------------------------


class FakeScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    """The scheduler's deployment RPCs in memory: a deployment is READY at once on ``worker``."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self.deployments: dict[str, spb.Deployment] = {}
        self.reports: list[dict[str, float]] = []
        self.changed = asyncio.Event()
        self.watchers = 0

    def _snapshot(self) -> spb.WatchEndpointsResponse:
        response = spb.WatchEndpointsResponse()
        for d in self.deployments.values():
            response.deployments.append(
                spb.DeploymentEndpoints(
                    name=d.name,
                    state=d.state,
                    default_version=d.version,
                    versions=[
                        spb.ServedVersion(version=d.version, signature=_signature_pb(), batching=d.spec.batching)
                    ],
                    endpoints=[spb.Endpoint(replica_id="r0", address=self.worker, version=d.version)],
                )
            )
        return response

    async def WatchEndpoints(self, request: Any, context: Any) -> AsyncIterator[spb.WatchEndpointsResponse]:
        self.watchers += 1
        while True:
            self.changed.clear()
            yield self._snapshot()
            await self.changed.wait()

    async def ReportLoad(self, request: spb.ReportLoadRequest, context: Any) -> spb.ReportLoadResponse:
        self.reports.append(dict(request.ongoing))
        return spb.ReportLoadResponse()

    def _put(self, spec: spb.DeploymentSpec, generation: int) -> spb.Deployment:
        name = spec.name or spec.model
        version = int(spec.version or 1)
        deployment = spb.Deployment(
            name=name, spec=spec, state=spb.DEPLOYMENT_READY, version=version, generation=generation
        )
        self.deployments[name] = deployment
        self.changed.set()
        return deployment

    async def CreateDeployment(self, request: Any, context: Any) -> spb.CreateDeploymentResponse:
        if request.spec.model == "broken":
            d = spb.Deployment(
                name="broken", spec=request.spec, state=spb.DEPLOYMENT_FAILED, message="no such artifact"
            )
            self.deployments["broken"] = d
            return spb.CreateDeploymentResponse(deployment=d)
        return spb.CreateDeploymentResponse(deployment=self._put(request.spec, 1))

    async def UpdateDeployment(self, request: Any, context: Any) -> spb.UpdateDeploymentResponse:
        old = self.deployments[request.spec.name]
        return spb.UpdateDeploymentResponse(deployment=self._put(request.spec, old.generation + 1))

    async def GetDeployment(self, request: Any, context: Any) -> spb.GetDeploymentResponse:
        if request.name not in self.deployments:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"deployment '{request.name}' not found")
        return spb.GetDeploymentResponse(deployment=self.deployments[request.name])

    async def ListDeployments(self, request: Any, context: Any) -> spb.ListDeploymentsResponse:
        return spb.ListDeploymentsResponse(deployments=list(self.deployments.values()))

    async def DeleteDeployment(self, request: Any, context: Any) -> spb.DeleteDeploymentResponse:
        self.deployments.pop(request.name, None)
        self.changed.set()
        return spb.DeleteDeploymentResponse()


async def _until(condition: Any, timeout: float) -> None:
    """Poll ``condition`` (state kept by a fake server, with no event to wait on) until true or timeout."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:  # noqa: ASYNC110 - polling a fake's counters
        await asyncio.sleep(0.02)


async def _server_ready_becomes(stub: Any, value: bool, timeout: float) -> bool:
    """Poll ServerReady until it answers ``value`` or ``timeout`` passes; the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        ready = bool((await stub.ServerReady(kpb.ServerReadyRequest())).ready)
        if ready == value or time.monotonic() > deadline:
            return ready
        await asyncio.sleep(0.02)


def _signature_pb() -> Any:
    from shared.kserve.convert import signature_to_pb

    return signature_to_pb(SIGNATURE)


async def _start_scheduler(fake: FakeScheduler, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(fake, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


async def test_repository_and_endpoints_through_a_scheduler(tmp_path: Any, workers: list[WorkerServer]) -> None:
    fake = FakeScheduler(workers[0].address)
    server, port = await _start_scheduler(fake)
    gateway = await start(
        GatewaySettings(
            home=tmp_path,
            gateway_address="127.0.0.1:0",
            gateway_metrics_address="127.0.0.1:0",
            gateway_scheduler_address=f"127.0.0.1:{port}",
            gateway_registry_address="",
            gateway_report_interval_s=0.05,
            gateway_watch_backoff_max_s=0.2,
        )
    )
    h = Harness(gateway, SnapshotFeeder(), RecordingLoadSink())
    try:
        load = kpb.RepositoryModelLoadRequest(model_name="m")
        load.parameters["version"].string_param = "2"
        load.parameters["max_batch_size"].int64_param = 4
        await h.stub.RepositoryModelLoad(load, timeout=10)
        assert fake.deployments["m"].spec.batching.max_batch_size == 4 and fake.deployments["m"].spec.min_replicas == 1
        assert (await h.stub.ModelReady(kpb.ModelReadyRequest(name="m"))).ready
        reply = await h.stub.ModelInfer(infer_request("m"), timeout=10)
        assert reply.model_version == "2"
        index = (await h.stub.RepositoryIndex(kpb.RepositoryIndexRequest())).models
        assert [(m.name, m.version, m.state) for m in index] == [("m", "2", "READY")]
        bad = kpb.RepositoryModelLoadRequest(model_name="broken")
        code, message = await _code(h.stub.RepositoryModelLoad(bad, timeout=10))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "no such artifact" in message
        unknown = kpb.RepositoryModelLoadRequest(model_name="m")
        unknown.parameters["colour"].string_param = "red"
        code, _ = await _code(h.stub.RepositoryModelLoad(unknown, timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        ready_only = (await h.stub.RepositoryIndex(kpb.RepositoryIndexRequest(ready=True))).models
        assert [m.name for m in ready_only] == ["m"]
        await _until(lambda: any(r.get("m") == 0.0 for r in fake.reports), 5)
        assert any(r.get("m") == 0.0 for r in fake.reports), fake.reports[-3:]

        # The scheduler restarts on the same port: the gateway keeps serving, is not ready while it is
        # away, and reconnects (ready again) within its capped backoff.
        assert (await h.stub.ServerReady(kpb.ServerReadyRequest())).ready
        await server.stop(0)
        reply = await h.stub.ModelInfer(infer_request("m"), timeout=10)
        assert reply.model_version == "2"
        assert await _server_ready_becomes(h.stub, False, 5) is False
        server, _ = await _start_scheduler(fake, port)
        await _until(lambda: fake.watchers >= 2, 10)
        assert fake.watchers >= 2
        assert await _server_ready_becomes(h.stub, True, 5) is True

        await h.stub.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="m"), timeout=10)
        assert not (await h.stub.ModelReady(kpb.ModelReadyRequest(name="m"))).ready
        code, _ = await _code(
            h.stub.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="m"), timeout=10)
        )
        assert code == grpc.StatusCode.NOT_FOUND
    finally:
        await h.channel.close()
        await gateway.stop(0.5)
        await server.stop(0)
