"""``maas models``: list, show, push (optionally signed), pull, sign, alias, derive, delete, trust."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from services.cli.common import client, console, out, run_async
from shared.artifacts import signing
from shared.errors import InvalidArgument

models_app = typer.Typer(no_args_is_help=True)


def _pairs(values: list[str], option: str) -> dict[str, str]:
    result = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep:
            raise InvalidArgument(f"{option} takes KEY=VALUE, got {value!r}")
        result[key] = val
    return result


def _progress() -> Progress:
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=True,
    )


@models_app.command("list")
@run_async
async def list_models(
    prefix: str = typer.Option("", help="Only names starting with this."),
    tag: list[str] = typer.Option([], help="KEY=VALUE; repeat to require several."),
) -> None:
    """List models."""
    async with client() as sdk:
        models = await sdk.models.list(prefix=prefix, tags=_pairs(tag, "--tag"))
    table = Table("name", "latest", "aliases", "tags", "description")
    for m in models:
        aliases = ", ".join(f"{k}→{v}" for k, v in sorted(m.aliases.items()))
        tags = ", ".join(f"{k}={v}" for k, v in sorted(m.tags.items()))
        table.add_row(m.name, str(m.latest_version), aliases, tags, m.description)
    out.print(table)


@models_app.command()
@run_async
async def show(ref: str = typer.Argument(..., help="MODEL, MODEL@VERSION or MODEL@ALIAS.")) -> None:
    """Show a version: digest, size, signature, lineage (JSON)."""
    from google.protobuf import json_format

    async with client() as sdk:
        version = await sdk.models.get_version(ref)
    out.print_json(json_format.MessageToJson(version))


@models_app.command()
@run_async
async def push(
    model: str = typer.Argument(..., help="Model name (created when missing)."),
    artifact: Path | None = typer.Argument(None, help="A safetensors file; its manifest is read from it."),
    manifest: Path | None = typer.Option(None, help="Manifest JSON file, when not embedded in the artifact."),
    zoo: str | None = typer.Option(None, help="Push a freshly initialised zoo architecture instead of a file."),
    arg: list[str] = typer.Option([], help="Zoo architecture argument KEY=JSON_VALUE."),
    tag: list[str] = typer.Option([], help="Version tag KEY=VALUE."),
    description: str = typer.Option("", help="Lineage source text."),
    sign: Path | None = typer.Option(
        None, help="EC private key (PEM) to sign the artifact with (OpenSSF Model Signing) before it is uploaded."
    ),
    key_password: str | None = typer.Option(None, envvar="MAAS_SIGNING_KEY_PASSWORD", help="The key's password."),
) -> None:
    """Upload a new version (streamed in chunks, with a progress bar)."""
    from services.cli.quickstart import zoo_artifact

    with tempfile.TemporaryDirectory() as tmp:
        manifest_json = None
        if zoo:
            arguments = {k: json.loads(v) for k, v in _pairs(arg, "--arg").items()}
            artifact = Path(tmp) / "zoo.safetensors"
            manifest_json = zoo_artifact(zoo, arguments, artifact).to_json()
        elif artifact is None:
            raise InvalidArgument("give an artifact file or --zoo ARCHITECTURE")
        elif manifest is not None:
            manifest_json = manifest.read_text()
        async with client() as sdk:
            with _progress() as progress:
                task = progress.add_task(f"push {model}", total=artifact.stat().st_size)
                version = await sdk.models.push(
                    model,
                    artifact,
                    manifest_json=manifest_json,
                    tags=_pairs(tag, "--tag"),
                    description=description or "maas models push",
                    progress=lambda n: progress.advance(task, n),
                    sign_key=sign,
                    key_password=key_password,
                )
    signed = f" signed by key {version.signatures[0].key_id[:16]}" if version.signatures else ""
    out.print(f"{version.model}@{version.number} sha256={version.sha256} size={version.size_bytes}{signed}")


@models_app.command("sign")
@run_async
async def sign_version(
    ref: str = typer.Argument(..., help="MODEL@VERSION or MODEL@ALIAS."),
    key: Path = typer.Option(..., help="EC private key (PEM)."),
    key_password: str | None = typer.Option(None, envvar="MAAS_SIGNING_KEY_PASSWORD", help="The key's password."),
) -> None:
    """Add a signature to a version (a new signature, never new bytes): its bytes are downloaded, checked
    and signed here, and the registry checks the signature against them."""
    async with client() as sdk:
        version = await sdk.models.sign(ref, key, key_password=key_password)
    key_id = signing.key_id(signing.public_key_of(key, key_password))
    out.print(f"{version.model}@{version.number} sha256={version.sha256} signed by key {key_id[:16]}")


trust_app = typer.Typer(
    no_args_is_help=True, help="The tenant's trust policy: keys whose signatures deployments accept."
)
models_app.add_typer(trust_app, name="trust")


@trust_app.command("list")
@run_async
async def trust_list(model: str = typer.Option("", help="The policy of this model's tenant (default: yours).")) -> None:
    """List the trusted keys."""
    async with client() as sdk:
        policy = await sdk.models.trust_policy(model)
    table = Table("name", "key id", "added")
    for k in policy.keys:
        table.add_row(k.name, k.key_id, k.create_time.ToDatetime().isoformat(timespec="seconds"))
    out.print(f"tenant {policy.tenant}")
    out.print(table)


@trust_app.command("add")
@run_async
async def trust_add(
    name: str = typer.Argument(..., help="A name for the key."),
    public_key: Path = typer.Argument(..., help="EC public key (PEM)."),
) -> None:
    """Trust a public key's signatures (admin keys)."""
    async with client() as sdk:
        key = await sdk.models.trust_key(name, public_key.read_text())
    out.print(f"trusted {key.name} (key {key.key_id[:16]})")


