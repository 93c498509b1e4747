"""RayCapacity: a local Ray's declared CPUs; a cluster's figures read in a thread of their own, never on the
event loop. The cluster's reader here is a stand-in that blocks until released (the real Ray one runs in
tests/integration/test_ray_capacity.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

from services.scheduler.adapters.capacity import RayCapacity
from services.scheduler.core.policy import UNLIMITED, Resources
from services.scheduler.settings import SchedulerSettings


class SlowCluster:
    """A cluster whose every read blocks until :meth:`release` (a GCS round trip, long here)."""

    def __init__(self, cpus: float) -> None:
        self.cpus = cpus
        self.reads = 0
        self.failing = False
        self._gate = threading.Semaphore(0)

    def read(self) -> Resources:
        self.reads += 1
        assert self._gate.acquire(timeout=10), "never released"
        if self.failing:
            raise ConnectionError("GCS unreachable")
        return dataclasses.replace(UNLIMITED, cpus=self.cpus)

    def release(self) -> None:
        self._gate.release()


def cluster_settings(tmp_path) -> SchedulerSettings:  # type: ignore[no-untyped-def]
    return SchedulerSettings(home=tmp_path, ray_address="ray://cluster:10001")


async def eventually(check, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


def test_a_local_ray_has_the_declared_cpus(tmp_path) -> None:  # type: ignore[no-untyped-def]
    capacity = RayCapacity(SchedulerSettings(home=tmp_path, ray_num_cpus=3))
    assert capacity() == dataclasses.replace(UNLIMITED, cpus=3.0)


async def test_the_event_loop_never_waits_for_a_cluster_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cluster = SlowCluster(cpus=16)
    capacity = RayCapacity(cluster_settings(tmp_path), cluster.read, refresh_s=0.2)
    # Nothing read yet: no limit (as before Ray is connected), at once, and one read under way.
    started = time.monotonic()
    assert capacity() == UNLIMITED and capacity() == UNLIMITED
    assert time.monotonic() - started < 0.1 and cluster.reads == 1
    cluster.release()
    await eventually(lambda: capacity().cpus == 16)

    # Stale: the last figure at once while the next read runs; the new one once it is in.
    await asyncio.sleep(0.25)
    cluster.cpus = 24
    started = time.monotonic()
    assert capacity().cpus == 16 and capacity().cpus == 16
    assert time.monotonic() - started < 0.1 and cluster.reads == 2
    cluster.release()
    await eventually(lambda: capacity().cpus == 24)
    assert cluster.reads == 2  # fresh: no read until the interval has passed


async def test_a_failed_read_keeps_the_last_figure(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cluster = SlowCluster(cpus=16)
    capacity = RayCapacity(cluster_settings(tmp_path), cluster.read, refresh_s=0.2)
    capacity()
    cluster.release()
    await eventually(lambda: capacity().cpus == 16)
    await asyncio.sleep(0.25)
    cluster.failing = True
    capacity()
    cluster.release()
    await eventually(lambda: cluster.reads == 2)
    await asyncio.sleep(0.05)
    assert capacity().cpus == 16 and cluster.reads == 2  # kept, and not read again at once


def test_off_the_event_loop_the_first_read_is_waited_for(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The job service asks in a worker thread: its first answer is the cluster's, not "no limit"."""
    cluster = SlowCluster(cpus=16)
    capacity = RayCapacity(cluster_settings(tmp_path), cluster.read, refresh_s=60)
    threading.Timer(0.2, cluster.release).start()
    results = []
    callers = [threading.Thread(target=lambda: results.append(capacity())) for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(5)
    assert [r.cpus for r in results] == [16, 16, 16]
    assert cluster.reads == 1  # callers that came during the read waited for it, not for reads of their own


def test_a_cluster_without_cpus_reads_as_none_not_as_no_limit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cluster = SlowCluster(cpus=0.0)
    cluster.release()
    assert RayCapacity(cluster_settings(tmp_path), cluster.read)().cpus == 0.0
