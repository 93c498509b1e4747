"""``maas certs init`` and ``maas keys create | list | revoke``: the mesh's certificates and API keys.

Both act on files under ``MAAS_HOME`` (``tls/``, ``auth/keys.json``), which the services read: a key made
or revoked here takes effect on the running services at their next request, with no restart.
"""

from __future__ import annotations

import datetime

import typer
from rich.table import Table

from services.cli.common import console, out
from services.cli.credentials import DEFAULT_TENANT, init_certificates
from services.cli.settings import CliSettings
from shared.errors import MaasError
from shared.security.keys import GRANTS, KeyStore, Role

certs_app = typer.Typer(no_args_is_help=True)
keys_app = typer.Typer(no_args_is_help=True)


def _fail(exc: MaasError | ValueError) -> typer.Exit:
    console.print(f"[red]error[/]: {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


@certs_app.command("init")
def certs_init() -> None:
    """Create the development CA and the services' certificates under MAAS_HOME/tls (kept while valid)."""
    settings = CliSettings()
    certs = init_certificates(settings.home.resolve())
    for name, paths in sorted(certs.items()):
        out.print(f"{name}: {paths.cert} (key {paths.key})", highlight=False, soft_wrap=True)


def _store() -> KeyStore:
    settings = CliSettings()
    return KeyStore(settings.keys_path.resolve())


@keys_app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="A label for the key, unique in its tenant."),
    tenant: str = typer.Option(DEFAULT_TENANT, help="The tenant the key acts for."),
    role: str = typer.Option(Role.DEVELOPER.value, help="admin, developer or inference."),
    grant: list[str] = typer.Option(
        [],
        "--grant",
        help=f"A permission beyond the role, repeatable: {', '.join(sorted(GRANTS))} (move protected aliases "
        "such as production within the key's tenant).",
    ),
) -> None:
    """Create an API key; its token is printed once (only a salted hash is stored)."""
    try:
        key, token = _store().create(tenant, role, name, grants=grant)
    except (MaasError, ValueError) as exc:
        raise _fail(exc) from None
    granted = f", grants {', '.join(key.grants)}" if key.grants else ""
    console.print(
        f"created key {key.key_id} ({key.role.value} in tenant {key.tenant}{granted}); the token, shown once:"
    )
    out.print(token, highlight=False, soft_wrap=True)


@keys_app.command("list")
def keys_list(tenant: str = typer.Option("", help="Only this tenant's keys.")) -> None:
    """List API keys (never their tokens)."""
    try:
        keys = _store().list(tenant or None)
    except (MaasError, ValueError) as exc:
        raise _fail(exc) from None
    table = Table("id", "tenant", "role", "grants", "name", "created", "revoked")
    for key in keys:
        table.add_row(
            key.key_id,
            key.tenant,
            key.role.value,
            ", ".join(key.grants),
            key.name,
            _when(key.created_at),
            _when(key.revoked_at),
        )
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id (maas keys list).")) -> None:
    """Revoke an API key: the services refuse it from their next request on."""
    try:
        key = _store().revoke(key_id)
    except (MaasError, ValueError) as exc:
        raise _fail(exc) from None
    console.print(f"revoked key {key.key_id} ({key.role.value} in tenant {key.tenant})")


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
