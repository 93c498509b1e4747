"""Ray start-up, in one place: the scheduler is the mesh's only Ray driver (jobs and deployments share it).

``ray_address`` (``MAAS_RAY_ADDRESS`` or Ray's own ``RAY_ADDRESS``) joins a cluster; otherwise a local Ray
declaring ``ray_num_cpus`` logical CPUs starts. Ray already initialised in this process (a test session's)
is used as it is.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import ray

from services.scheduler.settings import SchedulerSettings

NAMESPACE = "maas"
_lock = threading.Lock()


def connect(settings: SchedulerSettings) -> None:
    """Start or join Ray once per process (blocking: call it in a thread)."""
    with _lock:
        if ray.is_initialized():
            return
        common: dict[str, Any] = {
            "namespace": NAMESPACE,
            "include_dashboard": False,
            "log_to_driver": False,
            "configure_logging": False,
        }
        if settings.ray_address:
            ray.init(address=settings.ray_address, **common)
        else:
            # Ray starts worker processes at niceness 15: the inference replicas it hosts would then lose
            # the CPU to every gateway and client process beside them (measured on 2 cores: MLP requests
            # through the gateway at concurrency 32 went from 730-760 to 810-1010 per second with 0).
            # Actors here are services, not background tasks. A cluster sets this on its nodes (deploy/).
            os.environ.setdefault("RAY_worker_niceness", "0")
            # Ray's C++ failure handler would take SIGTERM from the scheduler's own handler (which drains
            # and closes): it dumps a stack and kills the process before Ray's exit hook stops the local
            # Ray, whose agents were then left running after `maas up` stopped.
            os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
            ray.init(num_cpus=settings.ray_num_cpus, **common)
