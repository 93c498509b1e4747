"""``maas tenants create | get | list | quota`` and ``maas usage``: tenants' quotas in the scheduler.

A quota says what a tenant is entitled to; an amount left out has no limit. A borrowing limit says how much
of other tenants' idle capacity it may use beyond its quota: none unless one is given, and in a given limit
an amount left out has no limit. Priority classes above the default one are granted per tenant.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from typing import Any

import typer
from maas.scheduler.v1 import scheduler_pb2 as pb
from rich.table import Table

from services.cli.common import client, out, run_async
from shared.errors import InvalidArgument

tenants_app = typer.Typer(no_args_is_help=True)

# Quota fields in display order, with the label each gets.
RESOURCES = {"cpus": "cpus", "gpus": "gpus", "memory_bytes": "memory", "jobs": "jobs", "replicas": "replicas"}
NO_LIMIT = "no limit"

_UNITS = {
    "": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
}
_SIZE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)


def parse_bytes(text: str, option: str = "--memory") -> int:
    """Bytes from ``1073741824``, ``2Gi``, ``512Mi``, ``1.5G``, ``2GiB`` (``k``/``M``/``G``/``T`` are powers of
    1000, ``Ki``/``Mi``/``Gi``/``Ti`` powers of 1024, as in Kubernetes)."""
    match = _SIZE.match(text)
    if match is None:
        raise InvalidArgument.field(option, f"expected bytes or a size such as 2Gi or 512Mi, got {text!r}")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").lower()])


def format_bytes(value: float) -> str:
    """``2 GiB``, ``1.5 MiB``, ``512 B``."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(value) >= size:
            return f"{value / size:.4g} {unit}"
    return f"{value:.0f} B"


def amount(quota: pb.Quota, field: str, unset: str = NO_LIMIT) -> str:
    """One amount of a quota as shown: ``unset`` when the field is not set."""
    if not quota.HasField(field):
        return unset
    value = getattr(quota, field)
    return format_bytes(value) if field == "memory_bytes" else f"{value:g}"


def borrowing(tenant: pb.Tenant, field: str) -> str:
    """The borrowing limit of one resource: ``none`` without a limit, ``no limit`` for an unset amount in one."""
    if not tenant.HasField("borrowing_limit"):
        return "none"
    return amount(tenant.borrowing_limit, field)


