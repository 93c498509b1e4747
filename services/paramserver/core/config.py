"""A shard's job configuration and what each shard call answers: the configuration validated (names,
counts, consistency mode, model, optimizer) before a shard is built, and where its checkpoint lives.

Kept apart from :class:`~services.paramserver.core.host.ShardHost` (the service): these are the types its
servicer converts to and from, and the checks are pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.paramserver.core.consistency import MODES
from shared.artifacts import ArtifactError, Manifest
from shared.errors import InvalidArgument
from shared.names import check_name
from shared.optim import wire
from shared.optim.optimizers import Optimizer

if TYPE_CHECKING:
    import torch

__all__ = [
    "CheckpointResult",
    "InitResult",
    "PullResult",
    "PushResult",
    "ShardConfig",
    "ShardStatus",
    "build_optimizer",
    "checkpoint_path",
    "describe_value",
    "validate",
]


@dataclass(frozen=True)
class ShardConfig:
    """One shard's view of a training job (the ``ShardConfig`` message, with parsed model arguments).

    Hyperparameters and schedule arguments are flat numbers as on the wire: ``beta1``/``beta2`` make
    Adam's ``betas``; ``nesterov``, ``amsgrad`` and ``decoupled_weight_decay`` are 0 or 1. An empty
    ``schedule`` is a constant rate; ``warmup`` warms up to a constant rate.
    """

    job_id: str
    shard_index: int
    num_shards: int
    num_workers: int
    consistency: str
    architecture: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    optimizer: str = "sgd"
    hyperparameters: Mapping[str, float] = field(default_factory=dict)
    schedule: str = ""
    schedule_arguments: Mapping[str, float] = field(default_factory=dict)
    staleness: int = 0
    checkpoint_dir: str = ""
    checkpoint_interval: int = 0
    max_piece_elements: int = 0


@dataclass(frozen=True)
class InitResult:
    restored: bool
    step: int
    incarnation: str
    keys: list[str]
    plan_fingerprint: str


@dataclass(frozen=True)
class PushResult:
    bytes_received: int
    duplicate: bool


@dataclass(frozen=True)
class PullResult:
    incarnation: str
    step: int
    #: Piece key -> (version, flat float32 copy) for every piece whose version the caller lacks.
    tensors: dict[str, tuple[int, torch.Tensor]]


@dataclass(frozen=True)
class CheckpointResult:
    step: int
    path: str


@dataclass(frozen=True)
class ShardStatus:
    job_id: str
    shard_index: int
    step: int
    worker_clocks: dict[int, int]
    parameters: int
    bytes_received: int
    last_checkpoint_step: int
    incarnation: str
    last_checkpoint_error: str | None = None


def describe_value(value: str) -> str:
    """A caller's string for an error message, quoted and cut to 64 characters."""
    return repr(value if len(value) <= 64 else value[:61] + "...")


def _int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument.field(name, f"must be an integer >= {minimum}, got {value!r}")
    return value


def build_optimizer(config: ShardConfig) -> Optimizer:
    """The config's optimizer, validated (the translation from the wire is ``shared.optim.wire``'s, the
    scheduler's too).

    Raises:
        InvalidArgument: On an unknown optimizer, schedule or hyperparameter, or a value out of range.
    """
    return wire.build_optimizer(
        config.optimizer,
        config.hyperparameters,
        config.schedule,
        config.schedule_arguments,
        field_prefix="config.optimizer.",
    )


def checkpoint_path(root: Path, config: ShardConfig) -> Path:
    """Where the shard's checkpoint lives: ``<checkpoint_dir>/<job_id>/shard-<index>.safetensors``.

    A relative (or empty) ``checkpoint_dir`` resolves inside ``root``; an absolute one must lie inside it
    too (a caller that could name any directory could make the shard read or overwrite any file it may).
    The job id is a validated name, so it adds one plain path component. Messages never show server paths.

    Raises:
        InvalidArgument: On a bad job id or a checkpoint_dir outside ``root`` or not normalised.
    """
    check_name(config.job_id, "config.job_id")
    raw = config.checkpoint_dir
    if "\x00" in raw:
        raise InvalidArgument.field("config.checkpoint_dir", "must not contain NUL characters")
    path = Path(raw)
    if ".." in path.parts:
        raise InvalidArgument.field("config.checkpoint_dir", f"{describe_value(raw)} must not contain '..'")
    top = root.resolve()
    base = (top / path).resolve()  # an absolute path replaces top
    if not base.is_relative_to(top):
        raise InvalidArgument.field(
            "config.checkpoint_dir", f"{describe_value(raw)} is outside this shard's checkpoint root"
        )
    return base / config.job_id / f"shard-{config.shard_index}.safetensors"


def validate(config: ShardConfig) -> tuple[Optimizer, Manifest]:
    check_name(config.job_id, "config.job_id")
    num_shards = _int("config.num_shards", config.num_shards, 1)
    index = _int("config.shard_index", config.shard_index, 0)
    if index >= num_shards:
        raise InvalidArgument.field("config.shard_index", f"must be in [0, {num_shards}), got {index}")
    _int("config.num_workers", config.num_workers, 1)
    if config.consistency not in MODES:
        raise InvalidArgument.field(
            "config.consistency", f"unknown consistency {config.consistency!r}; expected one of {list(MODES)}"
        )
    staleness = _int("config.staleness", config.staleness, 0)
    if config.consistency != "ssp" and staleness:
        raise InvalidArgument.field(
            "config.staleness", f"only applies to ssp, got {staleness} for {config.consistency}"
        )
    _int("config.checkpoint_interval", config.checkpoint_interval, 0)
    _int("config.max_piece_elements", config.max_piece_elements, 0)
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or not -(2**63) <= config.seed < 2**63:
        raise InvalidArgument.field("config.model.seed", f"must be a 64-bit integer, got {config.seed!r}")
    if not config.architecture:
        raise InvalidArgument.field("config.model.architecture", "must name a zoo architecture")
    if not isinstance(config.arguments, Mapping):
        raise InvalidArgument.field("config.model.arguments_json", "must be a JSON object")
    try:
        manifest = Manifest.for_model(config.architecture, dict(config.arguments))
    except ArtifactError as exc:
        raise InvalidArgument.field("config.model", str(exc)) from None
    try:
        optimizer = build_optimizer(config)
    except InvalidArgument as exc:
        # Name the config field: make_optimizer's messages name only the hyperparameter.
        raise InvalidArgument(f"config.optimizer: {exc.message}", violations=exc.violations) from None
    return optimizer, manifest
