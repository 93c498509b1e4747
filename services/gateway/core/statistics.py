"""Per-version inference statistics (Triton's ModelStatistics) and how the gateway merges the workers'."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Duration:
    """A count and the nanoseconds those took."""

    count: int = 0
    ns: int = 0

    def add(self, other: Duration) -> None:
        self.count += other.count
        self.ns += other.ns


@dataclass
class BatchStats:
    """Timings of the executions of one batch size."""

    batch_size: int
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)

    def add(self, other: BatchStats) -> None:
        self.compute_input.add(other.compute_input)
        self.compute_infer.add(other.compute_infer)
        self.compute_output.add(other.compute_output)


@dataclass
class VersionStats:
    """Statistics of one model version (at one worker, or summed over a deployment's)."""

    name: str
    version: str
    last_inference: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batch_stats: dict[int, BatchStats] = field(default_factory=dict)

    def add(self, other: VersionStats) -> None:
        """Sum counts and times, merge batch statistics by batch size, keep the latest inference."""
        self.last_inference = max(self.last_inference, other.last_inference)
        self.inference_count += other.inference_count
        self.execution_count += other.execution_count
        for name in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
            getattr(self, name).add(getattr(other, name))
        for size, batch in other.batch_stats.items():
            mine = self.batch_stats.get(size)
            if mine is None:
                mine = self.batch_stats[size] = BatchStats(size)
            mine.add(batch)


def merge(name: str, versions: Iterable[int], reports: Iterable[Iterable[VersionStats]]) -> list[VersionStats]:
    """One entry per version in ``versions`` (named ``name``), summing the workers' ``reports``.

    Workers report under their registry model's name; a replica belongs to one deployment, so every version
    it reports is this deployment's. Versions the deployment does not serve (any more) are left out.
    """
    merged = {v: VersionStats(name, str(v)) for v in sorted(versions)}
    for report in reports:
        for stats in report:
            try:
                number = int(stats.version)
            except ValueError:
                continue
            if number in merged:
                merged[number].add(stats)
    return list(merged.values())
