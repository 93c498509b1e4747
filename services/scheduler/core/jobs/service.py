"""The scheduler's training-job use cases: submit, get, list, cancel, watch, and admission.

:class:`JobService` owns the job store (through a :class:`~services.scheduler.core.jobs.ports.JobRepository`) and
decides when a job runs; a :class:`~services.scheduler.core.jobs.ports.JobRunner` places and runs it and reports
back through the service, which is its :class:`~services.scheduler.core.jobs.ports.JobReporter`.

Admission: one loop task runs :func:`~services.scheduler.core.policy.plan_admission` over the QUEUED jobs
(priority, then fair share among tenants, then submission order; each tenant within its quota plus
borrowing limit; the pool's capacity, with ``max_running_jobs`` as its running-jobs dimension), on every
wake-up (a submission, a job ending) and every ``admission_poll_s``. What each job's gang holds counts: its
workers and shards, and every replica of the tenant's deployments. An admitted job is stored as PLACING,
then ``runner.run(job, service)`` runs as a task. ``max_running_jobs`` 0 pauses admission, and the runner
(created lazily by its factory, on the first job admitted or resumed) is then never created.

Start-up removes strays: ``runner.sweep`` ends the actors and placement groups of every job not stored
PLACING, RUNNING or PREEMPTED, before anything is resumed. It runs when the runner is created at start (some
job is active) and, with ``sweep_at_start``, always: on a Ray cluster that outlives the scheduler (detached
actors survive it there) strays may exist with no job active. A local Ray is the scheduler's own (``maas up``
ends one a killed scheduler left), so there a scheduler with nothing active still never starts Ray. Why a job
waits, and its place in the queue, are kept from the last pass and shown on reads (not stored: they change
with every pass).

A job that could never be admitted (larger than the whole pool, or than its tenant's quota plus borrowing
limit) is refused at submission with the reason.

State changes are stored with a condition on the current state, so terminal states are final whatever
order reports arrive in. Step metrics are kept in memory, published to watchers at once and stored at most
once a second per job (and with every state change).

Tenants: every job belongs to ``spec.tenant``. The read and cancel use cases take the caller's *scope*
(the tenant it may see, None: every tenant), given by the API layer; a job of another tenant is reported
exactly as a missing one, so that a caller cannot learn that it exists.

Watchers get the job, then every stored change of it (a bounded, per-watcher queue in this process); step
metrics are dropped for a watcher that has more than ``watch_queue_size`` of them pending, state changes
never are.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog

from services.scheduler.core.events import EventBus, EventKind
from services.scheduler.core.group_commit import GroupCommit
from services.scheduler.core.jobs.model import (
    ACTIVE_STATES,
    LIVE_STATES,
    PREEMPTIBLE_STATES,
    Job,
    JobChanges,
    JobState,
    Page,
    StepMetrics,
    TrainingJobSpec,
    check_request_id,
    job_not_found,
    request_conflict,
    visible_to,
)
from services.scheduler.core.jobs.ports import ElasticReplicas, JobReporter, JobRepository, JobRunner
from services.scheduler.core.jobs.validation import ValidatedSpec, validate_spec
from services.scheduler.core.policy import (
    NONE,
    UNLIMITED,
    Candidate,
    FairShare,
    Resources,
    Tenant,
    check_feasible,
    choose_victims,
    gang_demand,
    plan_admission,
)
from services.scheduler.core.tenants import TenantService
from shared import names
from shared.errors import FailedPrecondition, MaasError, Unavailable
from shared.paging import encode_token, parse_page

T = TypeVar("T")
log = structlog.get_logger("maas.scheduler")

RunnerFactory = Callable[[], JobRunner]
RunFunction = Callable[[Job, JobReporter], Awaitable[None]]
WatchEvent = Job | StepMetrics

_QUEUED = frozenset({JobState.QUEUED})
# A stored change of a job as a scheduler event (a job is only ever QUEUED again after submission by a requeue).
_EVENT_OF = {
    JobState.QUEUED: EventKind.JOB_REQUEUED,
    JobState.PLACING: EventKind.JOB_ADMITTED,
    JobState.RUNNING: EventKind.JOB_RUNNING,
    JobState.PREEMPTED: EventKind.JOB_PREEMPTED,
    JobState.SUCCEEDED: EventKind.JOB_SUCCEEDED,
    JobState.FAILED: EventKind.JOB_FAILED,
    JobState.CANCELLED: EventKind.JOB_CANCELLED,
}
_PREEMPTED = frozenset({JobState.PREEMPTED})
_RUNNING = frozenset({JobState.RUNNING})
_CANCEL_ATTEMPTS = 5


@dataclass(frozen=True)
class TenantUsage:
    tenant: Tenant
    used: Resources
    queued_jobs: int
    running_jobs: int


def job_demand(spec: TrainingJobSpec) -> Resources:
    """What a job's whole gang holds once placed."""
    worker, shard = spec.worker_resources, spec.shard_resources
    return gang_demand(
        [
            (spec.workers, worker.cpus, worker.gpus, worker.memory_bytes),
            (spec.shards, shard.cpus, shard.gpus, shard.memory_bytes),
        ]
    )


