"""Artifacts from the registry, cached on local disk by their sha256 and verified on every load.

A download is hashed as it arrives; a cached copy is re-hashed alongside its load (see ``FetchedArtifact``).

Replicas on one node share the cache directory. A per-digest lock file (``fcntl.flock``) lets one process
at a time check, download or evict an entry, and a download lands in ``<digest>.safetensors.part`` and is
renamed into place only once its digest matches: a reader never sees a half-written or unverified file,
and a download interrupted by a crash resumes from the ``.part`` the next time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from maas.registry.v1 import registry_pb2 as pb

from services.inference.core.host import FetchedArtifact
from shared.artifacts import trust
from shared.clients.registry import RegistryClient, sha256_file
from shared.errors import DataLoss, InvalidArgument, Unavailable

__all__ = ["RegistryArtifactSource"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
# How often a replica waiting for another one's download of the same digest looks again.
_LOCK_POLL_S = 0.05
log = structlog.get_logger("maas.inference")


@contextlib.asynccontextmanager
async def _file_lock(path: Path) -> AsyncIterator[None]:
    """An exclusive lock between processes. Polled without blocking, so a cancelled wait leaves nothing behind."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(_LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # releases the lock


class _CachedCopy:
    """A cached file to re-hash for this load (a flipped bit on disk, a tampered cache)."""

    def __init__(self, path: Path, sha256: str) -> None:
        self.path = path
        self.sha256 = sha256
        self.intact: bool | None = None

    async def recheck(self) -> bool:
        self.intact = await asyncio.to_thread(sha256_file, self.path) == self.sha256
        return self.intact


class RegistryArtifactSource:
    """Downloads versions into ``cache_dir/<sha256>.safetensors`` and re-hashes them on every fetch.

    Files are named by the registry's digest, never by client input, so a model name cannot steer a path.
    A cached file is never trusted for its size alone: every fetch hashes it, and one whose bytes changed
    (a flipped bit on disk, a tampered cache) is evicted and downloaded again.
    """

    def __init__(self, client: RegistryClient, cache_dir: Path) -> None:
        self.client = client
        self.cache_dir = cache_dir
        self._locks: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def fetch(self, model: str, version: int) -> AsyncIterator[FetchedArtifact]:
        """The version's artifact; the digest's lock is held until the context exits, so no other replica
        evicts or replaces the copy while this one is hashed and loaded."""
        ref = pb.VersionRef(model=model, version=str(version))
        info = await self.client.get_version(ref)
        if not _SHA256.fullmatch(info.sha256):
            raise Unavailable(f"the registry reported a malformed sha256 for {model}:{version}")
        dest = self.cache_dir / f"{info.sha256}.safetensors"
        await asyncio.to_thread(self.cache_dir.mkdir, parents=True, exist_ok=True)
        signers, problem = await self._check_signatures(info)
        async with (
            self._locks.setdefault(info.sha256, asyncio.Lock()),
            _file_lock(self.cache_dir / f"{info.sha256}.lock"),
        ):
            cached: _CachedCopy | None = None
            if await asyncio.to_thread(dest.exists):
                cached = _CachedCopy(dest, info.sha256)
            else:
                await self._download(ref, dest, info.sha256)  # hashed as it arrives
            try:
                yield FetchedArtifact(dest, info.sha256, signers, problem, cached.recheck if cached else None)
            finally:
                if cached is not None and cached.intact is False:
                    # Evicted only now: the copy stays in place while it is loaded, whatever the check finds.
                    log.warning("cache_entry_corrupt_evicted", model=model, version=version, sha256=info.sha256)
                    await asyncio.to_thread(dest.unlink, missing_ok=True)

    async def _check_signatures(self, info: pb.Version) -> tuple[tuple[str, ...], str]:
        """The signers whose signatures verify under the tenant's trust policy, and else why none does.

        A signature counts when a trusted key made it, or a certificate a trusted CA issued, and it signs
        ``info.sha256``: the bytes are checked against that digest for this load, not hashed again here.
        """
        if not info.signatures:
            return (), "the version is not signed"
        policy = await self.client.get_trust_policy(info.model)
        return await asyncio.to_thread(
            trust.trusted_signers,
            [trust.RecordedSignature(s.key_id, s.bundle) for s in info.signatures],
            [trust.TrustAnchor(k.name, k.key_id, k.public_key_pem.encode()) for k in policy.keys],
            info.sha256,
            policy.tenant,
        )

    async def _download(self, ref: pb.VersionRef, dest: Path, digest: str) -> None:
        # The client verifies the digest before it renames the download into place. One retry from scratch
        # covers a stale .part a crashed process left (its bytes may belong to a different attempt).
        for attempt in (1, 2):
            try:
                version = await self.client.download_file(ref, dest)
            except InvalidArgument:
                if attempt == 2:
                    raise DataLoss(
                        f"the artifact of {ref.model}:{ref.version} failed verification twice after download",
                        reason="ARTIFACT_CORRUPT",
                    ) from None
                continue
            if version.sha256 != digest:
                # The version's bytes cannot change; a different digest means the registry answered oddly.
                await asyncio.to_thread(dest.unlink, missing_ok=True)
                raise Unavailable(f"the registry changed its answer for {ref.model}:{ref.version}; retry")
            return

    async def close(self) -> None:
        await self.client.close()
