"""Per-version inference statistics in Triton's sense (what ``ModelStatistics`` reports)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from services.inference.core.observer import NULL_VERSION_OBSERVER, VersionObserver

__all__ = ["BatchTimings", "Duration", "VersionStats"]


@dataclass
class Duration:
    """A count of events and their total duration in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, ns)


@dataclass
class BatchTimings:
    """How long one model execution spent preparing inputs, computing and extracting outputs."""

    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0


@dataclass
class BatchSizeStats:
    """Durations of the executions of one batch size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class VersionStats:
    """Cumulative statistics of one served version; updated only on the event loop.

    Per-request durations (``success``, ``fail``, ``queue``, ``compute_*``) count requests, as Triton's
    do: each request of a batch is charged the batch's compute time. ``inference_count`` counts samples,
    ``execution_count`` model executions (batches, or generation steps of a streaming model). Each
    ``record_*`` call is passed on to ``observer`` too (the worker's Prometheus metrics), so both views
    count the same events.
    """

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, BatchSizeStats] = field(default_factory=dict)
    # Tokens produced by streaming generation (each one execution); shows where a cancelled stream stopped.
    generated_tokens: int = 0
    # Requests refused before they were queued (queue full, unloading); not part of Triton's statistics.
    rejected: int = 0
    observer: VersionObserver = field(default=NULL_VERSION_OBSERVER, repr=False, compare=False)

    def record_queued(self, wait_ns: int) -> None:
        """Records one request leaving the queue for an execution, ``wait_ns`` after its arrival."""
        self.queue.add(wait_ns)
        self.observer.queued(wait_ns)

    def record_execution(self, batch_size: int, requests: int, timings: BatchTimings) -> None:
        """Records one model execution of ``batch_size`` samples serving ``requests`` requests."""
        self.execution_count += 1
        self.inference_count += batch_size
        self.last_inference_ms = int(time.time() * 1000)
        per_size = self.batches.setdefault(batch_size, BatchSizeStats())
        per_size.compute_input.add(timings.input_ns)
        per_size.compute_infer.add(timings.infer_ns)
        per_size.compute_output.add(timings.output_ns)
        self.compute_input.add(timings.input_ns * requests, requests)
        self.compute_infer.add(timings.infer_ns * requests, requests)
        self.compute_output.add(timings.output_ns * requests, requests)
        self.observer.executed(batch_size, timings.input_ns + timings.infer_ns + timings.output_ns)

    def record_request(self, ok: bool, total_ns: int) -> None:
        """Records the end of one request (``total_ns`` from arrival to its result)."""
        (self.success if ok else self.fail).add(total_ns)
        self.observer.finished(ok)

    def record_rejected(self) -> None:
        """Records one request refused before it was queued."""
        self.rejected += 1
        self.observer.rejected()
