"""Server-side optimizers over flat float32 pieces, with torch.optim's exact update rules.

A shard updates each piece key independently; per-key state (momentum buffers, Adam moments and step
counts) lives here, so every piece is updated exactly as torch would update that slice of the whole
tensor (both are elementwise). The arithmetic mirrors torch's single-tensor (``foreach=False``) code
path operation for operation, which is what makes results agree bit for bit on CPU.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from shared.errors import InvalidArgument
from shared.optim.schedules import Constant, Schedule, schedule_from_config

__all__ = ["SGD", "Adam", "Optimizer", "OptimizerState", "make_optimizer", "optimizer_from_config"]


@dataclass
class OptimizerState:
    """An optimizer's state in checkpointable form.

    Attributes:
        tensors: ``"<piece key>/<slot>"`` -> tensor (e.g. ``"fc.weight#0/exp_avg"``).
        steps: Piece key -> how many updates that key has had.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)


class Optimizer(ABC):
    """Updates pieces in place; subclasses define the rule and its per-key state slots."""

    name: ClassVar[str]
    slots: ClassVar[tuple[str, ...]]

    def __init__(self, lr: float, schedule: Schedule) -> None:
        self.lr = lr
        self.schedule = schedule
        self._state: dict[str, dict[str, torch.Tensor]] = {}
        self._steps: dict[str, int] = {}

    def lr_at(self, step: int) -> float:
        """The learning rate for 0-based training step ``step``."""
        return self.schedule.lr(self.lr, step)

    def update(self, key: str, param: torch.Tensor, grad: torch.Tensor, *, step: int) -> None:
        """Applies one gradient to ``param`` in place.

        Args:
            key: The piece's key (selects its state).
            param: The flat float32 piece.
            grad: Its gradient, same size; never modified.
            step: The training step, which picks the scheduled learning rate.
        """
        count = self._steps.get(key, 0) + 1
        self._steps[key] = count
        self._update(self._state.setdefault(key, {}), param, grad, self.lr_at(step), count)

    @abstractmethod
    def _update(
        self, state: dict[str, torch.Tensor], param: torch.Tensor, grad: torch.Tensor, lr: float, count: int
    ) -> None: ...

    @abstractmethod
    def hparams(self) -> dict[str, Any]:
        """The hyperparameters, as ``make_optimizer`` keyword arguments."""

    def config(self) -> dict[str, Any]:
        """A JSON-able description from which :func:`optimizer_from_config` rebuilds this optimizer."""
        return {"name": self.name, "hparams": self.hparams(), "schedule": self.schedule.config()}

    def export_state(self) -> OptimizerState:
        """A copy of all per-key state, detached from the live tensors."""
        tensors = {f"{key}/{slot}": t.clone() for key, slots in self._state.items() for slot, t in slots.items()}
        return OptimizerState(tensors=tensors, steps=dict(self._steps))

    def import_state(self, state: OptimizerState) -> None:
        """Replaces all per-key state with (copies of) ``state``.

        Raises:
            InvalidArgument: On an unknown slot, a non-float32 or non-flat tensor, or a bad step count.
        """
        slots: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in state.tensors.items():
            key, _, slot = name.rpartition("/")
            if not key or slot not in self.slots:
                raise InvalidArgument.field("optimizer_state", f"unknown {self.name} state entry {name!r}")
            if tensor.dtype != torch.float32 or tensor.dim() != 1:
                raise InvalidArgument.field("optimizer_state", f"{name!r} must be a flat float32 tensor")
            slots.setdefault(key, {})[slot] = tensor.clone()
        for key, count in state.steps.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise InvalidArgument.field("optimizer_state", f"step count of {key!r} must be >= 0, got {count!r}")
        self._state = slots
        self._steps = dict(state.steps)

    def steps(self) -> dict[str, int]:
        """Piece key -> number of updates applied."""
        return dict(self._steps)


class SGD(Optimizer):
    """torch.optim.SGD: weight decay, (Nesterov) momentum with dampening."""

    name = "sgd"
    slots = ("momentum_buffer",)

    def __init__(
        self, lr: float, schedule: Schedule, *, momentum: float, dampening: float, nesterov: bool, weight_decay: float
    ) -> None:
        super().__init__(lr, schedule)
        self.momentum, self.dampening, self.nesterov, self.weight_decay = momentum, dampening, nesterov, weight_decay

    def _update(
        self, state: dict[str, torch.Tensor], param: torch.Tensor, grad: torch.Tensor, lr: float, count: int
    ) -> None:
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)
        if self.momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                # Like torch: the first step seeds the buffer with the gradient itself (no dampening).
                buf = state["momentum_buffer"] = grad.detach().clone()
            else:
                buf.mul_(self.momentum).add_(grad, alpha=1 - self.dampening)
            grad = grad.add(buf, alpha=self.momentum) if self.nesterov else buf
        param.add_(grad, alpha=-lr)

    def hparams(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "dampening": self.dampening,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
        }


