"""OpenTelemetry client interceptors for grpc.aio that never wait for the call they trace.

opentelemetry-instrumentation-grpc's aio client interceptors await the call's status inside the
interceptor, so cancelling the call only cancels that wait and the RPC goes on at the server (seen with
client-streaming uploads). These start a CLIENT span, inject the trace context into the metadata, hand the
call back at once, and end the span from a done callback, so ``call.cancel()`` reaches the server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

_tracer = trace.get_tracer("maas.grpc.client")


def _start(details: grpc.aio.ClientCallDetails) -> tuple[Span, grpc.aio.ClientCallDetails]:
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    service, _, name = method.lstrip("/").rpartition("/")
    span = _tracer.start_span(
        method,
        kind=SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *carrier.items())
    new = grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )
    return span, new


# Tasks that end client spans: referenced until done, so that none is collected half way.
_ending: set[asyncio.Task[None]] = set()


def _spawn(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> None:
    task = loop.create_task(coro)
    _ending.add(task)
    task.add_done_callback(_ending.discard)


def _finish_when_done(span: Span, call: Any) -> None:
    async def finish() -> None:
        try:
            code = await call.code()
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()

    loop = asyncio.get_running_loop()

    def done(_call: Any) -> None:
        # Called on the loop, except for a call collected in another thread (grpc cancels it in __del__):
        # there no loop runs, so the span's end is handed to the call's own loop.
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            _spawn(loop, finish())
            return
        try:
            loop.call_soon_threadsafe(lambda: _spawn(loop, finish()))
        except RuntimeError:  # that loop is closed: nobody will read the status any more
            span.end()

    call.add_done_callback(done)


class TracingClientInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """One interceptor for the four call shapes."""

    async def _intercept(self, continuation: Any, details: Any, request: Any) -> Any:
        span, details = _start(details)
        try:
            call = await continuation(details, request)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.end()
            raise
        _finish_when_done(span, call)
        return call

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._intercept(continuation, details, request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._intercept(continuation, details, request)

    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await self._intercept(continuation, details, request_iterator)

    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await self._intercept(continuation, details, request_iterator)
