"""Client channels: keepalive, limits, retries of idempotent calls, tracing, authentication."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import ServiceDescriptor

from shared.grpc.tracing import TracingClientInterceptor
from shared.settings import CommonSettings

_IDEMPOTENT = (
    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
    descriptor_pb2.MethodOptions.IDEMPOTENT,
)


def retry_service_config(services: Iterable[ServiceDescriptor], max_attempts: int = 4) -> dict[str, Any]:
    """A gRPC service config that retries UNAVAILABLE where the protos say a method is idempotent.

    The protos state idempotency (``option idempotency_level``), so retries follow the contract instead of
    a hand-kept list. Client-streaming methods are never retried: their requests are not replayable.
    (Deadlines are not set here: a service-config timeout caps even a longer deadline a caller asks for.)
    """
    names = [
        {"service": service.full_name, "method": method.name}
        for service in services
        for method in service.methods
        if method.GetOptions().idempotency_level in _IDEMPOTENT and not method.client_streaming
    ]
    if not names:
        return {"methodConfig": []}
    policy = {
        "maxAttempts": max_attempts,
        "initialBackoff": "0.05s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return {"methodConfig": [{"name": names, "retryPolicy": policy}]}


class _BearerToken(grpc.AuthMetadataPlugin):
    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, context: Any, callback: Any) -> None:
        callback((("authorization", f"Bearer {self._token}"),), None)


class _CallDefaults(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """A default deadline for unary calls that set none, and the bearer token on plaintext channels
    (where call credentials are not allowed). Streaming calls keep no default deadline: a download or a
    watch may rightly last long."""

    def __init__(self, unary_timeout_s: float, token: str | None) -> None:
        self._timeout = unary_timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def _details(self, details: grpc.aio.ClientCallDetails, unary: bool) -> grpc.aio.ClientCallDetails:
        timeout = details.timeout if details.timeout is not None or not unary else self._timeout
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._metadata)
        return grpc.aio.ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details, True), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details, False), request)

    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details, False), request_iterator)

    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details, False), request_iterator)


class _UnaryStreamShape(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._inner.intercept_unary_stream(continuation, details, request)


class _StreamUnaryShape(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await self._inner.intercept_stream_unary(continuation, details, request_iterator)


class _StreamStreamShape(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await self._inner.intercept_stream_stream(continuation, details, request_iterator)


def _every_shape(interceptor: Any) -> list[Any]:
    """``interceptor`` (which handles all four call shapes) as grpc.aio must be given it to apply it to all.

    A grpc.aio channel files each interceptor under the first shape it implements only (an if/elif chain
    over the four classes), so one object implementing all four intercepted unary-unary calls alone: the
    streaming ones (uploads, pulls, watches) carried no trace context and, on plaintext, no token.
    """
    return [
        interceptor,
        _UnaryStreamShape(interceptor),
        _StreamUnaryShape(interceptor),
        _StreamStreamShape(interceptor),
    ]


def make_channel(
    target: str,
    settings: CommonSettings,
    services: Iterable[ServiceDescriptor] = (),
    *,
    token: str | None = None,
    options: Iterable[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target`` set up once for every maas client.

    ``services`` are the descriptors of the services called through it (for the retry policy).
    """
    token = token if token is not None else settings.client_token
    channel_options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(retry_service_config(services))),
        *options,
    ]
    secure = not settings.insecure and (settings.tls_enabled or settings.tls_ca_file is not None)
    if secure and settings.tls_server_name:
        channel_options.append(("grpc.ssl_target_name_override", settings.tls_server_name))
    # On TLS channels the token travels as call credentials instead.
    interceptors: list[Any] = [
        *_every_shape(TracingClientInterceptor()),
        *_every_shape(_CallDefaults(settings.rpc_timeout_s, None if secure else token)),
    ]
    if secure:
        root = settings.tls_ca_file.read_bytes() if settings.tls_ca_file else None
        key = settings.tls_key_file.read_bytes() if settings.tls_key_file else None
        chain = settings.tls_cert_file.read_bytes() if settings.tls_cert_file else None
        credentials = grpc.ssl_channel_credentials(root, key, chain)
        if token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.metadata_call_credentials(_BearerToken(token))
            )
        return grpc.aio.secure_channel(target, credentials, options=channel_options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=channel_options, interceptors=interceptors)
