"""What `make run` does once the mesh is up: train the digits classifier and register it."""

from __future__ import annotations

import json
from pathlib import Path

from maas.registry.v1 import registry_pb2 as rpb
from maas.scheduler.v1 import scheduler_pb2 as spb
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
    """Train the digits CNN with 2 workers and 2 shards (BSP) unless a trained version exists."""
    from services.cli.train import Scheduler, _watch

    client = RegistryClient.connect(settings.registry_address, settings)
    try:
        try:
            reply = await client.call("GetVersion", rpb.GetVersionRequest(ref=rpb.VersionRef(model=QUICKSTART_MODEL)))
            accuracy = reply.version.lineage.metrics.get("accuracy")
            if accuracy is not None:
                console.print(f"{QUICKSTART_MODEL}@{reply.version.number} is trained: held-out accuracy {accuracy:.4f}")
                return
        except NotFound:
            pass
    finally:
        await client.close()
    spec = spb.TrainingJobSpec(
        architecture="cnn",
        arguments_json=json.dumps({}),
        dataset=spb.DatasetSpec(name="digits"),
        optimizer={"name": "sgd", "hyperparameters": {"lr": 0.05, "momentum": 0.9}},
        batch_size=32,
        epochs=40,
        workers=2,
        shards=2,
        consistency="bsp",
        checkpoint_interval=100,
        target_model=QUICKSTART_MODEL,
        seed=7,
    )
    scheduler = Scheduler()
    try:
        job = (await scheduler.call("SubmitTrainingJob", spb.SubmitTrainingJobRequest(spec=spec))).job  # type: ignore[attr-defined]
        console.print(f"training {QUICKSTART_MODEL}: job {job.id}, 2 workers x 2 parameter-server shards, BSP")
        job = await _watch(scheduler, job.id)
    finally:
        await scheduler.close()
    if job.state == spb.SUCCEEDED:
        console.print(
            f"[green]✓[/] {QUICKSTART_MODEL}@{job.model_version}: held-out accuracy {job.metrics['accuracy']:.4f}"
        )
    else:
        console.print(f"[red]training ended {spb.JobState.Name(job.state)}[/]: {job.message}")
