"""``make_channel``'s interceptors act on calls of every shape, not on unary-unary ones alone.

grpc.aio files an interceptor under the first call shape it implements: one object implementing all four
used to intercept unary-unary calls only, so uploads, pulls and watches carried no trace context (their
server spans began new traces) and, on plaintext channels, no bearer token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from opentelemetry import propagate, trace

from shared.grpc.channel import make_channel
from shared.settings import CommonSettings

TOKEN = "t" * 40


async def test_every_call_shape_carries_the_trace_context_and_the_token() -> None:
    seen: dict[str, dict[str, str]] = {}

    def record(name: str, context: grpc.aio.ServicerContext) -> None:
        seen[name] = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}

    async def unary_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        record("unary_unary", context)
        return b"ok"

    async def unary_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        record("unary_stream", context)
        yield b"ok"

    async def stream_unary(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        record("stream_unary", context)
        async for _ in requests:
            pass
        return b"ok"

    async def stream_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        record("stream_stream", context)
        async for request in requests:
            yield request

    handlers: dict[str, Any] = {
        "UnaryUnary": grpc.unary_unary_rpc_method_handler(unary_unary),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
        "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream),
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Shapes", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = make_channel(f"127.0.0.1:{port}", CommonSettings(insecure=True), token=TOKEN)

    async def requests() -> AsyncIterator[bytes]:
        yield b"x"

    try:
        with trace.get_tracer("tests").start_as_current_span("caller") as caller:
            await channel.unary_unary("/test.Shapes/UnaryUnary")(b"x")
            assert [r async for r in channel.unary_stream("/test.Shapes/UnaryStream")(b"x")] == [b"ok"]
            await channel.stream_unary("/test.Shapes/StreamUnary")(requests())
            assert [r async for r in channel.stream_stream("/test.Shapes/StreamStream")(requests())] == [b"x"]
    finally:
        await channel.close()
        await server.stop(0)

    assert sorted(seen) == ["stream_stream", "stream_unary", "unary_stream", "unary_unary"]
    for shape, metadata in seen.items():
        assert metadata.get("authorization") == f"Bearer {TOKEN}", shape
        # Each call's context is its own CLIENT span's, a child of the caller's span, in the caller's trace.
        context = trace.get_current_span(propagate.extract(metadata)).get_span_context()
        assert context.trace_id == caller.get_span_context().trace_id, shape
        assert context.span_id != caller.get_span_context().span_id, shape
