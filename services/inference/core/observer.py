"""What the worker's core tells a metrics exporter, as it happens (the exporter lives in ``adapters``).

The core calls these on the event loop, on its hot path: implementations must be cheap (no per-call
label lookups, no I/O) and must not raise.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["NULL_HOST_OBSERVER", "NULL_VERSION_OBSERVER", "HostObserver", "VersionObserver"]


class VersionObserver(Protocol):
    """Events of one served version."""

    def queued(self, wait_ns: int) -> None:
        """One request left the queue for an execution, ``wait_ns`` after it was enqueued."""
        ...

    def executed(self, batch_size: int, compute_ns: int) -> None:
        """One model execution of ``batch_size`` samples took ``compute_ns`` (inputs, compute, outputs)."""
        ...

    def finished(self, ok: bool) -> None:
        """One admitted request ended: succeeded, or failed (error, queue timeout, cancelled)."""
        ...

    def rejected(self) -> None:
        """One request was refused before it was queued (queue full, version unloading)."""
        ...

    def queue_depth(self, depth: int) -> None:
        """The number of queued (not yet dispatched) requests changed to ``depth``."""
        ...


class HostObserver(Protocol):
    """The versions a worker loads and unloads."""

    def loaded(self, model: str, version: int, memory_bytes: int) -> VersionObserver:
        """A version now holds ``memory_bytes`` of weights; returns the observer of its events."""
        ...

    def unloaded(self, model: str, version: int) -> None:
        """A version was unloaded: its weights are released."""
        ...


class _NullVersionObserver:
    def queued(self, wait_ns: int) -> None:
        pass

    def executed(self, batch_size: int, compute_ns: int) -> None:
        pass

    def finished(self, ok: bool) -> None:
        pass

    def rejected(self) -> None:
        pass

    def queue_depth(self, depth: int) -> None:
        pass


class _NullHostObserver:
    def loaded(self, model: str, version: int, memory_bytes: int) -> VersionObserver:
        return NULL_VERSION_OBSERVER

    def unloaded(self, model: str, version: int) -> None:
        pass


#: Observers that ignore everything (the default: unit tests and workers without metrics).
NULL_VERSION_OBSERVER: VersionObserver = _NullVersionObserver()
NULL_HOST_OBSERVER: HostObserver = _NullHostObserver()
