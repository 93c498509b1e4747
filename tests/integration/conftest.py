"""Fixtures of the integration tier: one local Ray for the whole session, shared by every module."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import ray


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    # Once per session (DEVELOPERS.md): more logical CPUs than the 2 cores, so a gang fits; actors at
    # normal priority, as the scheduler starts its own local Ray (services/scheduler/adapters/ray_cluster.py).
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=8, include_dashboard=False, namespace="maas", log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
