"""Submit-time validation of a training job: everything knowable before any worker starts.

:func:`validate_spec` checks every field (raising :class:`~shared.errors.InvalidArgument` whose field names
the request path, e.g. ``spec.workers``, ``spec.dataset.options.path``, ``spec.optimizer.hyperparameters.lr``),
builds the model on the meta device to plan its shards, validates the dataset against the architecture
(reading a user file in full, confined to the data root), builds the optimizer and the codec, and returns the
normalised spec with the dataset's size and fingerprint.

Defaults filled in (the wire's zero values): ``arguments_json`` "" -> "{}"; ``dataset.validation_fraction``
0 -> 0.2; ``optimizer.name`` "" -> "sgd"; ``consistency`` "" -> "bsp"; ``codec`` "" -> "none"; ``tenant``
"" -> "default"; ``max_failures`` 0 -> the scheduler's default. ``batch_size``, ``epochs``, ``workers`` and
``shards`` have no default: 0 is invalid.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.scheduler.core.jobs.model import DEFAULT_TENANT, OptimizerSpec, ResourceRequest, TrainingJobSpec
from shared import names
from shared.artifacts import ArtifactError, Manifest, build_model, get_architecture, zoo_max_elements
from shared.compression import CODECS, get_codec
from shared.datasets import DatasetInfo, validate
from shared.errors import FieldViolation, InvalidArgument
from shared.sharding import plan_for_state

CONSISTENCY_MODES = ("bsp", "asp", "ssp")
MAX_PRIORITY = 1000
DEFAULT_VALIDATION_FRACTION = 0.2
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class ValidatedSpec:
    """A normalised spec and what validating it learnt."""

    spec: TrainingJobSpec
    dataset: DatasetInfo
    steps_per_epoch: int
    total_steps: int


def steps_per_epoch(num_train: int, workers: int, batch_size: int) -> int:
    """Steps each worker runs per epoch: ``max(1, (num_train // workers) // batch_size)``.

    Every worker gets an equal share of ``num_train // workers`` samples (the remainder is left out of
    that epoch) and runs the same number of full batches, so synchronous (BSP) steps line up; a share
    smaller than one batch still makes one (short) step.
    """
    return max(1, (num_train // workers) // batch_size)


def _renamed(exc: InvalidArgument, rename: Callable[[str], str]) -> InvalidArgument:
    """``exc`` with its field names rewritten to request paths."""
    violations = [FieldViolation(rename(v.field), v.description) for v in exc.violations]
    if not violations:
        violations = [FieldViolation(rename(""), exc.message)]
    first = violations[0]
    return InvalidArgument(f"{first.field}: {first.description}", reason=exc.reason, violations=violations)


def _prefix(prefix: str) -> Callable[[str], str]:
    return lambda name: f"{prefix}.{name}" if name else prefix


def _dataset_field(name: str) -> str:
    # shared.datasets names "dataset.*", "architecture" and "arguments*".
    if name.startswith("arguments"):
        return "spec.arguments_json" + name[len("arguments") :]
    return f"spec.{name}" if name else "spec.dataset"


def _optimizer_field(name: str) -> str:
    # make_optimizer/make_schedule name "optimizer", "hparams", a hyperparameter, or "schedule[.x]".
    if name in ("", "optimizer"):
        return "spec.optimizer.name"
    if name == "hparams":
        return "spec.optimizer.hyperparameters"
    if name == "schedule.kind":
        return "spec.optimizer.schedule"
    if name.startswith("schedule"):
        return "spec.optimizer.schedule_arguments" + name[len("schedule") :]
    if name.startswith(("hyperparameters", "schedule_arguments")):
        return f"spec.optimizer.{name}"
    base = name.split("[", 1)[0]
    if base == "betas":
        return "spec.optimizer.hyperparameters.beta" + ("2" if name.endswith("[1]") else "1")
    return f"spec.optimizer.hyperparameters.{base}"


def _int_range(field: str, value: int, minimum: int, maximum: int = _INT32_MAX) -> None:
    if not minimum <= value <= maximum:
        bound = f">= {minimum}" if maximum == _INT32_MAX else f"in [{minimum}, {maximum}]"
        raise InvalidArgument.field(field, f"must be {bound}, got {value}")


def _resources(field: str, request: ResourceRequest) -> None:
    for name in ("cpus", "gpus"):
        value = getattr(request, name)
        if not math.isfinite(value) or value < 0:
            raise InvalidArgument.field(f"{field}.{name}", f"must be a finite number >= 0, got {value!r}")
    if request.memory_bytes < 0:
        raise InvalidArgument.field(f"{field}.memory_bytes", f"must be >= 0, got {request.memory_bytes}")


def _normalised(spec: TrainingJobSpec, default_max_failures: int) -> TrainingJobSpec:
    dataset = spec.dataset
    if not dataset.validation_fraction:
        dataset = dataclasses.replace(dataset, validation_fraction=DEFAULT_VALIDATION_FRACTION)
    return dataclasses.replace(
        spec,
        arguments_json=spec.arguments_json if spec.arguments_json.strip() else "{}",
        dataset=dataset,
        optimizer=dataclasses.replace(spec.optimizer, name=spec.optimizer.name or "sgd"),
        consistency=spec.consistency or "bsp",
        codec=spec.codec or "none",
        tenant=spec.tenant or DEFAULT_TENANT,
        max_failures=spec.max_failures or default_max_failures,
    )


def _check_scalars(spec: TrainingJobSpec) -> None:
    """The fields that need nothing but themselves."""
    if not spec.architecture:
        raise InvalidArgument.field("spec.architecture", "must name a zoo architecture")
    names.check_name(spec.target_model, "spec.target_model")
    names.check_name(spec.tenant, "spec.tenant")
    _int_range("spec.batch_size", spec.batch_size, 1)
    _int_range("spec.epochs", spec.epochs, 1)
    _int_range("spec.workers", spec.workers, 1)
    _int_range("spec.shards", spec.shards, 1)
    if spec.consistency not in CONSISTENCY_MODES:
        raise InvalidArgument.field(
            "spec.consistency", f"unknown consistency {spec.consistency!r}; expected one of {list(CONSISTENCY_MODES)}"
        )
    _int_range("spec.staleness", spec.staleness, 0)
    if spec.consistency == "ssp" and spec.staleness < 1:
        raise InvalidArgument.field("spec.staleness", "ssp needs a staleness bound >= 1")
    if spec.consistency != "ssp" and spec.staleness:
        raise InvalidArgument.field(
            "spec.staleness", f"only applies to ssp, got {spec.staleness} for {spec.consistency}"
        )
    _int_range("spec.checkpoint_interval", spec.checkpoint_interval, 0)
    _int_range("spec.priority", spec.priority, -MAX_PRIORITY, MAX_PRIORITY)
    _int_range("spec.max_failures", spec.max_failures, 0)
    _resources("spec.worker_resources", spec.worker_resources)
    _resources("spec.shard_resources", spec.shard_resources)


def _check_model(spec: TrainingJobSpec) -> None:
    """Architecture, arguments, model size, and the shard plan (on a meta-device model: no memory)."""
    try:
        arguments = spec.arguments()
    except InvalidArgument as exc:
        raise _renamed(exc, _prefix("spec")) from None
    try:
        canonical = json.dumps(arguments, sort_keys=True)
    except (TypeError, ValueError):
        raise InvalidArgument.field("spec.arguments_json", "must be plain JSON") from None
    _check_built_model(spec.architecture, canonical, spec.shards, zoo_max_elements())


@functools.lru_cache(maxsize=256)
def _check_built_model(architecture: str, arguments_json: str, shards: int, limit: int) -> None:
    """:func:`_check_model` once per distinct model: building even a meta-device model was a large share of
    a submission's time, and a queue of thousands of jobs repeats a handful of models. Refusals are not
    cached (an exception leaves no entry)."""
    arguments = json.loads(arguments_json)
    try:
        get_architecture(architecture)
    except ArtifactError as exc:
        raise InvalidArgument.field("spec.architecture", str(exc)) from None
    try:
        manifest = Manifest.for_model(architecture, arguments)
        state = build_model(manifest, "meta").state_dict()
    except ArtifactError as exc:
        raise InvalidArgument.field("spec.arguments_json", str(exc)) from None
    elements = sum(t.numel() for t in state.values() if t.is_floating_point())
    if elements > limit:
        raise InvalidArgument.field(
            "spec.arguments_json", f"the model has {elements:,} weights, more than the limit of {limit:,}"
        )
    try:
        plan_for_state(state, shards)
    except InvalidArgument as exc:
        detail = exc.violations[0].description if exc.violations else str(exc)
        raise InvalidArgument.field("spec.shards", detail) from None


def _check_optimizer(optimizer: OptimizerSpec) -> None:
    try:
        optimizer.make()
    except InvalidArgument as exc:
        raise _renamed(exc, _optimizer_field) from None


def _check_codec(spec: TrainingJobSpec) -> None:
    if spec.codec not in CODECS:
        raise InvalidArgument.field("spec.codec", f"unknown codec {spec.codec!r}; known codecs: {', '.join(CODECS)}")
    for name, value in spec.codec_options.items():
        if not math.isfinite(value):
            raise InvalidArgument.field(f"spec.codec_options.{name}", f"must be finite, got {value!r}")
    try:
        get_codec(spec.codec, **spec.codec_kwargs())
    except ValueError as exc:
        raise InvalidArgument.field("spec.codec_options", str(exc)) from None


def validate_spec(spec: TrainingJobSpec, *, data_root: Path, default_max_failures: int) -> ValidatedSpec:
    """Normalise and check ``spec`` (blocking: run it in a thread).

    Raises:
        InvalidArgument: Naming the first offending field.
        FailedPrecondition: If a built-in dataset's dependency is missing on this machine.
    """
    spec = _normalised(spec, default_max_failures)
    _check_scalars(spec)
    _check_model(spec)
    _check_optimizer(spec.optimizer)
    _check_codec(spec)
    try:
        info = validate(spec.dataset, spec.architecture, spec.arguments(), data_root=data_root)
    except InvalidArgument as exc:
        raise _renamed(exc, _dataset_field) from None
    if spec.workers > info.num_train:
        raise InvalidArgument.field(
            "spec.workers", f"{spec.workers} workers for {info.num_train} training samples: each needs at least one"
        )
    per_epoch = steps_per_epoch(info.num_train, spec.workers, spec.batch_size)
    return ValidatedSpec(spec=spec, dataset=info, steps_per_epoch=per_epoch, total_steps=spec.epochs * per_epoch)
