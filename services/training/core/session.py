"""A worker's life: run the rank, publish progress to watchers, and (rank 0) hand the result to a sink."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from torch import nn

from services.training.core.loop import StepReport
from services.training.core.ports import ShardClient
from services.training.core.worker import WorkerResult, WorkerSpec, run_worker
from shared.artifacts import Manifest
from shared.errors import MaasError

# Registers rank 0's trained model; returns the registry version number.
ModelSink = Callable[[nn.Module, Manifest, dict[str, float]], Awaitable[int]]


class WorkerState(enum.StrEnum):
    STARTING = "STARTING"
    TRAINING = "TRAINING"
    EVALUATING = "EVALUATING"
    DONE = "DONE"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


TERMINAL = {WorkerState.DONE, WorkerState.FAILED, WorkerState.STOPPED}


@dataclass
class WorkerStatus:
    job_id: str
    rank: int
    state: WorkerState
    step: int
    total_steps: int
    error: str = ""
    error_reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    model_version: int = 0


Event = WorkerStatus | StepReport


class WorkerSession:
    """Runs one rank in the background; watchers get the status, progress, and the final status."""

    def __init__(self, spec: WorkerSpec, shards: list[ShardClient], sink: ModelSink, *, resume: bool) -> None:
        self.spec = spec
        self._shards = shards
        self._sink = sink
        self._resume = resume
        self.status = WorkerStatus(spec.job_id, spec.rank, WorkerState.STARTING, 0, spec.total_steps)
        self._watchers: set[asyncio.Queue[Event]] = set()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        """Start the rank in the background; returns its task (done once the rank ended, whatever way)."""
        self._task = asyncio.create_task(self._run())
        return self._task

    async def _run(self) -> None:
        try:
            self._set(state=WorkerState.TRAINING)
            result = await run_worker(
                self.spec, self._shards, resume=self._resume, progress=self._progress, stop=self._stop
            )
            if self._stop.is_set() and result.steps < self.spec.total_steps:
                self._set(state=WorkerState.STOPPED, step=result.steps)
                return
            await self._finish(result)
        except asyncio.CancelledError:
            self._set(state=WorkerState.STOPPED)
            raise
        except MaasError as exc:
            self._set(state=WorkerState.FAILED, error=exc.message, error_reason=type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - a worker reports every failure instead of dying silently
            self._set(state=WorkerState.FAILED, error=f"{type(exc).__name__}: {exc}", error_reason="INTERNAL")

    async def _finish(self, result: WorkerResult) -> None:
        version = 0
        if result.model is not None and result.manifest is not None:
            self._set(state=WorkerState.EVALUATING, step=result.steps, metrics=result.metrics)
            version = await self._sink(result.model, result.manifest, result.metrics)
        self._set(state=WorkerState.DONE, step=result.steps, model_version=version)

    def _progress(self, report: StepReport) -> None:
        self.status.step = report.step + 1
        self._publish(report)

    def _set(self, **changes: object) -> None:
        self.status = dataclasses.replace(self.status, **changes)  # type: ignore[arg-type]
        self._publish(dataclasses.replace(self.status))

    def _publish(self, event: Event) -> None:
        for queue in self._watchers:
            if queue.full():
                if isinstance(event, StepReport):
                    continue  # a slow watcher misses progress, never a state change
                queue.get_nowait()
            queue.put_nowait(event)

    async def watch(self) -> AsyncIterator[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=1000)
        self._watchers.add(queue)
        try:
            yield dataclasses.replace(self.status)
            if self.status.state in TERMINAL:
                return
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, WorkerStatus) and event.state in TERMINAL:
                    return
        finally:
            self._watchers.discard(queue)

    async def stop(self) -> WorkerStatus:
        """Ask the loop to stop after the current step; wait a little for it, then cancel it."""
        self._stop.set()
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 10)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        return self.status
