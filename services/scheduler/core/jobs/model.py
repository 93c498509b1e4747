"""Domain types of the scheduler: training jobs, their specs, states and step metrics.

A :class:`TrainingJobSpec` mirrors the ``TrainingJobSpec`` message. The one the service stores (and hands to
the runner) is the *normalised* spec: defaults filled in (see :mod:`services.scheduler.core.jobs.validation`), so a
runner never needs to know what 0 or "" meant on the wire. Its helpers (:meth:`TrainingJobSpec.arguments`,
:meth:`TrainingJobSpec.codec_kwargs`, :meth:`OptimizerSpec.make`) convert exactly as submit-time validation
did, so what was validated is what runs.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from shared.datasets import DatasetSpec
from shared.errors import AlreadyExists, InvalidArgument, NotFound
from shared.optim import Optimizer, wire

T = TypeVar("T")

#: Where a job or deployment belongs when no tenant is known (as ``shared.security.access.DEFAULT_TENANT``,
#: which a core cannot import: that module depends on protobuf).
DEFAULT_TENANT = "default"

#: Codec options that are integers (options travel as doubles).
INT_CODEC_OPTIONS = ("bucket_size",)


class JobState(enum.StrEnum):
    """A job's life: QUEUED -> PLACING -> RUNNING -> SUCCEEDED | FAILED | CANCELLED.

    A runner may send a job back from PLACING/RUNNING to QUEUED (requeued, e.g. placement timed out) or
    from RUNNING to PLACING (re-placing after a failure). Preemption stores PREEMPTED (its shards are
    checkpointed, its gang released), then QUEUED; admitted again, it resumes from that checkpoint.
    Terminal states never change again.
    """

    QUEUED = "QUEUED"
    PLACING = "PLACING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    PREEMPTED = "PREEMPTED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def active(self) -> bool:
        """Placed, running or being preempted: holds its gang's resources."""
        return self in ACTIVE_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE_STATES = frozenset({JobState.PLACING, JobState.RUNNING, JobState.PREEMPTED})
#: What preemption may interrupt.
PREEMPTIBLE_STATES = frozenset({JobState.PLACING, JobState.RUNNING})
LIVE_STATES = frozenset({JobState.QUEUED, *ACTIVE_STATES})


@dataclass(frozen=True)
class ResourceRequest:
    """Resources of one worker or shard: logical CPUs and GPUs (fractions allowed), memory (0: unset)."""

    cpus: float = 0.0
    gpus: float = 0.0
    memory_bytes: int = 0


@dataclass(frozen=True)
class OptimizerSpec:
    """The parameter servers' optimizer, as on the wire (flat doubles).

    ``beta1``/``beta2`` make Adam's ``betas``; ``nesterov``, ``amsgrad`` and ``decoupled_weight_decay`` are
    0 or 1; an empty ``schedule`` is a constant rate.
    """

    name: str = "sgd"
    hyperparameters: dict[str, float] = field(default_factory=dict)
    schedule: str = ""
    schedule_arguments: dict[str, float] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        """The hyperparameters as :func:`shared.optim.make_optimizer` keyword arguments.

        Raises:
            InvalidArgument: If a boolean hyperparameter is not 0 or 1 (field ``hyperparameters.<name>``).
        """
        return wire.optimizer_arguments(self.hyperparameters)

    def schedule_config(self) -> dict[str, Any] | None:
        """A :func:`shared.optim.make_schedule` config (None: a constant rate).

        Raises:
            InvalidArgument: On arguments without a schedule (field ``schedule_arguments``).
        """
        return wire.schedule_config(self.schedule, self.schedule_arguments)

    def make(self) -> Optimizer:
        """The validated optimizer (raises InvalidArgument as :func:`shared.optim.make_optimizer`)."""
        return wire.build_optimizer(self.name, self.hyperparameters, self.schedule, self.schedule_arguments)


