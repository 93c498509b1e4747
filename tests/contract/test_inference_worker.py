"""The inference worker through its public gRPC API: a real registry and a real worker on port 0.

Models are tiny zoo models pushed to the registry; results are compared with the same artifact loaded
in-process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference import grpc_service_pb2 as kpb
from inference import grpc_service_pb2_grpc
from maas.inference.v1 import worker_pb2 as wpb
from maas.inference.v1 import worker_pb2_grpc

from services.inference.main import RunningWorker, hosted
from shared.artifacts import Manifest, build_model, greedy_generate, load_artifact, save_artifact

MLP = {"in_features": 16, "hidden": [32], "out_features": 4}
# Big enough that one execution takes a while on one thread (the health and queue-full tests need that).
SLOW_MLP = {"in_features": 256, "hidden": [2048, 2048, 2048], "out_features": 4}
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


@pytest.fixture
async def worker(registry: Any, tmp_path: Path) -> AsyncIterator[RunningWorker]:
    running = await hosted(
        {
            "home": tmp_path / "home",
            "inference_registry_address": f"127.0.0.1:{registry.port}",
            "inference_device": "cpu",
            "inference_memory_budget_bytes": 64 * 1024 * 1024,
            "shutdown_grace_s": 1.0,
        }
    )
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
    expected = list(greedy_generate(load_artifact(path), prompt, 10))

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


async def test_infer_many_answers_each_entry_in_place(
    registry_client: Any, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    from google.rpc import code_pb2, status_pb2

    path = await push(registry_client, tmp_path, "many", "mlp", MLP, seed=5)
    await load(channel, "many", max_batch_size=8, max_queue_delay_us=20_000)
    model = load_artifact(path).eval()
    xs = [np.random.default_rng(i).standard_normal((1, 16)).astype(np.float32) for i in range(5)]
    good = [raw_request("many", x).SerializeToString() for x in xs]
    bad = raw_request("many", np.zeros((1, 15), np.float32)).SerializeToString()
    entries = [wpb.InferManyRequest.Entry(request=r, version=1, timeout_s=30) for r in good]
    entries.insert(2, wpb.InferManyRequest.Entry(request=bad, version=1))
    entries.append(wpb.InferManyRequest.Entry(request=b"\xff\xff not a message", version=1))
    reply = await control(channel).InferMany(wpb.InferManyRequest(entries=entries))
    assert len(reply.results) == len(entries)
    answers = [r for i, r in enumerate(reply.results) if i not in (2, len(entries) - 1)]
    for x, result in zip(xs, answers, strict=True):
        assert not result.status
        with torch.inference_mode():
            expected = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(output(kpb.ModelInferResponse.FromString(result.response)), expected, atol=1e-5)
    for index in (2, len(entries) - 1):
        status = status_pb2.Status.FromString(reply.results[index].status)
        assert status.code == code_pb2.INVALID_ARGUMENT and not reply.results[index].response
    assert "input 'input'" in status_pb2.Status.FromString(reply.results[2].status).message
    # Submitted together, the good entries shared executions.
    stats = (await kserve(channel).ModelStatistics(kpb.ModelStatisticsRequest(name="many"))).model_stats[0]
    assert stats.inference_count >= 5 and stats.execution_count < 5
