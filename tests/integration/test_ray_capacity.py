"""RayCapacity on a real Ray joined by address, as on a cluster: the figures Ray reports, read off the loop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import ray

from services.scheduler.adapters.capacity import RayCapacity
from services.scheduler.settings import SchedulerSettings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def joined(tmp_path: Path) -> RayCapacity:
    return RayCapacity(SchedulerSettings(home=tmp_path, ray_address=ray.get_runtime_context().gcs_address))


async def test_the_clusters_cpus_are_read_in_a_thread(ray_local: None, tmp_path: Path) -> None:
    declared = ray.cluster_resources()["CPU"]  # the session's Ray (tests/integration/conftest.py)
    # Off the loop (where the job service asks), the first answer is Ray's figure.
    assert (await asyncio.to_thread(joined(tmp_path))).cpus == declared
    # On the loop, never a blocking read: "no limit" until the figure is in, then the figure.
    capacity = joined(tmp_path)
    assert capacity().cpus == float("inf")
    deadline = time.monotonic() + 30
    while capacity().cpus != declared:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
