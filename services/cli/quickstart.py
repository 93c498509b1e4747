"""What `make run` does once the mesh is up: train the digits classifier, register, deploy and query it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

from maas.registry.v1 import registry_pb2 as rpb
from maas.scheduler.v1 import scheduler_pb2 as spb
from rich.console import Console

from services.cli.settings import CliSettings
from shared.artifacts import Manifest, build_model, save_artifact
from shared.clients.registry import RegistryClient
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
    from services.cli.common import Scheduler
    from services.cli.train import _watch

    client = RegistryClient.connect(settings.registry_address, settings)
    try:
        try:
            reply = await client.call("GetVersion", rpb.GetVersionRequest(ref=rpb.VersionRef(model=QUICKSTART_MODEL)))
            accuracy = reply.version.lineage.metrics.get("accuracy")
            if accuracy is not None:
                console.print(f"{QUICKSTART_MODEL}@{reply.version.number} is trained: held-out accuracy {accuracy:.4f}")
                return True
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
    scheduler = Scheduler(settings)
    try:
        job = (await scheduler.call("SubmitTrainingJob", spb.SubmitTrainingJobRequest(spec=spec))).job
        console.print(f"training {QUICKSTART_MODEL}: job {job.id}, 2 workers x 2 parameter-server shards, BSP")
        job = await _watch(scheduler, job.id)
    finally:
        await scheduler.close()
    if job.state == spb.SUCCEEDED:
        console.print(
            f"[green]✓[/] {QUICKSTART_MODEL}@{job.model_version}: held-out accuracy {job.metrics['accuracy']:.4f}"
        )
        return True
    console.print(f"[red]training ended {spb.JobState.Name(job.state)}[/]: {job.message}")
    return False


async def deploy_digits(settings: CliSettings, console: Console) -> None:
    """Deploy the latest digits version (or roll the deployment to it) and wait until it is ready."""
    from services.cli.common import Scheduler
    from services.cli.deploy import print_deployment, wait_ready

    spec = spb.DeploymentSpec(model=QUICKSTART_MODEL, min_replicas=1, max_replicas=1)
    async with Scheduler(settings) as scheduler:
        try:
            current = (
                await scheduler.call("GetDeployment", spb.GetDeploymentRequest(name=QUICKSTART_MODEL))
            ).deployment
            latest = await _latest_version(settings)
            if current.version != latest:
                await scheduler.call("UpdateDeployment", spb.UpdateDeploymentRequest(spec=spec))
        except NotFound:
            await scheduler.call("CreateDeployment", spb.CreateDeploymentRequest(spec=spec))
        deployment = await wait_ready(scheduler, QUICKSTART_MODEL)
    print_deployment(deployment)
    if deployment.state != spb.DEPLOYMENT_READY:
        raise RuntimeError(f"the {QUICKSTART_MODEL} deployment is not ready: {deployment.message}")


async def wait_model_ready(settings: CliSettings, timeout_s: float = 120.0) -> None:
    """Wait until the gateway itself reports the model ready (KServe ModelReady).

    The scheduler's READY is not enough: a gateway started before the scheduler learns the endpoints
    only once its stream to the scheduler is up.
    """
    from inference import grpc_service_pb2 as kpb

    from services.cli.common import Gateway

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with Gateway(settings) as gateway:
        while True:
            with contextlib.suppress(MaasError):
                reply = await gateway.call("ModelReady", kpb.ModelReadyRequest(name=QUICKSTART_MODEL), timeout=5.0)
                if reply.ready:
                    return
            if loop.time() > deadline:
                raise RuntimeError(
                    f"the gateway at {settings.gateway_address} did not report {QUICKSTART_MODEL} ready within "
                    f"{timeout_s:.0f} s; see the gateway's and scheduler's log lines"
                )
            await asyncio.sleep(0.2)


async def _latest_version(settings: CliSettings) -> int:
    client = RegistryClient.connect(settings.registry_address, settings)
    try:
        reply = await client.call("GetVersion", rpb.GetVersionRequest(ref=rpb.VersionRef(model=QUICKSTART_MODEL)))
        return int(reply.version.number)
    finally:
        await client.close()


async def show_predictions(settings: CliSettings, console: Console, count: int = 8) -> None:
    """Send the last ``count`` of scikit-learn's digits through the gateway and print what the model says."""
    import numpy as np
    from inference import grpc_service_pb2 as kpb
    from sklearn.datasets import load_digits

    from services.cli.common import Gateway
    from services.cli.infer import decode_outputs

    digits = load_digits()
    images = (np.asarray(digits.images[-count:], dtype=np.float32) / 16.0).reshape(count, 1, 8, 8)
    labels = digits.target[-count:].tolist()
    request = kpb.ModelInferRequest(model_name=QUICKSTART_MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=list(images.shape))
    request.raw_input_contents.append(images.tobytes())
    async with Gateway(settings) as gateway:
        metadata = await gateway.call("ModelMetadata", kpb.ModelMetadataRequest(name=QUICKSTART_MODEL))
        request.inputs[0].name = metadata.inputs[0].name
        response = await gateway.call("ModelInfer", request)
    scores = next(iter(decode_outputs(response).values()))
    predicted = scores.argmax(axis=1).tolist()
    right = sum(p == t for p, t in zip(predicted, labels, strict=True))
    console.print(
        f"predictions through the gateway ({QUICKSTART_MODEL}@{response.model_version}, KServe v2 ModelInfer on "
        f"{settings.gateway_address}):\n  true:      {labels}\n  predicted: {predicted}  ({right}/{count} right)"
    )
