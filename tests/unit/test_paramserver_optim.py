"""Server-side optimizers match torch.optim; schedules; validation; state export/import."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from services.paramserver.core.consistency import ConsistencyGate
from services.paramserver.core.shard import ShardState
from shared.errors import InvalidArgument
from shared.optim.optimizers import Optimizer, OptimizerState, make_optimizer, optimizer_from_config
from shared.optim.schedules import Constant, Cosine, StepDecay, Warmup, make_schedule
from shared.sharding import plan_shards

STEPS = 20


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 8, generator=gen), torch.randn(5, 4, generator=gen)) for _ in range(STEPS)]


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _torch_reference(
    make: Callable[[Any], torch.optim.Optimizer], scheduler: Callable | None
) -> dict[str, torch.Tensor]:
    model = _model()
    opt = make(model.parameters())
    sched = scheduler(opt) if scheduler else None
    for x, y in _batches():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if sched:
            sched.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


async def _parameter_server(make: Callable[[], Optimizer], num_shards: int = 3) -> dict[str, torch.Tensor]:
    """One worker training through ``num_shards`` BSP shards, pulling only what changed."""
    worker = _model()
    named = dict(worker.named_parameters())
    plan = plan_shards({n: tuple(p.shape) for n, p in named.items()}, num_shards)
    shards = [
        ShardState.from_plan(plan, i, {n: p.detach() for n, p in named.items()}, make(), ConsistencyGate("bsp", 1))
        for i in range(num_shards)
    ]
    cache: dict[str, tuple[int, torch.Tensor]] = {}
    for step, (x, y) in enumerate(_batches()):
        for shard in shards:
            cache.update(await shard.read(0, step, {k: v for k, (v, _) in cache.items() if k in shard.keys}))
        with torch.no_grad():
            for name, value in plan.join({k: t for k, (_, t) in cache.items()}).items():
                named[name].copy_(value)
        grads = _grads(worker, x, y)
        pieces = {k: t for name, g in grads.items() for k, t in plan.split(name, g).items()}
        for shard in shards:
            await shard.apply(0, step, {k: pieces[k] for k in shard.keys})
    return plan.join({k: t for shard in shards for k, t in shard.values().items()})


CASES = [
    (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=False),
        lambda: make_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=1e-2),
        None,
    ),
    (
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.1, foreach=False),
        lambda: make_optimizer("SGD", lr=0.05, momentum=0.8, dampening=0.1),
        None,
    ),
    (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=False),
        lambda: make_optimizer("sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        None,
    ),
    (
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, foreach=False),
        lambda: make_optimizer("adam", lr=1e-2, weight_decay=1e-2),
        None,
    ),
    (
        lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), amsgrad=True, foreach=False),
        lambda: make_optimizer("adam", lr=1e-2, betas=(0.8, 0.99), amsgrad=True),
        None,
    ),
    (
        lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False),
        lambda: make_optimizer("adamw", lr=1e-2),
        None,
    ),
    (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=False),
        lambda: make_optimizer("sgd", lr=0.1, momentum=0.9, schedule={"kind": "step", "step_size": 6, "gamma": 0.5}),
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=6, gamma=0.5),
    ),
    (
        lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
        lambda: make_optimizer("adam", lr=1e-2, schedule=Cosine(total_steps=STEPS, min_lr=1e-4)),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=1e-4),
    ),
]


@pytest.mark.parametrize(
    ("reference", "ours", "scheduler"),
    CASES,
    ids=[
        "sgd-momentum-wd",
        "sgd-dampening",
        "sgd-nesterov",
        "adam-wd",
        "adam-amsgrad",
        "adamw",
        "sgd-steplr",
        "adam-cosine",
    ],
)
async def test_matches_torch_optim_over_20_steps(reference, ours, scheduler) -> None:
    expected = _torch_reference(reference, scheduler)
    for num_shards in (1, 3):
        got = await _parameter_server(ours, num_shards)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6)


def test_schedules() -> None:
    assert Constant().lr(0.1, 1000) == 0.1
    step = StepDecay(step_size=3, gamma=0.5)
    assert [step.lr(1.0, t) for t in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    cosine = Cosine(total_steps=10, min_lr=0.1)
    assert cosine.lr(1.0, 0) == 1.0
    assert cosine.lr(1.0, 5) == pytest.approx(0.55)
    assert cosine.lr(1.0, 10) == pytest.approx(0.1)
    assert cosine.lr(1.0, 25) == pytest.approx(0.1)  # stays at the floor instead of climbing back
    warm = Warmup(warmup_steps=4, inner=cosine)
    assert [warm.lr(1.0, t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warm.lr(1.0, 4 + 5) == pytest.approx(cosine.lr(1.0, 5))
    assert Warmup(2, Constant()).lr(0.2, 50) == 0.2


def test_schedule_configs_round_trip() -> None:
    warm = make_schedule("warmup", warmup_steps=5, inner={"kind": "step", "step_size": 2, "gamma": 0.3})
    opt = make_optimizer("sgd", lr=0.5, schedule=warm)
    again = optimizer_from_config(opt.config())
    assert again.config() == opt.config()
    assert [again.lr_at(t) for t in range(12)] == [opt.lr_at(t) for t in range(12)]


@pytest.mark.parametrize(
    ("name", "hparams"),
    [
        ("rmsprop", {}),
        ("sgd", {"lr": -0.1}),
        ("sgd", {"lr": math.nan}),
        ("sgd", {"momentum": 1.0}),
        ("sgd", {"momentum": -0.1}),
        ("sgd", {"nesterov": True}),
        ("sgd", {"momentum": 0.9, "nesterov": True, "dampening": 0.1}),
        ("sgd", {"betas": (0.9, 0.99)}),
        ("sgd", {"weight_decay": -1}),
        ("sgd", {"lr": True}),
        ("adam", {"betas": (0.9,)}),
        ("adam", {"betas": (1.0, 0.99)}),
        ("adam", {"eps": -1e-8}),
        ("adam", {"amsgrad": 1}),
        ("adam", {"schedule": {"kind": "exponential"}}),
        ("adam", {"schedule": {"kind": "step"}}),
        ("adam", {"schedule": {"kind": "cosine", "total_steps": 0}}),
        ("adam", {"schedule": {"kind": "warmup", "warmup_steps": 3, "extra": 1}}),
        ("adam", {"schedule": "cosine"}),
    ],
)
def test_bad_hyperparameters_rejected(name: str, hparams: dict) -> None:
    with pytest.raises(InvalidArgument):
        make_optimizer(name, **hparams)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_state_export_import_continues_identically(name: str) -> None:
    hparams: dict[str, Any] = {"lr": 0.1, "momentum": 0.9} if name == "sgd" else {"lr": 0.01, "amsgrad": True}
    gen = torch.Generator().manual_seed(7)
    grads = [{k: torch.randn(6, generator=gen) for k in ("a#0", "b#0")} for _ in range(8)]
    first = make_optimizer(name, **hparams)
    params = {k: torch.ones(6) for k in ("a#0", "b#0")}
    for step in range(4):
        for key, grad in grads[step].items():
            first.update(key, params[key], grad, step=step)
    exported = first.export_state()
    assert exported.steps == {"a#0": 4, "b#0": 4}
    second = optimizer_from_config(first.config())
    second.import_state(OptimizerState(tensors=dict(exported.tensors), steps=dict(exported.steps)))
    twin = {k: t.clone() for k, t in params.items()}
    for step in range(4, 8):
        for key, grad in grads[step].items():
            first.update(key, params[key], grad, step=step)
            second.update(key, twin[key], grad, step=step)
    for key in params:
        assert torch.equal(params[key], twin[key])
    # The export was a copy: continuing did not change it.
    assert not torch.equal(
        exported.tensors[next(iter(exported.tensors))], first.export_state().tensors[next(iter(exported.tensors))]
    )


def test_import_rejects_unknown_slots() -> None:
    opt = make_optimizer("sgd", momentum=0.5)
    with pytest.raises(InvalidArgument):
        opt.import_state(OptimizerState(tensors={"a#0/exp_avg": torch.zeros(3)}))
    with pytest.raises(InvalidArgument):
        opt.import_state(OptimizerState(tensors={"a#0/momentum_buffer": torch.zeros(3, dtype=torch.float64)}))
    with pytest.raises(InvalidArgument):
        opt.import_state(OptimizerState(steps={"a#0": -1}))
