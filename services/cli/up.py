"""``maas up``: run the mesh's services as child processes in the foreground.

Each service is its own process (as in a deployment), started with this interpreter, watched through
grpc.health.v1, and stopped with SIGTERM (graceful: NOT_SERVING, drain, close) on Ctrl-C or SIGTERM. The
services also get SIGTERM when ``maas up`` dies without stopping them (``kill -9``), and the next ``maas up``
over the same home ends whatever a killed mesh left (``mesh_state``): it starts again any number of times.
On a terminal the services' logs go to files (``up_logs``), so that the terminal shows this command's lines.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console

from services.cli.credentials import (
    DEFAULT_TENANT,
    credentials_path,
    ensure_mesh_credentials,
    mark_insecure,
)
from services.cli.mesh_state import MeshLock, address_in_use
from services.cli.settings import CliSettings
from services.cli.up_logs import ServiceLogs
from shared.grpc.channel import make_channel
from shared.processes import end_process_group


@dataclass
class Child:
    name: str
    address: str
    process: subprocess.Popen[bytes]


async def wait_serving(
    address: str, settings: CliSettings, child: Child, logs: ServiceLogs, timeout_s: float = 60.0
) -> None:
    """Poll the health service until it answers SERVING (or the child dies, or time runs out)."""
    channel = make_channel(address, settings)
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        while True:
            if child.process.poll() is not None:
                raise RuntimeError(describe_exit(child, logs, " while starting"))
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


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """In the child, before exec: SIGTERM when ``maas up`` dies, even by SIGKILL (Linux; elsewhere no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def start_child(
    name: str, module: str, address: str, env: dict[str, str] | None = None, logs: ServiceLogs | None = None
) -> Child:
    # Ray forks helper processes after gRPC threads exist; gRPC's fork handlers only log noise there.
    child_env = {"GRPC_ENABLE_FORK_SUPPORT": "false", "GRPC_VERBOSITY": "ERROR", **os.environ, **(env or {})}
    parent = os.getpid()
    output = logs.open_output(name) if logs is not None else None
    # Its own session: the processes it starts (a local Ray's) share its process group, so whatever
    # outlives the service's graceful stop can be ended with the group.
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", module],
            env=child_env,
            stdout=output,
            stderr=subprocess.STDOUT if output is not None else None,
            start_new_session=True,
            preexec_fn=lambda: _die_with_parent(parent),  # only ctypes and getppid run there
        )
    finally:
        if output is not None:
            output.close()  # the child holds its own descriptor
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


def describe_exit(child: Child, logs: ServiceLogs, when: str = "") -> str:
    code = child.process.returncode
    if code is not None and code < 0:
        return f"{child.name} was killed by {signal.Signals(-code).name}{when}"
    return f"{child.name} exited with code {code}{when}; {logs.last_words(child.name)}"


async def run_up(
    settings: CliSettings, quickstart: bool, console: Console, logs: ServiceLogs, *, insecure: bool = False
) -> None:
    lock = MeshLock(settings.home)
    ended = lock.acquire()
    if ended:
        console.print(f"ended {len(ended)} processes left by an earlier `maas up` over {lock.home}")
    try:
        settings, service_env = _secure_or_not(settings, console, insecure)
        await _run_mesh(settings, quickstart, console, lock, service_env, logs)
    finally:
        lock.release()


def _secure_or_not(
    settings: CliSettings, console: Console, insecure: bool
) -> tuple[CliSettings, Callable[[str], dict[str, str]]]:
    """TLS and keys (created on first start), or plaintext with a warning; the settings this command's own
    calls use, and each service's environment."""
    if insecure:
        mark_insecure(settings.home)
        console.print("[yellow]warning[/]: --insecure: plaintext and no authentication (development only)")
        return settings.model_copy(update={"insecure": True}), lambda _name: {"MAAS_INSECURE": "true"}
    credentials = ensure_mesh_credentials(settings.home)
    if credentials.created_key:
        console.print(
            f"created an admin API key for tenant '{DEFAULT_TENANT}' (shown once; the CLI reads it from "
            f"{credentials_path(settings.home.resolve())}):\n  {credentials.admin_key}",
            soft_wrap=True,
        )
    update = {"insecure": False, "client_token": credentials.admin_key, "tls_ca_file": credentials.ca_file}
    return settings.model_copy(update=update), credentials.service_env


