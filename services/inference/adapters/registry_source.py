"""Artifacts from the registry, cached on local disk by their sha256."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from maas.registry.v1 import registry_pb2 as pb

from shared.clients.registry import RegistryClient
from shared.errors import Unavailable

__all__ = ["RegistryArtifactSource"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


class RegistryArtifactSource:
    """Downloads versions (sha256-verified by the client) into ``cache_dir/<sha256>.safetensors``.

    Files are named by the registry's digest, never by client input, so a model name cannot steer a path;
    a cached file of the right size is reused (the download verified its digest when it was written).
    """

    def __init__(self, client: RegistryClient, cache_dir: Path) -> None:
        self.client = client
        self.cache_dir = cache_dir
        self._locks: dict[str, asyncio.Lock] = {}

    async def fetch(self, model: str, version: int) -> Path:
        ref = pb.VersionRef(model=model, version=str(version))
        info: pb.Version = (await self.client.call("GetVersion", pb.GetVersionRequest(ref=ref))).version
        if not _SHA256.fullmatch(info.sha256):
            raise Unavailable(f"the registry reported a malformed sha256 for {model}:{version}")
        dest = self.cache_dir / f"{info.sha256}.safetensors"
        async with self._locks.setdefault(info.sha256, asyncio.Lock()):
            if dest.exists() and dest.stat().st_size == info.size_bytes:
                return dest
            await asyncio.to_thread(self.cache_dir.mkdir, parents=True, exist_ok=True)
            await self.client.download_file(ref, dest)
        return dest

    async def close(self) -> None:
        await self.client.close()
