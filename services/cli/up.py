"""``maas up``: run the mesh's services as child processes in the foreground.

Each service is its own process (as in a deployment), started with this interpreter, watched through
grpc.health.v1, and stopped with SIGTERM (graceful: NOT_SERVING, drain, close) on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console

from services.cli.settings import CliSettings
from shared.grpc.channel import make_channel
from shared.processes import end_process_group


@dataclass
class Child:
    name: str
    address: str
    process: subprocess.Popen[bytes]


async def wait_serving(address: str, settings: CliSettings, child: Child, timeout_s: float = 60.0) -> None:
    """Poll the health service until it answers SERVING (or the child dies, or time runs out)."""
    channel = make_channel(address, settings)
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        while True:
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited with code {child.process.returncode}; see its log above")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"{child.name} did not become ready at {address} within {timeout_s:.0f}s")
            await asyncio.sleep(0.2)
    finally:
        await channel.close()


def start_child(name: str, module: str, address: str, env: dict[str, str] | None = None) -> Child:
    # Ray forks helper processes after gRPC threads exist; gRPC's fork handlers only log noise there.
    child_env = {"GRPC_ENABLE_FORK_SUPPORT": "false", "GRPC_VERBOSITY": "ERROR", **os.environ, **(env or {})}
    # Its own session: the processes it starts (a local Ray's) share its process group, so whatever
    # outlives the service's graceful stop can be ended with the group.
    process = subprocess.Popen([sys.executable, "-m", module], env=child_env, start_new_session=True)
    return Child(name, address, process)


def stop_children(children: list[Child], grace_s: float) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.process.wait(timeout=grace_s + 5)
        except subprocess.TimeoutExpired:
            child.process.kill()
    # Ray's agents outlive their raylet at times (seen after the scheduler stopped gracefully).
    for child in children:
        end_process_group(child.process.pid)


async def run_up(settings: CliSettings, quickstart: bool, console: Console) -> None:
    from services.cli.quickstart import run_quickstart

    children = [
        start_child("registry", "services.registry", settings.registry_address),
        start_child(
            "scheduler",
            "services.scheduler",
            settings.scheduler_address,
            {"MAAS_SCHEDULER_REGISTRY_ADDRESS": settings.registry_address},
        ),
        start_child(
            "gateway",
            "services.gateway",
            settings.gateway_address,
            {
                "MAAS_GATEWAY_ADDRESS": settings.gateway_address,
                "MAAS_GATEWAY_SCHEDULER_ADDRESS": settings.scheduler_address,
                "MAAS_GATEWAY_REGISTRY_ADDRESS": settings.registry_address,
            },
        ),
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for child in children:
            await wait_serving(child.address, settings, child)
            console.print(f"[green]✓[/] {child.name} serving on {child.address}")
        if quickstart:
            await run_quickstart(settings, console)
        console.print(
            f"\nregistry:  {settings.registry_address}   (try: grpcurl -plaintext {settings.registry_address} "
            "maas.registry.v1.RegistryService/ListModels)"
            f"\nscheduler: {settings.scheduler_address}   (try: maas train list, maas deploy list)"
            f"\ngateway:   {settings.gateway_address}   (KServe v2 gRPC; try: grpcurl -plaintext "
            f"{settings.gateway_address} inference.GRPCInferenceService/RepositoryIndex)\nCtrl-C stops the mesh."
        )
        while not stop.is_set():
            for child in children:
                if child.process.poll() is not None:
                    raise RuntimeError(f"{child.name} exited with code {child.process.returncode}")
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
    finally:
        console.print("stopping...")
        await asyncio.to_thread(stop_children, children, settings.shutdown_grace_s)