@dataclass(frozen=True)
class TrainingJobSpec:
    """What to train, on what, how, and where the result goes (the ``TrainingJobSpec`` message).

    ``dataset`` is :class:`shared.datasets.DatasetSpec` itself (its split ``seed`` is 0: the wire has none),
    so a runner passes it straight to :func:`shared.datasets.load`.
    """

    architecture: str
    arguments_json: str = "{}"
    dataset: DatasetSpec = field(default_factory=lambda: DatasetSpec(name=""))
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    batch_size: int = 0
    epochs: int = 0
    workers: int = 0
    shards: int = 0
    consistency: str = "bsp"
    staleness: int = 0
    codec: str = "none"
    codec_options: dict[str, float] = field(default_factory=dict)
    checkpoint_interval: int = 0
    priority: int = 0
    tenant: str = DEFAULT_TENANT
    target_model: str = ""
    worker_resources: ResourceRequest = field(default_factory=ResourceRequest)
    shard_resources: ResourceRequest = field(default_factory=ResourceRequest)
    seed: int = 0
    max_failures: int = 0
    #: The priority class its priority came from ("" before classes existed, or set by an admin directly).
    priority_class: str = ""

    def arguments(self) -> dict[str, Any]:
        """The architecture's arguments parsed from ``arguments_json`` ("" is ``{}``).

        Raises:
            InvalidArgument: If it is not a JSON object (field ``arguments_json``).
        """
        if not self.arguments_json.strip():
            return {}
        try:
            arguments = json.loads(self.arguments_json)
        except (ValueError, RecursionError) as exc:
            # ValueError also covers integers beyond Python's digit limit; RecursionError, deep nesting.
            raise InvalidArgument.field("arguments_json", f"is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(arguments, dict):
            raise InvalidArgument.field("arguments_json", "must be a JSON object")
        return arguments

    def codec_kwargs(self) -> dict[str, Any]:
        """``codec_options`` as :func:`shared.compression.get_codec` keyword arguments (integral ints)."""
        options = self.codec_options
        return {name: wire.integral(value) if name in INT_CODEC_OPTIONS else value for name, value in options.items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what the job store keeps); :meth:`from_dict` reverses it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingJobSpec:
        values = dict(data)
        values["dataset"] = DatasetSpec(**values["dataset"])
        values["optimizer"] = OptimizerSpec(**values["optimizer"])
        values["worker_resources"] = ResourceRequest(**values["worker_resources"])
        values["shard_resources"] = ResourceRequest(**values["shard_resources"])
        return cls(**values)


@dataclass(frozen=True)
class StepMetrics:
    """One worker's report after finishing step ``step`` (0-based) of its share."""

    worker: int
    step: int
    loss: float
    samples_per_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(frozen=True)
class Job:
    """A training job as stored.

    Attributes:
        id: ``job-<16 hex>``.
        spec: The normalised spec.
        state: Where it is in its life.
        message: Why it is in its state (failure reason, why it was requeued, ...).
        step: Steps completed by the furthest worker (every worker runs ``total_steps``).
        total_steps: ``epochs * steps_per_epoch`` (see ``core.validation.steps_per_epoch``).
        metrics: Latest job metrics (``loss``, ``samples_per_s``, ``bytes_per_step``), at the end the
            runner's final ones (accuracy and loss on held-out data).
        model_version: The registry version holding the result (0 until SUCCEEDED).
        dataset_fingerprint: Content fingerprint of the dataset, from submit-time validation.
        failures: Worker or shard failures counted so far.
        revision: Incremented by every stored change; orders snapshots of one job.
        request_id: The client's id of the submission that created it ("": none); unique per tenant.
        placement_attempts: Placements that timed out in a row (back to 0 once the job runs).
        trace_context: The W3C ``traceparent`` of the submission ("": none): the job's run, however much
            later and in whichever scheduler process, continues that trace.
    """

    id: str
    spec: TrainingJobSpec
    state: JobState
    create_time: datetime
    update_time: datetime
    message: str = ""
    step: int = 0
    total_steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    model_version: int = 0
    dataset_fingerprint: str = ""
    failures: int = 0
    revision: int = 0
    #: Times it was preempted (a preempted job resumes from its checkpoint when admitted again).
    preemptions: int = 0
    #: A QUEUED job's place in the admission order as of the last pass (1: next); 0 otherwise. Not stored.
    queue_position: int = 0
    request_id: str = ""
    placement_attempts: int = 0
    trace_context: str = ""


def job_not_found(job_id: str) -> NotFound:
    """The error for a job that does not exist, and for one of another tenant: the same words, so that a
    caller cannot tell the two apart."""
    return NotFound(f"job {job_id!r} not found", reason="JOB_NOT_FOUND")


#: Longest client request id (the ``request_id`` columns hold 128 characters).
MAX_REQUEST_ID = 128
#: How many differing fields an idempotency conflict names (the rest are counted).
_MAX_NAMED_DIFFERENCES = 5


def check_request_id(value: str, field_name: str = "request_id") -> str:
    """A client request id as given: empty (none) or 1-128 printable ASCII characters.

    Raises:
        InvalidArgument: Naming ``field_name`` otherwise.
    """
    if len(value) > MAX_REQUEST_ID or not all(" " <= c <= "~" for c in value):
        raise InvalidArgument.field(
            field_name, f"must be at most {MAX_REQUEST_ID} printable ASCII characters (empty: none)"
        )
    return value


def _differences(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        found: list[str] = []
        for key in sorted({*old, *new}, key=str):
            found += _differences(old.get(key), new.get(key), f"{path}.{key}")
        return found
    return [] if old == new else [path]


def request_conflict(
    kind: str, ident: str, request_id: str, stored: Mapping[str, Any], sent: Mapping[str, Any]
) -> AlreadyExists | None:
    """The error for a request id reused with another spec, or None when the normalised specs agree.

    ``stored`` and ``sent`` are the specs' ``to_dict()``; both go through JSON first, as the stored one
    did, so that a tuple and the list it was stored as compare equal.
    """
    fields = _differences(json.loads(json.dumps(stored)), json.loads(json.dumps(sent)), "spec")
    if not fields:
        return None
    named = ", ".join(fields[:_MAX_NAMED_DIFFERENCES])
    if len(fields) > _MAX_NAMED_DIFFERENCES:
        named += f" and {len(fields) - _MAX_NAMED_DIFFERENCES} more"
    return AlreadyExists(
        f"request_id {request_id!r} already created {kind} {ident} with a different spec ({named} differ); "
        "use a new request_id for a new request",
        reason="REQUEST_ID_REUSED",
        metadata={"request_id": request_id, kind: ident},
    )


def visible_to(tenant: str, scope: str | None) -> bool:
    """Whether a resource of ``tenant`` is visible to a caller whose scope is ``scope`` (None: every tenant)."""
    return scope is None or tenant == scope


@dataclass(frozen=True)
class JobChanges:
    """A partial update of a stored job: None leaves a field as it is."""

    state: JobState | None = None
    message: str | None = None
    step: int | None = None
    metrics: dict[str, float] | None = None
    model_version: int | None = None
    #: Count one more preemption.
    preempted: bool = False
    placement_attempts: int | None = None


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str = ""
