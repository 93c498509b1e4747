"""BSP, SSP and ASP gating, BSP aggregation, timeouts and worker replacement."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from services.paramserver.core.consistency import Aggregator, ConsistencyGate
from services.paramserver.core.shard import ShardState
from shared.errors import AlreadyExists, DeadlineExceeded, FailedPrecondition, InvalidArgument
from shared.optim.optimizers import make_optimizer

KEYS = ("w#0", "b#0")


def _shard(mode: str, num_workers: int, staleness: int = 0, *, lr: float = 0.1, **kwargs) -> ShardState:
    pieces = {"w#0": torch.zeros(4), "b#0": torch.zeros(2)}
    return ShardState(pieces, make_optimizer("sgd", lr=lr), ConsistencyGate(mode, num_workers, staleness), **kwargs)


def _grads(worker: int, step: int) -> dict[str, torch.Tensor]:
    scale = float((worker + 1) * (step + 1))
    return {"w#0": torch.full((4,), scale), "b#0": torch.full((2,), -scale)}


async def _pending(task: asyncio.Task, for_s: float = 0.02) -> bool:
    await asyncio.sleep(for_s)
    return not task.done()


async def test_bsp_nobody_reads_step_k_plus_1_before_all_step_k_gradients_are_applied() -> None:
    workers, steps = 4, 6
    shard = _shard("bsp", workers)
    log: list[tuple[str, int, int]] = []
    rng = random.Random(42)

    async def worker(w: int) -> None:
        cache: dict[str, tuple[int, torch.Tensor]] = {}
        for step in range(steps):
            await asyncio.sleep(rng.uniform(0, 0.004))
            cache.update(await shard.read(w, step, {k: v for k, (v, _) in cache.items()}))
            log.append(("read", w, step))
            # What a step-k reader sees is exactly k averaged updates, never a partial step.
            assert {v for v, _ in cache.values()} == {step}
            await asyncio.sleep(rng.uniform(0, 0.004))
            await shard.apply(w, step, _grads(w, step))
            log.append(("push", w, step))

    await asyncio.gather(*(worker(w) for w in range(workers)))
    for i, (kind, w, step) in enumerate(log):
        if kind == "read" and step > 0:
            pushed_before = {pw for pk, pw, ps in log[:i] if pk == "push" and ps == step - 1}
            assert pushed_before == set(range(workers)), f"worker {w} read step {step} too early"
    # Each step applied the mean gradient once: mean over workers of (w+1)(k+1) is 2.5(k+1).
    expected = -0.1 * sum(2.5 * (k + 1) for k in range(steps))
    values = shard.values()
    torch.testing.assert_close(values["w#0"], torch.full((4,), expected))
    torch.testing.assert_close(values["b#0"], torch.full((2,), -expected))
    assert shard.versions() == dict.fromkeys(KEYS, steps)
    assert shard.step == steps


async def test_ssp_fast_worker_waits_when_more_than_s_ahead() -> None:
    gate = ConsistencyGate("ssp", 2, staleness=2)
    for step in range(3):
        await gate.wait_to_read(0, step)  # within the bound of the idle worker 1: no wait
        gate.pushed(0, step)
    blocked = asyncio.create_task(gate.wait_to_read(0, 3))  # 3 ahead of worker 1's clock 0
    assert await _pending(blocked)
    gate.pushed(1, 0)
    await asyncio.wait_for(blocked, 1)
    gate.pushed(0, 3)
    gate.pushed(0, 4)
    again = asyncio.create_task(gate.wait_to_read(0, 5))
    assert await _pending(again)
    gate.pushed(1, 1)
    assert await _pending(again)  # worker 1 at clock 2 still leaves worker 0 three ahead
    gate.pushed(1, 2)
    await asyncio.wait_for(again, 1)


async def test_ssp_bound_holds_under_concurrent_training() -> None:
    staleness, steps = 1, 8
    shard = _shard("ssp", 2, staleness)
    gaps: list[int] = []
    waited: list[float] = []

    async def worker(w: int, delay: float) -> None:
        loop = asyncio.get_running_loop()
        for step in range(steps):
            started = loop.time()
            await shard.read(w, step, {})
            waited.append(loop.time() - started if w == 0 else 0.0)
            gaps.append(step - shard.step)
            await asyncio.sleep(delay)
            await shard.apply(w, step, _grads(w, step))

    await asyncio.gather(worker(0, 0.0), worker(1, 0.005))
    assert max(gaps) <= staleness
    assert max(waited) > 0.003  # the fast worker really was held back


async def test_asp_never_waits() -> None:
    gate = ConsistencyGate("asp", 3)
    for step in (0, 5, 100):
        await asyncio.wait_for(gate.wait_to_read(0, step), 0.001)
    shard = _shard("asp", 2, lr=1.0)
    await shard.apply(0, 0, _grads(0, 0))
    await shard.apply(0, 1, _grads(0, 0))
    # Scaled by 1/2 workers: two pushes of 1.0 with lr 1 move the weights by 1.0.
    torch.testing.assert_close(shard.values()["w#0"], torch.full((4,), -1.0))
    assert shard.versions() == dict.fromkeys(KEYS, 2)


async def test_asp_without_scaling_applies_full_gradients() -> None:
    shard = _shard("asp", 2, lr=1.0, async_scaling=False)
    await shard.apply(1, 0, _grads(0, 0))
    torch.testing.assert_close(shard.values()["w#0"], torch.full((4,), -1.0))
    with pytest.raises(AlreadyExists):
        await shard.apply(1, 0, _grads(0, 0))


async def test_wait_times_out_with_deadline_exceeded_naming_stragglers() -> None:
    gate = ConsistencyGate("bsp", 3)
    gate.pushed(0, 0)
    gate.pushed(2, 0)
    with pytest.raises(DeadlineExceeded, match=r"\[1\]") as info:
        await gate.wait_to_read(0, 1, timeout=0.02)
    assert info.value.metadata["stragglers"] == "1"
    assert gate._waiters == []


async def test_bsp_removing_the_missing_worker_completes_the_step_and_a_replacement_resumes() -> None:
    shard = _shard("bsp", 3, lr=1.0)
    await shard.apply(0, 0, _grads(0, 0))
    await shard.apply(1, 0, _grads(1, 0))
    reader = asyncio.create_task(shard.read(0, 1, {}))
    assert await _pending(reader)
    shard.remove_worker(2)
    values = await asyncio.wait_for(reader, 1)
    # Averaged over the two workers that sent step 0: (1 + 2) / 2.
    torch.testing.assert_close(values["w#0"][1], torch.full((4,), -1.5))
    with pytest.raises(FailedPrecondition):
        await shard.apply(2, 0, _grads(2, 0))
    assert shard.replace_worker(2) == 1
    await shard.gate.wait_to_read(2, 1)
    for w in range(3):
        await shard.apply(w, 1, _grads(w, 1))
    assert shard.step == 2


async def test_removed_worker_pending_read_fails() -> None:
    gate = ConsistencyGate("bsp", 2)
    gate.pushed(0, 0)
    waiting = asyncio.create_task(gate.wait_to_read(0, 1))
    assert await _pending(waiting)
    gate.remove_worker(0)
    with pytest.raises(FailedPrecondition):
        await waiting
    gate.remove_worker(0)  # idempotent


async def test_replacement_resumes_at_slowest_other_clock() -> None:
    gate = ConsistencyGate("ssp", 3, staleness=3)
    for step in range(5):
        gate.pushed(0, step)
    for step in range(3):
        gate.pushed(1, step)
    assert gate.replace_worker(2) == 3
    assert gate.clock(2) == 3
    assert gate.min_clock == 3


async def test_bsp_rejects_duplicate_ahead_and_stale_pushes() -> None:
    shard = _shard("bsp", 2)
    await shard.apply(0, 0, _grads(0, 0))
    with pytest.raises(AlreadyExists):
        await shard.apply(0, 0, _grads(0, 0))
    with pytest.raises(FailedPrecondition):
        await shard.apply(1, 1, _grads(1, 1))
    await shard.apply(1, 0, _grads(1, 0))
    with pytest.raises(AlreadyExists):
        await shard.apply(1, 0, _grads(1, 0))
    with pytest.raises(FailedPrecondition, match="step 5"):
        await shard.gate.wait_to_read(0, 5)


def test_aggregator_averages_over_senders_and_treats_missing_keys_as_zero() -> None:
    agg = Aggregator([0, 1])
    assert agg.add(0, 0, {"a": torch.tensor([2.0, 4.0]), "b": torch.tensor([6.0])}) is None
    done = agg.add(1, 0, {"a": torch.tensor([4.0, 0.0])})
    assert done is not None
    assert done.step == 0
    assert done.contributors == {0, 1}
    assert torch.equal(done.grads["a"], torch.tensor([3.0, 2.0]))
    assert torch.equal(done.grads["b"], torch.tensor([3.0]))
    assert agg.step == 1
    assert agg.received == frozenset()


@pytest.mark.parametrize(
    ("mode", "num_workers", "staleness"),
    [("sync", 2, 0), ("bsp", 0, 0), ("bsp", 2, 1), ("asp", 2, 3), ("ssp", 2, -1), ("ssp", True, 1)],
)
def test_bad_gate_configuration_rejected(mode: str, num_workers: int, staleness: int) -> None:
    with pytest.raises(InvalidArgument):
        ConsistencyGate(mode, num_workers, staleness)


async def test_unknown_worker_rejected() -> None:
    gate = ConsistencyGate("asp", 2)
    with pytest.raises(InvalidArgument):
        await gate.wait_to_read(2, 0)
    with pytest.raises(InvalidArgument):
        gate.replace_worker(-1)
    with pytest.raises(InvalidArgument):
        await gate.wait_to_read(0, -1)
