"""The optimizer as it travels (flat doubles) -> :func:`make_optimizer` and :func:`make_schedule` arguments.

One home for the translation: the scheduler validates a job's optimizer with it at submit time and every
parameter-server shard builds its optimizer with it, so what was accepted is exactly what runs.

On the wire ``beta1``/``beta2`` make Adam's ``betas`` (a missing one takes torch's default); ``nesterov``,
``amsgrad`` and ``decoupled_weight_decay`` are 0 or 1; schedule step counts are integral doubles; an empty
schedule name is a constant rate. Errors name the offending field as the caller spells it (``field``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from shared.errors import InvalidArgument
from shared.optim.optimizers import Optimizer, make_optimizer

__all__ = [
    "BOOL_HYPERPARAMETERS",
    "INT_SCHEDULE_ARGUMENTS",
    "build_optimizer",
    "integral",
    "optimizer_arguments",
    "schedule_config",
]

#: Hyperparameters that are booleans (0 or 1 on the wire).
BOOL_HYPERPARAMETERS = ("nesterov", "amsgrad", "decoupled_weight_decay")
#: Adam's betas when the wire gives only one of them.
DEFAULT_BETAS = (0.9, 0.999)
#: Schedule arguments that are step counts (integers) for make_schedule.
INT_SCHEDULE_ARGUMENTS = ("step_size", "total_steps", "warmup_steps")


def integral(value: float) -> int | float:
    """A whole double as an int (step counts travel as doubles)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def optimizer_arguments(
    hyperparameters: Mapping[str, float], field: Callable[[str], str] = lambda name: f"hyperparameters.{name}"
) -> dict[str, Any]:
    """Wire hyperparameters as :func:`make_optimizer` keyword arguments.

    Raises:
        InvalidArgument: If a boolean hyperparameter is not 0 or 1 (field ``field(name)``).
    """
    kwargs: dict[str, Any] = {}
    for name, value in hyperparameters.items():
        if name in BOOL_HYPERPARAMETERS:
            if value not in (0, 1):
                raise InvalidArgument.field(field(name), f"must be 0 or 1, got {value!r}")
            kwargs[name] = bool(value)
        elif name not in ("beta1", "beta2"):
            kwargs[name] = value
    if "beta1" in hyperparameters or "beta2" in hyperparameters:
        kwargs["betas"] = (
            hyperparameters.get("beta1", DEFAULT_BETAS[0]),
            hyperparameters.get("beta2", DEFAULT_BETAS[1]),
        )
    return kwargs


def schedule_config(
    kind: str, arguments: Mapping[str, float], field: str = "schedule_arguments"
) -> dict[str, Any] | None:
    """A :func:`make_schedule` config for the wire's schedule name and flat arguments (None: constant rate).

    Raises:
        InvalidArgument: On arguments without a schedule, or a ``kind`` among them (field ``field``).
    """
    if not kind:
        if arguments:
            raise InvalidArgument.field(field, "given without a schedule")
        return None
    if "kind" in arguments:
        raise InvalidArgument.field(field, "'kind' is the schedule field")
    params: dict[str, Any] = {
        name: integral(value) if name in INT_SCHEDULE_ARGUMENTS else value for name, value in arguments.items()
    }
    return {**params, "kind": kind}


def build_optimizer(
    name: str,
    hyperparameters: Mapping[str, float],
    schedule: str,
    schedule_arguments: Mapping[str, float],
    *,
    field_prefix: str = "",
) -> Optimizer:
    """The optimizer the wire describes, validated (InvalidArgument as :func:`make_optimizer`; fields of the
    hyperparameters and schedule arguments are named under ``field_prefix``)."""
    config = schedule_config(schedule, schedule_arguments, f"{field_prefix}schedule_arguments")
    kwargs = optimizer_arguments(hyperparameters, lambda n: f"{field_prefix}hyperparameters.{n}")
    return make_optimizer(name, schedule=config, **kwargs)
