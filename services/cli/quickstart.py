"""What `make run` does once the mesh is up: train the digits classifier, register, deploy and query it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

from maas.scheduler.v1 import scheduler_pb2 as spb
from maas.tensors import decode_outputs
from rich.console import Console

from services.cli.common import client
from services.cli.settings import CliSettings
from shared.artifacts import Manifest, build_model, save_artifact
from shared.errors import MaasError, NotFound

QUICKSTART_MODEL = "digits"


def zoo_artifact(architecture: str, arguments: dict[str, object], dest: Path, seed: int = 0) -> Manifest:
    """Write a freshly initialised zoo model (deterministic for ``seed``) to ``dest``."""
    import torch

    torch.manual_seed(seed)
    manifest = Manifest.for_model(architecture, arguments)
    save_artifact(build_model(manifest), manifest, dest)
    return manifest


async def run_quickstart(settings: CliSettings, console: Console) -> None:
    """Train the digits CNN unless a trained version exists, deploy it, show predictions through the gateway."""
    if await train_digits(settings, console):
        await deploy_digits(settings, console)
        await wait_model_ready(settings)
        await show_predictions(settings, console)


async def train_digits(settings: CliSettings, console: Console) -> bool:
    """Train the digits CNN with 2 workers and 2 shards (BSP) unless a trained version exists.

    Returns whether a trained version exists now.
    """
    from services.cli.train import watch_until_done

    async with client(settings) as sdk:
        try:
            version = await sdk.models.get_version(QUICKSTART_MODEL)
            accuracy = version.lineage.metrics.get("accuracy")
            if accuracy is not None:
                console.print(f"{QUICKSTART_MODEL}@{version.number} is trained: held-out accuracy {accuracy:.4f}")
                return True
        except NotFound:
            pass
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
        job = await sdk.jobs.submit(spec)
        console.print(f"training {QUICKSTART_MODEL}: job {job.id}, 2 workers x 2 parameter-server shards, BSP")
        final = await watch_until_done(job)
    if final.state == spb.SUCCEEDED:
        console.print(
            f"[green]✓[/] {QUICKSTART_MODEL}@{final.model_version}: held-out accuracy {final.metrics['accuracy']:.4f}"
        )
        return True
    console.print(f"[red]training ended {spb.JobState.Name(final.state)}[/]: {final.message}")
    return False


async def deploy_digits(settings: CliSettings, console: Console) -> None:
    """Deploy the latest digits version (or roll the deployment to it) and wait until it is ready."""
    from services.cli.deploy import print_deployment, wait_ready

    spec = spb.DeploymentSpec(model=QUICKSTART_MODEL, min_replicas=1, max_replicas=1)
    async with client(settings) as sdk:
        try:
            current = await sdk.deployments.get(QUICKSTART_MODEL)
            latest = (await sdk.models.get_version(QUICKSTART_MODEL)).number
            if current.version != latest:
                await sdk.deployments.update(spec)
        except NotFound:
            await sdk.deployments.create(spec)
        try:
            deployment = await wait_ready(sdk, QUICKSTART_MODEL)
        except MaasError as exc:
            raise RuntimeError(f"the {QUICKSTART_MODEL} deployment is not ready: {exc.message}") from None
    print_deployment(deployment)


async def wait_model_ready(settings: CliSettings, timeout_s: float = 120.0) -> None:
    """Wait until the gateway itself reports the model ready (KServe ModelReady).

    The scheduler's READY is not enough: a gateway started before the scheduler learns the endpoints
    only once its stream to the scheduler is up.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with client(settings) as sdk:
        while True:
            with contextlib.suppress(MaasError):
                if await sdk.model_ready(QUICKSTART_MODEL, timeout=5.0):
                    return
            if loop.time() > deadline:
                raise RuntimeError(
                    f"the gateway at {settings.gateway_address} did not report {QUICKSTART_MODEL} ready within "
                    f"{timeout_s:.0f} s; see the gateway's and scheduler's log lines"
                )
            await asyncio.sleep(0.2)


async def show_predictions(settings: CliSettings, console: Console, count: int = 8) -> None:
    """Send the last ``count`` of scikit-learn's digits through the gateway and print what the model says."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (np.asarray(digits.images[-count:], dtype=np.float32) / 16.0).reshape(count, 1, 8, 8)
    labels = digits.target[-count:].tolist()
    async with client(settings) as sdk:
        response = await sdk.infer_response(QUICKSTART_MODEL, images)
    scores = next(iter(decode_outputs(response).values()))
    predicted = scores.argmax(axis=1).tolist()
    right = sum(p == t for p, t in zip(predicted, labels, strict=True))
    console.print(
        f"predictions through the gateway ({QUICKSTART_MODEL}@{response.model_version}, KServe v2 ModelInfer on "
        f"{settings.gateway_address}):\n  true:      {labels}\n  predicted: {predicted}  ({right}/{count} right)"
    )
