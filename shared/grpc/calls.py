"""Unary calls as clients make them: a request id, domain errors, and retries where a retry is safe.

A call is retried only on UNAVAILABLE (the server was not reached, or shed the call before acting on it) and
only when repeating it cannot do twice what was asked: the method is idempotent (the protos say so with
``idempotency_level``), or the request carries a client ``request_id`` the server deduplicates on.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import ServiceDescriptor

from shared.grpc.status import from_rpc_error

# Metadata with the id a client gives a call (the same for its retries); servers log the RPC under it.
REQUEST_ID_KEY = "x-request-id"
Metadata = Sequence[tuple[str, str]]
Response = TypeVar("Response")

_IDEMPOTENT = (descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS, descriptor_pb2.MethodOptions.IDEMPOTENT)


def idempotent_methods(service: ServiceDescriptor) -> frozenset[str]:
    """Names of the unary methods of ``service`` whose protos declare them idempotent."""
    return frozenset(
        m.name
        for m in service.methods
        if m.GetOptions().idempotency_level in _IDEMPOTENT and not m.client_streaming and not m.server_streaming
    )


def new_request_id() -> str:
    """A fresh id for a call or for a client ``request_id`` field."""
    return uuid.uuid4().hex[:16]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a safe call is repeated after UNAVAILABLE.

    Attributes:
        max_attempts: Calls in all, the first included (1: never retry).
        initial_backoff_s: Wait before the second attempt; each later wait is ``multiplier`` times longer.
        max_backoff_s: Longest wait between attempts (a server's RetryInfo delay may be longer).
        multiplier: Growth of the wait per attempt.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def delay_s(self, attempt: int, server_delay_s: float | None = None) -> float:
        """The wait after failed attempt ``attempt`` (1-based): exponential with full jitter, or the server's."""
        if server_delay_s is not None:
            return server_delay_s
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


NO_RETRY = RetryPolicy(max_attempts=1)


async def unary(
    method: Callable[..., Awaitable[Response]],
    request: Any,
    *,
    retry: RetryPolicy = NO_RETRY,
    safe_to_retry: bool = False,
    timeout: float | None = None,
    metadata: Metadata | None = None,
) -> Response:
    """Call ``method`` (a stub's unary method); failures raise ``shared.errors`` exceptions carrying the request id.

    ``safe_to_retry`` says repeating the call cannot act twice (see the module docstring); only then is an
    UNAVAILABLE answer retried under ``retry``.
    """
    request_id = new_request_id()
    call_metadata = (*(metadata or ()), (REQUEST_ID_KEY, request_id))
    attempt = 0
    while True:
        attempt += 1
        try:
            return await method(request, timeout=timeout, metadata=call_metadata)
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
            error.request_id = request_id
            if not (safe_to_retry and exc.code() == grpc.StatusCode.UNAVAILABLE and attempt < retry.max_attempts):
                raise error from None
            await asyncio.sleep(retry.delay_s(attempt, error.retry_after_s))
