"""A wake-up signal for change-feed watchers."""

from __future__ import annotations

import asyncio
import contextlib


class ChangeSignal:
    """Counts changes; watchers wait until the count moves past what they saw, or a timeout (None: none)."""

    def __init__(self) -> None:
        self.generation = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.generation += 1
        self._event.set()
        # Watchers that wake re-check the generation, so a fresh event for the next change is enough.
        self._event = asyncio.Event()

    async def wait(self, seen: int, timeout: float | None) -> None:
        if self.generation != seen:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
