"""Domain types of the gateway: deployments as the scheduler's endpoint snapshots describe them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.artifacts import Signature

# Deployment states, named as the scheduler names them (without the proto's prefixes).
DEPLOYING = "DEPLOYING"
READY = "READY"
UPDATING = "UPDATING"
DEGRADED = "DEGRADED"
FAILED = "FAILED"
DELETING = "DELETING"
UNSPECIFIED = "UNSPECIFIED"
#: The tenant of a deployment whose snapshot names none (as ``shared.security.access.DEFAULT_TENANT``,
#: which a core cannot import: that module depends on protobuf).
DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class ServedVersion:
    """One registry version a deployment serves.

    Attributes:
        version: The registry version number.
        signature: What requests are validated against.
        max_batch_size: Largest batch a request may carry (0: no batch dimension).
        streaming: True for generative models (ModelStreamInfer streams tokens).
        aliases: Registry aliases that named this version when it was deployed.
        architecture: Zoo architecture id.
        batching: The resolved batching settings (``shared.kserve.batching.BatchingSettings``); opaque to
            the core, rendered by the API (ModelConfig).
    """

    version: int
    signature: Signature
    max_batch_size: int
    streaming: bool = False
    aliases: tuple[str, ...] = ()
    architecture: str = ""
    batching: Any = None


@dataclass(frozen=True)
class Endpoint:
    """A ready replica serving one version at ``address`` (``host:port``)."""

    address: str
    version: int
    replica_id: str = ""


@dataclass(frozen=True, eq=False)
class Deployment:
    """A deployment as of the latest snapshot; immutable, replaced whole by the next snapshot.

    Attributes:
        name: What clients call the model (``model_name``).
        versions: Served versions by number.
        endpoints: Ready replicas (empty while scaled to zero or starting).
        default_version: Answers requests that name no version.
        canary_version: Takes ``canary_weight_percent`` of those requests (0: no canary).
        canary_weight_percent: 0-100.
        state: One of the state names of this module.
        target_replicas: Replicas the autoscaler wants now.
        max_replicas: Upper bound of the deployment's replicas.
        tenant: The tenant it belongs to: only that tenant's keys (and admin keys) see it.
    """

    name: str
    versions: Mapping[int, ServedVersion]
    endpoints: tuple[Endpoint, ...] = ()
    default_version: int = 0
    canary_version: int = 0
    canary_weight_percent: int = 0
    state: str = READY
    target_replicas: int = 0
    max_replicas: int = 0
    tenant: str = DEFAULT_TENANT
    _by_version: dict[int, tuple[Endpoint, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        by_version: dict[int, list[Endpoint]] = {}
        for endpoint in self.endpoints:
            by_version.setdefault(endpoint.version, []).append(endpoint)
        # Built once per snapshot so that routing a request is a dict lookup.
        object.__setattr__(self, "_by_version", {v: tuple(e) for v, e in by_version.items()})

    def ready(self, version: int) -> tuple[Endpoint, ...]:
        """The ready endpoints serving ``version``."""
        return self._by_version.get(version, ())


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes: the deployment and the version chosen for it.

    Attributes:
        deployment: The deployment as of resolution.
        served: The chosen version.
        requested: The version the client asked for (number, alias or empty), kept to resolve again when
            the chosen version leaves the deployment while the request waits.
    """

    deployment: Deployment
    served: ServedVersion
    requested: str

    @property
    def version(self) -> int:
        return self.served.version


@dataclass(frozen=True)
class DeploymentStatus:
    """A deployment as the scheduler's control API reports it (RepositoryModelLoad / Index)."""

    name: str
    model: str
    state: str
    message: str = ""
    version: int = 0
    generation: int = 0
    min_replicas: int = 1
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True)
class LoadOptions:
    """What RepositoryModelLoad asks for; None leaves a field as it is (or the scheduler's default)."""

    name: str
    version: str | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None


@dataclass(frozen=True)
class IndexEntry:
    """One row of RepositoryIndex."""

    name: str
    version: str
    state: str
    reason: str = ""
