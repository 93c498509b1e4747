"""The worker's core: the versions loaded here, their memory budget, batched inference and generation.

Free of grpc, Ray and generated code: it works on numpy arrays, torch modules and domain types.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from concurrent.futures import Executor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import structlog
import torch
from torch import nn

from services.inference.core.batcher import DEFAULT_MAX_QUEUE_BYTES, DynamicBatcher
from services.inference.core.observer import NULL_HOST_OBSERVER, HostObserver
from services.inference.core.runner import TorchRunner, model_bytes
from services.inference.core.stats import BatchTimings, VersionStats
from shared.artifacts import ArtifactError, Manifest, Signature, build_model, load_artifact, read_manifest
from shared.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from shared.kserve.batching import BatchingSettings

__all__ = ["ArtifactSource", "FetchedArtifact", "ModelHost", "ServedVersion"]

log = structlog.get_logger("maas.inference")


@dataclass(frozen=True)
class FetchedArtifact:
    """A local copy of a version's artifact, hashed for this load against the version's digest.

    A fresh download was hashed as it arrived. A cached copy is re-hashed by ``recheck`` while the host
    loads it: the hash overlaps real work, and nothing is served before it has matched.
    """

    path: Path
    sha256: str
    #: Signers whose signatures verified under the tenant's trust policy, for the digest ``sha256``.
    trusted_signers: tuple[str, ...] = ()
    #: Why no signature counts, when none does (shown in the FAILED_PRECONDITION of a required signature).
    signature_problem: str = "the version is not signed"
    #: Re-hashes a cached copy; False when its bytes no longer match (the copy is evicted when the fetch's
    #: context exits). None: the bytes were hashed already.
    recheck: Callable[[], Awaitable[bool]] | None = None


class ArtifactSource(Protocol):
    """Where artifacts come from (the registry, in production)."""

    def fetch(self, model: str, version: int) -> AbstractAsyncContextManager[FetchedArtifact]:
        """The version's artifact, which stays in place until the context exits.

        Raises:
            NotFound: If the registry has no such version.
            DataLoss: If no copy whose bytes match the digest can be had.
        """
        ...


@dataclass(eq=False)
class ServedVersion:
    """One loaded version and everything that serves it."""

    model: str
    version: int
    manifest: Manifest
    runner: TorchRunner
    batcher: DynamicBatcher
    stats: VersionStats
    memory_bytes: int
    device: str
    #: The digest of the bytes loaded, and who signed them (trusted signers; empty: none).
    sha256: str = ""
    signers: tuple[str, ...] = ()
    last_used: float = field(default_factory=time.monotonic)
    streams: int = 0
    closing: bool = False
    streams_idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def key(self) -> tuple[str, int]:
        return (self.model, self.version)

    @property
    def signature(self) -> Signature:
        return self.manifest.signature

    @property
    def architecture(self) -> str:
        return self.manifest.architecture

    @property
    def batching(self) -> BatchingSettings:
        return self.batcher.settings

    @property
    def streaming(self) -> bool:
        return self.runner.streaming

    @property
    def ongoing(self) -> int:
        """Requests queued or running now (batched requests plus open generation streams)."""
        return self.batcher.ongoing + self.streams


def _planned_bytes(path: Path) -> int:
    """What the artifact's model will take once loaded, from its manifest alone: built on the meta device
    (shapes and dtypes, no memory), so an oversized model is refused before anything is allocated."""
    try:
        return model_bytes(build_model(read_manifest(path), device="meta"))
    except ArtifactError as exc:
        raise InvalidArgument(f"the artifact cannot be loaded: {exc}") from None


def _load(path: Path, device: str) -> tuple[Manifest, nn.Module]:
    try:
        manifest = read_manifest(path)
        module = load_artifact(path, manifest, device=device)
    except ArtifactError as exc:
        raise InvalidArgument(f"the artifact cannot be loaded: {exc}") from None
    module.eval()
    return manifest, module


class ModelHost:
    """Loads versions, keeps them within a memory budget and runs requests on one compute executor.

    Args:
        source: Where artifacts come from.
        executor: The single compute thread every execution runs on.
        device: Resolved device (``cpu`` or ``cuda:N``).
        memory_budget_bytes: Weight bytes all loaded versions may hold together.
        warmup: Run one execution per version before it serves.
        max_new_tokens: Most tokens one generation request may ask for.
        max_queue_bytes: Bytes of inputs the queue of each version may hold (see :class:`DynamicBatcher`).
        observer: Told of loads, unloads and every version's events (the worker's metrics).
    """

    def __init__(
        self,
        source: ArtifactSource,
        executor: Executor,
        device: str,
        memory_budget_bytes: int,
        *,
        warmup: bool = True,
        max_new_tokens: int = 512,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        observer: HostObserver = NULL_HOST_OBSERVER,
    ) -> None:
        self.source = source
        self.executor = executor
        self.device = device
        self.memory_budget_bytes = memory_budget_bytes
        self.warmup = warmup
        self.max_new_tokens = max_new_tokens
        self.max_queue_bytes = max_queue_bytes
        self.observer = observer
        self._versions: dict[tuple[str, int], ServedVersion] = {}
        self._load_lock = asyncio.Lock()

    # --- loading ---------------------------------------------------------------------------------

    def loaded(self) -> list[ServedVersion]:
        """Loaded versions, by model then version."""
        return [self._versions[key] for key in sorted(self._versions)]

    @property
    def memory_used_bytes(self) -> int:
        return sum(v.memory_bytes for v in self._versions.values())

    async def load(
        self, model: str, version: int, batching: BatchingSettings, *, require_signature: bool = False
    ) -> ServedVersion:
        """Downloads, verifies, loads and warms up a version; a loaded one only takes the new batching settings.

        Every load re-hashes the bytes (cached ones too); with ``require_signature`` a signature by a key the
        tenant trusts must verify against them, before anything is loaded.

        Raises:
            InvalidArgument: If the reference is malformed or the artifact cannot be loaded.
            NotFound: If the registry has no such version.
            FailedPrecondition: If a signature is required and none verifies under the trust policy.
            ResourceExhausted: If the version does not fit the memory budget, even after unloading every
                idle version.
        """
        if not model or version < 1:
            raise InvalidArgument.field("ref", f"needs a model name and a version >= 1, got {model!r} {version}")
        async with self._load_lock:
            served = self._versions.get((model, version))
            if served is not None and not served.closing:
                if require_signature and not served.signers:
                    raise FailedPrecondition(
                        f"model {model}:{version} is loaded here unsigned; a signature is required",
                        reason="SIGNATURE_REQUIRED",
                    )
                served.batcher.update(batching)
                return served
            loaded = await self._load_verified(model, version, require_signature=require_signature)
            if loaded is None:
                # The cached copy's bytes changed: it was evicted, and this fetch downloads (hashing as it goes).
                loaded = await self._load_verified(model, version, require_signature=require_signature)
            if loaded is None:
                raise DataLoss(f"model {model}:{version}: no copy of its artifact matches its digest")
            artifact, manifest, module, runner = loaded
            size = model_bytes(module)
            await self._make_room(model, version, size)
            name = f"{model}:{version}"
            stats = VersionStats(observer=self.observer.loaded(model, version, size))
            batcher = DynamicBatcher(
                name,
                runner,
                self.executor,
                batching,
                stats,
                merge=not runner.streaming and batching.max_batch_size > 1,
                max_queue_bytes=self.max_queue_bytes,
            )
            served = ServedVersion(
                model,
                version,
                manifest,
                runner,
                batcher,
                stats,
                size,
                self.device,
                sha256=artifact.sha256,
                signers=artifact.trusted_signers,
            )
            served.streams_idle.set()
            self._versions[served.key] = served
            log.info("model_loaded", model=model, version=version, bytes=size, device=self.device)
            return served

    async def _load_verified(
        self, model: str, version: int, *, require_signature: bool
    ) -> tuple[FetchedArtifact, Manifest, nn.Module, TorchRunner] | None:
        """Fetches, loads and warms up a version while its bytes are re-hashed; None if they no longer match.

        The digest check of a cached copy runs on its own thread alongside the load and the warm-up (both
        read the same bytes), so it costs little wall time; the loaded module is discarded on a mismatch.
        """
        async with self.source.fetch(model, version) as artifact:
            if require_signature and not artifact.trusted_signers:
                raise FailedPrecondition(
                    f"model {model}:{version} cannot be loaded where a signature is required: "
                    f"{artifact.signature_problem}",
                    reason="SIGNATURE_REQUIRED",
                )
            check = asyncio.ensure_future(artifact.recheck()) if artifact.recheck is not None else None
            try:
                built = await self._build(model, version, artifact.path)
            except Exception:
                # A load that failed on altered bytes is a corrupt copy, not a bad artifact: the check decides.
                if check is not None and not await check:
                    return None
                raise
            if check is not None and not await check:
                log.warning("loaded_model_discarded", model=model, version=version, reason="digest mismatch")
                return None
            return (artifact, *built)

    async def _build(self, model: str, version: int, path: Path) -> tuple[Manifest, nn.Module, TorchRunner]:
        planned = await asyncio.to_thread(_planned_bytes, path)
        if planned > self.memory_budget_bytes:
            raise ResourceExhausted(
                f"model {model}:{version} needs {planned} bytes, more than the worker's memory budget of "
                f"{self.memory_budget_bytes}; refused before loading"
            )
        manifest, module = await asyncio.to_thread(_load, path, self.device)
        runner = TorchRunner(module, manifest, self.device)
        if self.warmup:
            await self._warm_up(runner)
        return manifest, module, runner

    async def _warm_up(self, runner: TorchRunner) -> None:
        inputs = runner.warmup_inputs()
        if inputs is None:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, runner, inputs, BatchTimings())

    async def _make_room(self, model: str, version: int, size: int) -> None:
        budget = self.memory_budget_bytes
        if size > budget:
            raise ResourceExhausted(
                f"model {model}:{version} needs {size} bytes, more than the worker's memory budget of {budget}"
            )
        used = self.memory_used_bytes
        # Least recently used idle versions go first; busy ones are never unloaded to make room.
        for victim in sorted(self._versions.values(), key=lambda v: v.last_used):
            if used + size <= budget:
                break
            if victim.ongoing or victim.closing:
                continue
            log.info("model_evicted", model=victim.model, version=victim.version, for_model=model)
            await self._unload(victim)
            used -= victim.memory_bytes
        if used + size > budget:
            raise ResourceExhausted(
                f"model {model}:{version} needs {size} bytes; {used} of the {budget}-byte budget are held by "
                "versions serving requests"
            )

    async def unload(self, model: str, version: int) -> None:
        """Lets the version's queued and running requests finish, then unloads it.

        Raises:
            NotFound: If the version is not loaded.
        """
        served = self._versions.get((model, version))
        if served is None or served.closing:
            raise NotFound(f"model {model}:{version} is not loaded here ({self._describe_loaded()})")
        await self._unload(served)

    async def _unload(self, served: ServedVersion) -> None:
        served.closing = True
        await served.batcher.close()
        await served.streams_idle.wait()
        # The version may have been loaded again while this unload drained: leave the new one alone.
        if self._versions.get(served.key) is served:
            del self._versions[served.key]
            self.observer.unloaded(served.model, served.version)
        if self.device.startswith("cuda"):
            await asyncio.to_thread(torch.cuda.empty_cache)
        log.info("model_unloaded", model=served.model, version=served.version)

    async def close(self) -> None:
        """Unloads everything (after in-flight work finishes)."""
        for served in list(self._versions.values()):
            await self._unload(served)

    # --- serving ---------------------------------------------------------------------------------

    def _describe_loaded(self) -> str:
        if not self._versions:
            return "nothing is loaded"
        return "loaded: " + ", ".join(f"{m}:{v}" for m, v in sorted(self._versions))

    def resolve(self, model: str, version: str = "", pinned: int | None = None) -> ServedVersion:
        """Picks the loaded version a request is for.

        Args:
            model: The model name.
            version: The request's version: a number, or anything else (an alias, empty).
            pinned: The version the gateway chose (``maas-model-version``), which wins.

        Raises:
            NotFound: If that version is not loaded, or the choice is ambiguous; the message lists what is.
        """
        number = pinned
        if number is None and version.isascii() and version.isdigit() and len(version) <= 18:
            number = int(version)
        if number is None:
            candidates = [v for (m, v), s in self._versions.items() if m == model and not s.closing]
            if len(candidates) == 1:
                number = candidates[0]
            else:
                detail = "several versions are" if candidates else "no version is"
                raise NotFound(
                    f"model '{model}' version {version or '(default)'}: {detail} loaded here "
                    f"({self._describe_loaded()}); name a version number"
                )
        served = self._versions.get((model, number))
        if served is None or served.closing:
            raise NotFound(f"model '{model}' version {number} is not loaded here ({self._describe_loaded()})")
        return served

    async def infer(
        self,
        served: ServedVersion,
        inputs: Mapping[str, np.ndarray],
        batch_size: int,
        *,
        priority: int = 0,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Runs one validated, decoded request through the version's dynamic batcher.

        Raises:
            InvalidArgument: If values are out of the model's range (token ids, sequence length).
            ResourceExhausted: If the queue is full.
            DeadlineExceeded: If the request outwaited its queue timeout.
        """
        served.last_used = time.monotonic()
        served.runner.check(inputs)
        return await served.batcher.submit(inputs, batch_size, priority=priority, timeout_s=timeout_s)

    def check_prompt(self, served: ServedVersion, prompt: np.ndarray, max_tokens: int) -> list[int]:
        """Validates a generation request; returns the prompt's token ids.

        Raises:
            InvalidArgument: If the model does not generate, the prompt is not ``[1, n]`` with ids in the
                vocabulary and n within the context, or ``max_tokens`` is out of range.
        """
        if not served.streaming:
            raise InvalidArgument(f"model {served.model}:{served.version} does not generate tokens")
        if prompt.ndim != 2 or prompt.shape[0] != 1 or prompt.shape[1] < 1:
            raise InvalidArgument(f"input 'input_ids': expected shape [1, n] with n >= 1, got {list(prompt.shape)}")
        served.runner.check({"input_ids": prompt})
        if not 1 <= max_tokens <= self.max_new_tokens:
            raise InvalidArgument(f"parameter 'max_tokens': must be in 1..{self.max_new_tokens}, got {max_tokens}")
        return [int(t) for t in prompt[0].tolist()]

    async def generate(self, served: ServedVersion, tokens: list[int], max_tokens: int) -> AsyncGenerator[int, None]:
        """Greedily generates up to ``max_tokens`` tokens, one compute-thread call per token.

        Stops computing within one token when the consumer stops iterating (cancelled stream, deadline).

        Raises:
            Unavailable: If the version is being unloaded.
            ResourceExhausted: If the version already runs as many generations and batched requests as its
                queue may hold (each generation takes the compute thread once per token).
        """
        if served.closing:
            raise Unavailable(f"model {served.model}:{served.version} is being unloaded")
        limit = served.batcher.settings.max_queue_size
        if served.streams + served.batcher.ongoing >= limit:
            served.stats.record_rejected()
            raise ResourceExhausted(
                f"model {served.model}:{served.version}: {served.streams} generations running, the limit is {limit}",
                retry_after_s=0.1,
            )
        served.last_used = time.monotonic()
        served.streams += 1
        served.streams_idle.clear()
        loop = asyncio.get_running_loop()
        stats = served.stats
        started = time.monotonic_ns()
        ok = False
        tokens = list(tokens)
        try:
            for _ in range(max_tokens):
                step_started = time.perf_counter_ns()
                token = await loop.run_in_executor(self.executor, served.runner.next_token, tokens)
                stats.record_execution(1, 1, BatchTimings(infer_ns=time.perf_counter_ns() - step_started))
                stats.generated_tokens += 1
                tokens.append(token)
                yield token
            ok = True
        finally:
            stats.record_request(ok, time.monotonic_ns() - started)
            served.streams -= 1
            if not served.streams:
                served.streams_idle.set()
