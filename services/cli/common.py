"""What every command shares: settings, the console, error reporting, clients of the services."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import typer
from inference import grpc_service_pb2, grpc_service_pb2_grpc
from maas import AsyncClient
from maas.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from rich.console import Console

from services.cli.settings import CliSettings
from shared.clients.registry import RegistryClient
from shared.errors import MaasError
from shared.grpc.channel import make_channel
from shared.grpc.status import from_rpc_error

console = Console(stderr=True)
out = Console()


def describe_failure(exc: BaseException) -> str:
    """One line for a command's failure: the status and message of a service's error, else the error."""
    if isinstance(exc, MaasError):
        code = getattr(exc, "grpc_code", None)
        return f"({code.name if code is not None else exc.reason}) {exc.message}"
    if isinstance(exc, grpc.aio.AioRpcError):
        return describe_failure(from_rpc_error(exc))
    return str(exc) or type(exc).__name__


def run_async(fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """Run an async command; failures become one line on stderr (no stack trace) and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return asyncio.run(fn(*args, **kwargs))
        except MaasError as exc:
            code = getattr(exc, "grpc_code", None)
            label = code.name if code is not None else exc.reason
            console.print(f"[red]error[/] ({label}): {exc.message}", highlight=False)
            raise typer.Exit(1) from None
        except (OSError, ValueError) as exc:
            console.print(f"[red]error[/]: {exc}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


def registry_client() -> RegistryClient:
    settings = CliSettings()
    return RegistryClient.connect(settings.registry_address, settings)


class _Client:
    """A service stub whose failures raise ``shared.errors`` exceptions."""

    def __init__(self, address: str, settings: CliSettings, service: Any, stub_class: Any) -> None:
        self.channel = make_channel(address, settings, [service])
        self.stub = stub_class(self.channel)

    async def call(self, method: str, request: object, timeout: float | None = None) -> Any:
        try:
            return await getattr(self.stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Scheduler(_Client):
    """The scheduler's stub with domain errors."""

    def __init__(self, settings: CliSettings | None = None) -> None:
        settings = settings or CliSettings()
        super().__init__(
            settings.scheduler_address,
            settings,
            scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"],
            scheduler_pb2_grpc.SchedulerServiceStub,
        )


class Gateway(_Client):
    """The gateway's KServe v2 stub with domain errors."""

    def __init__(self, settings: CliSettings | None = None) -> None:
        settings = settings or CliSettings()
        super().__init__(
            settings.gateway_address,
            settings,
            grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
            grpc_service_pb2_grpc.GRPCInferenceServiceStub,
        )


def client(settings: CliSettings | None = None) -> AsyncClient:
    """The SDK's client with the command line's settings: every command calls the services through it."""
    return AsyncClient(settings=settings or CliSettings())
