"""Runs training jobs on Ray (the scheduler is the mesh's only Ray driver).

A job is a gang (:mod:`ray_gang`): parameter-server shards, then workers, each a Ray actor hosting its
service's gRPC server. The runner follows every worker's ``WatchWorker`` stream and recovers:

- a lost **worker** is replaced in its bundle; the new one asks the shards where to resume
  (``ReplaceWorker``) and the others, waiting at the BSP gate, carry on;
- a lost **shard** is replaced and restores its pieces from its last checkpoint; every worker is
  restarted from that step, the live shards treat the replayed steps as duplicates, so at most one
  checkpoint interval of that shard's updates is redone.

After ``max_failures`` losses the job fails with the reason.

Preemption (``preempt``) checkpoints every shard first (workers keep training meanwhile: what they do after
the checkpoint is the only work lost), then stops the workers, so the job's run returns and its gang is
released. Admitted again, the job is resumed: new shards restore those checkpoints and the workers ask them
where to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import grpc
import structlog
from maas.paramserver.v1 import paramserver_pb2 as ps
from maas.registry.v1 import registry_pb2
from maas.training.v1 import training_pb2 as tr
from maas.training.v1 import training_pb2_grpc
from opentelemetry import trace

from services.scheduler.adapters import ray_cluster, ray_gang
from services.scheduler.adapters.actor_env import actor_env
from services.scheduler.adapters.ray_gang import Gang, Member
from services.scheduler.core.jobs.model import Job, StepMetrics
from services.scheduler.core.jobs.ports import JobReporter
from services.scheduler.settings import SchedulerSettings
from shared.clients.paramserver import ParamServerClient
from shared.grpc.channel import make_channel
from shared.tracing import continue_trace, current_traceparent

log = structlog.get_logger("maas.scheduler.ray")
TRAINING_SERVICE = tr.DESCRIPTOR.services_by_name["TrainingWorker"]


@dataclasses.dataclass
class Outcome:
    kind: str  # done | worker_lost | shard_lost | failed | cancelled
    index: int = -1
    reason: str = ""
    version: int = 0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class RayJobRunner:
    """Implements ``core.ports.JobRunner`` on Ray."""

    def __init__(self, settings: SchedulerSettings) -> None:
        self._settings = settings
        self._connected = False
        self._cancelled: set[str] = set()
        self._gangs: dict[str, Gang] = {}

    def _connect(self) -> None:
        if not self._connected:
            ray_cluster.connect(self._settings)
            self._connected = True

    async def run(self, job: Job, reporter: JobReporter) -> None:
        await self._execute(job, reporter, resume=False)

    async def resume(self, job: Job, reporter: JobReporter) -> None:
        await self._execute(job, reporter, resume=True)

    async def cancel(self, job_id: str) -> None:
        self._cancelled.add(job_id)
        gang = self._gangs.get(job_id)
        if gang is not None:
            await asyncio.gather(*(self._stop_worker(m) for m in gang.workers), return_exceptions=True)

    async def preempt(self, job: Job, grace_s: float) -> None:
        await asyncio.to_thread(self._connect)
        gang = self._gangs.get(job.id)
        orphan = gang is None
        if gang is None:
            gang = await Gang.find(job)  # a previous scheduler process began this preemption
            if gang is None:
                # It was killed as it tore the gang down: what is left (a shard, the placement group) would
                # hold its resources until the job is admitted again, which may be never (a stray) or
                # only after the job it was preempted for, whose placement it would block.
                removed = await asyncio.to_thread(ray_gang.remove_jobs, lambda job_id: job_id == job.id)
                if removed:
                    log.info("preempted_gang_remains_removed", job_id=job.id, removed=sorted(removed))
                return
        await asyncio.gather(*(self._checkpoint(job, shard, grace_s) for shard in gang.shards))
        self._cancelled.add(job.id)
        await asyncio.gather(*(self._stop_worker(m) for m in gang.workers), return_exceptions=True)
        if orphan:
            gang.teardown()

    async def sweep(self, keep: set[str]) -> list[str]:
        await asyncio.to_thread(self._connect)
        return await asyncio.to_thread(ray_gang.sweep, frozenset(keep))

    async def _checkpoint(self, job: Job, shard: Member, grace_s: float) -> None:
        client = ParamServerClient.connect(shard.address, self._settings)
        try:
            result = await client.checkpoint(job.id, timeout=grace_s)
            log.info("shard_checkpointed_for_preemption", job_id=job.id, shard=shard.index, step=result.step)
        except Exception as exc:  # noqa: BLE001 - its last periodic checkpoint (or step 0) is what remains
            log.warning("preemption_checkpoint_failed", job_id=job.id, shard=shard.index, error=str(exc)[:200])
        finally:
            await client.close()

    # The job's life ----------------------------------------------------------------------------------

    async def _execute(self, job: Job, reporter: JobReporter, *, resume: bool) -> None:
        # The run continues the trace of the job's submission: the calls to its shards, its workers (which
        # get this span's context) and, through them, the registry all join that trace.
        span = continue_trace("training job", job.trace_context, {"maas.job_id": job.id, "maas.resume": int(resume)})
        with trace.use_span(span, end_on_exit=True):
            await self._execute_gang(job, reporter, resume=resume)

    async def _execute_gang(self, job: Job, reporter: JobReporter, *, resume: bool) -> None:
        self._cancelled.discard(job.id)  # preempted before, admitted again
        await asyncio.to_thread(self._connect)
        gang = await Gang.find(job) if resume else None
        shutting_down = False
        try:
            if gang is None:
                gang = Gang(job)
                self._gangs[job.id] = gang
                await reporter.placing(job.id)
                timeout_s = self._settings.scheduler_placement_timeout_s
                if not await gang.place(timeout_s):
                    # The scheduler's core decides between requeueing and failing the job.
                    shortage = await asyncio.to_thread(gang.shortage)
                    await reporter.placement_timed_out(job.id, timeout_s, shortage)
                    return
                if job.id in self._cancelled:
                    return  # cancelled or preempted while it was being placed
                # Shards restore from their checkpoints when these exist (a resumed job), workers then
                # ask the shards where to start.
                await self._start_shards(gang)
                await self._start_workers(gang, resume=resume)
            self._gangs[job.id] = gang
            await reporter.running(job.id)
            await self._supervise(job, gang, reporter)
        except asyncio.CancelledError:
            # The scheduler is shutting down: leave the gang for the next process to re-attach to.
            shutting_down = True
            raise
        finally:
            self._gangs.pop(job.id, None)
            if gang is not None and not shutting_down:
                await gang.flush_telemetry()
                gang.teardown()

    async def _supervise(self, job: Job, gang: Gang, reporter: JobReporter) -> None:
        while True:
            outcome = await self._watch(job, gang, reporter)
            if outcome.kind == "done":
                await reporter.succeeded(job.id, outcome.version, outcome.metrics)
                return
            if outcome.kind == "cancelled":
                return
            if outcome.kind == "failed":
                await reporter.failed(job.id, outcome.reason)
                return
            count = await reporter.failure(job.id, outcome.reason)
            log.warning("job_member_lost", job_id=job.id, what=outcome.kind, index=outcome.index, failures=count)
            if count > job.spec.max_failures:
                await reporter.failed(job.id, f"{outcome.reason}; gave up after {count} failures")
                return
            await reporter.placing(job.id)
            if outcome.kind == "worker_lost":
                lost = gang.workers[outcome.index]
                gang.kill(lost)
                await self._start_worker(gang, outcome.index, lost.attempt + 1, resume=True)
            else:
                await asyncio.gather(*(self._stop_worker(m) for m in gang.workers), return_exceptions=True)
                for member in gang.workers:
                    gang.kill(member)
                lost = gang.shards[outcome.index]
                gang.kill(lost)
                await self._start_shard(gang, outcome.index, lost.attempt + 1)
                await self._start_workers(gang, resume=True, attempt_of=lambda rank: gang.workers[rank].attempt + 1)
            await reporter.running(job.id)

    async def _watch(self, job: Job, gang: Gang, reporter: JobReporter) -> Outcome:
        """Follow every worker until all are done, or the first loss or failure."""
        tasks = [asyncio.create_task(self._follow(job, gang, m, reporter)) for m in gang.workers]
        results: list[Outcome] = []
        try:
            for next_done in asyncio.as_completed(tasks):
                outcome = await next_done
                if outcome.kind != "done":
                    return outcome
                results.append(outcome)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        rank0 = next(r for r in results if r.index == 0)
        return Outcome("done", version=rank0.version, metrics=rank0.metrics)

    async def _follow(self, job: Job, gang: Gang, member: Member, reporter: JobReporter) -> Outcome:
        channel = make_channel(member.address, self._settings, [TRAINING_SERVICE])
        try:
            stub = training_pb2_grpc.TrainingWorkerStub(channel)
            async for event in stub.WatchWorker(tr.WatchWorkerRequest()):
                if event.HasField("progress"):
                    p = event.progress
                    await reporter.progress(
                        job.id, StepMetrics(p.rank, p.step, p.loss, p.samples_per_s, p.bytes_sent, p.bytes_received)
                    )
                    continue
                status = event.status
                if status.state == tr.DONE:
                    return Outcome("done", member.index, version=status.model_version, metrics=dict(status.metrics))
                if status.state == tr.STOPPED:
                    return Outcome("cancelled" if job.id in self._cancelled else "worker_lost", member.index)
                if status.state == tr.FAILED:
                    return await self._diagnose(job, gang, member, status.error, status.error_reason)
        except grpc.aio.AioRpcError as exc:
            return await self._diagnose(job, gang, member, exc.details() or exc.code().name, "Unavailable")
        finally:
            await channel.close()
        return await self._diagnose(job, gang, member, "worker stream ended early", "Unavailable")

    async def _diagnose(self, job: Job, gang: Gang, member: Member, error: str, reason: str) -> Outcome:
        """A worker failed or went silent: a lost shard, a lost worker, or a real error in the job."""
        if job.id in self._cancelled:
            return Outcome("cancelled")
        for shard in gang.shards:
            if not await gang.alive(shard):
                return Outcome("shard_lost", shard.index, reason=f"parameter-server shard {shard.index} was lost")
        if not await gang.alive(member):
            return Outcome("worker_lost", member.index, reason=f"worker {member.index} was lost")
        if reason in ("Unavailable", "DeadlineExceeded"):
            return Outcome("worker_lost", member.index, reason=f"worker {member.index}: {error}")
        return Outcome("failed", member.index, reason=f"worker {member.index} failed: {error}")

    # Starting members --------------------------------------------------------------------------------

    async def _start_shards(self, gang: Gang) -> None:
        await asyncio.gather(*(self._start_shard(gang, i, 0) for i in range(gang.job.spec.shards)))

    async def _start_shard(self, gang: Gang, index: int, attempt: int) -> None:
        job, settings = gang.job, self._settings
        options = {
            "home": str(settings.home.resolve()),
            "paramserver_checkpoint_root": str(settings.checkpoint_root().resolve()),
            "log_level": settings.log_level,
            "log_format": "json",
        }
        if settings.ray_address:
            # On a cluster the scheduler and the other ranks reach the shard from other hosts.
            options["bind_host"] = "node"
        member = await gang.start("shard", index, attempt, options, actor_env(settings))
        spec = job.spec
        config = ps.ShardConfig(
            job_id=job.id,
            shard_index=index,
            num_shards=spec.shards,
            num_workers=spec.workers,
            consistency=spec.consistency,
            staleness=spec.staleness,
            model=ps.ModelSpec(architecture=spec.architecture, arguments_json=spec.arguments_json, seed=spec.seed),
            optimizer=ps.OptimizerSpec(
                name=spec.optimizer.name,
                hyperparameters=spec.optimizer.hyperparameters,
                schedule=spec.optimizer.schedule,
                schedule_arguments=spec.optimizer.schedule_arguments,
            ),
            checkpoint_interval=spec.checkpoint_interval,
        )
        client = ParamServerClient.connect(member.address, settings)
        try:
            await client.init_shard(config, timeout=120)
        finally:
            await client.close()

    async def _start_workers(self, gang: Gang, *, resume: bool, attempt_of: Any = None) -> None:
        ranks = range(gang.job.spec.workers)
        await asyncio.gather(
            *(self._start_worker(gang, rank, attempt_of(rank) if attempt_of else 0, resume=resume) for rank in ranks)
        )

    async def _start_worker(self, gang: Gang, rank: int, attempt: int, *, resume: bool) -> None:
        job, spec, settings = gang.job, gang.job.spec, self._settings
        lineage = registry_pb2.Lineage(
            training_job_id=job.id,
            dataset_fingerprint=job.dataset_fingerprint,
            hyperparameters={
                "optimizer": spec.optimizer.name,
                **{k: f"{v:g}" for k, v in spec.optimizer.hyperparameters.items()},
                "batch_size": str(spec.batch_size),
                "epochs": str(spec.epochs),
                "workers": str(spec.workers),
                "shards": str(spec.shards),
                "consistency": spec.consistency,
                "codec": spec.codec,
                "seed": str(spec.seed),
            },
            source=f"maas training job {job.id}",
        )
        options = {
            "job_id": job.id,
            "rank": rank,
            "world_size": spec.workers,
            "architecture": spec.architecture,
            "arguments_json": spec.arguments_json,
            "dataset": dataclasses.asdict(spec.dataset),
            "batch_size": spec.batch_size,
            "steps_per_epoch": max(1, job.total_steps // max(spec.epochs, 1)),
            "total_steps": job.total_steps,
            "shard_addresses": [m.address for m in gang.shards],
            "codec": spec.codec,
            "codec_options": spec.codec_kwargs(),
            "seed": spec.seed,
            "data_root": str(settings.data_root().resolve()),
            "dataset_fingerprint": job.dataset_fingerprint or None,
            "resume": resume,
            "registry_address": settings.scheduler_registry_address,
            "target_model": spec.target_model,
            # The trained model belongs to the job's tenant: the rank uploads acting for it.
            "tenant": spec.tenant,
            "lineage_hex": lineage.SerializeToString().hex(),
            "tags": {"job": job.id, "codec": spec.codec, "consistency": spec.consistency},
            "settings": {"log_level": settings.log_level, "log_format": "json"},
            # The rank's work is a child of this job's span (Ray carries no trace context of its own).
            "traceparent": current_traceparent(),
        }
        if settings.ray_address:
            options["bind_host"] = "node"
        await gang.start("worker", rank, attempt, options, actor_env(settings))

    async def _stop_worker(self, member: Member) -> None:
        channel = make_channel(member.address, self._settings, [TRAINING_SERVICE])
        with contextlib.suppress(grpc.aio.AioRpcError):
            await training_pb2_grpc.TrainingWorkerStub(channel).StopWorker(tr.StopWorkerRequest(), timeout=15)
        await channel.close()
