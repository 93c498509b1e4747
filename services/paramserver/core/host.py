"""What one parameter-server process serves: at most one training job's shard, from init to checkpoints.

:class:`ShardHost` is the core behind the gRPC servicer: it validates a job's configuration
(``core.config``), builds
(or restores) the shard's :class:`ShardState`, decodes pushed gradients, answers pulls once the
consistency mode allows, and writes checkpoints to ``<checkpoint_dir>/<job_id>/shard-<i>.safetensors``.

Everything runs on one asyncio event loop (as :class:`ShardState` requires); only building the
initial model and disk I/O go to threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch

from services.paramserver.core.config import (
    CheckpointResult,
    InitResult,
    PullResult,
    PushResult,
    ShardConfig,
    ShardStatus,
    checkpoint_path,
    describe_value,
    validate,
)
from services.paramserver.core.consistency import ConsistencyGate
from services.paramserver.core.shard import ShardState, should_checkpoint
from shared.artifacts import ArtifactError, Manifest, build_model
from shared.compression import CODECS, Encoded, EncodingError, decode
from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Unavailable
from shared.names import check_name
from shared.optim.optimizers import Optimizer
from shared.sharding import ShardPlan, plan_for_state

__all__ = ["MAX_WIRE_BYTES_PER_ELEMENT", "ShardHost"]

log = structlog.get_logger("maas.paramserver")

#: Pieces are at most this many elements when the config says 0 (4 MB of float32).

#: The most bytes any codec puts on the wire per element: top-k at ratio 1 sends an int32 index and a
#: float32 value (int8 with one-element buckets sends 5). Bounds what a push may declare.
MAX_WIRE_BYTES_PER_ELEMENT = 8
_WIRE_SLACK_BYTES = 64


def _initial_params(manifest: Manifest, seed: int) -> dict[str, torch.Tensor]:
    # The same values every worker gets from torch.manual_seed(seed); build_model(manifest); forking the
    # RNG keeps this process's global generator where it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = build_model(manifest)
        except ArtifactError as exc:
            raise InvalidArgument.field("config.model", str(exc)) from None
    return {name: t for name, t in model.state_dict().items() if t.is_floating_point()}


@dataclass
class _Job:
    config: ShardConfig
    state: ShardState
    plan: ShardPlan
    path: Path
    restored: bool
    numels: dict[str, int]
    last_checkpoint_step: int = 0
    checkpoint_due: int = 0
    last_checkpoint_error: str | None = None
    bytes_received: int = 0
    checkpoint_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def result(self) -> InitResult:
        return InitResult(
            restored=self.restored,
            step=self.state.step,
            incarnation=self.state.incarnation,
            keys=self.state.keys,
            plan_fingerprint=self.plan.fingerprint(),
        )


def _load(config: ShardConfig, optimizer: Optimizer, manifest: Manifest, path: Path) -> _Job:
    """Builds or restores the shard (blocking: runs on a thread)."""
    if path.is_file():
        plan = plan_for_state(build_model(manifest, "meta").state_dict(), config.num_shards, config.max_piece_elements)
        state = ShardState.restore(path)
        _check_restored(state, plan, config, optimizer, path)
        restored, step = True, state.step
    else:
        params = _initial_params(manifest, config.seed)
        plan = plan_for_state(params, config.num_shards, config.max_piece_elements)
        gate = ConsistencyGate(config.consistency, config.num_workers, config.staleness)
        state = ShardState.from_plan(plan, config.shard_index, params, optimizer, gate)
        restored, step = False, 0
    numels = {p.key: p.numel for p in plan.for_shard(config.shard_index)}
    return _Job(config, state, plan, path, restored, numels, last_checkpoint_step=step, checkpoint_due=step)


def _check_restored(state: ShardState, plan: ShardPlan, config: ShardConfig, optimizer: Optimizer, path: Path) -> None:
    expected = {p.key: p.numel for p in plan.for_shard(config.shard_index)}
    values = state.values()
    if {k: v.numel() for k, v in values.items()} != expected:
        raise FailedPrecondition(
            f"checkpoint {path} holds other pieces than shard {config.shard_index} of {config.num_shards} of "
            f"this model: was it written for another model, shard count or max_piece_elements?"
        )
    gate = state.gate
    if (gate.mode, gate.num_workers, gate.staleness) != (config.consistency, config.num_workers, config.staleness):
        raise FailedPrecondition(
            f"checkpoint {path} was written for {gate.mode} with {gate.num_workers} workers and staleness "
            f"{gate.staleness}, the config asks for {config.consistency} with {config.num_workers} and "
            f"{config.staleness}"
        )
    if optimizer.name != state.optimizer.name:
        raise FailedPrecondition(
            f"checkpoint {path} holds {state.optimizer.name} state, the config asks for {optimizer.name}"
        )
    # The config's hyperparameters and schedule govern from here on (e.g. a lowered rate on resume);
    # the optimizer state carries over.
    optimizer.import_state(state.optimizer.export_state())
    state.optimizer = optimizer


class ShardHost:
    """Holds at most one job's shard and serves it.

    Args:
        checkpoint_root: Directory that relative ``checkpoint_dir`` values resolve inside.
        pull_timeout_s: How long a pull waits for slower workers when the caller sets no wait.
    """

    def __init__(self, checkpoint_root: str | os.PathLike[str], *, pull_timeout_s: float = 300.0) -> None:
        if not pull_timeout_s > 0:
            raise InvalidArgument.field("pull_timeout_s", f"must be > 0, got {pull_timeout_s!r}")
        self.checkpoint_root = Path(checkpoint_root)
        self.pull_timeout_s = pull_timeout_s
        self._job: _Job | None = None
        self._init_lock = asyncio.Lock()

    @property
    def job_id(self) -> str | None:
        return None if self._job is None else self._job.config.job_id

    def _require(self, job_id: str) -> _Job:
        job = self._job
        if job is None or job.config.job_id != job_id:
            raise FailedPrecondition(f"shard not initialised for job {describe_value(job_id)}")
        return job

    def check_job(self, job_id: str) -> None:
        """Raises FailedPrecondition unless this shard holds ``job_id``."""
        self._require(job_id)

    def push_limits(self, job_id: str) -> dict[str, int]:
        """Piece key -> the most payload bytes a push may declare for it (any codec)."""
        job = self._require(job_id)
        return {key: numel * MAX_WIRE_BYTES_PER_ELEMENT + _WIRE_SLACK_BYTES for key, numel in job.numels.items()}

    async def init(self, config: ShardConfig) -> InitResult:
        """Takes ``config``'s job: restores its checkpoint if there is one, else builds the seeded model.

        Idempotent: the same config again reports the state the shard has.

        Raises:
            InvalidArgument: On an invalid config.
            FailedPrecondition: If the shard holds another job, or this job with another config, or the
                checkpoint does not fit the config.
        """
        check_name(config.job_id, "config.job_id")
        async with self._init_lock:
            job = self._job
            if job is not None:
                if job.config.job_id != config.job_id:
                    raise FailedPrecondition(
                        f"shard already holds job {describe_value(job.config.job_id)}; start another shard for job "
                        f"{describe_value(config.job_id)}"
                    )
                if job.config != config:
                    changed = [
                        f.name
                        for f in dataclasses.fields(ShardConfig)
                        if getattr(job.config, f.name) != getattr(config, f.name)
                    ]
                    raise FailedPrecondition(
                        f"shard already holds job {describe_value(config.job_id)} with another configuration "
                        f"(differs in {', '.join(changed)})"
                    )
                return job.result()
            optimizer, manifest = validate(config)
            path = checkpoint_path(self.checkpoint_root, config)
            self._job = await asyncio.to_thread(_load, config, optimizer, manifest, path)
            return self._job.result()

    async def push(self, job_id: str, worker: int, step: int, encoded: Mapping[str, Encoded]) -> PushResult:
        """Decodes and applies one worker's gradients for ``step``; a retried step is a duplicate.

        Raises:
            FailedPrecondition: If the shard does not hold the job, the worker was removed, or (BSP) it
                pushes ahead of the step being collected.
            InvalidArgument: On a bad worker or step, an unknown key, or a malformed, wrong-sized or
                non-finite gradient. Nothing is applied then.
        """
        job = self._require(job_id)
        job.state.gate.check_worker(worker)
        grads: dict[str, torch.Tensor] = {}
        received = 0
        for key, tensor in encoded.items():
            numel = job.numels.get(key)
            if numel is None:
                raise InvalidArgument.field(key, f"is not a piece of shard {job.config.shard_index}")
            if tensor.codec not in CODECS:
                raise InvalidArgument.field(key, f"unknown codec {tensor.codec!r}; known codecs: {', '.join(CODECS)}")
            try:
                grads[key] = decode(tensor, expected_shape=(numel,))
            except EncodingError as exc:
                raise InvalidArgument.field(key, str(exc)) from None
            received += tensor.nbytes
        job.bytes_received += received
        try:
            await job.state.apply(worker, step, grads)
        except AlreadyExists:
            return PushResult(bytes_received=received, duplicate=True)
        await self._periodic_checkpoint(job)
        return PushResult(bytes_received=received, duplicate=False)

    async def pull(
        self,
        job_id: str,
        worker: int,
        step: int,
        versions: Mapping[str, int],
        incarnation: str = "",
        timeout: float | None = None,
    ) -> PullResult:
        """Waits until ``worker`` may read for ``step``, then returns the pieces whose version it lacks.

        Args:
            versions: Piece key -> version the worker holds.
            incarnation: The incarnation those versions came from; another one (or none) gets everything.
            timeout: Seconds to wait for slower workers; None or 0 waits the host's default.

        Raises:
            FailedPrecondition: If the shard does not hold the job, or the worker is removed or asks for a
                step beyond its next.
            InvalidArgument: On a bad worker, step, timeout or a key not on this shard.
            DeadlineExceeded: If slower workers do not catch up in time (the message names them).
        """
        job = self._require(job_id)
        unknown = sorted(set(versions) - set(job.numels))
        if unknown:
            raise InvalidArgument.field("versions", f"keys not on shard {job.config.shard_index}: {unknown[:5]}")
        if timeout is not None and (not math.isfinite(timeout) or timeout < 0):
            raise InvalidArgument.field("wait_timeout_s", f"must be a finite number >= 0, got {timeout!r}")
        await job.state.gate.wait_to_read(worker, step, timeout or self.pull_timeout_s)
        tensors = job.state.changed_since(versions, incarnation)
        return PullResult(incarnation=job.state.incarnation, step=job.state.step, tensors=tensors)

    async def replace_worker(self, job_id: str, worker: int) -> int:
        """(Re)admits ``worker``; returns the step it should compute next."""
        return self._require(job_id).state.replace_worker(worker)

    async def checkpoint(self, job_id: str) -> CheckpointResult:
        """Writes the shard's checkpoint now.

        Raises:
            Unavailable: If the file cannot be written (the message says why; retry later).
        """
        job = self._require(job_id)
        step = await self._write_checkpoint(job)
        # Relative to the checkpoint root: where this host keeps its files is not the caller's business.
        root = self.checkpoint_root.resolve()
        path = job.path.relative_to(root) if job.path.is_relative_to(root) else Path(job.path.name)
        return CheckpointResult(step=step, path=str(path))

    async def status(self, job_id: str) -> ShardStatus:
        job = self._require(job_id)
        return ShardStatus(
            job_id=job.config.job_id,
            shard_index=job.config.shard_index,
            step=job.state.step,
            worker_clocks=job.state.gate.clocks(),
            parameters=sum(job.numels.values()),
            bytes_received=job.bytes_received,
            last_checkpoint_step=job.last_checkpoint_step,
            incarnation=job.state.incarnation,
            last_checkpoint_error=job.last_checkpoint_error,
        )

    async def close(self) -> None:
        """Waits for a checkpoint being written to finish."""
        if self._job is not None:
            async with self._job.checkpoint_lock:
                pass

    async def _periodic_checkpoint(self, job: _Job) -> None:
        step = job.state.step
        if step <= job.checkpoint_due or not should_checkpoint(step, job.config.checkpoint_interval):
            return
        job.checkpoint_due = step
        try:
            await self._write_checkpoint(job)
        except Unavailable as exc:
            # The push itself was applied; the next interval tries again and status reports the error.
            log.warning("checkpoint_failed", job_id=job.config.job_id, step=step, error=exc.message)

    async def _write_checkpoint(self, job: _Job) -> int:
        # One writer at a time, so an older snapshot never lands after a newer one.
        async with job.checkpoint_lock:
            try:
                await asyncio.to_thread(job.path.parent.mkdir, parents=True, exist_ok=True)
                # checkpoint_async snapshots before its first await: this is the step it saves.
                step = job.state.step
                await job.state.checkpoint_async(job.path)
            except OSError as exc:
                job.last_checkpoint_error = f"{type(exc).__name__}: {exc.strerror or exc}"
                raise Unavailable(f"could not write checkpoint {job.path}: {exc.strerror or exc}") from None
            job.last_checkpoint_step = step
            job.last_checkpoint_error = None
            return step
