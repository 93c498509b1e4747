"""``maas status``: every service of the mesh, its address and health; the pool, deployments and jobs.

Health is grpc.health.v1 over the same TLS and credentials as every command (``CliSettings``: the addresses
and what ``maas up`` wrote under ``MAAS_HOME``). A service that does not answer is reported down, and the
command exits 1, without a stack trace. The calls are in :func:`read_status` alone, apart from rendering.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

import grpc
import typer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from maas.scheduler.v1 import scheduler_pb2 as pb
from rich.table import Table

from services.cli.common import client, console, describe_failure, out, run_async
from services.cli.settings import CliSettings
from shared.errors import MaasError
from shared.grpc.channel import make_channel

SERVING = "SERVING"
HEALTH_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ServiceHealth:
    name: str
    address: str
    #: SERVING, NOT_SERVING, ..., or "down" when it did not answer.
    status: str
    detail: str = ""


@dataclass
class MeshStatus:
    services: list[ServiceHealth]
    cluster: pb.GetClusterResponse | None = None
    deployments: list[pb.Deployment] = field(default_factory=list)
    jobs: list[pb.Job] = field(default_factory=list)
    #: What could not be read, one line each (a key without the admin role, a call that failed).
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return all(service.status == SERVING for service in self.services)


async def _health(name: str, address: str, settings: CliSettings) -> ServiceHealth:
    channel = make_channel(address, settings)
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S
        )
        return ServiceHealth(name, address, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.aio.AioRpcError as exc:
        details = exc.details() or ""
        why = "nothing listens there" if "Connection refused" in details else f"{exc.code().name}: {details[:120]}"
        return ServiceHealth(name, address, "down", f"({why})")
    finally:
        await channel.close()


async def read_status(settings: CliSettings, jobs: int = 10) -> MeshStatus:
    """Every call ``maas status`` makes: each service's health; then, from a serving scheduler, the pool,
    the deployments and the ``jobs`` newest jobs."""
    services = [
        ("registry", settings.registry_address),
        ("scheduler", settings.scheduler_address),
        ("gateway", settings.gateway_address),
    ]
    health = await asyncio.gather(*(_health(name, address, settings) for name, address in services))
    status = MeshStatus(list(health))
    if health[1].status != SERVING:
        return status
    async with client(settings) as mesh:
        try:
            status.cluster = await mesh.tenants.cluster()
        except MaasError as exc:
            status.problems.append(f"cluster: {describe_failure(exc)}")
        try:
            status.deployments = await mesh.deployments.list()
            status.jobs = await mesh.jobs.list(limit=jobs)
        except MaasError as exc:
            status.problems.append(f"deployments and jobs: {describe_failure(exc)}")
    return status


def _amount(quota: pb.Quota, name: str) -> float:
    return float(getattr(quota, name)) if quota.HasField(name) else math.inf


def _resources(cluster: pb.GetClusterResponse) -> str:
    parts = []
    for name, label in (("cpus", "CPUs"), ("gpus", "GPUs"), ("jobs", "jobs running"), ("replicas", "replicas")):
        used, capacity = _amount(cluster.used, name), _amount(cluster.capacity, name)
        if used or math.isfinite(capacity):
            parts.append(f"{used:g}/{capacity:g} {label}" if math.isfinite(capacity) else f"{used:g} {label}")
    return ", ".join(parts) + f"; {cluster.queued_jobs} queued"


def render(status: MeshStatus) -> None:
    services = Table("service", "address", "health", box=None, pad_edge=False)
    for service in status.services:
        health = "[green]serving[/]" if service.status == SERVING else f"[red]{service.status.lower()}[/]"
        services.add_row(service.name, service.address, f"{health} {service.detail}".strip())
    out.print(services)
    if status.cluster is not None:
        out.print(f"\npool (placed / capacity, as the scheduler counts): {_resources(status.cluster)}")
    if status.deployments:
        table = Table("deployment", "model", "state", "replicas ready", box=None, pad_edge=False)
        for d in status.deployments:
            ready = sum(r.state == pb.REPLICA_READY for r in d.replicas)
            table.add_row(
                d.name, f"{d.spec.model}@{d.version}", pb.DeploymentState.Name(d.state), f"{ready}/{d.target_replicas}"
            )
        out.print()
        out.print(table)
    if status.jobs:
        table = Table("job", "tenant", "state", "step", "message", box=None, pad_edge=False)
        for job in status.jobs:
            table.add_row(
                job.id,
                job.spec.tenant,
                pb.JobState.Name(job.state),
                f"{job.step}/{job.total_steps}",
                job.message[:60],
            )
        out.print()
        out.print(table)
    for problem in status.problems:
        console.print(f"[yellow]could not read[/] {problem}", highlight=False, soft_wrap=True)
    if not status.healthy:
        down = [s.name for s in status.services if s.status != SERVING]
        console.print(f"[red]not healthy[/]: {', '.join(down)} (is `maas up` running?)", highlight=False)


async def _read() -> MeshStatus:
    return await read_status(CliSettings())


def status() -> None:
    """Show every service's address and health, the pool's resources in use, deployments and jobs; exit 1
    when a service is down."""
    result = run_async(_read)()
    render(result)
    if not result.healthy:
        raise typer.Exit(1)
