"""Overlap receiving an upload with hashing and writing it.

A chunk awaited from the network and a chunk hashed and written to storage are independent work; doing
them one after the other leaves the link idle while the disk works and the reverse. The writer runs on its
own thread (not the shared executor: an upload holds it for its whole duration, and sixteen parallel
uploads must not starve the executor that database calls need), up to ``depth`` chunks behind.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable


class BackgroundWriter:
    """Feeds chunks to a blocking ``write`` on a dedicated thread through a bounded queue."""

    def __init__(self, write: Callable[[bytes], None], depth: int = 8) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(depth)
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._write = write
        self._error: BaseException | None = None
        self._discard = False
        self._closed = False
        threading.Thread(target=self._drain, name="maas-upload-writer", daemon=True).start()

    def _drain(self) -> None:
        while True:
            chunk = asyncio.run_coroutine_threadsafe(self._queue.get(), self._loop).result()
            if chunk is None:
                break
            if self._error is None and not self._discard:
                try:
                    self._write(chunk)
                except BaseException as exc:  # noqa: BLE001 - handed to the event loop below
                    self._error = exc
        self._loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    async def put(self, chunk: bytes) -> None:
        """Queue a chunk (waiting while the queue is full); raises a write error as soon as it is known."""
        if self._error is not None:
            raise self._error
        await self._queue.put(chunk)

    async def close(self) -> None:
        """Wait until every queued chunk is written; raise what writing raised."""
        await self._finish()
        if self._error is not None:
            raise self._error

    async def abort(self) -> None:
        """Drop what is queued and stop the thread."""
        self._discard = True
        await self._finish()

    async def _finish(self) -> None:
        if not self._closed:
            self._closed = True
            await self._queue.put(None)
        await asyncio.shield(self._done)
