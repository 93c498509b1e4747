"""The worker's two services: the KServe v2 data plane and the ``InferenceWorker`` control plane.

Each RPC validates and decodes with ``shared.kserve``, awaits the core and encodes the answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from inference import grpc_service_pb2 as kpb
from inference import grpc_service_pb2_grpc
from maas.inference.v1 import worker_pb2 as wpb
from maas.inference.v1 import worker_pb2_grpc

from services.inference.api import convert
from services.inference.api.infer import infer_one
from services.inference.api.shm import SharedMemoryMaps
from services.inference.api.stream import StreamSession
from services.inference.core.host import ModelHost, ServedVersion
from shared.errors import MaasError, NotFound
from shared.kserve.codec import decode_inputs, validate_request
from shared.kserve.convert import batching_from_pb, model_config_pb, model_metadata_pb, provenance
from shared.kserve.metadata import STREAM_ACCEPTED
from shared.security.access import Access, rules

SERVER_NAME = "maas-inference-worker"


# A worker's server is the mesh's alone: the gateway sends it inference, the scheduler loads models.
AUTHORIZATION = {
    **rules(
        kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        {m.name: Access.INTERNAL for m in kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods},
    ),
    **rules(
        wpb.DESCRIPTOR.services_by_name["InferenceWorker"],
        {m.name: Access.INTERNAL for m in wpb.DESCRIPTOR.services_by_name["InferenceWorker"].methods},
    ),
}


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
        signed = provenance(served.sha256, served.signers)
        return model_metadata_pb(served.model, versions, served.signature, provenance=signed)

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


class WorkerServicer(worker_pb2_grpc.InferenceWorkerServicer):
    """``maas.inference.v1.InferenceWorker``: load, unload and list versions; the gateway's InferStream.

    Args:
        host: The versions served here.
        max_stream_message_bytes: Bytes of results one InferStream response message may carry.
    """

    def __init__(self, host: ModelHost, max_stream_message_bytes: int = 2 << 20) -> None:
        self._host = host
        self._max_bytes = max_stream_message_bytes
        self._draining = asyncio.Event()
        self._sessions: set[StreamSession] = set()
        # Shared by every stream: a region mapped once serves all of them.
        self._shared_memory = SharedMemoryMaps()

    async def LoadModel(
        self, request: wpb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> wpb.LoadModelResponse:
        served = await self._host.load(
            request.ref.model,
            request.ref.version,
            batching_from_pb(request.batching),
            require_signature=request.require_signature,
        )
        return wpb.LoadModelResponse(model=convert.loaded_to_pb(served))

    async def UnloadModel(
        self, request: wpb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> wpb.UnloadModelResponse:
        await self._host.unload(request.ref.model, request.ref.version)
        return wpb.UnloadModelResponse()

    async def ListModels(
        self, request: wpb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> wpb.ListModelsResponse:
        return wpb.ListModelsResponse(
            models=[convert.loaded_to_pb(v) for v in self._host.loaded()],
            memory_budget_bytes=self._host.memory_budget_bytes,
        )

    async def InferStream(
        self, requests: AsyncIterator[wpb.InferStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[wpb.InferStreamResponse]:
        # The gateway writes nothing before this arrives (the stream is accepted).
        await context.send_initial_metadata((STREAM_ACCEPTED,))
        session = StreamSession(self._host, self._draining, self._max_bytes, self._shared_memory)
        self._sessions.add(session)
        try:
            async with aclosing(session.serve(requests)) as responses:
                async for response in responses:
                    yield response
        finally:
            self._sessions.discard(session)

    def begin_drain(self) -> None:
        """The worker is stopping: open streams answer new entries UNAVAILABLE and end once the running
        ones are answered (a long-lived stream would otherwise hold the graceful stop for its whole grace)."""
        self._draining.set()
        for session in self._sessions:
            session.wake()
