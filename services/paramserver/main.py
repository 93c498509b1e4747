"""The parameter server's composition root: settings, logging, tracing, metrics, shard host, server.

``python -m services.paramserver`` serves one shard; the scheduler runs the same :func:`start` inside a
Ray actor and hands the bound port to the job's workers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog
from maas.paramserver.v1 import paramserver_pb2, paramserver_pb2_grpc

from services.paramserver.api.servicer import AUTHORIZATION, ParamServerServicer
from services.paramserver.core.host import ShardHost
from services.paramserver.settings import ParamServerSettings
from shared.artifacts import configure_zoo_limits
from shared.grpc.server import ServiceServer, start_service
from shared.logging import configure_logging
from shared.tracing import configure_tracing

SERVICE_NAME = paramserver_pb2.DESCRIPTOR.services_by_name["ParameterServer"].full_name
log = structlog.get_logger("maas.paramserver")


@dataclass
class RunningShard:
    server: ServiceServer
    host: ShardHost

    grace_s: float = 10.0

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def metrics_port(self) -> int:
        return self.server.metrics_port

    async def stop(self, grace: float | None = None) -> None:
        """Drain in-flight RPCs for ``grace`` seconds (default: the settings'), then close."""
        await self.server.stop(self.grace_s if grace is None else grace)


async def start(settings: ParamServerSettings) -> RunningShard:
    """Start one shard server with ``settings``; also what tests and the scheduler's actors call."""
    configure_tracing("paramserver", settings.otel_exporter, settings.otel_endpoint)
    configure_zoo_limits(settings.zoo_max_elements)
    host = ShardHost(settings.checkpoint_root(), pull_timeout_s=settings.paramserver_pull_timeout_s)
    servicer = ParamServerServicer(host)
    server = await start_service(
        settings,
        settings.paramserver_address,
        settings.paramserver_metrics_address,
        [lambda s: paramserver_pb2_grpc.add_ParameterServerServicer_to_server(servicer, s)],
        [SERVICE_NAME],
        authorization=AUTHORIZATION,
    )
    server.on_close.append(host.close)
    return RunningShard(server=server, host=host, grace_s=settings.shutdown_grace_s)


async def hosted(options: dict[str, Any]) -> RunningShard:
    """The entry point a scheduler's service-host actor calls (``services.paramserver.main:hosted``).

    ``options`` holds settings fields (e.g. ``{"home": ..., "paramserver_checkpoint_root": ...}``; the
    rest come from ``MAAS_*`` variables); ``bind_host="node"`` listens on every interface so workers
    on other nodes can reach the shard.
    """
    fields = {name: value for name, value in options.items() if name in ParamServerSettings.model_fields}
    if options.get("bind_host") == "node" and "paramserver_address" not in fields:
        fields["paramserver_address"] = "0.0.0.0:0"
    settings = ParamServerSettings(**fields)
    return await start(settings)


async def serve(settings: ParamServerSettings) -> None:
    running = await start(settings)
    log.info("paramserver_ready", port=running.port, metrics_port=running.metrics_port)
    await running.server.wait_for_signal(settings.shutdown_grace_s)


def main() -> None:
    settings = ParamServerSettings()
    configure_logging(
        "paramserver", settings.log_level, settings.log_format, settings.log_file, settings.log_file_max_bytes
    )
    asyncio.run(serve(settings))
