"""The scheduler's decisions as a stream of events (``WatchEvents``): admitted, preempted, requeued, ended,
deployments scaled. Events are what a watcher sees live; the state they report is stored (jobs and
deployments) before the event is published, so a watcher that reconnects reads the state, not a replay.

Each watcher has a bounded queue: one that falls ``max_pending`` events behind is ended instead of holding
memory without bound or slowing the scheduler.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime

from shared.errors import Unavailable


class EventKind(enum.StrEnum):
    JOB_SUBMITTED = "JOB_SUBMITTED"
    JOB_ADMITTED = "JOB_ADMITTED"
    JOB_RUNNING = "JOB_RUNNING"
    JOB_PREEMPTED = "JOB_PREEMPTED"
    JOB_REQUEUED = "JOB_REQUEUED"
    JOB_SUCCEEDED = "JOB_SUCCEEDED"
    JOB_FAILED = "JOB_FAILED"
    JOB_CANCELLED = "JOB_CANCELLED"
    DEPLOYMENT_SCALED = "DEPLOYMENT_SCALED"
    DEPLOYMENT_STATE = "DEPLOYMENT_STATE"


@dataclass(frozen=True)
class SchedulerEvent:
    sequence: int
    time: datetime
    kind: EventKind
    tenant: str
    reason: str = ""
    job_id: str = ""
    deployment: str = ""
    target_replicas: int = 0


class _Lagged:
    """Put in a watcher's queue when it fell behind: its stream ends there."""


class EventBus:
    """Fans events out to watchers (bounded queues)."""

    def __init__(self, max_pending: int = 1000) -> None:
        self._max_pending = max_pending
        self._watchers: set[asyncio.Queue[SchedulerEvent | _Lagged]] = set()
        self._sequence = itertools.count(1)

    def publish(
        self,
        kind: EventKind,
        tenant: str,
        reason: str = "",
        *,
        job_id: str = "",
        deployment: str = "",
        target_replicas: int = 0,
    ) -> None:
        event = SchedulerEvent(
            next(self._sequence), datetime.now(UTC), kind, tenant, reason, job_id, deployment, target_replicas
        )
        for queue in list(self._watchers):
            if queue.qsize() >= self._max_pending - 1:
                self._watchers.discard(queue)
                queue.put_nowait(_Lagged())
            else:
                queue.put_nowait(event)

    def close(self) -> None:
        """Ends every watch (the scheduler is stopping)."""
        for queue in list(self._watchers):
            queue.put_nowait(_Lagged())
        self._watchers.clear()

    async def watch(self, scope: str | None) -> AsyncGenerator[SchedulerEvent, None]:
        """Events of tenant ``scope`` (None: all) from now on, until the watcher lags or the bus closes."""
        queue: asyncio.Queue[SchedulerEvent | _Lagged] = asyncio.Queue(self._max_pending)
        self._watchers.add(queue)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Lagged):
                    raise Unavailable(
                        "the event stream ended (this watcher fell behind, or the scheduler is stopping); "
                        "read the current state and watch again",
                        retry_after_s=1.0,
                    )
                if scope is None or item.tenant == scope:
                    yield item
        finally:
            self._watchers.discard(queue)
