"""Shard state: versions, gradient validation, and crash-safe checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import safetensors.torch
import torch

from services.paramserver.core import checkpoint as checkpoint_module
from services.paramserver.core.consistency import ConsistencyGate
from services.paramserver.core.shard import ShardState, should_checkpoint
from shared.errors import InvalidArgument, NotFound
from shared.optim.optimizers import make_optimizer
from shared.sharding import plan_shards


def _shard(mode: str = "asp", num_workers: int = 1, optimizer: str = "adam") -> ShardState:
    pieces = {"w#0": torch.linspace(-1, 1, 6), "w#1": torch.linspace(0, 2, 5), "b#0": torch.zeros(3)}
    hparams = {"lr": 0.01, "amsgrad": True} if optimizer == "adam" else {"lr": 0.1, "momentum": 0.9}
    schedule = {"kind": "warmup", "warmup_steps": 2, "inner": {"kind": "cosine", "total_steps": 10}}
    return ShardState(
        pieces, make_optimizer(optimizer, schedule=schedule, **hparams), ConsistencyGate(mode, num_workers)
    )


def _grads(step: int, keys: tuple[str, ...] = ("w#0", "w#1", "b#0")) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    sizes = {"w#0": 6, "w#1": 5, "b#0": 3}
    return {k: torch.randn(sizes[k], generator=gen) for k in keys}


async def test_changed_since_returns_only_what_moved() -> None:
    shard = _shard()
    everything = shard.changed_since({})
    assert {k: v for k, (v, _) in everything.items()} == {"b#0": 0, "w#0": 0, "w#1": 0}
    held = {k: v for k, (v, _) in everything.items()}
    assert shard.changed_since(held) == {}
    await shard.apply(0, 0, _grads(0, ("w#1",)))
    changed = shard.changed_since(held)
    assert list(changed) == ["w#1"]
    assert changed["w#1"][0] == 1
    # Returned tensors are copies: the next update does not reach into them.
    before = changed["w#1"][1].clone()
    await shard.apply(0, 1, _grads(1))
    assert torch.equal(changed["w#1"][1], before)
    assert set(shard.changed_since(held, incarnation="another")) == {"b#0", "w#0", "w#1"}
    assert set(shard.changed_since({"w#0": 99}, incarnation=shard.incarnation)) == {"b#0", "w#0", "w#1"}
    with pytest.raises(InvalidArgument):
        shard.changed_since({"x#0": 0})


@pytest.mark.parametrize(
    "grads",
    [
        {"x#0": torch.zeros(6)},
        {"w#0": torch.zeros(5)},
        {"w#0": torch.zeros(2, 3)},
        {"w#0": torch.zeros(6, dtype=torch.float64)},
        {"w#0": [0.0] * 6},
        {"w#0": torch.tensor([0, 0, 0, math.nan, 0, 0])},
        {"w#0": torch.tensor([0, 0, 0, math.inf, 0, 0])},
    ],
)
async def test_bad_gradients_rejected_without_changing_anything(grads: dict) -> None:
    shard = _shard()
    before = shard.values()
    with pytest.raises(InvalidArgument):
        await shard.apply(0, 0, {"b#0": torch.ones(3), **grads})
    assert all(torch.equal(before[k], v) for k, v in shard.values().items())
    assert shard.versions() == {"b#0": 0, "w#0": 0, "w#1": 0}


async def test_bad_worker_and_step_rejected() -> None:
    shard = _shard()
    with pytest.raises(InvalidArgument):
        await shard.apply(1, 0, _grads(0))
    with pytest.raises(InvalidArgument):
        await shard.apply(0, -1, _grads(0))


def test_from_plan_takes_this_shards_pieces() -> None:
    params = {"a": torch.randn(10, 4), "b": torch.randn(7)}
    plan = plan_shards({n: tuple(t.shape) for n, t in params.items()}, 3)
    shards = [ShardState.from_plan(plan, i, params, make_optimizer("sgd"), ConsistencyGate("bsp", 1)) for i in range(3)]
    assert [sorted(s.keys) for s in shards] == [sorted(p.key for p in plan.for_shard(i)) for i in range(3)]
    joined = plan.join({k: t for s in shards for k, t in s.values().items()})
    assert all(torch.equal(joined[n], t) for n, t in params.items())
    with pytest.raises(InvalidArgument):
        ShardState.from_plan(plan, 0, {}, make_optimizer("sgd"), ConsistencyGate("bsp", 1))


@pytest.mark.parametrize(("mode", "optimizer"), [("asp", "adam"), ("bsp", "sgd")])
async def test_checkpoint_restore_round_trip(tmp_path: Path, mode: str, optimizer: str) -> None:
    shard = _shard(mode, 2, optimizer)
    for step in range(4):
        for worker in (0, 1):
            await shard.apply(worker, step, _grads(10 * step + worker))
    path = tmp_path / "shard0.safetensors"
    shard.checkpoint(path)
    restored = ShardState.restore(path)
    assert restored.step == shard.step == 4
    assert restored.versions() == shard.versions()
    assert restored.gate.clocks() == shard.gate.clocks()
    assert restored.gate.mode == mode
    assert restored.optimizer.config() == shard.optimizer.config()
    assert restored.optimizer.steps() == shard.optimizer.steps()
    assert restored.incarnation != shard.incarnation
    mine, theirs = shard.optimizer.export_state().tensors, restored.optimizer.export_state().tensors
    assert mine.keys() == theirs.keys() and mine
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    # Continuing both gives identical parameters, so no state was lost.
    for step in range(4, 7):
        for worker in (0, 1):
            await shard.apply(worker, step, _grads(10 * step + worker))
            await restored.apply(worker, step, _grads(10 * step + worker))
    assert all(torch.equal(v, restored.values()[k]) for k, v in shard.values().items())
    # Never pickle: the file is plain safetensors with JSON metadata.
    assert safetensors.torch.load_file(path).keys() >= {"param/w#0", "param/b#0"}


async def test_bsp_checkpoint_drops_a_partial_step_and_workers_push_it_again(tmp_path: Path) -> None:
    shard = _shard("bsp", 2, "sgd")
    await shard.apply(0, 0, _grads(0))
    shard.checkpoint(tmp_path / "c")
    restored = ShardState.restore(tmp_path / "c")
    assert restored.step == 0
    await restored.apply(0, 0, _grads(0))
    await restored.apply(1, 0, _grads(1))
    assert restored.step == 1


async def test_interrupted_checkpoint_leaves_previous_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shard = _shard()
    await shard.apply(0, 0, _grads(0))
    path = tmp_path / "shard.safetensors"
    await shard.checkpoint_async(path)
    saved_values, saved_versions = shard.values(), shard.versions()
    original = path.read_bytes()
    await shard.apply(0, 1, _grads(1))

    def crash(fd_path: str, flags: int) -> None:
        raise RuntimeError("simulated crash before rename")

    monkeypatch.setattr(checkpoint_module, "_fsync_path", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        shard.checkpoint(path)
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    # A hard crash would leave its temporary sibling behind; readers never look at it.
    (tmp_path / f"{path.name}.deadbeef.tmp").write_bytes(b"half a checkpoint")
    restored = ShardState.restore(path)
    assert restored.versions() == saved_versions
    assert all(torch.equal(saved_values[k], v) for k, v in restored.values().items())


def test_restore_rejects_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        ShardState.restore(tmp_path / "absent")
    (tmp_path / "garbage").write_bytes(b"\x00" * 64)
    with pytest.raises(InvalidArgument):
        ShardState.restore(tmp_path / "garbage")
    safetensors.torch.save_file({"x": torch.zeros(2)}, tmp_path / "plain")
    with pytest.raises(InvalidArgument, match="not a parameter-server checkpoint"):
        ShardState.restore(tmp_path / "plain")
    safetensors.torch.save_file({"x": torch.zeros(2)}, tmp_path / "wrong", metadata={"maas.paramserver": "{}"})
    with pytest.raises(InvalidArgument, match="format"):
        ShardState.restore(tmp_path / "wrong")
    safetensors.torch.save_file(
        {"x": torch.zeros(2)}, tmp_path / "thin", metadata={"maas.paramserver": '{"format": 1}'}
    )
    with pytest.raises(InvalidArgument, match="incomplete"):
        ShardState.restore(tmp_path / "thin")


def test_should_checkpoint() -> None:
    assert [s for s in range(11) if should_checkpoint(s, 5)] == [5, 10]
    assert not any(should_checkpoint(s, 0) for s in range(10))
    with pytest.raises(InvalidArgument):
        should_checkpoint(3, -1)
