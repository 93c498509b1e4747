"""What every command shares: settings, the console, error reporting, a registry client."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import typer
from rich.console import Console

from services.cli.settings import CliSettings
from shared.clients.registry import RegistryClient
from shared.errors import MaasError

console = Console(stderr=True)
out = Console()


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
