"""Group commit: writes that arrive while one transaction commits share the next one.

A burst of submissions otherwise queues one transaction each on the store's write lock (SQLite serialises
writers, and each commit is a sync to disk), so the burst's latency grows with its length. Here the first
write starts a transaction at once; the writes that arrive while it commits wait and then go together in the
next. A lone write is never held back, so nothing is added at low load. Each caller returns only after its
own write is committed (or with the batch's error), exactly as with a transaction of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class GroupCommit(Generic[Item, Result]):
    """Runs ``write(items)`` (blocking: one transaction, in a thread) over every item waiting when the
    previous call ends; ``write`` returns one result per item, in order: an exception in an item's place is
    raised to that item's caller alone. An exception from ``write`` itself goes to every caller of the batch.
    """

    def __init__(self, write: Callable[[Sequence[Item]], Sequence[Result | Exception]], max_batch: int = 256) -> None:
        self._write = write
        self._max_batch = max_batch
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        """Write ``item`` with whatever else is waiting; its result once committed.

        A cancelled caller stops waiting, but its write still goes with its batch (as a write that had
        reached the store would): retries are made safe by the caller's idempotency key, not by undoing.
        """
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="group-commit")
        return await asyncio.shield(future)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
                try:
                    results = await asyncio.to_thread(self._write, [item for item, _ in batch])
                except Exception as exc:  # noqa: BLE001 (every caller of the batch gets the store's error)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._flusher = None

    async def close(self) -> None:
        """Wait for the writes already submitted."""
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
