"""The worker's Prometheus metrics: the core's :class:`HostObserver`, recording into the service's registry.

Every family is labelled by ``model`` and ``version``. Labelled children are resolved once per loaded
version, so the per-request cost is one ``observe``/``inc`` on a cached child.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.inference.core.observer import VersionObserver

__all__ = ["BATCH_SIZE_BUCKETS", "DURATION_BUCKETS", "PrometheusObserver"]

#: Queue waits and executions of small models take tens of microseconds: finer than the RPC buckets.
DURATION_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: Powers of two from 1 to 1024 samples (larger batches fall in +Inf).
BATCH_SIZE_BUCKETS = tuple(float(2**i) for i in range(11))

_LABELS = ("model", "version")


class _VersionMetrics:
    """One version's children, bound once at load time."""

    __slots__ = ("_compute", "_depth", "_fail", "_queue", "_rejected", "_size", "_success")

    def __init__(self, metrics: PrometheusObserver, model: str, version: str) -> None:
        self._queue = metrics.queue_seconds.labels(model, version).observe
        self._size = metrics.batch_size.labels(model, version).observe
        self._compute = metrics.compute_seconds.labels(model, version).observe
        self._success = metrics.requests.labels(model, version, "success").inc
        self._fail = metrics.requests.labels(model, version, "fail").inc
        self._rejected = metrics.requests.labels(model, version, "rejected").inc
        depth = metrics.queue_depth.labels(model, version)
        depth.set(0)
        self._depth = depth.set

    def queued(self, wait_ns: int) -> None:
        self._queue(wait_ns / 1e9)

    def executed(self, batch_size: int, compute_ns: int) -> None:
        self._size(batch_size)
        self._compute(compute_ns / 1e9)

    def finished(self, ok: bool) -> None:
        (self._success if ok else self._fail)()

    def rejected(self) -> None:
        self._rejected()

    def queue_depth(self, depth: int) -> None:
        self._depth(depth)


class PrometheusObserver:
    """Registers the worker's metric families in ``registry`` and records the core's events in them.

    Counters and histograms of an unloaded version stay (a reload continues them); its gauges are removed,
    so ``maas_inference_loaded_bytes`` sums to the weights the worker holds now.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.queue_seconds = Histogram(
            "maas_inference_queue_seconds",
            "Time requests waited in the batcher's queue, from enqueue to dispatch.",
            _LABELS,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "maas_inference_batch_size",
            "Samples per model execution (formed batches; generation steps count 1).",
            _LABELS,
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.compute_seconds = Histogram(
            "maas_inference_compute_seconds",
            "Time per model execution: input preparation, compute and output extraction.",
            _LABELS,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "maas_inference_requests",
            "Requests that reached a version's batcher, by outcome: success, fail (error, queue timeout, "
            "cancelled) or rejected (queue full, unloading).",
            (*_LABELS, "outcome"),
            registry=registry,
        )
        self.queue_depth = Gauge(
            "maas_inference_queue_depth", "Requests queued, not yet dispatched.", _LABELS, registry=registry
        )
        self.loaded_bytes = Gauge(
            "maas_inference_loaded_bytes", "Weight bytes a loaded version holds.", _LABELS, registry=registry
        )

    def loaded(self, model: str, version: int, memory_bytes: int) -> VersionObserver:
        label = str(version)
        self.loaded_bytes.labels(model, label).set(memory_bytes)
        return _VersionMetrics(self, model, label)

    def unloaded(self, model: str, version: int) -> None:
        label = str(version)
        self.queue_depth.remove(model, label)
        self.loaded_bytes.remove(model, label)
