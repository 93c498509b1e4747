"""One parameter-server shard: its pieces, their versions, the optimizer and the consistency gate.

Gradient application
    BSP: an :class:`Aggregator` sums each step's gradients; when every active worker's step-``k``
    gradient is in, their average is applied once and every worker's clock moves past ``k``. This is
    synchronous data parallelism: the same update as one worker with an ``N``-times larger batch.

    ASP/SSP: each gradient is applied on arrival. With ``async_scaling`` (the default) it is scaled by
    ``1 / (active workers)``, so one round of ``N`` pushes moves the parameters about as far as one BSP
    step and learning rates carry over between modes; without it each push is a full step (Hogwild
    style, whose rate must then be about ``N`` times smaller). Adam is nearly scale-invariant either way.

Updates run synchronously on the event loop, so a reader never sees a half-applied step.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Mapping
from typing import Any

import torch

from services.paramserver.core.checkpoint import read_checkpoint, should_checkpoint, write_checkpoint
from services.paramserver.core.consistency import AggregatedStep, Aggregator, ConsistencyGate
from shared.errors import AlreadyExists, InvalidArgument
from shared.optim.optimizers import Optimizer, OptimizerState, optimizer_from_config
from shared.sharding import ShardPlan

__all__ = ["ShardState", "should_checkpoint"]

_PARAM, _OPTIM = "param/", "optim/"


def _check_flat(key: str, tensor: object, numel: int | None = None) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32 or tensor.dim() != 1:
        raise InvalidArgument.field(key, "must be a flat float32 tensor")
    if numel is not None and tensor.numel() != numel:
        raise InvalidArgument.field(key, f"has {tensor.numel()} elements, the piece has {numel}")
    return tensor


class ShardState:
    """The state of one shard of one training job.

    Args:
        pieces: Piece key -> initial flat float32 value (copied).
        optimizer: Updates the pieces.
        gate: The job's consistency gate for this shard.
        async_scaling: In ASP/SSP, scale each gradient by ``1 / active workers`` (see module doc).
        versions: Initial piece versions (a restored shard's); 0 for every piece if omitted.

    Raises:
        InvalidArgument: If there are no pieces or one is not a flat float32 tensor.
    """

    def __init__(
        self,
        pieces: Mapping[str, torch.Tensor],
        optimizer: Optimizer,
        gate: ConsistencyGate,
        *,
        async_scaling: bool = True,
        versions: Mapping[str, int] | None = None,
    ) -> None:
        if not pieces:
            raise InvalidArgument.field("pieces", "a shard needs at least one piece")
        self._params = {key: _check_flat(key, t).detach().clone() for key, t in sorted(pieces.items())}
        self._versions = dict.fromkeys(self._params, 0)
        for key, version in (versions or {}).items():
            if key not in self._params or isinstance(version, bool) or not isinstance(version, int) or version < 0:
                raise InvalidArgument.field("versions", f"bad version {version!r} for piece {key!r}")
            self._versions[key] = version
        self.optimizer = optimizer
        self.gate = gate
        self.async_scaling = async_scaling
        self._aggregator = Aggregator(gate.active_workers, gate.min_clock) if gate.mode == "bsp" else None
        # Versions restart from a checkpoint's after a restore, so the same number could name two
        # different values; a worker whose cache came from another incarnation must refetch everything.
        self.incarnation = uuid.uuid4().hex

    @classmethod
    def from_plan(
        cls,
        plan: ShardPlan,
        shard: int,
        params: Mapping[str, torch.Tensor],
        optimizer: Optimizer,
        gate: ConsistencyGate,
        *,
        async_scaling: bool = True,
    ) -> ShardState:
        """A shard holding its share (per ``plan``) of the full parameters ``params`` (name -> tensor).

        Raises:
            InvalidArgument: If a parameter the shard needs is missing or has the wrong size.
        """
        pieces: dict[str, torch.Tensor] = {}
        for piece in plan.for_shard(shard):
            if piece.param not in params:
                raise InvalidArgument.field(piece.param, "missing from the initial parameters")
            value = params[piece.param].detach().to(torch.float32)
            pieces[piece.key] = plan.split(piece.param, value)[piece.key]
        return cls(pieces, optimizer, gate, async_scaling=async_scaling)

    @property
    def keys(self) -> list[str]:
        return list(self._params)

    @property
    def step(self) -> int:
        """Steps every active worker has completed here (the slowest clock)."""
        return self.gate.min_clock

    def versions(self) -> dict[str, int]:
        return dict(self._versions)

    def values(self) -> dict[str, torch.Tensor]:
        """Copies of every piece."""
        return {key: t.clone() for key, t in self._params.items()}

    def changed_since(
        self, versions: Mapping[str, int], incarnation: str | None = None
    ) -> dict[str, tuple[int, torch.Tensor]]:
        """The pieces whose version differs from what the caller holds.

        Args:
            versions: Piece key -> version the caller has; pieces it lacks are always returned.
            incarnation: The :attr:`incarnation` the caller's versions came from; if it is not this
                one (the shard was restored since), everything is returned.

        Returns:
            Key -> (version, copy of the piece). Copies, so later updates cannot tear what the caller
            is still serializing.

        Raises:
            InvalidArgument: On a key this shard does not hold (the caller uses another plan).
        """
        unknown = sorted(set(versions) - set(self._params))
        if unknown:
            raise InvalidArgument.field("versions", f"keys not on this shard: {unknown[:5]}")
        if incarnation is not None and incarnation != self.incarnation:
            versions = {}
        # "Differs", not "is newer": a cache from before a restore may hold higher numbers.
        return {
            key: (version, self._params[key].clone())
            for key, version in self._versions.items()
            if versions.get(key) != version
        }

    async def read(
        self, worker: int, step: int, versions: Mapping[str, int], timeout: float | None = None
    ) -> dict[str, tuple[int, torch.Tensor]]:
        """Waits until ``worker`` may read for ``step`` (see the gate), then :meth:`changed_since`."""
        await self.gate.wait_to_read(worker, step, timeout)
        return self.changed_since(versions)

    def _check_grads(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        unknown = sorted(set(grads) - set(self._params))
        if unknown:
            raise InvalidArgument.field("grads", f"keys not on this shard: {unknown[:5]}")
        checked = {}
        for key in sorted(grads):
            grad = _check_flat(key, grads[key], self._params[key].numel())
            # One worker's NaN would poison every worker's parameters; refuse it at the door.
            if not bool(torch.isfinite(grad).all()):
                raise InvalidArgument.field(key, "gradient contains NaN or infinity")
            checked[key] = grad
        return checked

    async def apply(self, worker: int, step: int, grads: Mapping[str, torch.Tensor]) -> None:
        """Takes ``worker``'s gradients for ``step``; keys it leaves out count as zero gradients.

        Nothing changes unless every gradient is valid.

        Raises:
            InvalidArgument: On a bad worker or step, an unknown key, or a wrong-sized, non-float32 or
                non-finite gradient.
            FailedPrecondition: If the worker was removed, or (BSP) pushes ahead of the collected step.
            AlreadyExists: If this step from this worker was already taken (a retry: treat as success).
        """
        self.gate.check_worker(worker)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InvalidArgument.field("step", f"must be an integer >= 0, got {step!r}")
        checked = self._check_grads(grads)
        if self._aggregator is not None:
            done = self._aggregator.add(worker, step, checked)
            if done is not None:
                self._apply_aggregated(done)
            return
        if step < self.gate.clock(worker):
            raise AlreadyExists(f"worker {worker}'s step {step} was already applied")
        scale = 1.0 / len(self.gate.active_workers) if self.async_scaling else 1.0
        for key, grad in checked.items():
            self._update(key, grad * scale if scale != 1.0 else grad, step)
        self.gate.pushed(worker, step)

    def _update(self, key: str, grad: torch.Tensor, step: int) -> None:
        self.optimizer.update(key, self._params[key], grad, step=step)
        self._versions[key] += 1

    def _apply_aggregated(self, done: AggregatedStep) -> None:
        for key, grad in done.grads.items():
            self._update(key, grad, done.step)
        for worker in self.gate.active_workers | done.contributors:
            self.gate.pushed(worker, done.step)

    def remove_worker(self, worker: int) -> None:
        """Stops waiting for ``worker``; in BSP, applies the step if it was the last one missing."""
        self.gate.remove_worker(worker)
        if self._aggregator is not None:
            done = self._aggregator.remove_worker(worker)
            if done is not None:
                self._apply_aggregated(done)

    def replace_worker(self, worker: int) -> int:
        """(Re)admits ``worker``; returns the step it should compute next."""
        if self._aggregator is None:
            return self.gate.replace_worker(worker)
        # In BSP the only step anyone can push is the one being collected.
        resume = self.gate.replace_worker(worker, at=self._aggregator.step)
        self._aggregator.add_worker(worker)
        return resume

    def _snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        state = self.optimizer.export_state()
        tensors = {_PARAM + key: t.clone() for key, t in self._params.items()}
        tensors.update({_OPTIM + name: t for name, t in state.tensors.items()})
        document = {
            "step": self.step,
            "versions": dict(self._versions),
            "optimizer": self.optimizer.config(),
            "optimizer_steps": state.steps,
            "consistency": {
                "mode": self.gate.mode,
                "num_workers": self.gate.num_workers,
                "staleness": self.gate.staleness,
            },
            "clocks": {str(w): c for w, c in self.gate.clocks().items()},
            "active": sorted(self.gate.active_workers),
            "async_scaling": self.async_scaling,
        }
        return tensors, document

    def checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Writes parameters, optimizer state, clocks and versions to ``path`` atomically.

        A BSP step still being collected is not saved: after a restore its workers push it again.
        This blocks on disk I/O; from a running loop prefer :meth:`checkpoint_async`.
        """
        tensors, document = self._snapshot()
        write_checkpoint(path, tensors, document)

    async def checkpoint_async(self, path: str | os.PathLike[str]) -> None:
        """:meth:`checkpoint`, snapshotting on the loop (consistent) and writing on a thread."""
        tensors, document = self._snapshot()
        await asyncio.to_thread(write_checkpoint, path, tensors, document)

    @classmethod
    def restore(cls, path: str | os.PathLike[str]) -> ShardState:
        """Rebuilds a shard from :meth:`checkpoint`'s file, with a fresh :attr:`incarnation`.

        Raises:
            NotFound: If there is no file at ``path``.
            InvalidArgument: If the file is not a valid shard checkpoint.
        """
        tensors, doc = read_checkpoint(path)
        try:
            consistency, clocks = doc["consistency"], {int(w): c for w, c in doc["clocks"].items()}
            gate = ConsistencyGate(consistency["mode"], consistency["num_workers"], consistency["staleness"])
            gate.load_clocks(clocks, doc["active"])
            optimizer = optimizer_from_config(doc["optimizer"])
            versions, steps, async_scaling = doc["versions"], doc["optimizer_steps"], doc["async_scaling"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidArgument(f"{os.fspath(path)} has incomplete checkpoint metadata: {exc!r}") from None
        pieces = {name.removeprefix(_PARAM): t for name, t in tensors.items() if name.startswith(_PARAM)}
        optim = {name.removeprefix(_OPTIM): t for name, t in tensors.items() if name.startswith(_OPTIM)}
        if set(versions) != set(pieces) or not set(steps) <= set(pieces):
            raise InvalidArgument(f"{os.fspath(path)} is inconsistent: versions and pieces disagree")
        for name, tensor in optim.items():
            key = name.rpartition("/")[0]
            if key not in pieces:
                raise InvalidArgument(f"{os.fspath(path)} has optimizer state {name!r} for no piece")
            _check_flat(name, tensor, pieces[key].numel())
        optimizer.import_state(OptimizerState(tensors=optim, steps=steps))
        return cls(pieces, optimizer, gate, async_scaling=bool(async_scaling), versions=versions)
