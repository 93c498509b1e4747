"""A client of ``maas.registry.v1.RegistryService`` with streamed, checksummed uploads and downloads."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from maas.registry.v1 import registry_pb2 as pb
from maas.registry.v1 import registry_pb2_grpc

from shared.errors import InvalidArgument
from shared.grpc.channel import make_channel
from shared.grpc.status import from_rpc_error
from shared.settings import CommonSettings

CHUNK_BYTES = 1024 * 1024
Progress = Callable[[int], None]
# Extra call metadata, e.g. ``maas-tenant``: a mesh service acting within one tenant.
Metadata = Sequence[tuple[str, str]]
SERVICE = pb.DESCRIPTOR.services_by_name["RegistryService"]


def parse_ref(text: str) -> pb.VersionRef:
    """``model``, ``model@3``, ``model@production`` or ``model:3`` as a VersionRef."""
    for sep in ("@", ":"):
        if sep in text:
            model, _, version = text.partition(sep)
            return pb.VersionRef(model=model, version=version)
    return pb.VersionRef(model=text)


def sha256_file(path: Path) -> str:
    return _hash_file(path, hashlib.sha256()).hexdigest()


def _hash_file(path: Path, digest: Any) -> Any:
    with path.open("rb") as fh:
        while block := fh.read(4 * CHUNK_BYTES):
            digest.update(block)
    return digest


def _write_hashed(fh: Any, digest: Any, chunk: bytes) -> None:
    # One thread hop for both: hashlib releases the GIL, so the loop keeps receiving meanwhile.
    fh.write(chunk)
    digest.update(chunk)


class RegistryClient:
    """Wraps the generated stub: domain errors instead of grpc errors, streaming helpers."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float = 30.0) -> None:
        self.channel = channel
        self.stub = registry_pb2_grpc.RegistryServiceStub(channel)
        self.timeout_s = timeout_s

    @classmethod
    def connect(cls, target: str, settings: CommonSettings) -> RegistryClient:
        return cls(make_channel(target, settings, [SERVICE]), settings.rpc_timeout_s)

    async def close(self) -> None:
        await self.channel.close()

    async def call(
        self, method: str, request: object, timeout: float | None = None, *, metadata: Metadata | None = None
    ) -> Any:
        """Call a unary method by name; failures raise the matching ``shared.errors`` exception."""
        try:
            return await getattr(self.stub, method)(request, timeout=timeout or self.timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def upload_file(
        self,
        model: str,
        path: Path,
        manifest_json: str,
        *,
        tags: dict[str, str] | None = None,
        lineage: pb.Lineage | None = None,
        create_model: bool = True,
        progress: Progress | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        metadata: Metadata | None = None,
    ) -> pb.Version:
        """Upload ``path`` as a new version of ``model``; returns the version the registry created."""
        size = path.stat().st_size
        upload = pb.UploadMetadata(
            model=model,
            manifest_json=manifest_json,
            sha256=await asyncio.to_thread(sha256_file, path),
            size_bytes=size,
            tags=tags or {},
            lineage=lineage,
            create_model=create_model,
        )

        async def messages() -> AsyncIterator[pb.UploadVersionRequest]:
            yield pb.UploadVersionRequest(metadata=upload)
            with path.open("rb") as fh:
                while chunk := await asyncio.to_thread(fh.read, chunk_bytes):
                    yield pb.UploadVersionRequest(chunk=chunk)
                    if progress:
                        progress(len(chunk))

        try:
            response = await self.stub.UploadVersion(messages(), metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return response.version

    async def sign_file(
        self,
        ref: pb.VersionRef,
        path: Path,
        private_key: Path,
        password: str | None = None,
        *,
        certificate: Path | None = None,
        chain: tuple[Path, ...] = (),
    ) -> pb.Version:
        """Sign ``path`` (the version's bytes) with an EC private key (OpenSSF Model Signing, offline) and add
        the signature to the version; the registry checks it signs exactly the version's sha256. With
        ``certificate`` (the key's signing certificate) and ``chain`` (its issuers) the signature carries
        them, for tenants that trust the issuing CA."""
        from shared.artifacts import signing

        sign = functools.partial(signing.sign_file, certificate=certificate, chain=chain)
        bundle = await asyncio.to_thread(sign, path, private_key, password)
        public = signing.public_key_of(private_key, password)
        request = pb.SignVersionRequest(ref=ref, signature=bundle, public_key_pem=public.decode())
        response: pb.SignVersionResponse = await self.call("SignVersion", request)
        return response.version

    async def download_file(
        self, ref: pb.VersionRef, dest: Path, *, resume: bool = True, progress: Progress | None = None
    ) -> pb.Version:
        """Download into ``dest`` (resuming a partial ``dest.part``) and verify the sha256.

        The bytes are hashed as they arrive (a resumed part's first), so the file is never read back.
        """
        part = dest.with_name(dest.name + ".part")
        offset = part.stat().st_size if resume and part.exists() else 0
        hasher = await asyncio.to_thread(_hash_file, part, hashlib.sha256()) if offset else hashlib.sha256()
        version: pb.Version | None = None
        try:
            with part.open("ab" if offset else "wb") as fh:
                async for message in self.stub.DownloadVersion(pb.DownloadVersionRequest(ref=ref, offset=offset)):
                    if message.HasField("version"):
                        version = message.version
                        continue
                    await asyncio.to_thread(_write_hashed, fh, hasher, message.chunk)
                    if progress:
                        progress(len(message.chunk))
                fh.flush()
                os.fsync(fh.fileno())
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        assert version is not None, "the registry always sends the version first"
        digest = hasher.hexdigest()
        if digest != version.sha256:
            part.unlink(missing_ok=True)
            raise InvalidArgument(f"downloaded bytes hash to {digest}, expected {version.sha256}; retry the download")
        os.replace(part, dest)
        return version
