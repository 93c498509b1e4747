"""The registry as a real process: graceful stop, restart over the same data, SIGKILL mid-upload."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from maas.registry.v1 import registry_pb2 as pb
from maas.registry.v1 import registry_pb2_grpc

from tests.support.artifacts import tiny_artifact, upload_messages

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RegistryProcess:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.address = f"127.0.0.1:{_free_port()}"
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        env = {
            **os.environ,
            "MAAS_HOME": str(self.home),
            "MAAS_REGISTRY_ADDRESS": self.address,
            "MAAS_REGISTRY_METRICS_ADDRESS": "127.0.0.1:0",
            "MAAS_LOG_LEVEL": "warning",
            "MAAS_SHUTDOWN_GRACE_S": "2",
        }
        self.process = subprocess.Popen([sys.executable, "-m", "services.registry"], env=env)
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(300):
                assert self.process.poll() is None, "registry exited during start-up"
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
        raise AssertionError("registry did not become ready")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout=20)


async def test_graceful_stop_and_restart_keep_everything(tmp_path: Path) -> None:
    registry = RegistryProcess(tmp_path / "home")
    await registry.start()
    path, manifest = tiny_artifact(tmp_path)
    data = path.read_bytes()
    async with grpc.aio.insecure_channel(registry.address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        await stub.UploadVersion(iter(upload_messages("durable", data, manifest)))
        await stub.SetAlias(pb.SetAliasRequest(model="durable", alias="production", version=1))
    assert registry.stop(signal.SIGTERM) == 0
    await registry.start()
    try:
        async with grpc.aio.insecure_channel(registry.address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            version = (
                await stub.GetVersion(pb.GetVersionRequest(ref=pb.VersionRef(model="durable", version="production")))
            ).version
            assert version.number == 1 and version.size_bytes == len(data)
            chunks = [
                m.chunk
                async for m in stub.DownloadVersion(pb.DownloadVersionRequest(ref=pb.VersionRef(model="durable")))
            ]
            assert b"".join(chunks) == data
    finally:
        registry.stop()


async def test_sigkill_during_upload_leaves_no_half_written_version(tmp_path: Path) -> None:
    home = tmp_path / "home"
    registry = RegistryProcess(home)
    await registry.start()
    path, manifest = tiny_artifact(tmp_path, arguments={"in_features": 512, "hidden": [1024, 1024], "out_features": 10})
    messages = upload_messages("crashy", path.read_bytes(), manifest, chunk=64 * 1024)
    halfway = asyncio.Event()

    async def stream():  # type: ignore[no-untyped-def]
        for i, message in enumerate(messages):
            yield message
            if i == len(messages) // 2:
                halfway.set()
                await asyncio.sleep(60)

    channel = grpc.aio.insecure_channel(registry.address)
    call = registry_pb2_grpc.RegistryServiceStub(channel).UploadVersion(stream())
    await asyncio.wait_for(halfway.wait(), 20)
    await asyncio.sleep(0.5)
    parts = list((home / "registry" / "artifacts" / "tmp").iterdir())
    assert parts, "the upload should be in progress in a temporary file"
    registry.stop(signal.SIGKILL)
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    await channel.close()
    await registry.start()
    try:
        async with grpc.aio.insecure_channel(registry.address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetVersion(pb.GetVersionRequest(ref=pb.VersionRef(model="crashy")))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        leftovers = [p for p in (home / "registry" / "artifacts").rglob("*") if p.is_file()]
        assert leftovers == []
    finally:
        registry.stop()
