"""The scheduler's composition root: settings, logging, tracing, metrics, job store, core, server.

The job runner is built lazily, by a factory the core calls when it first admits or resumes a job: a
scheduler whose admission is paused (``scheduler_max_running_jobs`` 0) never starts Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from maas.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from services.scheduler.adapters.sql.repository import SqlJobRepository
from services.scheduler.adapters.sql.tables import MIGRATIONS
from services.scheduler.api.servicer import SchedulerServicer
from services.scheduler.core.ports import JobRunner
from services.scheduler.core.service import JobService
from services.scheduler.settings import SchedulerSettings
from shared.grpc.server import ServiceServer, start_service
from shared.logging import configure_logging
from shared.sql import create_engine, migrate
from shared.tracing import configure_tracing

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name
log = structlog.get_logger("maas.scheduler")


@dataclass
class RunningScheduler:
    server: ServiceServer
    service: JobService

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def metrics_port(self) -> int:
        return self.server.metrics_port


def ray_runner_factory(settings: SchedulerSettings) -> Callable[[], JobRunner]:
    """A factory of the Ray job runner; Ray is imported (and started) only when the factory is called."""

    def factory() -> JobRunner:
        from services.scheduler.adapters.ray_runner import RayJobRunner

        runner: JobRunner = RayJobRunner(settings)
        return runner

    return factory


async def start(settings: SchedulerSettings, runner_factory: Callable[[], JobRunner] | None = None) -> RunningScheduler:
    """Start the scheduler with ``settings``; also what tests call (with port 0 addresses).

    ``runner_factory`` builds the job runner on first need; None: the Ray runner (:func:`ray_runner_factory`).
    """
    configure_tracing("scheduler", settings.otel_exporter, settings.otel_endpoint)
    database_url = settings.database_url()
    if database_url.startswith("sqlite:///"):
        (settings.home / "scheduler").mkdir(parents=True, exist_ok=True)
    settings.data_root().mkdir(parents=True, exist_ok=True)
    engine = create_engine(database_url)
    await asyncio.to_thread(migrate, engine, MIGRATIONS)
    service = JobService(
        SqlJobRepository(engine),
        runner_factory or ray_runner_factory(settings),
        data_root=settings.data_root(),
        max_running_jobs=settings.scheduler_max_running_jobs,
        tenant_max_running=settings.scheduler_tenant_max_running,
        default_max_failures=settings.scheduler_default_max_failures,
    )
    await service.start()
    servicer = SchedulerServicer(service)
    try:
        server = await start_service(
            settings,
            settings.scheduler_address,
            settings.scheduler_metrics_address,
            [lambda s: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, s)],
            [SERVICE_NAME],
        )
    except BaseException:
        await service.close()
        await asyncio.to_thread(engine.dispose)
        raise

    async def close() -> None:
        await service.close()
        await asyncio.to_thread(engine.dispose)

    server.on_close.append(close)
    return RunningScheduler(server=server, service=service)


async def serve(settings: SchedulerSettings) -> None:
    running = await start(settings)
    log.info("scheduler_ready", port=running.port, metrics_port=running.metrics_port)
    await running.server.wait_for_signal(settings.shutdown_grace_s)


def main() -> None:
    settings = SchedulerSettings()
    configure_logging("scheduler", settings.log_level, settings.log_format)
    asyncio.run(serve(settings))
