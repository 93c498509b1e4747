"""The interfaces the core depends on; gRPC implementations live in ``adapters``, fakes in tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from typing import Protocol

from services.gateway.core.model import Deployment, DeploymentStatus, LoadOptions
from services.gateway.core.statistics import VersionStats


class Replicas(Protocol):
    """The data plane of the inference workers, by address."""

    async def infer(
        self, address: str, version: int, payload: bytes, timeout: float | None, shared_memory: bytes = b""
    ) -> bytes:
        """Forward a serialized ModelInferRequest; returns the serialized ModelInferResponse.

        ``shared_memory`` (``SharedMemoryCall.windows``) names the windows the worker reads its inputs from
        and writes its outputs to, on this host.

        Raises:
            shared.errors.MaasError: The worker's error (Unavailable when the replica is gone or draining).
            services.gateway.core.shm.SharedMemoryUnreachable: The worker cannot use ``shared_memory``.
        """
        ...

    def stream(self, address: str, version: int, payload: bytes, timeout: float | None) -> AsyncIterator[bytes]:
        """Forward one serialized ModelInferRequest on a ModelStreamInfer stream; yields the serialized
        ModelStreamInferResponses. Closing the iterator cancels the worker's stream."""
        ...

    async def statistics(self, address: str, timeout: float) -> list[VersionStats]:
        """Every version's statistics at the worker at ``address``."""
        ...

    async def provenance(self, address: str, name: str, version: int, timeout: float | None) -> Mapping[str, str]:
        """What the worker at ``address`` reports of the bytes it serves ``version`` from: its trusted
        ``signers`` and their ``sha256`` (empty when unsigned); the worker's ModelMetadata ``parameters``."""
        ...

    def retain(self, addresses: Collection[str]) -> None:
        """Forget (close the connections of) workers not in ``addresses``."""
        ...


class EndpointSource(Protocol):
    """Where endpoint snapshots come from (the scheduler's WatchEndpoints, or a test's feeder)."""

    async def follow(self, apply: Callable[[Sequence[Deployment]], None], lost: Callable[[], None]) -> None:
        """Call ``apply`` with every full snapshot, forever (until cancelled); ``lost`` whenever the stream
        of snapshots breaks (the last one may no longer be current until the next ``apply``)."""
        ...


class LoadSink(Protocol):
    """Where the per-deployment ongoing requests go (the scheduler's ReportLoad)."""

    async def report(self, ongoing: Mapping[str, float]) -> None: ...


class DeploymentControl(Protocol):
    """The scheduler's deployment API and the registry's model list, for the repository RPCs; each call
    acts as the caller of the RPC being served (its key, so its tenant)."""

    async def get(self, name: str) -> DeploymentStatus | None:
        """The deployment called ``name``, None if there is none."""
        ...

    async def list_deployments(self) -> list[DeploymentStatus]: ...

    async def apply(self, options: LoadOptions) -> DeploymentStatus:
        """Create the deployment, or update the existing one with the options given."""
        ...

    async def delete(self, name: str) -> None: ...

    async def registry_models(self) -> list[str]:
        """Names of every model in the registry the caller may see (the models of its tenant)."""
        ...
