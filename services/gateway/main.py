"""The gateway's composition root: settings, logging, tracing, scheduler link, core, server.

``python -m services.gateway`` serves ``inference.GRPCInferenceService`` on ``gateway_address``, following
the scheduler's endpoint stream. Tests call :func:`start` with an in-process endpoint source instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import structlog

from services.gateway.adapters.replicas import ReplicaPool
from services.gateway.adapters.scheduler import SchedulerLink
from services.gateway.api.servicer import AUTHORIZATION, SERVICE_NAME, InferenceServicer, handlers
from services.gateway.core.control import Repository
from services.gateway.core.load import LoadTracker, report_forever
from services.gateway.core.ports import DeploymentControl, EndpointSource, LoadSink, Replicas
from services.gateway.core.service import Gateway
from services.gateway.core.shm import SharedMemoryRegions
from services.gateway.core.table import EndpointTable
from services.gateway.settings import GatewaySettings
from shared.grpc.server import ServiceServer, start_service
from shared.logging import configure_logging
from shared.tracing import configure_tracing


class _NoLoadSink:
    """Where load goes when no scheduler is linked (fixed endpoints): nobody scales on it."""

    async def report(self, ongoing: Mapping[str, float]) -> None:
        return None


log = structlog.get_logger("maas.gateway")


@dataclass
class RunningGateway:
    """A started gateway: its server, core and background tasks."""

    server: ServiceServer
    gateway: Gateway
    grace_s: float = 10.0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def metrics_port(self) -> int:
        return self.server.metrics_port

    async def stop(self, grace: float | None = None) -> None:
        """Drain in-flight requests for ``grace`` seconds (default: the settings'), then close."""
        await self.server.stop(self.grace_s if grace is None else grace)


async def start(
    settings: GatewaySettings,
    *,
    endpoints: EndpointSource | None = None,
    load_sink: LoadSink | None = None,
    control: DeploymentControl | None = None,
    replicas: Replicas | None = None,
) -> RunningGateway:
    """Start the gateway with ``settings``; also what tests call (with port 0 addresses).

    By default endpoints, load reports and deployment control go to the scheduler at
    ``gateway_scheduler_address``; each can be replaced by an in-process implementation (tests).
    """
    configure_tracing("gateway", settings.otel_exporter, settings.otel_endpoint)
    closers: list[Callable[[], Awaitable[None]]] = []
    link: SchedulerLink | None = None
    if endpoints is None or control is None or load_sink is None:
        link = SchedulerLink.connect(
            settings.gateway_scheduler_address,
            settings.gateway_registry_address,
            settings,
            gateway_id=f"gateway-{uuid.uuid4().hex[:12]}",
            backoff_max_s=settings.gateway_watch_backoff_max_s,
        )
        closers.append(link.close)
    source: EndpointSource = endpoints or link  # type: ignore[assignment]
    sink: LoadSink = load_sink or link or _NoLoadSink()
    deployment_control: DeploymentControl = control or link  # type: ignore[assignment]
    pool: Replicas
    if replicas is None:
        own_pool = ReplicaPool(
            settings,
            tracing=settings.gateway_trace_workers,
            streams=settings.gateway_worker_streams,
            hold_after=settings.gateway_stream_hold_after,
            max_outbox_bytes=settings.gateway_max_outbox_bytes,
        )
        closers.append(own_pool.close)
        pool = own_pool
    else:
        pool = replicas

    table = EndpointTable()
    load = LoadTracker()
    gateway = Gateway(
        table,
        pool,
        load,
        retries=settings.gateway_retries,
        max_hold_s=settings.gateway_max_hold_s,
        max_held=settings.gateway_max_held_requests,
    )
    repository = Repository(deployment_control, table)
    regions = None
    if settings.gateway_shared_memory:
        regions = SharedMemoryRegions(settings.gateway_shared_memory_max_regions)

        async def unmap_regions(regions: SharedMemoryRegions = regions) -> None:
            regions.close()

        closers.append(unmap_regions)
    servicer = InferenceServicer(
        gateway,
        repository,
        statistics_timeout_s=settings.rpc_timeout_s,
        load_timeout_s=settings.gateway_load_timeout_s,
        stream_max_in_flight=settings.gateway_stream_max_in_flight,
        stream_buffer=settings.gateway_stream_buffer,
        stream_idle_s=settings.gateway_stream_idle_s,
        shared_memory=regions,
    )
    tasks = [
        asyncio.create_task(source.follow(gateway.apply_snapshot, gateway.table.mark_stale), name="gateway-endpoints"),
        asyncio.create_task(
            report_forever(
                load, sink, settings.gateway_report_interval_s, lambda: [d.name for d in table.deployments()]
            ),
            name="gateway-load",
        ),
    ]
    try:
        server = await start_service(
            settings,
            settings.gateway_address,
            settings.gateway_metrics_address,
            [lambda s: s.add_generic_rpc_handlers((handlers(servicer),))],
            [SERVICE_NAME],
            authorization=AUTHORIZATION,
        )
    except BaseException:
        await _cancel(tasks)
        for closer in reversed(closers):
            await closer()
        raise

    async def close() -> None:
        await _cancel(tasks)
        for closer in reversed(closers):
            await closer()

    server.on_close.append(close)
    return RunningGateway(server=server, gateway=gateway, grace_s=settings.shutdown_grace_s, tasks=tasks)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def serve(settings: GatewaySettings) -> None:
    running = await start(settings)
    log.info("gateway_ready", port=running.port, metrics_port=running.metrics_port)
    await running.server.wait_for_signal(settings.shutdown_grace_s)


def main() -> None:
    settings = GatewaySettings()
    configure_logging("gateway", settings.log_level, settings.log_format)
    asyncio.run(serve(settings))
