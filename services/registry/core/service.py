"""The registry's use cases, over a repository and an artifact store.

Every blocking call (SQL, file I/O, hashing, tensor conversion) runs in a worker thread so the event loop
stays free; steps that make data durable are shielded from cancellation so that a client hanging up can
never leave a version row without its bytes, or bytes without their cleanup.

Every use case takes the caller's tenant scope explicitly (``tenant``; None: every tenant), and those that
create a model its ``owner`` (see ``tenancy``): they are keyword-only and have no default, so a new call
site cannot forget them and silently see every tenant.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog

from services.registry.core.events import ChangeSignal
from services.registry.core.ingest import HeaderCollector, check_artifact, check_header_early
from services.registry.core.model import (
    Alias,
    Event,
    Lineage,
    Model,
    NewVersion,
    Page,
    TrustedKey,
    UploadRequest,
    Version,
    VersionSignature,
)
from services.registry.core.pipeline import BackgroundWriter
from services.registry.core.ports import ArtifactStore, ArtifactWriter, Repository
from services.registry.core.tenancy import ProtectedAliases, model_not_found, name_taken, visible
from shared import names
from shared.artifacts import ArtifactError, Manifest, derive_variant, signing
from shared.artifacts.crypto import BlobIntegrityError
from shared.errors import DataLoss, FailedPrecondition, InvalidArgument, ResourceExhausted
from shared.paging import encode_token, parse_page

T = TypeVar("T")
log = structlog.get_logger("maas.registry")
MAX_CHUNK_BYTES = 4 * 1024 * 1024
VARIANTS = ("fp16", "bf16", "int8")


async def _durable(awaitable: Awaitable[T]) -> T:
    """Await a step that must finish once started, even if the caller is cancelled meanwhile."""
    task = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


# Free space an upload must leave on the disk it is received on (the store's own files, logs, SQLite).
DISK_RESERVE_BYTES = 64 * 1024 * 1024
# Names one WatchEvents may filter on (each is an SQL parameter).
MAX_WATCHED_MODELS = 1000


class RegistryCore:
    """Models, versions, aliases, artifacts and the change feed."""

    def __init__(
        self,
        repository: Repository,
        store: ArtifactStore,
        *,
        max_artifact_bytes: int,
        download_chunk_bytes: int = 1024 * 1024,
        watch_poll_s: float = 2.0,
        max_watchers: int = 256,
        protected_aliases: Iterable[str] = ("production",),
    ) -> None:
        self._repo = repository
        self._store = store
        self._max_bytes = max_artifact_bytes
        self._chunk = download_chunk_bytes
        self._changes = ChangeSignal()
        self._watch_poll_s = watch_poll_s
        self._max_watchers = max_watchers
        self._watchers = 0
        self._feed_poller: asyncio.Task[None] | None = None
        self._protected = ProtectedAliases(protected_aliases)
        # Serialises commit/cleanup of one digest, so deleting an orphan never races a new reference.
        self._digest_locks: dict[str, asyncio.Lock] = {}

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def _mutate(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        result = await _durable(self._run(fn, *args, **kwargs))
        self._changes.notify()
        return result

    async def recover(self) -> int:
        """Remove what an interrupted upload left (temp files, bytes without a version). Run at start."""
        keep = await self._run(self._repo.all_digests)
        return await self._run(self._store.sweep, keep)

    # Models -------------------------------------------------------------------------------------------

    async def create_model(
        self, name: str, description: str = "", tags: dict[str, str] | None = None, *, owner: str
    ) -> Model:
        """A new model of ``owner``; a name any tenant holds is ALREADY_EXISTS (names are global)."""
        names.check_name(name)
        return await self._mutate(self._repo.create_model, name, description, names.check_tags(tags or {}), owner=owner)

    async def get_model(self, name: str, *, tenant: str | None) -> Model:
        return await self._run(self._repo.get_model, names.check_name(name), tenant=tenant)

    async def list_models(
        self,
        page_size: int,
        page_token: str,
        name_prefix: str = "",
        tags: dict[str, str] | None = None,
        *,
        tenant: str | None,
    ) -> Page[Model]:
        """The models of ``tenant`` (every tenant's when None)."""
        tags = names.check_tags(tags or {})
        if len(name_prefix) > 63:
            raise InvalidArgument.field("name_prefix", "is longer than any name")
        # The scope is part of the filter: a token is only good for the view that issued it.
        query = {"prefix": name_prefix, "tags": tags, "tenant": tenant}
        page = parse_page(page_size, page_token, query)
        models = await self._run(self._repo.list_models, name_prefix, tags, page.after, page.size + 1, tenant=tenant)
        return self._page(models, page.size, lambda m: m.name, query)

    async def update_model(
        self, name: str, description: str | None, tags: dict[str, str] | None, *, tenant: str | None
    ) -> Model:
        names.check_name(name)
        if tags is not None:
            names.check_tags(tags)
        return await self._mutate(self._repo.update_model, name, description, tags, tenant=tenant)

    async def delete_model(
        self, name: str, force: bool = False, *, tenant: str | None, may_move_protected: bool
    ) -> None:
        """Delete the model; ``force`` also removes its aliases, except protected ones the caller may not move."""
        digests = await self._mutate(
            self._repo.delete_model,
            names.check_name(name),
            force,
            tenant=tenant,
            held_back=self._protected.held_back(may_move_protected),
        )
        for digest in digests:
            await self._release(digest)

    # Versions -----------------------------------------------------------------------------------------

    async def upload_version(
        self, request: UploadRequest, chunks: AsyncIterator[bytes], *, tenant: str | None, owner: str
    ) -> Version:
        """Store a new version from streamed bytes; visible only once verified and durable.

        The model must be one the caller sees; with ``create_model`` a missing one is created for ``owner``.
        """
        manifest = self._check_upload(request)
        # Checked before any byte is received (the repository checks again in the committing transaction).
        await self._check_upload_target(request, tenant)
        free = await self._run(self._store.free_bytes)
        if request.size_bytes + DISK_RESERVE_BYTES > free:
            raise ResourceExhausted(
                f"not enough free space to receive {request.size_bytes} bytes; try again later", retry_after_s=30.0
            )
        writer = await self._run(self._store.writer)
        background = BackgroundWriter(writer.write)
        committed = False
        try:
            head = HeaderCollector()
            header_checked = False
            size = 0
            async for chunk in chunks:
                if len(chunk) > MAX_CHUNK_BYTES:
                    raise InvalidArgument.field(
                        "chunk", f"chunks are at most {MAX_CHUNK_BYTES} bytes, got {len(chunk)}"
                    )
                size += len(chunk)
                if size > request.size_bytes:
                    raise InvalidArgument.field(
                        "size_bytes", f"received more than the declared {request.size_bytes} bytes"
                    )
                head.feed(chunk)
                if not header_checked and head.complete:
                    # As soon as the header is in: a wrong artifact is refused before its weights arrive.
                    check_header_early(manifest, head)
                    header_checked = True
                await background.put(chunk)
            await background.close()
            if size != request.size_bytes:
                raise InvalidArgument.field(
                    "size_bytes", f"declared {request.size_bytes} bytes but the stream carried {size}"
                )
            digest = await self._run(writer.hexdigest)
            if digest != request.sha256:
                raise InvalidArgument.field(
                    "sha256", f"declared {request.sha256} but the bytes hash to {digest}", reason="DIGEST_MISMATCH"
                )
            check_artifact(manifest, head, size)
            lock = self._digest_locks.setdefault(digest, asyncio.Lock())
            async with lock:
                await _durable(self._run(self._store.commit, writer))
                committed = True
                try:
                    new = self._new_version(request, manifest, digest)
                    version = await self._mutate(
                        self._repo.add_version, new, request.create_model, tenant=tenant, owner=owner
                    )
                except BaseException:
                    await _durable(self._release_locked(digest))
                    raise
            return version
        finally:
            if not committed:
                await _durable(self._discard(background, writer))

    async def _check_upload_target(self, request: UploadRequest, tenant: str | None) -> None:
        holder = await self._run(self._repo.model_owner, request.model)
        if holder is None:
            if not request.create_model:
                raise model_not_found(request.model)
        elif not visible(holder, tenant):
            # Another tenant's model is missing to this caller; creating it fails as any taken name does.
            raise name_taken(request.model) if request.create_model else model_not_found(request.model)

    async def _discard(self, background: BackgroundWriter, writer: ArtifactWriter) -> None:
        await background.abort()
        await self._run(writer.abort)

    def _check_upload(self, request: UploadRequest) -> Manifest:
        names.check_name(request.model, "model")
        names.check_sha256(request.sha256)
        names.check_tags(request.tags)
        if request.size_bytes <= 0:
            raise InvalidArgument.field("size_bytes", "must be positive")
        if request.size_bytes > self._max_bytes:
            raise ResourceExhausted(
                f"size_bytes: {request.size_bytes} bytes exceeds this registry's limit of {self._max_bytes}",
                reason="ARTIFACT_TOO_LARGE",
            )
        try:
            return Manifest.from_json(request.manifest_json)
        except ArtifactError as exc:
            raise InvalidArgument.field("manifest_json", str(exc), reason="BAD_MANIFEST") from exc

    @staticmethod
    def _new_version(request: UploadRequest, manifest: Manifest, digest: str) -> NewVersion:
        return NewVersion(
            model=request.model,
            sha256=digest,
            size_bytes=request.size_bytes,
            manifest_json=manifest.to_json(),
            architecture=manifest.architecture,
            framework=manifest.framework,
            dtype="int8" if manifest.quantization else manifest.dtype,
            tags=dict(request.tags),
            lineage=request.lineage,
        )

    async def get_version(self, model: str, ref: str = "", *, tenant: str | None) -> Version:
        names.check_name(model, "model")
        number = await self._run(self._repo.resolve, model, ref, tenant=tenant)
        return await self._run(self._repo.get_version, model, number, tenant=tenant)

    async def list_versions(self, model: str, page_size: int, page_token: str, *, tenant: str | None) -> Page[Version]:
        names.check_name(model, "model")
        page = parse_page(page_size, page_token, {"model": model}, cursor_type=int)
        versions = await self._run(self._repo.list_versions, model, page.after, page.size + 1, tenant=tenant)
        return self._page(versions, page.size, lambda v: v.number, {"model": model})

    async def download(
        self, model: str, ref: str, offset: int, chunk_size: int, *, tenant: str | None
    ) -> tuple[Version, AsyncIterator[bytes]]:
        """The version and an iterator over its bytes from ``offset``."""
        if offset < 0:
            raise InvalidArgument.field("offset", "must not be negative")
        if chunk_size < 0 or chunk_size > MAX_CHUNK_BYTES:
            raise InvalidArgument.field("chunk_size", f"must be between 0 and {MAX_CHUNK_BYTES}")
        version = await self.get_version(model, ref, tenant=tenant)
        if offset > version.size_bytes:
            raise InvalidArgument.field("offset", f"is past the end of the {version.size_bytes}-byte artifact")
        return version, self._stream(version.sha256, offset, chunk_size or self._chunk)

    async def _stream(self, digest: str, offset: int, chunk_size: int) -> AsyncIterator[bytes]:
        """The stored bytes from ``offset``, verified against ``digest`` as they pass.

        The blob is hashed from its first byte whatever the offset (the bytes before it are read, not sent),
        and the last chunk is held back until the digest matches: a corrupt blob ends the stream with
        DATA_LOSS before the client holds all of its bytes, and a client verifying its download never
        accepts them. An encrypted blob's chunks are also authenticated one by one (``BlobIntegrityError``).
        """
        reader = await self._run(self._store.read, digest, 0, chunk_size)
        hasher = hashlib.sha256()
        position = 0
        held: bytes | None = None
        # One chunk read ahead: reading (and decrypting) the next one overlaps sending this one.
        ahead: asyncio.Future[bytes] | None = None
        try:
            ahead = asyncio.ensure_future(self._run(_next_hashed, reader, hasher))
            while True:
                chunk = await ahead
                if not chunk:
                    break
                ahead = asyncio.ensure_future(self._run(_next_hashed, reader, hasher))
                start, position = position, position + len(chunk)
                if position <= offset:
                    continue
                if held is not None:
                    yield held
                held = chunk[offset - start :] if start < offset else chunk
            if hasher.hexdigest() != digest:
                raise _corrupt(digest, f"its bytes hash to {hasher.hexdigest()}")
            if held is not None:
                yield held
        except BlobIntegrityError as exc:
            raise _corrupt(digest, str(exc)) from None
        finally:
            if ahead is not None and not ahead.done():
                # The reading thread must be done with the reader before it is closed.
                await asyncio.wait([ahead])
            if ahead is not None and ahead.done() and not ahead.cancelled():
                ahead.exception()  # retrieved: a read failing after the client left is nobody's error
            reader.close()  # type: ignore[attr-defined]

    async def derive_version(
        self, model: str, ref: str, variant: str, tags: dict[str, str] | None = None, *, tenant: str | None
    ) -> Version:
        """A compressed variant of a version, registered as a new version whose lineage names its parent.

        The variant joins the parent's model, and so its tenant, whoever derives it.
        """
        if variant not in VARIANTS:
            raise InvalidArgument.field("variant", f"{variant!r} is not one of {', '.join(VARIANTS)}")
        parent = await self.get_version(model, ref, tenant=tenant)
        manifest = Manifest.from_json(parent.manifest_json)
        if manifest.quantization or manifest.dtype != "float32":
            raise FailedPrecondition(
                f"version {parent.number} of {model!r} is already a {parent.lineage.derivation or manifest.dtype} "
                "variant; derive from a float32 version",
                reason="NOT_FLOAT32",
            )
        with tempfile.TemporaryDirectory(prefix="maas-derive-") as tmp:
            dest = Path(tmp) / "variant.safetensors"
            derived = await self._run(self._derive_file, parent.sha256, manifest, variant, dest)
            size = dest.stat().st_size
            digest = await self._run(_sha256_file, dest)
            request = UploadRequest(
                model=model,
                manifest_json=derived.to_json(),
                sha256=digest,
                size_bytes=size,
                tags=names.check_tags(tags or {}),
                lineage=Lineage(
                    parent_version=parent.number,
                    derivation=variant,
                    size_ratio=size / parent.size_bytes,
                    training_job_id=parent.lineage.training_job_id,
                    dataset_fingerprint=parent.lineage.dataset_fingerprint,
                    hyperparameters=dict(parent.lineage.hyperparameters),
                    source=f"derived from {model}@{parent.number}",
                ),
            )
            # Never creates a model (create_model is False), so the owner is never used.
            chunks = _file_chunks(dest, MAX_CHUNK_BYTES)
            return await self.upload_version(request, chunks, tenant=tenant, owner="")

    def _derive_file(self, digest: str, manifest: Manifest, variant: str, dest: Path) -> Manifest:
        # One thread for fetch and conversion: a remote store's local copy is a download.
        try:
            with self._store.local_copy(digest) as source:
                # The parent is verified before new bytes are made from it (hashing is cheap beside conversion).
                if (actual := _sha256_file(source)) != digest:
                    raise _corrupt(digest, f"its bytes hash to {actual}")
                return derive_variant(source, manifest, variant, dest)
        except BlobIntegrityError as exc:
            raise _corrupt(digest, str(exc)) from None

    # Signatures and trust -------------------------------------------------------------------------------

    async def sign_version(
        self, model: str, ref: str, bundle: bytes, public_key_pem: bytes, *, tenant: str | None
    ) -> Version:
        """Add an OpenSSF Model Signing signature to a version (new signature, never new bytes).

        The signature must verify with ``public_key_pem`` (or, for a certificate signature, with its signing
        certificate's key) and sign exactly the version's sha256; whether the key or the certificate's CA is
        trusted is each tenant's policy, checked where a version is loaded.
        """
        version = await self.get_version(model, ref, tenant=tenant)
        try:
            signed, signed_key_pem = await self._run(_verify_signature, bundle, public_key_pem)
        except signing.SignatureError as exc:
            raise InvalidArgument.field("signature", str(exc), reason="BAD_SIGNATURE") from None
        if signed.sha256 != version.sha256:
            raise InvalidArgument.field(
                "signature",
                f"signs bytes with sha256 {signed.sha256}, not version {version.number}'s {version.sha256}",
                reason="SIGNATURE_MISMATCH",
            )
        record = VersionSignature(
            key_id=signed.key_id,
            sha256=signed.sha256,
            bundle=bundle,
            public_key_pem=signed_key_pem,
            create_time=datetime.now(UTC),
        )
        return await self._mutate(self._repo.add_signature, model, version.number, record, tenant=tenant)

    async def trust_policy(self, tenant: str) -> list[TrustedKey]:
        return await self._run(self._repo.trusted_keys, tenant)

    async def model_tenant(self, model: str, *, tenant: str | None) -> str:
        """The tenant owning ``model``, which the caller must see."""
        return (await self.get_model(model, tenant=tenant)).tenant

    async def add_trusted_key(self, name: str, public_key_pem: bytes, *, owner: str) -> TrustedKey:
        """Trust a public key's signatures, or (CA certificates) those of certificates the CA issued."""
        names.check_name(name, "name")
        try:
            if signing.is_certificate(public_key_pem):
                pem = signing.ca_certificates_pem(public_key_pem)
            else:
                pem = signing.public_key_pem(public_key_pem)
        except signing.SignatureError as exc:
            raise InvalidArgument.field("public_key_pem", str(exc), reason="BAD_KEY") from None
        key = TrustedKey(owner, name, signing.anchor_id(pem), pem, datetime.now(UTC))
        return await self._run(self._repo.add_trusted_key, key)

    async def remove_trusted_key(self, name: str, *, owner: str) -> None:
        await self._run(self._repo.remove_trusted_key, owner, names.check_name(name, "name"))

    # Aliases ------------------------------------------------------------------------------------------

    async def set_alias(
        self,
        model: str,
        alias: str,
        version: int,
        create_only: bool = False,
        *,
        tenant: str | None,
        may_move_protected: bool,
    ) -> Alias:
        names.check_name(model, "model")
        names.check_alias(alias)
        if version <= 0:
            raise InvalidArgument.field("version", "must be a positive version number")
        # Before any lookup: the refusal depends on the alias and the caller only, so it reveals no model.
        self._protected.check(alias, may_move_protected)
        return await self._mutate(self._repo.set_alias, model, alias, version, create_only, tenant=tenant)

    async def delete_alias(self, model: str, alias: str, *, tenant: str | None, may_move_protected: bool) -> None:
        names.check_name(model, "model")
        names.check_alias(alias)
        self._protected.check(alias, may_move_protected)
        await self._mutate(self._repo.delete_alias, model, alias, tenant=tenant)

    async def list_aliases(self, model: str, *, tenant: str | None) -> list[Alias]:
        return await self._run(self._repo.list_aliases, names.check_name(model, "model"), tenant=tenant)

    # Events -------------------------------------------------------------------------------------------

    async def watch(self, after_sequence: int, models: list[str], *, tenant: str | None) -> AsyncIterator[Event]:
        """Recorded events after ``after_sequence`` (0: only new ones), then live ones, forever.

        Only events of ``tenant``'s models (every tenant's when None); sequence numbers are global.
        """
        if after_sequence < 0:
            raise InvalidArgument.field("after_sequence", "must not be negative")
        if len(models) > MAX_WATCHED_MODELS:
            # Each name is an SQL parameter: SQLite and PostgreSQL cap how many one statement may bind.
            raise InvalidArgument.field("models", f"at most {MAX_WATCHED_MODELS} names, got {len(models)}")
        for name in models:
            names.check_name(name, "models")
        if self._watchers >= self._max_watchers:
            raise ResourceExhausted(
                f"this registry serves {self._max_watchers} event watchers already", retry_after_s=5.0
            )
        self._watchers += 1
        self._start_feed_poller()
        try:
            cursor = after_sequence or await self._run(self._repo.last_sequence)
            while True:
                seen = self._changes.generation
                events = await self._run(self._repo.events_after, cursor, models, 500, tenant=tenant)
                for event in events:
                    cursor = event.sequence
                    yield event
                if len(events) < 500:
                    # Changes made through this process wake us at once; the feed poller, other replicas'.
                    await self._changes.wait(seen, None)
        finally:
            self._watchers -= 1
            if not self._watchers and self._feed_poller is not None:
                self._feed_poller.cancel()
                self._feed_poller = None

    def _start_feed_poller(self) -> None:
        if self._feed_poller is None or self._feed_poller.done():
            self._feed_poller = asyncio.create_task(self._poll_feed(), name="registry-feed-poller")

    async def _poll_feed(self) -> None:
        """One query per interval for every watcher together (not one each on the shared thread pool): wakes
        them when another replica wrote to the feed."""
        head = await self._run(self._repo.last_sequence)
        while True:
            await asyncio.sleep(self._watch_poll_s)
            latest = await self._run(self._repo.last_sequence)
            if latest != head:
                head = latest
                self._changes.notify()

    # Helpers ------------------------------------------------------------------------------------------

    async def _release(self, digest: str) -> None:
        async with self._digest_locks.setdefault(digest, asyncio.Lock()):
            await self._release_locked(digest)

    async def _release_locked(self, digest: str) -> None:
        if not await self._run(self._repo.digest_in_use, digest):
            await self._run(self._store.delete, digest)

    @staticmethod
    def _page(items: list[T], size: int, key: Callable[[T], Any], query: dict[str, Any]) -> Page[T]:
        if len(items) <= size:
            return Page(items=items)
        kept = items[:size]
        return Page(items=kept, next_page_token=encode_token(key(kept[-1]), query))


def _next_hashed(reader: Iterator[bytes], hasher: Any) -> bytes:
    # Hashing on the reading thread keeps the event loop free (hashlib releases the GIL on large buffers).
    chunk = next(reader, b"")
    hasher.update(chunk)
    return chunk


def _verify_signature(bundle: bytes, public_key_pem: bytes) -> tuple[signing.SignedDigest, bytes]:
    """What a signature signs and the signing key's PEM: a key signature is checked with ``public_key_pem``,
    a certificate signature with its certificate's key (``public_key_pem``, if given, must be that key)."""
    certificate = signing.signing_certificate(bundle)
    if certificate is None:
        if not public_key_pem.strip():
            raise signing.SignatureError("a key signature needs the public key that made it (public_key_pem)")
        return signing.verify_with_key(bundle, public_key_pem), signing.public_key_pem(public_key_pem)
    signed = signing.verify_self_consistent(bundle)
    if public_key_pem.strip() and signing.key_id(public_key_pem) != signed.key_id:
        raise signing.SignatureError("public_key_pem is not the key of the signature's signing certificate")
    return signed, signing.certificate_key_pem(certificate)


def _corrupt(digest: str, detail: str) -> DataLoss:
    log.error("artifact_corrupt", sha256=digest, detail=detail)
    return DataLoss(
        f"the stored artifact {digest[:12]}... failed its integrity check ({detail}); it is not served",
        reason="ARTIFACT_CORRUPT",
    )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(MAX_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


async def _file_chunks(path: Path, size: int) -> AsyncIterator[bytes]:
    with path.open("rb") as fh:
        while chunk := await asyncio.to_thread(fh.read, size):
            yield chunk