def _unlimited_tenant(name: str, max_running: int) -> Tenant:
    """A tenant when the service has no tenant records (tests): no quota but the running-jobs cap."""
    quota = UNLIMITED if max_running <= 0 else replace(UNLIMITED, jobs=max_running)
    return Tenant(name=name, quota=quota)


def new_job_id() -> str:
    return f"job-{secrets.token_hex(8)}"


async def _durable(awaitable: Awaitable[T]) -> T:
    """Await a step that must finish once started, even if the caller is cancelled meanwhile."""
    task = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


class _Watcher:
    """One watcher's pending events: step metrics bounded (extra ones dropped), job snapshots never dropped."""

    def __init__(self, max_metrics: int) -> None:
        self._items: deque[WatchEvent | None] = deque()
        self._metrics = 0
        self._max_metrics = max_metrics
        self._ready = asyncio.Event()
        self.dropped = 0

    def put(self, item: WatchEvent | None) -> None:
        if isinstance(item, StepMetrics):
            if self._metrics >= self._max_metrics:
                self.dropped += 1
                return
            self._metrics += 1
        self._items.append(item)
        self._ready.set()

    async def get(self) -> WatchEvent | None:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, StepMetrics):
            self._metrics -= 1
        return item


@dataclass
class _Progress:
    """A running job's latest step metrics, per worker, and when they were last stored."""

    step: int = 0
    workers: dict[int, StepMetrics] = field(default_factory=dict)
    last_write: float = -math.inf
    flush: asyncio.Task[None] | None = None

    def metrics(self) -> dict[str, float]:
        """Job metrics from each worker's latest step: mean loss, summed throughput, traffic per step (pushes
        and pulls), and the pushed (encoded gradient) bytes per step."""
        latest = list(self.workers.values())
        if not latest:
            return {}
        return {
            "loss": sum(m.loss for m in latest) / len(latest),
            "samples_per_s": sum(m.samples_per_s for m in latest),
            "bytes_per_step": float(sum(m.bytes_sent + m.bytes_received for m in latest)),
            # What the gradient codec put on the wire: the figure compression is judged by.
            "push_bytes_per_step": float(sum(m.bytes_sent for m in latest)),
        }