def _when(timestamp: Any) -> str:
    if not timestamp.seconds:
        return ""
    when = datetime.datetime.fromtimestamp(timestamp.seconds, datetime.UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _quota(
    cpus: float | None, gpus: float | None, memory: str | None, jobs: int | None, replicas: int | None, prefix: str
) -> pb.Quota:
    quota = pb.Quota()
    if cpus is not None:
        quota.cpus = cpus
    if gpus is not None:
        quota.gpus = gpus
    if memory is not None:
        quota.memory_bytes = parse_bytes(memory, f"--{prefix}memory")
    if jobs is not None:
        quota.jobs = jobs
    if replicas is not None:
        quota.replicas = replicas
    return quota


def print_tenant(tenant: pb.Tenant) -> None:
    """A tenant: its quota and borrowing limit per resource, and its priority classes."""
    times = f"created {_when(tenant.create_time)}"
    if tenant.update_time.seconds and tenant.update_time.seconds != tenant.create_time.seconds:
        times += f", updated {_when(tenant.update_time)}"
    out.print(f"tenant {tenant.name} ({times})", highlight=False)
    table = Table("resource", "quota", "borrowing limit")
    for field, label in RESOURCES.items():
        table.add_row(label, amount(tenant.quota, field), borrowing(tenant, field))
    out.print(table)
    classes = ", ".join(tenant.priority_classes) or "none"
    out.print(f"priority classes granted: {classes}", highlight=False)


# Options shared by create and quota: typer needs them spelled out per command.
CPUS = typer.Option(None, help="Logical CPUs (unset: no limit).")
GPUS = typer.Option(None, help="GPUs (unset: no limit).")
MEMORY = typer.Option(None, help="Memory: bytes or a size such as 2Gi, 512Mi, 1.5G (unset: no limit).")
JOBS = typer.Option(None, help="Training jobs placed or running at once (unset: no limit).")
REPLICAS = typer.Option(None, help="Inference replicas at once, every deployment's (unset: no limit).")
BORROW = typer.Option(
    False,
    "--borrow",
    help="Let the tenant borrow other tenants' idle capacity beyond its quota; resources without a --borrow-* "
    "amount may then borrow without limit. A --borrow-* option implies it. Without either: no borrowing.",
)
BORROW_CPUS = typer.Option(None, help="CPUs it may borrow beyond its quota.")
BORROW_GPUS = typer.Option(None, help="GPUs it may borrow beyond its quota.")
BORROW_MEMORY = typer.Option(None, help="Memory it may borrow beyond its quota (bytes or a size such as 2Gi).")
BORROW_JOBS = typer.Option(None, help="Jobs it may run beyond its quota.")
BORROW_REPLICAS = typer.Option(None, help="Replicas it may run beyond its quota.")
CLASSES = typer.Option(
    [],
    "--priority-class",
    help="A priority class above the default one that its jobs may use (repeatable); the default class and "
    "those below it are open to every tenant.",
)


def _tenant_command(rpc: str, help_text: str) -> Callable[..., Any]:
    """``create`` and ``quota`` take the same options; they differ in the RPC they call."""

    async def command(
        name: str = typer.Argument(..., help="The tenant (the name its API keys carry)."),
        cpus: float | None = CPUS,
        gpus: float | None = GPUS,
        memory: str | None = MEMORY,
        jobs: int | None = JOBS,
        replicas: int | None = REPLICAS,
        borrow: bool = BORROW,
        borrow_cpus: float | None = BORROW_CPUS,
        borrow_gpus: float | None = BORROW_GPUS,
        borrow_memory: str | None = BORROW_MEMORY,
        borrow_jobs: int | None = BORROW_JOBS,
        borrow_replicas: int | None = BORROW_REPLICAS,
        priority_class: list[str] = CLASSES,
    ) -> None:
        tenant = pb.Tenant(
            name=name,
            quota=_quota(cpus, gpus, memory, jobs, replicas, ""),
            priority_classes=priority_class,
        )
        limits = (borrow_cpus, borrow_gpus, borrow_memory, borrow_jobs, borrow_replicas)
        if borrow or any(limit is not None for limit in limits):
            tenant.borrowing_limit.CopyFrom(_quota(*limits, "borrow-"))
        async with client() as sdk:
            if rpc == "CreateTenant":
                saved = await sdk.tenants.create(tenant)
            else:
                saved = await sdk.tenants.update_quota(tenant)
        print_tenant(saved)

    command.__doc__ = help_text
    return run_async(command)


tenants_app.command("create")(
    _tenant_command(
        "CreateTenant",
        "Create a tenant's record: its quota, borrowing limit and priority classes (admin). A tenant without a "
        "record has the scheduler's default quota.",
    )
)
tenants_app.command("quota")(
    _tenant_command(
        "UpdateQuota",
        "Replace a tenant's quota, borrowing limit and priority classes (admin). Everything is replaced: an "
        "amount, a borrowing limit or a class left out here is removed (an amount left out has no limit).",
    )
)


@tenants_app.command("get")
@run_async
async def get(name: str = typer.Argument(..., help="The tenant.")) -> None:
    """Show a tenant's quota, borrowing limit and priority classes."""
    async with client() as sdk:
        print_tenant(await sdk.tenants.get(name))


def _borrowing_summary(tenant: pb.Tenant) -> str:
    if not tenant.HasField("borrowing_limit"):
        return "none"
    limit = tenant.borrowing_limit
    given = [f"{label} {amount(limit, field)}" for field, label in RESOURCES.items() if limit.HasField(field)]
    if len(given) == len(RESOURCES):
        return ", ".join(given)
    return ", ".join([*given, "others no limit" if given else NO_LIMIT])


@tenants_app.command("list")
@run_async
async def list_tenants() -> None:
    """List the tenants with a record (admin: all; a tenant's key: its own)."""
    async with client() as sdk:
        tenants = await sdk.tenants.list()
    table = Table("name", *RESOURCES.values(), "borrowing limit", "priority classes")
    for tenant in tenants:
        table.add_row(
            tenant.name,
            *(amount(tenant.quota, field) for field in RESOURCES),
            _borrowing_summary(tenant),
            ", ".join(tenant.priority_classes),
        )
    out.print(table)


@run_async
async def usage(
    tenant: str = typer.Argument("", help="The tenant (default: the caller's own)."),
) -> None:
    """Show what a tenant has placed now (every job's whole gang, every replica) against its quota."""
    async with client() as sdk:
        reply = await sdk.tenants.usage(tenant)
    record = "" if reply.tenant.create_time.seconds else " (no record: the default quota)"
    out.print(
        f"tenant {reply.tenant.name}{record}: jobs running {reply.running_jobs}, queued {reply.queued_jobs}",
        highlight=False,
    )
    table = Table("resource", "used", "quota", "borrowing limit", "note")
    for field, label in RESOURCES.items():
        used = getattr(reply.used, field)
        note = ""
        if reply.tenant.quota.HasField(field) and used > getattr(reply.tenant.quota, field):
            note = "borrowing (over quota)"
        table.add_row(
            label,
            amount(reply.used, field, unset="0"),
            amount(reply.tenant.quota, field),
            borrowing(reply.tenant, field),
            note,
        )
    out.print(table)
