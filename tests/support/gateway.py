"""Stand-ins for a gateway tested without a scheduler: endpoints published by the test, load reports kept,
deployment control refused."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from services.gateway.core.model import Deployment


class NoControl:
    """A ``DeploymentControl`` with no deployments, for gateways whose tests never change one."""

    async def get(self, name: str) -> None:
        return None

    async def list_deployments(self) -> list[Any]:
        return []

    async def apply(self, options: Any) -> Any:
        raise AssertionError("this test changes no deployment")

    async def delete(self, name: str) -> None:
        raise AssertionError("this test changes no deployment")

    async def registry_models(self) -> list[str]:
        return []


class NoScheduler(NoControl):
    """A ``DeploymentControl`` as a gateway sees an unreachable scheduler: changes answer UNAVAILABLE."""

    async def apply(self, options: Any) -> Any:
        from shared.errors import Unavailable

        raise Unavailable("no scheduler in this test")

    async def delete(self, name: str) -> None:
        from shared.errors import Unavailable

        raise Unavailable("no scheduler in this test")


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