def _services(settings: CliSettings) -> list[tuple[str, str, str, dict[str, str]]]:
    """(name, module, address, environment) of each service, in start order.

    Secure, the registry and the scheduler also listen with mutual TLS on their internal addresses, and the
    services call each other there, identified by their certificates; users call the main addresses with API
    keys. Plaintext (``--insecure``) has no internal listeners: the services call the main addresses.
    """
    registry, scheduler = settings.registry_address, settings.scheduler_address
    registry_env: dict[str, str] = {}
    scheduler_env: dict[str, str] = {}
    if not settings.insecure:
        registry, scheduler = settings.registry_internal_address, settings.scheduler_internal_address
        registry_env["MAAS_REGISTRY_INTERNAL_ADDRESS"] = registry
        scheduler_env["MAAS_SCHEDULER_INTERNAL_ADDRESS"] = scheduler
    return [
        ("registry", "services.registry", settings.registry_address, registry_env),
        (
            "scheduler",
            "services.scheduler",
            settings.scheduler_address,
            {**scheduler_env, "MAAS_SCHEDULER_REGISTRY_ADDRESS": registry},
        ),
        (
            "gateway",
            "services.gateway",
            settings.gateway_address,
            {
                "MAAS_GATEWAY_ADDRESS": settings.gateway_address,
                "MAAS_GATEWAY_SCHEDULER_ADDRESS": scheduler,
                "MAAS_GATEWAY_REGISTRY_ADDRESS": registry,
            },
        ),
    ]


async def _run_mesh(
    settings: CliSettings,
    quickstart: bool,
    console: Console,
    lock: MeshLock,
    service_env: Callable[[str], dict[str, str]],
    logs: ServiceLogs,
) -> None:
    from services.cli.quickstart import run_quickstart

    services = _services(settings)
    for name, _, address, env in services:
        for listener in (address, *(v for k, v in env.items() if k.endswith("_INTERNAL_ADDRESS"))):
            if address_in_use(listener):
                raise RuntimeError(
                    f"{listener} ({name}) is in use by another process; stop it, or choose another address with "
                    f"MAAS_{name.upper()}_ADDRESS or MAAS_{name.upper()}_INTERNAL_ADDRESS"
                )
    children = [
        start_child(name, module, address, {**env, **service_env(name), **lock.marker, **logs.env(name)}, logs)
        for name, module, address, env in services
    ]
    lock.record([child.process.pid for child in children])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for child in children:
            await wait_serving(child.address, settings, child, logs)
            console.print(f"[green]✓[/] {child.name} serving on {child.address}")
        if quickstart:
            await run_quickstart(settings, console)
        grpcurl = (
            "grpcurl -plaintext"
            if settings.insecure
            else f'grpcurl -cacert {settings.tls_ca_file} -H "authorization: Bearer $MAAS_KEY"'
        )
        console.print(
            f"\nregistry:  {settings.registry_address}   (try: {grpcurl} {settings.registry_address} "
            "maas.registry.v1.RegistryService/ListModels)"
            f"\nscheduler: {settings.scheduler_address}   (try: maas train list, maas deploy list)"
            f"\ngateway:   {settings.gateway_address}   (KServe v2 gRPC; try: {grpcurl} "
            f"{settings.gateway_address} inference.GRPCInferenceService/RepositoryIndex)"
        )
        if logs.directory is not None:
            console.print(
                f"logs:      {logs.directory}/<service>.log (JSON; `maas status` shows the mesh); Ray's training "
                f"ranks, shards and replicas: {logs.ray_logs()}",
                soft_wrap=True,
            )
        console.print("Ctrl-C stops the mesh.")
        while not stop.is_set():
            for child in children:
                if child.process.poll() is not None:
                    raise RuntimeError(f"{describe_exit(child, logs)}\nthe mesh was stopped; `maas up` starts it again")
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
    finally:
        console.print("stopping...")
        await asyncio.to_thread(stop_children, children, settings.shutdown_grace_s)
