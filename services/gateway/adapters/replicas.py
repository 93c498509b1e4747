"""The inference workers' data plane: one reused channel per worker, request bytes forwarded unchanged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from typing import Any

import grpc
import structlog
from inference import grpc_service_pb2 as kpb
from maas.inference.v1 import worker_pb2 as wpb
from opentelemetry import propagate

from services.gateway.adapters.streams import StreamLink, StreamUnsupported
from services.gateway.core.shm import SharedMemoryUnreachable
from services.gateway.core.statistics import BatchStats, Duration, VersionStats
from shared.errors import FailedPrecondition
from shared.grpc.channel import make_channel
from shared.grpc.status import from_rpc_error
from shared.kserve.convert import provenance_from_pb
from shared.kserve.metadata import SHARED_MEMORY_UNREACHABLE, VERSION_KEY
from shared.settings import CommonSettings

log = structlog.get_logger("maas.gateway.replicas")

_SERVICE = "/inference.GRPCInferenceService/"
_INFER = _SERVICE + "ModelInfer"
_STREAM = _SERVICE + "ModelStreamInfer"
_STATISTICS = _SERVICE + "ModelStatistics"
_METADATA = _SERVICE + "ModelMetadata"
_INFER_STREAM = "/maas.inference.v1.InferenceWorker/InferStream"
Metadata = tuple[tuple[str, str], ...]
# One ModelInfer call: request bytes, version, timeout -> response bytes.
SendOne = Callable[[bytes, int, float | None], Awaitable[bytes]]


class _Worker:
    """A channel to one worker, its method callables (identity serializers for the data plane: bytes in,
    bytes out), and its InferStream link (None: plain calls)."""

    __slots__ = ("channel", "link", "metadata", "send_one", "shared_memory_unreachable", "statistics", "stream")

    def __init__(
        self,
        channel: grpc.aio.Channel,
        hold_after: int | None,
        max_bytes: int,
        token: Metadata,
        send_one: SendOne,
        max_outbox_bytes: int,
    ) -> None:
        self.channel = channel
        self.send_one = send_one  # ModelInfer, the request bytes unchanged
        # Learnt from the worker's first answer to a request by reference: it cannot map our shared memory.
        self.shared_memory_unreachable = False
        self.stream = channel.stream_stream(_STREAM)
        self.statistics = channel.unary_unary(
            _STATISTICS,
            request_serializer=kpb.ModelStatisticsRequest.SerializeToString,
            response_deserializer=kpb.ModelStatisticsResponse.FromString,
        )
        self.metadata = channel.unary_unary(
            _METADATA,
            request_serializer=kpb.ModelMetadataRequest.SerializeToString,
            response_deserializer=kpb.ModelMetadataResponse.FromString,
        )
        infer_stream = channel.stream_stream(
            _INFER_STREAM,
            request_serializer=wpb.InferStreamRequest.SerializeToString,
            response_deserializer=wpb.InferStreamResponse.FromString,
        )

        def open_stream() -> Any:
            return infer_stream(metadata=token or None)

        # Half the message limit: the entries' envelopes fit beside the payloads.
        self.link = (
            StreamLink(open_stream, max_bytes // 2, hold_after, max_outbox_bytes) if hold_after is not None else None
        )


class ReplicaPool:
    """The ``Replicas`` port over grpc.aio.

    Unary requests travel on each worker's InferStream (``streams.py``), or as plain ModelInfer calls when
    ``streams`` is off or the worker lacks it. A plaintext channel to a worker is a lean one (message
    limits, keepalive, the bearer token as call metadata): the data path pays no retry machinery, since the
    gateway retries itself on another replica. With TLS configured, channels come from ``make_channel``
    (credentials, CA). The trace context travels with each request (an InferStream entry's
    ``traceparent``, or call metadata) written here rather than by a client interceptor: grpc.aio's
    intercepted calls cost a task and several awaits per request on the hottest path of the mesh (the
    worker's span is then a child of the gateway's).

    Args:
        settings: Message limits, token, TLS.
        tracing: Propagate the current trace context to the workers.
        max_outbox_bytes: Request bytes that may wait for one worker's stream (see ``StreamLink``).
    """

    def __init__(
        self,
        settings: CommonSettings,
        *,
        tracing: bool = True,
        streams: bool = True,
        hold_after: int = 2,
        max_outbox_bytes: int = 256 << 20,
    ) -> None:
        self._settings = settings
        self._max_outbox_bytes = max_outbox_bytes
        self._tracing = tracing
        self._hold_after = hold_after if streams else None
        self._workers: dict[str, _Worker] = {}
        self._metadata: dict[int, tuple[tuple[str, str], ...]] = {}
        self._secure = not settings.insecure and (settings.tls_enabled or settings.tls_ca_file is not None)
        # On TLS the channel carries the token as call credentials (and the certificate identifies us).
        token = None if self._secure else settings.client_token
        self._token = () if token is None else (("authorization", f"Bearer {token}"),)
        self._closing: set[asyncio.Task[None]] = set()

    def _worker(self, address: str) -> _Worker:
        worker = self._workers.get(address)
        if worker is None:
            channel = self._channel(address)
            infer = channel.unary_unary(_INFER)

            async def send_one(payload: bytes, version: int, timeout: float | None) -> bytes:
                try:
                    response: bytes = await infer(payload, timeout=timeout, metadata=self._version_metadata(version))
                except grpc.aio.AioRpcError as exc:
                    raise from_rpc_error(exc) from None
                return response

            worker = self._workers[address] = _Worker(
                channel,
                self._hold_after,
                self._settings.max_message_bytes,
                self._token,
                send_one,
                self._max_outbox_bytes,
            )
        return worker

    def _channel(self, address: str) -> grpc.aio.Channel:
        settings = self._settings
        if self._secure:
            return make_channel(address, settings)  # no retry policy: no services named
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # Our retries go to another replica; the channel's own would retry the same lost one.
            ("grpc.enable_retries", 0),
        ]
        return grpc.aio.insecure_channel(address, options=options)

    def _version_metadata(self, version: int) -> tuple[tuple[str, str], ...]:
        metadata = self._metadata.get(version)
        if metadata is None:
            metadata = self._metadata[version] = ((VERSION_KEY, str(version)), *self._token)
        return (*metadata, *self._trace_context().items())

    def _trace_context(self) -> dict[str, str]:
        """The current trace context as W3C headers (empty when propagation is off)."""
        carrier: dict[str, str] = {}
        if self._tracing:
            propagate.inject(carrier)
        return carrier

    async def infer(
        self, address: str, version: int, payload: bytes, timeout: float | None, shared_memory: bytes = b""
    ) -> bytes:
        worker = self._worker(address)
        link = worker.link
        if shared_memory:
            return await self._infer_by_reference(worker, version, payload, timeout, shared_memory)
        if link is not None and not link.unsupported:
            try:
                return await link.infer(payload, version, timeout, self._trace_context().get("traceparent", ""))
            except StreamUnsupported:
                log.info("worker_without_infer_stream", address=address)
        return await worker.send_one(payload, version, timeout)

    async def _infer_by_reference(
        self, worker: _Worker, version: int, payload: bytes, timeout: float | None, shared_memory: bytes
    ) -> bytes:
        """A request whose tensors the worker maps itself; only an InferStream entry carries the windows."""
        link = worker.link
        if link is None or link.unsupported or worker.shared_memory_unreachable:
            raise SharedMemoryUnreachable
        windows = wpb.SharedMemoryTensors.FromString(shared_memory)
        traceparent = self._trace_context().get("traceparent", "")
        try:
            return await link.infer(payload, version, timeout, traceparent, shared_memory=windows)
        except StreamUnsupported:
            raise SharedMemoryUnreachable from None
        except FailedPrecondition as exc:
            if exc.reason != SHARED_MEMORY_UNREACHABLE:
                raise
            worker.shared_memory_unreachable = True
            raise SharedMemoryUnreachable from None

    async def stream(self, address: str, version: int, payload: bytes, timeout: float | None) -> AsyncIterator[bytes]:
        call = self._worker(address).stream(iter((payload,)), timeout=timeout, metadata=self._version_metadata(version))
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            # A consumer that stops early (client cancelled) must stop the worker's generation too.
            call.cancel()

    async def statistics(self, address: str, timeout: float) -> list[VersionStats]:
        try:
            response = await self._worker(address).statistics(
                kpb.ModelStatisticsRequest(), timeout=timeout, metadata=self._token or None
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return [stats_from_pb(s) for s in response.model_stats]

    async def provenance(self, address: str, name: str, version: int, timeout: float | None) -> Mapping[str, str]:
        request = kpb.ModelMetadataRequest(name=name, version=str(version))
        try:
            response = await self._worker(address).metadata(
                request, timeout=timeout, metadata=self._version_metadata(version)
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return provenance_from_pb(response)

    def retain(self, addresses: Collection[str]) -> None:
        for address in [a for a in self._workers if a not in addresses]:
            worker = self._workers.pop(address)
            if worker.link is not None:
                worker.link.close()
            # Calls already on the channel finish first (grace), then it closes; not awaited by the snapshot.
            task = asyncio.get_running_loop().create_task(worker.channel.close(grace=30.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        workers, self._workers = list(self._workers.values()), {}
        await asyncio.gather(*(w.channel.close() for w in workers), *self._closing, return_exceptions=True)


def _duration(message: kpb.StatisticDuration) -> Duration:
    return Duration(message.count, message.ns)


def stats_from_pb(message: kpb.ModelStatistics) -> VersionStats:
    """A worker's statistics of one version as the domain type."""
    inference = message.inference_stats
    return VersionStats(
        name=message.name,
        version=message.version,
        last_inference=message.last_inference,
        inference_count=message.inference_count,
        execution_count=message.execution_count,
        success=_duration(inference.success),
        fail=_duration(inference.fail),
        queue=_duration(inference.queue),
        compute_input=_duration(inference.compute_input),
        compute_infer=_duration(inference.compute_infer),
        compute_output=_duration(inference.compute_output),
        batch_stats={
            b.batch_size: BatchStats(
                b.batch_size, _duration(b.compute_input), _duration(b.compute_infer), _duration(b.compute_output)
            )
            for b in message.batch_stats
        },
    )
