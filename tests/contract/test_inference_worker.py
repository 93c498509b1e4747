"""The inference worker through its public gRPC API: a real registry and a real worker on port 0.

Models are tiny zoo models pushed to the registry; results are compared with the same artifact loaded
in-process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference import grpc_service_pb2 as kpb
from inference import grpc_service_pb2_grpc
from maas.inference.v1 import worker_pb2 as wpb
from maas.inference.v1 import worker_pb2_grpc

from services.inference.main import RunningWorker, hosted
from shared.artifacts import Manifest, build_model, greedy_generate, load_artifact, save_artifact
from shared.artifacts.decoder import DecoderLM
from shared.errors import DeadlineExceeded, InvalidArgument, MaasError, Unavailable
from shared.grpc.status import error_from_status

MLP = {"in_features": 16, "hidden": [32], "out_features": 4}
# Big enough that one execution takes a while on one thread (the health and queue-full tests need that).
SLOW_MLP = {"in_features": 256, "hidden": [2048, 2048, 2048], "out_features": 4}
# One row takes well under a millisecond (the batcher's fast path); LANE_BUSY_ROWS hold the compute thread
# for a good fraction of a second.
LANE_MLP = {"in_features": 256, "hidden": [1024, 1024], "out_features": 4}
LANE_BUSY_ROWS = 4096
LM = {"vocab_size": 64, "context": 32, "width": 32, "depth": 1, "heads": 2}


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    # One backend is enough here: the worker only reads versions.
    return f"sqlite:///{tmp_path / 'registry.db'}"


async def push(client: Any, tmp_path: Path, name: str, architecture: str, arguments: dict, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    manifest = Manifest.for_model(architecture, arguments)
    path = tmp_path / f"{name}-{seed}.safetensors"
    save_artifact(build_model(manifest), manifest, path)
    await client.upload_file(name, path, manifest.to_json())
    return path


async def start_worker(registry: Any, home: Path) -> RunningWorker:
    return await hosted(
        {
            "home": home,
            "inference_registry_address": f"127.0.0.1:{registry.port}",
            "inference_device": "cpu",
            "inference_memory_budget_bytes": 64 * 1024 * 1024,
            "shutdown_grace_s": 1.0,
        }
    )


@pytest.fixture
async def worker(registry: Any, tmp_path: Path) -> AsyncIterator[RunningWorker]:
    running = await start_worker(registry, tmp_path / "home")
    yield running
    await running.stop(0.5)


@pytest.fixture
async def channel(worker: RunningWorker) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as ch:
        yield ch


def kserve(channel: grpc.aio.Channel) -> grpc_service_pb2_grpc.GRPCInferenceServiceStub:
    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)


def control(channel: grpc.aio.Channel) -> worker_pb2_grpc.InferenceWorkerStub:
    return worker_pb2_grpc.InferenceWorkerStub(channel)


async def load(channel: grpc.aio.Channel, model: str, version: int = 1, **batching: Any) -> wpb.LoadedModel:
    request = wpb.LoadModelRequest(
        ref=wpb.ModelRef(model=model, version=version), batching=wpb.BatchingConfig(**batching)
    )
    return (await control(channel).LoadModel(request, timeout=60)).model


def raw_request(model: str, x: np.ndarray, **params: int) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model, id="r1")
    request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    for key, value in params.items():
        request.parameters[key].int64_param = value
    return request


def output(response: kpb.ModelInferResponse, index: int = 0) -> np.ndarray:
    tensor = response.outputs[index]
    return np.frombuffer(response.raw_output_contents[index], dtype="<f4").reshape(tuple(tensor.shape))


async def test_mlp_infer_metadata_and_errors(registry_client: Any, channel: grpc.aio.Channel, tmp_path: Path) -> None:
    path = await push(registry_client, tmp_path, "mlp", "mlp", MLP)
    loaded = await load(channel, "mlp", max_batch_size=8)
    assert loaded.architecture == "mlp" and loaded.device == "cpu" and loaded.memory_bytes > 0
    assert loaded.batching.max_batch_size == 8 and loaded.batching.max_queue_delay_us == 2000
    reference = load_artifact(path)
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    with torch.inference_mode():
        expected = reference(torch.from_numpy(x)).numpy()

    stub = kserve(channel)
    response = await stub.ModelInfer(raw_request("mlp", x), timeout=10)
    assert response.model_name == "mlp" and response.model_version == "1" and response.id == "r1"
    np.testing.assert_allclose(output(response), expected, rtol=1e-5, atol=1e-5)

    typed = kpb.ModelInferRequest(model_name="mlp", model_version="1")
    typed.inputs.add(name="input", datatype="FP32", shape=x.shape).contents.fp32_contents.extend(x.reshape(-1).tolist())
    np.testing.assert_allclose(output(await stub.ModelInfer(typed, timeout=10)), expected, rtol=1e-5, atol=1e-5)

    # The gateway's pinned version wins over the request's alias.
    pinned = raw_request("mlp", x)
    pinned.model_version = "production"
    response = await stub.ModelInfer(pinned, metadata=(("maas-model-version", "1"),), timeout=10)
    assert response.model_version == "1"

    assert (await stub.ModelReady(kpb.ModelReadyRequest(name="mlp"))).ready
    assert not (await stub.ModelReady(kpb.ModelReadyRequest(name="nope"))).ready
    metadata = await stub.ModelMetadata(kpb.ModelMetadataRequest(name="mlp"))
    assert list(metadata.versions) == ["1"] and list(metadata.inputs[0].shape) == [-1, 16]
    config = (await stub.ModelConfig(kpb.ModelConfigRequest(name="mlp", version="1"))).config
    assert config.max_batch_size == 8 and list(config.input[0].dims) == [16]

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(raw_request("mlp", x[:, :15]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'input': expected shape [-1, 16] (batch first), got [3, 15]" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(raw_request("mlp", np.zeros((9, 16), np.float32)), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "maximum batch size 8" in (
        info.value.details() or ""
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(raw_request("nope", x), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "mlp:1" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await load(channel, "mlp", version=7)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    listed = await control(channel).ListModels(wpb.ListModelsRequest())
    assert [(m.ref.model, m.ref.version) for m in listed.models] == [("mlp", 1)]
    await control(channel).UnloadModel(wpb.UnloadModelRequest(ref=wpb.ModelRef(model="mlp", version=1)))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await control(channel).UnloadModel(wpb.UnloadModelRequest(ref=wpb.ModelRef(model="mlp", version=1)))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_concurrent_requests_are_batched(registry_client: Any, channel: grpc.aio.Channel, tmp_path: Path) -> None:
    path = await push(registry_client, tmp_path, "mlp", "mlp", MLP)
    await load(channel, "mlp", max_batch_size=32, max_queue_delay_us=20_000)
    reference = load_artifact(path)
    stub = kserve(channel)
    xs = [np.full((1, 16), i / 16, np.float32) for i in range(16)]
    responses = await asyncio.gather(*(stub.ModelInfer(raw_request("mlp", x), timeout=10) for x in xs))
    with torch.inference_mode():
        for x, response in zip(xs, responses, strict=True):
            np.testing.assert_allclose(output(response), reference(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)
    stats = (await stub.ModelStatistics(kpb.ModelStatisticsRequest(name="mlp"))).model_stats[0]
    assert stats.inference_count == 16 and stats.inference_stats.success.count == 16
    assert stats.execution_count < 16, stats
    assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count
    assert any(b.batch_size > 1 for b in stats.batch_stats)


async def test_stream_generates_greedy_tokens_and_stops_when_cancelled(
    registry_client: Any, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    path = await push(registry_client, tmp_path, "lm", "decoder-lm", LM)
    loaded = await load(channel, "lm")
    assert loaded.streaming
    prompt = [1, 2, 3, 4]
    lm = load_artifact(path)
    assert isinstance(lm, DecoderLM)
    expected = list(greedy_generate(lm, prompt, 10))

    def request(max_tokens: int, ids: list[int] = prompt) -> kpb.ModelInferRequest:
        message = kpb.ModelInferRequest(model_name="lm", id="s1")
        message.inputs.add(name="input_ids", datatype="INT64", shape=[1, len(ids)])
        message.raw_input_contents.append(np.array(ids, "<i8").tobytes())
        message.parameters["max_tokens"].int64_param = max_tokens
        return message

    stub = kserve(channel)

    async def requests(*messages: kpb.ModelInferRequest) -> AsyncIterator[kpb.ModelInferRequest]:
        for message in messages:
            yield message

    tokens, finals, errors = [], 0, []
    async for response in stub.ModelStreamInfer(requests(request(0), request(10)), timeout=30):
        if response.error_message:
            errors.append(response.error_message)
            continue
        infer = response.infer_response
        assert infer.id == "s1" and infer.model_version == "1"
        if infer.parameters["triton_final_response"].bool_param:
            finals += 1
            assert not infer.outputs
        else:
            assert infer.outputs[0].name == "token_id" and list(infer.outputs[0].shape) == [1, 1]
            tokens.append(int(np.frombuffer(infer.raw_output_contents[0], "<i8")[0]))
    assert tokens == expected and finals == 1
    assert len(errors) == 1 and "max_tokens" in errors[0]

    # A bad prompt is reported in-stream.
    bad = [r async for r in stub.ModelStreamInfer(requests(request(4, [1, 999])), timeout=10)]
    assert len(bad) == 1 and "token ids must be in [0, 64)" in bad[0].error_message

    # Cancel a long generation after a few tokens: the worker stops generating within about a token.
    before = (await stub.ModelStatistics(kpb.ModelStatisticsRequest(name="lm"))).model_stats[0].execution_count
    call = stub.ModelStreamInfer(requests(request(500)), timeout=30)
    received = 0
    async for _ in call:
        received += 1
        if received == 3:
            call.cancel()
            break
    await asyncio.sleep(0.3)
    first = (await stub.ModelStatistics(kpb.ModelStatisticsRequest(name="lm"))).model_stats[0].execution_count
    await asyncio.sleep(0.3)
    second = (await stub.ModelStatistics(kpb.ModelStatisticsRequest(name="lm"))).model_stats[0].execution_count
    assert first == second, "generation went on after the stream was cancelled"
    assert first - before < 100, first - before


async def test_queue_full_health_and_lru(
    registry_client: Any, channel: grpc.aio.Channel, tmp_path: Path, worker: RunningWorker
) -> None:
    await push(registry_client, tmp_path, "slow", "mlp", SLOW_MLP)
    await load(channel, "slow", max_batch_size=1, max_queue_size=2)
    stub = kserve(channel)
    x = np.zeros((1, 256), np.float32)
    calls = [asyncio.ensure_future(stub.ModelInfer(raw_request("slow", x), timeout=30)) for _ in range(12)]
    # While executions run back to back, health answers at once.
    health = health_pb2_grpc.HealthStub(channel)
    started = time.perf_counter()
    status = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert time.perf_counter() - started < 1.0
    results = await asyncio.gather(*calls, return_exceptions=True)
    rejected = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert rejected, "12 requests against a queue of 2 should overflow it"
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in rejected)
    assert "queue is full (2 requests queued)" in (rejected[0].details() or "")
    assert any(isinstance(r, kpb.ModelInferResponse) for r in results)

    # LRU: under a budget that holds two small MLPs, loading a third unloads the least recently used.
    for name in ("a", "b", "c"):
        await push(registry_client, tmp_path, name, "mlp", MLP)
    await control(channel).UnloadModel(wpb.UnloadModelRequest(ref=wpb.ModelRef(model="slow", version=1)))
    size = (await load(channel, "a")).memory_bytes
    worker.host.memory_budget_bytes = 2 * size + size // 2
    await load(channel, "b")
    await stub.ModelInfer(raw_request("a", np.zeros((1, 16), np.float32)), timeout=10)  # b is now the LRU
    await load(channel, "c")
    listed = await control(channel).ListModels(wpb.ListModelsRequest())
    assert sorted(m.ref.model for m in listed.models) == ["a", "c"]
    worker.host.memory_budget_bytes = size // 2
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await load(channel, "b")
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Sized from the manifest on the meta device: refused before its weights were ever allocated.
    assert "refused before loading" in (info.value.details() or "")


async def test_hosted_loads_models_before_returning(registry: Any, registry_client: Any, tmp_path: Path) -> None:
    await push(registry_client, tmp_path, "mlp", "mlp", MLP)
    running = await hosted(
        {
            "home": tmp_path / "home2",
            "inference_registry_address": f"127.0.0.1:{registry.port}",
            "inference_device": "cpu",
            "bind_host": "local",
            "models": [{"model": "mlp", "version": 1, "batching": {"max_batch_size": 4, "max_queue_delay_us": 500}}],
        }
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            listed = await control(ch).ListModels(wpb.ListModelsRequest())
            assert [(m.ref.model, m.batching.max_batch_size) for m in listed.models] == [("mlp", 4)]
            assert (await kserve(ch).ModelReady(kpb.ModelReadyRequest(name="mlp", version="1"))).ready
        assert list((tmp_path / "home2" / "inference" / "cache").glob("*.safetensors"))
    finally:
        await running.stop(0.5)


# --- InferStream: the gateway's multiplexed data path ----------------------------------------------------

Entry = wpb.InferStreamRequest.Entry
StreamResult = wpb.InferStreamResponse.Result
StreamCall: TypeAlias = "grpc.aio.StreamStreamCall[wpb.InferStreamRequest, wpb.InferStreamResponse]"
# Rows of one SLOW_MLP request that keep the single compute thread busy for a good fraction of a second.
BUSY_ROWS = 2048


def open_stream(channel: grpc.aio.Channel) -> StreamCall:
    return control(channel).InferStream(timeout=30)


def entry(entry_id: int, request: kpb.ModelInferRequest | bytes, timeout_s: float = 30) -> wpb.InferStreamRequest.Entry:
    data = request if isinstance(request, bytes) else request.SerializeToString()
    return Entry(id=entry_id, request=data, version=1, timeout_s=timeout_s)


async def read_results(call: StreamCall, count: int, within_s: float = 10) -> list[StreamResult]:
    """The next ``count`` results of the stream, however they are grouped into messages."""
    results: list[StreamResult] = []
    async with asyncio.timeout(within_s):
        while len(results) < count:
            message = await call.read()
            assert message is not grpc.aio.EOF, f"the stream ended after {len(results)} of {count} results"
            results.extend(message.results)
    assert len(results) == count, results
    return results


async def read_to_end(call: StreamCall, within_s: float = 10) -> list[StreamResult]:
    """The results left on the stream, up to its end, which must be OK."""
    results: list[StreamResult] = []
    async with asyncio.timeout(within_s):
        while (message := await call.read()) is not grpc.aio.EOF:
            results.extend(message.results)
        assert await call.code() == grpc.StatusCode.OK
    return results


def failure(result: StreamResult) -> MaasError:
    assert result.status and not result.response, result
    return error_from_status(result.status)


def answer(result: StreamResult) -> kpb.ModelInferResponse:
    assert result.response and not result.status, failure(result)
    return kpb.ModelInferResponse.FromString(result.response)


async def statistics(channel: grpc.aio.Channel, model: str) -> kpb.ModelStatistics:
    return (await kserve(channel).ModelStatistics(kpb.ModelStatisticsRequest(name=model))).model_stats[0]


async def test_infer_stream_answers_multiplexed_entries_by_id(
    registry_client: Any, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    path = await push(registry_client, tmp_path, "many", "mlp", MLP, seed=5)
    await load(channel, "many", max_batch_size=8, max_queue_delay_us=20_000)
    model = load_artifact(path).eval()
    xs = {10 + i: np.random.default_rng(i).standard_normal((1 + i % 2, 16)).astype(np.float32) for i in range(5)}
    requests = {}
    for entry_id, x in xs.items():
        requests[entry_id] = raw_request("many", x)
        requests[entry_id].id = f"req-{entry_id}"
        # The entry's version wins over the request's (the gateway resolved it).
        requests[entry_id].model_version = "production"
    entries = [entry(i, r) for i, r in requests.items()]
    entries.insert(2, entry(20, raw_request("many", np.zeros((1, 15), np.float32))))
    entries.append(entry(21, b"\xff\xff not a message"))

    call = open_stream(channel)
    await call.write(wpb.InferStreamRequest(entries=entries))
    results = await read_results(call, len(entries))
    by_id = {r.id: r for r in results}
    assert sorted(by_id) == sorted(e.id for e in entries), "each entry is answered exactly once"

    stub = kserve(channel)
    for entry_id, x in xs.items():
        response = answer(by_id[entry_id])
        assert response.id == f"req-{entry_id}" and response.model_name == "many" and response.model_version == "1"
        unary_request = raw_request("many", x)
        unary_request.id = f"req-{entry_id}"
        unary = await stub.ModelInfer(unary_request, timeout=10)
        assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
            (o.name, o.datatype, list(o.shape)) for o in unary.outputs
        ]
        np.testing.assert_allclose(output(response), output(unary), rtol=1e-5, atol=1e-6)
        with torch.inference_mode():
            expected = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(output(response), expected, rtol=1e-5, atol=1e-5)
    shape_error = failure(by_id[20])
    assert isinstance(shape_error, InvalidArgument), shape_error
    assert "input 'input'" in shape_error.message and "[1, 15]" in shape_error.message
    undecodable = failure(by_id[21])
    assert isinstance(undecodable, InvalidArgument) and "undecodable" in undecodable.message

    # The stream stays open for more entries until the gateway's side ends; then it ends OK.
    await call.write(wpb.InferStreamRequest(entries=[entry(30, requests[10])]))
    (again,) = await read_results(call, 1)
    assert again.id == 30
    np.testing.assert_allclose(output(answer(again)), output(answer(by_id[10])), rtol=1e-5, atol=1e-6)
    await call.done_writing()
    assert await read_to_end(call) == []


async def test_infer_stream_entries_sent_together_share_executions(
    registry_client: Any, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    path = await push(registry_client, tmp_path, "mlp", "mlp", MLP)
    await load(channel, "mlp", max_batch_size=32, max_queue_delay_us=20_000)
    reference = load_artifact(path).eval()
    xs = {i: np.full((1, 16), i / 16, np.float32) for i in range(16)}
    call = open_stream(channel)
    await call.write(wpb.InferStreamRequest(entries=[entry(i, raw_request("mlp", x)) for i, x in xs.items()]))
    results = await read_results(call, len(xs))
    await call.done_writing()
    assert await read_to_end(call) == []
    assert sorted(r.id for r in results) == sorted(xs)
    with torch.inference_mode():
        for result in results:
            expected = reference(torch.from_numpy(xs[result.id])).numpy()
            np.testing.assert_allclose(output(answer(result)), expected, rtol=1e-5, atol=1e-5)
    stats = await statistics(channel, "mlp")
    assert stats.inference_count == 16 and stats.inference_stats.success.count == 16
    assert stats.execution_count < 16, stats
    assert any(b.batch_size > 1 for b in stats.batch_stats), stats


async def test_infer_stream_cancel_drops_a_queued_entry(
    registry_client: Any, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    await push(registry_client, tmp_path, "slow", "mlp", SLOW_MLP)
    # Each busy entry fills a batch alone, so the small one queues behind both.
    await load(channel, "slow", max_batch_size=BUSY_ROWS)
    busy = raw_request("slow", np.zeros((BUSY_ROWS, 256), np.float32))
    small = raw_request("slow", np.ones((1, 256), np.float32))
    call = open_stream(channel)
    await call.write(wpb.InferStreamRequest(entries=[entry(1, busy), entry(2, busy), entry(3, small)]))
    await call.write(wpb.InferStreamRequest(cancel=[3, 99]))  # an unknown id is ignored
    await call.done_writing()
    results = await read_to_end(call, within_s=20)
    assert sorted(r.id for r in results) == [1, 2], "a cancelled entry gets no result"
    for result in results:
        assert list(answer(result).outputs[0].shape) == [BUSY_ROWS, 4]
    stats = await statistics(channel, "slow")
    # Only the two busy batches ran: the cancelled entry left the queue without being computed.
    assert stats.execution_count == 2 and stats.inference_count == 2 * BUSY_ROWS, stats
    assert stats.inference_stats.success.count == 2 and stats.inference_stats.fail.count == 1, stats
    assert [b.batch_size for b in stats.batch_stats] == [BUSY_ROWS], stats


async def test_infer_stream_lone_requests_keep_deadlines_and_cancellation(
    registry_client: Any, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    """Lone requests of a short forward run at once on the worker's event loop (the batcher's fast path);
    while a long execution holds the compute thread, they queue, and their deadlines and cancellations hold."""
    path = await push(registry_client, tmp_path, "lane", "mlp", LANE_MLP)
    await load(channel, "lane", max_batch_size=LANE_BUSY_ROWS)
    reference = load_artifact(path).eval()
    small = np.full((1, 256), 0.5, np.float32)
    call = open_stream(channel)
    for entry_id in range(1, 4):  # one at a time, as a client at concurrency 1 sends them
        await call.write(wpb.InferStreamRequest(entries=[entry(entry_id, raw_request("lane", small))]))
        (result,) = await read_results(call, 1)
        assert result.id == entry_id
        with torch.inference_mode():
            expected = reference(torch.from_numpy(small)).numpy()
        np.testing.assert_allclose(output(answer(result)), expected, rtol=1e-5, atol=1e-5)
    busy = raw_request("lane", np.zeros((LANE_BUSY_ROWS, 256), np.float32))
    await call.write(wpb.InferStreamRequest(entries=[entry(10, busy)]))
    await asyncio.sleep(0.05)  # the busy execution has started: these two find the compute thread taken
    lone = [entry(11, raw_request("lane", small), timeout_s=0.02), entry(12, raw_request("lane", small))]
    await call.write(wpb.InferStreamRequest(entries=lone))
    await call.write(wpb.InferStreamRequest(cancel=[12]))
    results = {r.id: r for r in await read_results(call, 2, within_s=20)}
    assert sorted(results) == [10, 11], "a cancelled entry gets no result"
    assert list(answer(results[10]).outputs[0].shape) == [LANE_BUSY_ROWS, 4]
    expired = failure(results[11])
    assert isinstance(expired, DeadlineExceeded) and "waited" in expired.message, expired
    # Idle again: a lone request is answered at once.
    await call.write(wpb.InferStreamRequest(entries=[entry(13, raw_request("lane", small))]))
    (last,) = await read_results(call, 1)
    assert last.id == 13 and list(answer(last).outputs[0].shape) == [1, 4]
    await call.done_writing()
    assert await read_to_end(call) == []
    stats = await statistics(channel, "lane")
    # Neither the expired nor the cancelled entry was computed.
    assert stats.execution_count == 5 and stats.inference_count == 4 + LANE_BUSY_ROWS, stats
    assert stats.inference_stats.success.count == 5 and stats.inference_stats.fail.count == 2, stats


async def test_infer_stream_rejects_an_id_already_in_flight(
    registry_client: Any, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    await push(registry_client, tmp_path, "mlp", "mlp", MLP)
    await load(channel, "mlp")
    first = raw_request("mlp", np.zeros((1, 16), np.float32))
    second = raw_request("mlp", np.ones((2, 16), np.float32))
    call = open_stream(channel)
    await call.write(wpb.InferStreamRequest(entries=[entry(7, first), entry(7, second)]))
    results = await read_results(call, 2)
    assert [r.id for r in results] == [7, 7]
    rejected = [r for r in results if r.status]
    assert len(rejected) == 1, results
    error = failure(rejected[0])
    assert isinstance(error, InvalidArgument) and "entry id 7 is already in flight" in error.message
    (answered,) = [r for r in results if r.response]
    assert list(answer(answered).outputs[0].shape) == [1, 4], "the first entry with the id is the one answered"
    # Once answered, the id may be used again.
    await call.write(wpb.InferStreamRequest(entries=[entry(7, second)]))
    (reused,) = await read_results(call, 1)
    assert reused.id == 7 and list(answer(reused).outputs[0].shape) == [2, 4]
    await call.done_writing()
    assert await read_to_end(call) == []


async def test_infer_stream_ends_itself_when_the_worker_stops(
    registry: Any, registry_client: Any, tmp_path: Path
) -> None:
    await push(registry_client, tmp_path, "slow", "mlp", SLOW_MLP)
    # A worker of its own: this test stops it.
    running = await start_worker(registry, tmp_path / "draining")
    drain_began = asyncio.Event()
    running.server.on_stopping.append(drain_began.set)  # after the worker's own drain hook
    stopping: asyncio.Task[None] | None = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            await load(ch, "slow", max_batch_size=BUSY_ROWS)
            busy = raw_request("slow", np.zeros((BUSY_ROWS, 256), np.float32))
            call = open_stream(ch)
            # The undecodable entry is answered at once, so its answer proves the busy ones are running.
            await call.write(wpb.InferStreamRequest(entries=[entry(1, busy), entry(2, busy), entry(3, b"\xff")]))
            (marker,) = await read_results(call, 1)
            assert marker.id == 3 and isinstance(failure(marker), InvalidArgument)

            grace = 30.0
            started = time.monotonic()
            stopping = asyncio.create_task(running.stop(grace))
            async with asyncio.timeout(5):
                await drain_began.wait()
            late = raw_request("slow", np.zeros((1, 256), np.float32))
            await call.write(wpb.InferStreamRequest(entries=[entry(4, late)]))
            # No done_writing: the worker ends the stream once the running entries are answered.
            results = {r.id: r for r in await read_to_end(call, within_s=10)}
            assert sorted(results) == [1, 2, 4]
            refused = failure(results[4])
            assert isinstance(refused, Unavailable) and "stopping" in refused.message
            # It says when to retry (elsewhere): the gateway's cue that nothing ran.
            details = status_pb2.Status.FromString(results[4].status).details
            assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in details), details
            for entry_id in (1, 2):
                assert list(answer(results[entry_id]).outputs[0].shape) == [BUSY_ROWS, 4]
            async with asyncio.timeout(10):
                await stopping
            assert time.monotonic() - started < grace / 3, "the open stream held the stop for its grace"
    finally:
        if stopping is None:
            await running.stop(0.5)
        elif not stopping.done():
            await asyncio.wait_for(stopping, 35)


async def test_generations_are_bounded_by_the_queue_limit(
    registry_client: Any, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    # Each generation takes the compute thread once per token: they count against the version's queue limit,
    # so a burst of streams cannot pile up without bound.
    await push(registry_client, tmp_path, "lm", "decoder-lm", LM)
    await load(channel, "lm", max_queue_size=2)

    def request(rid: str) -> kpb.ModelInferRequest:
        message = kpb.ModelInferRequest(model_name="lm", id=rid)
        message.inputs.add(name="input_ids", datatype="INT64", shape=[1, 3])
        message.raw_input_contents.append(np.array([1, 2, 3], "<i8").tobytes())
        message.parameters["max_tokens"].int64_param = 30
        return message

    stub = kserve(channel)
    release = asyncio.Event()

    async def hold(rid: str, first: asyncio.Event) -> None:
        async def one() -> AsyncIterator[kpb.ModelInferRequest]:
            yield request(rid)
            await release.wait()

        async for response in stub.ModelStreamInfer(one(), timeout=30):
            assert not response.error_message, response.error_message
            first.set()
            await release.wait()
            return

    firsts = [asyncio.Event(), asyncio.Event()]
    holders = [asyncio.create_task(hold(f"h{i}", firsts[i])) for i in range(2)]
    await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 30)

    async def third() -> AsyncIterator[kpb.ModelInferRequest]:
        yield request("x")

    errors = [r.error_message async for r in stub.ModelStreamInfer(third(), timeout=30) if r.error_message]
    assert errors and "generations running, the limit is 2" in errors[0]
    release.set()
    for task in holders:
        task.cancel()
    await asyncio.gather(*holders, return_exceptions=True)
