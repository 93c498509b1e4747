"""``maas models``: list, show, push (optionally signed), pull, sign, alias, derive, delete, trust."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import typer
from maas.registry.v1 import registry_pb2 as pb
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from services.cli.common import console, out, registry_client, run_async
from shared.artifacts import signing
from shared.clients.registry import parse_ref
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
    client = registry_client()
    try:
        table = Table("name", "latest", "aliases", "tags", "description")
        token = ""
        while True:
            reply = await client.call(
                "ListModels", pb.ListModelsRequest(name_prefix=prefix, tags=_pairs(tag, "--tag"), page_token=token)
            )
            for m in reply.models:
                aliases = ", ".join(f"{k}→{v}" for k, v in sorted(m.aliases.items()))
                tags = ", ".join(f"{k}={v}" for k, v in sorted(m.tags.items()))
                table.add_row(m.name, str(m.latest_version), aliases, tags, m.description)
            token = reply.next_page_token
            if not token:
                break
        out.print(table)
    finally:
        await client.close()


@models_app.command()
@run_async
async def show(ref: str = typer.Argument(..., help="MODEL, MODEL@VERSION or MODEL@ALIAS.")) -> None:
    """Show a version: digest, size, signature, lineage (JSON)."""
    from google.protobuf import json_format

    client = registry_client()
    try:
        reply = await client.call("GetVersion", pb.GetVersionRequest(ref=parse_ref(ref)))
        out.print_json(json_format.MessageToJson(reply.version))
    finally:
        await client.close()


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
    from shared.artifacts import Manifest, read_header

    with tempfile.TemporaryDirectory() as tmp:
        if zoo:
            arguments = {k: json.loads(v) for k, v in _pairs(arg, "--arg").items()}
            artifact = Path(tmp) / "zoo.safetensors"
            manifest_json = zoo_artifact(zoo, arguments, artifact).to_json()
        elif artifact is None:
            raise InvalidArgument("give an artifact file or --zoo ARCHITECTURE")
        elif manifest is not None:
            manifest_json = manifest.read_text()
        else:
            header, _ = read_header(artifact)
            embedded = header.get("__metadata__", {}).get("maas.manifest")
            if embedded is None:
                raise InvalidArgument(f"{artifact} has no embedded manifest; pass --manifest")
            manifest_json = Manifest.from_json(embedded).to_json()
        bundle = public = None
        if sign is not None:
            # Signed before upload: the bytes signed are the bytes sent, whatever happens to them after.
            bundle = await asyncio.to_thread(signing.sign_file, artifact, sign, key_password)
            public = signing.public_key_of(sign, key_password)
        client = registry_client()
        try:
            with _progress() as progress:
                task = progress.add_task(f"push {model}", total=artifact.stat().st_size)
                version = await client.upload_file(
                    model,
                    artifact,
                    manifest_json,
                    tags=_pairs(tag, "--tag"),
                    lineage=pb.Lineage(source=description or "maas models push"),
                    progress=lambda n: progress.advance(task, n),
                )
            if bundle is not None and public is not None:
                ref = pb.VersionRef(model=version.model, version=str(version.number))
                request = pb.SignVersionRequest(ref=ref, signature=bundle, public_key_pem=public.decode())
                version = (await client.call("SignVersion", request)).version
        finally:
            await client.close()
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
    client = registry_client()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.safetensors"
            fetched = await client.download_file(parse_ref(ref), path)
            exact = pb.VersionRef(model=fetched.model, version=str(fetched.number))
            version = await client.sign_file(exact, path, key, key_password)
    finally:
        await client.close()
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
    client = registry_client()
    try:
        reply = await client.call("GetTrustPolicy", pb.GetTrustPolicyRequest(model=model))
        table = Table("name", "key id", "added")
        for k in reply.keys:
            table.add_row(k.name, k.key_id, k.create_time.ToDatetime().isoformat(timespec="seconds"))
        out.print(f"tenant {reply.tenant}")
        out.print(table)
    finally:
        await client.close()


@trust_app.command("add")
@run_async
async def trust_add(
    name: str = typer.Argument(..., help="A name for the key."),
    public_key: Path = typer.Argument(..., help="EC public key (PEM)."),
) -> None:
    """Trust a public key's signatures (admin keys)."""
    client = registry_client()
    try:
        request = pb.AddTrustedKeyRequest(name=name, public_key_pem=public_key.read_text())
        reply = await client.call("AddTrustedKey", request)
        out.print(f"trusted {reply.key.name} (key {reply.key.key_id[:16]})")
    finally:
        await client.close()


@trust_app.command("remove")
@run_async
async def trust_remove(name: str = typer.Argument(...)) -> None:
    """Stop trusting a key (admin keys); versions it signed no longer load where a signature is required."""
    client = registry_client()
    try:
        await client.call("RemoveTrustedKey", pb.RemoveTrustedKeyRequest(name=name))
        out.print(f"removed {name}")
    finally:
        await client.close()


@models_app.command()
@run_async
async def pull(
    ref: str = typer.Argument(..., help="MODEL, MODEL@VERSION or MODEL@ALIAS."),
    output: Path = typer.Option(..., "-o", "--output", help="Destination file."),
) -> None:
    """Download a version (resumes a partial download; verifies the sha256)."""
    client = registry_client()
    try:
        meta = await client.call("GetVersion", pb.GetVersionRequest(ref=parse_ref(ref)))
        with _progress() as progress:
            task = progress.add_task(f"pull {ref}", total=meta.version.size_bytes)
            part = output.with_name(output.name + ".part")
            if part.exists():
                progress.advance(task, part.stat().st_size)
            version = await client.download_file(parse_ref(ref), output, progress=lambda n: progress.advance(task, n))
    finally:
        await client.close()
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
    client = registry_client()
    try:
        if delete:
            await client.call("DeleteAlias", pb.DeleteAliasRequest(model=model, alias=name))
            out.print(f"deleted {model}@{name}")
        else:
            reply = await client.call(
                "SetAlias", pb.SetAliasRequest(model=model, alias=name, version=version, create_only=create_only)
            )
            out.print(f"{model}@{reply.alias.name} -> {reply.alias.version}")
    finally:
        await client.close()


@models_app.command()
@run_async
async def derive(
    ref: str = typer.Argument(..., help="MODEL@VERSION or MODEL@ALIAS of a float32 version."),
    variant: str = typer.Option(..., help="fp16, bf16 or int8."),
) -> None:
    """Derive a compressed variant as a new version."""
    client = registry_client()
    try:
        reply = await client.call(
            "DeriveVersion", pb.DeriveVersionRequest(ref=parse_ref(ref), variant=variant), timeout=600
        )
        v = reply.version
        out.print(
            f"{v.model}@{v.number} ({variant}, {v.lineage.size_ratio:.2f}x the size of @{v.lineage.parent_version})"
        )
    finally:
        await client.close()


@models_app.command()
@run_async
async def delete(
    model: str = typer.Argument(...),
    force: bool = typer.Option(False, help="Delete even while aliases point into it."),
) -> None:
    """Delete a model with all its versions."""
    client = registry_client()
    try:
        await client.call("DeleteModel", pb.DeleteModelRequest(name=model, force=force))
        out.print(f"deleted {model}")
    finally:
        await client.close()
