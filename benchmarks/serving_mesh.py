"""The maas mesh of the serving benchmark: registry, scheduler (local Ray) and gateway, each in its own process.

Each service is started as ``python -m services.<name>`` with ``MAAS_*`` settings in its environment (a
throwaway ``MAAS_HOME``, free loopback ports, warning-level logs to a file), waited for through
``grpc.health.v1``, and stopped with SIGTERM. Models are pushed with ``RegistryClient.upload_file`` and
deployed with the scheduler's ``CreateDeployment``; a deployment counts as ready when ``GetDeployment``
says ``DEPLOYMENT_READY`` and the gateway answers ``ModelReady`` true.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from benchmarks.registry_transfer import Server, _server_env, cpu_seconds, free_port, wait_healthy
from shared.processes import end_process_group, end_processes_with_env

DEPLOY_TIMEOUT_S = 240.0
# The modules the mesh needs; until they exist the maas part of the benchmark is skipped.
REQUIRED_MODULES = ("services.gateway.main", "services.gateway.__main__", "services.inference.main")


def missing_services() -> str | None:
    """Why the mesh cannot start (a missing service module), or None when it can."""
    missing = []
    for name in REQUIRED_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except ModuleNotFoundError:
            missing.append(name)
    if missing:
        return f"not importable yet: {', '.join(missing)}"
    return None


def stop_leftovers(home: Path, grace_s: float = 3.0) -> list[str]:
    """Ends the processes still running with this mesh's ``MAAS_HOME`` (a fresh temporary directory, so
    only the mesh's own children carry it); returns their names and ids."""
    return end_processes_with_env("MAAS_HOME", str(home), grace_s)