class JobService:
    """Training jobs: the use cases the API calls, the admission loop, and the runner's reporter."""

    def __init__(
        self,
        repository: JobRepository,
        runner_factory: RunnerFactory,
        *,
        data_root: Path,
        max_running_jobs: int = 1,
        tenant_max_running: int = 0,
        default_max_failures: int = 3,
        max_placement_attempts: int = 3,
        progress_interval_s: float = 1.0,
        watch_queue_size: int = 256,
        admission_poll_s: float = 5.0,
        admission_min_interval_s: float = 0.05,
        tenants: TenantService | None = None,
        capacity: Callable[[], Resources] = lambda: UNLIMITED,
        replica_usage: Callable[[], Mapping[str, Resources]] = dict,
        fair_share_half_life_s: float = 600.0,
        preemption: bool = True,
        preemption_grace_s: float = 30.0,
        events: EventBus | None = None,
        sweep_at_start: bool = False,
        replicas: ElasticReplicas | None = None,
        replica_priority: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._repo = repository
        self._sweep_at_start = sweep_at_start
        self._runner_factory = runner_factory
        self._runner: JobRunner | None = None
        self._data_root = data_root
        self._max_running = max_running_jobs
        self._tenant_max = tenant_max_running
        self._default_max_failures = default_max_failures
        self._max_placement_attempts = max_placement_attempts
        self._progress_interval = progress_interval_s
        self._watch_queue_size = watch_queue_size
        self._admission_poll_s = admission_poll_s
        self._admission_min_interval_s = admission_min_interval_s
        self._tenants = tenants
        self._capacity = capacity
        self._replica_usage = replica_usage
        self._fair = FairShare(fair_share_half_life_s, clock)
        # Job id -> (place in the queue, why it waits), from the last admission pass.
        self._waiting: dict[str, tuple[int, str]] = {}
        #: Tenant -> what its placed jobs hold, as of the last admission pass (deployments read it).
        self.placed_jobs: dict[str, Resources] = {}
        self.events = events or EventBus()
        self._preemption = preemption
        self._preemption_grace_s = preemption_grace_s
        # Jobs being preempted: the runner's reports about them are ignored, as for cancelled ones.
        self._preempting: set[str] = set()
        # Replicas above their minimums may be preempted too, as jobs of ``replica_priority``; while the ones
        # given up drain (until ``_shedding_until``), no more are taken.
        self._replicas = replicas
        self._replica_priority = replica_priority
        self._shedding_until = -math.inf
        self._background: set[asyncio.Task[None]] = set()
        self._clock = clock
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        # Job id -> the task running (or resuming) it; a job with a task is never admitted again meanwhile.
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Jobs whose runner coroutine has been entered (before that, cancelling the task is enough).
        self._started: set[str] = set()
        # Jobs being cancelled: the runner's reports about them are ignored.
        self._cancelling: Counter[str] = Counter()
        self._progress: dict[str, _Progress] = {}
        self._watchers: dict[str, set[_Watcher]] = {}
        # Concurrent submissions share transactions (one sync to disk for a burst, not one each).
        self._inserts: GroupCommit[Job, tuple[Job, bool]] = GroupCommit(repository.insert_many)
        # The QUEUED jobs as last read, by id: an admission pass re-reads only (id, revision) and decodes the
        # jobs that are new or changed, not the whole queue on every pass.
        self._queued: dict[str, Job] = {}
        self._demands: dict[str, Resources] = {}

    # Plumbing -----------------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def _mutate(self, fn: Callable[..., T], *args: Any) -> T:
        return await _durable(self._run(fn, *args))

    def _get_runner(self) -> JobRunner:
        if self._runner is None:
            log.info("runner_starting")
            self._runner = self._runner_factory()
        return self._runner

    @property
    def runner_started(self) -> bool:
        """Whether the runner factory has been called."""
        return self._runner is not None

    def _publish(self, job_id: str, event: WatchEvent | None) -> None:
        for watcher in self._watchers.get(job_id, ()):
            watcher.put(event)
        if isinstance(event, Job):
            self.events.publish(_EVENT_OF[event.state], event.spec.tenant, event.message, job_id=event.id)

    def _is_cancelling(self, job_id: str) -> bool:
        return self._cancelling[job_id] > 0 or job_id in self._preempting

    # Lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Remove what a previous process left that no stored job accounts for; hand jobs it left PLACING or
        RUNNING to ``runner.resume`` and finish the preemptions it began; start admitting."""
        active = await self._run(self._repo.in_states, ACTIVE_STATES)
        if active or self._sweep_at_start:
            runner = self._get_runner()
            await self._sweep(runner, {job.id for job in active})
            for job in active:
                if job.state is JobState.PREEMPTED:
                    # Stored before it was acted on: finish it (its gang may still be there).
                    log.info("job_preemption_finishing", job_id=job.id)
                    self._start_preemption(job, job.message)
                    continue
                log.info("job_resuming", job_id=job.id, state=job.state.value)
                self._launch(job, runner.resume)
        self._loop_task = asyncio.create_task(self._admission_loop(), name="scheduler-admission")

    async def _sweep(self, runner: JobRunner, keep: set[str]) -> None:
        """Remove the gangs of jobs not in ``keep``, before anything is resumed. A scheduler killed while it
        placed, preempted or ended a job leaves its actors and placement group (detached: they outlive it),
        holding the cluster's resources with nothing to end them: the next process is the only one that
        can. Housekeeping: a failure is logged and start-up goes on."""
        try:
            removed = await runner.sweep(keep)
        except Exception:
            log.exception("job_strays_sweep_failed")
            return
        if removed:
            log.info("job_strays_removed", count=len(removed), removed=sorted(removed))

    async def close(self) -> None:
        """Stop admitting, cancel the runner tasks (their jobs stay PLACING/RUNNING, for ``resume`` at the
        next start), close the runner if it has ``close()``, and end every watch with UNAVAILABLE."""
        self._closing = True
        tasks: list[asyncio.Task[None]] = [*self._tasks.values(), *self._background]
        tasks += [p.flush for p in self._progress.values() if p.flush is not None]
        if self._loop_task is not None:
            tasks.append(self._loop_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._inserts.close()
        close = getattr(self._runner, "close", None)
        if close is not None:
            await close()
        for job_id in list(self._watchers):
            self._publish(job_id, None)
        self.events.close()

    # Use cases ----------------------------------------------------------------------------------------

    async def submit(self, spec: TrainingJobSpec, request_id: str = "", trace_context: str = "") -> Job:
        """Validate ``spec`` (InvalidArgument naming the field otherwise) and queue the job.

        Its priority class (or the default one) gives its priority (InvalidArgument for an unknown class,
        PermissionDenied for one its tenant was not granted); a job that could never be admitted is refused
        (FailedPrecondition naming what it needs and what there is).

        A ``request_id`` makes the submission idempotent within the spec's tenant: a retry (also one
        racing the first) returns the job the first created; AlreadyExists if that job's normalised spec
        differs from this one's. ``trace_context`` (a W3C ``traceparent``) is the trace the job's run continues.
        """
        check_request_id(request_id)
        if self._tenants is not None and (spec.priority_class or not spec.priority):
            # A priority set directly (no class) is an admin's; the API layer checks who asks.
            priority = self._tenants.priority(spec.tenant, spec.priority_class)
            spec = replace(spec, priority=priority)

        def validate_and_measure() -> tuple[ValidatedSpec, Resources]:
            # One trip to a thread for both (each trip costs the event loop more than a cached validation).
            validated = validate_spec(spec, data_root=self._data_root, default_max_failures=self._default_max_failures)
            return validated, self._capacity()

        validated, capacity = await self._run(validate_and_measure)
        tenant = self._tenant(validated.spec.tenant)
        check_feasible(job_demand(validated.spec), tenant, replace(capacity, jobs=max(self._max_running, 1)))
        now = datetime.now(UTC)
        job = Job(
            id=new_job_id(),
            spec=validated.spec,
            state=JobState.QUEUED,
            create_time=now,
            update_time=now,
            total_steps=validated.total_steps,
            dataset_fingerprint=validated.dataset.fingerprint,
            request_id=request_id,
            trace_context=trace_context,
        )
        stored, created = await self._inserts.submit(job)
        if not created:
            conflict = request_conflict("job", stored.id, request_id, stored.spec.to_dict(), job.spec.to_dict())
            if conflict is not None:
                raise conflict
            log.info("job_submit_retried", job_id=stored.id, tenant=stored.spec.tenant, request_id=request_id)
            return stored
        self._queued[stored.id] = stored  # the next admission pass need not read it back
        log.info("job_submitted", job_id=stored.id, tenant=stored.spec.tenant, priority=stored.spec.priority)
        self.events.publish(EventKind.JOB_SUBMITTED, stored.spec.tenant, job_id=stored.id)
        self._wake.set()
        return stored

    async def get(self, job_id: str, scope: str | None = None) -> Job:
        """The job; NotFound if there is none or it is not of the tenant ``scope`` (None: any tenant)."""
        job = await self._run(self._repo.get, names.check_name(job_id, "id"))
        if not visible_to(job.spec.tenant, scope):
            raise job_not_found(job_id)
        return self._with_wait(job)

    def _with_wait(self, job: Job) -> Job:
        """A QUEUED job with its place in the queue and why it waits, as of the last admission pass."""
        wait = self._waiting.get(job.id) if job.state is JobState.QUEUED else None
        if wait is None:
            return job
        message = wait[1]
        if job.preemptions:
            # Why it waits now, and that it will not start over.
            message += f" (preempted before: {job.message})"
        return replace(job, queue_position=wait[0], message=message)

    async def list_jobs(
        self,
        page_size: int,
        page_token: str,
        states: Iterable[JobState] = (),
        tenant: str = "",
        scope: str | None = None,
    ) -> Page[Job]:
        """Jobs newest first (by submission), optionally only in ``states`` and of ``tenant``, and never of
        a tenant other than ``scope`` (None: any tenant)."""
        if tenant:
            names.check_name(tenant, "tenant")
        wanted = frozenset(states)
        query = {"states": sorted(s.value for s in wanted), "tenant": tenant}
        page = parse_page(page_size, page_token, query)
        if scope is not None:
            if tenant and tenant != scope:
                return Page(items=[])  # another tenant's jobs: none the caller may see
            tenant = scope
        jobs = [
            self._with_wait(j) for j in await self._run(self._repo.list_jobs, wanted, tenant, page.after, page.size + 1)
        ]
        if len(jobs) <= page.size:
            return Page(items=jobs)
        kept = jobs[: page.size]
        return Page(items=kept, next_page_token=encode_token(kept[-1].id, query))

    async def cancel(self, job_id: str, scope: str | None = None) -> Job:
        """QUEUED: cancelled at once. PLACING/RUNNING: ``runner.cancel`` first, then CANCELLED. An ended
        job is FailedPrecondition; one of another tenant than ``scope`` is NotFound."""
        names.check_name(job_id, "id")
        for _ in range(_CANCEL_ATTEMPTS):
            job = await self.get(job_id, scope)
            if job.state.terminal:
                raise FailedPrecondition(f"job {job_id} has already ended ({job.state.value})", reason="JOB_ENDED")
            if job.state is JobState.QUEUED:
                cancelled = await self._transition(job_id, JobState.CANCELLED, _QUEUED, "cancelled", from_runner=False)
            else:
                cancelled = await self._cancel_active(job_id)
            if cancelled is not None:
                return cancelled
            # The job moved meanwhile (admitted, or ended): look again.
        raise Unavailable(f"job {job_id} kept changing state; try again", reason="JOB_BUSY", retry_after_s=1.0)

    async def _cancel_active(self, job_id: str) -> Job | None:
        self._cancelling[job_id] += 1
        try:
            task = self._tasks.get(job_id)
            if task is not None and job_id not in self._started:
                task.cancel()  # the runner has not seen the job yet
            else:
                await self._get_runner().cancel(job_id)
            return await self._transition(job_id, JobState.CANCELLED, LIVE_STATES, "cancelled", from_runner=False)
        finally:
            self._cancelling[job_id] -= 1
            if self._cancelling[job_id] <= 0:
                del self._cancelling[job_id]

    async def watch(self, job_id: str, scope: str | None = None) -> AsyncGenerator[WatchEvent, None]:
        """The job now, then each stored change of it and its step metrics, until it ends (NotFound for a
        job of another tenant than ``scope``)."""
        names.check_name(job_id, "id")
        watcher = _Watcher(self._watch_queue_size)
        watchers = self._watchers.setdefault(job_id, set())
        watchers.add(watcher)
        try:
            job = await self.get(job_id, scope)
            yield job
            revision = job.revision
            while not job.state.terminal:
                event = await watcher.get()
                if event is None:
                    raise Unavailable("the scheduler is shutting down", reason="SHUTTING_DOWN")
                if isinstance(event, Job):
                    if event.revision <= revision:
                        continue  # older than what this watcher has seen
                    job, revision = event, event.revision
                yield event
        finally:
            watchers.discard(watcher)
            if not watchers and self._watchers.get(job_id) is watchers:
                del self._watchers[job_id]

    # Admission ----------------------------------------------------------------------------------------

    async def _admission_loop(self) -> None:
        while not self._closing:
            self._wake.clear()
            began = self._clock()
            try:
                await self._admit()
            except Exception:
                log.exception("admission_failed")
            took = self._clock() - began
            try:
                await asyncio.wait_for(self._wake.wait(), self._admission_poll_s)
            except TimeoutError:
                pass
            # A pass reads and orders the whole queue: under a burst of submissions, one pass per
            # ``admission_min_interval_s`` covers them all instead of one pass each (which made a burst
            # quadratic), and a long queue's passes take at most a fifth of the time. A lone submission
            # after a quiet spell is admitted at once.
            rest = max(self._admission_min_interval_s, 5 * took) - (self._clock() - began)
            if rest > 0 and not self._closing:
                await asyncio.sleep(rest)

    def _tenant(self, name: str) -> Tenant:
        return self._tenants.tenant(name) if self._tenants is not None else _unlimited_tenant(name, self._tenant_max)

    async def usage(self) -> tuple[dict[str, Resources], list[Job]]:
        """Tenant -> what it has placed now (its placed and running jobs' whole gangs, its deployments'
        replicas), and the QUEUED jobs."""
        active = await self._run(self._repo.in_states, ACTIVE_STATES)
        jobs: dict[str, Resources] = {}
        for job in active:
            jobs[job.spec.tenant] = jobs.get(job.spec.tenant, NONE) + job_demand(job.spec)
        self.placed_jobs = jobs
        held = dict(self._replica_usage())
        for tenant, demand in jobs.items():
            held[tenant] = held.get(tenant, NONE) + demand
        return held, await self._queued_jobs()

    async def _queued_jobs(self) -> list[Job]:
        """The QUEUED jobs, oldest first: the store decides which, the jobs decoded before are reused while
        their revision is unchanged (every stored change bumps it)."""
        revisions = await self._run(self._repo.revisions_in_states, _QUEUED)
        known = self._queued
        stale = [job_id for job_id, revision in revisions if job_id not in known or known[job_id].revision != revision]
        if stale:
            known = {**known, **{job.id: job for job in await self._run(self._repo.get_many, stale)}}
        # A job changed again between the two reads is left out of this pass; the next one sees it.
        queued = [known[i] for i, revision in revisions if i in known and known[i].revision == revision]
        self._queued = {job.id: job for job in queued}
        self._demands = {job.id: self._demands.get(job.id) or job_demand(job.spec) for job in queued}
        return queued

    def _demand(self, job: Job) -> Resources:
        # A job's spec never changes: its demand is computed once while it waits.
        return self._demands.get(job.id) or job_demand(job.spec)

    async def tenant_usage(self, name: str) -> TenantUsage:
        """What ``name`` has placed now against its quota, and how many of its jobs wait or run."""
        held, queued = await self.usage()
        active = await self._run(self._repo.active_counts)
        return TenantUsage(
            tenant=self._tenant(name),
            used=held.get(name, NONE),
            queued_jobs=sum(1 for job in queued if job.spec.tenant == name),
            running_jobs=active.get(name, 0),
        )

    async def _admit(self) -> None:
        if self._max_running <= 0:
            return
        held, queued = await self.usage()
        self._fair.observe(held)
        capacity = replace(await self._run(self._capacity), jobs=self._max_running)
        candidates = [
            Candidate(job.id, job.spec.tenant, job.spec.priority, seq, self._demand(job))
            for seq, job in enumerate(queued)
            if job.id not in self._tasks
        ]
        plan = plan_admission(candidates, self._tenant, held, capacity, self._fair.share)
        self._waiting = {job_id: (place, reason) for place, (job_id, reason) in enumerate(plan.waiting.items(), 1)}
        for candidate in plan.admit:
            if self._closing:
                return
            runner = self._get_runner()
            placing = JobChanges(state=JobState.PLACING, message="placing workers and shards")
            job = await self._mutate(self._repo.update, candidate.id, placing, _QUEUED)
            if job is None:
                continue  # cancelled meanwhile
            log.info("job_admitted", job_id=job.id, tenant=job.spec.tenant, priority=job.spec.priority)
            self.placed_jobs[job.spec.tenant] = self.placed_jobs.get(job.spec.tenant, NONE) + candidate.demand
            self._publish(job.id, job)
            # A preempted job restarts from the checkpoint its preemption took.
            self._launch(job, runner.resume if job.preemptions else runner.run)
        if plan.blocked is not None and self._preemption:
            await self._preempt_for(plan.blocked, held, capacity)

    # Preemption ---------------------------------------------------------------------------------------

    async def _preempt_for(self, head: Candidate, held: Mapping[str, Resources], capacity: Resources) -> None:
        """Make room for ``head`` (the first job the full pool holds back) by preempting what the policy
        allows; nothing when that would not be enough. Jobs already being preempted count as leaving."""
        if self._preempting or self._clock() < self._shedding_until:
            return  # room is being made already: look again once it is
        active = await self._run(self._repo.in_states, PREEMPTIBLE_STATES)
        running = [
            Candidate(job.id, job.spec.tenant, job.spec.priority, seq, job_demand(job.spec))
            for seq, job in enumerate(active)
            if job.id in self._tasks
        ]
        replicas = self._replicas.preemptible(self._replica_priority) if self._replicas is not None else []
        victims = choose_victims(head, [*running, *replicas], self._tenant, held, capacity)
        why = f"preempted for job {head.id} (priority {head.priority}, tenant {head.tenant!r})"
        shed = [victim.id for victim in victims if victim in replicas]
        if shed and self._replicas is not None:
            self._shedding_until = self._clock() + self._preemption_grace_s
            self._replicas.shed(shed, 2 * self._preemption_grace_s, f"replicas above the minimum {why}")
        for victim in victims:
            if victim in replicas:
                continue
            job = await self._mutate(
                self._repo.update,
                victim.id,
                JobChanges(state=JobState.PREEMPTED, message=f"{why}: checkpointing, releasing its gang"),
                PREEMPTIBLE_STATES,
            )
            if job is None:
                continue  # it ended meanwhile
            log.info("job_preempted", job_id=job.id, by=head.id, priority=job.spec.priority)
            self._publish(job.id, job)
            self._start_preemption(job, why)

    def _start_preemption(self, job: Job, why: str) -> None:
        self._preempting.add(job.id)
        task = asyncio.create_task(self._finish_preemption(job, why), name=f"scheduler-preempt-{job.id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _finish_preemption(self, job: Job, why: str) -> None:
        """Checkpoint and release (the runner), wait for the job's run to return, then QUEUED again."""
        try:
            run = self._tasks.get(job.id)
            if run is not None and job.id not in self._started:
                run.cancel()  # the runner never saw it: nothing was placed
            else:
                await self._get_runner().preempt(job, self._preemption_grace_s)
            if run is not None:
                await asyncio.wait([run], timeout=self._preemption_grace_s)
            reason = why.split(":")[0] + "; resumes from its checkpoint when admitted again"
            queued = await self._transition(
                job.id, JobState.QUEUED, _PREEMPTED, reason, from_runner=False, preempted=True
            )
            if queued is not None:
                log.info("job_requeued_after_preemption", job_id=job.id, preemptions=queued.preemptions)
        except asyncio.CancelledError:
            raise  # shutting down: the job stays PREEMPTED, and the next start finishes this
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("preemption_failed", job_id=job.id, error_id=error_id)
            await self._transition(
                job.id,
                JobState.FAILED,
                _PREEMPTED,
                f"preemption failed (scheduler log error_id={error_id})",
                from_runner=False,
            )
        finally:
            self._preempting.discard(job.id)
            self._wake.set()

    def _launch(self, job: Job, fn: RunFunction) -> None:
        self._progress.setdefault(job.id, _Progress(step=job.step))
        task = asyncio.create_task(self._drive(job, fn), name=f"scheduler-{job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(lambda done: self._task_done(job.id, done))

    def _task_done(self, job_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(job_id) is task:
            del self._tasks[job_id]
            self._started.discard(job_id)
        self._wake.set()

    async def _drive(self, job: Job, fn: RunFunction) -> None:
        if self._is_cancelling(job.id):
            return
        self._started.add(job.id)
        try:
            await fn(job, self)
        except MaasError as exc:
            # Domain errors carry messages written for clients.
            log.warning("runner_failed", job_id=job.id, error=exc.message)
            reason = f"runner error: {exc.message}"
        except Exception as exc:
            # Anything else may carry paths and stack text of this host: the client gets a stable reason
            # and an id that finds the full error in the scheduler's log.
            error_id = uuid.uuid4().hex[:12]
            log.exception("runner_failed", job_id=job.id, error_id=error_id)
            reason = f"runner error: {type(exc).__name__} (scheduler log error_id={error_id})"
        else:
            reason = "the runner returned without reporting an outcome"
        # A no-op when the runner reported an outcome (the job is no longer PLACING/RUNNING).
        await self._transition(job.id, JobState.FAILED, ACTIVE_STATES, reason)

    # Transitions --------------------------------------------------------------------------------------

    async def _transition(
        self,
        job_id: str,
        state: JobState,
        only_from: frozenset[JobState],
        message: str = "",
        *,
        from_runner: bool = True,
        model_version: int | None = None,
        final_metrics: dict[str, float] | None = None,
        step: int | None = None,
        preempted: bool = False,
        placement_attempts: int | None = None,
    ) -> Job | None:
        """Store ``state`` if the job is in ``only_from``; publish it. None when nothing changed."""
        if from_runner and self._is_cancelling(job_id):
            return None
        progress = self._progress.get(job_id)
        metrics = progress.metrics() if progress is not None else None
        if step is None and progress is not None:
            step = progress.step
        if final_metrics is not None:
            metrics = {**(metrics or {}), **final_metrics}
        changes = JobChanges(
            state=state,
            message=message,
            step=step,
            metrics=metrics,
            model_version=model_version,
            preempted=preempted,
            placement_attempts=placement_attempts,
        )
        job = await self._mutate(self._repo.update, job_id, changes, only_from)
        if job is None:
            return None
        log.info("job_state", job_id=job_id, state=state.value, message=message)
        if state.terminal:
            ended = self._progress.pop(job_id, None)
            if ended is not None and ended.flush is not None:
                ended.flush.cancel()
        self._publish(job_id, job)
        if not state.active:
            self._wake.set()  # a running slot is free
        return job

    # JobReporter --------------------------------------------------------------------------------------

    async def placing(self, job_id: str) -> None:
        # From RUNNING only (placing again after a lost worker or shard): admission stored PLACING already,
        # and storing it again would announce the admission twice.
        await self._transition(job_id, JobState.PLACING, _RUNNING, "placing workers and shards")

    async def running(self, job_id: str) -> None:
        # Placed: the timeouts counted so far were a busy cluster, not a job that can never fit.
        await self._transition(job_id, JobState.RUNNING, ACTIVE_STATES, placement_attempts=0)

    async def progress(self, job_id: str, metrics: StepMetrics) -> None:
        progress = self._progress.get(job_id)
        if progress is None or self._is_cancelling(job_id):
            return  # not a job this process runs (any more)
        progress.workers[metrics.worker] = metrics
        progress.step = max(progress.step, metrics.step + 1)
        self._publish(job_id, metrics)
        now = self._clock()
        due = progress.last_write + self._progress_interval
        if now >= due:
            progress.last_write = now
            await self._store_progress(job_id, progress)
        elif progress.flush is None:
            progress.flush = asyncio.create_task(self._flush_later(job_id, progress, due - now))

    async def _flush_later(self, job_id: str, progress: _Progress, delay: float) -> None:
        await asyncio.sleep(delay)
        progress.flush = None
        progress.last_write = self._clock()
        await self._store_progress(job_id, progress)

    async def _store_progress(self, job_id: str, progress: _Progress) -> None:
        changes = JobChanges(step=progress.step, metrics=progress.metrics())
        await self._mutate(self._repo.update, job_id, changes, ACTIVE_STATES)

    async def succeeded(self, job_id: str, model_version: int, metrics: dict[str, float]) -> None:
        job = await self._run(self._repo.get, job_id)
        await self._transition(
            job_id,
            JobState.SUCCEEDED,
            ACTIVE_STATES,
            model_version=model_version,
            final_metrics=dict(metrics),
            step=job.total_steps,
        )

    async def failed(self, job_id: str, reason: str) -> None:
        await self._transition(job_id, JobState.FAILED, ACTIVE_STATES, reason)

    async def requeued(self, job_id: str, reason: str) -> None:
        await self._transition(job_id, JobState.QUEUED, ACTIVE_STATES, reason)

    async def placement_timed_out(self, job_id: str, timeout_s: float, shortage: str) -> None:
        # Decided here, not in the runner: a job requeued forever would hold its place in the queue and
        # its tenant's share while it can never run, so after max_placement_attempts timeouts in a row it
        # fails, saying what the cluster lacks.
        job = await self._run(self._repo.get, job_id)
        attempts = job.placement_attempts + 1
        what = f"could not place {job.spec.shards} shards and {job.spec.workers} workers within {timeout_s:g}s"
        if attempts >= self._max_placement_attempts:
            reason = f"{what}, {attempts} times; {shortage}"
            await self._transition(job_id, JobState.FAILED, ACTIVE_STATES, reason, placement_attempts=attempts)
        else:
            reason = f"{what} (attempt {attempts} of {self._max_placement_attempts}); {shortage}; waiting for resources"
            await self._transition(job_id, JobState.QUEUED, ACTIVE_STATES, reason, placement_attempts=attempts)

    async def failure(self, job_id: str, reason: str) -> int:
        job = await self._mutate(self._repo.add_failure, job_id, reason)
        if not job.state.terminal:
            log.warning("job_failure", job_id=job_id, failures=job.failures, reason=reason)
            self._publish(job_id, job)
        return job.failures
