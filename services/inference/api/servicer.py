"""The worker's two services: the KServe v2 data plane and the ``InferenceWorker`` control plane.

Each RPC validates and decodes with ``shared.kserve``, awaits the core and encodes the answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from google.protobuf.message import DecodeError
from inference import grpc_service_pb2 as kpb
from inference import grpc_service_pb2_grpc
from maas.inference.v1 import worker_pb2 as wpb
from maas.inference.v1 import worker_pb2_grpc

from services.inference.api import convert
from services.inference.core.host import ModelHost, ServedVersion
from shared.errors import InvalidArgument, MaasError, NotFound
from shared.grpc.status import status_bytes
from shared.kserve.codec import decode_inputs, encode_response, validate_request
from shared.kserve.convert import batching_from_pb, model_config_pb, model_metadata_pb

SERVER_NAME = "maas-inference-worker"


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` of one worker: the versions loaded here."""

    def __init__(self, host: ModelHost) -> None:
        self._host = host

    def _resolve(self, model: str, version: str, context: grpc.aio.ServicerContext) -> ServedVersion:
        pinned = convert.pinned_version(context.invocation_metadata())
        return self._host.resolve(model, version, pinned)

    async def ServerLive(
        self, request: kpb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: kpb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: kpb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(
            name=SERVER_NAME, version="1", extensions=["statistics", "model_configuration"]
        )

    async def ModelReady(
        self, request: kpb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelReadyResponse:
        try:
            self._resolve(request.name, request.version, context)
        except NotFound:
            return kpb.ModelReadyResponse(ready=False)
        return kpb.ModelReadyResponse(ready=True)

    async def ModelMetadata(
        self, request: kpb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelMetadataResponse:
        served = self._resolve(request.name, request.version, context)
        versions = [v.version for v in self._host.loaded() if v.model == served.model]
        return model_metadata_pb(served.model, versions, served.signature)

    async def ModelConfig(
        self, request: kpb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelConfigResponse:
        served = self._resolve(request.name, request.version, context)
        config = model_config_pb(served.model, served.signature, served.batching, 1, served.streaming)
        return kpb.ModelConfigResponse(config=config)

    async def ModelStatistics(
        self, request: kpb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelStatisticsResponse:
        chosen = [
            v
            for v in self._host.loaded()
            if (not request.name or v.model == request.name)
            and (not request.version or str(v.version) == request.version)
        ]
        if request.name and not chosen:
            raise NotFound(f"model '{request.name}' version {request.version or '(any)'} is not loaded here")
        return kpb.ModelStatisticsResponse(
            model_stats=[convert.stats_to_pb(v.model, v.version, v.stats) for v in chosen]
        )

    async def _infer(self, request: kpb.ModelInferRequest, context: grpc.aio.ServicerContext) -> kpb.ModelInferResponse:
        pinned = convert.pinned_version(context.invocation_metadata())
        return await infer_one(self._host, request, pinned, context.time_remaining())

    async def ModelInfer(
        self, request: kpb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelInferResponse:
        return await self._infer(request, context)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[kpb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kpb.ModelStreamInferResponse]:
        """Generative models stream one response per token and a final one; others answer once.

        Errors of one request are reported in ``error_message`` (Triton's convention); the stream goes on.
        """
        async for request in request_iterator:
            try:
                served = self._resolve(request.model_name, request.model_version, context)
                if not served.streaming:
                    yield kpb.ModelStreamInferResponse(infer_response=await self._infer(request, context))
                    continue
                validate_request(request, served.signature, 1)
                prompt = decode_inputs(request)["input_ids"]
                limit = convert.max_tokens(request)
                tokens = self._host.check_prompt(served, prompt, limit)
            except MaasError as exc:
                yield kpb.ModelStreamInferResponse(error_message=str(exc))
                continue
            try:
                async with aclosing(self._host.generate(served, tokens, limit)) as stream:
                    async for token in stream:
                        yield convert.token_response(request, served.version, token)
            except MaasError as exc:
                yield kpb.ModelStreamInferResponse(error_message=str(exc))
                continue
            yield convert.final_response(request, served.version)

    async def _unimplemented(self, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "repository RPCs are served by the gateway, not workers")

    async def RepositoryIndex(self, request: object, context: grpc.aio.ServicerContext) -> kpb.RepositoryIndexResponse:
        await self._unimplemented(context)
        raise AssertionError("unreachable")

    async def RepositoryModelLoad(
        self, request: object, context: grpc.aio.ServicerContext
    ) -> kpb.RepositoryModelLoadResponse:
        await self._unimplemented(context)
        raise AssertionError("unreachable")

    async def RepositoryModelUnload(
        self, request: object, context: grpc.aio.ServicerContext
    ) -> kpb.RepositoryModelUnloadResponse:
        await self._unimplemented(context)
        raise AssertionError("unreachable")


async def infer_one(
    host: ModelHost, request: kpb.ModelInferRequest, pinned: int | None, time_remaining: float | None
) -> kpb.ModelInferResponse:
    """One ModelInfer request: resolve the version, validate, decode, run through the batcher, encode."""
    served = host.resolve(request.model_name, request.model_version, pinned)
    batch = validate_request(request, served.signature, served.batching.max_batch_size)
    priority, timeout_s = convert.scheduling(request, served.batching.default_timeout_us, time_remaining)
    inputs = decode_inputs(request)
    outputs = await host.infer(served, inputs, batch, priority=priority, timeout_s=timeout_s)
    return encode_response(request, str(served.version), outputs)


async def _entry_result(host: ModelHost, entry: wpb.InferManyRequest.Entry) -> wpb.InferManyResponse.Result:
    try:
        request = kpb.ModelInferRequest.FromString(entry.request)
    except DecodeError:
        return wpb.InferManyResponse.Result(status=status_bytes(InvalidArgument("undecodable ModelInferRequest")))
    try:
        response = await infer_one(host, request, entry.version or None, entry.timeout_s or None)
    except MaasError as exc:
        return wpb.InferManyResponse.Result(status=status_bytes(exc))
    return wpb.InferManyResponse.Result(response=response.SerializeToString())


class WorkerServicer(worker_pb2_grpc.InferenceWorkerServicer):
    """``maas.inference.v1.InferenceWorker``: load, unload and list versions."""

    def __init__(self, host: ModelHost) -> None:
        self._host = host

    async def LoadModel(
        self, request: wpb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> wpb.LoadModelResponse:
        served = await self._host.load(request.ref.model, request.ref.version, batching_from_pb(request.batching))
        return wpb.LoadModelResponse(model=convert.loaded_to_pb(served))

    async def UnloadModel(
        self, request: wpb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> wpb.UnloadModelResponse:
        await self._host.unload(request.ref.model, request.ref.version)
        return wpb.UnloadModelResponse()

    async def InferMany(
        self, request: wpb.InferManyRequest, context: grpc.aio.ServicerContext
    ) -> wpb.InferManyResponse:
        # Submitted together, the entries reach the dynamic batcher together and share executions.
        results = await asyncio.gather(*(_entry_result(self._host, entry) for entry in request.entries))
        return wpb.InferManyResponse(results=results)

    async def ListModels(
        self, request: wpb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> wpb.ListModelsResponse:
        return wpb.ListModelsResponse(
            models=[convert.loaded_to_pb(v) for v in self._host.loaded()],
            memory_budget_bytes=self._host.memory_budget_bytes,
        )