@trust_app.command("remove")
@run_async
async def trust_remove(name: str = typer.Argument(...)) -> None:
    """Stop trusting a key (admin keys); versions it signed no longer load where a signature is required."""
    async with client() as sdk:
        await sdk.models.untrust_key(name)
    out.print(f"removed {name}")


@models_app.command()
@run_async
async def pull(
    ref: str = typer.Argument(..., help="MODEL, MODEL@VERSION or MODEL@ALIAS."),
    output: Path = typer.Option(..., "-o", "--output", help="Destination file."),
) -> None:
    """Download a version (resumes a partial download; verifies the sha256)."""
    async with client() as sdk:
        meta = await sdk.models.get_version(ref)
        with _progress() as progress:
            task = progress.add_task(f"pull {ref}", total=meta.size_bytes)
            part = output.with_name(output.name + ".part")
            if part.exists():
                progress.advance(task, part.stat().st_size)
            # The exact version just described, even if an alias moves meanwhile.
            exact = f"{meta.model}@{meta.number}"
            version = await sdk.models.pull(exact, output, progress=lambda n: progress.advance(task, n))
    out.print(f"{version.model}@{version.number} -> {output} (sha256 verified)")


@models_app.command()
@run_async
async def alias(
    model: str = typer.Argument(...),
    name: str = typer.Argument(..., help="Alias, e.g. production."),
    version: int = typer.Argument(0, help="Version to point at (omit with --delete)."),
    delete: bool = typer.Option(False, "--delete", help="Remove the alias."),
    create_only: bool = typer.Option(False, help="Fail if the alias exists instead of moving it."),
) -> None:
    """Set, move or delete an alias."""
    async with client() as sdk:
        if delete:
            await sdk.models.delete_alias(model, name)
            out.print(f"deleted {model}@{name}")
        else:
            set_to = await sdk.models.alias(model, name, version, create_only=create_only)
            out.print(f"{model}@{set_to.name} -> {set_to.version}")


@models_app.command()
@run_async
async def derive(
    ref: str = typer.Argument(..., help="MODEL@VERSION or MODEL@ALIAS of a float32 version."),
    variant: str = typer.Option(..., help="fp16, bf16 or int8."),
) -> None:
    """Derive a compressed variant as a new version."""
    async with client() as sdk:
        v = await sdk.models.derive(ref, variant)
    out.print(f"{v.model}@{v.number} ({variant}, {v.lineage.size_ratio:.2f}x the size of @{v.lineage.parent_version})")


@models_app.command()
@run_async
async def delete(
    model: str = typer.Argument(...),
    force: bool = typer.Option(False, help="Delete even while aliases point into it."),
) -> None:
    """Delete a model with all its versions."""
    async with client() as sdk:
        await sdk.models.delete(model, force=force)
    out.print(f"deleted {model}")
