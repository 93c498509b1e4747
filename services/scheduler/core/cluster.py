"""The pool as a whole (``GetCluster``): its capacity as admission counts it, and what every tenant has
placed on it now."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace

from services.scheduler.core.jobs.service import JobService
from services.scheduler.core.policy import NONE, Resources


@dataclass(frozen=True)
class ClusterUsage:
    capacity: Resources
    used: Resources
    queued_jobs: int


class ClusterView:
    """Reads the pool for an operator.

    Args:
        jobs: The job service (whose usage counts every tenant's jobs and replicas).
        capacity: The pool's capacity (blocking: called in a thread; reads Ray on a cluster).
        max_running_jobs: How many jobs may run at once (the ``jobs`` dimension of the capacity).
    """

    def __init__(self, jobs: JobService, capacity: Callable[[], Resources], max_running_jobs: int) -> None:
        self._jobs = jobs
        self._capacity = capacity
        self._max_running = max_running_jobs

    async def usage(self) -> ClusterUsage:
        held, queued = await self._jobs.usage()
        capacity = await asyncio.to_thread(self._capacity)
        used = sum(held.values(), NONE)
        return ClusterUsage(replace(capacity, jobs=self._max_running), used, len(queued))