class Mesh:
    """The three service processes and the clients the benchmark uses to set them up."""

    def __init__(self, workdir: Path, ray_num_cpus: int = 8, *, secure: bool = False) -> None:
        self.workdir = workdir
        self.home = workdir / "maas-home"
        self.home.mkdir(parents=True, exist_ok=True)
        # Secure: what `maas up` sets up (CA, certificates, internal token, an admin key); else plaintext.
        self.credentials: Any = None
        if secure:
            from services.cli.credentials import ensure_mesh_credentials

            self.credentials = ensure_mesh_credentials(self.home)
        self.registry_target = f"127.0.0.1:{free_port()}"
        self.scheduler_target = f"127.0.0.1:{free_port()}"
        self.gateway_target = f"127.0.0.1:{free_port()}"
        self.ray_num_cpus = ray_num_cpus
        self.servers: list[Server] = []
        self._channels: list[grpc.aio.Channel] = []
        self.registry_client: Any = None
        self.scheduler: Any = None
        self.leftovers: list[str] = []

    def _start(self, name: str, module: str, env: dict[str, str]) -> Server:
        common = {
            "MAAS_HOME": str(self.home),
            "MAAS_LOG_LEVEL": "warning",
            "MAAS_LOG_FORMAT": "json",
            # Ray forks helpers after gRPC threads exist; gRPC's fork handlers only log noise there.
            "GRPC_ENABLE_FORK_SUPPORT": "false",
            "RAY_DISABLE_USAGE_STATS": "1",
            "MAAS_INSECURE": "true",
        }
        if self.credentials is not None:
            common.update(self.credentials.service_env(name))
        server = Server(
            name, [sys.executable, "-m", module], _server_env({**common, **env}), self.workdir / f"{name}.log"
        )
        self.servers.append(server)
        return server

    async def start(self) -> None:
        """Starts registry, gateway and scheduler (in that order, each waited for) and connects the clients."""
        from maas.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

        from shared.clients.registry import RegistryClient
        from shared.grpc.channel import make_channel

        registry = self._start(
            "registry",
            "services.registry",
            {"MAAS_REGISTRY_ADDRESS": self.registry_target, "MAAS_REGISTRY_METRICS_ADDRESS": "127.0.0.1:0"},
        )
        await wait_healthy(registry, self.registry_target, credentials=self._tls())
        # The gateway binds before the scheduler starts Ray, whose processes take ephemeral ports (a port
        # picked free earlier was seen taken by then); it follows the scheduler once that is up.
        gateway = self._start(
            "gateway",
            "services.gateway",
            {
                "MAAS_GATEWAY_ADDRESS": self.gateway_target,
                "MAAS_GATEWAY_METRICS_ADDRESS": "127.0.0.1:0",
                "MAAS_GATEWAY_SCHEDULER_ADDRESS": self.scheduler_target,
                "MAAS_GATEWAY_REGISTRY_ADDRESS": self.registry_target,
            },
        )
        await wait_healthy(gateway, self.gateway_target, credentials=self._tls())
        scheduler = self._start(
            "scheduler",
            "services.scheduler",
            {
                "MAAS_SCHEDULER_ADDRESS": self.scheduler_target,
                "MAAS_SCHEDULER_METRICS_ADDRESS": "127.0.0.1:0",
                "MAAS_SCHEDULER_REGISTRY_ADDRESS": self.registry_target,
                "MAAS_RAY_NUM_CPUS": str(self.ray_num_cpus),
            },
        )
        await wait_healthy(scheduler, self.scheduler_target, credentials=self._tls())
        settings = self.client_settings()
        self.registry_client = RegistryClient.connect(self.registry_target, settings)
        channel = make_channel(
            self.scheduler_target, settings, [scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"]]
        )
        self._channels.append(channel)
        self.scheduler = scheduler_pb2_grpc.SchedulerServiceStub(channel)

    def client_settings(self) -> Any:
        """Settings of this benchmark's own clients: the admin key and the CA when secure."""
        from shared.settings import CommonSettings

        if self.credentials is None:
            return CommonSettings(insecure=True)
        return CommonSettings(
            insecure=False, tls_ca_file=self.credentials.ca_file, client_token=self.credentials.admin_key
        )

    def _tls(self) -> grpc.ChannelCredentials | None:
        if self.credentials is None:
            return None
        return grpc.ssl_channel_credentials(self.credentials.ca_file.read_bytes())

    def gateway_channel(self, target: str | None = None) -> tuple[grpc.aio.Channel, tuple[tuple[str, str], ...]]:
        """A channel to the gateway as a KServe client opens it, and the metadata each call carries."""
        target = target or self.gateway_target
        if self.credentials is None:
            return grpc.aio.insecure_channel(target), ()
        tls = self._tls()
        assert tls is not None
        return grpc.aio.secure_channel(target, tls), (("authorization", f"Bearer {self.credentials.admin_key}"),)

    def server_pids(self) -> list[int]:
        return [s.pid for s in self.servers if s.proc.poll() is None]

    def check_alive(self) -> None:
        for server in self.servers:
            server.check_alive()

    async def push(self, model: str, artifact: Path, manifest_json: str) -> int:
        """Uploads ``artifact`` as a new version of ``model``; returns the version number."""
        version = await self.registry_client.upload_file(model, artifact, manifest_json)
        return int(version.number)

    async def deploy(self, model: str, batching: dict[str, Any], timeout_s: float = DEPLOY_TIMEOUT_S) -> Any:
        """Creates a 1-replica deployment of the model's latest version and waits until the gateway serves it."""
        from maas.inference.v1 import worker_pb2
        from maas.scheduler.v1 import scheduler_pb2 as spb

        spec = spb.DeploymentSpec(
            model=model, min_replicas=1, max_replicas=1, batching=worker_pb2.BatchingConfig(**batching)
        )
        await self.scheduler.CreateDeployment(spb.CreateDeploymentRequest(spec=spec), timeout=60)
        deadline = time.monotonic() + timeout_s
        deployment = None
        while time.monotonic() < deadline:
            self.check_alive()
            deployment = (
                await self.scheduler.GetDeployment(spb.GetDeploymentRequest(name=model), timeout=10)
            ).deployment
            if deployment.state == spb.DEPLOYMENT_READY:
                break
            await asyncio.sleep(0.25)
        else:
            state = f"{spb.DeploymentState.Name(deployment.state)}: {deployment.message}" if deployment else "?"
            raise TimeoutError(
                f"deployment {model} not READY after {timeout_s:.0f}s ({state})"
                f"\nscheduler log:\n{self.servers[1].log_tail()}"
            )
        await self.wait_gateway_ready(model, deadline)
        return deployment

    async def wait_gateway_ready(self, model: str, deadline: float, target: str | None = None) -> None:
        """Until the gateway (the mesh's, or another at ``target``) reports ``model`` ready."""
        from inference import grpc_service_pb2 as pb
        from inference import grpc_service_pb2_grpc

        channel, metadata = self.gateway_channel(target)
        async with channel:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            while True:
                self.check_alive()
                try:
                    reply = await stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=5, metadata=metadata)
                    if reply.ready:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the gateway never reported {model} ready:\n{self.servers[2].log_tail()}")
                await asyncio.sleep(0.2)

    def cpu_seconds(self) -> float:
        """CPU seconds the mesh's service processes have used (not the Ray replicas: see machine CPU)."""
        return sum(cpu_seconds(pid) for pid in self.server_pids())

    async def stop(self) -> None:
        """Closes the clients, then stops gateway, scheduler (which stops its Ray) and registry."""
        if self.registry_client is not None:
            await self.registry_client.close()
        for channel in self._channels:
            await channel.close()
        for server in reversed(self.servers):
            await asyncio.to_thread(server.stop)
        self.leftovers = await asyncio.to_thread(stop_leftovers, self.home)
        # Ray's agents blank their environment (stop_leftovers cannot see them): end the services' groups.
        for server in self.servers:
            await asyncio.to_thread(end_process_group, server.pid)

    def logs_dir(self) -> str:
        """Where the services' logs go (``<name>.log``; kept with ``--keep-workdir``)."""
        return str(self.workdir)
