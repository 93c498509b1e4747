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
from shared.grpc.calls import NO_RETRY, RetryPolicy, idempotent_methods, unary
from shared.grpc.channel import make_channel
from shared.grpc.status import from_rpc_error
from shared.settings import CommonSettings

CHUNK_BYTES = 1024 * 1024
Progress = Callable[[int], None]
# Extra call metadata, e.g. ``maas-tenant``: a mesh service acting within one tenant.
Metadata = Sequence[tuple[str, str]]
SERVICE = pb.DESCRIPTOR.services_by_name["RegistryService"]
_IDEMPOTENT = idempotent_methods(SERVICE)


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
    """The registry's API with typed methods: domain errors instead of grpc errors, streaming helpers.

    Unary calls are retried on UNAVAILABLE where the protos declare the method idempotent: by the channel
    (as :meth:`connect` sets it up) or, when ``retry`` is given, by :func:`shared.grpc.calls.unary` on a
    channel that does not retry itself.
    """

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float = 30.0, retry: RetryPolicy = NO_RETRY) -> None:
        self.channel = channel
        self.stub = registry_pb2_grpc.RegistryServiceStub(channel)
        self.timeout_s = timeout_s
        self.retry = retry

    @classmethod
    def connect(cls, target: str, settings: CommonSettings, *, retry: RetryPolicy | None = None) -> RegistryClient:
        if retry is None:
            return cls(make_channel(target, settings, [SERVICE]), settings.rpc_timeout_s)
        return cls(make_channel(target, settings), settings.rpc_timeout_s, retry)

    async def close(self) -> None:
        await self.channel.close()

    async def call(
        self, method: str, request: object, timeout: float | None = None, *, metadata: Metadata | None = None
    ) -> Any:
        """Call a unary method by name; failures raise the matching ``shared.errors`` exception.

        The typed methods below are the way to call the registry; this stays for tests that send requests
        the typed methods never build (malformed ones, raw page tokens).
        """
        return await unary(
            getattr(self.stub, method),
            request,
            retry=self.retry,
            safe_to_retry=method in _IDEMPOTENT,
            timeout=timeout or self.timeout_s,
            metadata=metadata,
        )

    async def create_model(self, name: str, *, description: str = "", tags: dict[str, str] | None = None) -> pb.Model:
        """Create an empty model (a push creates a missing model itself)."""
        request = pb.CreateModelRequest(name=name, description=description, tags=tags or {})
        response: pb.CreateModelResponse = await self.call("CreateModel", request)
        return response.model

    async def get_model(self, name: str) -> pb.Model:
        """A model: its latest version number, aliases, tags."""
        response: pb.GetModelResponse = await self.call("GetModel", pb.GetModelRequest(name=name))
        return response.model

    async def list_models(
        self,
        *,
        name_prefix: str = "",
        tags: dict[str, str] | None = None,
        page_size: int = 0,
        page_token: str = "",
        metadata: Metadata | None = None,
    ) -> pb.ListModelsResponse:
        """One page of models (``next_page_token`` asks for the next)."""
        request = pb.ListModelsRequest(
            name_prefix=name_prefix, tags=tags or {}, page_size=page_size, page_token=page_token
        )
        response: pb.ListModelsResponse = await self.call("ListModels", request, metadata=metadata)
        return response

    async def delete_model(self, name: str, *, force: bool = False) -> None:
        """Delete a model with its versions (``force``: even while aliases point into it)."""
        await self.call("DeleteModel", pb.DeleteModelRequest(name=name, force=force))

    async def get_version(self, ref: pb.VersionRef, *, metadata: Metadata | None = None) -> pb.Version:
        """The version ``ref`` names (a number, an alias, or the latest)."""
        response: pb.GetVersionResponse = await self.call(
            "GetVersion", pb.GetVersionRequest(ref=ref), metadata=metadata
        )
        return response.version

    async def derive_version(self, ref: pb.VersionRef, variant: str, *, timeout: float = 600.0) -> pb.Version:
        """A compressed variant (fp16, bf16, int8) of a float32 version, stored as a new version."""
        request = pb.DeriveVersionRequest(ref=ref, variant=variant)
        response: pb.DeriveVersionResponse = await self.call("DeriveVersion", request, timeout=timeout)
        return response.version

    async def set_alias(self, model: str, alias: str, version: int, *, create_only: bool = False) -> pb.Alias:
        """Point ``model@alias`` at ``version`` (moving it unless ``create_only``)."""
        request = pb.SetAliasRequest(model=model, alias=alias, version=version, create_only=create_only)
        response: pb.SetAliasResponse = await self.call("SetAlias", request)
        return response.alias

    async def delete_alias(self, model: str, alias: str) -> None:
        """Remove an alias."""
        await self.call("DeleteAlias", pb.DeleteAliasRequest(model=model, alias=alias))

    async def get_trust_policy(self, model: str = "") -> pb.GetTrustPolicyResponse:
        """The trust policy of ``model``'s tenant (empty: the caller's)."""
        response: pb.GetTrustPolicyResponse = await self.call("GetTrustPolicy", pb.GetTrustPolicyRequest(model=model))
        return response

    async def add_trusted_key(self, name: str, public_key_pem: str) -> pb.TrustedKey:
        """Trust a public key's signatures in the caller's tenant (admin keys)."""
        request = pb.AddTrustedKeyRequest(name=name, public_key_pem=public_key_pem)
        response: pb.AddTrustedKeyResponse = await self.call("AddTrustedKey", request)
        return response.key

    async def remove_trusted_key(self, name: str) -> None:
        """Stop trusting a key (admin keys)."""
        await self.call("RemoveTrustedKey", pb.RemoveTrustedKeyRequest(name=name))

    async def sign_version(self, ref: pb.VersionRef, signature: bytes, public_key_pem: str) -> pb.Version:
        """Add a signature bundle (OpenSSF Model Signing) to a version; the registry checks what it signs."""
        request = pb.SignVersionRequest(ref=ref, signature=signature, public_key_pem=public_key_pem)
        response: pb.SignVersionResponse = await self.call("SignVersion", request)
        return response.version

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
        return await self.sign_version(ref, bundle, public.decode())

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
