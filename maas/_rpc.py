"""One connection to one service: the channel, its stub, and unary calls with typed errors and safe retries."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from shared.grpc.calls import REQUEST_ID_KEY, RetryPolicy, idempotent_methods, new_request_id, unary
from shared.grpc.channel import make_channel
from shared.grpc.status import from_rpc_error
from shared.settings import CommonSettings


class Connection:
    """A channel to ``target`` and a stub of ``service`` on it.

    The channel itself never retries; :meth:`call` does, on UNAVAILABLE, for the methods the protos declare
    idempotent and for calls the caller marks safe (a request carrying a client ``request_id``).
    """

    def __init__(
        self, target: str, settings: CommonSettings, service: ServiceDescriptor, stub_class: Any, retry: RetryPolicy
    ) -> None:
        self.channel = make_channel(target, settings)
        self.stub = stub_class(self.channel)
        self.retry = retry
        self.timeout_s = settings.rpc_timeout_s
        self._idempotent = idempotent_methods(service)

    async def call(self, method: str, request: object, *, timeout: float | None = None, safe: bool = False) -> Any:
        """Call the unary ``method``; ``safe``: the request deduplicates itself, so a retry is safe too."""
        return await unary(
            getattr(self.stub, method),
            request,
            retry=self.retry,
            safe_to_retry=safe or method in self._idempotent,
            timeout=timeout or self.timeout_s,
        )

    async def stream(
        self, method: str, request: Any, *, timeout: float | None = None, request_id: str | None = None
    ) -> AsyncGenerator[Any, None]:
        """The messages of a server-streaming ``method`` (``request``: a message, or an async iterator of them
        for a bidirectional one). Never retried: part of the answer may have been used already. Failures
        raise ``maas.errors`` exceptions with the call's request id (``request_id``, or a fresh one); closing
        the iterator early cancels the call."""
        request_id = request_id or new_request_id()
        call = getattr(self.stub, method)(request, timeout=timeout, metadata=((REQUEST_ID_KEY, request_id),))
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
            error.request_id = request_id
            raise error from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self.channel.close()
