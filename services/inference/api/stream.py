"""The worker's end of ``InferenceWorker/InferStream``: many ModelInfer requests multiplexed on one stream.

A reader task takes entries off the stream and starts one task per entry (what a unary ModelInfer would
be); results are written back in arrival order of completion, as many per message as are ready (up to a
byte budget), so that under load one message carries a whole batch's answers. A cancel frame, or the
stream's end, cancels the entry tasks: a request still queued in the dynamic batcher is dropped before it
is computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

import structlog
from google.protobuf.message import DecodeError
from inference import grpc_service_pb2 as kpb
from maas.inference.v1 import worker_pb2 as wpb
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from services.inference.api.infer import infer_one
from services.inference.api.shm import SharedMemoryMaps
from services.inference.core.host import ModelHost
from shared.errors import InvalidArgument, MaasError, Unavailable
from shared.grpc.status import status_bytes

_tracer = trace.get_tracer("maas.inference.stream")
log = structlog.get_logger("maas.inference.stream")
_logger = logging.getLogger("maas.inference.stream")
#: The name of the span each entry runs in (a child of the gateway's span for the request).
ENTRY_SPAN = "/maas.inference.v1.InferenceWorker/InferStream entry"

Result = wpb.InferStreamResponse.Result


@contextlib.contextmanager
def _entry_span(traceparent: str) -> Iterator[None]:
    """The entry's span, a child of the gateway's (the stream's own span would span many requests)."""
    if not traceparent:
        yield
        return
    parent = propagate.extract({"traceparent": traceparent})
    with _tracer.start_as_current_span(ENTRY_SPAN, context=parent, kind=SpanKind.SERVER):
        yield


async def _answer(host: ModelHost, entry: wpb.InferStreamRequest.Entry, maps: SharedMemoryMaps) -> Result:
    try:
        request = kpb.ModelInferRequest.FromString(entry.request)
    except DecodeError:
        return Result(id=entry.id, status=status_bytes(InvalidArgument("undecodable ModelInferRequest")))
    with _entry_span(entry.traceparent):
        started = time.perf_counter()
        try:
            shared = (entry.shared_memory, maps) if entry.HasField("shared_memory") else None
            response = await infer_one(host, request, entry.version or None, entry.timeout_s or None, shared)
        except MaasError as exc:
            _entry_done(request, started, type(exc).__name__)
            return Result(id=entry.id, status=status_bytes(exc))
        _entry_done(request, started, "OK")
    return Result(id=entry.id, response=response.SerializeToString())


def _entry_done(request: kpb.ModelInferRequest, started: float, outcome: str) -> None:
    """The entry's debug line, in its span: entries share their stream's RPC, whose ``rpc_done`` line (one
    per call) tells of none of them. The level is asked first, as on every hot path."""
    if _logger.isEnabledFor(logging.DEBUG):
        elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
        log.debug(
            "infer_entry_done", model=request.model_name, infer_id=request.id, outcome=outcome, duration_ms=elapsed_ms
        )


class StreamSession:
    """One open InferStream: its entry tasks and the results waiting to be written.

    Args:
        host: The versions served here.
        draining: Set when the worker stops: new entries are answered UNAVAILABLE (the gateway retries them
            elsewhere) and the stream ends once the running ones are answered.
        max_bytes: Bytes of results one response message may carry (one larger result goes alone).
        shared_memory: The worker's shared-memory mappings (entries that name windows).
    """

    def __init__(
        self, host: ModelHost, draining: asyncio.Event, max_bytes: int, shared_memory: SharedMemoryMaps | None = None
    ) -> None:
        self._host = host
        self._maps = shared_memory or SharedMemoryMaps()
        self._draining = draining
        self._max_bytes = max_bytes
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._done: list[Result] = []
        self._wake = asyncio.Event()
        self._reading = True

    def wake(self) -> None:
        """Re-evaluate whether to end the stream (the worker began draining)."""
        self._wake.set()

    def _finish(self, result: Result) -> None:
        self._done.append(result)
        self._wake.set()

    async def _run(self, entry: wpb.InferStreamRequest.Entry) -> None:
        try:
            result = await _answer(self._host, entry, self._maps)
        finally:
            # A cancelled id may already be reused by a newer entry: only forget our own task.
            if self._tasks.get(entry.id) is asyncio.current_task():
                del self._tasks[entry.id]
        self._finish(result)

    async def _read(self, requests: AsyncIterator[wpb.InferStreamRequest]) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for message in requests:
                for entry in message.entries:
                    if self._draining.is_set():
                        stopping = Unavailable("the worker is stopping", retry_after_s=0.1)
                        self._finish(Result(id=entry.id, status=status_bytes(stopping)))
                    elif entry.id in self._tasks:
                        duplicate = InvalidArgument(f"entry id {entry.id} is already in flight on this stream")
                        self._finish(Result(id=entry.id, status=status_bytes(duplicate)))
                    else:
                        self._tasks[entry.id] = loop.create_task(self._run(entry))
                for cancelled in message.cancel:
                    task = self._tasks.pop(cancelled, None)
                    if task is not None:
                        task.cancel()
        finally:
            self._reading = False
            self._wake.set()

    def _take(self) -> wpb.InferStreamResponse:
        taken, size = 0, 0
        for result in self._done:
            size += len(result.response) + len(result.status) + 16
            if taken and size > self._max_bytes:
                break
            taken += 1
        results, self._done = self._done[:taken], self._done[taken:]
        return wpb.InferStreamResponse(results=results)

    async def serve(
        self, requests: AsyncIterator[wpb.InferStreamRequest]
    ) -> AsyncGenerator[wpb.InferStreamResponse, None]:
        """Yields the response messages until the gateway's side ends and every entry is answered, or the
        worker drains; cancels whatever is still running when the stream goes away."""
        reader = asyncio.get_running_loop().create_task(self._read(requests))
        try:
            while True:
                if self._done:
                    yield self._take()
                elif not self._tasks and (not self._reading or self._draining.is_set()):
                    return
                else:
                    self._wake.clear()
                    await self._wake.wait()
        finally:
            reader.cancel()
            tasks = [reader, *self._tasks.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