class Adam(Optimizer):
    """torch.optim.Adam, and AdamW when ``decoupled_weight_decay`` is set."""

    name = "adam"
    slots = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(
        self,
        lr: float,
        schedule: Schedule,
        *,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        amsgrad: bool,
        decoupled_weight_decay: bool,
    ) -> None:
        super().__init__(lr, schedule)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.amsgrad, self.decoupled_weight_decay = amsgrad, decoupled_weight_decay

    def _update(
        self, state: dict[str, torch.Tensor], param: torch.Tensor, grad: torch.Tensor, lr: float, count: int
    ) -> None:
        beta1, beta2 = self.betas
        if not state:
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
            if self.amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(param)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if self.weight_decay != 0:
            if self.decoupled_weight_decay:
                param.mul_(1 - lr * self.weight_decay)
            else:
                grad = grad.add(param, alpha=self.weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # torch keeps the step as a float32 tensor and reads it back as a Python float.
        step = float(count)
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        if self.amsgrad:
            max_sq = state["max_exp_avg_sq"]
            torch.maximum(max_sq, exp_avg_sq, out=max_sq)
            denom = (max_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)

    def hparams(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "betas": list(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "amsgrad": self.amsgrad,
            "decoupled_weight_decay": self.decoupled_weight_decay,
        }


def _num(name: str, value: Any, lo: float, hi: float = math.inf, *, hi_open: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or value < lo or value > hi or (hi_open and value == hi):
        bound = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
        raise InvalidArgument.field(name, f"must be a finite number in {bound}, got {value!r}")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument.field(name, f"must be a boolean, got {value!r}")
    return value


_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
    "adam": {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
        "decoupled_weight_decay": False,
    },
}
# AdamW is Adam with decoupled decay and torch's AdamW default decay.
_DEFAULTS["adamw"] = {**_DEFAULTS["adam"], "weight_decay": 1e-2, "decoupled_weight_decay": True}


def make_optimizer(name: str, *, schedule: Schedule | Mapping[str, Any] | None = None, **hparams: Any) -> Optimizer:
    """Builds a validated optimizer.

    Args:
        name: ``sgd``, ``adam`` or ``adamw`` (case-insensitive).
        schedule: A schedule, a schedule config (``{"kind": "cosine", "total_steps": 100}``), or None
            for a constant rate.
        **hparams: torch-named hyperparameters; omitted ones take torch's defaults.

    Raises:
        InvalidArgument: On an unknown optimizer or hyperparameter, or a value out of range.
    """
    key = name.lower() if isinstance(name, str) else ""
    if key not in _DEFAULTS:
        raise InvalidArgument.field("optimizer", f"unknown optimizer {name!r}; expected one of {sorted(_DEFAULTS)}")
    unknown = sorted(set(hparams) - set(_DEFAULTS[key]))
    if unknown:
        raise InvalidArgument.field("hparams", f"unknown {key} hyperparameters {unknown}")
    h = {**_DEFAULTS[key], **hparams}
    if schedule is None:
        sched: Schedule = Constant()
    elif isinstance(schedule, Schedule):
        sched = schedule
    elif isinstance(schedule, Mapping):
        sched = schedule_from_config(schedule)
    else:
        raise InvalidArgument.field("schedule", "must be a schedule or a schedule config")
    lr = _num("lr", h["lr"], 0.0)
    weight_decay = _num("weight_decay", h["weight_decay"], 0.0)
    if key == "sgd":
        momentum = _num("momentum", h["momentum"], 0.0, 1.0, hi_open=True)
        dampening = _num("dampening", h["dampening"], 0.0, 1.0)
        nesterov = _bool("nesterov", h["nesterov"])
        if nesterov and (momentum == 0 or dampening != 0):
            raise InvalidArgument.field("nesterov", "requires momentum > 0 and zero dampening")
        return SGD(lr, sched, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay)
    betas = h["betas"]
    if not isinstance(betas, list | tuple) or len(betas) != 2:
        raise InvalidArgument.field("betas", f"must be a pair of numbers, got {betas!r}")
    return Adam(
        lr,
        sched,
        betas=(_num("betas[0]", betas[0], 0.0, 1.0, hi_open=True), _num("betas[1]", betas[1], 0.0, 1.0, hi_open=True)),
        eps=_num("eps", h["eps"], 0.0),
        weight_decay=weight_decay,
        amsgrad=_bool("amsgrad", h["amsgrad"]),
        decoupled_weight_decay=_bool("decoupled_weight_decay", h["decoupled_weight_decay"]),
    )


def optimizer_from_config(config: Mapping[str, Any]) -> Optimizer:
    """The inverse of :meth:`Optimizer.config` (validated like :func:`make_optimizer`)."""
    hparams = config.get("hparams", {})
    if not isinstance(config.get("name"), str) or not isinstance(hparams, Mapping):
        raise InvalidArgument.field("optimizer", "config needs a string 'name' and an 'hparams' mapping")
    return make_optimizer(config["name"], schedule=config.get("schedule"), **hparams)
