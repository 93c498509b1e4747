"""The server builder every service uses: health, reflection, interceptors, limits, lifecycle."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from shared.grpc.auth import AuthInterceptor
from shared.grpc.interceptors import RequestInterceptor
from shared.heap import settle_after_startup
from shared.metrics import RpcMetrics, serve_metrics
from shared.security.access import AuthorizationTable
from shared.security.keys import KeyStore
from shared.security.ratelimit import TenantLimits
from shared.settings import CommonSettings

log = structlog.get_logger("maas.server")

# Registers a servicer on a server (the generated ``add_XServicer_to_server`` bound to a servicer).
Registration = Callable[[grpc.aio.Server], None]


@dataclass
class ServiceServer:
    """A started server and what its lifecycle needs."""

    server: grpc.aio.Server
    health: HealthServicer
    port: int
    service_names: Sequence[str]
    on_close: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Called as the stop begins, before the drain: long-lived streams are told to finish (they would hold
    # the drain for the whole grace otherwise).
    on_stopping: list[Callable[[], None]] = field(default_factory=list)
    # The Prometheus endpoint's bound port (0 when the server has none).
    metrics_port: int = 0
    # The plaintext health-only server's bound port (0 when there is none; settings.health_address).
    health_port: int = 0
    # The mutual-TLS listener's bound port, where the mesh's own services call (0 when there is none).
    internal_port: int = 0

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING first (load balancers stop routing), then drain, then close the core."""
        await self.health.enter_graceful_shutdown()
        for stopping in self.on_stopping:
            stopping()
        await self.server.stop(grace)
        for close in reversed(self.on_close):
            await close()

    async def wait_for_signal(self, grace: float) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully.

        Only a service's own entry point calls this, so it also marks the end of start-up: the heap built so
        far is frozen (``shared.heap``), which keeps full garbage collections short while serving.
        """
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # The process is this service's alone (its entry point serves until a signal): start-up is over.
        settle_after_startup()
        try:
            await stop.wait()
            log.info("shutting_down", grace_s=grace)
            await self.stop(grace)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


class InsecureConfiguration(RuntimeError):
    """A server asked to start without TLS or authentication outside ``--insecure``."""


# Internal tokens seen in published examples: never accepted outside development.
_KNOWN_TOKENS = frozenset({"maas-dev-ray-token", "s3cret-token", "changeme", "dev-token"})
MIN_INTERNAL_TOKEN = 32


def _credentials(settings: CommonSettings, *, mutual: bool) -> grpc.ServerCredentials | None:
    """The listener's credentials: None in development mode (plaintext whatever TLS files are configured:
    its clients dial plaintext too); client certificates required when ``mutual``."""
    if settings.insecure or not settings.tls_enabled:
        return None
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    pair = (settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())
    if mutual:
        if settings.tls_ca_file is None:
            raise InsecureConfiguration(
                "a mutual-TLS listener needs MAAS_TLS_CA_FILE, the CA of the mesh's certificates"
            )
        return grpc.ssl_server_credentials([pair], settings.tls_ca_file.read_bytes(), require_client_auth=True)
    return grpc.ssl_server_credentials([pair])


def _requires_client_certs(settings: CommonSettings) -> bool:
    return settings.tls_ca_file is not None and settings.tls_require_client_cert


def _auth_interceptor(
    settings: CommonSettings, authorization: AuthorizationTable | None, *, internal_listener: bool
) -> AuthInterceptor | None:
    """The auth layer, or None in development mode; refuses an open or guessable configuration."""
    if settings.insecure:
        log.warning("insecure_mode", detail="plaintext and no authentication: development only")
        return None
    if not settings.tls_enabled:
        raise InsecureConfiguration(
            "TLS is required: set MAAS_TLS_CERT_FILE and MAAS_TLS_KEY_FILE (`maas certs init` creates them), or "
            "MAAS_INSECURE=1 for plaintext development"
        )
    token = settings.internal_token
    if token is not None and (len(token) < MIN_INTERNAL_TOKEN or token in _KNOWN_TOKENS):
        raise InsecureConfiguration(
            f"MAAS_INTERNAL_TOKEN is a development or short token: generate one of at least {MIN_INTERNAL_TOKEN} "
            "random characters (`maas up` does)"
        )
    # A certificate names a mesh service only where the server verified it against the mesh's CA: on a
    # mutual-TLS listener. A TLS-only listener never asks for one, so none can be presented there.
    trust_certs = _requires_client_certs(settings) or internal_listener
    return AuthInterceptor(
        authorization or {},
        keys=KeyStore(settings.keys_path),
        internal_token=token,
        trust_client_certs=trust_certs,
        limits=TenantLimits(settings.rate_limit_inference, settings.rate_limit_management),
        max_streams_per_tenant=settings.max_streams_per_tenant,
    )


async def start_server(
    settings: CommonSettings,
    address: str,
    registrations: Sequence[Registration],
    service_names: Sequence[str],
    *,
    metrics: RpcMetrics | None = None,
    authorization: AuthorizationTable | None = None,
    extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    options: Sequence[tuple[str, Any]] = (),
    internal_address: str | None = None,
) -> ServiceServer:
    """Build, bind and start a grpc.aio server; returns it with the bound port (``host:0`` picks one).

    ``internal_address`` adds a second listener of the same server, for the mesh's own services: it requires a
    client certificate from the mesh's CA (mutual TLS), which identifies the calling service. The main listener
    stays TLS-only, for users, who hold API keys and no certificate (gRPC's Python server cannot ask for a
    client certificate without requiring one, so one listener cannot serve both).

    Interceptors run outermost first: tracing with request context, logging, metrics and error mapping (one
    layer, :class:`RequestInterceptor`), authentication and authorization against ``authorization`` (the
    service's table; an RPC without a rule is refused), then any service-specific ones.

    Raises:
        InsecureConfiguration: No TLS, or a guessable internal token, outside ``settings.insecure``.
    """
    interceptors: list[grpc.aio.ServerInterceptor] = [RequestInterceptor(metrics)]
    auth = _auth_interceptor(settings, authorization, internal_listener=internal_address is not None)
    if auth is not None:
        interceptors.append(auth)
    interceptors.extend(extra_interceptors)
    server = grpc.aio.server(
        interceptors=interceptors,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.so_reuseport", 0),
            *options,
        ],
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for register in registrations:
        register(server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
    credentials = _credentials(settings, mutual=_requires_client_certs(settings))
    port = _bind(server, address, credentials)
    internal_port = 0
    if internal_address is not None:
        internal_port = _bind(server, internal_address, _credentials(settings, mutual=True))
    await server.start()
    for name in ("", *service_names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving",
        address=address,
        port=port,
        internal_port=internal_port or None,
        services=list(service_names),
        tls=credentials is not None,
    )
    running = ServiceServer(
        server=server, health=health, port=port, service_names=service_names, internal_port=internal_port
    )
    if settings.health_address:
        await _serve_health(settings.health_address, running)
    return running


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return port


async def _serve_health(address: str, running: ServiceServer) -> None:
    """Health alone, in plaintext, for probes that cannot speak TLS: the same servicer, so the main server's
    NOT_SERVING at shutdown shows here too. It tells whether the service serves, nothing else."""
    probe_server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(running.health, probe_server)
    port = probe_server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    await probe_server.start()
    running.health_port = port

    async def stop_probes() -> None:
        await probe_server.stop(0)

    running.on_close.append(stop_probes)


async def start_service(
    settings: CommonSettings,
    address: str,
    metrics_address: str,
    registrations: Sequence[Registration],
    service_names: Sequence[str],
    *,
    metrics: RpcMetrics | None = None,
    authorization: AuthorizationTable | None = None,
    internal_address: str | None = None,
) -> ServiceServer:
    """:func:`start_server` with the service's Prometheus endpoint (``host:port``, port 0 picks one),
    which closes with the server: what every composition root needs.

    A service with metrics of its own creates ``metrics`` first and registers its collectors in
    ``metrics.registry``; the endpoint serves that registry. Without it, a fresh one is created.
    """
    if metrics is None:
        metrics = RpcMetrics.create()
    host, _, port = metrics_address.rpartition(":")
    metrics_server, metrics_port = serve_metrics(metrics.registry, host, int(port))
    try:
        server = await start_server(
            settings,
            address,
            registrations,
            service_names,
            metrics=metrics,
            authorization=authorization,
            internal_address=internal_address,
        )
    except BaseException:
        metrics_server.shutdown()  # type: ignore[attr-defined]
        raise

    async def close_metrics() -> None:
        # shutdown() waits out the HTTP server's poll interval: not on the event loop.
        await asyncio.to_thread(metrics_server.shutdown)  # type: ignore[attr-defined]

    server.on_close.append(close_metrics)
    server.metrics_port = metrics_port
    return server
