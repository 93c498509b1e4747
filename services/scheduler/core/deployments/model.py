"""Domain types of inference deployments: specs, resolved versions, replicas, endpoint snapshots.

A :class:`DeploymentSpec` mirrors the ``DeploymentSpec`` message with the wire's zero values kept (0 means
"the default" for batching and autoscaling delays); :func:`validate_deployment_spec` checks it and returns it
normalised (name filled in, resources defaulted). What a spec's version strings resolved to in the registry
is a :class:`ResolvedVersion`, stored beside the spec so a restarted scheduler needs no registry to serve.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

from services.scheduler.core.jobs.model import DEFAULT_TENANT, ResourceRequest
from shared import names
from shared.artifacts import Signature
from shared.errors import FieldViolation, InvalidArgument, NotFound
from shared.kserve.batching import DEFAULT_MAX_BATCH_SIZE

MAX_BATCH_SIZE = 1024
MAX_QUEUE_DELAY_US = 1_000_000
MAX_QUEUE_SIZE = 1_000_000
MAX_DEFAULT_TIMEOUT_US = 3_600_000_000
MAX_REPLICAS = 64
DEFAULT_UPSCALE_DELAY_S = 2.0
DEFAULT_DOWNSCALE_DELAY_S = 30.0
MAX_SCALE_DELAY_S = 3600.0
#: The architecture whose versions stream tokens (ModelStreamInfer).
STREAMING_ARCHITECTURE = "decoder-lm"


class DeploymentState(enum.StrEnum):
    """See ``DeploymentState`` in scheduler.proto."""

    DEPLOYING = "DEPLOYING"
    READY = "READY"
    UPDATING = "UPDATING"
    DEGRADED = "DEGRADED"
    FAILED = "FAILED"
    DELETING = "DELETING"


class ReplicaState(enum.StrEnum):
    STARTING = "STARTING"
    READY = "READY"
    DRAINING = "DRAINING"


@dataclass(frozen=True)
class Batching:
    """``BatchingConfig`` as sent (0: the worker's default)."""

    max_batch_size: int = 0
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    default_timeout_us: int = 0
    max_queue_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The ``BatchingConfig`` fields as a dict (what a worker's ``hosted()`` options take)."""
        data = asdict(self)
        data["preferred_batch_sizes"] = list(self.preferred_batch_sizes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Batching:
        return cls(**{**data, "preferred_batch_sizes": tuple(data.get("preferred_batch_sizes", ()))})


@dataclass(frozen=True)
class Autoscaling:
    """Target ongoing requests per replica (0: no autoscaling) and the delays (0: the defaults)."""

    target_ongoing_requests: float = 0.0
    upscale_delay_s: float = 0.0
    downscale_delay_s: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.target_ongoing_requests > 0

    @property
    def upscale_delay(self) -> float:
        return self.upscale_delay_s or DEFAULT_UPSCALE_DELAY_S

    @property
    def downscale_delay(self) -> float:
        return self.downscale_delay_s or DEFAULT_DOWNSCALE_DELAY_S


@dataclass(frozen=True)
class Canary:
    version: str = ""
    weight_percent: int = 0


@dataclass(frozen=True)
class DeploymentSpec:
    """What a client asks for; see ``DeploymentSpec`` in scheduler.proto."""

    model: str
    version: str = ""
    name: str = ""
    min_replicas: int = 0
    max_replicas: int = 0
    resources: ResourceRequest = field(default_factory=ResourceRequest)
    batching: Batching = field(default_factory=Batching)
    autoscaling: Autoscaling = field(default_factory=Autoscaling)
    canary: Canary | None = None
    require_signature: bool = False

    @property
    def replica_bounds(self) -> tuple[int, int]:
        """(min, max) replicas; max 0 means min (at least 1)."""
        low = self.min_replicas
        return low, self.max_replicas or max(low, 1)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["batching"] = self.batching.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeploymentSpec:
        canary = data.get("canary")
        return cls(
            model=data["model"],
            version=data.get("version", ""),
            name=data.get("name", ""),
            min_replicas=data.get("min_replicas", 0),
            max_replicas=data.get("max_replicas", 0),
            resources=ResourceRequest(**data.get("resources", {})),
            batching=Batching.from_dict(data.get("batching", {})),
            autoscaling=Autoscaling(**data.get("autoscaling", {})),
            canary=Canary(**canary) if canary else None,
            require_signature=data.get("require_signature", False),
        )


@dataclass(frozen=True)
class ResolvedVersion:
    """A registry version a deployment serves and what the gateway needs to know about it."""

    version: int
    architecture: str
    signature: Signature
    aliases: tuple[str, ...] = ()

    @property
    def streaming(self) -> bool:
        return self.architecture == STREAMING_ARCHITECTURE

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "architecture": self.architecture,
            "signature": self.signature.to_dict(),
            "aliases": list(self.aliases),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResolvedVersion:
        return cls(
            version=int(data["version"]),
            architecture=data["architecture"],
            signature=Signature.from_dict(data["signature"]),
            aliases=tuple(data.get("aliases", ())),
        )


@dataclass(frozen=True)
class Replica:
    id: str
    version: int
    address: str = ""
    state: ReplicaState = ReplicaState.STARTING


@dataclass(frozen=True)
class Deployment:
    """A stored deployment; ``replicas`` is filled in from the live replica set when read. ``tenant`` is
    the tenant it belongs to (its creator's), also the one whose models it may serve. ``request_id`` is
    the client's id of the request that created it ("": none), unique per tenant."""

    name: str
    spec: DeploymentSpec
    state: DeploymentState
    resolved: ResolvedVersion
    canary: ResolvedVersion | None = None
    tenant: str = DEFAULT_TENANT
    message: str = ""
    target_replicas: int = 0
    generation: int = 1
    #: The generation whose replicas are current: bumped only by updates that need new replicas.
    replica_generation: int = 1
    create_time: datetime | None = None
    update_time: datetime | None = None
    replicas: tuple[Replica, ...] = ()
    request_id: str = ""

    @property
    def version(self) -> int:
        return self.resolved.version

    @property
    def canary_version(self) -> int:
        return self.canary.version if self.canary is not None else 0

    def with_changes(self, **changes: Any) -> Deployment:
        return replace(self, **changes)


@dataclass(frozen=True)
class Endpoint:
    replica_id: str
    address: str
    version: int


@dataclass(frozen=True)
class ServedVersion:
    resolved: ResolvedVersion
    batching: Batching


@dataclass(frozen=True)
class DeploymentEndpoints:
    """One deployment in a ``WatchEndpoints`` snapshot."""

    name: str
    state: DeploymentState
    default_version: int
    canary_version: int
    canary_weight_percent: int
    versions: tuple[ServedVersion, ...]
    endpoints: tuple[Endpoint, ...]
    target_replicas: int
    max_replicas: int
    tenant: str = DEFAULT_TENANT


def deployment_not_found(name: str) -> NotFound:
    """The error for a deployment that does not exist, and for one of another tenant: the same words, so
    that a caller cannot tell the two apart."""
    return NotFound(f"deployment {name!r} not found", reason="DEPLOYMENT_NOT_FOUND")


def needs_new_generation(old: Deployment, new: Deployment) -> bool:
    """A new version or canary version, new batching or resources: a rolling update. Replica counts,
    autoscaling and the canary's weight apply in place."""
    return (
        old.version != new.version
        or old.canary_version != new.canary_version
        or old.spec.batching != new.spec.batching
        or old.spec.resources != new.spec.resources
    )


def _finite_nonneg(value: float, field_name: str, violations: list[FieldViolation], upper: float) -> None:
    if not math.isfinite(value) or value < 0 or value > upper:
        violations.append(FieldViolation(field_name, f"must be between 0 and {upper:g}, got {value!r}"))


def validate_deployment_spec(spec: DeploymentSpec, default_cpus: float) -> DeploymentSpec:
    """Check every field; returns the spec normalised (name filled in, CPUs defaulted).

    Raises:
        InvalidArgument: With one field violation (``spec.<field>``) per problem.
    """
    violations: list[FieldViolation] = []

    def check(fn: Any, value: str, field_name: str) -> None:
        try:
            fn(value, field_name)
        except InvalidArgument as exc:
            violations.extend(exc.violations)

    check(names.check_name, spec.model, "spec.model")
    name = spec.name or spec.model
    if spec.name:
        check(names.check_name, spec.name, "spec.name")
    _check_version(spec.version, "spec.version", violations)
    low, high = spec.min_replicas, spec.max_replicas
    if low < 0 or low > MAX_REPLICAS:
        violations.append(FieldViolation("spec.min_replicas", f"must be between 0 and {MAX_REPLICAS}, got {low}"))
    if high < 0 or high > MAX_REPLICAS:
        violations.append(FieldViolation("spec.max_replicas", f"must be between 0 and {MAX_REPLICAS}, got {high}"))
    elif high and high < low:
        violations.append(FieldViolation("spec.max_replicas", f"must be >= min_replicas ({low}), got {high}"))
    scaling = spec.autoscaling
    _finite_nonneg(scaling.target_ongoing_requests, "spec.autoscaling.target_ongoing_requests", violations, 1e6)
    _finite_nonneg(scaling.upscale_delay_s, "spec.autoscaling.upscale_delay_s", violations, MAX_SCALE_DELAY_S)
    _finite_nonneg(scaling.downscale_delay_s, "spec.autoscaling.downscale_delay_s", violations, MAX_SCALE_DELAY_S)
    if low == 0 and not scaling.enabled and high == 0:
        pass  # min 0 and max 0 without autoscaling: one replica (max 0 means min, at least 1)
    elif low == 0 and not scaling.enabled:
        violations.append(
            FieldViolation("spec.min_replicas", "0 (scale to zero) needs autoscaling.target_ongoing_requests > 0")
        )
    _check_batching(spec.batching, violations)
    resources = spec.resources
    if not math.isfinite(resources.cpus) or resources.cpus < 0 or resources.cpus > 1024:
        violations.append(FieldViolation("spec.resources.cpus", f"must be > 0 (0: the default), got {resources.cpus}"))
    if not math.isfinite(resources.gpus) or resources.gpus < 0 or resources.gpus > 64:
        violations.append(FieldViolation("spec.resources.gpus", f"must be >= 0, got {resources.gpus}"))
    if resources.memory_bytes < 0:
        violations.append(FieldViolation("spec.resources.memory_bytes", "must not be negative"))
    canary = spec.canary
    if canary is not None and (canary.version or canary.weight_percent):
        if not 1 <= canary.weight_percent <= 99:
            violations.append(
                FieldViolation("spec.canary.weight_percent", f"must be between 1 and 99, got {canary.weight_percent}")
            )
        if not canary.version:
            violations.append(FieldViolation("spec.canary.version", "must not be empty"))
        else:
            _check_version(canary.version, "spec.canary.version", violations)
            if canary.version == spec.version:
                violations.append(FieldViolation("spec.canary.version", "must differ from spec.version"))
    else:
        canary = None
    if violations:
        first = violations[0]
        raise InvalidArgument(f"{first.field}: {first.description}", violations=violations)
    if resources.cpus == 0:
        resources = replace(resources, cpus=default_cpus)
    return replace(spec, name=name, resources=resources, canary=canary)


def _check_version(value: str, field_name: str, violations: list[FieldViolation]) -> None:
    if not value or value == "latest":
        return
    try:
        if names.version_number(value, field_name) is not None:
            return
    except InvalidArgument as exc:
        violations.extend(exc.violations)
        return
    try:
        names.check_alias(value, field_name)
    except InvalidArgument as exc:
        violations.extend(exc.violations)


def _check_batching(batching: Batching, violations: list[FieldViolation]) -> None:
    prefix = "spec.batching"
    if not 0 <= batching.max_batch_size <= MAX_BATCH_SIZE:
        violations.append(FieldViolation(f"{prefix}.max_batch_size", f"must be between 0 and {MAX_BATCH_SIZE}"))
    if not 0 <= batching.max_queue_delay_us <= MAX_QUEUE_DELAY_US:
        violations.append(FieldViolation(f"{prefix}.max_queue_delay_us", "must be between 0 and 1 s (1000000)"))
    if not 0 <= batching.default_timeout_us <= MAX_DEFAULT_TIMEOUT_US:
        violations.append(FieldViolation(f"{prefix}.default_timeout_us", "must be between 0 and 1 hour"))
    if not 0 <= batching.max_queue_size <= MAX_QUEUE_SIZE:
        violations.append(FieldViolation(f"{prefix}.max_queue_size", f"must be between 0 and {MAX_QUEUE_SIZE}"))
    largest = batching.max_batch_size or DEFAULT_MAX_BATCH_SIZE
    for size in batching.preferred_batch_sizes:
        if not 1 <= size <= largest:
            violations.append(
                FieldViolation(f"{prefix}.preferred_batch_sizes", f"sizes must be between 1 and {largest}, got {size}")
            )
            break
