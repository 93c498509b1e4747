"""When a worker may read parameters, and how a BSP shard combines one step's gradients.

Each worker has a clock: the number of its steps whose gradients this shard has applied (steps are
0-based, so after step ``k`` is applied the clock is ``k + 1``). Reading for step ``t`` needs the
slowest active worker's clock to be at least ``t - s``: ``s = 0`` in BSP (everyone's step ``t - 1``
is in), the staleness bound in SSP, and no wait at all in ASP.

BSP shards also aggregate (:class:`Aggregator`, re-exported here): a step's gradients are averaged
and applied once.

Everything here runs on one asyncio event loop and is not thread-safe; callers on other threads must
hop onto the loop first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

from services.paramserver.core.aggregation import AggregatedStep, Aggregator
from shared.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument

__all__ = ["MODES", "AggregatedStep", "Aggregator", "ConsistencyGate"]

MODES = ("bsp", "ssp", "asp")


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument.field(name, f"must be an integer >= {minimum}, got {value!r}")
    return value


class ConsistencyGate:
    """Holds back readers that are too far ahead of the slowest worker.

    Args:
        mode: ``bsp``, ``ssp`` or ``asp``.
        num_workers: Workers are numbered ``0 .. num_workers - 1``.
        staleness: SSP's bound ``s``; must be 0 for the other modes.
        start_step: Every worker's initial clock (a restored shard resumes at its checkpoint's step).

    Raises:
        InvalidArgument: On an unknown mode or a bad count, bound or step.
    """

    def __init__(self, mode: str, num_workers: int, staleness: int = 0, *, start_step: int = 0) -> None:
        if mode not in MODES:
            raise InvalidArgument.field("mode", f"unknown consistency mode {mode!r}; expected one of {list(MODES)}")
        _check_int("num_workers", num_workers, 1)
        _check_int("staleness", staleness, 0)
        _check_int("start_step", start_step, 0)
        if mode != "ssp" and staleness:
            raise InvalidArgument.field("staleness", f"only applies to ssp, got {staleness} for {mode}")
        self.mode = mode
        self.num_workers = num_workers
        self.staleness = staleness
        self._clocks = dict.fromkeys(range(num_workers), start_step)
        self._active = set(range(num_workers))
        # (worker, needed slowest clock, future); few readers wait at once, so a list scan is enough.
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []

    @property
    def active_workers(self) -> frozenset[int]:
        return frozenset(self._active)

    def clocks(self) -> dict[int, int]:
        """Worker -> clock, removed workers included (their clocks stop moving)."""
        return dict(self._clocks)

    def clock(self, worker: int) -> int:
        """``worker``'s clock: how many of its steps are applied here."""
        self._check_id(worker)
        return self._clocks[worker]

    @property
    def min_clock(self) -> int:
        """The slowest active worker's clock; with no active worker, the furthest any worker got."""
        if self._active:
            return min(self._clocks[w] for w in self._active)
        return max(self._clocks.values())

    def check_worker(self, worker: int) -> None:
        """Raises unless ``worker`` is a known, active worker.

        Raises:
            InvalidArgument: If ``worker`` is not in ``[0, num_workers)``.
            FailedPrecondition: If it was removed (and not replaced since).
        """
        self._check_id(worker)
        if worker not in self._active:
            raise FailedPrecondition(f"worker {worker} was removed from the job; replace it to rejoin")

    async def wait_to_read(self, worker: int, step: int, timeout: float | None = None) -> None:
        """Returns once ``worker`` may read the parameters it needs to compute step ``step``.

        Args:
            worker: The reader.
            step: The step it is about to compute.
            timeout: Seconds to wait at most; None waits indefinitely.

        Raises:
            InvalidArgument: On a bad worker or step.
            FailedPrecondition: If the worker is removed, or asks for a step beyond its next one
                (which could never be granted, since it would wait for its own pushes).
            DeadlineExceeded: If the slowest workers do not catch up within ``timeout``: the caller
                may retry, and the message names the stragglers.
        """
        self.check_worker(worker)
        _check_int("step", step, 0)
        if self.mode == "asp":
            return
        if step > self._clocks[worker] + 1:
            raise FailedPrecondition(
                f"worker {worker} asks to read for step {step}, but only its steps before "
                f"{self._clocks[worker]} are applied"
            )
        needed = step - self.staleness
        if self.min_clock >= needed:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (worker, needed, future)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            stragglers = sorted(w for w in self._active if self._clocks[w] < needed)
            raise DeadlineExceeded(
                f"worker {worker} timed out waiting to read for step {step}: workers {stragglers} "
                f"have not finished step {needed - 1}",
                metadata={"stragglers": ",".join(map(str, stragglers))},
            ) from None
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def pushed(self, worker: int, step: int) -> None:
        """Records that ``worker``'s step-``step`` gradient has been applied here; wakes readers.

        Clocks only move forward, so a repeated or late notification is harmless. A removed worker's
        clock moves too (it no longer holds anyone back, but records how far the job got).
        """
        self._check_id(worker)
        _check_int("step", step, 0)
        self._clocks[worker] = max(self._clocks[worker], step + 1)
        self._wake()

    def load_clocks(self, clocks: Mapping[int, int], active: Iterable[int]) -> None:
        """Sets every clock and the active set, e.g. from a checkpoint, before anyone waits.

        Raises:
            InvalidArgument: On unknown workers or negative clocks.
            FailedPrecondition: If readers are already waiting.
        """
        if self._waiters:
            raise FailedPrecondition("cannot load clocks while readers are waiting")
        active = set(active)
        for worker in [*clocks, *active]:
            self._check_id(worker)
        # Validate everything before changing anything.
        loaded = {worker: _check_int(f"clocks[{worker}]", clock, 0) for worker, clock in clocks.items()}
        self._clocks.update(loaded)
        self._active = active

    def remove_worker(self, worker: int) -> None:
        """Stops waiting for ``worker`` (it left or died); its pending reads fail. Idempotent.

        Raises:
            InvalidArgument: If ``worker`` is not in ``[0, num_workers)``.
        """
        self._check_id(worker)
        if worker not in self._active:
            return
        self._active.discard(worker)
        self._fail_waiters(worker, f"worker {worker} was removed from the job")
        self._wake()

    def replace_worker(self, worker: int, at: int | None = None) -> int:
        """(Re)admits ``worker``, e.g. a fresh process taking over a dead one's rank.

        It resumes at the slowest other active worker's clock, so it neither holds anyone back nor
        reads parameters the others have not reached. Reads pending from its previous incarnation fail.

        Args:
            worker: The worker's number.
            at: Resume at this clock instead (a BSP shard knows the one step it is collecting).

        Returns:
            The step the worker should compute next.

        Raises:
            InvalidArgument: If ``worker`` is not in ``[0, num_workers)``.
        """
        self._check_id(worker)
        others = self._active - {worker}
        if at is not None:
            resume = _check_int("at", at, 0)
        elif others:
            resume = min(self._clocks[w] for w in others)
        else:
            resume = max(self._clocks.values())
        self._fail_waiters(worker, f"worker {worker} was replaced")
        self._clocks[worker] = resume
        self._active.add(worker)
        self._wake()
        return resume

    def _check_id(self, worker: int) -> None:
        if isinstance(worker, bool) or not isinstance(worker, int) or not 0 <= worker < self.num_workers:
            raise InvalidArgument.field("worker", f"must be in [0, {self.num_workers}), got {worker!r}")

    def _fail_waiters(self, worker: int, message: str) -> None:
        for w, _, future in self._waiters:
            if w == worker and not future.done():
                future.set_exception(FailedPrecondition(message))

    def _wake(self) -> None:
        floor = self.min_clock
        for _, needed, future in self._waiters:
            if needed <= floor and not future.done():
                future.set_result(None)
