"""The dynamic batcher of one served version: a priority queue in front of a single compute thread.

Requests are queued by priority level (FIFO within a level). A background task forms batches of requests
that share their non-batch dimensions, concatenates them along dimension 0, runs one execution on the
compute executor and splits the outputs back.

When to dispatch matters more than anything else here (MEASUREMENTS.md: a fixed batching wait costs 6.4x at
concurrency 1). The batcher never waits when a request is alone: it dispatches at once when the queue holds
a full or preferred batch, or when the compute thread is idle and nothing suggests more requests are coming.
It waits (at most ``max_queue_delay_us`` from the oldest request's arrival) only when more are likely: while
a batch runs (requests pile up by themselves), or just after a batch that served more requests than are
queued now (their clients tend to send their next requests right away).

A request that finds the queue empty and the compute executor idle, that the batcher would not hold for
others to join, of a version whose executions of one request take at most ``inline_max_us``, runs on the
event loop itself, in a callback right after it is queued: the hand-off to the compute thread and back and
the batching task's wake-up cost more than such a forward (a lone MLP request: about 0.4 ms of hand-offs
and cold wake-ups against a 0.13 ms forward). Requests that arrived with it (the other entries of one stream
message, already scheduled) queue before that callback runs; it then leaves them all to the batching task,
so batching under load is unchanged. A version whose executions are slower (or not measured yet) always runs
on the compute thread, which keeps the event loop free for health checks and cancellations.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from services.inference.core.stats import BatchTimings, VersionStats
from shared.errors import Cancelled, DeadlineExceeded, ResourceExhausted, Unavailable
from shared.kserve.batching import BatchingSettings

__all__ = ["DEFAULT_INLINE_MAX_US", "DEFAULT_MAX_QUEUE_BYTES", "DEFAULT_PRIORITY", "BatchRunner", "DynamicBatcher"]

log = structlog.get_logger("maas.inference.batcher")

#: Rank of requests that set no priority (0 or absent): behind every explicit level (1 is most urgent).
DEFAULT_PRIORITY = 2**62

#: Bytes of inputs one version's queue holds at most by default (``MAAS_INFERENCE_MAX_QUEUE_BYTES``).
DEFAULT_MAX_QUEUE_BYTES = 256 * 1024 * 1024

#: Longest execution of one request (smoothed) that a lone request runs on the event loop by default.
DEFAULT_INLINE_MAX_US = 2000

#: Runs one execution: inputs concatenated along dim 0 -> outputs with the same dim 0. Fills the timings.
BatchRunner = Callable[[Mapping[str, np.ndarray], BatchTimings], dict[str, np.ndarray]]

_QUEUED, _RUNNING, _DONE = 0, 1, 2

# Executions dispatched to each compute executor and not finished yet, over every batcher sharing it: a lone
# request runs inline only while its executor is idle (one execution at a time, whichever version).
_executions: weakref.WeakKeyDictionary[Executor, int] = weakref.WeakKeyDictionary()

# Weight of the newest observation in the smoothed concurrency.
_EWMA = 0.2


@dataclass(eq=False)
class _Pending:
    inputs: Mapping[str, np.ndarray]
    batch_size: int
    key: tuple[Any, ...]
    nbytes: int
    rank: tuple[int, int]
    arrived_ns: int
    future: asyncio.Future[dict[str, np.ndarray]]
    state: int = _QUEUED
    timer: asyncio.TimerHandle | None = None
    dispatched_ns: int = 0
    # Set on the event loop when the caller gives up; read by the compute thread (a plain bool).
    cancelled: bool = False


def _inputs_nbytes(inputs: Mapping[str, np.ndarray]) -> int:
    """Bytes a request's inputs hold; object (BYTES) arrays count their elements' lengths too."""
    total = 0
    for array in inputs.values():
        total += array.nbytes
        if array.dtype == object:
            total += sum(len(item) for item in array.flat if isinstance(item, bytes | bytearray | str))
    return total


def _shape_key(inputs: Mapping[str, np.ndarray]) -> tuple[Any, ...]:
    return tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(inputs.items()))


class DynamicBatcher:
    """Queues requests of one version and runs them in batches on a shared compute executor.

    Args:
        name: ``model:version``, used in error messages.
        run: The execution function (called on the executor's thread).
        executor: The compute executor (one thread, shared by every version of the worker).
        settings: Batching settings.
        stats: Where executions and request outcomes are recorded.
        merge: False runs every request as its own execution (models that cannot batch).
        max_queue_bytes: Bytes of inputs the queued requests may hold together; a request that would go
            beyond is refused (RESOURCE_EXHAUSTED), unless the queue is empty.
        inline_max_us: A lone request runs on the event loop when an execution of one request of this
            version (smoothed, per sample) is expected to take at most this long; 0: never.
    """

    def __init__(
        self,
        name: str,
        run: BatchRunner,
        executor: Executor,
        settings: BatchingSettings,
        stats: VersionStats,
        *,
        merge: bool = True,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        inline_max_us: int = DEFAULT_INLINE_MAX_US,
    ) -> None:
        if max_queue_bytes < 1:
            raise ValueError(f"max_queue_bytes must be >= 1, got {max_queue_bytes}")
        if inline_max_us < 0:
            raise ValueError(f"inline_max_us must be >= 0, got {inline_max_us}")
        self.name = name
        self.settings = settings
        self.stats = stats
        self._run = run
        self._executor = executor
        self._merge = merge
        self.max_queue_bytes = max_queue_bytes
        self.inline_max_ns = inline_max_us * 1000
        # Smoothed duration of executions of one request, per sample (0: none measured yet).
        self._solo_ns_per_sample = 0.0
        self._queue: list[_Pending] = []  # kept sorted by rank: dispatch scans it in priority order
        self._queued = 0
        self._queued_bytes = 0  # inputs of the requests in self._queue, in bytes
        self._running = 0
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._last_batch_requests = 0
        self._last_batch_end_ns = 0
        # Requests in the batcher as each request arrives (itself included), smoothed: about 1 when clients
        # wait for each answer before sending again, higher when independent requests overlap.
        self._concurrency = 1.0
        self._task: asyncio.Task[None] | None = None

    @property
    def queued_bytes(self) -> int:
        """Bytes of inputs the queued requests hold now."""
        return self._queued_bytes

    @property
    def ongoing(self) -> int:
        """Requests queued or running now."""
        return self._queued + self._running

    def update(self, settings: BatchingSettings) -> None:
        """Applies new batching settings to the requests that arrive from now on."""
        self.settings = settings
        self._wakeup.set()

    async def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        batch_size: int,
        *,
        priority: int = 0,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Queues one request and returns its outputs.

        Args:
            inputs: The request's decoded inputs (dimension 0 is its batch).
            batch_size: Its batch size (samples).
            priority: 1 is the most urgent level; 0 the default level (behind explicit levels).
            timeout_s: Longest it may wait in the queue; None waits until the caller gives up.

        Raises:
            ResourceExhausted: If the queue is full, or the request's inputs would take the queue's bytes
                beyond ``max_queue_bytes``.
            DeadlineExceeded: If the request waited longer than ``timeout_s`` in the queue (0: at once).
            Unavailable: If the version is being unloaded.
        """
        if self._closing:
            self.stats.record_rejected()
            raise Unavailable(f"model {self.name} is being unloaded")
        if self._queued >= self.settings.max_queue_size:
            self.stats.record_rejected()
            raise ResourceExhausted(
                f"model {self.name}: the queue is full ({self.settings.max_queue_size} requests queued)",
                retry_after_s=0.05,
            )
        nbytes = _inputs_nbytes(inputs)
        if self._queued and self._queued_bytes + nbytes > self.max_queue_bytes:
            self.stats.record_rejected()
            raise ResourceExhausted(
                f"model {self.name}: the queue holds {self._queued_bytes} bytes; the limit is "
                f"{self.max_queue_bytes} (this request: {nbytes})",
                retry_after_s=0.05,
            )
        if timeout_s is not None and timeout_s <= 0:
            self.stats.record_request(False, 0)
            raise DeadlineExceeded(f"model {self.name}: the request's deadline passed before it was queued")
        loop = asyncio.get_running_loop()
        entry = _Pending(
            inputs=inputs,
            batch_size=batch_size,
            key=_shape_key(inputs) if self._merge else (next(self._seq),),
            rank=(priority if priority > 0 else DEFAULT_PRIORITY, next(self._seq)),
            arrived_ns=time.monotonic_ns(),
            future=loop.create_future(),
            nbytes=nbytes,
        )
        self._concurrency += _EWMA * (self.ongoing + 1 - self._concurrency)
        if timeout_s is not None:
            entry.timer = loop.call_later(max(0.0, timeout_s), self._expire, entry)
        inline = self._runs_inline(batch_size, timeout_s)
        self._insert(entry, wake=not inline)
        if inline:
            # Once the requests that arrived together with this one (the other entries of its stream
            # message, already scheduled) have queued too: alone then, it runs there and then.
            loop.call_soon(self._run_inline, entry)
        self._ensure_task()
        try:
            outputs = await entry.future
        except asyncio.CancelledError:
            # The client went away (or its deadline passed): drop the request if it has not started.
            entry.cancelled = True
            self._drop(entry, None)
            self.stats.record_request(False, time.monotonic_ns() - entry.arrived_ns)
            raise
        except BaseException:
            self.stats.record_request(False, time.monotonic_ns() - entry.arrived_ns)
            raise
        self.stats.record_request(True, time.monotonic_ns() - entry.arrived_ns)
        return outputs

    def _runs_inline(self, batch_size: int, timeout_s: float | None) -> bool:
        """Whether this request runs at once on the event loop: nothing queued or running on the executor,
        the batcher would not wait for more requests to join it, its execution is expected to be short, and
        to end before its deadline (else the queue's deadline answers it, as for any request)."""
        expected_ns = self._solo_ns_per_sample * batch_size
        return (
            not self._queue
            and not _executions.get(self._executor)
            and 0 < expected_ns <= self.inline_max_ns
            and (timeout_s is None or timeout_s * 1e9 > expected_ns)
            and not self._more_expected(batch_size, 1, time.monotonic_ns())
        )

    def _run_inline(self, entry: _Pending) -> None:
        if entry.state != _QUEUED:
            return  # cancelled or expired meanwhile
        if len(self._queue) > 1 or _executions.get(self._executor) or self._closing:
            self._wakeup.set()  # others came along: the batching task dispatches them together
            return
        self._dispatch([entry])
        timings = BatchTimings()
        try:
            results = self._compute([entry], timings)
        except Exception as exc:  # noqa: BLE001 - the request gets the error
            self._settle([entry], entry.batch_size, None, timings, exc)
        else:
            self._settle([entry], entry.batch_size, results, timings)
        finally:
            self._finish([entry])

    async def close(self) -> None:
        """Refuses new requests, lets queued and running ones finish, then stops the batching task."""
        self._closing = True
        self._wakeup.set()
        while self.ongoing:
            self._idle.clear()
            await self._idle.wait()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # --- queue -----------------------------------------------------------------------------------

    def _insert(self, entry: _Pending, *, wake: bool = True) -> None:
        # Most inserts go last (same level, later sequence number): scan from the end.
        index = len(self._queue)
        while index and self._queue[index - 1].rank > entry.rank:
            index -= 1
        self._queue.insert(index, entry)
        self._queued += 1
        self._queued_bytes += entry.nbytes
        self.stats.observer.queue_depth(self._queued)
        self._idle.clear()
        if wake:
            self._wakeup.set()

    def _drop(self, entry: _Pending, error: BaseException | None) -> None:
        if entry.state != _QUEUED:
            return
        entry.state = _DONE
        self._queue.remove(entry)
        self._queued -= 1
        self._queued_bytes -= entry.nbytes
        self.stats.observer.queue_depth(self._queued)
        if entry.timer is not None:
            entry.timer.cancel()
        if error is not None and not entry.future.done():
            entry.future.set_exception(error)
        if not self.ongoing:
            self._idle.set()

    def _expire(self, entry: _Pending) -> None:
        waited_us = (time.monotonic_ns() - entry.arrived_ns) // 1000
        self._drop(entry, DeadlineExceeded(f"model {self.name}: the request waited {waited_us} us in the queue"))

    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher {self.name}")

    # --- batching --------------------------------------------------------------------------------

    def _select(self) -> tuple[list[_Pending], int]:
        """The requests of the next batch: the most urgent one plus those of its shape that still fit."""
        head = self._queue[0]
        limit = self.settings.max_batch_size if self._merge else head.batch_size
        chosen, samples = [head], head.batch_size
        if self._merge:
            for entry in self._queue[1:]:
                if samples >= limit:
                    break
                if entry.key == head.key and samples + entry.batch_size <= limit:
                    chosen.append(entry)
                    samples += entry.batch_size
        return chosen, samples

    def _more_expected(self, samples: int, queued: int, now_ns: int) -> bool:
        """Whether waiting for more requests is worth it: the batch is not full or preferred, and more requests
        are likely right after a batch that served more requests than are queued (their clients answer back),
        or when requests have been overlapping more than the queue holds now."""
        settings = self.settings
        if not self._merge or self._closing or samples >= settings.max_batch_size:
            return False
        if samples in settings.preferred_batch_sizes:
            return False
        expected = round(self._concurrency)
        if now_ns - self._last_batch_end_ns < settings.max_queue_delay_us * 1000:
            expected = max(expected, self._last_batch_requests)
        return expected > queued

    def _delay_s(self, samples: int, queued: int) -> float:
        """How long to wait for more requests before dispatching ``samples``; 0 dispatches now."""
        now = time.monotonic_ns()
        if not self._more_expected(samples, queued, now):
            return 0.0
        remaining_ns = self._queue[0].arrived_ns + self.settings.max_queue_delay_us * 1000 - now
        return max(0.0, remaining_ns / 1e9)

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            chosen, samples = self._select()
            delay = self._delay_s(samples, len(self._queue))
            if delay > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), delay)
                    continue  # a request arrived: re-evaluate
                except TimeoutError:
                    # Waited the full delay: dispatch what is there (re-selected: the queue may have changed).
                    if not self._queue:
                        continue
                    chosen, samples = self._select()
            await self._execute(chosen, samples)

    async def _execute(self, chosen: list[_Pending], samples: int) -> None:
        self._dispatch(chosen)
        timings = BatchTimings()
        loop = asyncio.get_running_loop()
        _executions[self._executor] = _executions.get(self._executor, 0) + 1
        try:
            results = await loop.run_in_executor(self._executor, self._compute, chosen, timings)
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error
            self._settle(chosen, samples, None, timings, exc)
        else:
            self._settle(chosen, samples, results, timings)
        finally:
            _executions[self._executor] -= 1
            self._finish(chosen)

    def _dispatch(self, chosen: list[_Pending]) -> None:
        """Takes the chosen requests off the queue: they run now."""
        now = time.monotonic_ns()
        for entry in chosen:
            self._queue.remove(entry)
            self._queued_bytes -= entry.nbytes
            entry.state = _RUNNING
            entry.dispatched_ns = now
            if entry.timer is not None:
                entry.timer.cancel()
            self.stats.record_queued(now - entry.arrived_ns)
        self._queued -= len(chosen)
        self.stats.observer.queue_depth(self._queued)
        self._running += len(chosen)

    def _settle(
        self,
        chosen: list[_Pending],
        samples: int,
        results: list[dict[str, np.ndarray]] | None,
        timings: BatchTimings,
        error: Exception | None = None,
    ) -> None:
        """Hands each request its outputs, or the execution's error (or Cancelled when it was skipped)."""
        if error is not None:
            log.warning("batch_failed", model=self.name, error_type=type(error).__name__)
            for entry in chosen:
                if not entry.future.done():
                    entry.future.set_exception(error)
        elif results is not None:
            self.stats.record_execution(samples, len(chosen), timings)
            for entry, outputs in zip(chosen, results, strict=True):
                if not entry.future.done():
                    entry.future.set_result(outputs)
        else:
            for entry in chosen:
                if not entry.future.done():
                    entry.future.set_exception(Cancelled("the request was cancelled"))

    def _finish(self, chosen: list[_Pending]) -> None:
        for entry in chosen:
            entry.state = _DONE
        self._running -= len(chosen)
        self._last_batch_requests = len(chosen)
        self._last_batch_end_ns = time.monotonic_ns()
        if not self.ongoing:
            self._idle.set()

    def _compute(self, chosen: list[_Pending], timings: BatchTimings) -> list[dict[str, np.ndarray]] | None:
        """Runs on the compute thread: concatenate, execute, split."""
        if all(entry.cancelled for entry in chosen):
            return None  # every client of this batch is gone: skip the computation
        started = time.perf_counter_ns()
        if len(chosen) == 1:
            inputs: Mapping[str, np.ndarray] = chosen[0].inputs
        else:
            inputs = {name: np.concatenate([e.inputs[name] for e in chosen]) for name in chosen[0].inputs}
        prepared = time.perf_counter_ns()
        outputs = self._run(inputs, timings)
        finished = time.perf_counter_ns()
        results: list[dict[str, np.ndarray]] = []
        offset = 0
        for entry in chosen:
            end = offset + entry.batch_size
            results.append({name: array[offset:end] for name, array in outputs.items()})
            offset = end
        split = time.perf_counter_ns()
        if not timings.infer_ns:  # a runner that does not time itself: charge it all to inference
            timings.infer_ns = finished - prepared
        timings.input_ns += prepared - started
        timings.output_ns += split - finished
        if len(chosen) == 1:
            per_sample = (split - started) / max(chosen[0].batch_size, 1)
            seen = self._solo_ns_per_sample
            self._solo_ns_per_sample = per_sample if not seen else seen + _EWMA * (per_sample - seen)
        return results
