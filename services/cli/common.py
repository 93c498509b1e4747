"""What every command shares: settings, the console, error reporting, the SDK's client."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import typer
from maas import AsyncClient
from rich.console import Console

from services.cli.settings import CliSettings
from shared.errors import MaasError
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


def client(settings: CliSettings | None = None) -> AsyncClient:
    """The SDK's client with the command line's settings: every command calls the services through it."""
    return AsyncClient(settings=settings or CliSettings())
