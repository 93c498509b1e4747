"""Resolved dynamic batching settings of one served model version (free of grpc and generated code)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import InvalidArgument

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_QUEUE_DELAY_US",
    "DEFAULT_MAX_QUEUE_SIZE",
    "BatchingSettings",
]

#: Defaults applied where a ``BatchingConfig`` leaves a field at 0 (see ``worker.proto``).
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_QUEUE_DELAY_US = 2000
DEFAULT_MAX_QUEUE_SIZE = 1024


@dataclass(frozen=True)
class BatchingSettings:
    """Dynamic batching of one served version, with every default resolved.

    Attributes:
        max_batch_size: Largest batch the batcher forms and a request may carry; 1 disables batching.
        max_queue_delay_us: Longest a request waits for others to join its batch (only while others are
            queued or a batch is running).
        preferred_batch_sizes: Batch sizes dispatched at once when they can be formed, ascending.
        default_timeout_us: Longest a request may wait in the queue; 0 waits until its deadline.
        max_queue_size: Requests queued at most; beyond it requests are rejected.
    """

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US
    preferred_batch_sizes: tuple[int, ...] = ()
    default_timeout_us: int = 0
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise InvalidArgument.field("batching.max_batch_size", f"must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise InvalidArgument.field("batching.max_queue_delay_us", f"must be >= 0, got {self.max_queue_delay_us}")
        if self.default_timeout_us < 0:
            raise InvalidArgument.field("batching.default_timeout_us", f"must be >= 0, got {self.default_timeout_us}")
        if self.max_queue_size < 1:
            raise InvalidArgument.field("batching.max_queue_size", f"must be >= 1, got {self.max_queue_size}")
        sizes = tuple(sorted(set(self.preferred_batch_sizes)))
        for size in sizes:
            if not 1 <= size <= self.max_batch_size:
                raise InvalidArgument.field(
                    "batching.preferred_batch_sizes",
                    f"{size} is outside 1..max_batch_size ({self.max_batch_size})",
                )
        object.__setattr__(self, "preferred_batch_sizes", sizes)

    @classmethod
    def resolve(
        cls,
        max_batch_size: int = 0,
        max_queue_delay_us: int = 0,
        preferred_batch_sizes: tuple[int, ...] | list[int] = (),
        default_timeout_us: int = 0,
        max_queue_size: int = 0,
    ) -> BatchingSettings:
        """Builds settings from raw config values where 0 means "the default" (the proto's convention)."""
        return cls(
            max_batch_size=max_batch_size or DEFAULT_MAX_BATCH_SIZE,
            max_queue_delay_us=max_queue_delay_us or DEFAULT_MAX_QUEUE_DELAY_US,
            preferred_batch_sizes=tuple(preferred_batch_sizes),
            default_timeout_us=default_timeout_us,
            max_queue_size=max_queue_size or DEFAULT_MAX_QUEUE_SIZE,
        )
