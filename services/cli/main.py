"""The ``maas`` command line."""

from __future__ import annotations

import asyncio

import typer

from services.cli.common import console, describe_failure
from services.cli.deploy import deploy_app
from services.cli.infer import generate, infer
from services.cli.models import models_app
from services.cli.security import certs_app, keys_app
from services.cli.settings import CliSettings
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


@app.command()
def up(
    quickstart: bool = typer.Option(
        False, help="Also train the digits classifier (unless trained), deploy it and show predictions."
    ),
    insecure: bool = typer.Option(
        False, help="Development only: plaintext and no authentication (also MAAS_INSECURE=1)."
    ),
) -> None:
    """Start the mesh (registry, scheduler with a local Ray, gateway); Ctrl-C stops it."""
    from services.cli.up import run_up

    settings = CliSettings()
    configure_logging("cli", settings.log_level, settings.log_format)
    try:
        asyncio.run(run_up(settings, quickstart, console, insecure=insecure or settings.insecure))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - `maas up` ends with one line, never a traceback
        console.print(f"[red]maas up failed[/]: {describe_failure(exc)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


if __name__ == "__main__":  # pragma: no cover
    app()
