"""The pool's capacity as the policy counts it (``core.policy.Resources``), from Ray.

A local Ray has exactly the CPUs the scheduler declares (``ray_num_cpus``); its GPUs and memory are not
limited here (Ray places what fits; a job needing GPUs that are not there fails its placement attempts).
On a cluster, what Ray reports once connected (nodes join and leave: read again every few seconds); before
the first connection nothing is refused for size.
"""

from __future__ import annotations

import dataclasses
import math
import time

from services.scheduler.core.policy import UNLIMITED, Resources
from services.scheduler.settings import SchedulerSettings

_REFRESH_S = 5.0


class RayCapacity:
    """A callable returning the pool's capacity (blocking: the core calls it in a thread)."""

    def __init__(self, settings: SchedulerSettings) -> None:
        self._settings = settings
        self._cached = UNLIMITED
        self._read_at = -math.inf

    def __call__(self) -> Resources:
        if self._settings.ray_address is None:
            return dataclasses.replace(UNLIMITED, cpus=float(self._settings.ray_num_cpus))
        now = time.monotonic()
        if now - self._read_at >= _REFRESH_S:
            self._read_at = now
            self._cached = _from_ray()
        return self._cached


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
