"""The serving mesh in one test process: a registry, a scheduler on the session's local Ray, and a gateway.

The three servers run on port 0 in the test's event loop; inference workers are real Ray actors (their
own processes) created by the scheduler. Models are real zoo artifacts pushed through the registry API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from inference import grpc_service_pb2 as kpb
from inference import grpc_service_pb2_grpc
from maas.registry.v1 import registry_pb2 as rpb
from maas.scheduler.v1 import scheduler_pb2 as spb
from maas.scheduler.v1 import scheduler_pb2_grpc

from shared.clients.registry import RegistryClient
from shared.grpc.channel import make_channel
from shared.settings import CommonSettings

# The MLP the serving tests use: small enough for 2 cores, big enough that batching matters.
MLP_ARGS = {"in_features": 64, "hidden": [128, 128], "out_features": 10}


def zoo_file(directory: Path, architecture: str, arguments: dict[str, Any], seed: int) -> tuple[Path, str]:
    """A freshly initialised (deterministic for ``seed``) zoo artifact and its manifest JSON."""
    import torch

    from shared.artifacts import Manifest, build_model, save_artifact

    torch.manual_seed(seed)
    manifest = Manifest.for_model(architecture, arguments)
    path = directory / f"{architecture}-{seed}.safetensors"
    save_artifact(build_model(manifest), manifest, path)
    return path, manifest.to_json()


def reference_forward(path: Path, x: np.ndarray) -> np.ndarray:
    """The model's output computed in this process, one forward, no batching: what serving must equal."""
    import torch

    from shared.artifacts import load_artifact

    model = load_artifact(path).eval()
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def infer_request(model: str, x: np.ndarray, version: str = "", name: str = "input") -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    return request


def output_array(response: kpb.ModelInferResponse, index: int = 0) -> np.ndarray:
    tensor = response.outputs[index]
    return np.frombuffer(response.raw_output_contents[index], dtype=np.float32).reshape(list(tensor.shape))


class ServingMesh:
    """Start with :meth:`start`, stop with :meth:`stop`; helpers push, deploy and call the gateway."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.files = home / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        self._servers: list[Any] = []
        self._channels: list[grpc.aio.Channel] = []

    async def start(self, gateway_settings: dict[str, Any] | None = None, **scheduler_settings: Any) -> None:
        from services.gateway.main import start as start_gateway
        from services.gateway.settings import GatewaySettings
        from services.registry.main import start as start_registry
        from services.registry.settings import RegistrySettings
        from services.scheduler.settings import SchedulerSettings

        common: dict[str, Any] = {"home": self.home, "shutdown_grace_s": 1.0}
        registry = await start_registry(
            RegistrySettings(registry_address="127.0.0.1:0", registry_metrics_address="127.0.0.1:0", **common)
        )
        self._servers.append(registry)
        self.registry_address = f"127.0.0.1:{registry.port}"
        self.scheduler_settings = SchedulerSettings(
            scheduler_address="127.0.0.1:0",
            scheduler_metrics_address="127.0.0.1:0",
            scheduler_registry_address=self.registry_address,
            **{**common, **scheduler_settings},
        )
        await self.start_scheduler()
        gateway = await start_gateway(
            GatewaySettings(
                gateway_address="127.0.0.1:0",
                gateway_metrics_address="127.0.0.1:0",
                gateway_scheduler_address=self.scheduler_address,
                gateway_registry_address=self.registry_address,
                **common,
                **(gateway_settings or {}),
            )
        )
        self._servers.append(gateway)
        self.gateway_address = f"127.0.0.1:{gateway.port}"
        settings = CommonSettings()
        channel = make_channel(self.gateway_address, settings)
        self._channels.append(channel)
        self.gateway = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self.registry = RegistryClient.connect(self.registry_address, settings)

    async def start_scheduler(self) -> None:
        """(Re)start the scheduler on the same database (a restart keeps its port when it has one)."""
        from services.scheduler.main import start as start_scheduler

        self.scheduler_server = await start_scheduler(self.scheduler_settings)
        self.scheduler_address = f"127.0.0.1:{self.scheduler_server.port}"
        # Later restarts bind the same port, so the gateway's watcher reconnects to the same address.
        self.scheduler_settings = self.scheduler_settings.model_copy(
            update={"scheduler_address": self.scheduler_address}
        )
        channel = make_channel(self.scheduler_address, CommonSettings())
        self._channels.append(channel)
        self.scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)

    async def stop_scheduler(self) -> None:
        await self.scheduler_server.server.stop(1.0)

    async def stop(self) -> None:
        # Deployments first, so their replica actors do not outlive the test session.
        try:
            reply = await self.scheduler.ListDeployments(spb.ListDeploymentsRequest(page_size=100), timeout=10)
            for d in reply.deployments:
                await self.scheduler.DeleteDeployment(spb.DeleteDeploymentRequest(name=d.name), timeout=60)
        except grpc.aio.AioRpcError:
            pass
        for channel in self._channels:
            await channel.close()
        await self.registry.close()
        for server in reversed(self._servers):
            await server.server.stop(1.0)
        await self.scheduler_server.server.stop(1.0)

    async def push(self, model: str, architecture: str, arguments: dict[str, Any], seed: int) -> tuple[int, Path]:
        """Push a zoo model as a new version; returns its number and the local file (for references)."""
        path, manifest_json = await asyncio.to_thread(zoo_file, self.files, architecture, arguments, seed)
        version = await self.registry.upload_file(model, path, manifest_json)
        return int(version.number), path

    async def alias(self, model: str, alias: str, version: int) -> None:
        await self.registry.call("SetAlias", rpb.SetAliasRequest(model=model, alias=alias, version=version))

    async def wait_deployment(
        self, name: str, until: Callable[[spb.Deployment], bool], timeout_s: float = 240.0
    ) -> spb.Deployment:
        deadline = time.monotonic() + timeout_s
        while True:
            deployment = (await self.scheduler.GetDeployment(spb.GetDeploymentRequest(name=name))).deployment
            if until(deployment):
                return deployment
            if time.monotonic() > deadline:
                raise AssertionError(f"deployment {name} never got there; last seen: {deployment}")
            await asyncio.sleep(0.25)

    async def deploy(self, wait_ready: bool = True, **spec: Any) -> spb.Deployment:
        reply = await self.scheduler.CreateDeployment(spb.CreateDeploymentRequest(spec=spb.DeploymentSpec(**spec)))
        if not wait_ready:
            return reply.deployment
        return await self.wait_deployment(reply.deployment.name, ready)


def ready(deployment: spb.Deployment) -> bool:
    return deployment.state == spb.DEPLOYMENT_READY and any(r.state == spb.REPLICA_READY for r in deployment.replicas)


class Load:
    """A bounded closed-loop load generator: ``concurrency`` callers, each sending requests back to back
    until :meth:`stop` (or ``max_requests`` in all); records every failure with its status."""

    def __init__(self, call: Callable[[int], Any], concurrency: int, max_requests: int = 100_000) -> None:
        self._call = call
        self._concurrency = concurrency
        self._max = max_requests
        self._stop = asyncio.Event()
        self.sent = 0
        self.succeeded = 0
        self.failures: list[str] = []
        self.results: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(self._concurrency)]

    async def _loop(self) -> None:
        while not self._stop.is_set() and self.sent < self._max:
            self.sent += 1
            index = self.sent
            try:
                self.results.append(await self._call(index))
                self.succeeded += 1
            except grpc.aio.AioRpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
