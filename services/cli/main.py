"""The ``maas`` command line."""

from __future__ import annotations

import asyncio
from enum import StrEnum

import typer

from services.cli.common import console, describe_failure
from services.cli.deploy import deploy_app
from services.cli.infer import generate, infer
from services.cli.models import models_app
from services.cli.security import certs_app, keys_app
from services.cli.settings import CliSettings
from services.cli.status import status
from services.cli.tenants import tenants_app, usage
from services.cli.train import train_app
from shared.logging import configure_logging

app = typer.Typer(help="maas: train, register, deploy and serve models.", no_args_is_help=True)
app.add_typer(models_app, name="models", help="Models and versions in the registry.")
app.add_typer(train_app, name="train", help="Training jobs in the scheduler.")
app.add_typer(deploy_app, name="deploy", help="Inference deployments (replicas behind the gateway).")
app.add_typer(certs_app, name="certs", help="The mesh's development CA and service certificates.")
app.add_typer(keys_app, name="keys", help="API keys: each belongs to a tenant and carries a role.")
app.add_typer(tenants_app, name="tenants", help="Tenants' quotas, borrowing limits and priority classes.")
app.command()(infer)
app.command()(generate)
app.command()(usage)
app.command()(status)


class LogFormat(StrEnum):
    auto = "auto"
    json = "json"
    console = "console"


@app.command()
def up(
    quickstart: bool = typer.Option(
        False, help="Also train the digits classifier (unless trained), deploy it and show predictions."
    ),
    insecure: bool = typer.Option(
        False, help="Development only: plaintext and no authentication (also MAAS_INSECURE=1)."
    ),
    log_format: LogFormat | None = typer.Option(
        None,
        show_default=False,
        help="The services' logs: auto (default, or MAAS_LOG_FORMAT): files under MAAS_HOME/logs on a terminal, "
        "JSON lines on stderr otherwise; json or console: on stderr in that format.",
    ),
) -> None:
    """Start the mesh (registry, scheduler with a local Ray, gateway); Ctrl-C stops it."""
    from services.cli.up import run_up
    from services.cli.up_logs import ServiceLogs

    settings = CliSettings()
    logs = ServiceLogs.choose(settings.home, log_format.value if log_format else settings.log_format)
    own_file = logs.directory / "up.log" if logs.directory is not None else None
    configure_logging("cli", settings.log_level, logs.fmt, own_file, settings.log_file_max_bytes)
    try:
        asyncio.run(run_up(settings, quickstart, console, logs, insecure=insecure or settings.insecure))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - `maas up` ends with one line, never a traceback
        console.print(f"[red]maas up failed[/]: {describe_failure(exc)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


if __name__ == "__main__":  # pragma: no cover
    app()
