"""Learning-rate schedules: pure functions of the base rate and the training step.

A schedule holds no state, so a restored shard needs only the step to resume the same rates. Step ``t``
is 0-based: the rate for the ``t``-th optimizer step, matching torch's ``LRScheduler`` when
``scheduler.step()`` follows every ``optimizer.step()``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from shared.errors import InvalidArgument

__all__ = ["Constant", "Cosine", "Schedule", "StepDecay", "Warmup", "make_schedule", "schedule_from_config"]


class Schedule(ABC):
    """Maps (base learning rate, step) to the learning rate used at that step."""

    kind: ClassVar[str]

    @abstractmethod
    def lr(self, base_lr: float, step: int) -> float:
        """The learning rate for 0-based step ``step``."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """A JSON-able description that :func:`schedule_from_config` turns back into this schedule."""


@dataclass(frozen=True)
class Constant(Schedule):
    """Always the base rate."""

    kind: ClassVar[str] = "constant"

    def lr(self, base_lr: float, step: int) -> float:
        return base_lr

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind}


@dataclass(frozen=True)
class StepDecay(Schedule):
    """``base * gamma ** (step // step_size)`` (torch ``StepLR``)."""

    step_size: int
    gamma: float = 0.1
    kind: ClassVar[str] = "step"

    def lr(self, base_lr: float, step: int) -> float:
        return base_lr * self.gamma ** (step // self.step_size)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "step_size": self.step_size, "gamma": self.gamma}


@dataclass(frozen=True)
class Cosine(Schedule):
    """Half a cosine from the base rate down to ``min_lr`` over ``total_steps``, then ``min_lr``.

    Equals torch ``CosineAnnealingLR(T_max=total_steps, eta_min=min_lr)`` up to rounding for
    ``step <= total_steps``; afterwards torch climbs back up, which a training run never wants.
    """

    total_steps: int
    min_lr: float = 0.0
    kind: ClassVar[str] = "cosine"

    def lr(self, base_lr: float, step: int) -> float:
        progress = min(step, self.total_steps) / self.total_steps
        return self.min_lr + (base_lr - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "total_steps": self.total_steps, "min_lr": self.min_lr}


@dataclass(frozen=True)
class Warmup(Schedule):
    """Linear warmup over ``warmup_steps``, then ``inner`` with its clock starting at 0.

    Step ``t < warmup_steps`` uses ``inner.lr(base, 0) * (t + 1) / warmup_steps``: the first step
    already moves (a zero rate would waste it) and the last warmup step reaches the full rate.
    """

    warmup_steps: int
    inner: Schedule
    kind: ClassVar[str] = "warmup"

    def lr(self, base_lr: float, step: int) -> float:
        if step < self.warmup_steps:
            return self.inner.lr(base_lr, 0) * (step + 1) / self.warmup_steps
        return self.inner.lr(base_lr, step - self.warmup_steps)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "warmup_steps": self.warmup_steps, "inner": self.inner.config()}


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument.field(name, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _float(name: str, value: Any, minimum: float, maximum: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not minimum <= value <= maximum:
        raise InvalidArgument.field(name, f"must be a number in [{minimum}, {maximum}], got {value!r}")
    if not math.isfinite(value):
        raise InvalidArgument.field(name, f"must be finite, got {value!r}")
    return float(value)


def make_schedule(kind: str = "constant", **params: Any) -> Schedule:
    """Builds a validated schedule.

    Args:
        kind: ``constant``, ``step`` (``step_size``, ``gamma``), ``cosine`` (``total_steps``,
            ``min_lr``) or ``warmup`` (``warmup_steps``, ``inner``: a :class:`Schedule` or a config
            mapping; constant if omitted).
        **params: The kind's parameters.

    Raises:
        InvalidArgument: On an unknown kind, unknown or missing parameter, or a value out of range.
    """
    allowed = {"constant": set(), "step": {"step_size", "gamma"}, "cosine": {"total_steps", "min_lr"}}
    allowed["warmup"] = {"warmup_steps", "inner"}
    if kind not in allowed:
        raise InvalidArgument.field("schedule.kind", f"unknown schedule {kind!r}; expected one of {sorted(allowed)}")
    unknown = sorted(set(params) - allowed[kind])
    if unknown:
        raise InvalidArgument.field("schedule", f"unknown parameters {unknown} for a {kind} schedule")
    required = {"step": "step_size", "cosine": "total_steps", "warmup": "warmup_steps"}.get(kind)
    if required is not None and required not in params:
        raise InvalidArgument.field(f"schedule.{required}", f"required for a {kind} schedule")
    if kind == "step":
        return StepDecay(
            _int("schedule.step_size", params["step_size"], 1), _float("schedule.gamma", params.get("gamma", 0.1), 0.0)
        )
    if kind == "cosine":
        return Cosine(
            _int("schedule.total_steps", params["total_steps"], 1),
            _float("schedule.min_lr", params.get("min_lr", 0.0), 0.0),
        )
    if kind == "warmup":
        inner = params.get("inner")
        if inner is None:
            inner = Constant()
        elif isinstance(inner, Mapping):
            inner = schedule_from_config(inner)
        elif not isinstance(inner, Schedule):
            raise InvalidArgument.field("schedule.inner", "must be a schedule or a schedule config")
        return Warmup(_int("schedule.warmup_steps", params["warmup_steps"], 1), inner)
    return Constant()


def schedule_from_config(config: Mapping[str, Any]) -> Schedule:
    """The inverse of :meth:`Schedule.config` (validated like :func:`make_schedule`)."""
    params = dict(config)
    kind = params.pop("kind", "constant")
    if not isinstance(kind, str):
        raise InvalidArgument.field("schedule.kind", f"must be a string, got {kind!r}")
    return make_schedule(kind, **params)
