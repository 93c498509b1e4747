"""What `make run` does once the mesh is up: make sure the registry holds a model to look at."""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich.console import Console

from services.cli.settings import CliSettings
from shared.artifacts import Manifest, build_model, save_artifact
from shared.clients.registry import RegistryClient
from shared.errors import NotFound

QUICKSTART_MODEL = "digits"


def zoo_artifact(architecture: str, arguments: dict[str, object], dest: Path, seed: int = 0) -> Manifest:
    """Write a freshly initialised zoo model (deterministic for ``seed``) to ``dest``."""
    import torch

    torch.manual_seed(seed)
    manifest = Manifest.for_model(architecture, arguments)
    save_artifact(build_model(manifest), manifest, dest)
    return manifest


async def run_quickstart(settings: CliSettings, console: Console) -> None:
    from maas.registry.v1 import registry_pb2 as pb

    client = RegistryClient.connect(settings.registry_address, settings)
    try:
        try:
            reply = await client.call("GetModel", pb.GetModelRequest(name=QUICKSTART_MODEL))
            console.print(f"model {QUICKSTART_MODEL!r} already has {reply.model.latest_version} version(s)")
            return
        except NotFound:
            pass
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "digits.safetensors"
            # Until the training service exists, the digits CNN is pushed untrained from the zoo.
            manifest = zoo_artifact("cnn", {}, path)
            version = await client.upload_file(
                QUICKSTART_MODEL,
                path,
                manifest.to_json(),
                tags={"origin": "zoo", "trained": "false"},
                lineage=pb.Lineage(source="maas up --quickstart (untrained zoo cnn)"),
            )
        await client.call(
            "SetAlias", pb.SetAliasRequest(model=QUICKSTART_MODEL, alias="staging", version=version.number)
        )
        console.print(
            f"pushed {QUICKSTART_MODEL}@{version.number} ({version.size_bytes} bytes, sha256 {version.sha256[:12]}...)"
        )
    finally:
        await client.close()
