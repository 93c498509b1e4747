"""The pool's capacity as the policy counts it (``core.policy.Resources``), from Ray.

A local Ray has exactly the CPUs the scheduler declares (``ray_num_cpus``); its GPUs and memory are not
limited here (Ray places what fits; a job needing GPUs that are not there fails its placement attempts).
On a cluster, what Ray reports once connected (nodes join and leave: read again every few seconds); before
the first connection nothing is refused for size.

Reading a cluster's resources is a round trip to its GCS, and callers include the deployments' reconciler,
which asks on the event loop (``core.quota.ReplicaQuota``): the read runs in a thread of its own, and callers
get the last value read while a newer one is fetched (stale by at most one refresh).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import structlog

from services.scheduler.core.policy import UNLIMITED, Resources
from services.scheduler.settings import SchedulerSettings

log = structlog.get_logger("maas.scheduler.capacity")

_REFRESH_S = 5.0
# The first read on a cluster, by a caller off the event loop (the job service asks in a worker thread):
# how long it may wait for it before it gets "no limit" (what it gets before Ray is connected).
_FIRST_READ_WAIT_S = 10.0


class RayCapacity:
    """A callable returning the pool's capacity; never blocks the event loop.

    Args:
        settings: The scheduler's settings (a local Ray's declared CPUs, or a cluster's address).
        read: Reads the cluster's capacity (blocking); Ray's own figures unless a test gives another.
        refresh_s: How long a value read is used before the next read starts.
    """

    def __init__(
        self,
        settings: SchedulerSettings,
        read: Callable[[], Resources] | None = None,
        refresh_s: float = _REFRESH_S,
    ) -> None:
        self._local = (
            dataclasses.replace(UNLIMITED, cpus=float(settings.ray_num_cpus)) if settings.ray_address is None else None
        )
        self._read = read or _from_ray
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._cached: Resources | None = None
        self._read_at = -math.inf
        self._refreshing: Future[Resources] | None = None

    def __call__(self) -> Resources:
        if self._local is not None:
            return self._local
        with self._lock:
            cached = self._cached
            if time.monotonic() - self._read_at < self._refresh_s:
                return cached or UNLIMITED
            refreshing = self._refreshing or self._start_refresh()
        if cached is not None:
            return cached
        if _on_event_loop():
            return UNLIMITED
        # Nothing read yet and the caller may block: the figure it asked for, as before there was a cache.
        try:
            return refreshing.result(timeout=_FIRST_READ_WAIT_S)
        except TimeoutError:
            return UNLIMITED

    def _start_refresh(self) -> Future[Resources]:
        """Start one read in a thread (the caller holds the lock; at most one read is under way)."""
        future: Future[Resources] = Future()
        self._refreshing = future
        threading.Thread(target=self._refresh, args=(future,), name="maas-ray-capacity", daemon=True).start()
        return future

    def _refresh(self, future: Future[Resources]) -> None:
        value: Resources | None
        try:
            value = self._read()
        except Exception:
            # A cluster briefly unreachable: keep the last figure and try again after the usual interval.
            log.warning("ray_capacity_unreadable", exc_info=True)
            value = None
        with self._lock:
            if value is not None:
                self._cached = value
            self._read_at = time.monotonic()
            self._refreshing = None
            result = self._cached or UNLIMITED
        future.set_result(result)


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _from_ray() -> Resources:
    import ray

    if not ray.is_initialized():
        return UNLIMITED
    total = ray.cluster_resources()
    return dataclasses.replace(
        UNLIMITED,
        cpus=float(total.get("CPU", 0.0)),
        gpus=float(total.get("GPU", 0.0)),
        memory_bytes=float(total.get("memory", math.inf)),
    )
