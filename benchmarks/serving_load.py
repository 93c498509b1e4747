"""The serving benchmark's load generator and its figures: closed-loop concurrency, a fixed request count.

Every system is driven the same way: ``concurrency`` asyncio tasks in the benchmark process each send one
request, await the answer, and send the next, until ``requests`` answers have come back (after ``warmup``
requests that are not counted). Latency is the time each ``await`` took; throughput is answered requests
over the wall time of the counted part. A time cap bounds a point on a slow or stuck system: the point
then reports the requests it finished (and says so).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Point:
    """One measured point: a system, a model, a concurrency."""

    system: str
    model: str
    concurrency: int
    requests: int = 0
    seconds: float = 0.0
    errors: int = 0
    first_error: str | None = None
    capped: bool = False
    client_cpu_seconds: float = 0.0
    machine_cpu_seconds: float | None = None
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Answered requests per second."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        return float(np.percentile(np.asarray(self.latencies_ms), q))

    def serving_cpu_ms(self) -> float | None:
        if self.machine_cpu_seconds is None or not self.requests:
            return None
        return round(max(0.0, self.machine_cpu_seconds - self.client_cpu_seconds) / self.requests * 1000.0, 3)

    def to_json(self) -> dict[str, Any]:
        p50, p99 = self.percentile(50), self.percentile(99)
        return {
            "system": self.system,
            "model": self.model,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "seconds": round(self.seconds, 4),
            "requests_per_s": round(self.throughput, 1),
            "p50_ms": None if p50 is None else round(p50, 3),
            "p99_ms": None if p99 is None else round(p99, 3),
            "mean_ms": round(float(np.mean(self.latencies_ms)), 3) if self.latencies_ms else None,
            "errors": self.errors,
            "first_error": self.first_error,
            "capped": self.capped,
            "client_cpu_seconds": round(self.client_cpu_seconds, 2),
            "machine_cpu_seconds": None if self.machine_cpu_seconds is None else round(self.machine_cpu_seconds, 2),
            # What the serving side cost: the machine's busy CPU minus the load generator's, per request.
            "serving_cpu_ms_per_request": self.serving_cpu_ms(),
            **self.extra,
        }


async def closed_loop(
    point: Point,
    call: Callable[[], Awaitable[object]],
    requests: int,
    warmup: int,
    time_cap_s: float,
    machine_cpu: Callable[[], float] | None = None,
) -> Point:
    """Drives ``call`` at ``point.concurrency`` until ``requests`` answers (after ``warmup``), filling ``point``.

    Args:
        point: Where the figures go (system, model and concurrency already set).
        call: Sends one request and returns when it is answered; exceptions count as errors.
        requests: Answers to count.
        warmup: Answers before counting starts (same concurrency), so connections, caches and batchers settle.
        time_cap_s: Stop issuing requests after this long (counted part only); the point is then ``capped``.
        machine_cpu: CPU seconds the whole machine has been busy so far (client and servers), if known.
    """
    concurrency = point.concurrency
    budget = [warmup]

    async def drive(latencies: list[float] | None, deadline: float) -> None:
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            started = time.perf_counter()
            try:
                await call()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed request is a figure, not a crash
                point.errors += 1
                if point.first_error is None:
                    point.first_error = f"{type(exc).__name__}: {str(exc)[:300]}"
                continue
            if latencies is not None:
                latencies.append((time.perf_counter() - started) * 1000.0)

    if warmup:
        await asyncio.gather(*(drive(None, time.perf_counter() + time_cap_s) for _ in range(concurrency)))
    point.errors, point.first_error = 0, None
    budget[0] = requests
    cpu_before = machine_cpu() if machine_cpu else None
    client_before = time.process_time()
    started = time.perf_counter()
    deadline = started + time_cap_s
    await asyncio.gather(*(drive(point.latencies_ms, deadline) for _ in range(concurrency)))
    point.seconds = time.perf_counter() - started
    point.client_cpu_seconds = time.process_time() - client_before
    if machine_cpu is not None and cpu_before is not None:
        point.machine_cpu_seconds = machine_cpu() - cpu_before
    point.requests = len(point.latencies_ms)
    point.capped = budget[0] > 0
    return point


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine have spent busy (user, nice, system, irq, softirq) since boot."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator
