"""Unit tests of the worker's dynamic batcher with a fake model function (no sockets, no torch)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from services.inference.core.batcher import DynamicBatcher
from services.inference.core.stats import BatchTimings, VersionStats
from shared.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from shared.kserve.batching import BatchingSettings


class FakeModel:
    """Doubles its input; records batch sizes; can be held at a gate to keep the compute thread busy."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.batches: list[list[float]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, inputs: Mapping[str, np.ndarray], timings: BatchTimings) -> dict[str, np.ndarray]:
        self.entered.set()
        self.gate.wait(5)
        if self.seconds:
            time.sleep(self.seconds)
        x = inputs["x"]
        self.batches.append(x[:, 0].tolist())
        return {"y": x * 2}


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1)
    yield pool
    pool.shutdown(wait=False)


def make(model: FakeModel, executor: ThreadPoolExecutor, **settings: int) -> DynamicBatcher:
    return DynamicBatcher("m:1", model, executor, BatchingSettings(**settings), VersionStats())


def x(value: float, rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, 2), value, np.float32)}


async def test_alone_dispatches_without_waiting(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    batcher = make(model, executor, max_batch_size=32, max_queue_delay_us=500_000)
    for i in range(5):
        started = time.perf_counter()
        out = await batcher.submit(x(i), 1)
        assert time.perf_counter() - started < 0.1, "a lone request must not wait for the batching delay"
        assert out["y"].tolist() == [[2 * i, 2 * i]]
    assert model.batches == [[float(i)] for i in range(5)]
    assert batcher.stats.execution_count == 5 and batcher.stats.success.count == 5
    await batcher.close()


async def test_concurrent_requests_form_batches_and_split_outputs(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    batcher = make(model, executor, max_batch_size=8, max_queue_delay_us=50_000)
    model.gate.clear()
    first = asyncio.ensure_future(batcher.submit(x(100), 1))
    await asyncio.to_thread(model.entered.wait, 5)
    # While the compute thread is busy, requests pile up and go out together.
    rest = [asyncio.ensure_future(batcher.submit(x(i, rows=1 + i % 2), 1 + i % 2)) for i in range(6)]
    await asyncio.sleep(0.05)
    model.gate.set()
    outs = await asyncio.gather(first, *rest)
    for i, out in enumerate(outs[1:]):
        assert out["y"].shape == (1 + i % 2, 2) and float(out["y"][0, 0]) == 2 * i
    assert model.batches[0] == [100.0]
    assert sum(len(b) for b in model.batches) == 10 and len(model.batches) <= 3
    assert batcher.stats.inference_count == 10 and batcher.stats.execution_count == len(model.batches)
    assert max(batcher.stats.batches) > 1
    await batcher.close()


async def test_max_batch_size_and_shapes_bound_batches(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    batcher = make(model, executor, max_batch_size=3, max_queue_delay_us=1000)
    model.gate.clear()
    first = asyncio.ensure_future(batcher.submit(x(0), 1))
    await asyncio.to_thread(model.entered.wait, 5)
    other = asyncio.ensure_future(batcher.submit({"x": np.zeros((1, 3), np.float32)}, 1))
    rest = [asyncio.ensure_future(batcher.submit(x(i), 1)) for i in range(1, 6)]
    await asyncio.sleep(0.02)
    model.gate.set()
    await asyncio.gather(first, other, *rest)
    assert all(len(batch) <= 3 for batch in model.batches)
    assert [0.0] in model.batches  # the [1, 3] request ran on its own
    await batcher.close()


async def test_priority_order_fifo_within_level(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    batcher = make(model, executor, max_batch_size=1, max_queue_delay_us=1000)
    model.gate.clear()
    blocker = asyncio.ensure_future(batcher.submit(x(-1), 1))
    await asyncio.to_thread(model.entered.wait, 5)
    order = [(10, 0), (11, 2), (12, 1), (13, 2), (14, 1), (15, 0)]
    tasks = [asyncio.ensure_future(batcher.submit(x(v), 1, priority=p)) for v, p in order]
    await asyncio.sleep(0.02)
    model.gate.set()
    await asyncio.gather(blocker, *tasks)
    assert [b[0] for b in model.batches] == [-1, 12, 14, 11, 13, 10, 15]
    await batcher.close()


async def test_queue_full_is_resource_exhausted(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    batcher = make(model, executor, max_batch_size=1, max_queue_size=2)
    model.gate.clear()
    blocker = asyncio.ensure_future(batcher.submit(x(0), 1))
    await asyncio.to_thread(model.entered.wait, 5)
    queued = [asyncio.ensure_future(batcher.submit(x(i), 1)) for i in (1, 2)]
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted, match=r"model m:1: the queue is full \(2 requests queued\)"):
        await batcher.submit(x(3), 1)
    model.gate.set()
    await asyncio.gather(blocker, *queued)
    await batcher.close()


async def test_queue_bytes_bound_is_resource_exhausted(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    # One row of x() is 8 bytes: the queue may hold three rows' worth.
    batcher = DynamicBatcher(
        "m:1", model, executor, BatchingSettings(max_batch_size=1), VersionStats(), max_queue_bytes=24
    )
    model.gate.clear()
    blocker = asyncio.ensure_future(batcher.submit(x(0), 1))
    await asyncio.to_thread(model.entered.wait, 5)
    assert batcher.queued_bytes == 0  # a running request no longer counts
    queued = [asyncio.ensure_future(batcher.submit(x(i), 1)) for i in (1, 2)]
    await asyncio.sleep(0)
    assert batcher.queued_bytes == 16
    with pytest.raises(ResourceExhausted, match=r"model m:1: the queue holds 16 bytes; the limit is 24") as info:
        await batcher.submit(x(3, rows=2), 2)
    assert info.value.retry_after_s == 0.05
    assert batcher.stats.rejected == 1
    model.gate.set()
    await asyncio.gather(blocker, *queued)
    assert batcher.queued_bytes == 0
    out = await batcher.submit(x(3, rows=2), 2)  # the same request, once the others are served
    assert out["y"].tolist() == [[6.0, 6.0], [6.0, 6.0]]
    assert batcher.stats.rejected == 1
    await batcher.close()


async def test_queue_bytes_accounting_survives_expiry_and_cancellation(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    batcher = DynamicBatcher(
        "m:1", model, executor, BatchingSettings(max_batch_size=1), VersionStats(), max_queue_bytes=16
    )
    model.gate.clear()
    blocker = asyncio.ensure_future(batcher.submit(x(0), 1))
    await asyncio.to_thread(model.entered.wait, 5)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(x(1), 1, timeout_s=0.01)
    doomed = asyncio.ensure_future(batcher.submit(x(2, rows=2), 2))
    await asyncio.sleep(0)
    assert batcher.queued_bytes == 16
    doomed.cancel()
    await asyncio.sleep(0)
    assert batcher.queued_bytes == 0
    # A request larger than the bound is still accepted into an empty queue (it would never fit otherwise).
    big = asyncio.ensure_future(batcher.submit(x(5, rows=3), 3))
    await asyncio.sleep(0)
    assert batcher.queued_bytes == 24
    model.gate.set()
    await asyncio.gather(blocker, big)
    assert batcher.queued_bytes == 0 and batcher.ongoing == 0
    await batcher.close()


async def test_queue_timeout_expires_waiting_requests(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    batcher = make(model, executor, max_batch_size=1, default_timeout_us=0)
    model.gate.clear()
    blocker = asyncio.ensure_future(batcher.submit(x(0), 1))
    await asyncio.to_thread(model.entered.wait, 5)
    with pytest.raises(DeadlineExceeded, match="waited"):
        await batcher.submit(x(1), 1, timeout_s=0.02)
    model.gate.set()
    await blocker
    assert model.batches == [[0.0]]
    assert batcher.stats.fail.count == 1 and batcher.ongoing == 0
    await batcher.close()


async def test_cancelled_queued_request_is_never_computed(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    batcher = make(model, executor, max_batch_size=1)
    model.gate.clear()
    blocker = asyncio.ensure_future(batcher.submit(x(0), 1))
    await asyncio.to_thread(model.entered.wait, 5)
    doomed = asyncio.ensure_future(batcher.submit(x(1), 1))
    kept = asyncio.ensure_future(batcher.submit(x(2), 1))
    await asyncio.sleep(0.01)
    doomed.cancel()
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(blocker, kept)
    assert model.batches == [[0.0], [2.0]]
    assert batcher.ongoing == 0
    await batcher.close()


async def test_close_drains_then_refuses(executor: ThreadPoolExecutor) -> None:
    model = FakeModel(seconds=0.01)
    batcher = make(model, executor, max_batch_size=2)
    pending = [asyncio.ensure_future(batcher.submit(x(i), 1)) for i in range(4)]
    await asyncio.sleep(0)
    await batcher.close()
    assert all(p.done() and not p.exception() for p in pending)
    with pytest.raises(Unavailable):
        await batcher.submit(x(9), 1)


async def test_model_error_fails_the_batch(executor: ThreadPoolExecutor) -> None:
    def broken(inputs: Mapping[str, np.ndarray], timings: BatchTimings) -> dict[str, np.ndarray]:
        raise RuntimeError("boom")

    batcher = DynamicBatcher("m:1", broken, executor, BatchingSettings(), VersionStats())
    with pytest.raises(RuntimeError):
        await batcher.submit(x(0), 1)
    assert batcher.stats.fail.count == 1 and batcher.ongoing == 0
    await batcher.close()


class RecordingObserver:
    """A VersionObserver that keeps every event."""

    def __init__(self) -> None:
        self.waits: list[int] = []
        self.executions: list[int] = []
        self.outcomes: list[str] = []
        self.depths: list[int] = []

    def queued(self, wait_ns: int) -> None:
        self.waits.append(wait_ns)

    def executed(self, batch_size: int, compute_ns: int) -> None:
        assert compute_ns > 0
        self.executions.append(batch_size)

    def finished(self, ok: bool) -> None:
        self.outcomes.append("success" if ok else "fail")

    def rejected(self) -> None:
        self.outcomes.append("rejected")

    def queue_depth(self, depth: int) -> None:
        self.depths.append(depth)


async def test_observer_sees_what_the_statistics_count(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    observer = RecordingObserver()
    stats = VersionStats(observer=observer)
    batcher = DynamicBatcher("m:1", model, executor, BatchingSettings(max_batch_size=4, max_queue_size=2), stats)
    model.gate.clear()
    blocker = asyncio.ensure_future(batcher.submit(x(0), 1))
    await asyncio.to_thread(model.entered.wait, 5)
    queued = [asyncio.ensure_future(batcher.submit(x(i), 1)) for i in (1, 2)]
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted):
        await batcher.submit(x(3), 1)
    model.gate.set()
    await asyncio.gather(blocker, *queued)
    await batcher.close()
    with pytest.raises(Unavailable):
        await batcher.submit(x(4), 1)

    assert model.batches == [[0.0], [1.0, 2.0]]
    assert observer.executions == [1, 2] and stats.execution_count == 2
    assert len(observer.waits) == stats.queue.count == 3
    assert sorted(observer.outcomes) == ["rejected", "rejected", "success", "success", "success"]
    assert stats.rejected == 2 and stats.success.count == 3
    assert observer.depths == [1, 0, 1, 2, 0]


class ThreadRecordingModel(FakeModel):
    """A FakeModel that also records which thread ran each execution."""

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__(seconds)
        self.threads: list[int] = []

    def __call__(self, inputs: Mapping[str, np.ndarray], timings: BatchTimings) -> dict[str, np.ndarray]:
        self.threads.append(threading.get_ident())
        return super().__call__(inputs, timings)


async def test_lone_fast_request_runs_on_the_event_loop(executor: ThreadPoolExecutor) -> None:
    model = ThreadRecordingModel()
    batcher = DynamicBatcher("m:1", model, executor, BatchingSettings(max_batch_size=8), VersionStats())
    outs = [await batcher.submit(x(i), 1) for i in range(4)]
    assert [out["y"].tolist() for out in outs] == [[[2 * i, 2 * i]] for i in range(4)]
    loop_thread = threading.get_ident()
    # The first execution is not measured yet: the compute thread; then short ones run where they arrive.
    assert model.threads[0] != loop_thread
    assert model.threads[1:] == [loop_thread] * 3
    stats = batcher.stats
    assert stats.execution_count == 4 and stats.success.count == 4 and stats.inference_count == 4
    await batcher.close()


async def test_requests_arriving_together_are_batched_not_run_inline_one_by_one(
    executor: ThreadPoolExecutor,
) -> None:
    model = ThreadRecordingModel()
    batcher = DynamicBatcher("m:1", model, executor, BatchingSettings(max_batch_size=8), VersionStats())
    await batcher.submit(x(0), 1)
    await batcher.submit(x(1), 1)
    assert model.threads[-1] == threading.get_ident()
    # As the entries of one stream message: their tasks start in the same turn of the event loop.
    outs = await asyncio.gather(*(batcher.submit(x(10 + i), 1) for i in range(4)))
    assert [out["y"].tolist() for out in outs] == [[[2 * (10 + i)] * 2] for i in range(4)]
    assert model.batches[-1] == [10.0, 11.0, 12.0, 13.0]
    assert batcher.stats.execution_count == 3
    await batcher.close()


@pytest.mark.parametrize(("seconds", "inline_max_us"), [(0.003, 1000), (0.0, 0)])
async def test_slow_or_opted_out_versions_stay_on_the_compute_thread(
    executor: ThreadPoolExecutor, seconds: float, inline_max_us: int
) -> None:
    model = ThreadRecordingModel(seconds)
    batcher = DynamicBatcher(
        "m:1", model, executor, BatchingSettings(max_batch_size=8), VersionStats(), inline_max_us=inline_max_us
    )
    for i in range(3):
        await batcher.submit(x(i), 1)
    assert threading.get_ident() not in model.threads
    await batcher.close()


async def test_busy_executor_sends_lone_requests_to_the_compute_thread_where_cancellation_holds(
    executor: ThreadPoolExecutor,
) -> None:
    fast = ThreadRecordingModel()
    batcher = DynamicBatcher("fast:1", fast, executor, BatchingSettings(max_batch_size=8), VersionStats())
    await batcher.submit(x(0), 1)
    await batcher.submit(x(1), 1)
    loop_thread = threading.get_ident()
    assert fast.threads[-1] == loop_thread  # idle: inline
    # Another version holds the shared compute thread: a lone request of this one must not run beside it.
    other = FakeModel()
    other.gate.clear()
    other_batcher = DynamicBatcher("other:1", other, executor, BatchingSettings(max_batch_size=8), VersionStats())
    running = asyncio.ensure_future(other_batcher.submit(x(9), 1))
    await asyncio.to_thread(other.entered.wait, 5)
    cancelled = asyncio.ensure_future(batcher.submit(x(3), 1))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    waiting = asyncio.ensure_future(batcher.submit(x(2), 1))
    await asyncio.sleep(0.01)
    assert not waiting.done() and fast.batches == [[0.0], [1.0]]
    other.gate.set()
    assert (await running)["y"].tolist() == [[18, 18]]
    assert (await waiting)["y"].tolist() == [[4, 4]]
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert fast.batches == [[0.0], [1.0], [2.0]], "the cancelled request must not be computed"
    assert fast.threads[-1] != loop_thread
    # Idle again: the next lone request runs inline again.
    assert (await batcher.submit(x(4), 1))["y"].tolist() == [[8, 8]]
    assert fast.threads[-1] == loop_thread
    await batcher.close()
    await other_batcher.close()


async def test_a_request_that_more_are_expected_to_join_waits_for_them_instead_of_running_inline(
    executor: ThreadPoolExecutor,
) -> None:
    model = ThreadRecordingModel()
    settings = BatchingSettings(max_batch_size=8, max_queue_delay_us=200_000)
    batcher = DynamicBatcher("m:1", model, executor, settings, VersionStats())
    await batcher.submit(x(0), 1)
    await batcher.submit(x(1), 1)
    assert model.threads[-1] == threading.get_ident()
    # Clients that overlap: a batch of several just ran, so the next lone request waits for the others
    # (batching under load), and they run together on the compute thread.
    holder = FakeModel()
    holder.gate.clear()
    other = DynamicBatcher("other:1", holder, executor, BatchingSettings(max_batch_size=8), VersionStats())
    held = asyncio.ensure_future(other.submit(x(9), 1))
    await asyncio.to_thread(holder.entered.wait, 5)
    burst = [asyncio.ensure_future(batcher.submit(x(10 + i), 1)) for i in range(4)]
    await asyncio.sleep(0.01)
    holder.gate.set()
    await asyncio.gather(held, *burst)
    assert model.batches[-1] == [10.0, 11.0, 12.0, 13.0]
    follow = [asyncio.ensure_future(batcher.submit(x(20 + i), 1)) for i in range(3)]
    await asyncio.gather(*follow)
    assert model.batches[-1] == [20.0, 21.0, 22.0]
    assert model.threads[-1] != threading.get_ident()
    await batcher.close()
    await other.close()


async def test_lone_request_whose_deadline_passed_is_not_computed(executor: ThreadPoolExecutor) -> None:
    model = FakeModel()
    batcher = make(model, executor, max_batch_size=8)
    await batcher.submit(x(0), 1)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(x(1), 1, timeout_s=0.0)
    assert model.batches == [[0.0]]
    await batcher.close()
