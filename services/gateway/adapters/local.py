"""In-process implementations of the endpoint source and the load sink: a gateway without a scheduler.

Tests drive :class:`SnapshotFeeder` directly; a standalone gateway in front of fixed workers could too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

from services.gateway.core.model import Deployment


class SnapshotFeeder:
    """An ``EndpointSource`` whose snapshots are published by its owner."""

    def __init__(self, deployments: Sequence[Deployment] | None = None) -> None:
        self._current: list[Deployment] | None = None if deployments is None else list(deployments)
        self._apply: Callable[[Sequence[Deployment]], None] | None = None
        self._lost: Callable[[], None] | None = None

    def publish(self, deployments: Sequence[Deployment]) -> None:
        """Make ``deployments`` the full snapshot (those left out are deleted)."""
        self._current = list(deployments)
        if self._apply is not None:
            self._apply(self._current)

    def lose(self) -> None:
        """Act as a broken stream: the gateway keeps the last snapshot but no longer calls it current."""
        if self._lost is not None:
            self._lost()

    async def follow(self, apply: Callable[[Sequence[Deployment]], None], lost: Callable[[], None]) -> None:
        self._apply, self._lost = apply, lost
        if self._current is not None:
            apply(self._current)
        try:
            await asyncio.Event().wait()
        finally:
            self._apply = self._lost = None


class RecordingLoadSink:
    """A ``LoadSink`` that keeps the reports it got (the latest last)."""

    def __init__(self) -> None:
        self.reports: list[dict[str, float]] = []
        self.reported = asyncio.Event()

    async def report(self, ongoing: Mapping[str, float]) -> None:
        self.reports.append(dict(ongoing))
        self.reported.set()
