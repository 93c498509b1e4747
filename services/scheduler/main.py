"""The scheduler's composition root: settings, logging, tracing, metrics, stores, cores, server.

The job runner and the replica pool are built lazily, by factories the cores call when they first need
them: a scheduler with no job admitted and no deployment never starts Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from maas.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from services.scheduler.adapters.capacity import RayCapacity
from services.scheduler.adapters.registry_resolver import RegistryModelResolver
from services.scheduler.adapters.sql.deployment_repository import SqlDeploymentRepository
from services.scheduler.adapters.sql.repository import SqlJobRepository
from services.scheduler.adapters.sql.tables import MIGRATIONS
from services.scheduler.adapters.sql.tenant_repository import SqlTenantRepository
from services.scheduler.api.servicer import AUTHORIZATION, SchedulerServicer
from services.scheduler.core.cluster import ClusterView
from services.scheduler.core.deployments.ports import ReplicaPool
from services.scheduler.core.deployments.reconciler import ReconcilerConfig
from services.scheduler.core.deployments.service import DeploymentService
from services.scheduler.core.events import EventBus
from services.scheduler.core.jobs.ports import JobRunner
from services.scheduler.core.jobs.service import JobService
from services.scheduler.core.policy import UNLIMITED, Candidate
from services.scheduler.core.quota import ReplicaQuota
from services.scheduler.core.tenants import TenantService
from services.scheduler.settings import SchedulerSettings
from shared.artifacts import configure_zoo_limits
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
    deployments: DeploymentService

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def metrics_port(self) -> int:
        return self.server.metrics_port

    @property
    def internal_port(self) -> int:
        return self.server.internal_port


def ray_runner_factory(settings: SchedulerSettings) -> Callable[[], JobRunner]:
    """A factory of the Ray job runner; Ray is imported (and started) only when the factory is called."""

    def factory() -> JobRunner:
        from services.scheduler.adapters.ray_runner import RayJobRunner

        runner: JobRunner = RayJobRunner(settings)
        return runner

    return factory


def ray_pool_factory(settings: SchedulerSettings) -> Callable[[], ReplicaPool]:
    """A factory of the Ray replica pool; Ray is imported only when the factory is called."""

    def factory() -> ReplicaPool:
        from services.scheduler.adapters.ray_replicas import RayReplicaPool

        pool: ReplicaPool = RayReplicaPool(settings)
        return pool

    return factory


def reconciler_config(settings: SchedulerSettings) -> ReconcilerConfig:
    return ReconcilerConfig(
        health_interval_s=settings.scheduler_replica_health_interval_s,
        ping_timeout_s=settings.scheduler_replica_ping_timeout_s,
        drain_delay_s=settings.scheduler_replica_drain_delay_s,
        stop_grace_s=settings.scheduler_replica_stop_grace_s,
        start_timeout_s=settings.scheduler_replica_start_timeout_s,
    )


class _DeploymentsLater:
    """``core.ports.ElasticReplicas`` for the job service, which is made before the deployment service (each
    reads the other's usage)."""

    def __init__(self) -> None:
        self.target: DeploymentService | None = None

    def preemptible(self, priority: int) -> list[Candidate]:
        return self.target.preemptible(priority) if self.target is not None else []

    def shed(self, replica_ids: list[str], hold_s: float, reason: str) -> None:
        if self.target is not None:
            self.target.shed(replica_ids, hold_s, reason)


async def start(
    settings: SchedulerSettings,
    runner_factory: Callable[[], JobRunner] | None = None,
    pool_factory: Callable[[], ReplicaPool] | None = None,
) -> RunningScheduler:
    """Start the scheduler with ``settings``; also what tests call (with port 0 addresses).

    ``runner_factory`` builds the job runner on first need; None: the Ray runner (:func:`ray_runner_factory`).
    ``pool_factory`` likewise builds the inference replica pool; None: the Ray pool (:func:`ray_pool_factory`).
    """
    configure_tracing("scheduler", settings.otel_exporter, settings.otel_endpoint)
    # Training jobs are validated against this cap; the actors get the same value (actor_env).
    configure_zoo_limits(settings.zoo_max_elements)
    database_url = settings.database_url()
    if database_url.startswith("sqlite:///"):
        (settings.home / "scheduler").mkdir(parents=True, exist_ok=True)
    settings.data_root().mkdir(parents=True, exist_ok=True)
    engine = create_engine(database_url)
    await asyncio.to_thread(migrate, engine, MIGRATIONS)
    default_quota = UNLIMITED
    if settings.scheduler_tenant_max_running:
        default_quota = dataclasses.replace(UNLIMITED, jobs=settings.scheduler_tenant_max_running)
    tenants = TenantService(
        SqlTenantRepository(engine),
        default_quota=default_quota,
        priority_classes=settings.scheduler_priority_classes,
        default_class=settings.scheduler_default_priority_class,
    )
    await tenants.start()
    deployments: DeploymentService | None = None
    later = _DeploymentsLater()
    capacity = RayCapacity(settings)
    events = EventBus()
    service = JobService(
        SqlJobRepository(engine),
        runner_factory or ray_runner_factory(settings),
        data_root=settings.data_root(),
        max_running_jobs=settings.scheduler_max_running_jobs,
        tenant_max_running=settings.scheduler_tenant_max_running,
        default_max_failures=settings.scheduler_default_max_failures,
        tenants=tenants,
        capacity=capacity,
        replica_usage=lambda: deployments.placed() if deployments is not None else {},
        fair_share_half_life_s=settings.scheduler_fair_share_half_life_s,
        preemption=settings.scheduler_preemption,
        preemption_grace_s=settings.scheduler_preemption_grace_s,
        events=events,
        max_placement_attempts=settings.scheduler_max_placement_attempts,
        admission_min_interval_s=settings.scheduler_admission_min_interval_s,
        # Detached actors outlive a scheduler on a cluster it joined: strays are looked for at every start.
        sweep_at_start=settings.ray_address is not None,
        replicas=later,
        # Replicas rank as jobs of the default class: higher classes may take those above the minimums.
        replica_priority=settings.scheduler_priority_classes[settings.scheduler_default_priority_class],
    )
    resolver = RegistryModelResolver.connect(settings.scheduler_registry_address, settings)
    deployments = DeploymentService(
        SqlDeploymentRepository(engine),
        pool_factory or ray_pool_factory(settings),
        resolver,
        config=reconciler_config(settings),
        default_cpus=settings.scheduler_replica_default_cpus,
        quota=ReplicaQuota(
            tenants.tenant,
            capacity,
            jobs=lambda: service.placed_jobs,
            replicas=lambda: deployments.placed() if deployments is not None else {},
        ),
        events=events,
        sweep_at_start=settings.ray_address is not None,
    )
    later.target = deployments
    await service.start()
    try:
        await deployments.start()
    except BaseException:
        await service.close()
        await resolver.close()
        await asyncio.to_thread(engine.dispose)
        raise
    cluster = ClusterView(service, capacity, settings.scheduler_max_running_jobs)
    servicer = SchedulerServicer(service, deployments, tenants, cluster)
    try:
        server = await start_service(
            settings,
            settings.scheduler_address,
            settings.scheduler_metrics_address,
            [lambda s: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, s)],
            [SERVICE_NAME],
            authorization=AUTHORIZATION,
            internal_address=settings.scheduler_internal_address,
        )
    except BaseException:
        await deployments.close()
        await service.close()
        await resolver.close()
        await asyncio.to_thread(engine.dispose)
        raise

    async def close() -> None:
        await deployments.close()
        await service.close()
        await resolver.close()
        await asyncio.to_thread(engine.dispose)

    server.on_close.append(close)
    return RunningScheduler(server=server, service=service, deployments=deployments)


async def serve(settings: SchedulerSettings) -> None:
    running = await start(settings)
    log.info("scheduler_ready", port=running.port, metrics_port=running.metrics_port)
    await running.server.wait_for_signal(settings.shutdown_grace_s)


def main() -> None:
    settings = SchedulerSettings()
    configure_logging(
        "scheduler", settings.log_level, settings.log_format, settings.log_file, settings.log_file_max_bytes
    )
    asyncio.run(serve(settings))
