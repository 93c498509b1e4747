"""``maas deploy``: create, show, list, update and delete inference deployments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer
from maas import AsyncClient
from maas.common.v1 import common_pb2
from maas.inference.v1 import worker_pb2
from maas.scheduler.v1 import scheduler_pb2 as pb
from rich.table import Table

from services.cli.common import client, console, out, run_async

deploy_app = typer.Typer(no_args_is_help=True)

# Options shared by create and update: typer needs them spelled out per command.
VERSION = typer.Option("", help="Version number or alias (default: the latest version).")
NAME = typer.Option("", help="Name clients use (default: the model's name).")
MIN_REPLICAS = typer.Option(1, help="Replicas at least (0 allows scaling to zero with --target-ongoing).")
MAX_REPLICAS = typer.Option(0, help="Replicas at most (0: --min-replicas).")
CPUS = typer.Option(0.0, help="Logical CPUs per replica (0: the scheduler's default).")
GPUS = typer.Option(0.0, help="GPUs per replica (0: CPU only).")
MAX_BATCH = typer.Option(0, help="Largest batch the dynamic batcher forms (0: 32; 1: no batching).")
DELAY_US = typer.Option(0, help="Longest wait for a batch to fill, microseconds (0: 2000).")
QUEUE = typer.Option(0, help="Requests queued per replica before RESOURCE_EXHAUSTED (0: 1024).")
TARGET = typer.Option(0.0, help="Autoscaling: requests in flight per replica to aim at (0: no autoscaling).")
UP_DELAY = typer.Option(0.0, help="Autoscaling: seconds of high load before adding replicas (0: 2).")
DOWN_DELAY = typer.Option(0.0, help="Autoscaling: seconds of low load before removing replicas (0: 30).")
CANARY = typer.Option("", help="Canary version (number or alias) that takes --canary-weight percent of traffic.")
CANARY_WEIGHT = typer.Option(0, help="Percent of traffic for the canary (1-99).")
WAIT = typer.Option(True, "--wait/--no-wait", help="Wait until the deployment is ready.")


def _spec(
    model: str,
    version: str,
    name: str,
    min_replicas: int,
    max_replicas: int,
    cpus: float,
    gpus: float,
    max_batch_size: int,
    max_queue_delay_us: int,
    max_queue_size: int,
    target_ongoing: float,
    upscale_delay_s: float,
    downscale_delay_s: float,
    canary: str,
    canary_weight: int,
) -> pb.DeploymentSpec:
    return pb.DeploymentSpec(
        model=model,
        version=version,
        name=name,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        resources=common_pb2.ResourceRequest(cpus=cpus, gpus=gpus),
        batching=worker_pb2.BatchingConfig(
            max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us, max_queue_size=max_queue_size
        ),
        autoscaling=pb.AutoscalingConfig(
            target_ongoing_requests=target_ongoing,
            upscale_delay_s=upscale_delay_s,
            downscale_delay_s=downscale_delay_s,
        ),
        canary=pb.Canary(version=canary, weight_percent=canary_weight) if canary else None,
    )


def _state(deployment: pb.Deployment) -> str:
    return pb.DeploymentState.Name(deployment.state)


def print_deployment(d: pb.Deployment) -> None:
    ready = sum(1 for r in d.replicas if r.state == pb.REPLICA_READY)
    version = f"{d.spec.model}@{d.version}"
    if d.canary_version:
        version += f" (canary @{d.canary_version}: {d.spec.canary.weight_percent}%)"
    line = f"{d.name} {_state(d)} {version} replicas {ready}/{d.target_replicas} ready, generation {d.generation}"
    if d.message:
        line += f" ({d.message})"
    out.print(line, highlight=False)


async def wait_ready(sdk: AsyncClient, name: str, timeout_s: float = 600.0) -> pb.Deployment:
    """Wait with a spinner until the deployment is READY; a FAILED one (or time running out) raises."""
    with console.status(f"waiting for {name} to be ready..."):
        return await sdk.deployments.wait_ready(name, timeout_s=timeout_s)


def _spec_command(rpc: str, help_text: str) -> Callable[..., Any]:
    """``create`` and ``update`` take the same options; they differ in the RPC they call."""

    async def command(
        model: str = typer.Argument(..., help="Registry model to serve (and the deployment's name unless --name)."),
        version: str = VERSION,
        name: str = NAME,
        min_replicas: int = MIN_REPLICAS,
        max_replicas: int = MAX_REPLICAS,
        cpus: float = CPUS,
        gpus: float = GPUS,
        max_batch_size: int = MAX_BATCH,
        max_queue_delay_us: int = DELAY_US,
        max_queue_size: int = QUEUE,
        target_ongoing: float = TARGET,
        upscale_delay_s: float = UP_DELAY,
        downscale_delay_s: float = DOWN_DELAY,
        canary: str = CANARY,
        canary_weight: int = CANARY_WEIGHT,
        wait: bool = WAIT,
    ) -> None:
        # locals() also holds the closure's free variable (rpc): take only the options.
        spec = _spec(**{k: v for k, v in locals().items() if k not in ("wait", "rpc")})
        async with client() as sdk:
            if rpc == "CreateDeployment":
                deployment = await sdk.deployments.create(spec)
            else:
                deployment = await sdk.deployments.update(spec)
            if wait:
                deployment = await wait_ready(sdk, deployment.name)
            print_deployment(deployment)

    command.__doc__ = help_text
    return run_async(command)


deploy_app.command("create")(_spec_command("CreateDeployment", "Deploy a registry model behind the gateway."))
deploy_app.command("update")(
    _spec_command(
        "UpdateDeployment", "Replace a deployment's spec: a new version is a rolling update (no request fails)."
    )
)


@deploy_app.command()
@run_async
async def show(name: str) -> None:
    """Show a deployment and its replicas."""
    async with client() as sdk:
        deployment = await sdk.deployments.get(name)
    print_deployment(deployment)
    table = Table("replica", "version", "state", "address")
    for r in deployment.replicas:
        table.add_row(r.id, str(r.version), pb.ReplicaState.Name(r.state), r.address)
    out.print(table)


@deploy_app.command("list")
@run_async
async def list_deployments() -> None:
    """List deployments."""
    table = Table("name", "state", "model", "version", "canary", "replicas", "message")
    async with client() as sdk:
        deployments = await sdk.deployments.list()
    for d in deployments:
        ready = sum(1 for r in d.replicas if r.state == pb.REPLICA_READY)
        canary = f"@{d.canary_version} {d.spec.canary.weight_percent}%" if d.canary_version else ""
        table.add_row(
            d.name, _state(d), d.spec.model, str(d.version), canary, f"{ready}/{d.target_replicas}", d.message
        )
    out.print(table)


@deploy_app.command()
@run_async
async def delete(name: str) -> None:
    """Remove a deployment: it leaves the gateway's endpoints, then its replicas drain and stop."""
    async with client() as sdk:
        await sdk.deployments.delete(name)
    out.print(f"deleted {name}")
