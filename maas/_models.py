"""``client.models``: models and their versions in the registry."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from maas.registry.v1 import registry_pb2 as pb

from shared.clients.registry import RegistryClient, parse_ref
from shared.errors import InvalidArgument

# Called with the number of bytes each chunk moved (upload or download).
ProgressCallback = Callable[[int], None]


def embedded_manifest(artifact: Path) -> str:
    """The manifest JSON a safetensors artifact carries in its header (``maas.manifest``)."""
    from shared.artifacts import Manifest, read_header

    header, _ = read_header(artifact)
    embedded = header.get("__metadata__", {}).get("maas.manifest")
    if embedded is None:
        raise InvalidArgument(f"{artifact} has no embedded manifest; pass manifest_json")
    return Manifest.from_json(embedded).to_json()


def _ref(ref: str | pb.VersionRef) -> pb.VersionRef:
    return parse_ref(ref) if isinstance(ref, str) else ref


class AsyncModels:
    """Models and versions: ``ref`` arguments are ``MODEL``, ``MODEL@VERSION`` or ``MODEL@ALIAS``."""

    def __init__(self, registry: RegistryClient) -> None:
        self._registry = registry

    async def create(self, name: str, *, description: str = "", tags: dict[str, str] | None = None) -> pb.Model:
        """Create an empty model (:meth:`push` creates a missing model itself)."""
        return await self._registry.create_model(name, description=description, tags=tags)

    async def list(self, *, prefix: str = "", tags: dict[str, str] | None = None) -> list[pb.Model]:
        """Every model whose name starts with ``prefix`` and which has all of ``tags`` (all pages)."""
        models: list[pb.Model] = []
        token = ""
        while True:
            page = await self._registry.list_models(name_prefix=prefix, tags=tags, page_token=token)
            models.extend(page.models)
            token = page.next_page_token
            if not token:
                return models

    async def get(self, name: str) -> pb.Model:
        """A model: its latest version number, aliases, tags."""
        return await self._registry.get_model(name)

    async def get_version(self, ref: str | pb.VersionRef) -> pb.Version:
        """A version: digest, size, signature, lineage, signatures."""
        return await self._registry.get_version(_ref(ref))

    async def push(
        self,
        model: str,
        artifact: Path | str,
        *,
        manifest_json: str | None = None,
        tags: dict[str, str] | None = None,
        description: str = "",
        progress: ProgressCallback | None = None,
        sign_key: Path | None = None,
        key_password: str | None = None,
    ) -> pb.Version:
        """Upload a safetensors file as a new version of ``model`` (created when missing), streamed in chunks.

        Args:
            model: The model's name.
            artifact: The file; its manifest is read from its header unless ``manifest_json`` is given.
            manifest_json: The manifest, for a file without an embedded one.
            tags: Tags of the new version.
            description: The lineage's source text.
            progress: Called with each chunk's size as it is sent.
            sign_key: An EC private key (PEM): the file is signed (OpenSSF Model Signing) before it is sent
                and the signature added to the version.
            key_password: ``sign_key``'s password.

        Returns:
            The version the registry created (with its signature when signed).
        """
        path = Path(artifact)
        manifest = manifest_json if manifest_json is not None else await asyncio.to_thread(embedded_manifest, path)
        bundle = public = None
        if sign_key is not None:
            # Signed before upload: the bytes signed are the bytes sent.
            from shared.artifacts import signing

            bundle = await asyncio.to_thread(signing.sign_file, path, sign_key, key_password)
            public = signing.public_key_of(sign_key, key_password).decode()
        version = await self._registry.upload_file(
            model,
            path,
            manifest,
            tags=tags,
            lineage=pb.Lineage(source=description or "maas sdk push"),
            progress=progress,
        )
        if bundle is not None and public is not None:
            exact = pb.VersionRef(model=version.model, version=str(version.number))
            version = await self._registry.sign_version(exact, bundle, public)
        return version

    async def pull(
        self, ref: str | pb.VersionRef, dest: Path | str, *, progress: ProgressCallback | None = None
    ) -> pb.Version:
        """Download a version into ``dest``, resuming a partial ``dest.part``; the sha256 is verified (a
        mismatch raises ``InvalidArgument`` and leaves nothing behind)."""
        return await self._registry.download_file(_ref(ref), Path(dest), progress=progress)

    async def sign(
        self, ref: str | pb.VersionRef, key: Path, *, key_password: str | None = None, workdir: Path | None = None
    ) -> pb.Version:
        """Add a signature to a version: its bytes are downloaded (and verified), signed here with ``key`` (an
        EC private key, PEM), and the registry checks the signature against them."""
        import tempfile

        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            path = Path(tmp) / "model.safetensors"
            fetched = await self._registry.download_file(_ref(ref), path)
            exact = pb.VersionRef(model=fetched.model, version=str(fetched.number))
            return await self._registry.sign_file(exact, path, key, key_password)

    async def alias(self, model: str, alias: str, version: int, *, create_only: bool = False) -> pb.Alias:
        """Point ``model@alias`` at ``version`` (moving it unless ``create_only``)."""
        return await self._registry.set_alias(model, alias, version, create_only=create_only)

    async def delete_alias(self, model: str, alias: str) -> None:
        """Remove an alias."""
        await self._registry.delete_alias(model, alias)

    async def derive(self, ref: str | pb.VersionRef, variant: str) -> pb.Version:
        """Derive a compressed variant (``fp16``, ``bf16`` or ``int8``) of a float32 version as a new version."""
        return await self._registry.derive_version(_ref(ref), variant)

    async def delete(self, name: str, *, force: bool = False) -> None:
        """Delete a model with all its versions (``force``: even while aliases point into it)."""
        await self._registry.delete_model(name, force=force)

    async def trust_policy(self, model: str = "") -> pb.GetTrustPolicyResponse:
        """The trusted keys of ``model``'s tenant (default: the caller's)."""
        return await self._registry.get_trust_policy(model)

    async def trust_key(self, name: str, public_key_pem: str) -> pb.TrustedKey:
        """Trust a public key's signatures (admin keys)."""
        return await self._registry.add_trusted_key(name, public_key_pem)

    async def untrust_key(self, name: str) -> None:
        """Stop trusting a key (admin keys)."""
        await self._registry.remove_trusted_key(name)
