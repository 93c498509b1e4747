"""``inference.GRPCInferenceService`` over the gateway core.

The handlers are registered by hand (a generic handler) rather than through the generated servicer so
that ModelInfer and ModelStreamInfer receive and return raw bytes: the request is parsed once (to route
and validate it) and the original bytes are forwarded; the worker's response bytes go back untouched.
The other RPCs use the generated messages as usual. The project's interceptor chain applies to all.

Every model RPC passes the caller's scope (``tenant_scope``: its key's tenant, None for admin keys, the mesh
and development mode) to the core: another tenant's deployment is, to the caller, a model not deployed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from importlib import metadata
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from inference import grpc_service_pb2 as kpb

from services.gateway.api import convert
from services.gateway.api.shm import REGION, SharedMemoryRequest, uses_shared_memory
from services.gateway.core.control import Repository
from services.gateway.core.model import Route
from services.gateway.core.service import Gateway
from services.gateway.core.shm import SharedMemoryCall, SharedMemoryRegions
from shared.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, MaasError
from shared.kserve.batching import BatchingSettings
from shared.kserve.codec import validate_request
from shared.kserve.convert import model_config_pb, model_metadata_pb
from shared.security.access import Access, caller_owner, caller_scope, rules

SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# Who may call what (shared.security.access): an inference key serves and describes models; the
# repository RPCs change deployments (the ShellTorch pattern when open), so they need a developer.
AUTHORIZATION = rules(
    kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    {
        "ServerLive": Access.INFERENCE,
        "ServerReady": Access.INFERENCE,
        "ModelReady": Access.INFERENCE,
        "ServerMetadata": Access.INFERENCE,
        "ModelMetadata": Access.INFERENCE,
        "ModelInfer": Access.INFERENCE,
        "ModelStreamInfer": Access.INFERENCE,
        "ModelConfig": Access.INFERENCE,
        "ModelStatistics": Access.INFERENCE,
        "RepositoryIndex": Access.DEVELOPER,
        "RepositoryModelLoad": Access.DEVELOPER,
        "RepositoryModelUnload": Access.DEVELOPER,
        # Serving with shared memory is inference; the regions belong to the caller's tenant.
        "SystemSharedMemoryStatus": Access.INFERENCE,
        "SystemSharedMemoryRegister": Access.INFERENCE,
        "SystemSharedMemoryUnregister": Access.INFERENCE,
    },
)
# Only extensions whose semantics the gateway implements (no CUDA shared memory, no binary tensor data);
# system shared memory only when enabled (off by default, as in Triton).
EXTENSIONS = ("model_repository", "statistics", "model_configuration")
SHARED_MEMORY_EXTENSION = "system_shared_memory"
SHARED_MEMORY_RPCS = ("SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister")


def _version() -> str:
    try:
        return metadata.version("maas")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
        return "0"


class _StreamIdle(Exception):
    """A ModelStreamInfer stream went idle (see ``_next_request``)."""


def _parse_infer(data: bytes) -> kpb.ModelInferRequest:
    try:
        return kpb.ModelInferRequest.FromString(data)
    except DecodeError:
        raise InvalidArgument("the request is not a valid ModelInferRequest message") from None


class InferenceServicer:
    """The KServe v2 RPCs; each converts, awaits the core, converts back.

    Args:
        gateway: Routing of inference requests.
        repository: The model repository RPCs.
        statistics_timeout_s: Deadline of each worker's ModelStatistics call.
        load_timeout_s: Longest RepositoryModelLoad waits for READY (a shorter client deadline wins).
        shared_memory: The system shared-memory regions; None: the extension is off (its RPCs, and requests
            naming a region, answer FAILED_PRECONDITION, after authentication as every RPC).
    """

    def __init__(
        self,
        gateway: Gateway,
        repository: Repository,
        *,
        statistics_timeout_s: float,
        load_timeout_s: float,
        stream_max_in_flight: int = 64,
        stream_buffer: int = 256,
        stream_idle_s: float = 300.0,
        shared_memory: SharedMemoryRegions | None = None,
    ) -> None:
        self._gateway = gateway
        self._repository = repository
        self._statistics_timeout_s = statistics_timeout_s
        self._load_timeout_s = load_timeout_s
        self._stream_max_in_flight = stream_max_in_flight
        self._stream_buffer = stream_buffer
        self._stream_idle_s = stream_idle_s
        self.shared_memory = shared_memory
        extensions = (*EXTENSIONS, SHARED_MEMORY_EXTENSION) if shared_memory is not None else EXTENSIONS
        self._metadata = kpb.ServerMetadataResponse(name="maas", version=_version(), extensions=extensions)

    async def ServerLive(self, request: kpb.ServerLiveRequest, context: Any) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: kpb.ServerReadyRequest, context: Any) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=self._gateway.ready)

    async def ModelReady(self, request: kpb.ModelReadyRequest, context: Any) -> kpb.ModelReadyResponse:
        return kpb.ModelReadyResponse(ready=self._gateway.model_ready(request.name, request.version, caller_scope()))

    async def ServerMetadata(self, request: kpb.ServerMetadataRequest, context: Any) -> kpb.ServerMetadataResponse:
        return self._metadata

    async def ModelMetadata(
        self, request: kpb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelMetadataResponse:
        route = await self._gateway.describe(request.name, request.version, context.time_remaining(), caller_scope())
        versions = sorted(route.deployment.versions)
        signed = await self._gateway.provenance(route, context.time_remaining())
        return model_metadata_pb(route.deployment.name, versions, route.served.signature, provenance=signed)

    async def ModelConfig(
        self, request: kpb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelConfigResponse:
        route = await self._gateway.describe(request.name, request.version, context.time_remaining(), caller_scope())
        served = route.served
        replicas = len(route.deployment.ready(served.version))
        batching = served.batching or BatchingSettings(max_batch_size=max(served.max_batch_size, 1))
        config = model_config_pb(route.deployment.name, served.signature, batching, replicas, served.streaming)
        return kpb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request: kpb.ModelStatisticsRequest, context: Any) -> kpb.ModelStatisticsResponse:
        stats = await self._gateway.statistics(
            request.name, request.version, self._statistics_timeout_s, caller_scope()
        )
        return convert.stats_to_pb(stats)

    async def ModelInfer(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        request = _parse_infer(data)
        timeout = context.time_remaining()
        route = await self._gateway.route(request.model_name, request.model_version, timeout, caller_scope())
        if uses_shared_memory(request):
            return await self._infer_shared(request, route, context.time_remaining())
        validate_request(request, route.served.signature, route.served.max_batch_size)
        return await self._gateway.infer(route, data, context.time_remaining())

    async def _infer_shared(self, request: kpb.ModelInferRequest, route: Route, timeout: float | None) -> bytes:
        """A request whose inputs or outputs name shared-memory regions of the caller's tenant."""
        regions = self._regions()
        plan = SharedMemoryRequest.resolve(request, regions, caller_owner())
        validate_request(request, route.served.signature, route.served.max_batch_size, raw=plan.raw)
        payload, windows = plan.by_reference(request)
        call = SharedMemoryCall(payload, windows, lambda: plan.inline(request), plan.write_outputs)
        return await self._gateway.infer(route, payload, timeout, shared=call)

    def _regions(self) -> SharedMemoryRegions:
        if self.shared_memory is None:
            raise FailedPrecondition(
                f"system shared memory is not enabled on this server (parameter '{REGION}'); send the data "
                "in the request",
                reason="SHARED_MEMORY_DISABLED",
            )
        return self.shared_memory

    async def SystemSharedMemoryRegister(
        self, request: kpb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> kpb.SystemSharedMemoryRegisterResponse:
        self._regions().register(caller_owner(), request.name, request.key, request.offset, request.byte_size)
        return kpb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryStatus(
        self, request: kpb.SystemSharedMemoryStatusRequest, context: Any
    ) -> kpb.SystemSharedMemoryStatusResponse:
        response = kpb.SystemSharedMemoryStatusResponse()
        for region in self._regions().status(caller_owner(), request.name):
            response.regions[region.name].CopyFrom(
                kpb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size
                )
            )
        return response

    async def SystemSharedMemoryUnregister(
        self, request: kpb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> kpb.SystemSharedMemoryUnregisterResponse:
        self._regions().unregister(caller_owner(), request.name)
        return kpb.SystemSharedMemoryUnregisterResponse()

    async def ModelStreamInfer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Each request of the client's stream is routed and streamed concurrently; responses interleave.

        A request's error is a response with ``error_message`` and the stream goes on (Triton's
        convention). When the client goes away, every worker stream is cancelled.

        Bounded both ways: at most ``stream_max_in_flight`` requests of one stream run at once (the next is
        read from the client when one ends, so a fast sender is held back by HTTP/2 flow control), and at most
        ``stream_buffer`` responses wait for a slow reader (the workers' streams wait in turn).
        """
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        buffered = asyncio.Semaphore(self._stream_buffer)
        running = asyncio.Semaphore(self._stream_max_in_flight)
        in_flight = 0
        scope = caller_scope()

        async def put(message: bytes) -> None:
            await buffered.acquire()  # released when the consumer takes it
            queue.put_nowait(message)

        async def one(data: bytes) -> None:
            request = None
            try:
                request = _parse_infer(data)
                if uses_shared_memory(request):
                    raise InvalidArgument("shared-memory inputs and outputs are served on ModelInfer only")
                route = await self._gateway.route(
                    request.model_name, request.model_version, context.time_remaining(), scope
                )
                validate_request(request, route.served.signature, route.served.max_batch_size)
                async for message in self._gateway.stream(route, data, context.time_remaining()):
                    await put(message)
            except MaasError as exc:
                await put(convert.stream_error(request, exc))
            finally:
                nonlocal in_flight
                in_flight -= 1
                running.release()

        def nothing_running() -> bool:
            return in_flight == 0

        async def read() -> None:
            nonlocal in_flight
            idle = False
            try:
                async with asyncio.TaskGroup() as group:
                    incoming = aiter(requests)
                    while True:
                        try:
                            data = await self._next_request(incoming, nothing_running)
                        except _StreamIdle:
                            idle = True
                            break
                        if data is None:
                            break
                        await running.acquire()
                        in_flight += 1
                        group.create_task(one(data))
            finally:
                queue.put_nowait(None)  # the end mark takes no slot: it must never wait
            if idle:
                # Raised here, outside the task group: a plain domain error, answered as a status.
                raise DeadlineExceeded(
                    f"the stream sent nothing and had nothing running for {self._stream_idle_s:g} s, and was ended"
                )

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                buffered.release()
                yield item
            await reader  # surfaces an unexpected failure of a request task
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def _next_request(self, incoming: AsyncIterator[bytes], idle: Callable[[], bool]) -> bytes | None:
        """The client's next request; None at its end.

        Raises:
            _StreamIdle: It has sent nothing for the idle timeout while nothing of it runs (a stream waiting
                for a long generation is not idle).
        """
        pending = asyncio.ensure_future(anext(incoming))
        while True:
            # Waited on, never cancelled by the timeout: cancelling a read would break the stream.
            done, _ = await asyncio.wait({pending}, timeout=self._stream_idle_s)
            if done:
                try:
                    return pending.result()
                except StopAsyncIteration:
                    return None
            if idle():
                pending.cancel()
                raise _StreamIdle

    async def RepositoryIndex(self, request: kpb.RepositoryIndexRequest, context: Any) -> kpb.RepositoryIndexResponse:
        return convert.index_to_pb(await self._repository.index(request.ready, caller_scope()))

    async def RepositoryModelLoad(
        self, request: kpb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> kpb.RepositoryModelLoadResponse:
        options = convert.load_options(request)
        remaining = context.time_remaining()
        timeout = self._load_timeout_s if remaining is None else min(remaining, self._load_timeout_s)
        await self._repository.load(options, timeout)
        return kpb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: kpb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> kpb.RepositoryModelUnloadResponse:
        if not request.model_name:
            raise InvalidArgument.field("model_name", "is required")
        remaining = context.time_remaining()
        timeout = self._load_timeout_s if remaining is None else min(remaining, self._load_timeout_s)
        await self._repository.unload(request.model_name, timeout)
        return kpb.RepositoryModelUnloadResponse()


def _unary(behavior: Callable[..., Any], request_type: Any, response_type: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        behavior, request_deserializer=request_type.FromString, response_serializer=response_type.SerializeToString
    )


def handlers(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The service's method handlers; ModelInfer and ModelStreamInfer take and return raw bytes."""
    table: dict[str, grpc.RpcMethodHandler] = {
        name: _unary(getattr(servicer, name), getattr(kpb, f"{name}Request"), getattr(kpb, f"{name}Response"))
        for name in (
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelConfig",
            "ModelStatistics",
            "RepositoryIndex",
            "RepositoryModelLoad",
            "RepositoryModelUnload",
            *SHARED_MEMORY_RPCS,
        )
    }
    # No (de)serializers: the handler sees the request's bytes and returns the worker's bytes.
    table["ModelInfer"] = grpc.unary_unary_rpc_method_handler(servicer.ModelInfer)
    table["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(servicer.ModelStreamInfer)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, table)
