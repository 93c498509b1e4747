"""BSP gradient aggregation: one step's gradients from every active worker, averaged and applied once."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from shared.errors import AlreadyExists, FailedPrecondition

__all__ = ["AggregatedStep", "Aggregator"]


@dataclass(frozen=True)
class AggregatedStep:
    """One BSP step's gradients, averaged over the workers that sent them."""

    step: int
    grads: dict[str, torch.Tensor]
    contributors: frozenset[int]


class Aggregator:
    """Collects one BSP step's gradients from every active worker and averages them.

    Only per-key running sums are kept (memory of one gradient copy, not one per worker), and only for
    the step being collected: in BSP nobody can compute step ``k + 1`` before step ``k`` is applied.
    The average divides by the number of workers that sent anything for the step; a key a worker
    left out counts as a zero gradient from it (as torch treats a parameter with no gradient).
    Arrival order decides summation order, so results can differ across runs in the last bits.

    Args:
        workers: The workers expected to contribute.
        start_step: The first step to collect.
    """

    def __init__(self, workers: Iterable[int], start_step: int = 0) -> None:
        self._expected = set(workers)
        self.step = start_step
        self._sums: dict[str, torch.Tensor] = {}
        self._received: set[int] = set()

    @property
    def received(self) -> frozenset[int]:
        """Workers whose gradients for the current step are in."""
        return frozenset(self._received)

    def add(self, worker: int, step: int, grads: Mapping[str, torch.Tensor]) -> AggregatedStep | None:
        """Adds one worker's gradients for ``step``.

        Returns:
            The averaged step if this completed it, else None.

        Raises:
            FailedPrecondition: If the worker is not expected or the step is ahead of the one collected.
            AlreadyExists: If the step is already applied or this worker already sent it (a retried
                push: the caller may treat it as success).
        """
        if worker not in self._expected:
            raise FailedPrecondition(f"worker {worker} is not part of the job")
        if step < self.step:
            raise AlreadyExists(f"step {step} was already applied (collecting step {self.step})")
        if step > self.step:
            raise FailedPrecondition(f"worker {worker} pushed step {step} while step {self.step} is being collected")
        if worker in self._received:
            raise AlreadyExists(f"worker {worker} already pushed step {step}")
        for key, grad in grads.items():
            total = self._sums.get(key)
            if total is None:
                # A copy: the caller's tensor may be a view of a buffer it reuses.
                self._sums[key] = grad.detach().clone()
            else:
                total.add_(grad)
        self._received.add(worker)
        return self._complete()

    def add_worker(self, worker: int) -> None:
        """Expects ``worker`` from the current step on."""
        self._expected.add(worker)

    def remove_worker(self, worker: int) -> AggregatedStep | None:
        """Stops expecting ``worker``; returns the step if it was only waiting for that worker.

        Gradients it already sent for the current step stay in: they were computed from the right
        parameters.
        """
        self._expected.discard(worker)
        return self._complete()

    def _complete(self) -> AggregatedStep | None:
        if not self._received or not self._expected <= self._received:
            return None
        count = len(self._received)
        done = AggregatedStep(
            step=self.step,
            grads={key: total.div_(count) for key, total in self._sums.items()},
            contributors=frozenset(self._received),
        )
        self._sums, self._received = {}, set()
        self.step += 1
        return done
