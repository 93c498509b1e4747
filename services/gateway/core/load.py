"""Per-deployment ongoing requests (in flight + held) and the loop that reports them to the scheduler."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import structlog

from services.gateway.core.ports import LoadSink

log = structlog.get_logger("maas.gateway.load")


class LoadTracker:
    """Counts each deployment's ongoing requests; a request that starts holding asks for a report now."""

    def __init__(self) -> None:
        self._ongoing: dict[str, int] = {}
        self._urgent = asyncio.Event()

    def begin(self, deployment: str) -> None:
        self._ongoing[deployment] = self._ongoing.get(deployment, 0) + 1

    def end(self, deployment: str) -> None:
        left = self._ongoing.get(deployment, 0) - 1
        if left > 0:
            self._ongoing[deployment] = left
        else:
            self._ongoing.pop(deployment, None)

    def holding(self, deployment: str) -> None:
        """A request of ``deployment`` waits for a replica: report at once (scale from zero)."""
        self._urgent.set()

    def ongoing(self, deployment: str) -> int:
        return self._ongoing.get(deployment, 0)

    def snapshot(self, deployments: Iterable[str] = ()) -> dict[str, float]:
        """Ongoing requests of every deployment counted or named (named ones at 0 when idle, so the
        scheduler sees demand fall to zero)."""
        counts: dict[str, float] = dict.fromkeys(deployments, 0.0)
        counts.update((name, float(count)) for name, count in self._ongoing.items())
        return counts

    async def wait_urgent(self, timeout: float) -> None:
        """Return after ``timeout`` seconds, or earlier when a request starts holding."""
        try:
            await asyncio.wait_for(self._urgent.wait(), timeout)
        except TimeoutError:
            pass
        self._urgent.clear()


async def report_forever(
    tracker: LoadTracker, sink: LoadSink, interval_s: float, deployments: Callable[[], Iterable[str]]
) -> None:
    """Report every ``interval_s`` seconds and whenever a request starts holding, until cancelled.

    Reporting is best effort: a failed report is logged and the next one goes out on schedule (the
    scheduler drops a gateway silent for 10 s, so a short outage loses nothing).
    """
    failing = False
    reported = False
    while True:
        await tracker.wait_urgent(interval_s)
        try:
            await sink.report(tracker.snapshot(deployments()))
        except Exception as exc:  # noqa: BLE001 - any failure of one report must not stop the loop
            if not failing:
                # Before the first report gets through, the scheduler is most likely still starting.
                level = log.warning if reported else log.info
                level("load_report_failed", error=str(exc), error_type=type(exc).__name__)
            failing = True
        else:
            if failing:
                log.info("load_report_recovered")
            failing, reported = False, True
